//! Copies of a cluster's and its endpoints' counters, as `stats_json`
//! serializes them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use super::cluster::ClusterState;
use crate::config::{ClusterSpec, EndpointSpec};
use crate::gateway::clock;
use crate::gateway::stats::HistogramSnapshot;

impl ClusterState {
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
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
