//! What happens to one accepted connection, per listener mode.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt, copy_bidirectional};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::counting::Counted;
use super::stats::{ConnectionGuard, ListenerStats, inc};
use super::upstream::{self, ClusterState, ConnectError};
use crate::client_hello::{self, HelloError, Parsed};
use crate::config::{ClusterSpec, CompiledConfig, ListenerMode, SniRouter, TerminateRoute};
use crate::spiffe::SpiffeId;
use crate::tls::{SvidError, spiffe_id_of};

/// One generation of configuration plus the load-balancing state of its
/// clusters. A connection loads it once and keeps it for its whole life.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) config: Arc<CompiledConfig>,
    pub(crate) clusters: HashMap<String, Arc<ClusterState>>,
}

impl Snapshot {
    pub(crate) fn empty() -> Self {
        Self {
            config: Arc::new(CompiledConfig::empty()),
            clusters: HashMap::new(),
        }
    }

    fn cluster(&self, name: &str) -> Option<(&ClusterSpec, &Arc<ClusterState>)> {
        Some((self.config.clusters.get(name)?, self.clusters.get(name)?))
    }
}

/// Why a connection ended early. Logged at debug level; counted in stats.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("listener is no longer configured")]
    ListenerGone,
    #[error("client closed the connection before a complete ClientHello")]
    ClosedBeforeHello,
    #[error("bad ClientHello: {0}")]
    Hello(#[from] HelloError),
    #[error("TLS handshake not finished within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    #[error("TLS handshake with client failed: {0}")]
    ServerHandshake(io::Error),
    #[error(
        "TLS handshake with peer gateway {address} failed: {source} — does it present {peer} signed by its trust bundle?"
    )]
    ClientHandshake {
        address: SocketAddr,
        peer: SpiffeId,
        source: io::Error,
    },
    #[error("client sent no SNI")]
    NoSni,
    #[error("no route for SNI {0:?}")]
    NoRoute(String),
    #[error("caller {caller} is not allowed on SNI {sni:?}")]
    Denied { caller: SpiffeId, sni: String },
    #[error("verified client certificate has no SPIFFE ID: {0}")]
    Svid(#[from] SvidError),
    #[error("no cluster named {0:?} in this config generation")]
    UnknownCluster(String),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Serves one accepted connection to its end.
pub(crate) async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    listener: Arc<str>,
    snapshot: Arc<Snapshot>,
    stats: Arc<ListenerStats>,
) {
    let _guard = ConnectionGuard::open(stats.clone());
    let result = match snapshot.config.listener(&listener) {
        None => Err(ConnError::ListenerGone),
        Some(spec) => match &spec.mode {
            ListenerMode::Passthrough { routes } => {
                passthrough(client, routes, &snapshot, &stats).await
            }
            ListenerMode::Terminate { routes, tls } => {
                terminate(client, routes, tls, &snapshot, &stats).await
            }
            ListenerMode::Originate {
                cluster,
                server_name,
                peer,
                tls,
            } => originate(client, cluster, server_name, peer, tls, &snapshot, &stats).await,
        },
    };
    match result {
        Ok((up, down)) => {
            tracing::debug!(listener = %listener, %peer, up, down, "connection finished");
        }
        Err(e) => tracing::debug!(listener = %listener, %peer, error = %e, "connection closed"),
    }
}

/// Routes on the ClientHello's SNI and forwards the TLS bytes untouched.
async fn passthrough(
    mut client: TcpStream,
    routes: &SniRouter<String>,
    snapshot: &Snapshot,
    stats: &Arc<ListenerStats>,
) -> Result<(u64, u64), ConnError> {
    let limit = snapshot.config.handshake_timeout;
    let read = timeout(limit, read_client_hello(&mut client))
        .await
        .unwrap_or(Err(ConnError::HandshakeTimeout(limit)));
    let (hello, sni) = read.inspect_err(|_| inc(&stats.handshake_failures))?;
    let sni = sni
        .ok_or(ConnError::NoSni)
        .inspect_err(|_| inc(&stats.no_route))?;
    let cluster = routes
        .lookup(&sni)
        .ok_or_else(|| ConnError::NoRoute(sni.clone()))
        .inspect_err(|_| inc(&stats.no_route))?;
    let mut upstream = connect(snapshot, cluster, stats).await?;
    upstream.write_all(&hello).await?;
    stats
        .bytes_client_to_upstream
        .fetch_add(hello.len() as u64, Ordering::Relaxed);
    let mut client = Counted::new(client, stats.clone());
    Ok(copy_bidirectional(&mut client, &mut upstream).await?)
}

