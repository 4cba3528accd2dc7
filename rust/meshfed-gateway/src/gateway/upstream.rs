//! Connecting to a cluster's endpoints: locality-priority failover, the
//! cluster's load-balancing policy, connect retry to another endpoint,
//! passive outlier detection, the circuit breaker, and the per-endpoint
//! state (health, peak EWMA, counters) carried across `apply()`.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::balancer::{self, MAGLEV_TABLE_SIZE};
use super::clock::{self, Instant};
use super::hop;
use super::retired::Retired;
use super::stats::{HandshakeFailure, Histogram, HistogramSnapshot, ListenerStats, inc};
use crate::config::{ClusterSpec, EndpointSpec, Lb, UpstreamTlsSpec};
use crate::spiffe::SpiffeId;
use crate::tls::HOP_ALPN;

/// Decay time constant of the peak EWMA (linkerd2-proxy uses 10 s).
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// Starting latency estimate of an endpoint never connected to.
const EWMA_DEFAULT_US: f64 = 1_000.0;
/// Cap on the exponent of the ejection backoff.
const MAX_EJECTION_DOUBLINGS: u32 = 16;

/// Everything known about one endpoint, carried across `apply()` by
/// endpoint key (cluster name + address + pinned peer identity).
#[derive(Debug)]
pub(crate) struct EndpointState {
    pub(crate) address: SocketAddr,
    /// The SPIFFE ID pinned for mTLS to this endpoint, if any: part of its key.
    peer: Option<SpiffeId>,
    active: AtomicU64,
    consecutive_failures: AtomicU32,
    /// The instant (in `clock` nanoseconds) until which the endpoint is
    /// ejected; 0 when not.
    ejected_until: AtomicU64,
    /// Ejections in a row; doubles the next ejection time.
    ejection_multiplier: AtomicU32,
    /// Verdict of active health checks (true when none run).
    pub(crate) check_healthy: AtomicBool,
    /// Smooth WRR running weight (under the cluster's `wrr` lock).
    wrr_current: AtomicI64,
    /// Peak EWMA of connect latency: (estimate in µs, last update).
    ewma: Mutex<(f64, Instant)>,
    connections: AtomicU64,
    connect_failures: AtomicU64,
    ejections: AtomicU64,
}

impl EndpointState {
    fn new(spec: &EndpointSpec) -> Self {
        Self {
            address: spec.address,
            peer: spec.peer().cloned(),
            active: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejection_multiplier: AtomicU32::new(0),
            check_healthy: AtomicBool::new(true),
            wrr_current: AtomicI64::new(0),
            ewma: Mutex::new((EWMA_DEFAULT_US, clock::now())),
            connections: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
        }
    }

    fn key(&self) -> String {
        endpoint_key(self.address, self.peer.as_ref())
    }

    fn ejected(&self, now: Instant) -> bool {
        clock::to_nanos(now) < self.ejected_until.load(Ordering::Relaxed)
    }

    /// Not ejected by outlier detection and not failed by health checks.
    pub(crate) fn healthy(&self, now: Instant) -> bool {
        !self.ejected(now) && self.check_healthy.load(Ordering::Relaxed)
    }

    fn ewma_us(&self, now: Instant) -> f64 {
        let (value, at) = *self.ewma.lock().unwrap_or_else(PoisonError::into_inner);
        // Decay toward zero while idle, so a once-slow endpoint is retried.
        let idle = now.saturating_duration_since(at).as_secs_f64();
        value * (-idle / EWMA_DECAY.as_secs_f64()).exp()
    }

    /// Peak EWMA: a slower sample replaces the estimate at once, faster
    /// ones pull it down smoothly.
    fn observe(&self, rtt: Duration, now: Instant) {
        let sample = rtt.as_secs_f64() * 1e6;
        let mut ewma = self.ewma.lock().unwrap_or_else(PoisonError::into_inner);
        let (value, at) = *ewma;
        let next = if sample > value {
            sample
        } else {
            let idle = now.saturating_duration_since(at).as_secs_f64();
            let w = (-idle / EWMA_DECAY.as_secs_f64()).exp();
            value * w + sample * (1.0 - w)
        };
        *ewma = (next, now);
    }
}

/// Cluster-wide state carried across `apply()` by cluster name: breaker
/// gauges, the round-robin cursor, counters and histograms.
#[derive(Debug, Default)]
pub(crate) struct ClusterShared {
    cursor: AtomicUsize,
    active: AtomicU64,
    pending: AtomicU64,
    /// Serializes smooth-WRR updates and ejection decisions.
    lock: Mutex<()>,
    connections: AtomicU64,
    connect_failures: AtomicU64,
    circuit_open: AtomicU64,
    ejections: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    connect_latency: Histogram,
    duration: Histogram,
}

