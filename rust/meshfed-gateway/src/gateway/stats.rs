//! Per-listener counters, updated by the data plane with relaxed atomics and
//! read from any thread without blocking it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;

use super::clock;

/// Most distinct keys a per-listener table ([`BoundedCounts`]) holds.
pub(crate) const MAX_TRACKED_KEYS: usize = 1000;
/// The key that counts everything beyond [`MAX_TRACKED_KEYS`].
pub(crate) const OTHER_KEY: &str = "<other>";
/// At most one info line per this for denials of pairs beyond the bound.
const OVERFLOW_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Counters of one listener. Kept by listener name across `apply()`.
#[derive(Debug, Default)]
pub(crate) struct ListenerStats {
    pub(crate) accepted: AtomicU64,
    pub(crate) active: AtomicU64,
    pub(crate) closed: AtomicU64,
    pub(crate) bytes_client_to_upstream: AtomicU64,
    pub(crate) bytes_upstream_to_client: AtomicU64,
    pub(crate) handshake_failures: AtomicU64,
    pub(crate) no_route: AtomicU64,
    pub(crate) denied: AtomicU64,
    pub(crate) upstream_connect_failures: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
    pub(crate) circuit_open: AtomicU64,
    pub(crate) idle_timeouts: AtomicU64,
    /// Connections open now that have not finished their handshake.
    pub(crate) handshaking: AtomicU64,
    pub(crate) connections_refused_over_limit: AtomicU64,
    pub(crate) handshakes_refused_over_limit: AtomicU64,
    pub(crate) accept_errors: AtomicU64,
    pub(crate) probes: AtomicU64,
    pub(crate) tunnels: AtomicU64,
    pub(crate) tunnel_streams: AtomicU64,
    /// Handshake failures by [`HandshakeFailure`] (index = discriminant).
    handshake_reasons: [AtomicU64; HandshakeFailure::ALL.len()],
    /// Authorized callers (terminate) or verified peer gateways (originate).
    peer_identities: BoundedCounts,
    /// Denials by the trust domain answerable for them.
    denied_by_trust_domain: BoundedCounts,
    /// Which denials are logged at info.
    denial_log: DenialLog,
}

/// A point-in-time copy of [`ListenerStats`], as serialized by `stats_json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct ListenerSnapshot {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections open now.
    pub active: u64,
    /// Connections finished.
    pub closed: u64,
    /// Bytes read from clients and sent upstream.
    pub bytes_client_to_upstream: u64,
    /// Bytes read from upstream and sent to clients.
    pub bytes_upstream_to_client: u64,
    /// ClientHello reads or TLS handshakes that failed or timed out.
    pub handshake_failures: u64,
    /// Connections closed because no route matched their SNI.
    pub no_route: u64,
    /// Connections refused by authorization (the route's rules, or a peer
    /// gateway not trusted or vouching outside its trust domain).
    pub denied: u64,
    /// `denied` by trust domain: the caller's, or the vouching gateway's for
    /// a caller that came over the hop protocol. At most 1000 keys, the rest
    /// under `"<other>"`.
    pub denied_by_trust_domain: BTreeMap<String, u64>,
    /// Connections closed because no endpoint of the cluster could be reached.
    pub upstream_connect_failures: u64,
    /// Connections refused by a route or per-caller rate limit.
    pub rate_limited: u64,
    /// Connections refused because a cluster's circuit breaker was open.
    pub circuit_open: u64,
    /// Connections closed after the cluster's idle timeout.
    pub idle_timeouts: u64,
    /// Connections open now that have not finished their handshake (they
    /// count in `active` too).
    pub handshaking: u64,
    /// Connections closed at once because the listener had
    /// `limits.max_connections` open; not counted in `accepted`.
    pub connections_refused_over_limit: u64,
    /// Connections closed at once because the listener had
    /// `limits.max_handshakes` unfinished handshakes; not counted in `accepted`.
    pub handshakes_refused_over_limit: u64,
    /// Failed `accept()` calls (e.g. out of file descriptors, EMFILE).
    pub accept_errors: u64,
    /// Connections closed by the client before it sent a byte: TCP health
    /// checks (an importing peer's, a load balancer's) and port scans. Not a
    /// handshake failure.
    pub probes: u64,
    /// Tunnel connections (`meshfed-tunnel/1`) opened: accepted by an
    /// ingress, dialled by an egress. Each carries many streams on one mTLS
    /// handshake.
    pub tunnels: u64,
    /// Client connections carried as tunnel streams: opened by a peer
    /// gateway at an ingress (they count in `accepted` too), sent over a
    /// tunnel by an egress.
    pub tunnel_streams: u64,
    /// `handshake_failures` by reason (`timeout`, `closed`, `not_tls`,
    /// `too_large`, `malformed`, `tls`, `no_svid`, `upstream_tls`).
    pub handshake_failure_reasons: BTreeMap<&'static str, u64>,
    /// Connections per verified peer SPIFFE ID: authorized callers
    /// (terminate) or peer gateways (originate). At most 1000 keys, the rest
    /// under `"<other>"`.
    pub peer_identities: BTreeMap<String, u64>,
    /// Per route (keyed by SNI pattern): connections, rate-limited, bytes.
    pub routes: BTreeMap<String, RouteSnapshot>,
}

