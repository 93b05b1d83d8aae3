//! Reading the Django tables: the filters and windows of SPEC.md section 2, keyset
//! paging, and one chunk's related rows, aggregates and never-send columns.
//!
//! Most tests build exactly the rows they need with [`crate::fixtures`]; those that call
//! `seeded_db` run over the seeded synthetic dataset. The last one runs real syncs
//! through a recording server in front of the stub API, to read the records sent.

use crate::fixtures::{
    Installment, SECRET, fixture_time, insert_customer, insert_loan, insert_officer,
    insert_repayment, insert_repayment_with, insert_schedule, set_modified,
};
use crate::harness::TestApp;
use crate::harness::{seeded_db, settings_for, small};

use chrono::{DateTime, Duration, NaiveDate, Utc};
use loansync::domain::{EntityKind, PlanRequest, SyncType, SyncWindow};
use loansync::source::{LoadedChunk, load_chunk, next_ids};
use loansync::stub_api::Faults;
use loansync::transform::NEVER_SEND;
use serde_json::{Value, json};

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

const FULL: SyncType = SyncType::Full;
const INCREMENTAL: SyncType = SyncType::Incremental;

/// The window most tests use: [2026-03-01T00:00:00Z, 2026-03-01T01:00:00Z).
fn window() -> SyncWindow {
    let lo: DateTime<Utc> = "2026-03-01T00:00:00Z".parse().unwrap();
    SyncWindow {
        lo: Some(lo),
        hi: lo + Duration::hours(1),
    }
}

/// The window of a full sync: no lower bound, and an upper bound that must be ignored.
fn full_window() -> SyncWindow {
    SyncWindow {
        lo: None,
        hi: "2000-01-01T00:00:00Z".parse().unwrap(),
    }
}

fn by_id(chunk: &LoadedChunk, id: i64) -> Value {
    let r = chunk
        .records
        .iter()
        .find(|r| r.id == id)
        .unwrap_or_else(|| panic!("no record {id}"));
    serde_json::from_str(r.json.get()).unwrap()
}

fn day(s: &str) -> NaiveDate {
    s.parse().unwrap()
}

#[tokio::test]
async fn officers_are_selected_by_user_type_never_by_account_type() {
    let db = TestApp::migrated().await;
    let mut want = Vec::new();
    for t in [
        "AGENT",
        "STAFF_AGENT",
        "PROSPER_AGENT",
        "DMO_AGENT",
        "AJO_AGENT",
        "RECOVERY_AGENT",
    ] {
        want.push(insert_officer(&db.pool, t, "REGULAR").await);
    }
    let key_account_agent = insert_officer(&db.pool, "AGENT", "KEY_ACCOUNT").await;
    want.push(key_account_agent);
    insert_officer(&db.pool, "MERCHANT", "REGULAR").await;
    insert_officer(&db.pool, "KEY_ACCOUNT", "KEY_ACCOUNT").await;
    insert_officer(&db.pool, "LOTTO_AGENT", "REGULAR").await;
    insert_officer(&db.pool, "PERSONAL", "KEY_ACCOUNT").await;
    let no_type = insert_officer(&db.pool, "AGENT", "REGULAR").await;
    sqlx::query("UPDATE accounts_customuser SET user_type = NULL WHERE id = $1::int4")
        .bind(no_type)
        .execute(&db.pool)
        .await
        .unwrap();
    let mut last = insert_officer(&db.pool, "agent", "REGULAR").await; // case matters
    last = last.max(insert_officer(&db.pool, "RECOVERY_AGENT", "KEY_ACCOUNT").await);
    want.push(last);

    assert_eq!(
        all_ids(&db.pool, EntityKind::Officer, FULL, &full_window(), 100).await,
        want
    );
    // Incremental: the same set, whatever the window (the table has no modification time).
    assert_eq!(
        all_ids(&db.pool, EntityKind::Officer, INCREMENTAL, &window(), 3).await,
        want
    );
    assert!(want.contains(&key_account_agent));
}

#[tokio::test]
async fn customers_full_takes_the_onboarded_incremental_also_needs_the_window() {
    let db = TestApp::migrated().await;
    let agent = insert_officer(&db.pool, "AGENT", "REGULAR").await;
    let w = window();
    let (lo, hi) = (w.lo.unwrap(), w.hi);
    let at_lo = insert_customer(&db.pool, Some(agent), true).await;
    let before_hi = insert_customer(&db.pool, Some(agent), true).await;
    let at_hi = insert_customer(&db.pool, Some(agent), true).await;
    let before_lo = insert_customer(&db.pool, None, true).await;
    let not_onboarded = insert_customer(&db.pool, Some(agent), false).await;
    let old = insert_customer(&db.pool, Some(agent), true).await; // fixture_time, before lo
    for (id, t) in [
        (at_lo, lo),
        (before_hi, hi - Duration::microseconds(1)),
        (at_hi, hi),
        (before_lo, lo - Duration::microseconds(1)),
        (not_onboarded, lo + Duration::minutes(1)),
    ] {
        set_modified(&db.pool, EntityKind::Customer, id, t).await;
    }
    assert_eq!(
        all_ids(&db.pool, EntityKind::Customer, FULL, &full_window(), 2).await,
        vec![at_lo, before_hi, at_hi, before_lo, old]
    );
    assert_eq!(
        all_ids(&db.pool, EntityKind::Customer, INCREMENTAL, &w, 1).await,
        vec![at_lo, before_hi]
    );
    // An incremental window without a lower bound: everything onboarded before hi.
    let open = SyncWindow { lo: None, hi };
    assert_eq!(
        all_ids(&db.pool, EntityKind::Customer, INCREMENTAL, &open, 10).await,
        vec![at_lo, before_hi, before_lo, old]
    );
}

