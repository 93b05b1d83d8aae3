//! Schema drift (issue 26): the one table of the source columns loansync reads
//! (`source::columns::SOURCE_COLUMNS`) is kept honest against the statements, and a
//! renamed or retyped column stops `loansync check` and the planner before a row is read,
//! with one message naming the column and what changed, as the least-privilege role of
//! `deploy/sql/grants.sql`.

use crate::check::{Role, check};
use crate::harness::{TestApp, full_request, history, seeded_db, settings_for, small};
use loansync::config::Settings;
use loansync::planner::{self, PlanError, PlanOutcome};
use loansync::queue::memory::MemoryQueue;
use loansync::source::{
    self,
    columns::{SOURCE_COLUMNS, drift},
};
use loansync::telemetry::Telemetry;
use sqlx::{Connection, PgConnection};

/// The parameter types the statement `name` of `source::statements` is bound with.
fn parameters(name: &str) -> &'static str {
    match name.split(' ').next() {
        Some("ids") => "(int8, int8, timestamptz, timestamptz, int8)",
        Some("load") => "(int8[])",
        Some("sweep") => "(int8, int8, text, int8[])",
        _ => "",
    }
}

/// Prepares the statement `name` on `conn` inside a savepoint: `Err` with PostgreSQL's
/// message when it does not prepare (the transaction stays usable).
async fn prepares(conn: &mut PgConnection, name: &str, sql: &str) -> Result<(), String> {
    sqlx::raw_sql("SAVEPOINT prep")
        .execute(&mut *conn)
        .await
        .unwrap();
    let types = parameters(name);
    let out = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "PREPARE drift_probe {types} AS {sql}"
    )))
    .execute(&mut *conn)
    .await;
    match out {
        Ok(_) => {
            sqlx::raw_sql("DEALLOCATE drift_probe; RELEASE SAVEPOINT prep")
                .execute(&mut *conn)
                .await
                .unwrap();
            Ok(())
        }
        Err(e) => {
            sqlx::raw_sql("ROLLBACK TO SAVEPOINT prep")
                .execute(&mut *conn)
                .await
                .unwrap();
            Err(e.to_string())
        }
    }
}

/// The table and the statements agree both ways, on the fixture schema: each column in
/// the table is read by some statement (renamed, a statement no longer prepares), and
/// with every source column NOT in the table dropped, every statement still prepares:
/// no statement reads a column the table does not list. The fixture's types are the
/// table's (no drift on a fresh database).
#[tokio::test]
async fn the_source_columns_table_is_exactly_what_the_statements_read() {
    let db = TestApp::migrated().await;
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    assert_eq!(drift(&mut conn).await.unwrap(), vec![]);
    let statements = source::statements();
    assert!(statements.len() >= 4 * 5, "{}", statements.len());
    sqlx::raw_sql("BEGIN").execute(&mut conn).await.unwrap();
    for (name, sql) in &statements {
        prepares(&mut conn, name, sql)
            .await
            .unwrap_or_else(|e| panic!("{name} does not prepare on the fixture: {e}"));
    }

    // Each listed column is read: renamed, some statement fails.
    for col in SOURCE_COLUMNS {
        sqlx::raw_sql("SAVEPOINT col")
            .execute(&mut conn)
            .await
            .unwrap();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE {} RENAME COLUMN {} TO drift_renamed",
            col.table, col.column
        )))
        .execute(&mut conn)
        .await
        .unwrap();
        let mut broken = None;
        for (name, sql) in &statements {
            if prepares(&mut conn, name, sql).await.is_err() {
                broken = Some(name);
                break;
            }
        }
        assert!(
            broken.is_some(),
            "{}.{} is listed in src/source/columns.rs but no statement reads it",
            col.table,
            col.column
        );
        // The check names it.
        let found = drift(&mut conn).await.unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            found[0].to_string(),
            format!(
                "{}.{} is missing (expected {})",
                col.table, col.column, col.udt
            )
        );
        sqlx::raw_sql("ROLLBACK TO SAVEPOINT col")
            .execute(&mut conn)
            .await
            .unwrap();
    }

    // Every column not listed dropped: every statement still prepares.
    let tables: std::collections::BTreeSet<&str> = SOURCE_COLUMNS.iter().map(|c| c.table).collect();
    let mut dropped = 0;
    for table in &tables {
        let columns: Vec<String> = sqlx::query_scalar(
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_schema = 'public' AND table_name = $1",
        )
        .bind(table)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        for column in columns {
            if SOURCE_COLUMNS
                .iter()
                .any(|c| c.table == *table && c.column == column)
            {
                continue;
            }
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "ALTER TABLE {table} DROP COLUMN {column} CASCADE"
            )))
            .execute(&mut conn)
            .await
            .unwrap();
            dropped += 1;
        }
    }
    // The never-send columns (pin, password, sms_body, ...) are among those dropped.
    assert!(dropped >= 10, "{dropped}");
    for (name, sql) in &statements {
        prepares(&mut conn, name, sql).await.unwrap_or_else(|e| {
            panic!("{name} reads a column src/source/columns.rs does not list: {e}")
        });
    }
    assert_eq!(drift(&mut conn).await.unwrap(), vec![]);
    sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.unwrap();
}

