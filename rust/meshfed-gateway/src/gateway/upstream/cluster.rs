//! A cluster's runtime state in one generation: its endpoints by priority
//! level, and the pick of one by locality failover and the cluster's
//! load-balancing policy; built from the previous generation's state.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::endpoint::{EndpointState, endpoint_key};
use crate::config::{ClusterSpec, Lb};
use crate::gateway::balancer::{self, MAGLEV_TABLE_SIZE};
use crate::gateway::clock::Instant;
use crate::gateway::retired::Retired;
use crate::gateway::stats::Histogram;

/// Cluster-wide state carried across `apply()` by cluster name: breaker
/// gauges, the round-robin cursor, counters and histograms.
#[derive(Debug, Default)]
pub(crate) struct ClusterShared {
    pub(super) cursor: AtomicUsize,
    pub(super) active: AtomicU64,
    pub(super) pending: AtomicU64,
    /// Serializes smooth-WRR updates and ejection decisions.
    pub(super) lock: Mutex<()>,
    pub(super) connections: AtomicU64,
    pub(super) connect_failures: AtomicU64,
    pub(super) circuit_open: AtomicU64,
    pub(super) ejections: AtomicU64,
    pub(crate) bytes_sent: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(super) connect_latency: Histogram,
    pub(super) duration: Histogram,
}

/// One priority level of a cluster.
#[derive(Debug)]
pub(super) struct Level {
    /// Indices into the cluster's endpoints.
    pub(super) members: Vec<usize>,
    /// Maglev table over `members` (entries index into `members`).
    pub(super) maglev: Option<Arc<Vec<u16>>>,
}

/// The runtime state of a cluster in one config generation.
#[derive(Debug)]
pub(crate) struct ClusterState {
    pub(crate) shared: Arc<ClusterShared>,
    pub(crate) endpoints: Vec<Arc<EndpointState>>,
    pub(super) levels: Vec<Level>,
}

/// Carried-over state of every cluster, looked up while building the next
/// one: the previous generation's, else what a removed cluster left.
pub(crate) struct Previous<'a> {
    pub(crate) clusters: &'a HashMap<Arc<str>, Arc<ClusterState>>,
    pub(crate) retired: &'a mut Retired,
}

impl ClusterState {
    /// Builds the state for `spec`, reusing what `previous` knows about the
    /// cluster (by name) and its endpoints (by endpoint key).
    pub(crate) fn build(spec: &ClusterSpec, previous: &mut Previous<'_>) -> Self {
        let old = previous.clusters.get(&*spec.name);
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
                    let key = (spec.name.to_string(), endpoint_key(e.address, e.peer()));
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
            .or_else(|| previous.retired.clusters.revive(&*spec.name))
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
}