/// Reads until the buffered bytes hold a complete ClientHello; returns all
/// bytes read (to be forwarded) and the SNI.
async fn read_client_hello(stream: &mut TcpStream) -> Result<(Vec<u8>, Option<String>), ConnError> {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await?;
        let Some(bytes) = chunk.get(..n).filter(|b| !b.is_empty()) else {
            return Err(ConnError::ClosedBeforeHello);
        };
        buf.extend_from_slice(bytes);
        if let Parsed::Sni(sni) = client_hello::parse(&buf)? {
            return Ok((buf, sni));
        }
    }
}

/// Finishes mTLS, authorizes the caller's SPIFFE ID on the route of its
/// SNI, and forwards plain bytes to the route's cluster.
async fn terminate(
    client: TcpStream,
    routes: &SniRouter<TerminateRoute>,
    tls: &Arc<ServerConfig>,
    snapshot: &Snapshot,
    stats: &Arc<ListenerStats>,
) -> Result<(u64, u64), ConnError> {
    let limit = snapshot.config.handshake_timeout;
    let accept = TlsAcceptor::from(tls.clone()).accept(client);
    let tls_stream = match timeout(limit, accept).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            inc(&stats.handshake_failures);
            return Err(ConnError::ServerHandshake(e));
        }
        Err(_) => {
            inc(&stats.handshake_failures);
            return Err(ConnError::HandshakeTimeout(limit));
        }
    };
    let (_, conn) = tls_stream.get_ref();
    let sni = conn.server_name().map(str::to_owned);
    let caller = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(SvidError::NoUriSan)
        .and_then(spiffe_id_of)
        .inspect_err(|_| inc(&stats.handshake_failures))?;
    stats.record_peer(caller.as_str());
    let sni = sni
        .ok_or(ConnError::NoSni)
        .inspect_err(|_| inc(&stats.no_route))?;
    let route = routes
        .lookup(&sni)
        .ok_or_else(|| ConnError::NoRoute(sni.clone()))
        .inspect_err(|_| inc(&stats.no_route))?;
    if !route.allows(&caller) {
        inc(&stats.denied);
        return Err(ConnError::Denied { caller, sni });
    }
    let mut upstream = connect(snapshot, &route.cluster, stats).await?;
    let mut client = Counted::new(tls_stream, stats.clone());
    Ok(copy_bidirectional(&mut client, &mut upstream).await?)
}

/// Opens mTLS to a peer gateway of `cluster` and forwards the client's
/// plain bytes through it.
async fn originate(
    client: TcpStream,
    cluster: &str,
    server_name: &ServerName<'static>,
    peer: &SpiffeId,
    tls: &Arc<ClientConfig>,
    snapshot: &Snapshot,
    stats: &Arc<ListenerStats>,
) -> Result<(u64, u64), ConnError> {
    let limit = snapshot.config.handshake_timeout;
    let (spec, state) = snapshot
        .cluster(cluster)
        .ok_or_else(|| ConnError::UnknownCluster(cluster.to_owned()))
        .inspect_err(|_| inc(&stats.upstream_connect_failures))?;
    let (tcp, address) = upstream::connect(spec, state)
        .await
        .inspect_err(|_| inc(&stats.upstream_connect_failures))?;
    let connect = TlsConnector::from(tls.clone()).connect(server_name.clone(), tcp);
    let mut upstream = match timeout(limit, connect).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(source)) => {
            inc(&stats.handshake_failures);
            return Err(ConnError::ClientHandshake {
                address,
                peer: peer.clone(),
                source,
            });
        }
        Err(_) => {
            inc(&stats.handshake_failures);
            return Err(ConnError::HandshakeTimeout(limit));
        }
    };
    stats.record_peer(peer.as_str());
    let mut client = Counted::new(client, stats.clone());
    Ok(copy_bidirectional(&mut client, &mut upstream).await?)
}

/// Connects to the named cluster of this snapshot, counting failures.
async fn connect(
    snapshot: &Snapshot,
    cluster: &str,
    stats: &ListenerStats,
) -> Result<TcpStream, ConnError> {
    let result = match snapshot.cluster(cluster) {
        None => Err(ConnError::UnknownCluster(cluster.to_owned())),
        Some((spec, state)) => upstream::connect(spec, state)
            .await
            .map(|(stream, _)| stream)
            .map_err(ConnError::from),
    };
    result.inspect_err(|_| inc(&stats.upstream_connect_failures))
}