/// Why a ClientHello read or TLS handshake failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HandshakeFailure {
    Timeout,
    Closed,
    NotTls,
    TooLarge,
    Malformed,
    Tls,
    NoSvid,
    UpstreamTls,
}

impl HandshakeFailure {
    const ALL: [Self; 8] = [
        Self::Timeout,
        Self::Closed,
        Self::NotTls,
        Self::TooLarge,
        Self::Malformed,
        Self::Tls,
        Self::NoSvid,
        Self::UpstreamTls,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Closed => "closed",
            Self::NotTls => "not_tls",
            Self::TooLarge => "too_large",
            Self::Malformed => "malformed",
            Self::Tls => "tls",
            Self::NoSvid => "no_svid",
            Self::UpstreamTls => "upstream_tls",
        }
    }
}

/// Counters of one route, carried across `apply()` by listener and SNI.
#[derive(Debug, Default)]
pub(crate) struct RouteStats {
    pub(crate) connections: AtomicU64,
    pub(crate) rate_limited: AtomicU64,
    pub(crate) bytes_client_to_upstream: AtomicU64,
    pub(crate) bytes_upstream_to_client: AtomicU64,
}

/// A copy of one route's counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct RouteSnapshot {
    /// Connections routed here (before rate limiting).
    pub connections: u64,
    /// Connections refused by the route or per-caller rate limit.
    pub rate_limited: u64,
    /// Bytes from clients to endpoints.
    pub bytes_client_to_upstream: u64,
    /// Bytes from endpoints to clients.
    pub bytes_upstream_to_client: u64,
}

impl RouteStats {
    pub(crate) fn snapshot(&self) -> RouteSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RouteSnapshot {
            connections: get(&self.connections),
            rate_limited: get(&self.rate_limited),
            bytes_client_to_upstream: get(&self.bytes_client_to_upstream),
            bytes_upstream_to_client: get(&self.bytes_upstream_to_client),
        }
    }
}

/// Number of histogram buckets: bucket `i` counts values below `2^i` µs
/// (the last one everything above), i.e. 1 µs up to ~67 s.
const BUCKETS: usize = 27;

/// A latency histogram with fixed power-of-two buckets in microseconds,
/// updated with relaxed atomics.
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    sum_us: AtomicU64,
}

/// A copy of a [`Histogram`]: `counts[i]` values were below `le_us[i]`
/// (and at or above `le_us[i - 1]`); the last bound is open-ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct HistogramSnapshot {
    /// Values recorded.
    pub count: u64,
    /// Sum of all values in microseconds.
    pub sum_us: u64,
    /// Upper bound (exclusive) of each bucket in microseconds.
    pub le_us: Vec<u64>,
    /// Values per bucket.
    pub counts: Vec<u64>,
}

