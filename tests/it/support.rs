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
}

impl TestDb {
    /// An empty database holding the Django source schema, not yet migrated.
    pub async fn with_source_schema() -> TestDb {
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
        TestDb { name, url, pool }
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