/// One priority level of a cluster.
#[derive(Debug)]
struct Level {
    /// Indices into the cluster's endpoints.
    members: Vec<usize>,
    /// Maglev table over `members` (entries index into `members`).
    maglev: Option<Arc<Vec<u16>>>,
}

/// The runtime state of a cluster in one config generation.
#[derive(Debug)]
pub(crate) struct ClusterState {
    pub(crate) shared: Arc<ClusterShared>,
    pub(crate) endpoints: Vec<Arc<EndpointState>>,
    levels: Vec<Level>,
}

/// Carried-over state of every cluster, looked up while building the next
/// one: the previous generation's, else what a removed cluster left.
pub(crate) struct Previous<'a> {
    pub(crate) clusters: &'a HashMap<String, Arc<ClusterState>>,
    pub(crate) retired: &'a mut Retired,
}

/// `ip:port`, with the pinned peer after a space when there is one: an endpoint's key, unique
/// within a cluster (stats, Maglev names).
fn endpoint_key(address: SocketAddr, peer: Option<&SpiffeId>) -> String {
    match peer {
        Some(peer) => format!("{address} {peer}"),
        None => address.to_string(),
    }
}

impl ClusterState {
    /// Builds the state for `spec`, reusing what `previous` knows about the
    /// cluster (by name) and its endpoints (by endpoint key).
    pub(crate) fn build(spec: &ClusterSpec, previous: &mut Previous<'_>) -> Self {
        let old = previous.clusters.get(&spec.name);
        let endpoints: Vec<Arc<EndpointState>> = spec
            .endpoints
            .iter()
            .map(|e| {
                old.and_then(|o| {
                    o.endpoints
                        .iter()
                        .find(|s| s.address == e.address && s.peer.as_ref() == e.peer())
                })
                .cloned()
                .or_else(|| {
                    let key = (spec.name.clone(), endpoint_key(e.address, e.peer()));
                    previous.retired.endpoints.revive(&key)
                })
                .unwrap_or_else(|| Arc::new(EndpointState::new(e)))
            })
            .collect();
        let mut priorities: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, e) in spec.endpoints.iter().enumerate() {
            priorities.entry(e.priority).or_default().push(i);
        }
        let levels = priorities
            .into_values()
            .map(|members| {
                let maglev = (spec.lb == Lb::Maglev).then(|| {
                    let keys: Vec<String> = members
                        .iter()
                        .map(|&i| endpoint_key(spec.endpoints[i].address, spec.endpoints[i].peer()))
                        .collect();
                    // Reuse the old table when the level is unchanged.
                    old.and_then(|o| {
                        o.levels.iter().find(|l| {
                            l.maglev.is_some()
                                && l.members.len() == members.len()
                                && l.members.iter().zip(&keys).all(|(&i, key)| {
                                    o.endpoints.get(i).is_some_and(|e| e.key() == *key)
                                })
                        })
                    })
                    .and_then(|l| l.maglev.clone())
                    .unwrap_or_else(|| {
                        let refs: Vec<&[u8]> = keys.iter().map(|n| n.as_bytes()).collect();
                        Arc::new(balancer::maglev_table(&refs, MAGLEV_TABLE_SIZE))
                    })
                });
                Level { members, maglev }
            })
            .collect();
        let shared = old
            .map(|o| o.shared.clone())
            .or_else(|| previous.retired.clusters.revive(&spec.name))
            .unwrap_or_default();
        Self {
            shared,
            endpoints,
            levels,
        }
    }

    /// Keeps in `retired` what this generation of cluster `name` had and
    /// `next`, its successor (if the name is still configured), dropped.
    pub(crate) fn retire_into(&self, name: &str, next: Option<&Self>, retired: &mut Retired) {
        if next.is_none() {
            retired
                .clusters
                .retire(name.to_owned(), self.shared.clone());
        }
        for endpoint in &self.endpoints {
            let kept = next.is_some_and(|n| n.endpoints.iter().any(|e| Arc::ptr_eq(e, endpoint)));
            if !kept {
                retired
                    .endpoints
                    .retire((name.to_owned(), endpoint.key()), endpoint.clone());
            }
        }
    }

    /// Picks an endpoint for a connection from `source`, skipping `tried`.
    /// Returns an index into the cluster's endpoints.
    pub(crate) fn pick(
        &self,
        spec: &ClusterSpec,
        source: IpAddr,
        tried: &[usize],
        now: Instant,
    ) -> Option<usize> {
        let open = |i: &usize| !tried.contains(i);
        let healthy = |i: &usize| open(i) && self.endpoints.get(*i).is_some_and(|e| e.healthy(now));
        let counts: Vec<(usize, usize)> = self
            .levels
            .iter()
            .map(|l| {
                let total = l.members.iter().filter(|i| open(i)).count();
                (l.members.iter().filter(|i| healthy(i)).count(), total)
            })
            .collect();
        let loads = balancer::priority_loads(&counts);
        let level_index = balancer::pick_level(&loads, balancer::random());
        // The chosen level may have nothing left to try: fall back in order.
        let order = std::iter::once(level_index).chain(0..self.levels.len());
        for li in order {
            let Some(level) = self.levels.get(li) else {
                continue;
            };
            let mut candidates: Vec<usize> = level
                .members
                .iter()
                .copied()
                .filter(|i| healthy(i))
                .collect();
            if candidates.is_empty() {
                // Panic mode within a level: nothing healthy, try the rest.
                if counts.iter().any(|(h, _)| *h > 0) {
                    continue;
                }
                candidates = level.members.iter().copied().filter(|i| open(i)).collect();
            }
            if candidates.is_empty() {
                continue;
            }
            if let Some(i) = self.choose(spec, level, &candidates, source, now) {
                return Some(i);
            }
        }
        None
    }

    /// Applies the cluster's policy to the candidates of one level.
    fn choose(
        &self,
        spec: &ClusterSpec,
        level: &Level,
        candidates: &[usize],
        source: IpAddr,
        now: Instant,
    ) -> Option<usize> {
        match spec.lb {
            Lb::RoundRobin => {
                let n = self.shared.cursor.fetch_add(1, Ordering::Relaxed);
                candidates.get(n % candidates.len()).copied()
            }
            Lb::WeightedRoundRobin => {
                let weights: Vec<u32> = candidates
                    .iter()
                    .map(|&i| spec.endpoints.get(i).map_or(1, |e| e.weight))
                    .collect();
                let _lock = self
                    .shared
                    .lock
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                let mut current: Vec<i64> = candidates
                    .iter()
                    .map(|&i| {
                        self.endpoints
                            .get(i)
                            .map_or(0, |e| e.wrr_current.load(Ordering::Relaxed))
                    })
                    .collect();
                let k = balancer::smooth_wrr(&weights, &mut current)?;
                for (&i, c) in candidates.iter().zip(&current) {
                    if let Some(e) = self.endpoints.get(i) {
                        e.wrr_current.store(*c, Ordering::Relaxed);
                    }
                }
                candidates.get(k).copied()
            }
            Lb::LeastRequest => {
                let costs: Vec<f64> = candidates
                    .iter()
                    .map(|&i| {
                        self.endpoints.get(i).map_or(f64::MAX, |e| {
                            balancer::p2c_cost(e.ewma_us(now), e.active.load(Ordering::Relaxed))
                        })
                    })
                    .collect();
                let k = balancer::p2c(&costs, balancer::random(), balancer::random())?;
                candidates.get(k).copied()
            }
            Lb::Maglev => {
                let table = level.maglev.as_ref()?;
                let key = match source {
                    IpAddr::V4(ip) => balancer::fnv1a(0, &ip.octets()),
                    IpAddr::V6(ip) => balancer::fnv1a(0, &ip.octets()),
                };
                let k = balancer::maglev_lookup(table, key, |k| {
                    level.members.get(k).is_some_and(|i| candidates.contains(i))
                })?;
                level.members.get(k).copied()
            }
        }
    }

    /// Records a failed connect; ejects the endpoint when it has failed
    /// `consecutive_failures` times in a row, unless that would exceed
    /// `max_ejection_percent` or leave no healthy endpoint.
    pub(crate) fn record_failure(&self, spec: &ClusterSpec, index: usize, now: Instant) {
        let Some(endpoint) = self.endpoints.get(index) else {
            return;
        };
        inc(&endpoint.connect_failures);
        inc(&self.shared.connect_failures);
        let failures = endpoint
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        let od = &spec.outlier;
        if od.consecutive_failures == 0 || failures < od.consecutive_failures {
            return;
        }
        let _lock = self
            .shared
            .lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if endpoint.ejected(now) {
            return;
        }
        let total = self.endpoints.len();
        let ejected = self.endpoints.iter().filter(|e| e.ejected(now)).count();
        let healthy_others = self
            .endpoints
            .iter()
            .filter(|e| !Arc::ptr_eq(e, endpoint) && e.healthy(now))
            .count();
        if ejected * 100 >= total * od.max_ejection_percent as usize || healthy_others == 0 {
            return;
        }
        let doublings = endpoint
            .ejection_multiplier
            .fetch_add(1, Ordering::Relaxed)
            .min(MAX_EJECTION_DOUBLINGS);
        let base = od.base_ejection.saturating_mul(1 << doublings);
        let time = base.min(od.max_ejection);
        // Up to 10 % jitter so endpoints ejected together return apart.
        let jitter_ms = (time.as_millis() as u64 / 10).max(1);
        let ejection = time.saturating_add(Duration::from_millis(balancer::random() % jitter_ms));
        let until = clock::to_nanos(now).saturating_add(clock::nanos(ejection));
        endpoint.ejected_until.store(until, Ordering::Relaxed);
        endpoint.consecutive_failures.store(0, Ordering::Relaxed);
        inc(&endpoint.ejections);
        inc(&self.shared.ejections);
        tracing::info!(
            cluster = %spec.name, endpoint = %endpoint.address, ejection_ms = ejection.as_millis(),
            "endpoint ejected after {failures} consecutive connect failures"
        );
    }

    /// Records a successful connect and its latency.
    fn record_success(&self, index: usize, latency: Duration, now: Instant) {
        let Some(endpoint) = self.endpoints.get(index) else {
            return;
        };
        endpoint.consecutive_failures.store(0, Ordering::Relaxed);
        // Each success after a return from ejection shortens the next one.
        let _ =
            endpoint
                .ejection_multiplier
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| m.checked_sub(1));
        endpoint.observe(latency, now);
        inc(&endpoint.connections);
        inc(&self.shared.connections);
        self.shared.connect_latency.record(latency);
    }

    /// A copy of the cluster's counters, for `stats_json`.
    pub(crate) fn snapshot(&self, spec: &ClusterSpec) -> ClusterSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let now = clock::now();
        let s = &self.shared;
        ClusterSnapshot {
            connections: get(&s.connections),
            active: get(&s.active),
            pending: get(&s.pending),
            connect_failures: get(&s.connect_failures),
            circuit_open: get(&s.circuit_open),
            ejections: get(&s.ejections),
            bytes_sent: get(&s.bytes_sent),
            bytes_received: get(&s.bytes_received),
            connect_latency: s.connect_latency.snapshot(),
            duration: s.duration.snapshot(),
            endpoints: self
                .endpoints
                .iter()
                .zip(&spec.endpoints)
                .map(
                    |(
                        e,
                        EndpointSpec {
                            priority, weight, ..
                        },
                    )| {
                        let snapshot = EndpointSnapshot {
                            priority: *priority,
                            weight: *weight,
                            connections: get(&e.connections),
                            active: get(&e.active),
                            connect_failures: get(&e.connect_failures),
                            ejections: get(&e.ejections),
                            ejected: e.ejected(now),
                            healthy: e.healthy(now),
                            ewma_connect_us: e.ewma_us(now) as u64,
                        };
                        // By address, as operators know endpoints; by the full key only where two
                        // endpoints share an address (two peers claiming one gateway address).
                        let shared = spec
                            .endpoints
                            .iter()
                            .filter(|o| o.address == e.address)
                            .count()
                            > 1;
                        (
                            if shared {
                                e.key()
                            } else {
                                e.address.to_string()
                            },
                            snapshot,
                        )
                    },
                )
                .collect(),
        }
    }
}

