//! The table of variables, the parsers and README's configuration table.

use super::*;
use crate::config::DbTimeouts;
use crate::config::test_support::{TempFile, settings};
use secrecy::ExposeSecret;
use std::time::Duration;

#[test]
fn env_vars_are_the_one_table_of_defaults_ranges_and_docs() {
    let defaults = settings(&[]).unwrap();
    // Numeric defaults parse and sit inside their ranges.
    for v in ENV_VARS {
        if let (Some((lo, hi)), Ok(d)) = (v.range, v.default.parse::<i128>()) {
            assert!((lo..=hi).contains(&d), "{}", v.name);
        }
    }
    // The parser uses the table: the bounds are accepted, one past them refused.
    for v in ENV_VARS.iter().filter(|v| v.range.is_some()) {
        let (lo, hi) = v.range.unwrap();
        for ok in [lo, hi] {
            if v.name == "ETL_BROKER_CONSUMER_TIMEOUT_SECS" && ok == lo {
                continue; // below every chunk's worst case: refused by the cross-check
            }
            let text = ok.to_string();
            let r = settings(&[(v.name, text.as_str())]);
            let cross = r.as_ref().err().map(|e| e.to_string()).unwrap_or_default();
            // Another variable's cross-check may refuse an extreme value; the range
            // check itself never does.
            assert!(
                !cross.starts_with(&format!("{}: {ok} is out of range", v.name)),
                "{cross}"
            );
        }
        for bad in [lo - 1, hi + 1] {
            let text = bad.to_string();
            let e = settings(&[(v.name, text.as_str())])
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(v.name), "{e}");
        }
    }
    assert_eq!(
        defaults.db_timeouts.statement,
        DbTimeouts::default().statement
    );
    assert_eq!(defaults.db_timeouts.lock, DbTimeouts::default().lock);
    assert_eq!(
        defaults.db_timeouts.idle_in_transaction,
        DbTimeouts::default().idle_in_transaction
    );
    assert_eq!(defaults.db_timeouts.acquire, DbTimeouts::default().acquire);
    let help = env_help();
    for v in ENV_VARS {
        assert!(help.contains(v.name), "{}", v.name);
    }
}

