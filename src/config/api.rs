//! The analytics API's settings: where it is, the key, extra CA certificates, gzip, and
//! how its client retries.

use super::env::{Lookup, boolean, value_or_file};
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

/// The local stub API's address (`loansync stub-api`), a `dev-tools` build's default.
#[cfg(any(test, feature = "dev-tools"))]
pub(super) const DEFAULT_API_URL: &str = "http://127.0.0.1:8088";
/// The key the local stub API accepts by default, a `dev-tools` build's default; never a
/// production secret.
#[cfg(any(test, feature = "dev-tools"))]
pub(super) const DEFAULT_STUB_KEY: &str = "loansync-local-dev-key";

/// What an unset `ANALYTICS_API_URL` and key fall back to.
#[derive(Debug, Clone, Copy)]
pub(super) struct DevDefaults {
    url: &'static str,
    key: &'static str,
}

/// The local stub's URL and key.
#[cfg(any(test, feature = "dev-tools"))]
pub(super) const STUB_DEFAULTS: DevDefaults = DevDefaults {
    url: DEFAULT_API_URL,
    key: DEFAULT_STUB_KEY,
};

/// The local stub's URL and key in a `dev-tools` build, so that README's demo and
/// commands run against `loansync stub-api` with nothing set.
#[cfg(feature = "dev-tools")]
pub(super) const DEV_DEFAULTS: Option<DevDefaults> = Some(STUB_DEFAULTS);
/// None in the production build (`--no-default-features`): no process there ever sends
/// records to a development address or with a development key.
#[cfg(not(feature = "dev-tools"))]
pub(super) const DEV_DEFAULTS: Option<DevDefaults> = None;

/// The API's base URL (`ANALYTICS_API_URL`) and key (`ANALYTICS_API_KEY`, or the file
/// named by `ANALYTICS_API_KEY_FILE`), or `defaults` for what is unset.
///
/// A value set is checked now, whatever the command (the outer error, naming the
/// variable): a key an HTTP header cannot carry, a URL that is not `http(s)://`, plain
/// `http://` to a host that is not loopback without `ANALYTICS_ALLOW_PLAINTEXT`. A URL or
/// key unset with no default is the inner error, [`ConfigError::Unset`]: the settings
/// still load, for the commands that never call the API.
pub(super) fn endpoint(
    g: &Lookup,
    defaults: Option<DevDefaults>,
) -> Result<Result<(url::Url, SecretString), ConfigError>, ConfigError> {
    let key = value_or_file(g, "ANALYTICS_API_KEY", "ANALYTICS_API_KEY_FILE")?
        .map(|(k, _)| k)
        .or_else(|| defaults.map(|d| d.key.to_string()));
    if let Some(key) = &key {
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
    }
    let api_url = g("ANALYTICS_API_URL")?.or_else(|| defaults.map(|d| d.url.to_string()));
    let allow_plaintext = boolean(g, "ANALYTICS_ALLOW_PLAINTEXT", false)?;
    let base_url = api_url
        .map(|u| check_api_url(&u, allow_plaintext).map_err(|e| invalid("ANALYTICS_API_URL", e)))
        .transpose()?;
    Ok(match (base_url, key) {
        (Some(base_url), Some(key)) => Ok((base_url, key.into())),
        (base_url, key) => Err(ConfigError::Unset {
            names: [
                base_url.is_none().then_some("ANALYTICS_API_URL"),
                key.is_none()
                    .then_some("ANALYTICS_API_KEY (or ANALYTICS_API_KEY_FILE)"),
            ]
            .into_iter()
            .flatten()
            .collect(),
        }),
    })
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{TempFile, settings, settings_with};
    use secrecy::ExposeSecret;

    /// A build without `dev-tools` has no default API URL or key: its settings load
    /// without them (for the commands that never call the API), and asking for the API
    /// names exactly what is missing.
    #[test]
    fn without_dev_tools_the_api_url_and_key_have_no_default() {
        let missing = |pairs: &[(&str, &str)]| match settings_with(pairs, None).unwrap().api() {
            Ok(_) => panic!("{pairs:?}: the API is configured"),
            Err(e) => e.to_string(),
        };
        let e = missing(&[]);
        assert!(
            e.starts_with(
                "ANALYTICS_API_URL and ANALYTICS_API_KEY (or ANALYTICS_API_KEY_FILE) are not set"
            ),
            "{e}"
        );
        let e = missing(&[("ANALYTICS_API_URL", "https://analytics.example.com")]);
        assert!(
            e.starts_with("ANALYTICS_API_KEY (or ANALYTICS_API_KEY_FILE) is not set"),
            "{e}"
        );
        assert!(!e.contains("ANALYTICS_API_URL"), "{e}");
        let e = missing(&[("ANALYTICS_API_KEY", "prod-key")]);
        assert!(e.starts_with("ANALYTICS_API_URL is not set"), "{e}");
        assert!(!e.contains("ANALYTICS_API_KEY"), "{e}");

        // Both set (the key from its file too): the API's settings, as set.
        let key = TempFile::new("prod-key\n");
        let s = settings_with(
            &[
                ("ANALYTICS_API_URL", "https://analytics.example.com/"),
                ("ANALYTICS_API_KEY_FILE", key.path()),
            ],
            None,
        )
        .unwrap();
        let api = s.api().unwrap();
        assert_eq!(api.base_url.as_str(), "https://analytics.example.com/");
        assert_eq!(api.key.expose_secret(), "prod-key");

        // A bad value is refused when the settings load, whatever the command.
        for (name, value) in [
            ("ANALYTICS_API_URL", "ftp://analytics.example.com"),
            ("ANALYTICS_API_KEY", "two words"),
        ] {
            let e = settings_with(&[(name, value)], None)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(&format!("{name}: ")), "{e}");
        }
    }

    /// A `dev-tools` build (README's demo and commands) falls back to the local stub.
    #[cfg(feature = "dev-tools")]
    #[test]
    fn a_dev_tools_build_defaults_to_the_local_stub() {
        let s = crate::config::Settings::from_lookup(|_| None).unwrap();
        let api = s.api().unwrap();
        assert_eq!(api.base_url.as_str(), "http://127.0.0.1:8088/");
        assert_eq!(api.key.expose_secret(), super::DEFAULT_STUB_KEY);
    }

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
