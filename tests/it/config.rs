//! Configuration and secrets: a bad setting stops the binary before it touches anything,
//! the production build has no development API URL or key, transport errors carry no
//! credential, and `seed --reset` cannot empty a real database.

use crate::harness::TestApp;
use crate::harness::{KEY, seeded_db, settings_for, small, stub};
use crate::support::{TestDb, amqp_url};
use loansync::seed::SeedSpec;
use loansync::stub_api::Faults;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

async fn count(pool: &sqlx::PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// `loansync sync --full` with one bad setting exits 1 with `configuration error: VAR: …`,
/// plans no sync and sends nothing; with good settings the same command does sync.
#[tokio::test]
async fn a_bad_setting_stops_sync_before_anything_is_written() {
    let db = seeded_db(small()).await;
    let api = stub(Faults::default()).await;
    let sync = |extra: Option<(&str, &str)>| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_loansync"));
        cmd.arg("sync")
            .arg("--full")
            .env("DATABASE_URL", &db.url)
            .env("AMQP_URL", amqp_url())
            .env("ETL_QUEUE_PREFIX", db.queue_prefix())
            .env("ANALYTICS_API_URL", api.url())
            .env("ANALYTICS_API_KEY", KEY)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true);
        if let Some((k, v)) = extra {
            cmd.env(k, v);
        }
        cmd.output()
    };
    for (name, value) in [
        ("ETL_HTTP_TIMEOUT_SECS", "0"),
        ("ETL_DEFAULT_LOOKBACK_DAYS", "99999999999999"),
        ("ETL_INCREMENTAL_OVERLAP_SECS", "-120"),
        ("ETL_WORKER_CONCURRENCY", "lots"),
        ("ETL_BATCH_SIZE_LOANS", ""),
        ("ETL_DB_POOL_SIZE", "0"),
        ("ANALYTICS_API_URL", "http://stub:8088"),
        (
            "DATABASE_URL",
            "host=127.0.0.1 user=postgres password=hunter2",
        ),
    ] {
        let out = sync(Some((name, value))).await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}={value:?}: {stderr}");
        assert!(
            stderr.contains(&format!("configuration error: {name}: ")),
            "{name}={value:?}: {stderr}"
        );
        assert!(!stderr.contains("hunter2"), "{stderr}");
    }
    let history = || count(&db.pool, "SELECT count(*) FROM etl_folder_etlsynchistory");
    assert_eq!(history().await, 0, "a refused configuration planned a sync");
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM loansync_sync").await,
        0
    );
    assert_eq!(
        api.received().statuses.values().sum::<u64>(),
        0,
        "a refused configuration sent requests"
    );

    // The same command with good settings does write a history row.
    let out = sync(None).await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(history().await, 1);
}

/// The production image's binary (`cargo build --no-default-features`), built once per
/// test process into `<target>/no-dev-tools/<profile>/loansync`.
///
/// Cheap because it shares the test build's intermediate artefacts
/// (`CARGO_BUILD_BUILD_DIR` is the test build's target directory): only `fail` (without
/// its fault points) and loansync itself compile again. An example is built beside the
/// binary so that the dev-dependencies' features (tokio's `process`, …) are unified as
/// in the test build; without it every crate depending on tokio would be built anew.
/// Test processes that build at once wait for each other on cargo's own lock.
fn production_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            let test_binary = Path::new(env!("CARGO_BIN_EXE_loansync"));
            let profile_dir = test_binary.parent().expect("<target>/<profile>/loansync");
            let target = profile_dir.parent().expect("<target>/<profile>");
            let dir_name = profile_dir.file_name().expect("a profile directory");
            // The dev profile's directory is `debug`; any other profile's is its name.
            let profile = match dir_name.to_str() {
                Some("debug") => "dev",
                Some(other) => other,
                None => panic!("profile directory {profile_dir:?} is not UTF-8"),
            };
            let artifacts = target.join("no-dev-tools");
            let started = std::time::Instant::now();
            let out = std::process::Command::new(env!("CARGO"))
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .args(["build", "--no-default-features", "--locked", "--offline"])
                .args(["--profile", profile, "--bin", "loansync"])
                .args(["--example", "publish_bench"])
                .env("CARGO_TARGET_DIR", &artifacts)
                .env("CARGO_BUILD_BUILD_DIR", target)
                .output()
                .expect("run cargo build --no-default-features");
            assert!(
                out.status.success(),
                "cargo build --no-default-features failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            eprintln!(
                "built the production binary in {:.1}s",
                started.elapsed().as_secs_f64()
            );
            artifacts.join(dir_name).join("loansync")
        })
        .clone()
}

