//! Connecting to a cluster's endpoints: the circuit breaker, the pick
//! (locality failover and the cluster's policy, in `cluster`), connect
//! retry on another endpoint, and the accounting of an open connection.
//! Endpoint state, outlier detection, dialling and the stats copies each
//! have their own module.

mod cluster;
mod dial;
mod endpoint;
mod outlier;
mod report;
#[cfg(test)]
mod tests;
mod tunnel;

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) use self::cluster::{ClusterShared, ClusterState, Previous};
use self::dial::establish;
pub(crate) use self::dial::{Conveyed, Dial, Upstream};
pub(crate) use self::endpoint::EndpointState;
pub use self::report::{ClusterSnapshot, EndpointSnapshot};
pub(crate) use self::tunnel::Tunnels;
use super::clock::{self, Instant};
use super::stats::inc;
use crate::config::ClusterSpec;

/// Why no upstream connection could be made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    #[error(
        "cluster {cluster:?}: no endpoint reachable (tried {tried}) — are its endpoints up and listening?"
    )]
    Unreachable { cluster: String, tried: String },
    #[error("cluster {cluster:?}: {reason}")]
    Refused { cluster: String, reason: String },
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

/// Connects to an endpoint of `cluster` for a client at `source`: checks the
/// circuit breaker, picks by policy, opens TCP and, where the endpoint asks,
/// mTLS. A refused or timed-out connect, a failed handshake or a peer
/// gateway answering that it cannot open the service is retried on
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
                cluster: spec.name.to_string(),
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
            // The peer gateway refused this caller (denied, rate limited): final for
            // this connection, and not the endpoint's failure — one caller's
            // refusals must not eject a peer for every caller.
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                tracing::debug!(cluster = %spec.name, %address, error = %e, "caller refused by the peer gateway");
                return Err(ConnectError::Refused {
                    cluster: spec.name.to_string(),
                    reason: e.to_string(),
                });
            }
            Err(e) => {
                tracing::debug!(cluster = %spec.name, %address, error = %e, "endpoint connect failed");
                state.record_failure(spec, index, clock::now());
                failures.push(format!("{address}: {e}"));
            }
        }
    }
    Err(ConnectError::Unreachable {
        cluster: spec.name.to_string(),
        tried: failures.join("; "),
    })
}