#[tokio::test]
async fn loans_full_takes_the_disbursed_incremental_takes_the_modified_in_window() {
    let db = TestApp::migrated().await;
    let agent = insert_officer(&db.pool, "AGENT", "REGULAR").await;
    let borrower = insert_customer(&db.pool, Some(agent), true).await;
    let w = window();
    let (lo, hi) = (w.lo.unwrap(), w.hi);
    let disbursed_in = insert_loan(&db.pool, agent, borrower, true).await;
    let pending_in = insert_loan(&db.pool, agent, borrower, false).await;
    let disbursed_at_hi = insert_loan(&db.pool, agent, borrower, true).await;
    let disbursed_old = insert_loan(&db.pool, agent, borrower, true).await;
    let pending_old = insert_loan(&db.pool, agent, borrower, false).await;
    let disbursed_at_lo = insert_loan(&db.pool, agent, borrower, true).await;
    let disbursed_ancient = insert_loan(&db.pool, agent, borrower, true).await;
    set_modified(
        &db.pool,
        EntityKind::Loan,
        disbursed_in,
        lo + Duration::minutes(30),
    )
    .await;
    set_modified(
        &db.pool,
        EntityKind::Loan,
        pending_in,
        hi - Duration::microseconds(1),
    )
    .await;
    set_modified(&db.pool, EntityKind::Loan, disbursed_at_hi, hi).await;
    set_modified(&db.pool, EntityKind::Loan, disbursed_at_lo, lo).await;
    let ancient: DateTime<Utc> = "1960-05-01T00:00:00Z".parse().unwrap();
    set_modified(&db.pool, EntityKind::Loan, disbursed_ancient, ancient).await;
    let _ = pending_old;

    // Full: disbursed, whatever their time (even after the window's hi).
    assert_eq!(
        all_ids(&db.pool, EntityKind::Loan, FULL, &full_window(), 2).await,
        vec![
            disbursed_in,
            disbursed_at_hi,
            disbursed_old,
            disbursed_at_lo,
            disbursed_ancient
        ]
    );
    // Incremental: modified in [lo, hi), disbursed or not.
    assert_eq!(
        all_ids(&db.pool, EntityKind::Loan, INCREMENTAL, &w, 2).await,
        vec![disbursed_in, pending_in, disbursed_at_lo]
    );
    let open = SyncWindow { lo: None, hi };
    assert_eq!(
        all_ids(&db.pool, EntityKind::Loan, INCREMENTAL, &open, 100).await,
        vec![
            disbursed_in,
            pending_in,
            disbursed_old,
            pending_old,
            disbursed_at_lo,
            disbursed_ancient
        ]
    );
}

