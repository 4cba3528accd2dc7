//! Passive outlier detection: connect failures in a row eject an endpoint
//! for a backed-off, jittered time; successes reset the streak and
//! shorten the next ejection.

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use super::cluster::ClusterState;
use crate::config::ClusterSpec;
use crate::gateway::balancer;
use crate::gateway::clock::{self, Instant};
use crate::gateway::stats::inc;

/// Cap on the exponent of the ejection backoff.
const MAX_EJECTION_DOUBLINGS: u32 = 16;

impl ClusterState {
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
        // Warn: an endpoint failing connects is what an operator must look
        // at; the backoff bounds the lines to one per ejection time.
        tracing::warn!(
            cluster = %spec.name, endpoint = %endpoint.address, ejection_ms = ejection.as_millis(),
            "endpoint ejected after {failures} consecutive connect failures — is it listening, \
             and reachable from the gateway? Its traffic goes to the cluster's other endpoints meanwhile"
        );
    }

    /// Records a successful connect and its latency.
    pub(super) fn record_success(&self, index: usize, latency: Duration, now: Instant) {
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
}