/// A copy of one cluster's counters, as serialized by `stats_json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterSnapshot {
    /// Upstream connections established.
    pub connections: u64,
    /// Upstream connections open now.
    pub active: u64,
    /// Connects in progress now.
    pub pending: u64,
    /// Failed connect attempts (each retry counts).
    pub connect_failures: u64,
    /// Connections refused by the circuit breaker.
    pub circuit_open: u64,
    /// Outlier ejections.
    pub ejections: u64,
    /// Bytes sent to the endpoints.
    pub bytes_sent: u64,
    /// Bytes received from the endpoints.
    pub bytes_received: u64,
    /// TCP connect latency.
    pub connect_latency: HistogramSnapshot,
    /// Upstream connection duration.
    pub duration: HistogramSnapshot,
    /// Per endpoint address.
    pub endpoints: BTreeMap<String, EndpointSnapshot>,
}

/// A copy of one endpoint's state and counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointSnapshot {
    /// Locality priority (0 = local).
    pub priority: u32,
    /// Configured weight.
    pub weight: u32,
    /// Connections established.
    pub connections: u64,
    /// Connections open now.
    pub active: u64,
    /// Failed connect attempts.
    pub connect_failures: u64,
    /// Times ejected by outlier detection.
    pub ejections: u64,
    /// Ejected right now.
    pub ejected: bool,
    /// Neither ejected nor failing active health checks.
    pub healthy: bool,
    /// Peak-EWMA connect latency estimate in microseconds.
    pub ewma_connect_us: u64,
}

