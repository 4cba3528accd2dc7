//! Per-listener counters, updated by the data plane with relaxed atomics and
//! read from any thread without blocking it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::Serialize;

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
    /// Verified peer SPIFFE IDs (terminate: callers; originate: peer gateways).
    peer_identities: Mutex<HashMap<String, u64>>,
}

/// A point-in-time copy of [`ListenerStats`], as serialized by `stats_json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
    /// Connections closed because the caller's identity was not allowed.
    pub denied: u64,
    /// Connections closed because no endpoint of the cluster could be reached.
    pub upstream_connect_failures: u64,
    /// Connections per verified peer SPIFFE ID.
    pub peer_identities: BTreeMap<String, u64>,
}

/// Bumps a counter by one.
pub(crate) fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl ListenerStats {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Counts one connection from a verified peer identity.
    pub(crate) fn record_peer(&self, id: &str) {
        let mut map = self
            .peer_identities
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *map.entry(id.to_owned()).or_insert(0) += 1;
    }

    /// Copies the counters.
    pub(crate) fn snapshot(&self) -> ListenerSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let peer_identities = self
            .peer_identities
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        ListenerSnapshot {
            accepted: get(&self.accepted),
            active: get(&self.active),
            closed: get(&self.closed),
            bytes_client_to_upstream: get(&self.bytes_client_to_upstream),
            bytes_upstream_to_client: get(&self.bytes_upstream_to_client),
            handshake_failures: get(&self.handshake_failures),
            no_route: get(&self.no_route),
            denied: get(&self.denied),
            upstream_connect_failures: get(&self.upstream_connect_failures),
            peer_identities,
        }
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
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        inc(&self.0.closed);
    }
}
