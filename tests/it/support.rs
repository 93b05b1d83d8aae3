//! Shared test plumbing: a throw-away database per test, loaded with the Django source
//! schema and loansync's migrations, dropped when the test ends.
#![allow(dead_code)]

use sqlx::PgPool;
use std::time::Duration;

/// Where the admin connection goes; override with `TEST_PG_ADMIN_URL`.
pub fn admin_url() -> String {
    std::env::var("TEST_PG_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// Where RabbitMQ is; override with `TEST_AMQP_URL`.
pub fn amqp_url() -> String {
    std::env::var("TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// The project's own copy of the Django source schema.
pub const SOURCE_SCHEMA: &str = include_str!("../../schema/django_source_schema.sql");

/// A database created for one test and dropped (with `FORCE`) when it goes out of scope.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
    /// The shared side of the services lock ([`exclusive_services`]), released after the
    /// database is dropped. `None` in the test that holds the lock exclusively.
    _services: Option<std::fs::File>,
}

/// The file whose lock says who uses the shared services (PostgreSQL, RabbitMQ, the
/// process-wide metrics registry). Every test that creates a [`TestDb`] holds it shared;
/// a test that stops a service or reads process-wide metrics holds it exclusively, so it
/// runs alone under `cargo test` (threads of one process) and `cargo nextest run`
/// (processes) alike: an advisory `flock`, released by the kernel if a test dies.
fn services_lock_file() -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(std::env::temp_dir().join("loansync-tests-services.lock"))
        .expect("open the services lock file")
}

thread_local! {
    /// Set on the test's own thread while it holds the services lock exclusively.
    static HOLDS_EXCLUSIVE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Held by a test that must run alone: waits until no other test holds the services
/// lock, and keeps new ones waiting until dropped. Take it before creating the test's
/// [`TestDb`].
pub struct ExclusiveServices {
    _file: std::fs::File,
}

pub async fn exclusive_services() -> ExclusiveServices {
    let file = tokio::task::spawn_blocking(|| {
        let f = services_lock_file();
        f.lock().expect("lock the services exclusively");
        f
    })
    .await
    .expect("services lock task");
    HOLDS_EXCLUSIVE.with(|h| h.set(true));
    ExclusiveServices { _file: file }
}

impl Drop for ExclusiveServices {
    fn drop(&mut self) {
        HOLDS_EXCLUSIVE.with(|h| h.set(false));
    }
}

async fn shared_services() -> Option<std::fs::File> {
    if HOLDS_EXCLUSIVE.with(|h| h.get()) {
        return None;
    }
    let file = tokio::task::spawn_blocking(|| {
        let f = services_lock_file();
        f.lock_shared().expect("lock the services shared");
        f
    })
    .await
    .expect("services lock task");
    Some(file)
}

impl TestDb {
    /// An empty database holding the Django source schema, not yet migrated.
    pub async fn with_source_schema() -> TestDb {
        let services = shared_services().await;
        let name = format!("loansync_t_{}", uuid::Uuid::new_v4().simple());
        let admin = PgPool::connect(&admin_url())
            .await
            .expect("admin connection");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await
            .expect("create test database");
        admin.close().await;
        let base = admin_url();
        let url = match base.rfind('/') {
            Some(i) => format!("{}/{name}", &base[..i]),
            None => panic!("admin url has no database part"),
        };
        let pool = loansync::db::connect_url(&url, 8)
            .await
            .expect("connect test db");
        sqlx::raw_sql(SOURCE_SCHEMA)
            .execute(&pool)
            .await
            .expect("load source schema");
        TestDb {
            name,
            url,
            pool,
            _services: services,
        }
    }

    /// The source schema plus loansync's migrations.
    pub async fn migrated() -> TestDb {
        let db = Self::with_source_schema().await;
        loansync::db::migrate(&db.pool).await.expect("migrate");
        db
    }

    /// A fresh queue prefix for this test.
    pub fn queue_prefix(&self) -> String {
        format!("t{}", &self.name[11..23])
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // DROP ... WITH (FORCE) ends the sessions of the test's own pool, which cannot be
        // closed gracefully from inside this Drop.
        run_detached(async move {
            if let Ok(admin) = PgPool::connect(&admin_url()).await {
                let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&admin)
                .await;
                admin.close().await;
            }
        });
    }
}

/// Runs clean-up work from a `Drop`, where the test's own runtime may be blocked: on a
/// thread of its own with a small runtime, waiting for it to finish.
pub fn run_detached(work: impl std::future::Future<Output = ()> + Send + 'static) {
    let _ = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(work);
    })
    .join();
}

/// Awaits `cond` until it holds or `deadline` passes; polls, never sleeps blindly.
pub async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    loop {
        if cond().await {
            return;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
