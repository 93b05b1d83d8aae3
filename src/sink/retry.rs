//! The retry policy: exponential backoff with jitter, with the server's `Retry-After`
//! honoured (capped at the largest interval), inside the one deadline of a chunk.

use crate::config::RetrySettings;
use backon::ExponentialBuilder;
use std::time::{Duration, SystemTime};

/// The backoff between attempts of one request body. It never ends by itself: the
/// chunk's deadline does (see [`next_delay`]).
pub fn policy(s: &RetrySettings) -> ExponentialBuilder {
    ExponentialBuilder::new()
        .with_min_delay(s.initial)
        .with_max_delay(s.max_interval)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
}

/// Parses `Retry-After` in both of its forms (RFC 9110 §10.2.3): delta-seconds, or an
/// HTTP-date (a date in the past means "now"). Anything else is treated as absent.
pub fn parse_retry_after(value: Option<&str>) -> Option<Duration> {
    parse_retry_after_at(value, SystemTime::now())
}

/// [`parse_retry_after`] as of `now`.
pub fn parse_retry_after_at(value: Option<&str>, now: SystemTime) -> Option<Duration> {
    let v = value?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The delay before the next attempt, or `None` to stop retrying.
///
/// The delay is the backoff's, or the server's wish when it asked for longer (never
/// more than `max_interval`). Retrying stops when the backoff is spent (`None`) or when
/// the delay would not end before the chunk's deadline, `left` from now: the attempt
/// after it could not start in time, so there is no point in waiting for it.
pub fn next_delay(
    backoff: Option<Duration>,
    retry_after: Option<Duration>,
    max_interval: Duration,
    left: Duration,
) -> Option<Duration> {
    let d = backoff?;
    let d = retry_after.map_or(d, |ra| d.max(ra.min(max_interval)));
    (d < left).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOTS: Duration = Duration::from_secs(3600);

    #[test]
    fn retry_after_in_seconds() {
        assert_eq!(parse_retry_after(Some(" 3 ")), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after(Some("0")), Some(Duration::ZERO));
        assert_eq!(parse_retry_after(None), None);
    }

    #[test]
    fn retry_after_as_an_http_date() {
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:28:00 GMT").unwrap();
        // In the future: the time until then.
        assert_eq!(
            parse_retry_after_at(Some("Wed, 21 Oct 2015 07:28:42 GMT"), now),
            Some(Duration::from_secs(42))
        );
        // The obsolete RFC 850 and asctime forms are HTTP-dates too.
        assert_eq!(
            parse_retry_after_at(Some("Wednesday, 21-Oct-15 07:29:00 GMT"), now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after_at(Some("Wed Oct 21 07:28:05 2015"), now),
            Some(Duration::from_secs(5))
        );
        // In the past: retry now (the backoff still applies, see next_delay).
        assert_eq!(
            parse_retry_after_at(Some("Tue, 20 Oct 2015 07:28:00 GMT"), now),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn garbage_retry_after_is_absent() {
        for v in [
            "",
            "soon",
            "-1",
            "1.5",
            "18446744073709551616",
            "Wed, 32 Oct 2015 07:28:00 GMT",
            "Wed, 21 Oct 2015 07:28:00",
        ] {
            assert_eq!(parse_retry_after(Some(v)), None, "{v:?}");
        }
    }

    #[test]
    fn retry_after_is_honoured_but_capped_and_never_revives_a_spent_backoff() {
        let cap = Duration::from_secs(30);
        let b = Some(Duration::from_millis(500));
        assert_eq!(
            next_delay(b, Some(Duration::from_secs(2)), cap, LOTS),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            next_delay(b, Some(Duration::from_secs(3600)), cap, LOTS),
            Some(cap)
        );
        assert_eq!(next_delay(b, None, cap, LOTS), b);
        // A date in the past does not make the retry come sooner than the backoff.
        assert_eq!(next_delay(b, Some(Duration::ZERO), cap, LOTS), b);
        assert_eq!(
            next_delay(None, Some(Duration::from_secs(1)), cap, LOTS),
            None
        );
    }

    #[test]
    fn the_deadline_ends_the_retries_and_counts_retry_after() {
        let cap = Duration::from_secs(30);
        let b = Some(Duration::from_millis(500));
        let left = Duration::from_secs(2);
        assert_eq!(next_delay(b, None, cap, left), b);
        assert_eq!(
            next_delay(b, Some(Duration::from_secs(1)), cap, left),
            Some(Duration::from_secs(1))
        );
        // The server asks for longer than the chunk has left: stop now.
        assert_eq!(next_delay(b, Some(Duration::from_secs(2)), cap, left), None);
        assert_eq!(next_delay(b, None, cap, Duration::from_millis(500)), None);
        assert_eq!(next_delay(b, None, cap, Duration::ZERO), None);
    }

    #[test]
    fn the_backoff_grows_to_its_cap_and_does_not_end_by_itself() {
        use backon::BackoffBuilder;
        let s = RetrySettings {
            initial: Duration::from_millis(100),
            max_interval: Duration::from_millis(400),
            max_elapsed: Duration::from_secs(2),
        };
        let delays: Vec<Duration> = policy(&s).build().take(50).collect();
        assert_eq!(delays.len(), 50);
        assert!(
            delays.iter().all(|d| *d <= Duration::from_millis(800)),
            "{delays:?}"
        );
    }
}