impl Histogram {
    pub(crate) fn record(&self, value: Duration) {
        let us = u64::try_from(value.as_micros()).unwrap_or(u64::MAX);
        let index = (64 - us.leading_zeros() as usize).min(BUCKETS - 1);
        if let Some(bucket) = self.buckets.get(index) {
            inc(bucket);
        }
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> HistogramSnapshot {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        HistogramSnapshot {
            count: counts.iter().sum(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
            le_us: (0..BUCKETS)
                .map(|i| if i + 1 == BUCKETS { u64::MAX } else { 1 << i })
                .collect(),
            counts,
        }
    }
}

/// Bumps a counter by one.
pub(crate) fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl ListenerStats {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Counts one failed ClientHello read or handshake, by reason.
    pub(crate) fn handshake_failed(&self, reason: HandshakeFailure) {
        inc(&self.handshake_failures);
        if let Some(counter) = self.handshake_reasons.get(reason as usize) {
            inc(counter);
        }
    }

    /// Counts one connection from a verified (and, on terminate listeners,
    /// authorized) peer identity.
    pub(crate) fn record_peer(&self, id: &str) {
        self.peer_identities.record(id);
    }

    /// Counts one denial under `trust_domain`; returns whether to log it at
    /// info level (see [`DenialLog`]).
    pub(crate) fn record_denial(
        &self,
        trust_domain: &str,
        caller: &str,
        sni: Option<&str>,
    ) -> bool {
        inc(&self.denied);
        self.denied_by_trust_domain.record(trust_domain);
        self.denial_log.notable(caller, sni)
    }

    /// Copies the counters.
    pub(crate) fn snapshot(&self) -> ListenerSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ListenerSnapshot {
            accepted: get(&self.accepted),
            active: get(&self.active),
            closed: get(&self.closed),
            bytes_client_to_upstream: get(&self.bytes_client_to_upstream),
            bytes_upstream_to_client: get(&self.bytes_upstream_to_client),
            handshake_failures: get(&self.handshake_failures),
            no_route: get(&self.no_route),
            denied: get(&self.denied),
            denied_by_trust_domain: self.denied_by_trust_domain.snapshot(),
            upstream_connect_failures: get(&self.upstream_connect_failures),
            rate_limited: get(&self.rate_limited),
            circuit_open: get(&self.circuit_open),
            idle_timeouts: get(&self.idle_timeouts),
            handshaking: get(&self.handshaking),
            connections_refused_over_limit: get(&self.connections_refused_over_limit),
            handshakes_refused_over_limit: get(&self.handshakes_refused_over_limit),
            accept_errors: get(&self.accept_errors),
            probes: get(&self.probes),
            tunnels: get(&self.tunnels),
            tunnel_streams: get(&self.tunnel_streams),
            handshake_failure_reasons: HandshakeFailure::ALL
                .iter()
                .zip(&self.handshake_reasons)
                .map(|(reason, c)| (reason.as_str(), get(c)))
                .collect(),
            peer_identities: self.peer_identities.snapshot(),
            routes: BTreeMap::new(),
        }
    }
}

/// Counts by key, for at most [`MAX_TRACKED_KEYS`] distinct keys; the rest
/// count under [`OTHER_KEY`]. The first keys seen keep their place (no
/// eviction): a metric series never appears and vanishes as counts move,
/// and a stream of new keys costs no memory beyond the bound.
#[derive(Debug, Default)]
struct BoundedCounts(Mutex<CountsInner>);

#[derive(Debug, Default)]
struct CountsInner {
    counts: HashMap<Box<str>, u64>,
    other: u64,
}

impl BoundedCounts {
    /// Adds one to `key`; allocates only for a key not seen before.
    fn record(&self, key: &str) {
        let mut inner = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = inner.counts.get_mut(key) {
            *count += 1;
        } else if inner.counts.len() < MAX_TRACKED_KEYS {
            inner.counts.insert(key.into(), 1);
        } else {
            inner.other += 1;
        }
    }