/// Runs the production binary with `args` on `db`, with nothing in its environment but
/// the database, the broker, `env` and a log filter: exit code and stderr.
async fn run_production(
    binary: &Path,
    db: &TestApp,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Option<i32>, String, String) {
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(args)
        .env_clear()
        .env("DATABASE_URL", &db.url)
        .env("AMQP_URL", amqp_url())
        .env("ETL_QUEUE_PREFIX", &db.queue_prefix)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("loansync {args:?} was still running after 60s"))
        .expect("run the production binary");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The production build has no development API URL or key: every command that calls
/// the API refuses to start without them, naming what is missing, before it touches
/// anything; the commands that never call the API run without them, and `check` names
/// them on its `api` line.
#[tokio::test]
async fn the_production_build_refuses_to_call_the_api_without_its_url_and_key() {
    let binary = tokio::task::spawn_blocking(production_binary)
        .await
        .unwrap();
    let db = TestApp::migrated().await;
    let url = ("ANALYTICS_API_URL", "https://analytics.example.com");
    let key = ("ANALYTICS_API_KEY", "production-key");
    for args in [
        &["worker"][..],
        &["sync", "--full"],
        &["errors", "retry", "--in-process"],
        &[
            "resume",
            "00000000-0000-0000-0000-000000000000",
            "--in-process",
        ],
    ] {
        for (env, named, unnamed) in [
            (
                &[][..],
                "ANALYTICS_API_URL and ANALYTICS_API_KEY (or ANALYTICS_API_KEY_FILE) are not set",
                None,
            ),
            (
                &[url][..],
                "ANALYTICS_API_KEY (or ANALYTICS_API_KEY_FILE) is not set",
                Some("ANALYTICS_API_URL"),
            ),
            (
                &[key][..],
                "ANALYTICS_API_URL is not set",
                Some("ANALYTICS_API_KEY"),
            ),
        ] {
            let (code, _, stderr) = run_production(&binary, &db, args, env).await;
            assert_eq!(code, Some(1), "{args:?} {env:?}: {stderr}");
            assert!(
                stderr.starts_with(&format!("loansync: configuration error: {named}")),
                "{args:?} {env:?}: {stderr}"
            );
            assert!(
                stderr.contains(&format!("`loansync {}", args[0])),
                "{args:?}: {stderr}"
            );
            if let Some(unnamed) = unnamed {
                assert!(!stderr.contains(unnamed), "{args:?} {env:?}: {stderr}");
            }
        }
    }
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM loansync_sync").await,
        0,
        "a refused command claimed a sync"
    );

    // With both, the command runs: this database has no source rows, so the sync
    // completes without a request (nothing listens at that address).
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let closed_url = format!("http://127.0.0.1:{closed}");
    let configured = [("ANALYTICS_API_URL", closed_url.as_str()), key];
    let (code, stdout, stderr) =
        run_production(&binary, &db, &["sync", "--full"], &configured).await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");

    // The commands that never call the API need neither.
    for args in [
        &["migrate"][..],
        &["status"],
        &["check", "--skip", "api,broker"],
    ] {
        let (code, stdout, stderr) = run_production(&binary, &db, args, &[]).await;
        assert_eq!(code, Some(0), "{args:?}: {stdout}{stderr}");
    }
    // `check` names them on its `api` line.
    let (code, stdout, _) = run_production(
        &binary,
        &db,
        &["check", "--json", "--skip", "broker"],
        &[url],
    )
    .await;
    assert_eq!(code, Some(1), "{stdout}");
    let checks: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let api = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "api")
        .unwrap();
    assert_eq!(api["result"], "failed", "{stdout}");
    assert!(
        api["detail"]
            .as_str()
            .unwrap()
            .starts_with("ANALYTICS_API_KEY (or ANALYTICS_API_KEY_FILE) is not set"),
        "{stdout}"
    );
}

