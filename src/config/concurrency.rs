//! How many requests a worker keeps in flight to the analytics API: the mode (fixed or
//! adaptive), the adaptive limit's ceiling, the fleet-wide cap and the heartbeat that
//! shares it among the live workers.

use super::env::{Lookup, num_env};
use super::{ConfigError, invalid};
use crate::sink::gate::ConcurrencyMode;
use std::time::Duration;

/// A worker's concurrency settings.
#[derive(Debug, Clone)]
pub struct ConcurrencySettings {
    /// `ETL_WORKER_CONCURRENCY_MODE`: `fixed` (the default) or `adaptive`.
    pub mode: ConcurrencyMode,
    /// The adaptive limit's ceiling (`ETL_WORKER_MAX_CONCURRENCY`).
    pub max: u16,
    /// Requests in flight to the API across every worker, shared among the live ones
    /// (`ANALYTICS_MAX_IN_FLIGHT`; `None` for 0: no cap).
    pub fleet_cap: Option<u32>,
    /// How often a worker records itself live (`ETL_WORKER_HEARTBEAT_SECS`); one silent
    /// for [`ConcurrencySettings::heartbeat_ttl`] is gone and its share freed.
    pub heartbeat: Duration,
}

impl ConcurrencySettings {
    /// Three heartbeats.
    pub fn heartbeat_ttl(&self) -> Duration {
        self.heartbeat * 3
    }
}

/// Reads the concurrency settings.
pub(super) fn read(get: &Lookup) -> Result<ConcurrencySettings, ConfigError> {
    let mode = match get("ETL_WORKER_CONCURRENCY_MODE")?
        .as_deref()
        .map(str::trim)
    {
        None | Some("fixed") => ConcurrencyMode::Fixed,
        Some("adaptive") => ConcurrencyMode::Adaptive,
        Some(other) => {
            return Err(invalid(
                "ETL_WORKER_CONCURRENCY_MODE",
                format!("{other:?}: use fixed or adaptive"),
            ));
        }
    };
    let cap: u32 = num_env(get, "ANALYTICS_MAX_IN_FLIGHT")?;
    Ok(ConcurrencySettings {
        mode,
        max: num_env(get, "ETL_WORKER_MAX_CONCURRENCY")?,
        fleet_cap: (cap > 0).then_some(cap),
        heartbeat: Duration::from_secs(num_env(get, "ETL_WORKER_HEARTBEAT_SECS")?),
    })
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::settings;
    use crate::sink::gate::ConcurrencyMode;
    use std::time::Duration;

    #[test]
    fn fixed_by_default_and_adaptive_takes_its_ceiling_as_prefetch() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.concurrency.mode, ConcurrencyMode::Fixed);
        assert_eq!(s.concurrency.fleet_cap, None);
        assert_eq!(s.worker_prefetch(), 4);
        assert_eq!(s.db_pool_size, 6);
        let s = settings(&[
            ("ETL_WORKER_CONCURRENCY_MODE", "adaptive"),
            ("ETL_WORKER_MAX_CONCURRENCY", "24"),
            ("ANALYTICS_MAX_IN_FLIGHT", "16"),
            ("ETL_WORKER_HEARTBEAT_SECS", "2"),
        ])
        .unwrap();
        assert_eq!(s.concurrency.mode, ConcurrencyMode::Adaptive);
        // Chunks in flight (the prefetch) are the ceiling: the gate limits the requests.
        // A chunk waiting for a slot holds no connection: the pool stays as it was.
        assert_eq!(s.worker_prefetch(), 24);
        assert_eq!(s.db_pool_size, 6);
        assert_eq!(s.concurrency.fleet_cap, Some(16));
        assert_eq!(s.concurrency.heartbeat_ttl(), Duration::from_secs(6));
    }

    #[test]
    fn a_bad_mode_is_refused_naming_the_variable() {
        let err = settings(&[("ETL_WORKER_CONCURRENCY_MODE", "auto")]).unwrap_err();
        assert!(
            err.to_string().contains("ETL_WORKER_CONCURRENCY_MODE"),
            "{err}"
        );
        let err = settings(&[("ETL_WORKER_MAX_CONCURRENCY", "0")]).unwrap_err();
        assert!(
            err.to_string().contains("ETL_WORKER_MAX_CONCURRENCY"),
            "{err}"
        );
    }
}
