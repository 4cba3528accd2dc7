//! Active TCP health checks: one task per endpoint on the data-plane
//! runtime, flipping the endpoint's `check_healthy` after the configured
//! number of consecutive successes or failures.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use super::balancer;
use super::upstream::{ClusterState, EndpointState};
use crate::config::{ClusterSpec, HealthCheckSpec};

/// The health checks of one cluster, kept across `apply()` while neither
/// the check settings nor the endpoints change.
pub(crate) struct RunningChecks {
    spec: HealthCheckSpec,
    endpoints: Vec<Arc<EndpointState>>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningChecks {
    /// Starts checking every endpoint of `state`.
    pub(crate) fn start(
        handle: &Handle,
        cluster: &ClusterSpec,
        spec: HealthCheckSpec,
        state: &ClusterState,
    ) -> Self {
        let tasks = state
            .endpoints
            .iter()
            .map(|endpoint| {
                handle.spawn(check_loop(
                    cluster.name.to_string(),
                    endpoint.address,
                    endpoint.clone(),
                    spec,
                ))
            })
            .collect();
        Self {
            spec,
            endpoints: state.endpoints.clone(),
            tasks,
        }
    }

    /// Whether these checks already cover `spec` over exactly `state`'s endpoints.
    pub(crate) fn matches(&self, spec: &HealthCheckSpec, state: &ClusterState) -> bool {
        self.spec == *spec
            && self.endpoints.len() == state.endpoints.len()
            && self
                .endpoints
                .iter()
                .zip(&state.endpoints)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }

    /// The check tasks, for tests that a patch kept them running.
    #[cfg(test)]
    pub(crate) fn task_ids(&self) -> Vec<tokio::task::Id> {
        self.tasks.iter().map(JoinHandle::id).collect()
    }

    /// Stops the checks; endpoints no longer checked count as healthy.
    pub(crate) fn stop(self) {
        for task in self.tasks {
            task.abort();
        }
        for endpoint in self.endpoints {
            endpoint.check_healthy.store(true, Ordering::Relaxed);
        }
    }
}

async fn check_loop(
    cluster: String,
    address: SocketAddr,
    endpoint: Arc<EndpointState>,
    spec: HealthCheckSpec,
) {
    let (mut ok_streak, mut fail_streak) = (0u32, 0u32);
    // Spread the first checks over one interval.
    let interval_ms = u64::try_from(spec.interval.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    tokio::time::sleep(Duration::from_millis(balancer::random() % interval_ms)).await;
    loop {
        let ok = matches!(
            tokio::time::timeout(spec.timeout, TcpStream::connect(address)).await,
            Ok(Ok(_))
        );
        if ok {
            ok_streak = ok_streak.saturating_add(1);
            fail_streak = 0;
            if ok_streak >= spec.healthy_threshold
                && !endpoint.check_healthy.swap(true, Ordering::Relaxed)
            {
                tracing::info!(%cluster, endpoint = %address, "health check: endpoint healthy again");
            }
        } else {
            fail_streak = fail_streak.saturating_add(1);
            ok_streak = 0;
            if fail_streak >= spec.unhealthy_threshold
                && endpoint.check_healthy.swap(false, Ordering::Relaxed)
            {
                tracing::warn!(
                    %cluster, endpoint = %address,
                    "health check: endpoint unhealthy after {fail_streak} failed TCP connects — \
                     is it listening, and reachable from the gateway?"
                );
            }
        }
        tokio::time::sleep(spec.interval).await;
    }
}