/// `alter` applied to a seeded database as its owner; then, as the least-privilege role,
/// `loansync check` fails `schema` and the planner refuses, each with one message
/// containing `said`: the sync `failed` with that message, one history row, no error
/// row, no chunk, no watermark; `etl_source_schema_drift` is 1. Undone (`undo`), the
/// next plan goes ahead and the gauge is 0.
async fn drift_stops_check_and_planner(alter: &str, undo: &str, said: &str) {
    let role = Role::new();
    let db = seeded_db(small()).await;
    role.create(&db, &[]).await;
    let url = role.url(&db);
    let settings = settings_for(&db, "http://127.0.0.1:9", &[("DATABASE_URL", &url)]);
    let skip = ["--skip", "api,broker"];

    let clean = check(&db, &settings, "http://127.0.0.1:9", &skip, &[]).await;
    assert_eq!(clean.result("schema"), "ok", "{}", clean.stdout);
    assert_eq!(clean.code, Some(0), "{}", clean.stdout);

    sqlx::raw_sql(sqlx::AssertSqlSafe(alter.to_string()))
        .execute(&db.pool)
        .await
        .unwrap();
    let out = check(&db, &settings, "http://127.0.0.1:9", &skip, &[]).await;
    assert_eq!(out.code, Some(1), "{}", out.stdout);
    assert_eq!(out.result("schema"), "failed", "{}", out.stdout);
    let detail = out.detail("schema");
    assert!(detail.contains(said), "{detail}");
    assert_eq!(detail.matches("; ").count(), 1, "one difference: {detail}");
    for other in ["database", "migrations", "indexes", "window"] {
        assert_eq!(out.result(other), "ok", "{other}: {}", out.stdout);
    }

    // The planner, as the same role.
    let telemetry = Telemetry::fresh();
    let settings = Settings {
        telemetry: telemetry.clone(),
        ..settings
    };
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let queue = MemoryQueue::new();
    let refused = planner::plan_sync(&pool, &settings, &full_request(), &queue).await;
    match &refused {
        Err(PlanError::SchemaDrift(m)) => assert!(m.contains(said), "{m}"),
        other => panic!("the planner planned despite the drift: {other:?}"),
    }
    assert!(queue.is_empty(), "no chunk job published");
    assert_eq!(telemetry.value("etl_source_schema_drift", &[]), Some(1.0));
    let h = history(&db.pool).await;
    assert_eq!(h.len(), 1, "one history row");
    assert_eq!(h[0].status, "failed");
    let message = h[0].error_message.as_deref().unwrap_or_default();
    assert!(message.contains(said), "{message}");
    for (what, sql) in [
        ("error rows", "SELECT count(*) FROM etl_folder_etlsyncerror"),
        ("watermarks", "SELECT count(*) FROM etl_folder_etllastsync"),
        ("chunks", "SELECT count(*) FROM loansync_chunk"),
        (
            "syncs not done",
            "SELECT count(*) FROM loansync_sync WHERE state <> 'done'",
        ),
    ] {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(n, 0, "{what}");
    }

    // `loansync sync` (single-process mode) is refused the same way, with the exit code
    // of a failed sync.
    let out = crate::harness::loansync_process(&db, &settings, "http://127.0.0.1:9")
        .args(["sync", "--full"])
        .env("DATABASE_URL", &url)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(11), "{stderr}");
    assert!(stderr.contains(said), "{stderr}");
    let failed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM etl_folder_etlsynchistory WHERE status = 'failed' AND error_message LIKE '%schema drift%'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(failed, 2);

    // Fixed, the next plan goes ahead.
    sqlx::raw_sql(sqlx::AssertSqlSafe(undo.to_string()))
        .execute(&db.pool)
        .await
        .unwrap();
    let planned = planner::plan_sync(&pool, &settings, &full_request(), &queue)
        .await
        .unwrap();
    assert!(
        matches!(planned, PlanOutcome::Planned { .. }),
        "{planned:?}"
    );
    assert!(!queue.is_empty());
    assert_eq!(telemetry.value("etl_source_schema_drift", &[]), Some(0.0));
    pool.close().await;
}

#[tokio::test]
async fn a_renamed_column_stops_check_and_the_planner_with_one_message() {
    drift_stops_check_and_planner(
        "ALTER TABLE loans_ajoloan RENAME COLUMN amount TO amount_ngn",
        "ALTER TABLE loans_ajoloan RENAME COLUMN amount_ngn TO amount",
        "loans_ajoloan.amount is missing (expected float8)",
    )
    .await;
}

#[tokio::test]
async fn a_retyped_column_stops_check_and_the_planner_with_one_message() {
    drift_stops_check_and_planner(
        "ALTER TABLE loans_ajoloanrepayment ALTER COLUMN repayment_amount TYPE numeric(14, 2)",
        "ALTER TABLE loans_ajoloanrepayment ALTER COLUMN repayment_amount TYPE float8",
        "loans_ajoloanrepayment.repayment_amount changed type: expected float8, found numeric",
    )
    .await;
}
