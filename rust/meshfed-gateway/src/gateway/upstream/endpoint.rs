//! What is known about one endpoint, carried across `apply()` by endpoint
//! key: its health (ejection, health checks), its peak-EWMA latency
//! estimate and its counters.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::config::EndpointSpec;
use crate::gateway::clock::{self, Instant};
use crate::spiffe::SpiffeId;

/// Decay time constant of the peak EWMA (linkerd2-proxy uses 10 s).
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// Starting latency estimate of an endpoint never connected to.
const EWMA_DEFAULT_US: f64 = 1_000.0;
/// Everything known about one endpoint, carried across `apply()` by
/// endpoint key (cluster name + address + pinned peer identity).
#[derive(Debug)]
pub(crate) struct EndpointState {
    pub(crate) address: SocketAddr,
    /// The SPIFFE ID pinned for mTLS to this endpoint, if any: part of its key.
    pub(super) peer: Option<SpiffeId>,
    pub(super) active: AtomicU64,
    pub(super) consecutive_failures: AtomicU32,
    /// The instant (in `clock` nanoseconds) until which the endpoint is
    /// ejected; 0 when not.
    pub(super) ejected_until: AtomicU64,
    /// Ejections in a row; doubles the next ejection time.
    pub(super) ejection_multiplier: AtomicU32,
    /// Verdict of active health checks (true when none run).
    pub(crate) check_healthy: AtomicBool,
    /// Smooth WRR running weight (under the cluster's `wrr` lock).
    pub(super) wrr_current: AtomicI64,
    /// Peak EWMA of connect latency: (estimate in µs, last update).
    pub(super) ewma: Mutex<(f64, Instant)>,
    pub(super) connections: AtomicU64,
    pub(super) connect_failures: AtomicU64,
    pub(super) ejections: AtomicU64,
}

impl EndpointState {
    pub(super) fn new(spec: &EndpointSpec) -> Self {
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

    pub(super) fn key(&self) -> String {
        endpoint_key(self.address, self.peer.as_ref())
    }

    pub(super) fn ejected(&self, now: Instant) -> bool {
        clock::to_nanos(now) < self.ejected_until.load(Ordering::Relaxed)
    }

    /// Not ejected by outlier detection and not failed by health checks.
    pub(crate) fn healthy(&self, now: Instant) -> bool {
        !self.ejected(now) && self.check_healthy.load(Ordering::Relaxed)
    }

    pub(super) fn ewma_us(&self, now: Instant) -> f64 {
        let (value, at) = *self.ewma.lock().unwrap_or_else(PoisonError::into_inner);
        // Decay toward zero while idle, so a once-slow endpoint is retried.
        let idle = now.saturating_duration_since(at).as_secs_f64();
        value * (-idle / EWMA_DECAY.as_secs_f64()).exp()
    }

    /// Peak EWMA: a slower sample replaces the estimate at once, faster
    /// ones pull it down smoothly.
    pub(super) fn observe(&self, rtt: Duration, now: Instant) {
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

/// `ip:port`, with the pinned peer after a space when there is one: an endpoint's key, unique
/// within a cluster (stats, Maglev names).
pub(super) fn endpoint_key(address: SocketAddr, peer: Option<&SpiffeId>) -> String {
    match peer {
        Some(peer) => format!("{address} {peer}"),
        None => address.to_string(),
    }
}