#[tokio::test]
async fn repayments_full_takes_all_incremental_takes_the_created_or_modified_in_window() {
    let db = TestApp::migrated().await;
    let agent = insert_officer(&db.pool, "AGENT", "REGULAR").await;
    let borrower = insert_customer(&db.pool, Some(agent), true).await;
    let pending = insert_loan(&db.pool, agent, borrower, false).await;
    let w = window();
    let (lo, hi) = (w.lo.unwrap(), w.hi);
    let at_lo = insert_repayment(&db.pool, pending).await;
    let at_hi = insert_repayment(&db.pool, pending).await;
    let only_modified_in = insert_repayment(&db.pool, pending).await;
    let in_window = insert_repayment(&db.pool, pending).await;
    let only_created_in = insert_repayment(&db.pool, pending).await;
    let modified_at_hi = insert_repayment(&db.pool, pending).await;
    let untouched = insert_repayment(&db.pool, pending).await;
    set_modified(&db.pool, EntityKind::Repayment, at_lo, lo).await;
    set_modified(&db.pool, EntityKind::Repayment, at_hi, hi).await;
    set_modified(
        &db.pool,
        EntityKind::Repayment,
        in_window,
        hi - Duration::seconds(1),
    )
    .await;
    let set = |id: i64, created: DateTime<Utc>, modified: DateTime<Utc>| {
        let pool = db.pool.clone();
        async move {
            sqlx::query(
                "UPDATE loans_ajoloanrepayment SET date_created = $2, date_modified = $3 \
                 WHERE id = $1::int4",
            )
            .bind(id)
            .bind(created)
            .bind(modified)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    // Created before the window, modified in it (a status change): selected.
    set(only_modified_in, fixture_time(), lo + Duration::minutes(1)).await;
    // Created in the window, modified again after it: selected (created counts).
    set(
        only_created_in,
        lo + Duration::minutes(2),
        hi + Duration::hours(1),
    )
    .await;
    // Created before the window, modified exactly at hi: not selected.
    set(modified_at_hi, fixture_time(), hi).await;

    assert_eq!(
        all_ids(&db.pool, EntityKind::Repayment, FULL, &full_window(), 3).await,
        vec![
            at_lo,
            at_hi,
            only_modified_in,
            in_window,
            only_created_in,
            modified_at_hi,
            untouched
        ]
    );
    for page in [1, 2, 100] {
        assert_eq!(
            all_ids(&db.pool, EntityKind::Repayment, INCREMENTAL, &w, page).await,
            vec![at_lo, only_modified_in, in_window, only_created_in],
            "page size {page}"
        );
    }
    // No lower bound: everything created or modified before hi.
    let open = SyncWindow { lo: None, hi };
    assert_eq!(
        all_ids(&db.pool, EntityKind::Repayment, INCREMENTAL, &open, 2).await,
        vec![
            at_lo,
            only_modified_in,
            in_window,
            only_created_in,
            modified_at_hi,
            untouched
        ]
    );
}

/// A loan whose own `date_modified` is old (fixture time) with one schedule row and one
/// repayment, both also at fixture time.
async fn old_loan(pool: &sqlx::PgPool, agent: i64, borrower: i64) -> (i64, i64, i64) {
    let loan = insert_loan(pool, agent, borrower, true).await;
    let schedule = insert_schedule(pool, loan, &Installment::new(day("2026-01-10"), 1000.0)).await;
    let repayment = insert_repayment(pool, loan).await;
    (loan, schedule, repayment)
}

async fn set_schedule_modified(pool: &sqlx::PgPool, schedule: i64, ts: DateTime<Utc>) {
    let done =
        sqlx::query("UPDATE loans_ajoloanschedule SET date_modified = $2 WHERE id = $1::int4")
            .bind(schedule)
            .bind(ts)
            .execute(pool)
            .await
            .unwrap();
    assert_eq!(done.rows_affected(), 1);
}

async fn set_repayment_times(
    pool: &sqlx::PgPool,
    repayment: i64,
    created: DateTime<Utc>,
    modified: DateTime<Utc>,
) {
    let done = sqlx::query(
        "UPDATE loans_ajoloanrepayment SET date_created = $2, date_modified = $3 \
         WHERE id = $1::int4",
    )
    .bind(repayment)
    .bind(created)
    .bind(modified)
    .execute(pool)
    .await
    .unwrap();
    assert_eq!(done.rows_affected(), 1);
}

#[tokio::test]
async fn loans_incremental_also_takes_those_whose_schedule_or_repayments_changed_in_window() {
    let db = TestApp::migrated().await;
    let agent = insert_officer(&db.pool, "AGENT", "REGULAR").await;
    let borrower = insert_customer(&db.pool, Some(agent), true).await;
    let w = window();
    let (lo, hi) = (w.lo.unwrap(), w.hi);
    let (untouched, _, _) = old_loan(&db.pool, agent, borrower).await;
    let (schedule_in, schedule_row, _) = old_loan(&db.pool, agent, borrower).await;
    let (repayment_added, _, _) = old_loan(&db.pool, agent, borrower).await;
    let (repayment_modified, _, old_repayment) = old_loan(&db.pool, agent, borrower).await;
    let (schedule_at_hi, schedule_at_hi_row, _) = old_loan(&db.pool, agent, borrower).await;
    let (repayment_after, _, late_repayment) = old_loan(&db.pool, agent, borrower).await;
    let (everything, everything_row, everything_rep) = old_loan(&db.pool, agent, borrower).await;
    let (pending_own, _, _) = old_loan(&db.pool, agent, borrower).await;

    // (a) A schedule row modified in the window (an installment paid).
    set_schedule_modified(&db.pool, schedule_row, lo + Duration::minutes(5)).await;
    // (b) A repayment added in the window, modified again after it: its date_created counts.
    let added = insert_repayment(&db.pool, repayment_added).await;
    set_repayment_times(
        &db.pool,
        added,
        lo + Duration::minutes(6),
        hi + Duration::hours(2),
    )
    .await;
    // (c) An old repayment modified in the window (its status changed).
    set_repayment_times(&db.pool, old_repayment, fixture_time(), lo).await;
    // Outside the window: a schedule row modified exactly at hi, a repayment after it.
    set_schedule_modified(&db.pool, schedule_at_hi_row, hi).await;
    set_repayment_times(&db.pool, late_repayment, hi, hi + Duration::minutes(1)).await;
    // Every condition at once, several schedule rows too: the loan comes once.
    set_modified(
        &db.pool,
        EntityKind::Loan,
        everything,
        lo + Duration::minutes(7),
    )
    .await;
    set_schedule_modified(&db.pool, everything_row, lo + Duration::minutes(8)).await;
    for _ in 0..3 {
        let extra = insert_schedule(
            &db.pool,
            everything,
            &Installment::new(day("2026-02-01"), 5.0),
        )
        .await;
        set_schedule_modified(&db.pool, extra, lo + Duration::minutes(9)).await;
    }
    set_repayment_times(&db.pool, everything_rep, lo, lo + Duration::minutes(10)).await;
    // Its own date_modified in the window, not disbursed: still selected, as before.
    sqlx::query("UPDATE loans_ajoloan SET is_disbursed = false WHERE id = $1::int4")
        .bind(pending_own)
        .execute(&db.pool)
        .await
        .unwrap();
    set_modified(
        &db.pool,
        EntityKind::Loan,
        pending_own,
        hi - Duration::microseconds(1),
    )
    .await;

    let want = vec![
        schedule_in,
        repayment_added,
        repayment_modified,
        everything,
        pending_own,
    ];
    for page in [1, 2, 3, 100] {
        assert_eq!(
            all_ids(&db.pool, EntityKind::Loan, INCREMENTAL, &w, page).await,
            want,
            "page size {page}"
        );
    }
    let _ = (untouched, schedule_at_hi, repayment_after);
    // A page that starts after a selected id the other conditions also select.
    let mut conn = db.pool.acquire().await.unwrap();
    assert_eq!(
        next_ids(
            &mut conn,
            EntityKind::Loan,
            INCREMENTAL,
            &w,
            repayment_modified,
            2
        )
        .await
        .unwrap(),
        vec![everything, pending_own]
    );
    // No lower bound: every loan with anything before hi (all have fixture-time rows).
    let open = SyncWindow { lo: None, hi };
    let all: Vec<i64> = sqlx::query_scalar("SELECT id::int8 FROM loans_ajoloan ORDER BY id")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        all_ids(&db.pool, EntityKind::Loan, INCREMENTAL, &open, 3).await,
        all
    );
}

async fn page(conn: &mut sqlx::PgConnection, w: &SyncWindow, after: i64, limit: i64) -> Vec<i64> {
    next_ids(conn, EntityKind::Customer, FULL, w, after, limit)
        .await
        .unwrap()
}

#[tokio::test]
async fn keyset_pages_are_ascending_disjoint_and_complete() {
    let db = TestApp::migrated().await;
    let agent = insert_officer(&db.pool, "AGENT", "REGULAR").await;
    let mut want = Vec::new();
    for i in 0..23 {
        let id = insert_customer(&db.pool, Some(agent), i % 4 != 0).await;
        if i % 4 != 0 {
            want.push(id);
        }
    }
    let mut conn = db.pool.acquire().await.unwrap();
    let w = full_window();
    assert_eq!(page(&mut conn, &w, 0, 5).await, want[..5].to_vec());
    assert_eq!(page(&mut conn, &w, want[4], 5).await, want[5..10].to_vec());
    // `after` need not be a selected id: here a customer that is not onboarded.
    let gap = (want[9]..).find(|id| !want.contains(id)).unwrap();
    let rest: Vec<i64> = want.iter().copied().filter(|&id| id > gap).collect();
    assert!(rest.len() >= 5);
    assert_eq!(page(&mut conn, &w, gap, 100).await, rest);
    assert!(
        page(&mut conn, &w, *want.last().unwrap(), 5)
            .await
            .is_empty()
    );
    assert!(page(&mut conn, &w, 0, 0).await.is_empty());
    drop(conn);
    for size in [1, 4, 17, 1000] {
        assert_eq!(
            all_ids(&db.pool, EntityKind::Customer, FULL, &w, size).await,
            want
        );
    }
}

#[tokio::test]
async fn a_loan_chunk_carries_related_fields_and_exact_aggregates() {
    let db = TestApp::migrated().await;
    let agent = insert_officer(&db.pool, "AJO_AGENT", "KEY_ACCOUNT").await;
    let borrowers_agent = insert_officer(&db.pool, "AGENT", "REGULAR").await;
    let borrower = insert_customer(&db.pool, Some(borrowers_agent), true).await;
    sqlx::query("UPDATE ajo_ajouser SET branch_name = 'Yaba' WHERE id = $1::int4")
        .bind(borrower)
        .execute(&db.pool)
        .await
        .unwrap();
    let full = insert_loan(&db.pool, agent, borrower, true).await;
    let bare = insert_loan(&db.pool, agent, borrower, false).await;
    for i in [
        Installment::new(day("2026-01-05"), 4000.0).paid(),
        Installment::new(day("2026-01-06"), 4000.0).paid().late(2),
        Installment::new(day("2026-01-08"), 4000.5).late(5),
        Installment::new(day("2026-01-07"), 4000.0),
        Installment {
            due_date: None,
            ..Installment::new(day("2026-01-01"), 1000.0)
        },
    ] {
        insert_schedule(&db.pool, full, &i).await;
    }
    let t1: DateTime<Utc> = "2026-01-05T10:00:00Z".parse().unwrap();
    let t2: DateTime<Utc> = "2026-01-06T16:30:00.25Z".parse().unwrap();
    insert_repayment_with(&db.pool, full, 4000.0, t2).await;
    insert_repayment_with(&db.pool, full, 2500.25, t1).await;

    let chunk = load_chunk(&db.pool, EntityKind::Loan, &[bare, full])
        .await
        .unwrap();
    assert!(chunk.missing.is_empty());
    assert_eq!(chunk.warnings, 0);
    assert_eq!(
        chunk.records.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![full, bare]
    );

    let v = by_id(&chunk, full);
    assert_eq!(v["id"], full);
    assert_eq!(v["agent_id"], agent);
    assert_eq!(v["borrower_id"], borrower);
    assert!(v["eligibility_id"].is_i64());
    assert_eq!(v["guarantor_id"], Value::Null);
    assert_eq!(v["agent_email"], format!("officer{agent}@example.com"));
    assert_eq!(v["agent_branch"], format!("Branch {agent}"));
    assert_eq!(v["borrower_agent_id"], borrowers_agent);
    assert_eq!(v["borrower_branch"], "Yaba");
    assert_eq!(v["borrower_full_name"], "Adébáyọ̀ Ọlátúnjí");
    assert_eq!(v["is_disbursed"], true);
    assert_eq!(v["date_disbursed"], "2026-01-01T00:00:00Z");
    assert_eq!(v["start_date"], "2026-01-02");
    assert_eq!(v["amount"], 100000.0);
    assert_eq!(
        v["schedule"],
        json!({
            "installments": 5,
            "installments_paid": 2,
            "installments_late": 2,
            "max_late_days": 5,
            "amount_due": 17000.5,
            "amount_paid": 8000.0,
            "amount_left": 9000.5,
            "next_due_date": "2026-01-07",
        })
    );
    assert_eq!(
        v["repayments"],
        json!({"count": 2, "total_amount": 6500.25, "last_paid_date": "2026-01-06T16:30:00.250Z"})
    );

    let e = by_id(&chunk, bare);
    assert_eq!(e["is_disbursed"], false);
    assert_eq!(e["date_disbursed"], Value::Null);
    assert_eq!(
        e["schedule"],
        json!({
            "installments": 0, "installments_paid": 0, "installments_late": 0,
            "max_late_days": 0, "amount_due": 0.0, "amount_paid": 0.0, "amount_left": 0.0,
            "next_due_date": null,
        })
    );
    assert_eq!(
        e["repayments"],
        json!({"count": 0, "total_amount": 0.0, "last_paid_date": null})
    );
}

#[tokio::test]
async fn nan_and_infinity_in_the_database_are_sent_as_null_and_counted() {
    let db = TestApp::migrated().await;
    let agent = insert_officer(&db.pool, "AGENT", "REGULAR").await;
    let customer = insert_customer(&db.pool, Some(agent), true).await;
    let loan = insert_loan(&db.pool, agent, customer, true).await;
    insert_schedule(
        &db.pool,
        loan,
        &Installment::new(day("2026-01-05"), f64::INFINITY),
    )
    .await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "UPDATE loans_ajoloan SET nem_fee = 'NaN' WHERE id = {loan};
         UPDATE ajo_ajouser SET longitude = '-Infinity' WHERE id = {customer};"
    )))
    .execute(&db.pool)
    .await
    .unwrap();
    let chunk = load_chunk(&db.pool, EntityKind::Loan, &[loan])
        .await
        .unwrap();
    // nem_fee, and the installment's due_amount and amount_left (both infinite sums).
    assert_eq!(chunk.warnings, 3);
    let v = by_id(&chunk, loan);
    assert_eq!(v["nem_fee"], Value::Null);
    assert_eq!(v["schedule"]["amount_due"], Value::Null);
    assert_eq!(v["schedule"]["amount_left"], Value::Null);
    assert_eq!(v["schedule"]["amount_paid"], 0.0);
    let chunk = load_chunk(&db.pool, EntityKind::Customer, &[customer])
        .await
        .unwrap();
    assert_eq!(chunk.warnings, 1);
    assert_eq!(by_id(&chunk, customer)["longitude"], Value::Null);
}

