//! The data plane's monotonic clock.
//!
//! Every deadline the gateway keeps (outlier ejections, token buckets,
//! idle timeouts, the peak EWMA, connection durations) reads tokio's clock,
//! so a test on a runtime with paused time moves them all with
//! `tokio::time::advance` instead of sleeping. In a build without tokio's
//! `test-util` feature, and outside a runtime, tokio's clock is the system's
//! monotonic clock.
//!
//! State that hot paths read lock-free (an endpoint's ejection deadline, a
//! connection's last activity) keeps instants as nanoseconds since a
//! process-wide epoch, in an `AtomicU64`: exact, unlike milliseconds, so a
//! deadline is neither early nor late by a rounding step.

use std::sync::OnceLock;
use std::time::Duration;

pub(crate) use tokio::time::Instant;

/// How far the epoch lies before the first reading, tried in order (a
/// platform whose clock starts at boot may not go back a day).
///
/// Back-dated because a paused test clock starts at the real time its
/// runtime was built, which may precede the first reading here; an instant
/// before the epoch would read as 0 and swallow the test's advances.
const EPOCH_LEADS: [Duration; 4] = [
    Duration::from_secs(86_400),
    Duration::from_secs(3_600),
    Duration::from_secs(60),
    Duration::from_secs(1),
];

/// A stand-in for "never" where a deadline overflows the clock: a year on.
const FAR_FUTURE: Duration = Duration::from_secs(365 * 86_400);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(|| {
        let now = Instant::now();
        EPOCH_LEADS
            .iter()
            .find_map(|lead| now.checked_sub(*lead))
            .unwrap_or(now)
    })
}

/// The current instant on the data plane's clock.
pub(crate) fn now() -> Instant {
    Instant::now()
}

/// `at` as nanoseconds since the epoch (saturating at both ends).
pub(crate) fn to_nanos(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

/// The current instant as nanoseconds since the epoch.
pub(crate) fn now_nanos() -> u64 {
    to_nanos(now())
}

/// The instant `nanos` after the epoch; a year from now if that overflows.
pub(crate) fn from_nanos(nanos: u64) -> Instant {
    epoch()
        .checked_add(Duration::from_nanos(nanos))
        .unwrap_or_else(|| now() + FAR_FUTURE)
}

/// `duration` in nanoseconds, saturating.
pub(crate) fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn readings_follow_the_paused_clock_exactly() {
        let start = now_nanos();
        tokio::time::advance(Duration::from_nanos(1_500_001)).await;
        assert_eq!(now_nanos() - start, 1_500_001);
        assert_eq!(to_nanos(from_nanos(start)), start);
    }
}
