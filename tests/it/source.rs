//! Reading the Django tables: the filters and windows of SPEC.md section 2, keyset
//! paging, and one chunk's related rows.

use crate::pipeline::{KEY, seeded_db, settings_for, small};
use chrono::{DateTime, Duration, Utc};
use loansync::domain::{EntityKind, PlanRequest, SyncType, SyncWindow};
use loansync::source::{load_chunk, next_ids};
use loansync::stub_api::{self, Faults, StubConfig};

async fn all_ids(
    pool: &sqlx::PgPool,
    entity: EntityKind,
    sync_type: SyncType,
    window: &SyncWindow,
    page: i64,
) -> Vec<i64> {
    let mut conn = pool.acquire().await.unwrap();
    let (mut out, mut after) = (Vec::new(), 0);
    loop {
        let ids = next_ids(&mut conn, entity, sync_type, window, after, page)
            .await
            .unwrap();
        let Some(&last) = ids.last() else { break };
        assert!(ids.len() as i64 <= page);
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ascending");
        out.extend(ids);
        after = last;
    }
    out
}

#[tokio::test]
async fn windows_are_lo_inclusive_hi_exclusive_and_pages_cover_everything() {
    let db = seeded_db(small()).await;
    let lo: DateTime<Utc> = "2026-01-10T00:00:00Z".parse().unwrap();
    let hi = lo + Duration::hours(1);
    // Loan 1 exactly at lo (in), 2 just before hi (in), 3 exactly at hi (out),
    // 4 before lo (out); 5 is not disbursed but modified in the window (in, incremental).
    for (id, t) in [
        (1, lo),
        (2, hi - Duration::microseconds(1)),
        (3, hi),
        (4, lo - Duration::seconds(1)),
        (5, lo + Duration::minutes(5)),
    ] {
        sqlx::query("UPDATE loans_ajoloan SET date_modified = $2 WHERE id = $1")
            .bind(id)
            .bind(t)
            .execute(&db.pool)
            .await
            .unwrap();
    }
    sqlx::query("UPDATE loans_ajoloan SET is_disbursed = false WHERE id = 5")
        .execute(&db.pool)
        .await
        .unwrap();
    let window = SyncWindow { lo: Some(lo), hi };
    let inc = all_ids(
        &db.pool,
        EntityKind::Loan,
        SyncType::Incremental,
        &window,
        2,
    )
    .await;
    assert_eq!(inc, vec![1, 2, 5]);

    // Full: every disbursed loan, whatever its time, paged in sevens.
    let full = all_ids(&db.pool, EntityKind::Loan, SyncType::Full, &window, 7).await;
    let want: Vec<i64> =
        sqlx::query_scalar("SELECT id::int8 FROM loans_ajoloan WHERE is_disbursed ORDER BY id")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(full, want);
    assert!(!full.contains(&5));

    // Customers: onboarded only, and in the window on an incremental sync.
    sqlx::query("UPDATE ajo_ajouser SET date_modified = $1 WHERE id IN (1, 2)")
        .bind(lo)
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE ajo_ajouser SET onboarding_complete = (id = 1) WHERE id IN (1, 2)")
        .execute(&db.pool)
        .await
        .unwrap();
    let c = all_ids(
        &db.pool,
        EntityKind::Customer,
        SyncType::Incremental,
        &window,
        10,
    )
    .await;
    assert_eq!(c, vec![1]);

    // Officers: by user_type, never by account_type; the same on incremental syncs.
    let officers = all_ids(
        &db.pool,
        EntityKind::Officer,
        SyncType::Incremental,
        &window,
        3,
    )
    .await;
    let want: Vec<i64> = sqlx::query_scalar(
        "SELECT id::int8 FROM accounts_customuser WHERE user_type IN \
         ('AGENT','STAFF_AGENT','PROSPER_AGENT','DMO_AGENT','AJO_AGENT','RECOVERY_AGENT') ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(officers, want);
    let key_accounts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM accounts_customuser WHERE account_type = 'KEY_ACCOUNT' AND id = ANY($1)",
    )
    .bind(&officers)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(key_accounts > 0);

    // Repayments: created in the window.
    sqlx::query("UPDATE loans_ajoloanrepayment SET date_created = $1 WHERE id = 9")
        .bind(lo)
        .execute(&db.pool)
        .await
        .unwrap();
    let r = all_ids(
        &db.pool,
        EntityKind::Repayment,
        SyncType::Incremental,
        &window,
        10,
    )
    .await;
    assert_eq!(r, vec![9]);
}