#[test]
fn readme_documents_every_variable_with_the_same_default() {
    let readme = include_str!("../../../README.md");
    for v in ENV_VARS {
        let row = readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{}` |", v.name)))
            .unwrap_or_else(|| panic!("README's configuration table has no row for {}", v.name));
        if let (Some((lo, hi)), true) = (v.range, v.default.parse::<i128>().is_ok()) {
            assert!(
                row.contains(&format!("| `{}` |", v.default)),
                "README's default for {} differs from ENV_VARS ({}): {row}",
                v.name,
                v.default
            );
            assert!(
                row.contains(&format!("{lo}–{hi}")),
                "README's range for {} is not {lo}–{hi}: {row}",
                v.name
            );
        }
    }
}

#[test]
fn bad_numbers_name_the_variable() {
    let err = settings(&[("ETL_BATCH_SIZE_LOANS", "lots")]).unwrap_err();
    assert!(err.to_string().starts_with("ETL_BATCH_SIZE_LOANS"), "{err}");
    assert!(settings(&[("ETL_BATCH_SIZE_LOANS", "0")]).is_err());
    assert!(settings(&[("ETL_QUEUE_PREFIX", "a b")]).is_err());
}

#[test]
fn key_file_is_read_and_trimmed() {
    let path = std::env::temp_dir().join(format!("loansync-key-{}", uuid::Uuid::new_v4()));
    std::fs::write(&path, "s3cret\n").unwrap();
    let s = settings(&[("ANALYTICS_API_KEY_FILE", path.to_str().unwrap())]).unwrap();
    assert_eq!(s.api().unwrap().key.expose_secret(), "s3cret");
    std::fs::remove_file(path).unwrap();
}

#[test]
fn url_files_are_read_and_trimmed_when_the_plain_variable_is_unset() {
    let db = TempFile::new("  postgres://app:hunter2@db:5432/lending\n");
    let mq = TempFile::new("amqp://loansync:hunter2@mq:5672/%2f\n\n");
    let s = settings(&[
        ("DATABASE_URL_FILE", db.path()),
        ("AMQP_URL_FILE", mq.path()),
    ])
    .unwrap();
    assert_eq!(
        s.database_url.expose_secret(),
        "postgres://app:hunter2@db:5432/lending"
    );
    assert_eq!(
        s.amqp_url.expose_secret(),
        "amqp://loansync:hunter2@mq:5672/%2f"
    );
    assert!(!format!("{s:?}").contains("hunter2"));
    // The plain variable wins over the file.
    let s = settings(&[
        ("DATABASE_URL", "postgres://u@plain/x"),
        ("DATABASE_URL_FILE", db.path()),
        ("AMQP_URL", "amqp://guest@plain:5672/%2f"),
        ("AMQP_URL_FILE", mq.path()),
    ])
    .unwrap();
    assert_eq!(s.database_url.expose_secret(), "postgres://u@plain/x");
    assert_eq!(s.amqp_url.expose_secret(), "amqp://guest@plain:5672/%2f");
}

#[test]
fn unreadable_empty_or_invalid_url_files_name_the_variable_without_the_secret() {
    let empty = TempFile::new(" \n\t\n");
    let bad_db = TempFile::new("mysql://u:hunter2@db/x\n");
    let bad_mq = TempFile::new("http://guest:hunter2@h:5672\n");
    let dir = std::env::temp_dir();
    for var in [
        "DATABASE_URL_FILE",
        "AMQP_URL_FILE",
        "ANALYTICS_API_KEY_FILE",
    ] {
        for (path, what) in [
            ("/nonexistent/loansync/secret", "cannot read /nonexistent"),
            (empty.path(), "is empty"),
            (dir.to_str().unwrap(), "cannot read"),
        ] {
            let err = settings(&[(var, path)]).unwrap_err().to_string();
            assert!(err.starts_with(&format!("{var}: ")), "{var}={path}: {err}");
            assert!(err.contains(what), "{var}={path}: {err}");
        }
    }
    for (var, file) in [("DATABASE_URL_FILE", &bad_db), ("AMQP_URL_FILE", &bad_mq)] {
        let err = settings(&[(var, file.path())]).unwrap_err().to_string();
        assert!(err.starts_with(&format!("{var}: ")), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}

/// Zero is accepted where it means something, and the bounds themselves are in range.
#[test]
fn zero_and_the_bounds_are_accepted_where_they_mean_something() {
    let s = settings(&[
        ("ETL_RETRY_MAX_ELAPSED_SECS", "0"),
        ("ETL_DB_OUTAGE_WAIT_SECS", "0"),
        ("ETL_INCREMENTAL_OVERLAP_SECS", "0"),
        ("ETL_SHUTDOWN_GRACE_SECS", "0"),
        ("ETL_DEFAULT_LOOKBACK_DAYS", "36500"),
        ("ETL_WORKER_CONCURRENCY", "256"),
        ("ETL_BATCH_SIZE_LOANS", "10000"),
        ("ETL_DB_POOL_SIZE", " 2 "),
        ("METRICS_ADDR", ""),
        ("ANALYTICS_GZIP", "TRUE"),
    ])
    .unwrap();
    assert_eq!(s.api().unwrap().retry.max_elapsed, Duration::ZERO);
    assert_eq!(s.db_outage_wait, Duration::ZERO);
    assert_eq!(s.incremental_overlap, chrono::Duration::zero());
    assert_eq!(s.shutdown_grace, Duration::ZERO);
    assert_eq!(s.default_lookback, chrono::Duration::days(36500));
    assert_eq!(s.worker_concurrency, 256);
    assert_eq!(s.db_pool_size, 2);
    assert_eq!(s.metrics_addr, None);
    assert!(s.api().unwrap().gzip);
    // The largest lookback, from today, is still a date.
    assert!(
        chrono::Utc::now()
            .checked_sub_signed(s.default_lookback)
            .is_some()
    );
}
