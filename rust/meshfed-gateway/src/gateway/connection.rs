//! What happens to one accepted connection, per listener mode.

mod connect;
mod tunnel;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::{timeout, timeout_at};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{LazyConfigAcceptor, TlsAcceptor};

use super::balancer;
use super::clock::{self, Instant};
use super::copy::{self, COPY_BUFFER, MAX_COPY_BUFFER};
use super::counting::{Counted, Sinks};
use super::hop::{self, Answer, AssertionError, HeaderError};
use super::limits::RouteState;
use super::snapshot::Snapshot;
use super::stats::{ConnectionGuard, HandshakeFailure, HandshakeSlot, ListenerStats, inc};
use super::upstream::{self, ConnectError, Conveyed, Dial, Lease, Upstream};
use crate::authz::{
    Denial, DenialSink, HandshakeAuthz, HandshakeCheck, HandshakeOutcome, Reason, Stage,
};
use crate::client_hello::{self, HelloError, Parsed};
use crate::config::{
    ClusterSpec, ListenerMode, RouteKey, RouteSpec, SniRouter, TerminateRoute, TerminateTls,
    WorkloadTls,
};
use crate::proxy_protocol;
use crate::spiffe::SpiffeId;
use crate::tls::{self, SvidError, is_missing_svid, spiffe_id_of};

