//! Token-bucket rate limits on new connections, per route and per caller
//! SPIFFE ID, with their state carried across `apply()` by route key.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

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

    fn refill(&mut self, spec: &RateLimitSpec, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * spec.per_second).min(spec.burst);
        self.at = now;
    }

    /// Takes one token if there is one.
    fn take(&mut self, spec: &RateLimitSpec, now: Instant) -> bool {
        self.refill(spec, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
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
    /// One connection against the route-wide bucket.
    pub(crate) fn admit(&self, spec: &RateLimitSpec) -> bool {
        let now = Instant::now();
        let mut bucket = self.route.lock().unwrap_or_else(PoisonError::into_inner);
        bucket
            .get_or_insert_with(|| Bucket::full(spec, now))
            .take(spec, now)
    }

    /// One connection from `caller` against its own bucket.
    pub(crate) fn admit_source(&self, spec: &RateLimitSpec, caller: &str) -> bool {
        let now = Instant::now();
        let mut sources = self.sources.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(bucket) = sources.get_mut(caller) {
            return bucket.take(spec, now);
        }
        if sources.len() >= MAX_SOURCES {
            sources.retain(|_, b| {
                b.refill(spec, now);
                b.tokens < spec.burst
            });
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
}