    fn snapshot(&self) -> BTreeMap<String, u64> {
        let inner = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: BTreeMap<String, u64> = inner
            .counts
            .iter()
            .map(|(k, v)| (k.to_string(), *v))
            .collect();
        if inner.other > 0 {
            out.insert(OTHER_KEY.to_owned(), inner.other);
        }
        out
    }
}

/// Keeps denial logs rate-safe: a denial is logged at info the first time
/// its (caller, SNI) pair is refused, for up to [`MAX_TRACKED_KEYS`] pairs;
/// repeats go to debug, since a client retrying in a loop would otherwise
/// write one info line per attempt. Once that many pairs are remembered, at
/// most one new-pair denial per second makes it to info (an attacker
/// cycling identities cannot flood the log either). Every denial is still
/// counted in `denied` and `denied_by_trust_domain`.
#[derive(Debug, Default)]
struct DenialLog {
    /// Hashes of the pairs seen, keyed per process so nobody can aim collisions.
    seen: Mutex<HashSet<u64>>,
    hasher: RandomState,
    /// When (`clock` nanoseconds) the last info line went out once `seen`
    /// is full; 0 before the first.
    last_overflow: AtomicU64,
}

impl DenialLog {
    /// Whether this denial deserves an info line.
    fn notable(&self, caller: &str, sni: Option<&str>) -> bool {
        let key = self.hasher.hash_one((caller, sni));
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        if seen.contains(&key) {
            return false;
        }
        if seen.len() < MAX_TRACKED_KEYS {
            seen.insert(key);
            return true;
        }
        drop(seen);
        let now = clock::now_nanos();
        let last = self.last_overflow.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= clock::nanos(OVERFLOW_LOG_INTERVAL))
            && self
                .last_overflow
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// Tracks one connection's life in `active` / `closed`.
pub(crate) struct ConnectionGuard(Arc<ListenerStats>);

impl ConnectionGuard {
    pub(crate) fn open(stats: Arc<ListenerStats>) -> Self {
        inc(&stats.accepted);
        inc(&stats.active);
        Self(stats)
    }

    /// The counters of the connection's listener.
    pub(crate) fn stats(&self) -> &Arc<ListenerStats> {
        &self.0
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        inc(&self.0.closed);
    }
}

/// Holds one of a listener's `max_handshakes` slots while a connection has
/// not finished its handshake; dropped when it has (or when it closes).
pub(crate) struct HandshakeSlot(Arc<ListenerStats>);

impl HandshakeSlot {
    pub(crate) fn take(stats: Arc<ListenerStats>) -> Self {
        inc(&stats.handshaking);
        Self(stats)
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.0.handshaking.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_bounded_and_count_the_rest_as_other() {
        let stats = ListenerStats::default();
        for i in 0..MAX_TRACKED_KEYS + 5 {
            stats.record_peer(&format!("spiffe://west.mesh/sa/{i}"));
        }
        stats.record_peer("spiffe://west.mesh/sa/0");
        stats.record_peer("spiffe://west.mesh/sa/late");
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.peer_identities.len(), MAX_TRACKED_KEYS + 1);
        assert_eq!(snapshot.peer_identities.get(OTHER_KEY), Some(&6));
        assert_eq!(
            snapshot.peer_identities.get("spiffe://west.mesh/sa/0"),
            Some(&2)
        );
        assert!(
            ListenerStats::default()
                .snapshot()
                .peer_identities
                .is_empty()
        );
    }

    #[test]
    fn denials_count_by_trust_domain_and_log_a_pair_once() {
        let stats = ListenerStats::default();
        let caller = "spiffe://west.mesh/sa/intruder";
        assert!(stats.record_denial("west.mesh", caller, Some("web")));
        assert!(!stats.record_denial("west.mesh", caller, Some("web")));
        assert!(stats.record_denial("west.mesh", caller, Some("api")));
        assert!(stats.record_denial("east.mesh", "spiffe://east.mesh/x", None));
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.denied, 4);
        assert_eq!(
            snapshot.denied_by_trust_domain,
            BTreeMap::from([("east.mesh".to_owned(), 1), ("west.mesh".to_owned(), 3)])
        );
        // Past the bound: new pairs reach info at most once per second.
        let log = DenialLog::default();
        for i in 0..MAX_TRACKED_KEYS {
            assert!(log.notable(&format!("spiffe://x/{i}"), None));
        }
        let loud = (0..100)
            .filter(|i| log.notable(&format!("spiffe://y/{i}"), None))
            .count();
        assert_eq!(loud, 1);
    }
}
