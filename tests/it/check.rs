//! `loansync check` and `loansync probe`, the real binary against real PostgreSQL,
//! RabbitMQ and the stub API: every check passes on a working installation, and each
//! kind of trouble fails its own check, named, with the exit code 1.

use crate::harness::TestApp;
use crate::harness::{loansync_process, settings_for, stub};
use crate::support::{TestDb, admin_url, amqp_url, run_detached};
use loansync::config::Settings;
use loansync::stub_api::Faults;
use serde_json::Value;
use sqlx::PgPool;

/// What one `loansync check --json` run said.
pub(crate) struct Checked {
    pub(crate) code: Option<i32>,
    checks: Vec<Value>,
    pub(crate) stdout: String,
    stderr: String,
}

impl Checked {
    /// `(result, detail)` of the check `name`.
    fn get(&self, name: &str) -> (&str, &str) {
        let c = self
            .checks
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no check {name} in {}", self.stdout));
        (
            c["result"].as_str().unwrap(),
            c["detail"].as_str().unwrap_or_default(),
        )
    }

    pub(crate) fn result(&self, name: &str) -> &str {
        self.get(name).0
    }

    pub(crate) fn detail(&self, name: &str) -> &str {
        self.get(name).1
    }
}

/// Runs `loansync check --json ARGS` on this test's database, queues and API, with `env`
/// added (a value of `None` removes the variable).
pub(crate) async fn check(
    db: &TestDb,
    settings: &Settings,
    api_url: &str,
    args: &[&str],
    env: &[(&str, Option<&str>)],
) -> Checked {
    let mut cmd = loansync_process(db, settings, api_url);
    cmd.arg("check").arg("--json").args(args);
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd.output().await.expect("run loansync check");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let checks: Vec<Value> = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("not a JSON array ({e}): {stdout}\nstderr: {stderr}"));
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "config",
            "database",
            "pooling",
            "migrations",
            "indexes",
            "schema",
            "window",
            "broker",
            "api"
        ]
    );
    Checked {
        code: out.status.code(),
        checks,
        stdout,
        stderr,
    }
}

/// A loopback port nothing listens on.
async fn closed_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test]
async fn every_check_passes_on_a_working_installation() {
    let db = TestApp::migrated().await;
    let api = stub(Faults::default()).await;
    let settings = settings_for(&db, &api.url(), &[]);
    let out = check(&db, &settings, &api.url(), &[], &[]).await;
    for c in &out.checks {
        assert_eq!(c["result"], "ok", "{}\n{}", out.stdout, out.stderr);
    }
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.detail("broker")
            .contains(&format!("{}.chunks", settings.queue_prefix))
    );
    assert!(
        out.detail("pooling").contains("no transaction pooler"),
        "{}",
        out.stdout
    );
    // The API saw one request, its contract's own empty batch, and answered 200.
    assert_eq!(api.received().requests(), 1);
    assert_eq!(api.received().status_count(200), 1);
    assert!(!out.stdout.contains(crate::harness::KEY));
    assert!(!out.stderr.contains(crate::harness::KEY));

    // The table form says the same.
    let table = loansync_process(&db, &settings, &api.url())
        .arg("check")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&table.stdout);
    assert_eq!(table.status.code(), Some(0), "{text}");
    assert!(text.starts_with("check"), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.contains(" ok ")).count(),
        9,
        "{text}"
    );
}

#[tokio::test]
async fn a_database_not_migrated_fails_migrations_not_the_grants() {
    let db = TestApp::with_source_schema().await;
    let settings = settings_for(&db, "http://127.0.0.1:9", &[]);
    let out = check(
        &db,
        &settings,
        "http://127.0.0.1:9",
        &["--skip", "api,broker"],
        &[],
    )
    .await;
    assert_eq!(out.code, Some(1));
    assert_eq!(out.result("migrations"), "failed", "{}", out.stdout);
    assert!(
        out.detail("migrations").contains("loansync migrate"),
        "{}",
        out.stdout
    );
    // Absent tables are not missing grants.
    assert_eq!(out.result("database"), "ok", "{}", out.stdout);
    assert_eq!(out.result("broker"), "skipped");
    assert_eq!(out.result("api"), "skipped");
}

