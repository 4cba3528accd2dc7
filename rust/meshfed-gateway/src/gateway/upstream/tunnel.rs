//! The egress side of the gateway tunnel (see `gateway::tunnel`): a few
//! tunnel connections per peer endpoint, kept across config generations,
//! and a client connection opened as a stream on one of them.
//!
//! A stream is opened on the least busy pooled connection made with the
//! endpoint's current client config (its SVID, the peer's pinned ID and
//! roots); a connection made with an older one takes no new streams and
//! ends with its last. A pooled connection that turns out closed, or whose
//! ingress asks for a new one (`421`), costs one more try on a new
//! connection, never a failure of the endpoint. A peer that does not
//! negotiate the tunnel is served per connection with the hop protocol it
//! does negotiate.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::dial::{Conveyed, Dial, Upstream, convey, handshake, tcp};
use crate::config::{ClusterSpec, UpstreamTlsSpec};
use crate::gateway::clock;
use crate::gateway::stats::inc;
use crate::gateway::tunnel::{
    self, CONNECTION_WINDOW, MAX_HEADER_LIST, MAX_STREAMS, MAX_TUNNELS_PER_ENDPOINT, Opened,
    STREAM_WINDOW, StreamIo,
};
use crate::tls::TUNNEL_ALPN;

/// A pooled connection with no stream for this long is let go (at the
/// next sweep): its endpoint may have left the config.
const IDLE: Duration = Duration::from_secs(60);
/// Sweeps happen at most this often, on the way to opening a stream.
const SWEEP_INTERVAL: Duration = Duration::from_secs(15);

/// The tunnel connections of a gateway, by peer endpoint address.
#[derive(Default)]
pub(crate) struct Tunnels {
    pools: Mutex<Pools>,
    ids: AtomicU64,
}

impl std::fmt::Debug for Tunnels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("Tunnels")
            .field("endpoints", &pools.by_address.len())
            .finish()
    }
}

#[derive(Default)]
struct Pools {
    by_address: HashMap<SocketAddr, Vec<Tunnel>>,
    swept: u64,
}

/// One tunnel connection: its request handle and how many streams it carries.
#[derive(Clone)]
struct Tunnel {
    /// Tells it from the other connections of its endpoint.
    id: u64,
    config: Arc<ClientConfig>,
    send: SendRequest<Bytes>,
    /// Set by the connection's task when it ends.
    closed: Arc<AtomicBool>,
    streams: Arc<AtomicUsize>,
    /// `clock` nanoseconds of the last stream opened.
    used: Arc<AtomicU64>,
}

/// A stream's place on its connection, given back when the stream ends.
pub(crate) struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A place taken on a connection for one stream.
struct Taken {
    id: u64,
    send: SendRequest<Bytes>,
    slot: Slot,
}

impl Tunnel {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    fn take(&self) -> Taken {
        self.streams.fetch_add(1, Ordering::Relaxed);
        self.used.store(clock::now_nanos(), Ordering::Relaxed);
        Taken {
            id: self.id,
            send: self.send.clone(),
            slot: Slot(self.streams.clone()),
        }
    }
}

impl Tunnels {
    /// A place on the least busy open connection to `address` made with
    /// `config`, if one has room.
    fn take(&self, address: SocketAddr, config: &Arc<ClientConfig>) -> Option<Taken> {
        let mut pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        pools.sweep();
        let pool = pools.by_address.get_mut(&address)?;
        pool.retain(|t| !t.is_closed());
        pool.iter()
            .filter(|t| Arc::ptr_eq(&t.config, config))
            .min_by_key(|t| t.streams.load(Ordering::Relaxed))
            .filter(|t| t.streams.load(Ordering::Relaxed) < MAX_STREAMS as usize)
            .map(Tunnel::take)
    }

    /// Pools a new connection if the endpoint has fewer than
    /// [`MAX_TUNNELS_PER_ENDPOINT`] with its config, and takes a place on it.
    fn keep(&self, address: SocketAddr, tunnel: Tunnel) -> Taken {
        let taken = tunnel.take();
        let mut pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        let pool = pools.by_address.entry(address).or_default();
        // A connection made with an older config takes no new streams: let it go.
        pool.retain(|t| !t.is_closed() && Arc::ptr_eq(&t.config, &tunnel.config));
        if pool.len() < MAX_TUNNELS_PER_ENDPOINT {
            pool.push(tunnel);
        }
        taken
    }

    /// Drops a connection that failed to open a stream.
    fn forget(&self, address: SocketAddr, id: u64) {
        let mut pools = self.pools.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(pool) = pools.by_address.get_mut(&address) {
            pool.retain(|t| t.id != id);
        }
    }

    fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }
}

impl Pools {
    /// Lets go of idle and closed connections, at most every [`SWEEP_INTERVAL`].
    fn sweep(&mut self) {
        let now = clock::now_nanos();
        if now.saturating_sub(self.swept) < clock::nanos(SWEEP_INTERVAL) {
            return;
        }
        self.swept = now;
        let idle = clock::nanos(IDLE);
        self.by_address.retain(|_, pool| {
            pool.retain(|t| {
                let busy = t.streams.load(Ordering::Relaxed) > 0;
                let recent = now.saturating_sub(t.used.load(Ordering::Relaxed)) < idle;
                !t.is_closed() && (busy || recent)
            });
            !pool.is_empty()
        });
    }
}

/// A client connection carried as a tunnel stream, holding its place on
/// its connection.
pub(crate) type TunnelStream = StreamIo<Slot>;

