//! What happens to one accepted connection, per listener mode.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::balancer;
use super::counting::{Counted, Sinks};
use super::limits::RouteState;
use super::stats::{ConnectionGuard, HandshakeFailure, ListenerStats, inc};
use super::upstream::{self, ClusterState, ConnectError, Lease, Previous, now_ms};
use crate::client_hello::{self, HelloError, Parsed};
use crate::config::{
    ClusterSpec, CompiledConfig, ListenerMode, RouteSpec, SniRouter, TerminateRoute,
};
use crate::proxy_protocol;
use crate::spiffe::SpiffeId;
use crate::tls::{SvidError, spiffe_id_of};

/// Copy buffer per direction of a proxied connection. Small on purpose:
/// idle connections dominate a gateway's memory, and TCP already buffers.
pub(crate) const COPY_BUFFER: usize = 4 * 1024;
/// Largest buffer one direction of a passthrough splice grows to under bulk load.
const SPLICE_MAX_BUFFER: usize = 64 * 1024;

/// One generation of configuration plus the runtime state of its clusters
/// and routes. A connection loads it once and keeps it for its whole life.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) config: Arc<CompiledConfig>,
    pub(crate) clusters: HashMap<String, Arc<ClusterState>>,
    /// By route key (`"<listener>/<sni pattern>"`).
    pub(crate) routes: HashMap<String, Arc<RouteState>>,
}

impl Snapshot {
    pub(crate) fn empty() -> Self {
        Self {
            config: Arc::new(CompiledConfig::empty()),
            clusters: HashMap::new(),
            routes: HashMap::new(),
        }
    }

    /// The snapshot for `config`, carrying state over from `previous`:
    /// clusters by name, endpoints by address, routes by key.
    pub(crate) fn build(config: CompiledConfig, previous: &Snapshot) -> Self {
        let carried = Previous {
            clusters: &previous.clusters,
        };
        let clusters = config
            .clusters
            .iter()
            .map(|(name, spec)| (name.clone(), Arc::new(ClusterState::build(spec, &carried))))
            .collect();
        let mut routes = HashMap::new();
        for listener in &config.listeners {
            let keys: Vec<&str> = match &listener.mode {
                ListenerMode::Passthrough { routes } => {
                    routes.values().map(|r| r.key.as_str()).collect()
                }
                ListenerMode::Terminate { routes, .. } => {
                    routes.values().map(|r| r.route.key.as_str()).collect()
                }
                ListenerMode::Originate { .. } => Vec::new(),
            };
            for key in keys {
                let state = previous.routes.get(key).cloned().unwrap_or_default();
                routes.insert(key.to_owned(), state);
            }
        }
        Self {
            config: Arc::new(config),
            clusters,
            routes,
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
    #[error(
        "TLS handshake not finished within {0:?} — raise handshake_timeout_ms if clients are slow"
    )]
    HandshakeTimeout(Duration),
    #[error("TLS handshake with client failed: {0}")]
    ServerHandshake(io::Error),
    #[error(
        "TLS handshake with {address} failed: {source} — does it present {peer} signed by its trust bundle?"
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
    #[error("rate limit of route {0:?} exceeded")]
    RateLimited(String),
    #[error("verified client certificate has no SPIFFE ID: {0}")]
    Svid(#[from] SvidError),
    #[error("no cluster named {0:?} in this config generation")]
    UnknownCluster(String),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("cannot write the PROXY header: {0}")]
    ProxyHeader(#[from] proxy_protocol::ProxyHeaderError),
    #[error("no byte either way for {0:?} (the cluster's idle_timeout_ms)")]
    Idle(Duration),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

fn hello_failure(e: &ConnError) -> HandshakeFailure {
    match e {
        ConnError::HandshakeTimeout(_) => HandshakeFailure::Timeout,
        ConnError::ClosedBeforeHello | ConnError::Io(_) => HandshakeFailure::Closed,
        ConnError::Hello(HelloError::NotHandshake(_)) => HandshakeFailure::NotTls,
        ConnError::Hello(HelloError::TooLarge) => HandshakeFailure::TooLarge,
        _ => HandshakeFailure::Malformed,
    }
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
                passthrough(client, peer, routes, &snapshot, &stats).await
            }
            ListenerMode::Terminate { routes, tls } => {
                terminate(client, peer, routes, tls, &snapshot, &stats).await
            }
            ListenerMode::Originate {
                cluster,
                server_name,
                peer: peer_id,
                tls,
            } => {
                let target = OriginateTarget {
                    cluster,
                    server_name,
                    peer: peer_id,
                    tls,
                };
                originate(client, peer, target, &snapshot, &stats).await
            }
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
    peer: SocketAddr,
    routes: &SniRouter<RouteSpec>,
    snapshot: &Snapshot,
    stats: &Arc<ListenerStats>,
) -> Result<(u64, u64), ConnError> {
    let limit = snapshot.config.handshake_timeout;
    let read = timeout(limit, read_client_hello(&mut client))
        .await
        .unwrap_or(Err(ConnError::HandshakeTimeout(limit)));
    let (hello, sni) = read.inspect_err(|e| stats.handshake_failed(hello_failure(e)))?;
    let sni = sni
        .ok_or(ConnError::NoSni)
        .inspect_err(|_| inc(&stats.no_route))?;
    let route = routes
        .lookup(&sni)
        .ok_or_else(|| ConnError::NoRoute(sni.clone()))
        .inspect_err(|_| inc(&stats.no_route))?;
    let route_state = admit(snapshot, route, None, None, stats)?;
    let (spec, mut upstream, lease) = connect(snapshot, route, peer, stats).await?;
    upstream.write_all(&hello).await?;
    let sinks = sinks(stats, route_state, &lease);
    sinks.up(hello.len() as u64);
    drop(hello);
    // Both ends are plain TCP: splice with buffers that exist only while bytes flow.
    let copy = splice(client, upstream, &sinks);
    watch_idle(copy, spec.idle_timeout, &sinks, stats).await
}

/// Reads until the buffered bytes hold a complete ClientHello; returns all
/// bytes read (to be forwarded) and the SNI. The buffer is bounded by
/// [`client_hello::MAX_INPUT_LEN`]: the parser refuses anything longer.
async fn read_client_hello(stream: &mut TcpStream) -> Result<(Vec<u8>, Option<String>), ConnError> {
    // Read straight into the heap buffer: no stack array lives on in the
    // connection's future while it proxies.
    let mut buf = Vec::with_capacity(1024);
    loop {
        buf.reserve(1024);
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(ConnError::ClosedBeforeHello);
        }
        if let Parsed::Sni(sni) = client_hello::parse(&buf)? {
            return Ok((buf, sni));
        }
    }
}

