//! The state of names that left the running config, kept so that a name
//! coming back continues its counters.
//!
//! Counters are cumulative per stable name (listener, route, cluster,
//! endpoint): a scraper computes rates from their differences, and a
//! counter that starts again at zero reads as a reset. Names still in the
//! config carry their state over directly (see `Snapshot::build` and
//! `Gateway::install`); a name removed by one apply and re-added by a later
//! one finds its state here, the very objects its draining connections
//! still count into, so gauges (`active`) stay the live count and every
//! byte those connections move still lands in the counters shown.
//!
//! Envoy keeps a removed listener's stats for the life of the process;
//! here that would grow without bound under name churn (a control plane
//! minting a listener or cluster per short-lived peer), so each kind keeps
//! at most a fixed number of retired names and forgets the longest-retired
//! first. Forgetting costs only what every name cost before: a counter that
//! restarts at zero if that name ever returns. The bounds are sized by what
//! one entry can hold (see [`Retired::new`]).

use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::Arc;

use super::limits::RouteState;
use super::stats::ListenerStats;
use super::upstream::{ClusterShared, EndpointState};
use crate::config::RouteKey;

/// Retired listeners kept. A listener's stats hold up to two identity
/// tables and a denial log of 1000 keys each, ~100 KiB at worst: 64 of
/// them stay under ~7 MiB.
const MAX_LISTENERS: usize = 64;
/// Retired routes kept: counters only (their buckets are dropped), a few
/// hundred bytes each.
const MAX_ROUTES: usize = 4096;
/// Retired clusters kept: counters and two histograms, under 1 KiB each.
const MAX_CLUSTERS: usize = 1024;
/// Retired endpoints kept, a few hundred bytes each: room for a discovery
/// source scaling clusters down and up again.
const MAX_ENDPOINTS: usize = 8192;

/// At most `cap` retired values by key; retiring one more forgets the
/// longest-retired.
#[derive(Debug)]
pub(crate) struct RetiredMap<K, V> {
    cap: usize,
    /// Retirement sequence number of the next entry.
    next: u64,
    entries: HashMap<K, (u64, V)>,
    /// Keys by retirement sequence, oldest first.
    order: BTreeMap<u64, K>,
}

impl<K: Hash + Eq + Clone, V> RetiredMap<K, V> {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            cap,
            next: 0,
            entries: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    /// Keeps `value` under `key` (replacing an older one of that key).
    pub(crate) fn retire(&mut self, key: K, value: V) {
        if self.cap == 0 {
            return;
        }
        let seq = self.next;
        self.next += 1;
        if let Some((old, _)) = self.entries.insert(key.clone(), (seq, value)) {
            self.order.remove(&old);
        }
        self.order.insert(seq, key);
        while self.entries.len() > self.cap {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.entries.remove(&oldest);
        }
    }

    /// Takes back the value retired under `key`, if it is still kept.
    pub(crate) fn revive<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let (seq, value) = self.entries.remove(key)?;
        self.order.remove(&seq);
        Some(value)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Everything retired, by kind. Changed only by `apply()`, under the
/// gateway's control lock.
#[derive(Debug)]
pub(crate) struct Retired {
    pub(crate) listeners: RetiredMap<String, Arc<ListenerStats>>,
    pub(crate) routes: RetiredMap<RouteKey, Arc<RouteState>>,
    pub(crate) clusters: RetiredMap<String, Arc<ClusterShared>>,
    /// By cluster name and endpoint key.
    pub(crate) endpoints: RetiredMap<(String, String), Arc<EndpointState>>,
}

impl Retired {
    pub(crate) fn new() -> Self {
        Self {
            listeners: RetiredMap::new(MAX_LISTENERS),
            routes: RetiredMap::new(MAX_ROUTES),
            clusters: RetiredMap::new(MAX_CLUSTERS),
            endpoints: RetiredMap::new(MAX_ENDPOINTS),
        }
    }
}

impl Default for Retired {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_at_most_cap_and_forgets_the_longest_retired_first() {
        let mut map = RetiredMap::new(3);
        for (key, value) in [("a", 1), ("b", 2), ("c", 3)] {
            map.retire(key, value);
        }
        // Retired again: now the youngest, so "b" is the one to go.
        map.retire("a", 10);
        map.retire("d", 4);
        assert_eq!(map.len(), 3);
        assert_eq!(map.revive(&"b"), None);
        assert_eq!(map.revive(&"a"), Some(10));
        assert_eq!(map.revive(&"a"), None, "revived once");
        map.retire("e", 5);
        map.retire("f", 6);
        assert_eq!(map.len(), 3);
        assert_eq!(map.revive(&"c"), None);
        assert_eq!(
            ["d", "e", "f"].map(|k| map.revive(&k)),
            [Some(4), Some(5), Some(6)]
        );
        assert_eq!(map.order.len(), 0, "no stale order entries");
    }
}
