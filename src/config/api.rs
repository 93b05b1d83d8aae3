//! The analytics API's settings: where it is, the key, extra CA certificates, gzip, and
//! how its client retries.

use super::env::{DEFAULT_API_URL, DEFAULT_STUB_KEY, Lookup, boolean, value_or_file};
use super::urls::check_api_url;
use super::{ConfigError, invalid};
use crate::redact::redact_url;
use secrecy::SecretString;
use std::time::Duration;

/// How the analytics client retries transient failures (SPEC.md section 4).
#[derive(Debug, Clone)]
pub struct RetrySettings {
    /// First backoff delay (`ETL_RETRY_INITIAL_MS`).
    pub initial: Duration,
    /// Largest single delay (`ETL_RETRY_MAX_INTERVAL_SECS`).
    pub max_interval: Duration,
    /// The deadline of one chunk in the analytics client, for all its requests: retries,
    /// `Retry-After` waits and the halving of refused batches (`ETL_RETRY_MAX_ELAPSED_SECS`).
    pub max_elapsed: Duration,
}

/// Where and how to reach the analytics API.
#[derive(Clone)]
pub struct ApiSettings {
    /// Base URL, without a trailing slash (`ANALYTICS_API_URL`).
    pub base_url: url::Url,
    /// Bearer key (`ANALYTICS_API_KEY` or the file named by `ANALYTICS_API_KEY_FILE`).
    pub key: SecretString,
    /// Per-request timeout (`ETL_HTTP_TIMEOUT_SECS`).
    pub timeout: Duration,
    /// Extra CA certificates (PEM text, read and checked at start-up from the file named
    /// by `ANALYTICS_CA_FILE`) trusted besides the system roots.
    pub ca_pem: Option<String>,
    /// Gzip request bodies, with `Content-Encoding: gzip` (`ANALYTICS_GZIP`).
    pub gzip: bool,
    pub retry: RetrySettings,
}

impl std::fmt::Debug for ApiSettings {
    /// The URL is printed redacted (it may carry credentials), the key not at all.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiSettings")
            .field("base_url", &redact_url(self.base_url.as_str()))
            .field("key", &self.key)
            .field("timeout", &self.timeout)
            .field("ca_pem", &self.ca_pem.as_ref().map(|_| "<pem>"))
            .field("gzip", &self.gzip)
            .field("retry", &self.retry)
            .finish()
    }
}

/// The API's base URL (`ANALYTICS_API_URL`) and key (`ANALYTICS_API_KEY`, or the file
/// named by `ANALYTICS_API_KEY_FILE`), each checked now: a key an HTTP header cannot
/// carry, or a URL that is not `http(s)://` (plain `http://` to a host that is not
/// loopback only with `ANALYTICS_ALLOW_PLAINTEXT`), is refused naming the variable.
pub(super) fn endpoint(g: &Lookup) -> Result<(url::Url, SecretString), ConfigError> {
    let key = value_or_file(g, "ANALYTICS_API_KEY", "ANALYTICS_API_KEY_FILE")?
        .map(|(k, _)| k)
        .unwrap_or_else(|| DEFAULT_STUB_KEY.to_string());
    if key.is_empty() {
        return Err(invalid("ANALYTICS_API_KEY", "the key is empty"));
    }
    // It travels in an `Authorization` header: refuse what a header cannot carry now,
    // rather than failing every request later. The key itself is never echoed.
    if !key.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(invalid(
            "ANALYTICS_API_KEY",
            "the key holds spaces, control or non-ASCII characters, which an HTTP header cannot carry",
        ));
    }
    let api_url = g("ANALYTICS_API_URL")?.unwrap_or_else(|| DEFAULT_API_URL.into());
    let allow_plaintext = boolean(g, "ANALYTICS_ALLOW_PLAINTEXT", false)?;
    let base_url =
        check_api_url(&api_url, allow_plaintext).map_err(|e| invalid("ANALYTICS_API_URL", e))?;
    Ok((base_url, key.into()))
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::settings;

    #[test]
    fn the_api_url_never_shows_in_debug_with_its_credentials() {
        let s = settings(&[(
            "ANALYTICS_API_URL",
            "https://u:hunter2@api.example.com/v1?key=hunter2",
        )])
        .unwrap();
        let debug = format!("{s:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("api.example.com"), "{debug}");
    }
}
