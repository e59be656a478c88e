//! The router's one clock. Every timer that decides behaviour (pacing windows, token and key
//! lifetimes, backoff, Retry-After, session expiry, idle passivation, snapshot batching) reads
//! time here, never `std::time::Instant::now()` or `SystemTime::now()` directly.
//!
//! It is tokio's clock: in production the same as the system's monotonic clock; in a test whose
//! runtime is paused (`tokio::time::pause`, `#[tokio::test(start_paused = true)]`) it is virtual,
//! and `tokio::time::advance` moves monotonic and wall time together, so an in-process router
//! waits out a 60 s window without the test waiting for it.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use tokio::time::Instant;

/// Monotonic now.
pub fn now() -> Instant {
    Instant::now()
}

/// Wall-clock now, moved by the same virtual time as [`now`] under a paused test runtime.
pub fn system_now() -> SystemTime {
    let (wall, monotonic) = *anchor();
    let now = now().into_std();
    match now.checked_duration_since(monotonic) {
        Some(ahead) => wall + ahead,
        None => wall - monotonic.duration_since(now),
    }
}

/// Seconds since the Unix epoch (JWT `exp`/`nbf`, record timestamps).
pub fn unix_secs() -> u64 {
    since_epoch().as_secs()
}

/// Milliseconds since the Unix epoch.
pub fn unix_millis() -> u64 {
    u64::try_from(since_epoch().as_millis()).unwrap_or(u64::MAX)
}

fn since_epoch() -> Duration {
    system_now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
}

/// The same clock for governor's rate limiters (which otherwise keep a clock of their own).
#[derive(Debug, Clone, Copy, Default)]
pub struct RouterClock;

impl governor::clock::Clock for RouterClock {
    type Instant = std::time::Instant;

    fn now(&self) -> std::time::Instant {
        now().into_std()
    }
}

/// A direct (unkeyed) rate limiter on the router's clock.
pub type DirectRateLimiter = governor::RateLimiter<
    governor::state::NotKeyed,
    governor::state::InMemoryState,
    RouterClock,
    governor::middleware::NoOpMiddleware<std::time::Instant>,
>;

/// One reading of both clocks, taken once per process: wall time is derived from it so that it
/// follows tokio's (possibly virtual) monotonic clock.
fn anchor() -> &'static (SystemTime, std::time::Instant) {
    static ANCHOR: OnceLock<(SystemTime, std::time::Instant)> = OnceLock::new();
    ANCHOR.get_or_init(|| (SystemTime::now(), std::time::Instant::now()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wall_time_follows_virtual_time() {
        let wall = unix_millis();
        let mono = now();
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(now() - mono, Duration::from_secs(3600));
        let moved = unix_millis() - wall;
        assert!((3_600_000..3_600_050).contains(&moved), "{moved}");
    }

    #[test]
    fn wall_time_is_the_systems_outside_a_paused_runtime() {
        let ours = unix_millis();
        let system = u64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0),
        )
        .unwrap_or(0);
        assert!(ours.abs_diff(system) < 1_000, "{ours} vs {system}");
    }
}