#[tokio::test]
async fn customer_officer_and_repayment_chunks_carry_their_derived_fields() {
    let db = TestApp::migrated().await;
    let agent = insert_officer(&db.pool, "AGENT", "KEY_ACCOUNT").await;
    let lonely = insert_officer(&db.pool, "STAFF_AGENT", "REGULAR").await;
    let named = insert_customer(&db.pool, Some(agent), true).await;
    let unnamed = insert_customer(&db.pool, Some(agent), false).await;
    let orphan = insert_customer(&db.pool, None, true).await;
    sqlx::query(
        "UPDATE ajo_ajouser SET first_name = '  ', last_name = NULL, bvn = '', nin = NULL
         WHERE id = $1::int4",
    )
    .bind(unnamed)
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("UPDATE ajo_ajouser SET first_name = NULL WHERE id = $1::int4")
        .bind(orphan)
        .execute(&db.pool)
        .await
        .unwrap();

    let c = load_chunk(&db.pool, EntityKind::Customer, &[orphan, named, unnamed])
        .await
        .unwrap();
    let v = by_id(&c, named);
    assert_eq!(v["agent_id"], agent);
    assert!(v.get("user_id").is_none());
    assert_eq!(v["full_name"], "Adébáyọ̀ Ọlátúnjí");
    assert_eq!(
        (v["has_bvn"].clone(), v["has_nin"].clone()),
        (json!(true), json!(true))
    );
    assert_eq!(v["dob"], "1988-02-29");
    assert_eq!(v["date_modified"], "2026-01-01T00:00:00Z");
    assert_eq!(v["lite_user_id"], Value::Null);
    let v = by_id(&c, unnamed);
    assert_eq!(v["full_name"], format!("+234806{unnamed:07}"));
    assert_eq!(
        (v["has_bvn"].clone(), v["has_nin"].clone()),
        (json!(false), json!(false))
    );
    let v = by_id(&c, orphan);
    assert_eq!(v["agent_id"], Value::Null);
    assert_eq!(v["full_name"], "Ọlátúnjí");

    let o = load_chunk(&db.pool, EntityKind::Officer, &[agent, lonely])
        .await
        .unwrap();
    let v = by_id(&o, agent);
    assert_eq!(v["customers_count"], 2, "named and unnamed, not the orphan");
    assert_eq!(v["account_type"], "KEY_ACCOUNT");
    assert_eq!(v["bucket"], json!(["A"]));
    assert_eq!(v["date_joined"], "2026-01-01T00:00:00Z");
    assert_eq!(by_id(&o, lonely)["customers_count"], 0);

    let loan = insert_loan(&db.pool, agent, named, true).await;
    let rep = insert_repayment(&db.pool, loan).await;
    let r = load_chunk(&db.pool, EntityKind::Repayment, &[rep])
        .await
        .unwrap();
    let v = by_id(&r, rep);
    let (loan_ref, rep_ref): (String, uuid::Uuid) = sqlx::query_as(
        "SELECT l.loan_ref::text, r.repayment_ref FROM loans_ajoloanrepayment r
         JOIN loans_ajoloan l ON l.id = r.ajo_loan_id WHERE r.id = $1::int4",
    )
    .bind(rep)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(v["loan_ref"], loan_ref);
    assert_eq!(v["repayment_ref"], rep_ref.hyphenated().to_string());
    assert_eq!(v["ajo_loan_id"], loan);
    assert_eq!(v["agent_id"], agent);
    assert_eq!(v["borrower_id"], named);
    assert_eq!(v["repayment_amount"], 4000.0);
    assert_eq!(v["comment"], "Paid at Ọjà market");
}

