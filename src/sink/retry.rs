//! The retry policy: exponential backoff with jitter, bounded by a total budget, with
//! the server's `Retry-After` honoured (capped at the largest interval).

use crate::config::RetrySettings;
use backon::ExponentialBuilder;
use std::time::Duration;

/// The backoff for one request body.
pub fn policy(s: &RetrySettings) -> ExponentialBuilder {
    ExponentialBuilder::new()
        .with_min_delay(s.initial)
        .with_max_delay(s.max_interval)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .with_total_delay(Some(s.max_elapsed))
}

/// Parses `Retry-After` in its seconds form (the HTTP-date form is treated as absent).
pub fn parse_retry_after(value: Option<&str>) -> Option<Duration> {
    let v = value?.trim();
    v.parse::<u64>().ok().map(Duration::from_secs)
}

/// The delay before the next attempt: the server's wish when it gave one (never more
/// than `max_interval`), else the backoff's. `None` (the budget is spent) stays `None`.
pub fn next_delay(
    backoff: Option<Duration>,
    retry_after: Option<Duration>,
    max_interval: Duration,
) -> Option<Duration> {
    let d = backoff?;
    Some(retry_after.map_or(d, |ra| ra.min(max_interval)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_only() {
        assert_eq!(parse_retry_after(Some(" 3 ")), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after(Some("Wed, 21 Oct 2015 07:28:00 GMT")),
            None
        );
        assert_eq!(parse_retry_after(None), None);
    }

    #[test]
    fn retry_after_is_honoured_but_capped_and_never_revives_a_spent_budget() {
        let cap = Duration::from_secs(30);
        let b = Some(Duration::from_millis(500));
        assert_eq!(
            next_delay(b, Some(Duration::from_secs(2)), cap),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            next_delay(b, Some(Duration::from_secs(3600)), cap),
            Some(cap)
        );
        assert_eq!(next_delay(b, None, cap), b);
        assert_eq!(next_delay(None, Some(Duration::from_secs(1)), cap), None);
    }

    #[test]
    fn the_budget_ends_the_retries() {
        use backon::BackoffBuilder;
        let s = RetrySettings {
            initial: Duration::from_millis(100),
            max_interval: Duration::from_millis(400),
            max_elapsed: Duration::from_secs(2),
        };
        let delays: Vec<Duration> = policy(&s).build().collect();
        let total: Duration = delays.iter().sum();
        assert!(!delays.is_empty());
        assert!(
            total <= Duration::from_secs(2) + Duration::from_millis(400),
            "{total:?}"
        );
        assert!(
            delays.iter().all(|d| *d <= Duration::from_millis(800)),
            "{delays:?}"
        );
    }
}