/// Every TLS connection starts with a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Why a connection ended early. Logged at debug level; counted in stats.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("listener is no longer configured")]
    ListenerGone,
    #[error("client closed the connection before a complete ClientHello")]
    ClosedBeforeHello,
    #[error("closed before sending a byte (a TCP health check or a scan; counted in probes)")]
    Probe,
    #[error(
        "client sent plain bytes where a TLS handshake must start — is it speaking TLS to this port?"
    )]
    PlainBytes,
    #[error("bad ClientHello: {0}")]
    Hello(#[from] HelloError),
    #[error(
        "TLS handshake not finished within {0:?} — raise handshake_timeout_ms if clients are slow"
    )]
    HandshakeTimeout(Duration),
    #[error("TLS handshake with client failed: {0}")]
    ServerHandshake(io::Error),
    #[error(
        "TLS handshake with the workload failed: {0} — does it present an SVID of the gateway's own trust domain?"
    )]
    WorkloadHandshake(io::Error),
    #[error("workload_tls is strict but the workload did not start a TLS handshake")]
    NotTls,
    #[error(transparent)]
    CallerHeader(#[from] HeaderError),
    #[error("CONNECT request refused: {0}")]
    ConnectHead(#[from] connect::HeadError),
    #[error("client sent no SNI")]
    NoSni,
    #[error("no route for SNI {0:?}")]
    NoRoute(String),
    #[error("caller refused by authorization (counted in denied and logged)")]
    Denied,
    #[error("rate limit of route \"{0}\" exceeded")]
    RateLimited(RouteKey),
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
    #[error("the listener has limits.max_connections ({0}) open")]
    OverLimit(u64),
    #[error("tunnel connection failed: {0}")]
    Tunnel(#[from] h2::Error),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
}

/// Counts why no ClientHello came: a probe (no byte at all) is not a failure.
fn count_hello_error(e: &ConnError, stats: &ListenerStats) {
    match e {
        ConnError::Probe => inc(&stats.probes),
        _ => stats.handshake_failed(hello_failure(e)),
    }
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

/// Serves one admitted connection to its end. `guard` counts it open until
/// then; `slot` holds its place among the listener's unfinished handshakes
/// until the mode's handshake is done (each mode drops it there).
pub(crate) async fn serve(
    client: TcpStream,
    peer: SocketAddr,
    listener: Arc<str>,
    snapshot: Arc<Snapshot>,
    live: Arc<ArcSwap<Snapshot>>,
    guard: ConnectionGuard,
    slot: HandshakeSlot,
) {
    let stats = guard.stats().clone();
    // Each mode's future is boxed on its own: a connection's task is as large
    // as its largest state, and the TLS handshake states of terminate and
    // originate are kilobytes a passthrough connection must not carry.
    let result = match snapshot.config.listener(&listener) {
        None => Err(ConnError::ListenerGone),
        Some(spec) => match &spec.mode {
            ListenerMode::Passthrough { routes } => {
                Box::pin(passthrough(client, peer, routes, &snapshot, &stats, slot)).await
            }
            ListenerMode::Terminate { routes, tls } => {
                let ingress = Ingress {
                    name: &listener,
                    snapshot: &snapshot,
                    stats: &stats,
                    live: &live,
                };
                Box::pin(terminate(client, peer, routes, tls, ingress, slot)).await
            }
            ListenerMode::Connect { routes } => {
                Box::pin(connect::serve(
                    client, peer, routes, &snapshot, &stats, slot,
                ))
                .await
            }
            ListenerMode::Originate {
                cluster,
                workload_tls,
            } => {
                Box::pin(originate(
                    client,
                    peer,
                    cluster,
                    workload_tls,
                    &snapshot,
                    &stats,
                    slot,
                ))
                .await
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
    slot: HandshakeSlot,
) -> Result<(u64, u64), ConnError> {
    let limit = snapshot.config.handshake_timeout;
    let read = timeout(limit, read_client_hello(&mut client))
        .await
        .unwrap_or(Err(ConnError::HandshakeTimeout(limit)));
    let (hello, sni) = read.inspect_err(|e| count_hello_error(e, stats))?;
    // The ClientHello is the whole handshake a passthrough listener sees.
    drop(slot);
    let sni = sni
        .ok_or(ConnError::NoSni)
        .inspect_err(|_| inc(&stats.no_route))?;
    let route = routes
        .lookup(&sni)
        .ok_or_else(|| ConnError::NoRoute(sni.clone()))
        .inspect_err(|_| inc(&stats.no_route))?;
    let route_state = admit(snapshot, route, None, None, stats)?;
    let dial = Dial {
        preamble: &[],
        conveyed: None,
        handshake_timeout: limit,
        stats,
        tunnels: &snapshot.tunnels,
    };
    let (spec, upstream, lease) = connect(snapshot, route, peer, &dial).await?;
    // Passthrough routes never reach a cluster that encrypts (checked at compile).
    let Upstream::Plain(mut upstream) = upstream else {
        return Err(ConnError::Io(io::Error::other(
            "passthrough route reached an mTLS endpoint",
        )));
    };
    upstream.write_all(&hello).await?;
    let sinks = sinks(stats, route_state, &lease);
    sinks.up(hello.len() as u64);
    drop(hello);
    // Both ends are plain TCP: splice with buffers that exist only while bytes flow.
    watch_idle(
        || splice(client, upstream, &sinks),
        spec.idle_timeout,
        &sinks,
        stats,
    )
    .await
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
            return Err(if buf.is_empty() {
                ConnError::Probe
            } else {
                ConnError::ClosedBeforeHello
            });
        }
        if let Parsed::Sni(sni) = client_hello::parse(&buf)? {
            return Ok((buf, sni));
        }
    }
}

/// What a terminate connection needs of its listener.
#[derive(Clone, Copy)]
struct Ingress<'a> {
    name: &'a Arc<str>,
    snapshot: &'a Snapshot,
    stats: &'a Arc<ListenerStats>,
    /// The gateway's current snapshot, which a tunnel's streams read.
    live: &'a Arc<ArcSwap<Snapshot>>,
}

impl Ingress<'_> {
    /// Counts and logs a denial found after the handshake; the connection
    /// is closed when the caller returns the error (after the count).
    fn deny(&self, sni: Option<&str>, denial: &Denial<'_>) -> ConnError {
        self.stats.report(self.name, sni, denial);
        ConnError::Denied
    }
}

/// Counts every denial, and logs it: at info the first time a (caller, SNI)
/// pair is refused, at debug for repeats (see `DenialLog`).
impl DenialSink for ListenerStats {
    fn report(&self, listener: &str, sni: Option<&str>, denial: &Denial<'_>) {
        let caller = denial.caller.as_str();
        let notable = self.record_denial(denial.trust_domain().as_str(), caller, sni);
        let sni = sni.unwrap_or("-");
        let via = denial.via.map_or("-", SpiffeId::as_str);
        let stage = denial.stage.as_str();
        let reason = &denial.reason;
        if notable {
            tracing::info!(%listener, %caller, %sni, %via, %stage, outcome = %reason, "caller denied");
        } else {
            tracing::debug!(%listener, %caller, %sni, %via, %stage, outcome = %reason, "caller denied (again)");
        }
    }
}

/// Finishes mTLS, authorizes the caller on the route of its SNI (in the
/// handshake when it can, so a refused caller gets `access_denied`),
/// applies rate limits, and forwards plain (or re-encrypted) bytes to the
/// route's cluster, behind a PROXY v2 header when the route asks.
///
/// The caller is the TLS peer's SVID, unless the peer negotiated the hop
/// protocol: then it must be a trusted gateway, and the caller is whom its
/// header vouches for (see `hop`).
async fn terminate(
    client: TcpStream,
    peer: SocketAddr,
    routes: &SniRouter<TerminateRoute>,
    tls: &TerminateTls,
    ingress: Ingress<'_>,
    slot: HandshakeSlot,
) -> Result<(u64, u64), ConnError> {
    let Ingress {
        snapshot, stats, ..
    } = ingress;
    let limit = snapshot.config.handshake_timeout;
    // One budget for the ClientHello, the handshake and the caller header.
    let deadline = clock::now() + limit;
    let local = client.local_addr()?;
    let (mut tls_stream, outcome) =
        match timeout_at(deadline, accept(client, routes, tls, ingress)).await {
            Ok(accepted) => accepted?,
            Err(_) => {
                stats.handshake_failed(HandshakeFailure::Timeout);
                return Err(ConnError::HandshakeTimeout(limit));
            }
        };
    let HandshakeOutcome { sni, verified, .. } = outcome;
    let (_, conn) = tls_stream.get_ref();
    let protocol = conn.alpn_protocol();
    let tunnel = protocol == Some(tls::TUNNEL_ALPN);
    let answers = protocol == Some(tls::OPEN_ALPN);
    let hop = tunnel || answers || protocol == Some(tls::HOP_ALPN);
    // The verifier hands back the ID it parsed; a resumed session has none.
    let peer_id = match verified {
        Some(id) => id,
        None => conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .ok_or(SvidError::NoUriSan)
            .and_then(spiffe_id_of)
            .inspect_err(|_| stats.handshake_failed(HandshakeFailure::NoSvid))?,
    };
    let sni = sni.as_deref();
    if tunnel {
        trusted(&peer_id, tls, ingress, sni)?;
        drop(slot);
        let served = tunnel::Served {
            listener: ingress.name.clone(),
            live: ingress.live.clone(),
            accepted_with: tls.hop.clone(),
            gateway: peer_id,
            peer,
            local,
            stats: stats.clone(),
        };
        return tunnel::serve(tls_stream, served).await;
    }
    let (caller, via) = if hop {
        vouched_caller(&mut tls_stream, peer_id, tls, deadline, ingress, sni).await?
    } else {
        (peer_id, None)
    };
    // Authenticated: the caller is known, and every wait so far was bounded
    // by `deadline`, so an idle client held its slot at most
    // handshake_timeout_ms.
    drop(slot);
    let caller = Caller {
        id: &caller,
        via: via.as_ref(),
        hop,
    };
    let opened = match open_route(sni, routes, caller, (peer, local), ingress).await {
        Ok(opened) => opened,
        Err(e) => {
            if answers {
                // Best effort, and bounded: the egress moves on either way.
                let refusal = refusal(&e).encode();
                let _ = timeout(limit, tls_stream.write_all(&refusal)).await;
                let _ = timeout(limit, tls_stream.shutdown()).await;
            }
            return Err(e);
        }
    };
    if answers {
        tls_stream.write_all(&Answer::Open.encode()).await?;
        tls_stream.flush().await?;
    }
    opened.carry(tls_stream, stats).await
}

/// Who calls on a terminate listener: the caller, the gateway vouching for
/// it (`None`: the caller is the TLS peer), and whether it came over a hop.
#[derive(Clone, Copy)]
struct Caller<'a> {
    id: &'a SpiffeId,
    via: Option<&'a SpiffeId>,
    hop: bool,
}

/// A route opened for a caller: the upstream and what accounts for it.
struct RouteOpened {
    /// The cluster's idle timeout.
    idle: Option<Duration>,
    upstream: Upstream,
    lease: Lease,
    route: Option<Arc<RouteState>>,
}

impl RouteOpened {
    /// Carries `client`'s bytes to and from the upstream, counted, until
    /// either side closes or the cluster's idle timeout.
    async fn carry<A>(self, client: A, stats: &Arc<ListenerStats>) -> Result<(u64, u64), ConnError>
    where
        A: AsyncRead + AsyncWrite + Unpin,
    {
        let sinks = sinks(stats, self.route, &self.lease);
        let client = Counted::new(client, sinks.clone());
        proxy_to(client, self.upstream, self.idle, &sinks, stats).await
    }
}

/// Opens the route for `sni` to `caller`: looks it up, authorizes the
/// caller (decided in the handshake already, unless the session was resumed
/// or the caller came over a hop: the same rules, once more), applies its
/// rate limits and connects one of its cluster's endpoints, behind a PROXY
/// v2 header when the route asks. `addresses` are the client's and the
/// listener's. Counts its own refusals.
async fn open_route(
    sni: Option<&str>,
    routes: &SniRouter<TerminateRoute>,
    caller: Caller<'_>,
    addresses: (SocketAddr, SocketAddr),
    ingress: Ingress<'_>,
) -> Result<RouteOpened, ConnError> {
    let Ingress {
        snapshot, stats, ..
    } = ingress;
    let (peer, local) = addresses;
    let sni = sni
        .ok_or(ConnError::NoSni)
        .inspect_err(|_| inc(&stats.no_route))?;
    let route = routes
        .lookup(sni)
        .ok_or_else(|| ConnError::NoRoute(sni.to_owned()))
        .inspect_err(|_| inc(&stats.no_route))?;
    let verdict = route.rules.evaluate(caller.id);
    if !verdict.allowed() {
        let stage = if caller.hop {
            Stage::CallerHeader
        } else {
            Stage::AfterHandshake
        };
        let denial = Denial {
            caller: caller.id,
            via: caller.via,
            reason: Reason::Verdict(verdict),
            stage,
        };
        return Err(ingress.deny(Some(sni), &denial));
    }
    stats.record_peer(caller.id.as_str());
    let route_state = admit(
        snapshot,
        &route.route,
        route.source_rate_limit.as_ref(),
        Some(caller.id.as_str()),
        stats,
    )?;
    let header = if route.proxy_protocol {
        proxy_protocol::encode_v2(peer, local, Some(sni), Some(caller.id.as_str()))?
    } else {
        Vec::new()
    };
    let dial = Dial {
        preamble: &header,
        conveyed: Some(Conveyed {
            source: peer,
            destination: local,
            caller: Some(caller.id),
        }),
        handshake_timeout: snapshot.config.handshake_timeout,
        stats,
        tunnels: &snapshot.tunnels,
    };
    let (spec, upstream, lease) = connect(snapshot, &route.route, peer, &dial).await?;
    Ok(RouteOpened {
        idle: spec.idle_timeout,
        upstream,
        lease,
        route: route_state,
    })
}

/// Refuses a gateway that is not one of the listener's `trusted_gateways`
/// (checked in the handshake too, but a resumed session skipped that).
fn trusted(
    gateway: &SpiffeId,
    tls: &TerminateTls,
    ingress: Ingress<'_>,
    sni: Option<&str>,
) -> Result<(), ConnError> {
    if tls.trusted_gateways.contains(gateway) {
        return Ok(());
    }
    let denial = Denial {
        caller: gateway,
        via: None,
        reason: Reason::UntrustedGateway,
        stage: Stage::AfterHandshake,
    };
    Err(ingress.deny(sni, &denial))
}

/// The caller a peer gateway vouches for over the hop protocol, and the
/// gateway: `(gateway, None)` when it calls for itself. The gateway must be
/// trusted (checked in the handshake too, but a resumed session skipped
/// that), its header must arrive by `deadline`, and the caller must be of
/// its own trust domain. Counts its own refusals.
async fn vouched_caller(
    tls_stream: &mut TlsStream<TcpStream>,
    gateway: SpiffeId,
    tls: &TerminateTls,
    deadline: Instant,
    ingress: Ingress<'_>,
    sni: Option<&str>,
) -> Result<(SpiffeId, Option<SpiffeId>), ConnError> {
    let stats = ingress.stats;
    trusted(&gateway, tls, ingress, sni)?;
    let header = match timeout_at(deadline, hop::read_header(tls_stream)).await {
        Ok(Ok(header)) => header,
        Ok(Err(e)) => {
            stats.handshake_failed(e.failure());
            return Err(e.into());
        }
        Err(_) => {
            stats.handshake_failed(HandshakeFailure::Timeout);
            let limit = ingress.snapshot.config.handshake_timeout;
            return Err(ConnError::HandshakeTimeout(limit));
        }
    };
    match hop::asserted_caller(&header, &gateway) {
        Ok(None) => Ok((gateway, None)),
        Ok(Some(caller)) => Ok((caller, Some(gateway))),
        Err(refused) => Err(deny_assertion(&refused, &gateway, ingress, sni)),
    }
}

/// Refuses a caller a gateway may not vouch for; counted and logged.
fn deny_assertion(
    refused: &AssertionError,
    gateway: &SpiffeId,
    ingress: Ingress<'_>,
    sni: Option<&str>,
) -> ConnError {
    let (caller, via, reason) = match refused {
        AssertionError::Foreign(asserted) => (asserted, Some(gateway), Reason::ForeignTrustDomain),
        AssertionError::Unusable(why) => (gateway, None, Reason::BadAssertion(why)),
    };
    let denial = Denial {
        caller,
        via,
        reason,
        stage: Stage::CallerHeader,
    };
    ingress.deny(sni, &denial)
}

/// Reads the ClientHello, picks the server config by ALPN (the hop protocol
/// or none) and finishes the handshake under the connection's
/// [`HandshakeAuthz`]. Counts its own failures.
async fn accept(
    client: TcpStream,
    routes: &SniRouter<TerminateRoute>,
    tls: &TerminateTls,
    ingress: Ingress<'_>,
) -> Result<(TlsStream<TcpStream>, HandshakeOutcome), ConnError> {
    let Ingress { name, stats, .. } = ingress;
    // What arrives first tells a TLS client from a probe (no byte: an importing
    // peer's TCP health check, a load balancer's) and from plain bytes; only
    // the last is a handshake failure, and neither is a TLS one.
    let mut first = [0u8; 1];
    match client.peek(&mut first).await {
        Ok(0) => {
            inc(&stats.probes);
            return Err(ConnError::Probe);
        }
        Ok(_) if first[0] != TLS_HANDSHAKE_RECORD => {
            stats.handshake_failed(HandshakeFailure::NotTls);
            return Err(ConnError::PlainBytes);
        }
        Ok(_) => {}
        Err(e) => {
            stats.handshake_failed(HandshakeFailure::Closed);
            return Err(ConnError::Io(e));
        }
    }
    let start = LazyConfigAcceptor::new(Acceptor::default(), client)
        .await
        .inspect_err(|e| {
            // A client gone inside its ClientHello closed; a bad one is a TLS failure.
            let reason = if e.kind() == io::ErrorKind::UnexpectedEof {
                HandshakeFailure::Closed
            } else {
                HandshakeFailure::Tls
            };
            stats.handshake_failed(reason);
        })
        .map_err(ConnError::ServerHandshake)?;
    let hello = start.client_hello();
    let sni = hello.server_name().map(str::to_owned);
    let hop = hello.alpn().is_some_and(|mut offered| {
        offered.any(|protocol| {
            protocol == tls::TUNNEL_ALPN || protocol == tls::OPEN_ALPN || protocol == tls::HOP_ALPN
        })
    });
    let route = sni.as_deref().and_then(|sni| routes.lookup(sni));
    // Nothing about the health of the backends is said before the caller is
    // authenticated: a gateway learns it from the open answer of
    // `meshfed-caller/2`, after its SVID was verified (see `hop`); an
    // anonymous prober learns nothing.
    // A client offering the hop protocol gets exactly it (and must be a
    // trusted gateway); any other client gets no ALPN at all, so clients
    // offering h2 or http/1.1 handshake as they always did.
    let (config, check) = if hop {
        let check = HandshakeCheck::TrustedGateway(tls.trusted_gateways.clone());
        (&tls.hop, check)
    } else {
        let check = route.map_or(HandshakeCheck::Deferred, |route| {
            HandshakeCheck::Rules(route.rules.clone())
        });
        (&tls.plain, check)
    };
    let authz = HandshakeAuthz::new(check, stats.clone(), name.clone(), sni);
    let handshake = start.into_stream(config.clone()).into_fallible();
    let (result, outcome) = authz.run(handshake).await;
    match result {
        Ok(stream) => Ok((stream, outcome)),
        // A refusal by the verifier is counted and logged there already,
        // before the alert went out.
        Err(_) if outcome.denied => Err(ConnError::Denied),
        Err((e, _io)) => {
            // Counted before `_io` (the socket) is dropped: whoever sees
            // the close also sees the count.
            stats.handshake_failed(HandshakeFailure::Tls);
            Err(ConnError::ServerHandshake(e))
        }
    }
}

/// A workload's connection to an originate listener.
enum Workload {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// Accepts a workload per `workload_tls`; returns its connection and its
/// verified SPIFFE ID (`None` for a plain client: the gateway is the caller).
/// Counts its own failures.
async fn accept_workload(
    client: TcpStream,
    mode: &WorkloadTls,
    limit: Duration,
    stats: &ListenerStats,
) -> Result<(Workload, Option<SpiffeId>), ConnError> {
    let (config, strict) = match mode {
        WorkloadTls::Plain => return Ok((Workload::Plain(client), None)),
        WorkloadTls::Permissive(config) => (config, false),
        WorkloadTls::Strict(config) => (config, true),
    };
    let deadline = clock::now() + limit;
    let mut first = [0u8; 1];
    let fail = |reason: HandshakeFailure, e: ConnError| {
        stats.handshake_failed(reason);
        Err(e)
    };
    match timeout_at(deadline, client.peek(&mut first)).await {
        Ok(Ok(0)) => {
            inc(&stats.probes);
            return Err(ConnError::Probe);
        }
        Ok(Ok(_)) if first[0] == TLS_HANDSHAKE_RECORD => {}
        Ok(Ok(_)) if !strict => return Ok((Workload::Plain(client), None)),
        Ok(Ok(_)) => return fail(HandshakeFailure::NotTls, ConnError::NotTls),
        Ok(Err(e)) => return fail(HandshakeFailure::Closed, ConnError::Io(e)),
        // A silent client may speak a protocol where the server talks
        // first: permissive serves it as plain.
        Err(_) if !strict => return Ok((Workload::Plain(client), None)),
        Err(_) => {
            return fail(
                HandshakeFailure::Timeout,
                ConnError::HandshakeTimeout(limit),
            );
        }
    }
    let handshake = TlsAcceptor::from(config.clone())
        .accept(client)
        .into_fallible();
    let stream = match timeout_at(deadline, handshake).await {
        Ok(Ok(stream)) => stream,
        Ok(Err((e, _io))) => {
            // Counted before `_io` (the socket) is dropped.
            let reason = if is_missing_svid(&e) {
                HandshakeFailure::NoSvid
            } else {
                HandshakeFailure::Tls
            };
            return fail(reason, ConnError::WorkloadHandshake(e));
        }
        Err(_) => {
            return fail(
                HandshakeFailure::Timeout,
                ConnError::HandshakeTimeout(limit),
            );
        }
    };
    let caller = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .ok_or(SvidError::NoUriSan)
        .and_then(spiffe_id_of)
        .inspect_err(|_| stats.handshake_failed(HandshakeFailure::NoSvid))?;
    Ok((Workload::Tls(Box::new(stream)), Some(caller)))
}

/// Accepts a local workload, connects to `cluster` (mTLS to peer gateways,
/// telling those that speak the hop protocol who is calling; plain to local
/// endpoints) and forwards the workload's bytes.
async fn originate(
    client: TcpStream,
    source: SocketAddr,
    cluster: &str,
    workload_tls: &WorkloadTls,
    snapshot: &Snapshot,
    stats: &Arc<ListenerStats>,
    slot: HandshakeSlot,
) -> Result<(u64, u64), ConnError> {
    let (spec, state) = snapshot
        .cluster(cluster)
        .ok_or_else(|| ConnError::UnknownCluster(cluster.to_owned()))
        .inspect_err(|_| inc(&stats.upstream_connect_failures))?;
    let local = client.local_addr()?;
    let limit = snapshot.config.handshake_timeout;
    let (workload, caller) = accept_workload(client, workload_tls, limit, stats).await?;
    drop(slot);
    let dial = Dial {
        preamble: &[],
        conveyed: Some(Conveyed {
            source,
            destination: local,
            caller: caller.as_ref(),
        }),
        handshake_timeout: limit,
        stats,
        tunnels: &snapshot.tunnels,
    };
    let (upstream, lease) = upstream::connect(spec, state, source.ip(), &dial)
        .await
        .map_err(ConnError::from)
        .inspect_err(|e| count_connect_error(e, stats))?;
    if let Some(tls) = spec.endpoints.get(lease.index).and_then(|e| e.tls.as_ref()) {
        stats.record_peer(tls.peer.as_str());
    }
    let sinks = sinks(stats, None, &lease);
    match workload {
        Workload::Plain(client) => {
            let client = Counted::new(client, sinks.clone());
            proxy_to(client, upstream, spec.idle_timeout, &sinks, stats).await
        }
        Workload::Tls(client) => {
            let client = Counted::new(*client, sinks.clone());
            proxy_to(client, upstream, spec.idle_timeout, &sinks, stats).await
        }
    }
}

/// What an ingress on `meshfed-caller/2` tells the egress when it cannot
/// open the service: unavailable here (the egress tries its next endpoint)
/// or refused for this caller (final). Fixed words: a peer learns why, not
/// this zone's backend addresses.
fn refusal(e: &ConnError) -> Answer<'static> {
    match e {
        ConnError::Denied => Answer::Refused("caller denied by the service's authorization rules"),
        ConnError::RateLimited(_) => Answer::Refused("rate limit of the service exceeded"),
        ConnError::NoSni | ConnError::NoRoute(_) => {
            Answer::Unavailable("this gateway has no route for the service")
        }
        ConnError::UnknownCluster(_) => Answer::Unavailable("the service is not served here"),
        ConnError::Connect(ConnectError::CircuitOpen { .. }) => {
            Answer::Unavailable("the service's circuit breaker is open")
        }
        ConnError::Connect(_) => Answer::Unavailable("no endpoint of the service is reachable"),
        ConnError::OverLimit(_) => Answer::Unavailable("the gateway is at its connection limit"),
        _ => Answer::Unavailable("the gateway could not open the service"),
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
    dial: &Dial<'_>,
) -> Result<(&'s ClusterSpec, Upstream, Lease), ConnError> {
    let name = route.target.pick(balancer::random());
    let result = match snapshot.cluster(name) {
        None => Err(ConnError::UnknownCluster(name.to_owned())),
        Some((spec, state)) => upstream::connect(spec, state, source.ip(), dial)
            .await
            .map(|(stream, lease)| (spec, stream, lease))
            .map_err(ConnError::from),
    };
    result.inspect_err(|e| count_connect_error(e, dial.stats))
}

fn count_connect_error(e: &ConnError, stats: &ListenerStats) {
    match e {
        ConnError::Connect(ConnectError::CircuitOpen { .. }) => inc(&stats.circuit_open),
        // The peer gateway's authorization refused the caller.
        ConnError::Connect(ConnectError::Refused { .. }) => inc(&stats.denied),
        _ => inc(&stats.upstream_connect_failures),
    }
}

fn sinks(stats: &Arc<ListenerStats>, route: Option<Arc<RouteState>>, lease: &Lease) -> Sinks {
    Sinks {
        listener: stats.clone(),
        route,
        cluster: lease.shared.clone(),
        activity: Arc::new(AtomicU64::new(clock::now_nanos())),
    }
}

/// [`proxy`] to whichever kind of upstream connection was established.
async fn proxy_to<A>(
    client: A,
    upstream: Upstream,
    idle: Option<Duration>,
    sinks: &Sinks,
    stats: &ListenerStats,
) -> Result<(u64, u64), ConnError>
where
    A: AsyncRead + AsyncWrite + Unpin,
{
    match upstream {
        Upstream::Plain(stream) => proxy(client, stream, idle, sinks, stats).await,
        Upstream::Tls(stream) => proxy(client, stream, idle, sinks, stats).await,
        Upstream::Tunnel(stream) => proxy(client, stream, idle, sinks, stats).await,
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
    let ends = (&mut client, &mut upstream);
    let copy = move || {
        let (client, upstream) = ends;
        copy::copy_bidirectional(client, upstream)
    };
    watch_idle(copy, idle, sinks, stats).await
}

/// Runs `copy` to its end, unless no byte moves either way for `idle`.
///
/// Takes a function that makes the copy, not the copy itself: a future
/// passed by value and then pinned occupies this frame twice (the compiler
/// does not reuse a moved-from slot), and the frame lives as long as the
/// connection.
async fn watch_idle<F>(
    copy: impl FnOnce() -> F,
    idle: Option<Duration>,
    sinks: &Sinks,
    stats: &ListenerStats,
) -> Result<(u64, u64), ConnError>
where
    F: Future<Output = io::Result<(u64, u64)>>,
{
    let Some(idle) = idle else {
        return Ok(copy().await?);
    };
    let copying = std::pin::pin!(copy());
    // Count inside the idle branch's future: select! drops the copy (and with
    // it the sockets it owns) before a branch body runs, and the count must be
    // visible by the time the client sees the close.
    let idle_out = std::pin::pin!(async {
        idle_watch(&sinks.activity, idle).await;
        inc(&stats.idle_timeouts);
    });
    tokio::select! {
        result = copying => Ok(result?),
        () = idle_out => Err(ConnError::Idle(idle)),
    }
}

/// Copies both ways between two TCP streams, counting into `sinks`.
///
/// Unlike a copy with fixed buffers, a direction holds a buffer only while
/// bytes are flowing: it allocates one when the socket turns readable and
/// gives it back when a read would block, so an idle connection costs no
/// buffer at all. While a transfer keeps filling its buffer, the buffer
/// doubles (up to [`MAX_COPY_BUFFER`]), so bulk data takes fewer syscalls.
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
        if buf.capacity() == 0 {
            // Uninitialised capacity: `try_read_buf` fills it without zeroing first.
            buf = Vec::with_capacity(size);
        }
        buf.clear();
        match read_drained(&reader, &mut buf) {
            Ok((0, _)) => {
                writer.shutdown().await?;
                return Ok(total);
            }
            Ok((n, drained)) => {
                writer.write_all(&buf).await?;
                count(n as u64);
                total += n as u64;
                if drained {
                    // The peer is quiet for now: hand the buffer back until it speaks.
                    buf = Vec::new();
                } else if size < MAX_COPY_BUFFER {
                    size *= 2;
                    buf = Vec::new();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => buf = Vec::new(),
            Err(e) => return Err(e),
        }
    }
}

/// Reads what the socket holds into `buf`'s spare capacity; returns the
/// count and whether the socket is now drained.
///
/// A read that returns less than asked leaves nothing in the receive queue
/// (HAProxy relies on the same fact), so the socket's readiness is cleared
/// here rather than by a second `recv` that would only say `EAGAIN`: one
/// syscall less per message and direction. Tokio clears readiness only if
/// no new readiness event arrived since this one, so a byte landing right
/// after the read still wakes the next `readable()`, and end of stream
/// stays visible (closed readiness is never cleared).
fn read_drained(reader: &OwnedReadHalf, buf: &mut Vec<u8>) -> io::Result<(usize, bool)> {
    let mut read = 0;
    let result = reader.as_ref().try_io(Interest::READABLE, || {
        read = reader.try_read_buf(buf)?;
        if read > 0 && buf.len() < buf.capacity() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(read)
    });
    match result {
        Ok(n) => Ok((n, false)),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && read > 0 => Ok((read, true)),
        Err(e) => Err(e),
    }
}

/// Returns once `activity` (in `clock` nanoseconds) is `idle` old.
///
/// Sleeps to the deadline of the last activity seen, then looks again:
/// bytes moving push the deadline on without touching a timer per byte.
async fn idle_watch(activity: &AtomicU64, idle: Duration) {
    let idle = clock::nanos(idle);
    loop {
        let deadline = activity.load(Ordering::Relaxed).saturating_add(idle);
        if clock::now_nanos() >= deadline {
            return;
        }
        tokio::time::sleep_until(clock::from_nanos(deadline)).await;
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::duplex;

    use super::*;

    /// Lets every task that can run, run, without moving the paused clock
    /// (`yield_now` never lets the runtime auto-advance it).
    async fn settle() {
        for _ in 0..16 {
            tokio::task::yield_now().await;
        }
    }

    /// On the data plane's (paused) clock: a proxied connection is closed
    /// when no byte has moved for exactly its idle timeout, not a
    /// millisecond before, and each byte pushes the deadline on.
    #[tokio::test(start_paused = true)]
    async fn idle_connection_closes_at_its_deadline_and_not_before() {
        let idle = Duration::from_secs(30);
        let stats = ListenerStats::new();
        let sinks = Sinks {
            listener: stats.clone(),
            route: None,
            cluster: Arc::default(),
            activity: Arc::new(AtomicU64::new(clock::now_nanos())),
        };
        let (mut client, client_end) = duplex(1024);
        let (upstream_end, mut server) = duplex(1024);
        let task = tokio::spawn({
            let stats = stats.clone();
            async move {
                let client_end = Counted::new(client_end, sinks.clone());
                proxy(client_end, upstream_end, Some(idle), &sinks, &stats).await
            }
        });
        let open = |task: &tokio::task::JoinHandle<_>| {
            !task.is_finished() && stats.idle_timeouts.load(Ordering::Relaxed) == 0
        };

        settle().await;
        tokio::time::advance(idle - Duration::from_millis(1)).await;
        settle().await;
        assert!(open(&task), "closed before its idle deadline");

        // A byte just before the deadline: the connection lives on.
        client.write_all(b"x").await.ok();
        let mut byte = [0u8; 1];
        server.read_exact(&mut byte).await.ok();
        assert_eq!(&byte, b"x");
        tokio::time::advance(Duration::from_millis(1)).await;
        settle().await;
        assert!(open(&task), "closed although a byte moved");
        tokio::time::advance(idle - Duration::from_millis(2)).await;
        settle().await;
        assert!(open(&task), "closed before the pushed-on deadline");

        tokio::time::advance(Duration::from_millis(1)).await;
        settle().await;
        assert!(task.is_finished(), "still open at its idle deadline");
        assert_eq!(stats.idle_timeouts.load(Ordering::Relaxed), 1);
        assert!(matches!(task.await, Ok(Err(ConnError::Idle(d))) if d == idle));
        // The client sees the close.
        assert_eq!(client.read(&mut byte).await.ok(), Some(0));
    }
}