#[tokio::test]
async fn a_chunk_loads_its_related_rows_in_one_query() {
    let db = seeded_db(small()).await;
    let with_schedule: i64 = sqlx::query_scalar(
        "SELECT min(loan_id)::int8 FROM loans_ajoloanschedule s \
         WHERE EXISTS (SELECT 1 FROM loans_ajoloanrepayment r WHERE r.ajo_loan_id = s.loan_id)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let bare: i64 = sqlx::query_scalar(
        "SELECT min(id)::int8 FROM loans_ajoloan l WHERE NOT is_disbursed \
         AND NOT EXISTS (SELECT 1 FROM loans_ajoloanrepayment r WHERE r.ajo_loan_id = l.id)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let chunk = load_chunk(&db.pool, EntityKind::Loan, &[bare, with_schedule, 999_999])
        .await
        .unwrap();
    assert_eq!(chunk.missing, vec![999_999]);
    assert_eq!(chunk.records.len(), 2);
    let by_id = |id: i64| -> serde_json::Value {
        let r = chunk.records.iter().find(|r| r.id == id).unwrap();
        serde_json::from_str(r.json.get()).unwrap()
    };
    let full = by_id(with_schedule);
    let (n, paid, late, due, next, reps, total): (i64, i64, i64, f64, Option<chrono::NaiveDate>, i64, f64) =
        sqlx::query_as(
            "SELECT (SELECT count(*) FROM loans_ajoloanschedule WHERE loan_id = $1), \
                    (SELECT count(*) FROM loans_ajoloanschedule WHERE loan_id = $1 AND fully_paid), \
                    (SELECT count(*) FROM loans_ajoloanschedule WHERE loan_id = $1 AND is_late), \
                    (SELECT sum(due_amount) FROM loans_ajoloanschedule WHERE loan_id = $1), \
                    (SELECT min(due_date) FROM loans_ajoloanschedule WHERE loan_id = $1 AND NOT fully_paid), \
                    (SELECT count(*) FROM loans_ajoloanrepayment WHERE ajo_loan_id = $1), \
                    (SELECT sum(repayment_amount) FROM loans_ajoloanrepayment WHERE ajo_loan_id = $1)",
        )
        .bind(with_schedule as i32)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let s = &full["schedule"];
    assert_eq!(s["installments"], n);
    assert!((4..=30).contains(&n));
    assert_eq!(s["installments_paid"], paid);
    assert_eq!(s["installments_late"], late);
    assert!((s["amount_due"].as_f64().unwrap() - due).abs() < 1e-6);
    assert_eq!(
        s["next_due_date"],
        serde_json::json!(next.map(|d| d.to_string()))
    );
    assert_eq!(full["repayments"]["count"], reps);
    assert!((full["repayments"]["total_amount"].as_f64().unwrap() - total).abs() < 1e-6);
    let (email, branch): (String, Option<String>) = sqlx::query_as(
        "SELECT a.email::text, a.user_branch::text FROM loans_ajoloan l JOIN accounts_customuser a ON a.id = l.agent_id WHERE l.id = $1",
    )
    .bind(with_schedule as i32)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(full["agent_email"], email);
    assert_eq!(full["agent_branch"], serde_json::json!(branch));

    let empty = by_id(bare);
    assert_eq!(empty["schedule"]["installments"], 0);
    assert_eq!(empty["schedule"]["amount_due"], 0.0);
    assert_eq!(empty["schedule"]["next_due_date"], serde_json::Value::Null);
    assert_eq!(empty["repayments"]["count"], 0);
    assert_eq!(
        empty["repayments"]["last_paid_date"],
        serde_json::Value::Null
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_committed_late_by_an_open_transaction_arrives_in_the_next_sync() {
    let db = seeded_db(small()).await;
    let stub = stub_api::spawn(
        StubConfig {
            api_key: KEY.into(),
            faults: Faults::default(),
        },
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let settings = settings_for(&db, &stub.url(), &[]);
    let loans_only = |t| PlanRequest {
        sync_type: t,
        entities: Some(vec![EntityKind::Loan]),
        request_id: None,
    };
    let first = loansync::cli::sync_in_process(&db.pool, &settings, &loans_only(SyncType::Full))
        .await
        .unwrap();
    assert_eq!(first.exit_code(), 0);

    // A writer opens a transaction, touches a loan (its date_modified is the
    // transaction's now()), and keeps it open across the next sync.
    let mut writer = db.pool.begin().await.unwrap();
    let started: DateTime<Utc> = sqlx::query_scalar(
        "UPDATE loans_ajoloan SET date_modified = now() WHERE id = 2 RETURNING date_modified",
    )
    .fetch_one(&mut *writer)
    .await
    .unwrap();
    let second =
        loansync::cli::sync_in_process(&db.pool, &settings, &loans_only(SyncType::Incremental))
            .await
            .unwrap();
    let hi: DateTime<Utc> = sqlx::query_scalar(
        "SELECT sync_end_date FROM etl_folder_etlsynchistory WHERE sync_id = $1",
    )
    .bind(second.sync_id.as_deref().unwrap())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        hi <= started,
        "the window's end was not capped at the open transaction"
    );
    let before = stub.received();
    writer.commit().await.unwrap();

    let third =
        loansync::cli::sync_in_process(&db.pool, &settings, &loans_only(SyncType::Incremental))
            .await
            .unwrap();
    assert_eq!(third.exit_code(), 0);
    let after = stub.received();
    assert!(
        after.ids_sent_since(&before, EntityKind::Loan).contains(&2),
        "the late-committed row was lost"
    );
}
