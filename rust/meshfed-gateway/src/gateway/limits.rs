//! Token-bucket rate limits on new connections, per route and per caller
//! SPIFFE ID, with their state carried across `apply()` by route key.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use super::clock::{self, Instant};
use super::stats::RouteStats;
use crate::config::RateLimitSpec;

/// Most distinct callers tracked per route; beyond it, full (idle) buckets
/// are forgotten first, so memory stays bounded under identity churn.
const MAX_SOURCES: usize = 10_000;

/// A token bucket's mutable part: tokens left and when they were counted.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(spec: &RateLimitSpec, now: Instant) -> Self {
        Self {
            tokens: spec.burst,
            at: now,
        }
    }

    /// Tokens available at `now`, never above the burst.
    fn available(&self, spec: &RateLimitSpec, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.tokens + elapsed * spec.per_second).min(spec.burst)
    }

    /// Takes one token if there is one. A refusal leaves the bucket as it
    /// was: recounting from the last admission, not from every refused
    /// attempt, keeps the refill from drifting by rounding under a flood.
    fn take(&mut self, spec: &RateLimitSpec, now: Instant) -> bool {
        let tokens = self.available(spec, now);
        if tokens >= 1.0 {
            self.tokens = tokens - 1.0;
            self.at = now;
            true
        } else {
            false
        }
    }

    fn is_full(&self, spec: &RateLimitSpec, now: Instant) -> bool {
        self.available(spec, now) >= spec.burst
    }
}

/// State of one route: its buckets and counters.
#[derive(Debug, Default)]
pub(crate) struct RouteState {
    route: Mutex<Option<Bucket>>,
    sources: Mutex<HashMap<String, Bucket>>,
    pub(crate) stats: RouteStats,
}

impl RouteState {
    /// Drops the buckets of a route that left the config: its counters are
    /// kept a while (see `retired`), its per-caller buckets, up to
    /// thousands, need not be. Back in a config, it starts full, as a new
    /// route does.
    pub(crate) fn forget_buckets(&self) {
        *self.route.lock().unwrap_or_else(PoisonError::into_inner) = None;
        self.sources
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// One connection against the route-wide bucket, now.
    pub(crate) fn admit(&self, spec: &RateLimitSpec) -> bool {
        let now = clock::now();
        let mut bucket = self.route.lock().unwrap_or_else(PoisonError::into_inner);
        bucket
            .get_or_insert_with(|| Bucket::full(spec, now))
            .take(spec, now)
    }

    /// One connection from `caller` against its own bucket, now.
    pub(crate) fn admit_source(&self, spec: &RateLimitSpec, caller: &str) -> bool {
        let now = clock::now();
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(bucket) = sources.get_mut(caller) {
            return bucket.take(spec, now);
        }
        if sources.len() >= MAX_SOURCES {
            sources.retain(|_, b| !b.is_full(spec, now));
            if sources.len() >= MAX_SOURCES {
                sources.clear();
            }
        }
        let mut bucket = Bucket::full(spec, now);
        let admitted = bucket.take(spec, now);
        sources.insert(caller.to_owned(), bucket);
        admitted
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn bucket_allows_burst_then_refills() {
        let spec = RateLimitSpec {
            per_second: 10.0,
            burst: 3.0,
        };
        let start = Instant::now();
        let mut bucket = Bucket::full(&spec, start);
        assert!((0..3).all(|_| bucket.take(&spec, start)));
        assert!(!bucket.take(&spec, start));
        assert!(bucket.take(&spec, start + Duration::from_millis(100)));
        assert!(!bucket.take(&spec, start + Duration::from_millis(100)));
        // Never above the burst, however long idle.
        let later = start + Duration::from_secs(60);
        assert!((0..3).all(|_| bucket.take(&spec, later)));
        assert!(!bucket.take(&spec, later));
    }

    #[test]
    fn callers_have_separate_buckets() {
        let spec = RateLimitSpec {
            per_second: 0.001,
            burst: 1.0,
        };
        let state = RouteState::default();
        assert!(state.admit_source(&spec, "spiffe://a/x"));
        assert!(!state.admit_source(&spec, "spiffe://a/x"));
        assert!(state.admit_source(&spec, "spiffe://a/y"));
    }

    /// `n` admissions in a row against the route-wide bucket, now.
    fn admitted(state: &RouteState, spec: &RateLimitSpec, n: usize) -> usize {
        (0..n).filter(|_| state.admit(spec)).count()
    }

    /// The data plane's buckets refill from tokio's clock at exactly the
    /// configured rate: a token is back after 1/rate and not a millisecond
    /// sooner, and idling never banks more than the burst.
    #[tokio::test(start_paused = true)]
    async fn route_bucket_refills_at_its_rate_on_the_data_plane_clock() {
        let spec = RateLimitSpec {
            per_second: 10.0,
            burst: 2.0,
        };
        let state = RouteState::default();
        assert_eq!(admitted(&state, &spec, 3), 2, "the burst, then nothing");
        tokio::time::advance(Duration::from_millis(99)).await;
        assert_eq!(admitted(&state, &spec, 1), 0, "refilled before 1/rate");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(admitted(&state, &spec, 2), 1, "one token per 100 ms");
        // Refused attempts in between do not slow the refill down.
        for _ in 0..5 {
            tokio::time::advance(Duration::from_millis(19)).await;
            assert_eq!(admitted(&state, &spec, 1), 0);
        }
        tokio::time::advance(Duration::from_millis(5)).await;
        assert_eq!(admitted(&state, &spec, 2), 1);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(admitted(&state, &spec, 5), 2, "capped at the burst");
    }

    #[tokio::test(start_paused = true)]
    async fn caller_bucket_refills_at_its_rate_on_the_data_plane_clock() {
        let spec = RateLimitSpec {
            per_second: 2.0,
            burst: 1.0,
        };
        let state = RouteState::default();
        let caller = "spiffe://west.mesh/sa/client";
        assert!(state.admit_source(&spec, caller));
        assert!(!state.admit_source(&spec, caller));
        tokio::time::advance(Duration::from_millis(499)).await;
        assert!(!state.admit_source(&spec, caller), "refilled before 1/rate");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(state.admit_source(&spec, caller), "one token per 500 ms");
        assert!(!state.admit_source(&spec, caller));
    }
}