/// Why a stream did not open.
enum Failed {
    /// The connection could not carry it: try a new one.
    Connection(String),
    /// The answer, or no answer in time: as a connect attempt's error.
    Endpoint(io::Error),
}

/// Opens a client connection to `address` as a tunnel stream, on a pooled
/// connection or a new one; a peer that does not negotiate the tunnel gets
/// a connection of its own with the hop protocol.
pub(super) async fn open(
    spec: &ClusterSpec,
    address: SocketAddr,
    tls: &UpstreamTlsSpec,
    conveyed: Conveyed<'_>,
    dial: &Dial<'_>,
) -> io::Result<Upstream> {
    let sni = tls.server_name.to_str();
    let request =
        || tunnel::open_request(&sni, address.port(), conveyed.caller).map_err(io::Error::other);
    if let Some(taken) = dial.tunnels.take(address, &tls.config) {
        let id = taken.id;
        match stream(taken, request()?, tls, dial).await {
            Err(Failed::Connection(why)) => {
                tracing::debug!(%address, peer = %tls.peer, reason = %why, "pooled tunnel connection failed; opening a new one");
                dial.tunnels.forget(address, id);
            }
            Err(Failed::Endpoint(e)) => return Err(e),
            Ok(upstream) => return Ok(upstream),
        }
    }
    let mut own = handshake(tcp(spec, address).await?, tls, dial).await?;
    if own.get_ref().1.alpn_protocol() != Some(TUNNEL_ALPN) {
        // An ingress without the tunnel: this connection is the client's own.
        convey(&mut own, tls, dial).await?;
        return Ok(Upstream::Tls(Box::new(own)));
    }
    let tunnel = connect(dial.tunnels.next_id(), own, tls, dial.handshake_timeout).await?;
    inc(&dial.stats.tunnels);
    let taken = dial.tunnels.keep(address, tunnel);
    match stream(taken, request()?, tls, dial).await {
        Ok(upstream) => Ok(upstream),
        Err(Failed::Endpoint(e)) => Err(e),
        Err(Failed::Connection(why)) => Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!(
                "{}: a new tunnel connection could not open the stream: {why}",
                tls.peer
            ),
        )),
    }
}

/// The HTTP/2 connection over a tunnel's mTLS, driven by its own task until
/// it ends (both ends done with it, a `GOAWAY`, or unanswered pings).
async fn connect(
    id: u64,
    stream: TlsStream<TcpStream>,
    tls: &UpstreamTlsSpec,
    limit: Duration,
) -> io::Result<Tunnel> {
    let handshake = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(MAX_HEADER_LIST)
        // An ingress never pushes.
        .enable_push(false)
        .handshake::<_, Bytes>(stream);
    let (send, mut connection) = tokio::time::timeout(limit, handshake)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "tunnel handshake timed out"))?
        .map_err(|e| io::Error::other(format!("{}: tunnel handshake failed: {e}", tls.peer)))?;
    let closed = Arc::new(AtomicBool::new(false));
    let peer = tls.peer.clone();
    let ping = connection.ping_pong();
    let ended = closed.clone();
    tokio::spawn(async move {
        tokio::select! {
            result = &mut connection => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "tunnel connection ended");
                }
            }
            reason = tunnel::keep_alive(ping) => tracing::debug!(%peer, reason, "tunnel connection closed"),
        }
        ended.store(true, Ordering::Relaxed);
    });
    Ok(Tunnel {
        id,
        config: tls.config.clone(),
        send,
        closed,
        streams: Arc::new(AtomicUsize::new(0)),
        used: Arc::new(AtomicU64::new(clock::now_nanos())),
    })
}

/// Sends the open request and reads the answer: the ingress answers once
/// its upstream is connected, bounded here by our handshake limit as on
/// `meshfed-caller/2`.
async fn stream(
    taken: Taken,
    request: http::Request<()>,
    tls: &UpstreamTlsSpec,
    dial: &Dial<'_>,
) -> Result<Upstream, Failed> {
    let Taken { send, slot, .. } = taken;
    let opening = async {
        let mut send = send.ready().await?;
        let (response, stream) = send.send_request(request, false)?;
        Ok::<_, h2::Error>((response.await?, stream))
    };
    let (response, send) = match tokio::time::timeout(dial.handshake_timeout, opening).await {
        Ok(Ok(opened)) => opened,
        Ok(Err(e)) => return Err(Failed::Connection(e.to_string())),
        Err(_) => {
            return Err(Failed::Endpoint(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{} did not answer within {:?} whether it could open the service — raise handshake_timeout_ms if its backends are slow to connect",
                    tls.peer, dial.handshake_timeout
                ),
            )));
        }
    };
    let refused = |kind, what: &str, reason: String| {
        Failed::Endpoint(io::Error::new(
            kind,
            format!("{} {what}: {reason}", tls.peer),
        ))
    };
    match tunnel::read_answer(&response) {
        Opened::Open => {}
        Opened::Reconnect => {
            return Err(Failed::Connection(
                "the peer gateway asked for a new tunnel connection".into(),
            ));
        }
        Opened::Refused(reason) => {
            return Err(refused(
                io::ErrorKind::PermissionDenied,
                "refused this caller",
                reason,
            ));
        }
        Opened::Unavailable(reason) => {
            return Err(refused(
                io::ErrorKind::ConnectionRefused,
                "cannot serve it now",
                reason,
            ));
        }
    }
    inc(&dial.stats.tunnel_streams);
    Ok(Upstream::Tunnel(Box::new(StreamIo::new(
        send,
        response.into_body(),
        slot,
    ))))
}