/// Finishes mTLS, authorizes the caller's SPIFFE ID on the route of its
/// SNI, applies rate limits, and forwards plain (or re-encrypted) bytes to
/// the route's cluster, behind a PROXY v2 header when the route asks.
async fn terminate(
    client: TcpStream,
    peer: SocketAddr,
    routes: &SniRouter<TerminateRoute>,
    tls: &Arc<ServerConfig>,
    snapshot: &Snapshot,
    stats: &Arc<ListenerStats>,
) -> Result<(u64, u64), ConnError> {
    let limit = snapshot.config.handshake_timeout;
    let local = client.local_addr()?;
    let accept = TlsAcceptor::from(tls.clone()).accept(client);
    let tls_stream = match timeout(limit, accept).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            stats.handshake_failed(HandshakeFailure::Tls);
            return Err(ConnError::ServerHandshake(e));
        }
        Err(_) => {
            stats.handshake_failed(HandshakeFailure::Timeout);
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
        .inspect_err(|_| stats.handshake_failed(HandshakeFailure::NoSvid))?;
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
    let route_state = admit(
        snapshot,
        &route.route,
        route.source_rate_limit.as_ref(),
        Some(caller.as_str()),
        stats,
    )?;
    let (spec, mut upstream, lease) = connect(snapshot, &route.route, peer, stats).await?;
    if route.proxy_protocol {
        let header = proxy_protocol::encode_v2(peer, local, Some(&sni), Some(caller.as_str()))?;
        upstream.write_all(&header).await?;
    }
    let sinks = sinks(stats, route_state, &lease);
    let client = Counted::new(tls_stream, sinks.clone());
    let idle = spec.idle_timeout;
    match &spec.tls {
        None => proxy(client, upstream, idle, &sinks, stats).await,
        Some(up) => {
            let secured = secure_upstream(
                upstream,
                &up.config,
                &up.server_name,
                &up.peer,
                lease.address,
                limit,
                stats,
            )
            .await?;
            proxy(client, secured, idle, &sinks, stats).await
        }
    }
}