/// Why no upstream connection could be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error(
        "cluster {cluster:?}: no endpoint reachable (tried {tried}) — are its endpoints up and listening?"
    )]
    Unreachable { cluster: String, tried: String },
    #[error(
        "cluster {cluster:?}: circuit breaker open ({what} limit {limit} reached) — raise circuit_breaker.{what} or add endpoints"
    )]
    CircuitOpen {
        cluster: String,
        what: &'static str,
        limit: u64,
    },
}

/// Decrements a gauge when dropped.
struct Gauge<'a>(&'a AtomicU64);

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The accounting of an open upstream connection: keeps the cluster and
/// endpoint gauges up while alive and records its duration when dropped.
pub(crate) struct Lease {
    /// Index of the endpoint in the cluster spec.
    pub(crate) index: usize,
    pub(crate) shared: Arc<ClusterShared>,
    endpoint: Arc<EndpointState>,
    opened: Instant,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.shared.active.fetch_sub(1, Ordering::Relaxed);
        self.endpoint.active.fetch_sub(1, Ordering::Relaxed);
        let open_for = clock::now().saturating_duration_since(self.opened);
        self.shared.duration.record(open_for);
    }
}

/// An established upstream connection: plain TCP, or mTLS to a peer gateway.
pub(crate) enum Upstream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// How to open a connection beyond TCP.
pub(crate) struct Dial<'a> {
    /// Bytes written before anything else (a PROXY protocol header), ahead
    /// of the TLS handshake when the endpoint is reached over mTLS.
    pub(crate) preamble: &'a [u8],
    /// What to tell a peer gateway that negotiates the hop protocol (see
    /// `hop`); `None` only where no mTLS endpoint can be reached.
    pub(crate) conveyed: Option<Conveyed<'a>>,
    /// Limit on an upstream TLS handshake.
    pub(crate) handshake_timeout: Duration,
    /// Where upstream handshake failures are counted.
    pub(crate) stats: &'a ListenerStats,
}