#[tokio::test]
async fn no_loaded_record_carries_a_never_send_column() {
    let db = TestApp::migrated().await;
    let agent = insert_officer(&db.pool, "AGENT", "REGULAR").await;
    let customer = insert_customer(&db.pool, Some(agent), true).await;
    let loan = insert_loan(&db.pool, agent, customer, true).await;
    insert_schedule(&db.pool, loan, &Installment::new(day("2026-01-05"), 10.0)).await;
    let rep = insert_repayment(&db.pool, loan).await;
    for (entity, id) in [
        (EntityKind::Officer, agent),
        (EntityKind::Customer, customer),
        (EntityKind::Loan, loan),
        (EntityKind::Repayment, rep),
    ] {
        let chunk = load_chunk(&db.pool, entity, &[id]).await.unwrap();
        assert_eq!(chunk.records.len(), 1);
        let text = chunk.records[0].json.get();
        assert!(
            !text.contains(SECRET),
            "{entity} record leaks a secret: {text}"
        );
        let v: Value = serde_json::from_str(text).unwrap();
        let mut keys = Vec::new();
        collect_keys(&v, &mut keys);
        for k in NEVER_SEND {
            assert!(
                !keys.contains(&k.to_string()),
                "{entity} record carries {k}"
            );
        }
    }
}