/// An API URL carrying credentials (user info, `?key=`), at a port nobody listens on:
/// every record fails with `NETWORK_ERROR`, and no error row, history row or summary
/// carries the secrets.
#[tokio::test]
async fn transport_errors_carry_no_credential_from_the_api_url() {
    let db = seeded_db(SeedSpec {
        users: 4,
        customers: 6,
        loans: 6,
        repayments: 10,
        seed: 3,
    })
    .await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!(
        "http://loansync:userinfo-secret@127.0.0.1:{closed}/api?key=query-secret&token=query-secret&page=1"
    );
    let settings = settings_for(&db, &url, &[("ETL_RETRY_MAX_ELAPSED_SECS", "0")]);
    assert!(!format!("{settings:?}").contains("secret"));
    let summary = db.full_sync_in_process(&settings).await;
    assert_eq!(
        summary.exit_code(),
        loansync::app::EXIT_FAILED,
        "{}",
        summary.render()
    );
    assert!(!summary.render().contains("secret"));

    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT row_to_json(e)::text FROM etl_folder_etlsyncerror e ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(!rows.is_empty(), "the records should have failed");
    for row in &rows {
        assert!(row.contains("NETWORK_ERROR"), "{row}");
        assert!(row.contains("could not connect"), "{row}");
        // The URL is named, with its secrets hidden.
        assert!(
            row.contains(&format!("127.0.0.1:{closed}/api/etl/")),
            "{row}"
        );
        assert!(row.contains("key=***"), "{row}");
        assert!(!row.contains("secret"), "{row}");
    }
    let history: Vec<String> =
        sqlx::query_scalar("SELECT row_to_json(h)::text FROM etl_folder_etlsynchistory h")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(history.len(), 1);
    assert!(!history[0].contains("secret"), "{}", history[0]);
}

/// `loansync seed --reset …` on `db`, with a tiny data set.
async fn seed_reset(db: &TestDb, confirm: Option<&str>) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_loansync"));
    cmd.args([
        "seed",
        "--reset",
        "--users",
        "3",
        "--customers",
        "4",
        "--loans",
        "4",
        "--repayments",
        "6",
    ])
    .env("DATABASE_URL", &db.url)
    .env("RUST_LOG", "warn")
    .kill_on_drop(true);
    if let Some(name) = confirm {
        cmd.args(["--confirm-database", name]);
    }
    cmd.output().await.unwrap()
}

async fn insert_real_user(db: &TestDb, id: i32) {
    sqlx::query(
        "INSERT INTO accounts_customuser (id, password, is_superuser, first_name, last_name, \
         is_staff, is_active, email, account_type, kyc_level, referrals_count, is_call_agent, \
         is_call_agent_admin, is_ajo_admin, bucket, pnd, date_joined) \
         VALUES ($1, 'x', false, 'Real', 'Customer', false, true, 'real@example.com', 'REGULAR', \
         0, 0, false, false, false, '{}', false, now())",
    )
    .bind(id)
    .execute(&db.pool)
    .await
    .unwrap();
}

async fn real_user_present(db: &TestDb) -> bool {
    count(
        &db.pool,
        "SELECT count(*) FROM accounts_customuser WHERE email = 'real@example.com'",
    )
    .await
        == 1
}

#[tokio::test]
async fn seed_reset_refuses_a_database_holding_rows_it_did_not_seed() {
    let db = TestApp::with_source_schema().await;

    // A database holding a row the seed did not write: refused, the row stays.
    insert_real_user(&db, 1).await;
    let out = seed_reset(&db, None).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("refusing to empty database"), "{stderr}");
    assert!(
        stderr.contains(&format!("--confirm-database {}", db.name)),
        "{stderr}"
    );
    assert!(real_user_present(&db).await);

    // A confirmation naming another database is refused too.
    let out = seed_reset(&db, Some("some_other_database")).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("does not name the database"), "{stderr}");
    assert!(real_user_present(&db).await);

    // Naming this database proceeds.
    let out = seed_reset(&db, Some(&db.name)).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!real_user_present(&db).await);
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM accounts_customuser").await,
        3
    );

    // A database holding only what the seed wrote is reset again without confirmation.
    let out = seed_reset(&db, None).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM accounts_customuser").await,
        3
    );

    // A real row added to a seeded database is noticed as well.
    insert_real_user(&db, 1000).await;
    let out = seed_reset(&db, None).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("accounts_customuser holds 1 row"),
        "{stderr}"
    );
    assert!(real_user_present(&db).await);
}

#[tokio::test]
async fn seed_reset_of_an_empty_database_needs_no_confirmation() {
    let db = TestApp::with_source_schema().await;
    let out = seed_reset(&db, None).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM loans_ajoloan").await,
        4
    );
}
