//! `loansync migrate` creates the ETL tables only when absent and changes nothing of Django's.

use crate::harness::TestApp;

async fn columns(
    pool: &sqlx::PgPool,
    table: &str,
) -> Vec<(String, String, String, Option<String>)> {
    sqlx::query_as(
        "SELECT column_name::text, data_type::text, is_nullable::text, column_default::text \
         FROM information_schema.columns WHERE table_schema = 'public' AND table_name = $1 \
         ORDER BY ordinal_position",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn indexes(pool: &sqlx::PgPool, table: &str) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT indexname::text, indexdef FROM pg_indexes WHERE schemaname = 'public' AND tablename = $1 ORDER BY 1",
    )
    .bind(table)
    .fetch_all(pool)
    .await
    .unwrap()
}

const ETL_TABLES: [&str; 3] = [
    "etl_folder_etlsynchistory",
    "etl_folder_etlsyncerror",
    "etl_folder_etllastsync",
];

#[tokio::test]
async fn migrations_create_etl_tables_exactly_as_django_does() {
    // A database where Django created the ETL tables (the fixture) ...
    let django = TestApp::with_source_schema().await;
    // ... and one where only loansync's migrations create them.
    let bare = TestApp::with_source_schema().await;
    for t in ETL_TABLES {
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP TABLE {t} CASCADE")))
            .execute(&bare.pool)
            .await
            .unwrap();
    }
    loansync::db::migrate(&bare.pool).await.unwrap();
    for t in ETL_TABLES {
        assert_eq!(
            columns(&django.pool, t).await,
            columns(&bare.pool, t).await,
            "{t}"
        );
        assert_eq!(
            indexes(&django.pool, t).await,
            indexes(&bare.pool, t).await,
            "{t}"
        );
    }
}

#[tokio::test]
async fn migrate_twice_on_django_tables_changes_nothing() {
    let db = TestApp::with_source_schema().await;
    sqlx::query(
        "INSERT INTO etl_folder_etllastsync (entity_type, last_sync_timestamp, last_sync_id, updated_at) \
         VALUES ('loan', '2026-01-01T00:00:00Z', 'django-made', now())",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let mut before = Vec::new();
    for t in ETL_TABLES {
        before.push((columns(&db.pool, t).await, indexes(&db.pool, t).await));
    }
    loansync::db::migrate(&db.pool).await.unwrap();
    loansync::db::migrate(&db.pool).await.unwrap();
    for (t, b) in ETL_TABLES.iter().zip(before) {
        assert_eq!(
            (columns(&db.pool, t).await, indexes(&db.pool, t).await),
            b,
            "{t}"
        );
    }
    let kept: String = sqlx::query_scalar("SELECT last_sync_id FROM etl_folder_etllastsync")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(kept, "django-made");
    let own: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_name LIKE 'loansync\\_%'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        own, 11,
        "loansync_sync, loansync_sync_entity, loansync_chunk, loansync_xid_clock, \
         loansync_request, loansync_delivered, loansync_deleted, loansync_sweep_digest, \
         loansync_worker, loansync_api_pause and the view loansync_pending_request"
    );
}

#[test]
fn project_schema_copy_equals_the_shared_fixture() {
    let shared = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/django_source_schema.sql");
    let Ok(fixture) = std::fs::read_to_string(&shared) else {
        panic!(
            "{} is missing: the shared fixture must sit beside the repository",
            shared.display()
        );
    };
    assert_eq!(
        crate::support::SOURCE_SCHEMA,
        fixture,
        "schema/django_source_schema.sql drifted from the shared fixture"
    );
}

#[tokio::test]
async fn incremental_selection_indexes_exist_and_are_valid() {
    let db = TestApp::migrated().await;
    let valid: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
         WHERE c.relname LIKE 'loansync\\_%' AND i.indisvalid ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    for name in [
        "loansync_customer_date_modified",
        "loansync_loan_date_modified",
        "loansync_repayment_date_created",
        "loansync_schedule_date_modified",
        "loansync_repayment_date_modified",
    ] {
        assert!(
            valid.iter().any(|v| v == name),
            "{name} missing from {valid:?}"
        );
    }
    // The incremental loan enumeration can use its index.
    let mut conn = db.pool.acquire().await.unwrap();
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut *conn)
        .await
        .unwrap();
    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT id::int8 FROM loans_ajoloan WHERE date_modified >= now() - interval '1 day' \
         AND date_modified < now() AND id > 0 ORDER BY id LIMIT 100",
    )
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    assert!(
        plan.iter()
            .any(|l| l.contains("loansync_loan_date_modified")),
        "{plan:#?}"
    );
    // So can the statements that select loans by their schedule rows and repayments,
    // and repayments by date_modified: each by its own index.
    for (sql, index) in [
        (
            "EXPLAIN SELECT DISTINCT loan_id FROM loans_ajoloanschedule \
             WHERE date_modified >= now() - interval '1 day' AND date_modified < now() \
             AND loan_id > 0 ORDER BY loan_id LIMIT 100",
            "loansync_schedule_date_modified",
        ),
        (
            "EXPLAIN SELECT DISTINCT ajo_loan_id FROM loans_ajoloanrepayment \
             WHERE date_modified >= now() - interval '1 day' AND date_modified < now() \
             AND ajo_loan_id > 0 ORDER BY ajo_loan_id LIMIT 100",
            "loansync_repayment_date_modified",
        ),
        (
            "EXPLAIN SELECT id::int8 FROM loans_ajoloanrepayment \
             WHERE date_modified >= now() - interval '1 day' AND date_modified < now() \
             AND id > 0 ORDER BY id LIMIT 100",
            "loansync_repayment_date_modified",
        ),
    ] {
        let plan: Vec<String> = sqlx::query_scalar(sql).fetch_all(&mut *conn).await.unwrap();
        assert!(plan.iter().any(|l| l.contains(index)), "{index}: {plan:#?}");
    }
}