fn collect_keys(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                out.push(k.clone());
                collect_keys(v, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| collect_keys(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn load_chunk_reports_missing_ids_and_orders_by_id() {
    let db = TestApp::migrated().await;
    let agent = insert_officer(&db.pool, "AGENT", "REGULAR").await;
    let a = insert_customer(&db.pool, Some(agent), true).await;
    let b = insert_customer(&db.pool, Some(agent), false).await; // filter state is ignored
    let c = insert_customer(&db.pool, Some(agent), true).await;
    sqlx::query("DELETE FROM ajo_ajouser WHERE id = $1::int4")
        .bind(b)
        .execute(&db.pool)
        .await
        .unwrap();
    let d = insert_customer(&db.pool, Some(agent), false).await;
    let chunk = load_chunk(&db.pool, EntityKind::Customer, &[d, 999_999, c, b, a])
        .await
        .unwrap();
    assert_eq!(
        chunk.records.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![a, c, d]
    );
    assert_eq!(chunk.missing, vec![b, 999_999]);
    assert_eq!(by_id(&chunk, d)["onboarding_complete"], false);

    for entity in EntityKind::ALL {
        let none = load_chunk(&db.pool, entity, &[]).await.unwrap();
        assert!(none.records.is_empty() && none.missing.is_empty());
        let gone = load_chunk(&db.pool, entity, &[424_242]).await.unwrap();
        assert!(gone.records.is_empty());
        assert_eq!(gone.missing, vec![424_242]);
    }
}

/// Counts the statements sqlx executes (its `sqlx::query` events) in this thread, and
/// keeps their summaries for the assertion's message.
struct CountQueries(
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CountQueries {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Summary(String);
        impl tracing::field::Visit for Summary {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "summary" {
                    self.0 = format!("{value:?}");
                }
            }
        }
        if event.metadata().target() == "sqlx::query" {
            let mut summary = Summary(String::new());
            event.record(&mut summary);
            self.1.lock().unwrap().push(summary.0);
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// A chunk of 50 loans, each with its own schedule and repayments, loads correctly in
/// ONE query, the same single query as a chunk of one loan (the agent, borrower,
/// schedule and repayment aggregates are joined in that statement: no query per row).
#[tokio::test(flavor = "current_thread")]
async fn a_chunk_of_50_loans_is_one_query() {
    use std::sync::atomic::Ordering;
    use tracing_subscriber::layer::SubscriberExt;

    let db = TestApp::migrated().await;
    let agent = insert_officer(&db.pool, "AGENT", "REGULAR").await;
    let borrower = insert_customer(&db.pool, Some(agent), true).await;
    let mut loans = Vec::new();
    for i in 0..50usize {
        let loan = insert_loan(&db.pool, agent, borrower, i % 2 == 0).await;
        for k in 0..(i % 4) {
            let due = day("2026-01-01") + Duration::days(k as i64);
            insert_schedule(&db.pool, loan, &Installment::new(due, 100.0 + i as f64)).await;
        }
        for _ in 0..(i % 3) {
            insert_repayment_with(&db.pool, loan, 10.0 * i as f64, fixture_time()).await;
        }
        loans.push(loan);
    }

    // A pool of one connection, warmed up, so that only the chunk's statements run.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await
        .unwrap();
    load_chunk(&pool, EntityKind::Loan, &loans[..1])
        .await
        .unwrap();

    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let subscriber = tracing_subscriber::registry().with(CountQueries(count.clone(), seen.clone()));
    let _guard = tracing::subscriber::set_default(subscriber);
    // Under `cargo test` other tests' threads create dispatchers of their own meanwhile.
    // One whose interest rebuild ran unlocked (while the process had only its global
    // dispatcher) and stored its result after this subscriber registered leaves the sqlx
    // callsite cached as "never": the first chunk then counted 0 queries (1 run in 3).
    // Once this subscriber is registered every rebuild includes it, so: rebuilt until
    // this subscriber sees sqlx's events (a deadline, no sleep), then counted from zero.
    let deadline = std::time::Duration::from_secs(30);
    crate::support::wait_for("the subscriber sees sqlx's events", deadline, || {
        tracing::callsite::rebuild_interest_cache();
        let (pool, count, loan) = (pool.clone(), count.clone(), loans[0]);
        async move {
            load_chunk(&pool, EntityKind::Loan, &[loan]).await.unwrap();
            count.load(Ordering::SeqCst) > 0
        }
    })
    .await;
    assert!(count.swap(0, Ordering::SeqCst) > 0, "no sqlx event seen");
    seen.lock().unwrap().clear();

    let one = load_chunk(&pool, EntityKind::Loan, &loans[..1])
        .await
        .unwrap();
    assert_eq!(one.records.len(), 1);
    assert_eq!(
        count.swap(0, Ordering::SeqCst),
        1,
        "a chunk of one loan: one query, seen {:?}",
        seen.lock().unwrap()
    );
    seen.lock().unwrap().clear();

    let chunk = load_chunk(&pool, EntityKind::Loan, &loans).await.unwrap();
    assert_eq!(
        count.load(Ordering::SeqCst),
        1,
        "a chunk of 50 loans: still one query, seen {:?}",
        seen.lock().unwrap()
    );

    assert_eq!(
        chunk.records.iter().map(|r| r.id).collect::<Vec<_>>(),
        loans
    );
    assert!(chunk.missing.is_empty());
    for (i, &loan) in loans.iter().enumerate() {
        let v = by_id(&chunk, loan);
        let n = (i % 4) as f64;
        assert_eq!(v["schedule"]["installments"], i % 4, "loan {loan}");
        assert_eq!(
            v["schedule"]["amount_due"],
            n * (100.0 + i as f64),
            "loan {loan}"
        );
        let next = (i % 4 > 0).then_some("2026-01-01");
        assert_eq!(v["schedule"]["next_due_date"], json!(next), "loan {loan}");
        assert_eq!(v["repayments"]["count"], i % 3, "loan {loan}");
        assert_eq!(
            v["repayments"]["total_amount"],
            (i % 3) as f64 * 10.0 * i as f64,
            "loan {loan}"
        );
        assert_eq!(v["is_disbursed"], i % 2 == 0);
        assert_eq!(v["agent_email"], format!("officer{agent}@example.com"));
    }
    pool.close().await;
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
    let stub = crate::harness::stub(Faults::default()).await;
    let settings = settings_for(&db, &stub.url(), &[]);
    let loans_only = |t| PlanRequest {
        sync_type: t,
        entities: Some(vec![EntityKind::Loan]),
        request_id: None,
        since: None,
        until: None,
        sweep: false,
    };
    let first = loansync::app::sync_in_process(&db.pool, &settings, &loans_only(SyncType::Full))
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
        loansync::app::sync_in_process(&db.pool, &settings, &loans_only(SyncType::Incremental))
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
        loansync::app::sync_in_process(&db.pool, &settings, &loans_only(SyncType::Incremental))
            .await
            .unwrap();
    assert_eq!(third.exit_code(), 0);
    let after = stub.received();
    assert!(
        after.ids_sent_since(&before, EntityKind::Loan).contains(&2),
        "the late-committed row was lost"
    );
}

/// The newest sample of the xid clock, taken now, and the 32-bit id of a transaction
/// that wrote after it and committed.
async fn sample_then_write(pool: &sqlx::PgPool) -> (DateTime<Utc>, i64) {
    loansync::ledger::clock::sample_now(pool).await.unwrap();
    let sampled: DateTime<Utc> =
        sqlx::query_scalar("SELECT at FROM loansync_xid_clock ORDER BY xid DESC LIMIT 1")
            .fetch_one(pool)
            .await
            .unwrap();
    let mut tx = pool.begin().await.unwrap();
    let xid: i64 = sqlx::query_scalar("SELECT pg_current_xact_id()::text::bigint % 4294967296")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    (sampled, xid)
}

/// SPEC.md section 2: a prepared transaction (`PREPARE TRANSACTION`) is no session, yet it
/// may commit at any time: it caps the window, at its first write (the xid clock: its
/// start is recorded nowhere, and `prepared` is later than its writes).
///
/// The test server runs with `max_prepared_transactions = 0` (no PREPARE possible, and
/// its configuration is not the tests' to change), so the planner's connection is shown
/// a `pg_prepared_xacts` of the test's own: a view of the same columns in `public`, put
/// first on that connection's search_path. Where the server allows PREPARE, a real
/// prepared transaction is tested as well.
#[tokio::test]
async fn a_prepared_transaction_caps_the_window_at_its_first_write() {
    use loansync::ledger::clock::window_hi;
    use sqlx::Connection;
    let db = TestApp::migrated().await;
    let mut planner = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let (sampled, xid) = sample_then_write(&db.pool).await;
    let hi = window_hi(&mut planner).await.unwrap().unwrap();
    assert!(hi > sampled, "nothing is open: the window ends now");

    let prepared = |xid: i64, database: &str| {
        sqlx::AssertSqlSafe(format!(
            "CREATE OR REPLACE VIEW public.pg_prepared_xacts AS \
             SELECT '{xid}'::xid AS transaction, 'ls_test'::text AS gid, now() AS prepared, \
                    current_user::name AS owner, {database}::name AS database"
        ))
    };
    sqlx::query(prepared(xid, "current_database()"))
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("SET search_path = public, pg_catalog")
        .execute(&mut planner)
        .await
        .unwrap();
    assert_eq!(
        window_hi(&mut planner).await.unwrap().unwrap(),
        sampled,
        "the window ends at the newest sample before the prepared transaction's id"
    );

    // One prepared in another database does not count.
    sqlx::query(prepared(xid, "'elsewhere'"))
        .execute(&db.pool)
        .await
        .unwrap();
    assert!(window_hi(&mut planner).await.unwrap().unwrap() > sampled);

    // One older than the clock's first sample cannot be bounded: nothing is planned, and
    // the error says where to look.
    let first: i64 = sqlx::query_scalar(
        "SELECT xid32::text::bigint FROM loansync_xid_clock ORDER BY xid LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query(prepared(first - 1, "current_database()"))
        .execute(&db.pool)
        .await
        .unwrap();
    let unbounded = window_hi(&mut planner).await.unwrap().unwrap_err();
    assert!(
        unbounded.to_string().contains("pg_prepared_xacts"),
        "{unbounded}"
    );
    sqlx::query("DROP VIEW public.pg_prepared_xacts")
        .execute(&db.pool)
        .await
        .unwrap();
    planner.close().await.unwrap();

    let max: String = sqlx::query_scalar("SHOW max_prepared_transactions")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    if max == "0" {
        eprintln!("max_prepared_transactions = 0: no real PREPARE TRANSACTION tested");
        return;
    }
    let (sampled, _) = sample_then_write(&db.pool).await;
    let gid = format!("ls_{}", uuid::Uuid::new_v4().simple());
    let mut preparer = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "BEGIN; SELECT pg_current_xact_id(); PREPARE TRANSACTION '{gid}'"
    )))
    .execute(&mut preparer)
    .await
    .unwrap();
    preparer.close().await.unwrap();
    let mut planner = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let hi = window_hi(&mut planner).await.unwrap();
    // Ended before asserting: a prepared transaction outlives its session, and would keep
    // the test's database from being dropped.
    sqlx::query(sqlx::AssertSqlSafe(format!("ROLLBACK PREPARED '{gid}'")))
        .execute(&mut planner)
        .await
        .unwrap();
    assert_eq!(
        hi,
        Ok(sampled),
        "a real prepared transaction caps the window"
    );
}

/// An HTTP server on a loopback port in front of the stub API: forwards every request
/// as it came and keeps each JSON body the stub accepted (`2xx`), so a test can read the
/// records that were actually sent.
struct RecordingApi {
    url: String,
    bodies: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl RecordingApi {
    async fn start(upstream: String) -> RecordingApi {
        use axum::body::Bytes;
        use axum::http::{HeaderMap, StatusCode, Uri};
        type Kept = std::sync::Arc<std::sync::Mutex<Vec<Value>>>;
        async fn forward(
            axum::extract::State((client, upstream, kept)): axum::extract::State<(
                reqwest::Client,
                String,
                Kept,
            )>,
            uri: Uri,
            headers: HeaderMap,
            body: Bytes,
        ) -> (StatusCode, Bytes) {
            let mut out = reqwest::header::HeaderMap::new();
            for name in [
                "authorization",
                "idempotency-key",
                "content-type",
                "content-encoding",
            ] {
                if let Some(v) = headers.get(name) {
                    out.insert(name, v.clone());
                }
            }
            let resp = client
                .post(format!("{upstream}{}", uri.path()))
                .headers(out)
                .body(body.clone())
                .send()
                .await
                .expect("the stub answers");
            let status = StatusCode::from_u16(resp.status().as_u16()).unwrap();
            let answer = resp.bytes().await.expect("the stub's body");
            if status.is_success() {
                let v: Value = serde_json::from_slice(&body).expect("a JSON body (gzip is off)");
                kept.lock().unwrap().push(v);
            }
            (status, answer)
        }
        let bodies: Kept = Default::default();
        let app = axum::Router::new()
            .route("/{*path}", axum::routing::post(forward))
            .with_state((reqwest::Client::new(), upstream, bodies.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        RecordingApi {
            url,
            bodies,
            stop: Some(stop),
        }
    }

    /// The records of `entity` sent by syncs of this type, in the order sent.
    fn records(&self, sync_type: &str, entity: EntityKind) -> Vec<Value> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .filter(|b| b["sync_type"] == sync_type && b["entity_type"] == entity.to_string())
            .flat_map(|b| b["records"].as_array().cloned().unwrap_or_default())
            .collect()
    }
}

impl Drop for RecordingApi {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn sent(records: &[Value], id: i64) -> &Value {
    records
        .iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("loan {id} was not sent: {records:#?}"))
}

#[tokio::test]
async fn an_incremental_sync_resends_loans_whose_schedule_or_repayments_changed() {
    let db = TestApp::migrated().await;
    let stub = crate::harness::stub(Faults::default()).await;
    let api = RecordingApi::start(stub.url()).await;
    let settings = settings_for(&db, &api.url, &[("ANALYTICS_GZIP", "false")]);
    let agent = insert_officer(&db.pool, "AGENT", "REGULAR").await;
    let borrower = insert_customer(&db.pool, Some(agent), true).await;
    // Four disbursed loans, all last modified (themselves, their schedule row, their
    // repayment) at fixture time, long before any window of this test.
    let (schedule_paid, schedule_row, _) = old_loan(&db.pool, agent, borrower).await;
    let (repayment_added, _, _) = old_loan(&db.pool, agent, borrower).await;
    let (repayment_corrected, _, corrected) = old_loan(&db.pool, agent, borrower).await;
    let (untouched, _, _) = old_loan(&db.pool, agent, borrower).await;
    let request = |t| PlanRequest {
        sync_type: t,
        entities: Some(vec![EntityKind::Loan, EntityKind::Repayment]),
        request_id: None,
        since: None,
        until: None,
        sweep: false,
    };
    let full = loansync::app::sync_in_process(&db.pool, &settings, &request(SyncType::Full))
        .await
        .unwrap();
    assert_eq!(full.exit_code(), 0, "{}", full.render());
    let before = api.records("full", EntityKind::Loan);
    assert_eq!(before.len(), 4);

    // Django changes the aggregates, never the loans' own date_modified:
    // (a) the installment is paid,
    sqlx::query(
        "UPDATE loans_ajoloanschedule SET fully_paid = true, paid_amount = due_amount, \
         amount_left = 0, paid_date = due_date, fully_paid_date = due_date, \
         date_modified = now() WHERE id = $1::int4",
    )
    .bind(schedule_row)
    .execute(&db.pool)
    .await
    .unwrap();
    // (b) a repayment is recorded (created now),
    let added = insert_repayment_with(
        &db.pool,
        repayment_added,
        2500.0,
        "2026-01-05T00:00:00Z".parse().unwrap(),
    )
    .await;
    sqlx::query(
        "UPDATE loans_ajoloanrepayment SET date_created = now(), date_modified = now() \
         WHERE id = $1::int4",
    )
    .bind(added)
    .execute(&db.pool)
    .await
    .unwrap();
    // (c) an old repayment is corrected (its amount and status; modified now).
    sqlx::query(
        "UPDATE loans_ajoloanrepayment SET repayment_amount = repayment_amount + 1000, \
         settlement_status = false, date_modified = now() WHERE id = $1::int4",
    )
    .bind(corrected)
    .execute(&db.pool)
    .await
    .unwrap();

    let incr = loansync::app::sync_in_process(&db.pool, &settings, &request(SyncType::Incremental))
        .await
        .unwrap();
    assert_eq!(incr.exit_code(), 0, "{}", incr.render());
    let loans = api.records("incremental", EntityKind::Loan);
    let mut ids: Vec<i64> = loans.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![schedule_paid, repayment_added, repayment_corrected]
    );
    assert!(!ids.contains(&untouched));
    // Each was sent with its fresh aggregates.
    let (old, new) = (sent(&before, schedule_paid), sent(&loans, schedule_paid));
    assert_eq!(old["schedule"]["installments_paid"], 0);
    assert_eq!(new["schedule"]["installments_paid"], 1);
    assert_eq!(new["schedule"]["amount_left"], 0.0);
    let (old, new) = (
        sent(&before, repayment_added),
        sent(&loans, repayment_added),
    );
    assert_eq!(old["repayments"]["count"], 1);
    assert_eq!(new["repayments"]["count"], 2);
    assert_eq!(
        new["repayments"]["total_amount"].as_f64().unwrap(),
        old["repayments"]["total_amount"].as_f64().unwrap() + 2500.0
    );
    let (old, new) = (
        sent(&before, repayment_corrected),
        sent(&loans, repayment_corrected),
    );
    assert_eq!(
        new["repayments"]["total_amount"].as_f64().unwrap(),
        old["repayments"]["total_amount"].as_f64().unwrap() + 1000.0
    );
    // The repayments themselves: the new one and the corrected one, nothing else.
    let mut reps: Vec<i64> = api
        .records("incremental", EntityKind::Repayment)
        .iter()
        .map(|r| r["id"].as_i64().unwrap())
        .collect();
    reps.sort();
    assert_eq!(reps, vec![corrected, added]);
    // The stub accepted what the recorder saw.
    let received = stub.received();
    assert_eq!(received.ids(EntityKind::Loan).len(), 4);
}