/// The connection as the hop protocol describes it to a peer gateway.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Conveyed<'a> {
    /// The client's address.
    pub(crate) source: SocketAddr,
    /// The listener address the client connected to.
    pub(crate) destination: SocketAddr,
    /// The client's verified SPIFFE ID; `None`: the gateway is the caller.
    /// From a terminate listener, its effective caller, which the next
    /// ingress accepts only if it is of this gateway's own trust domain.
    pub(crate) caller: Option<&'a SpiffeId>,
}

/// Connects to an endpoint of `cluster` for a client at `source`: checks the
/// circuit breaker, picks by policy, opens TCP and, where the endpoint asks,
/// mTLS. A refused or timed-out connect or a failed handshake is retried on
/// another endpoint (no client byte has been sent yet, so retrying is safe),
/// up to every endpoint once; each failure counts toward outlier ejection,
/// so a failover group moves on from a peer gateway that refuses us.
pub(crate) async fn connect(
    spec: &ClusterSpec,
    state: &ClusterState,
    source: IpAddr,
    dial: &Dial<'_>,
) -> Result<(Upstream, Lease), ConnectError> {
    let shared = &state.shared;
    let open = |what, limit: Option<u64>, gauge: &AtomicU64| match limit {
        Some(limit) if gauge.load(Ordering::Relaxed) >= limit => {
            inc(&shared.circuit_open);
            Err(ConnectError::CircuitOpen {
                cluster: spec.name.clone(),
                what,
                limit,
            })
        }
        _ => Ok(()),
    };
    open("max_connections", spec.max_connections, &shared.active)?;
    open("max_pending", spec.max_pending, &shared.pending)?;
    shared.pending.fetch_add(1, Ordering::Relaxed);
    let _pending = Gauge(&shared.pending);

    let mut tried = Vec::new();
    let mut failures = Vec::new();
    while tried.len() < state.endpoints.len() {
        let Some(index) = state.pick(spec, source, &tried, clock::now()) else {
            break;
        };
        tried.push(index);
        let (Some(endpoint), Some(endpoint_spec)) =
            (state.endpoints.get(index), spec.endpoints.get(index))
        else {
            continue;
        };
        let address = endpoint.address;
        let started = clock::now();
        match establish(spec, endpoint_spec, dial).await {
            Ok(stream) => {
                let now = clock::now();
                state.record_success(index, now.saturating_duration_since(started), now);
                shared.active.fetch_add(1, Ordering::Relaxed);
                endpoint.active.fetch_add(1, Ordering::Relaxed);
                let lease = Lease {
                    index,
                    shared: shared.clone(),
                    endpoint: endpoint.clone(),
                    opened: now,
                };
                return Ok((stream, lease));
            }
            Err(e) => {
                tracing::debug!(cluster = %spec.name, %address, error = %e, "endpoint connect failed");
                state.record_failure(spec, index, clock::now());
                failures.push(format!("{address}: {e}"));
            }
        }
    }
    Err(ConnectError::Unreachable {
        cluster: spec.name.clone(),
        tried: failures.join("; "),
    })
}

