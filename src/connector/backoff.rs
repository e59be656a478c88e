//! Retry timing: exponential backoff with full jitter, and the server's `Retry-After` hint
//! honoured but clamped.

use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    pub max_retry_after: Duration,
}

impl Backoff {
    /// The wait before retry number `retry` (0 for the first retry). A `Retry-After` hint wins
    /// over the computed backoff, up to `max_retry_after`.
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(hint) = retry_after {
            return hint.min(self.max_retry_after);
        }
        let ceiling = self
            .base
            .saturating_mul(1u32.checked_shl(retry.min(16)).unwrap_or(u32::MAX))
            .min(self.max);
        // Full jitter, but never less than half the step, so retries do not stampede at zero.
        let half = ceiling / 2;
        half + ceiling.saturating_sub(half).mul_f64(rand::random::<f64>())
    }
}

/// Parses `Retry-After`: delta-seconds or an HTTP-date.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(crate::clock::system_now())
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: Backoff = Backoff {
        base: Duration::from_millis(100),
        max: Duration::from_secs(2),
        max_retry_after: Duration::from_secs(30),
    };

    #[test]
    fn backoff_grows_and_is_capped() {
        for retry in 0..20 {
            let d = POLICY.delay(retry, None);
            let step = Duration::from_millis(100 * 2u64.pow(retry.min(16))).min(POLICY.max);
            assert!(
                d >= step / 2 && d <= step,
                "retry {retry}: {d:?} vs {step:?}"
            );
        }
    }

    #[test]
    fn retry_after_is_honoured_and_clamped() {
        assert_eq!(
            POLICY.delay(3, Some(Duration::from_secs(1))),
            Duration::from_secs(1)
        );
        assert_eq!(
            POLICY.delay(0, Some(Duration::from_secs(3600))),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