/// The cluster and TLS settings of an originate listener.
struct OriginateTarget<'a> {
    cluster: &'a str,
    server_name: &'a ServerName<'static>,
    peer: &'a SpiffeId,
    tls: &'a Arc<ClientConfig>,
}

/// Opens mTLS to a peer gateway of `cluster` and forwards the client's
/// plain bytes through it.
async fn originate(
    client: TcpStream,
    source: SocketAddr,
    target: OriginateTarget<'_>,
    snapshot: &Snapshot,
    stats: &Arc<ListenerStats>,
) -> Result<(u64, u64), ConnError> {
    let limit = snapshot.config.handshake_timeout;
    let (spec, state) = snapshot
        .cluster(target.cluster)
        .ok_or_else(|| ConnError::UnknownCluster(target.cluster.to_owned()))
        .inspect_err(|_| inc(&stats.upstream_connect_failures))?;
    let (upstream, lease) = upstream::connect(spec, state, source.ip())
        .await
        .map_err(ConnError::from)
        .inspect_err(|e| count_connect_error(e, stats))?;
    let sinks = sinks(stats, None, &lease);
    let secured = secure_upstream(
        upstream,
        target.tls,
        target.server_name,
        target.peer,
        lease.address,
        limit,
        stats,
    )
    .await?;
    stats.record_peer(target.peer.as_str());
    let client = Counted::new(client, sinks.clone());
    proxy(client, secured, spec.idle_timeout, &sinks, stats).await
}

/// Opens mTLS over `upstream` to a peer that must present `peer`'s SVID,
/// within the handshake limit; failures are counted and say what to check.
async fn secure_upstream(
    upstream: TcpStream,
    config: &Arc<ClientConfig>,
    server_name: &ServerName<'static>,
    peer: &SpiffeId,
    address: SocketAddr,
    limit: Duration,
    stats: &ListenerStats,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnError> {
    let connect = TlsConnector::from(config.clone()).connect(server_name.clone(), upstream);
    match timeout(limit, connect).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => {
            stats.handshake_failed(HandshakeFailure::UpstreamTls);
            Err(ConnError::ClientHandshake {
                address,
                peer: peer.clone(),
                source,
            })
        }
        Err(_) => {
            stats.handshake_failed(HandshakeFailure::Timeout);
            Err(ConnError::HandshakeTimeout(limit))
        }
    }
}

/// Counts a route connection and applies its rate limits.
fn admit(
    snapshot: &Snapshot,
    route: &RouteSpec,
    source_limit: Option<&crate::config::RateLimitSpec>,
    caller: Option<&str>,
    stats: &ListenerStats,
) -> Result<Option<Arc<RouteState>>, ConnError> {
    let state = snapshot.routes.get(&route.key).cloned();
    if let Some(state) = &state {
        inc(&state.stats.connections);
    }
    let mut admitted = true;
    if let (Some(limit), Some(state)) = (&route.rate_limit, &state) {
        admitted = state.admit(limit);
    }
    if let (true, Some(limit), Some(state), Some(caller)) = (admitted, source_limit, &state, caller)
    {
        admitted = state.admit_source(limit, caller);
    }
    if !admitted {
        inc(&stats.rate_limited);
        if let Some(state) = &state {
            inc(&state.stats.rate_limited);
        }
        return Err(ConnError::RateLimited(route.key.clone()));
    }
    Ok(state)
}

/// Picks the route's cluster (weighted split or single) and connects to
/// one of its endpoints.
async fn connect<'s>(
    snapshot: &'s Snapshot,
    route: &RouteSpec,
    source: SocketAddr,
    stats: &ListenerStats,
) -> Result<(&'s ClusterSpec, TcpStream, Lease), ConnError> {
    let name = route.target.pick(balancer::random());
    let result = match snapshot.cluster(name) {
        None => Err(ConnError::UnknownCluster(name.to_owned())),
        Some((spec, state)) => upstream::connect(spec, state, source.ip())
            .await
            .map(|(stream, lease)| (spec, stream, lease))
            .map_err(ConnError::from),
    };
    result.inspect_err(|e| count_connect_error(e, stats))
}