#[tokio::test]
async fn an_invalid_index_is_named_with_what_to_do() {
    let db = TestApp::migrated().await;
    let settings = settings_for(&db, "http://127.0.0.1:9", &[]);
    let skip = ["--skip", "api,broker"];
    let before = check(&db, &settings, "http://127.0.0.1:9", &skip, &[]).await;
    assert_eq!(before.result("indexes"), "ok", "{}", before.stdout);
    assert_eq!(before.code, Some(0), "{}", before.stdout);
    // What an interrupted CREATE INDEX CONCURRENTLY leaves behind.
    sqlx::query(
        "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'loansync_loan_date_modified'::regclass",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let out = check(&db, &settings, "http://127.0.0.1:9", &skip, &[]).await;
    assert_eq!(out.code, Some(1));
    assert_eq!(out.result("indexes"), "failed");
    let detail = out.detail("indexes");
    assert!(
        detail.contains("loansync_loan_date_modified on loans_ajoloan"),
        "{detail}"
    );
    assert!(
        detail.contains("DROP INDEX CONCURRENTLY loansync_loan_date_modified"),
        "{detail}"
    );
    assert!(detail.contains("loansync migrate"), "{detail}");
    assert_eq!(out.result("database"), "ok");
    assert_eq!(out.result("migrations"), "ok");
}

/// A login role with the grants of `deploy/sql/grants.sql` less those `without` names
/// (`(statement text, replacement)` edits of the file), dropped after the test's
/// database (declare it before the [`TestDb`]).
pub(crate) struct Role(pub(crate) String);

impl Role {
    pub(crate) fn new() -> Role {
        Role(format!(
            "ls_chk_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        ))
    }

    pub(crate) async fn create(&self, db: &TestDb, edits: &[(&str, &str)]) {
        let admin = PgPool::connect(&admin_url()).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE ROLE {} LOGIN", self.0)))
            .execute(&admin)
            .await
            .unwrap();
        admin.close().await;
        let mut grants = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/sql/grants.sql"),
        )
        .unwrap();
        for (from, to) in edits {
            assert!(grants.contains(from), "{from} is not in grants.sql");
            grants = grants.replacen(from, to, 1);
        }
        let grants = grants.replace(" TO loansync;", &format!(" TO {};", self.0));
        sqlx::raw_sql(sqlx::AssertSqlSafe(grants))
            .execute(&db.pool)
            .await
            .expect("deploy/sql/grants.sql applies");
    }

    pub(crate) fn url(&self, db: &TestDb) -> String {
        db.url.replacen("postgres@", &format!("{}@", self.0), 1)
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let role = self.0.clone();
        run_detached(async move {
            if let Ok(admin) = PgPool::connect(&admin_url()).await {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS {role}")))
                    .execute(&admin)
                    .await;
                admin.close().await;
            }
        });
    }
}

/// SPEC.md section 2: without `pg_read_all_stats` the window is capped at a transaction's
/// first write, and `check` says so (ok, with a warning naming the grant and the case it
/// leaves open); with it, at the transaction's start.
#[tokio::test]
async fn the_window_check_says_how_the_window_is_capped_and_names_the_grant() {
    use loansync::ledger::clock::{WindowCap, window_cap};
    let role = Role::new();
    let db = TestApp::migrated().await;
    role.create(&db, &[]).await;
    let settings = settings_for(&db, "http://127.0.0.1:9", &[]);
    let skip = ["--skip", "api,broker"];
    let url = role.url(&db);
    let env = [("DATABASE_URL", Some(url.as_str()))];
    let pool = loansync::db::connect_url(&url, 2).await.unwrap();

    let grant = format!("GRANT pg_read_all_stats TO {};", role.0);
    assert_eq!(
        window_cap(&pool).await.unwrap(),
        WindowCap::FirstWrite {
            grant: grant.clone()
        }
    );
    let out = check(&db, &settings, "http://127.0.0.1:9", &skip, &env).await;
    assert_eq!(out.code, Some(0), "{}", out.stdout);
    assert_eq!(out.result("window"), "ok", "{}", out.stdout);
    let detail = out.detail("window");
    assert!(detail.starts_with("warning: "), "{detail}");
    assert!(
        detail.contains("first write, not transaction start"),
        "{detail}"
    );
    assert!(detail.contains(&grant), "{detail}");
    assert!(
        detail.contains("a time taken before its transaction's first write"),
        "{detail}"
    );

    sqlx::query(sqlx::AssertSqlSafe(format!(
        "GRANT pg_read_all_stats TO {}",
        role.0
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        window_cap(&pool).await.unwrap(),
        WindowCap::TransactionStart
    );
    let out = check(&db, &settings, "http://127.0.0.1:9", &skip, &env).await;
    assert_eq!(out.code, Some(0), "{}", out.stdout);
    assert_eq!(out.result("window"), "ok", "{}", out.stdout);
    let detail = out.detail("window");
    assert!(
        detail.starts_with("capped at transaction start"),
        "{detail}"
    );
    assert!(!detail.contains("GRANT"), "{detail}");
    // A superuser (the test database's own role) reads every xact_start.
    assert_eq!(
        window_cap(&db.pool).await.unwrap(),
        WindowCap::TransactionStart
    );
    pool.close().await;
}

#[tokio::test]
async fn a_least_privilege_role_passes_with_the_deploy_grants_and_is_told_each_missing_one() {
    let (full, short) = (Role::new(), Role::new());
    let db = TestApp::migrated().await;
    full.create(&db, &[]).await;
    // deploy/sql/grants.sql less DELETE on loansync_chunk and USAGE on one sequence.
    short
        .create(
            &db,
            &[
                (
                    "GRANT SELECT, INSERT, UPDATE, DELETE ON loansync_sync, loansync_sync_entity, loansync_chunk,",
                    "GRANT SELECT, INSERT, UPDATE, DELETE ON loansync_sync, loansync_sync_entity,",
                ),
                ("loansync_xid_clock, loansync_request TO loansync;", "loansync_xid_clock, loansync_request TO loansync; GRANT SELECT, INSERT, UPDATE ON loansync_chunk TO loansync;"),
                (
                    "etl_folder_etlsyncerror_id_seq,\n    etl_folder_etllastsync_id_seq",
                    "etl_folder_etllastsync_id_seq",
                ),
            ],
        )
        .await;
    let settings = settings_for(&db, "http://127.0.0.1:9", &[]);
    let skip = ["--skip", "api,broker"];

    let url = full.url(&db);
    let ok = check(
        &db,
        &settings,
        "http://127.0.0.1:9",
        &skip,
        &[("DATABASE_URL", Some(&url))],
    )
    .await;
    assert_eq!(ok.code, Some(0), "{}", ok.stdout);
    assert!(ok.detail("database").contains(&full.0), "{}", ok.stdout);
    assert_eq!(ok.result("migrations"), "ok", "{}", ok.stdout);

    let url = short.url(&db);
    let out = check(
        &db,
        &settings,
        "http://127.0.0.1:9",
        &skip,
        &[("DATABASE_URL", Some(&url))],
    )
    .await;
    assert_eq!(out.code, Some(1));
    assert_eq!(out.result("database"), "failed", "{}", out.stdout);
    let detail = out.detail("database");
    let role = &short.0;
    assert!(
        detail.contains(&format!("GRANT DELETE ON loansync_chunk TO {role};")),
        "{detail}"
    );
    assert!(
        detail.contains(&format!(
            "GRANT USAGE ON SEQUENCE etl_folder_etlsyncerror_id_seq TO {role};"
        )),
        "{detail}"
    );
    assert!(detail.contains("2 grant(s)"), "{detail}");
    assert_eq!(out.result("migrations"), "ok");
    assert_eq!(out.result("indexes"), "ok");
}

#[tokio::test]
async fn a_wrong_api_key_fails_api_without_showing_the_key() {
    let db = TestApp::migrated().await;
    let api = stub(Faults::default()).await;
    let settings = settings_for(&db, &api.url(), &[]);
    let out = check(
        &db,
        &settings,
        &api.url(),
        &["--skip", "broker"],
        &[("ANALYTICS_API_KEY", Some("wrong-key-hunter2"))],
    )
    .await;
    assert_eq!(out.code, Some(1));
    assert_eq!(out.result("api"), "failed");
    let detail = out.detail("api");
    assert!(detail.contains("HTTP 401"), "{detail}");
    assert!(
        detail.contains("the API refused the key (ANALYTICS_API_KEY / ANALYTICS_API_KEY_FILE)"),
        "{detail}"
    );
    assert_eq!(out.result("database"), "ok");
    assert!(!out.stdout.contains("hunter2") && !out.stderr.contains("hunter2"));
}

#[tokio::test]
async fn a_broker_that_is_closed_or_silent_fails_broker_and_the_check_ends() {
    let db = TestApp::migrated().await;
    let settings = settings_for(&db, "http://127.0.0.1:9", &[]);
    let closed = format!("amqp://guest:hunter2@127.0.0.1:{}/%2f", closed_port().await);
    let out = check(
        &db,
        &settings,
        "http://127.0.0.1:9",
        &["--skip", "api"],
        &[("AMQP_URL", Some(&closed))],
    )
    .await;
    assert_eq!(out.code, Some(1));
    assert_eq!(out.result("broker"), "failed");
    assert!(
        out.detail("broker").contains("guest:***@127.0.0.1"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("hunter2") && !out.stderr.contains("hunter2"));
    assert_eq!(out.result("database"), "ok");

    // A port that accepts connections and never answers: the check's timeout ends it.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let (held_tx, mut held) = tokio::sync::mpsc::unbounded_channel();
    let holder = tokio::spawn(async move {
        while let Ok((conn, _)) = silent.accept().await {
            let _ = held_tx.send(conn);
        }
    });
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let out = check(
        &db,
        &settings,
        "http://127.0.0.1:9",
        &["--skip", "api", "--timeout", "1s"],
        &[("AMQP_URL", Some(&url))],
    )
    .await;
    assert_eq!(out.code, Some(1));
    assert_eq!(out.result("broker"), "failed");
    assert!(
        out.detail("broker").contains("no answer within 1s"),
        "{}",
        out.stdout
    );
    assert!(held.try_recv().is_ok(), "the check never connected");
    holder.abort();
}

#[tokio::test]
async fn queues_declared_with_other_arguments_fail_broker_naming_the_queue() {
    let db = TestApp::migrated().await;
    let settings = settings_for(&db, "http://127.0.0.1:9", &[]);
    // Someone declared the dead-letter queue by hand, with a length limit.
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    let dead = format!("{}.dead", settings.queue_prefix);
    let mut args = lapin::types::FieldTable::default();
    args.insert("x-max-length".into(), lapin::types::AMQPValue::LongInt(10));
    channel
        .queue_declare(
            dead.as_str().into(),
            lapin::options::QueueDeclareOptions::durable(),
            args,
        )
        .await
        .unwrap();
    let out = check(
        &db,
        &settings,
        "http://127.0.0.1:9",
        &["--skip", "api,database,migrations,indexes"],
        &[],
    )
    .await;
    let channel = conn.create_channel().await.unwrap();
    let _ = channel
        .queue_delete(dead.as_str().into(), Default::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
    assert_eq!(out.code, Some(1));
    assert_eq!(out.result("broker"), "failed");
    let detail = out.detail("broker");
    assert!(detail.contains(&dead), "{detail}");
    assert!(detail.contains("other arguments"), "{detail}");
    assert!(detail.contains("x-max-length"), "{detail}");
}

#[tokio::test]
async fn skipped_checks_are_skipped_and_do_not_fail() {
    let db = TestApp::migrated().await;
    let settings = settings_for(&db, "http://127.0.0.1:9", &[]);
    let closed = format!("amqp://guest:guest@127.0.0.1:{}/%2f", closed_port().await);
    let out = check(
        &db,
        &settings,
        &format!("http://127.0.0.1:{}", closed_port().await),
        &["--skip", "api,broker"],
        &[("AMQP_URL", Some(&closed))],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stdout);
    assert_eq!(out.result("broker"), "skipped");
    assert_eq!(out.result("api"), "skipped");
    assert_eq!(out.result("database"), "ok");
    // An unknown name is a usage error.
    let bad = loansync_process(&db, &settings, "http://127.0.0.1:9")
        .args(["check", "--skip", "api,brokers"])
        .output()
        .await
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("brokers"));
}

#[tokio::test]
async fn a_bad_setting_fails_config_and_skips_the_rest() {
    let db = TestApp::migrated().await;
    let settings = settings_for(&db, "http://127.0.0.1:9", &[]);
    let out = loansync_process(&db, &settings, "http://127.0.0.1:9")
        .arg("check")
        .env("ETL_WORKER_CONCURRENCY", "lots")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let rows: Vec<Vec<&str>> = text
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 9, "{text}");
    assert_eq!(
        &rows[0][..3],
        ["config", "failed", "ETL_WORKER_CONCURRENCY:"]
    );
    for row in &rows[1..] {
        assert_eq!(row[1], "skipped", "{text}");
    }
    // A secret file that cannot be read is a configuration failure naming its variable.
    let out = check(
        &db,
        &settings,
        "http://127.0.0.1:9",
        &[],
        &[
            ("DATABASE_URL", None),
            (
                "DATABASE_URL_FILE",
                Some("/nonexistent/loansync/DATABASE_URL"),
            ),
        ],
    )
    .await;
    assert_eq!(out.code, Some(1));
    assert_eq!(out.result("config"), "failed");
    assert!(out.detail("config").starts_with("DATABASE_URL_FILE: "));
}

#[tokio::test]
async fn urls_from_secret_files_reach_the_database_and_the_broker() {
    let db = TestApp::migrated().await;
    let settings = settings_for(&db, "http://127.0.0.1:9", &[]);
    let dir = std::env::temp_dir();
    let db_file = dir.join(format!("loansync-db-url-{}", uuid::Uuid::new_v4()));
    let mq_file = dir.join(format!("loansync-amqp-url-{}", uuid::Uuid::new_v4()));
    std::fs::write(&db_file, format!("{}\n", db.url)).unwrap();
    std::fs::write(&mq_file, format!("{}\n", amqp_url())).unwrap();
    let out = check(
        &db,
        &settings,
        "http://127.0.0.1:9",
        &["--skip", "api"],
        &[
            ("DATABASE_URL", None),
            ("DATABASE_URL_FILE", Some(db_file.to_str().unwrap())),
            ("AMQP_URL", None),
            ("AMQP_URL_FILE", Some(mq_file.to_str().unwrap())),
        ],
    )
    .await;
    let _ = std::fs::remove_file(&db_file);
    let _ = std::fs::remove_file(&mq_file);
    assert_eq!(out.code, Some(0), "{}", out.stdout);
    assert!(out.detail("database").contains(&db.name), "{}", out.stdout);
    assert_eq!(out.result("broker"), "ok");
}

#[tokio::test]
async fn probe_exits_0_on_a_healthy_endpoint_and_1_on_a_closed_port() {
    let api = stub(Faults::default()).await;
    let probe = |url: String| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_loansync"));
        // No settings at all, and one that would not load: probe needs none.
        cmd.args(["probe", &url, "--timeout", "2s"])
            .env_clear()
            .env("ETL_WORKER_CONCURRENCY", "lots")
            .kill_on_drop(true);
        cmd.output()
    };
    let ok = probe(format!("{}/healthz", api.url())).await.unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("200"));
    let missing = probe(format!("{}/no-such-page", api.url())).await.unwrap();
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404"));
    let closed = probe(format!("http://127.0.0.1:{}/healthz", closed_port().await))
        .await
        .unwrap();
    assert_eq!(closed.status.code(), Some(1));
    assert!(!String::from_utf8_lossy(&closed.stderr).is_empty());
}

#[tokio::test]
async fn a_changed_delivery_limit_is_noted_and_does_not_fail_the_broker_check() {
    let db = TestApp::migrated().await;
    let settings = settings_for(&db, "http://127.0.0.1:9", &[]);
    // The queues were made under ETL_DELIVERY_LIMIT=3 (broker backstop 5); the check runs
    // with the default 5 (backstop 7).
    let earlier = loansync::queue::amqp::Broker::connect(&amqp_url(), &settings.queue_prefix, 5)
        .await
        .unwrap();
    earlier.close().await;
    let out = check(
        &db,
        &settings,
        "http://127.0.0.1:9",
        &["--skip", "api,database,migrations,indexes"],
        &[],
    )
    .await;
    assert_eq!(out.code, Some(0), "{}", out.stdout);
    assert_eq!(out.result("broker"), "ok");
    assert!(
        out.detail("broker")
            .contains("x-delivery-limit=5 (wanted 7)"),
        "{}",
        out.stdout
    );
}