/// One attempt on one endpoint: TCP connect, the preamble, and the mTLS
/// handshake if the endpoint has `tls`.
async fn establish(
    spec: &ClusterSpec,
    endpoint: &EndpointSpec,
    dial: &Dial<'_>,
) -> io::Result<Upstream> {
    let mut stream =
        tokio::time::timeout(spec.connect_timeout, TcpStream::connect(endpoint.address))
            .await
            .unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("timed out after {:?}", spec.connect_timeout),
                ))
            })?;
    // Nagle only delays a proxy's small writes.
    let _ = stream.set_nodelay(true);
    if !dial.preamble.is_empty() {
        stream.write_all(dial.preamble).await?;
    }
    match &endpoint.tls {
        None => Ok(Upstream::Plain(stream)),
        // Boxed: the handshake state is kilobytes that plain connections must not carry.
        Some(tls) => Box::pin(secure(stream, tls, dial))
            .await
            .map(|s| Upstream::Tls(Box::new(s))),
    }
}

/// The mTLS handshake with an endpoint that must present `tls.peer`'s SVID,
/// then the caller header if both sides speak the hop protocol.
async fn secure(
    stream: TcpStream,
    tls: &UpstreamTlsSpec,
    dial: &Dial<'_>,
) -> io::Result<TlsStream<TcpStream>> {
    let connect = TlsConnector::from(tls.config.clone()).connect(tls.server_name.clone(), stream);
    match tokio::time::timeout(dial.handshake_timeout, connect).await {
        Ok(Ok(mut stream)) => {
            if tls.convey_caller {
                convey(&mut stream, tls, dial).await?;
            }
            Ok(stream)
        }
        Ok(Err(e)) => {
            dial.stats.handshake_failed(HandshakeFailure::UpstreamTls);
            Err(io::Error::new(
                e.kind(),
                format!(
                    "mTLS handshake failed: {e} — does it present {} signed by its trust bundle?",
                    tls.peer
                ),
            ))
        }
        Err(_) => {
            dial.stats.handshake_failed(HandshakeFailure::Timeout);
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "mTLS handshake not finished within {:?} — raise handshake_timeout_ms if peers are slow",
                    dial.handshake_timeout
                ),
            ))
        }
    }
}