fn count_connect_error(e: &ConnError, stats: &ListenerStats) {
    match e {
        ConnError::Connect(ConnectError::CircuitOpen { .. }) => inc(&stats.circuit_open),
        _ => inc(&stats.upstream_connect_failures),
    }
}

fn sinks(stats: &Arc<ListenerStats>, route: Option<Arc<RouteState>>, lease: &Lease) -> Sinks {
    Sinks {
        listener: stats.clone(),
        route,
        cluster: lease.shared.clone(),
        activity: Arc::new(AtomicU64::new(now_ms())),
    }
}

/// Copies both ways with bounded buffers until either side closes, or
/// until no byte has moved for `idle`.
async fn proxy<A, B>(
    mut client: A,
    mut upstream: B,
    idle: Option<Duration>,
    sinks: &Sinks,
    stats: &ListenerStats,
) -> Result<(u64, u64), ConnError>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let copy = tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut upstream,
        COPY_BUFFER,
        COPY_BUFFER,
    );
    watch_idle(copy, idle, sinks, stats).await
}

/// Runs `copy` to its end, unless no byte moves either way for `idle`.
async fn watch_idle(
    copy: impl Future<Output = io::Result<(u64, u64)>>,
    idle: Option<Duration>,
    sinks: &Sinks,
    stats: &ListenerStats,
) -> Result<(u64, u64), ConnError> {
    let Some(idle) = idle else {
        return Ok(copy.await?);
    };
    // Count inside the idle branch's future: select! drops the copy (and with
    // it the sockets it owns) before a branch body runs, and the count must be
    // visible by the time the client sees the close.
    let idle_out = async {
        idle_watch(&sinks.activity, idle).await;
        inc(&stats.idle_timeouts);
    };
    tokio::select! {
        result = copy => Ok(result?),
        () = idle_out => Err(ConnError::Idle(idle)),
    }
}

/// Copies both ways between two TCP streams, counting into `sinks`.
///
/// Unlike a copy with fixed buffers, a direction holds a buffer only while
/// bytes are flowing: it allocates one when the socket turns readable and
/// gives it back when a read would block, so an idle connection costs no
/// buffer at all. While a transfer keeps filling its buffer, the buffer
/// doubles (up to [`SPLICE_MAX_BUFFER`]), so bulk data takes fewer syscalls.
async fn splice(client: TcpStream, upstream: TcpStream, sinks: &Sinks) -> io::Result<(u64, u64)> {
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    tokio::try_join!(
        pump(client_read, upstream_write, |n| sinks.up(n)),
        pump(upstream_read, client_write, |n| sinks.down(n)),
    )
}

/// One direction of [`splice`]: reads until end of stream, then half-closes the writer.
async fn pump(
    reader: OwnedReadHalf,
    mut writer: OwnedWriteHalf,
    count: impl Fn(u64),
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut size = COPY_BUFFER;
    let mut buf: Vec<u8> = Vec::new();
    loop {
        reader.readable().await?;
        if buf.is_empty() {
            buf = vec![0; size];
        }
        match reader.try_read(&mut buf) {
            Ok(0) => {
                writer.shutdown().await?;
                return Ok(total);
            }
            Ok(n) => {
                writer.write_all(buf.get(..n).unwrap_or_default()).await?;
                count(n as u64);
                total += n as u64;
                if n == buf.len() && size < SPLICE_MAX_BUFFER {
                    size *= 2;
                    buf = Vec::new();
                }
            }
            // Nothing more for now: hand the buffer back while the peer is quiet.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => buf = Vec::new(),
            Err(e) => return Err(e),
        }
    }
}

/// Returns once `activity` is older than `idle`.
async fn idle_watch(activity: &AtomicU64, idle: Duration) {
    let idle_ms = u64::try_from(idle.as_millis()).unwrap_or(u64::MAX);
    loop {
        let deadline = activity.load(Ordering::Relaxed).saturating_add(idle_ms);
        let now = now_ms();
        if now >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(deadline - now)).await;
    }
}