/// Writes the caller header as the first bytes inside the tunnel, if the
/// peer negotiated the hop protocol. Part of the connect attempt: a failure
/// here moves on to the next endpoint like a failed handshake, so the
/// header always goes to the endpoint that finally accepted.
async fn convey(
    stream: &mut TlsStream<TcpStream>,
    tls: &UpstreamTlsSpec,
    dial: &Dial<'_>,
) -> io::Result<()> {
    if stream.get_ref().1.alpn_protocol() != Some(HOP_ALPN) {
        tracing::debug!(
            peer = %tls.peer,
            "peer gateway did not negotiate meshfed-caller/1 (an older ingress?): no caller header, it sees this gateway as the caller"
        );
        return Ok(());
    }
    let Some(conveyed) = dial.conveyed else {
        return Err(io::Error::other(
            "the peer expects a caller header, but this connection has no caller to convey",
        ));
    };
    let header = hop::encode_header(
        conveyed.source,
        conveyed.destination,
        &tls.server_name.to_str(),
        conveyed.caller,
    )
    .map_err(io::Error::other)?;
    stream.write_all(&header).await?;
    // The ingress waits for the header before it dials its backend: a client
    // that waits for the server to speak first must not stall it.
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::*;
    use crate::config::OutlierSpec;

    fn spec(lb: Lb, endpoints: &[(u32, u32)]) -> ClusterSpec {
        ClusterSpec {
            name: "c".to_owned(),
            endpoints: endpoints
                .iter()
                .enumerate()
                .map(|(i, &(weight, priority))| EndpointSpec {
                    address: SocketAddr::from(([192, 0, 2, i as u8], 80)),
                    weight,
                    priority,
                    tls: None,
                })
                .collect(),
            connect_timeout: Duration::from_secs(1),
            lb,
            idle_timeout: None,
            outlier: OutlierSpec {
                consecutive_failures: 1,
                base_ejection: Duration::from_secs(60),
                max_ejection: Duration::from_secs(600),
                max_ejection_percent: 100,
            },
            health_check: None,
            max_connections: None,
            max_pending: None,
        }
    }

    fn state(spec: &ClusterSpec) -> ClusterState {
        ClusterState::build(
            spec,
            &mut Previous {
                clusters: &HashMap::new(),
                retired: &mut Retired::new(),
            },
        )
    }

    const LBS: [Lb; 4] = [
        Lb::RoundRobin,
        Lb::WeightedRoundRobin,
        Lb::LeastRequest,
        Lb::Maglev,
    ];

    #[test]
    fn never_ejects_the_last_healthy_endpoint() {
        let spec = spec(Lb::RoundRobin, &[(1, 0), (1, 0)]);
        let state = state(&spec);
        let now = clock::now();
        state.record_failure(&spec, 0, now);
        state.record_failure(&spec, 1, now);
        assert!(!state.endpoints[0].healthy(now));
        assert!(
            state.endpoints[1].healthy(now),
            "last healthy endpoint ejected"
        );
    }

    /// How long endpoint `i` of `state` stays ejected from now on.
    fn ejection_left(state: &ClusterState, i: usize) -> Duration {
        let until = state.endpoints[i].ejected_until.load(Ordering::Relaxed);
        Duration::from_nanos(until.saturating_sub(clock::now_nanos()))
    }

    /// Whether `pick` returns endpoint `i` within 8 tries (round robin over
    /// two endpoints returns each healthy one every other pick).
    fn picked(spec: &ClusterSpec, state: &ClusterState, i: usize) -> bool {
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        (0..8).any(|_| state.pick(spec, ip, &[], clock::now()) == Some(i))
    }

    #[test]
    fn ejection_respects_max_percent() {
        let mut spec = spec(Lb::RoundRobin, &[(1, 0), (1, 0), (1, 0), (1, 0)]);
        spec.outlier.max_ejection_percent = 50;
        let state = state(&spec);
        let now = clock::now();
        for i in 0..4 {
            state.record_failure(&spec, i, now);
        }
        let ejected = state.endpoints.iter().filter(|e| e.ejected(now)).count();
        assert_eq!(ejected, 2, "max_ejection_percent 50 of 4");
    }

    /// On the data plane's (paused) clock: an ejected endpoint is out for
    /// exactly its ejection time (base plus under 10 % jitter), back at its
    /// end and not a nanosecond before; ejected again, it stays out twice
    /// as long; a success after its return halves the next ejection again.
    #[tokio::test(start_paused = true)]
    async fn ejected_endpoint_returns_exactly_when_its_ejection_ends() {
        let spec = spec(Lb::RoundRobin, &[(1, 0), (1, 0)]);
        let base = spec.outlier.base_ejection;
        let state = state(&spec);
        let eject = |state: &ClusterState| state.record_failure(&spec, 0, clock::now());

        eject(&state);
        let first = ejection_left(&state, 0);
        assert!(first >= base && first < base + base / 10, "{first:?}");
        tokio::time::advance(first - Duration::from_millis(1)).await;
        assert!(!state.endpoints[0].healthy(clock::now()));
        assert!(!picked(&spec, &state, 0), "picked while ejected");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(state.endpoints[0].healthy(clock::now()), "not back on time");
        assert!(picked(&spec, &state, 0), "not picked once back");

        eject(&state);
        let second = ejection_left(&state, 0);
        assert!(
            second >= base * 2 && second < (base * 2) + base / 5,
            "{second:?}"
        );
        tokio::time::advance(second - Duration::from_nanos(1)).await;
        assert!(
            !state.endpoints[0].healthy(clock::now()),
            "back a nanosecond early"
        );
        tokio::time::advance(Duration::from_nanos(1)).await;
        assert!(state.endpoints[0].healthy(clock::now()));

        state.record_success(0, Duration::from_millis(1), clock::now());
        eject(&state);
        let third = ejection_left(&state, 0);
        assert!(
            third >= base * 2 && third < (base * 2) + base / 5,
            "{third:?}"
        );
        let ejections =
            state.snapshot(&spec).endpoints[&spec.endpoints[0].address.to_string()].ejections;
        assert_eq!(ejections, 3);
    }

    #[test]
    fn state_carries_over_by_endpoint_key() {
        let a = spec(Lb::RoundRobin, &[(1, 0), (1, 0)]);
        let old = Arc::new(state(&a));
        old.record_failure(&a, 1, clock::now());
        let clusters = HashMap::from([("c".to_owned(), old.clone())]);
        let mut b = spec(Lb::LeastRequest, &[(1, 0)]);
        b.endpoints[0].address = a.endpoints[1].address;
        let new = ClusterState::build(
            &b,
            &mut Previous {
                clusters: &clusters,
                retired: &mut Retired::new(),
            },
        );
        assert!(Arc::ptr_eq(&new.endpoints[0], &old.endpoints[1]));
        assert!(Arc::ptr_eq(&new.shared, &old.shared));
    }

    /// An endpoint dropped by one generation and a cluster dropped by the
    /// next come back, later, as the same state: counters and gauges go on.
    #[test]
    fn removed_endpoints_and_clusters_come_back_with_their_state() {
        let a = spec(Lb::RoundRobin, &[(1, 0), (1, 0)]);
        let mut retired = Retired::new();
        let first = Arc::new(state(&a));
        first.record_failure(&a, 0, clock::now());
        let mut b = spec(Lb::RoundRobin, &[(1, 0)]);
        b.endpoints[0].address = a.endpoints[1].address;
        let clusters = HashMap::from([("c".to_owned(), first.clone())]);
        let second = Arc::new(ClusterState::build(
            &b,
            &mut Previous {
                clusters: &clusters,
                retired: &mut retired,
            },
        ));
        first.retire_into("c", Some(&second), &mut retired);
        assert_eq!(retired.endpoints.len(), 1);
        // The cluster goes away altogether.
        second.retire_into("c", None, &mut retired);
        let third = ClusterState::build(
            &a,
            &mut Previous {
                clusters: &HashMap::new(),
                retired: &mut retired,
            },
        );
        assert!(Arc::ptr_eq(&third.shared, &first.shared));
        assert!(Arc::ptr_eq(&third.endpoints[0], &first.endpoints[0]));
        assert!(Arc::ptr_eq(&third.endpoints[1], &first.endpoints[1]));
        assert_eq!(third.snapshot(&a).connect_failures, 1);
        assert_eq!(retired.endpoints.len() + retired.clusters.len(), 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// Whatever the policy, an ejected endpoint is never picked while a
        /// healthy one exists, and the pick respects failover order: never a
        /// lower-priority level while the local one is fully healthy.
        #[test]
        fn never_picks_an_ejected_endpoint(
            lb in 0usize..4,
            endpoints in prop::collection::vec((1u32..5, 0u32..3), 2..7),
            dead in prop::collection::vec(any::<bool>(), 7),
            source: u32,
        ) {
            let spec = spec(LBS[lb], &endpoints);
            let state = state(&spec);
            let now = clock::now();
            for (i, e) in state.endpoints.iter().enumerate() {
                if dead[i] {
                    let until = clock::to_nanos(now + Duration::from_secs(60));
                    e.ejected_until.store(until, Ordering::Relaxed);
                }
            }
            let any_healthy = state.endpoints.iter().any(|e| e.healthy(now));
            let top = endpoints.iter().map(|e| e.1).min().unwrap_or(0);
            let top_all_healthy = endpoints
                .iter()
                .zip(&dead)
                .all(|(e, d)| e.1 != top || !d);
            for _ in 0..20 {
                let ip = IpAddr::V4(Ipv4Addr::from(source));
                let pick = state.pick(&spec, ip, &[], now);
                prop_assert!(pick.is_some());
                let i = pick.unwrap_or(0);
                if any_healthy {
                    prop_assert!(state.endpoints[i].healthy(now));
                }
                if top_all_healthy {
                    prop_assert_eq!(endpoints[i].1, top);
                }
            }
        }

        /// Weighted round robin converges to the configured shares.
        #[test]
        fn wrr_converges_to_weights(weights in prop::collection::vec(1u32..6, 1..5)) {
            let endpoints: Vec<(u32, u32)> = weights.iter().map(|w| (*w, 0)).collect();
            let spec = spec(Lb::WeightedRoundRobin, &endpoints);
            let state = state(&spec);
            let total: u32 = weights.iter().sum();
            let mut counts = vec![0u32; weights.len()];
            let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
            for _ in 0..total * 4 {
                let i = state.pick(&spec, ip, &[], clock::now()).unwrap_or(usize::MAX);
                prop_assert!(i < weights.len());
                counts[i] += 1;
            }
            for (c, w) in counts.iter().zip(&weights) {
                prop_assert_eq!(*c, w * 4);
            }
        }
    }

    #[test]
    fn maglev_is_sticky_per_source() {
        let spec = spec(Lb::Maglev, &[(1, 0), (1, 0), (1, 0)]);
        let state = state(&spec);
        for source in 0..50u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(source));
            let first = state.pick(&spec, ip, &[], clock::now());
            for _ in 0..5 {
                assert_eq!(state.pick(&spec, ip, &[], clock::now()), first);
            }
        }
    }
}
