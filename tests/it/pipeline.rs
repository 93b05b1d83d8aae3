//! The sync pipeline end to end: planner → RabbitMQ → two workers → the stub analytics
//! API on a loopback port, against a real PostgreSQL database of the test's own.

use crate::harness::*;
use loansync::domain::{EntityKind, PlanRequest, SyncType};
use loansync::planner::{self, PlanOutcome};
use loansync::queue::memory::MemoryQueue;
use loansync::stub_api::{Faults, StubHandle};
use loansync::worker::{self, ChunkOutcome};
use std::collections::{BTreeMap, BTreeSet};

fn ids(set: &BTreeMap<EntityKind, BTreeSet<i64>>, e: EntityKind) -> &BTreeSet<i64> {
    &set[&e]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_then_incremental_over_rabbitmq() {
    let db = seeded_db(small()).await;
    let expected = expected_full(&db.pool).await;
    // The seed covers what the filters must tell apart.
    let mixed: (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE user_type = 'AGENT' AND account_type = 'KEY_ACCOUNT'), \
                count(*) FILTER (WHERE user_type = 'MERCHANT') FROM accounts_customuser",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        mixed.0 > 0 && mixed.1 > 0,
        "seed lacks officer variety: {mixed:?}"
    );

    let p = Pipeline::start(&db, Faults::default(), &[]).await;
    p.trigger(SyncType::Full, "full-1").await;
    let h = wait_syncs_finished(&db.pool, 1).await;
    assert_eq!(h[0].status, "completed", "{:?}", h[0].error_message);
    let received = p.stub.received();
    assert_eq!(received.forbidden, 0, "a never-send key reached the API");
    assert!(received.status_count(422) == 0 && received.status_count(400) == 0);
    for e in EntityKind::ALL {
        let got: BTreeSet<i64> = received.ids(e);
        assert_eq!(
            &got,
            ids(&expected, e),
            "{e}: ids sent differ from the filters"
        );
        let (total, ok, failed) = h[0].counts(e);
        assert_eq!(
            (total, ok, failed),
            (got.len() as i32, got.len() as i32, 0),
            "{e}"
        );
    }
    // Watermarks moved to the window's end.
    let marks: Vec<(String, chrono::DateTime<chrono::Utc>, String)> = sqlx::query_as(
        "SELECT entity_type::text, last_sync_timestamp, last_sync_id::text FROM etl_folder_etllastsync ORDER BY 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(marks.len(), 4);
    for (_, ts, id) in &marks {
        assert_eq!(Some(*ts), h[0].sync_end_date);
        assert_eq!(id, &h[0].sync_id);
    }

    // Change some rows; the incremental sync sends exactly those (officers: all).
    let changed_loans: Vec<i64> = sqlx::query_scalar(
        "UPDATE loans_ajoloan SET date_modified = now() WHERE id IN (3, 4, 5) RETURNING id::int8",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let onboarded_changed: Vec<i64> = sqlx::query_scalar(
        "UPDATE ajo_ajouser SET date_modified = now() WHERE id IN \
         (SELECT id FROM ajo_ajouser WHERE onboarding_complete ORDER BY id LIMIT 2) RETURNING id::int8",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE ajo_ajouser SET date_modified = now() WHERE id = \
         (SELECT min(id) FROM ajo_ajouser WHERE NOT onboarding_complete)",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // A new repayment: sent, and so is its loan (its `repayments` aggregate changed).
    let (new_repayment, its_loan): (i64, i64) = sqlx::query_as(
        "INSERT INTO loans_ajoloanrepayment (repayment_type, loan_amount, repayment_amount, health_insurance, paid_date, \
         repayment_ref, settlement_status, repayment_meta_response, ledger_amount, comment, borrower_notified, sms_body, \
         sms_result, marked_as, expected_recovery_amt, applied_to_loan, date_created, date_modified, agent_id, ajo_loan_id, borrower_id) \
         SELECT 'CASH', 1, 2, 0, now(), gen_random_uuid(), false, NULL, 0, NULL, false, NULL, NULL, NULL, 0, NULL, now(), now(), \
                agent_id, id, borrower_id FROM loans_ajoloan WHERE is_disbursed ORDER BY id LIMIT 1 \
         RETURNING id::int8, ajo_loan_id::int8",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let before = p.stub.received();
    p.trigger(SyncType::Incremental, "incr-1").await;
    let h = wait_syncs_finished(&db.pool, 2).await;
    assert_eq!(h[1].sync_type, "incremental");
    assert_eq!(h[1].status, "completed", "{:?}", h[1].error_message);
    let after = p.stub.received();
    let sent_now = |e: EntityKind| -> BTreeSet<i64> { after.ids_sent_since(&before, e) };
    assert_eq!(
        sent_now(EntityKind::Loan),
        changed_loans.into_iter().chain([its_loan]).collect()
    );
    assert_eq!(
        sent_now(EntityKind::Customer),
        onboarded_changed.into_iter().collect()
    );
    assert_eq!(
        sent_now(EntityKind::Repayment),
        BTreeSet::from([new_repayment])
    );
    assert_eq!(
        &sent_now(EntityKind::Officer),
        ids(&expected, EntityKind::Officer)
    );
    let wm: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
        "SELECT last_sync_timestamp FROM etl_folder_etllastsync WHERE entity_type = 'loan'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(Some(wm), h[1].sync_end_date);
    assert!(h[1].sync_end_date > h[0].sync_end_date);

    // A repeated request id plans nothing new.
    p.trigger(SyncType::Full, "full-1").await;
    p.trigger(SyncType::Incremental, "incr-2").await;
    let h = wait_syncs_finished(&db.pool, 3).await;
    assert_eq!(h.len(), 3, "the repeated request id planned a sync");
    assert_books_balance(&db.pool).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejected_records_give_error_rows_then_resolve() {
    let db = seeded_db(small()).await;
    let faults = Faults {
        reject_every_nth: 7,
        ..Default::default()
    };
    let p = Pipeline::start(&db, faults, &[]).await;
    p.trigger(SyncType::Full, "r1").await;
    let h = wait_syncs_finished(&db.pool, 1).await;
    assert_eq!(h[0].status, "partial_success");
    assert!(
        h[0].error_message
            .as_deref()
            .unwrap_or("")
            .contains("failed")
    );
    let expected = expected_full(&db.pool).await;
    for e in EntityKind::ALL {
        let want: BTreeSet<String> = expected[&e]
            .iter()
            .filter(|id| *id % 7 == 0)
            .map(|id| id.to_string())
            .collect();
        let got: BTreeSet<String> = sqlx::query_scalar(
            "SELECT entity_id::text FROM etl_folder_etlsyncerror WHERE entity_type = $1 AND NOT resolved",
        )
        .bind(e.as_str())
        .fetch_all(&db.pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
        assert_eq!(got, want, "{e}: error rows");
        assert_eq!(h[0].counts(e).2 as usize, want.len());
    }
    let details: serde_json::Value =
        sqlx::query_scalar("SELECT error_details FROM etl_folder_etlsyncerror ORDER BY id LIMIT 1")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(details.get("http_status").is_some(), "{details}");

    // The API recovers; the next full sync delivers them and resolves their error rows.
    p.stub.set_faults(Faults::default());
    p.trigger(SyncType::Full, "r2").await;
    let h = wait_syncs_finished(&db.pool, 2).await;
    assert_eq!(h[1].status, "completed");
    let open: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM etl_folder_etlsyncerror WHERE NOT resolved OR resolved_at IS NULL",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(open, 0);
    assert_books_balance(&db.pool).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_errors_are_retried_and_a_refused_batch_is_halved() {
    let db = seeded_db(small()).await;
    let bad_loan: i64 = sqlx::query_scalar(
        "SELECT id::int8 FROM loans_ajoloan WHERE is_disbursed ORDER BY id OFFSET 7 LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let faults = Faults {
        fail_next: 4,
        fail_next_status: 503,
        rate_429: 0.1,
        retry_after_secs: 1,
        refuse_ids: vec![bad_loan],
        seed: 3,
        ..Default::default()
    };
    let p = Pipeline::start(&db, faults, &[]).await;
    p.trigger(SyncType::Full, "t1").await;
    let h = wait_syncs_finished(&db.pool, 1).await;
    assert_eq!(h[0].status, "partial_success", "{:?}", h[0].error_message);
    // The stub refuses the id in any entity's batch: exactly that record fails in each
    // entity that has it, and its 99 neighbours go through.
    let expected = expected_full(&db.pool).await;
    for e in EntityKind::ALL {
        let expect_failed = i32::from(expected[&e].contains(&bad_loan));
        assert_eq!(h[0].counts(e).2, expect_failed, "{e}");
    }
    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT entity_type::text, entity_id::text, error_code::text FROM etl_folder_etlsyncerror",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(rows.iter().any(|(e, _, _)| e == "loan"));
    for (_, id, code) in &rows {
        assert_eq!(id, &bad_loan.to_string());
        assert_eq!(code.as_deref(), Some("RECORD_REFUSED"));
    }
    let stats = p.stub.received();
    assert!(stats.status_count(503) >= 4, "the 503s were not seen");
    assert!(stats.status_count(429) >= 1, "no 429 was answered");
    assert!(!stats.ids(EntityKind::Loan).contains(&bad_loan));
    assert_books_balance(&db.pool).await;
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejected_credentials_fail_the_sync_fast() {
    let db = seeded_db(small()).await;
    let p = Pipeline::start(
        &db,
        Faults::default(),
        &[("ANALYTICS_API_KEY", "wrong-key")],
    )
    .await;
    p.trigger(SyncType::Full, "u1").await;
    let h = wait_syncs_finished(&db.pool, 1).await;
    assert_eq!(h[0].status, "failed");
    assert!(
        h[0].error_message
            .as_deref()
            .unwrap_or("")
            .contains("credentials")
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM etl_folder_etlsyncerror")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0, "no error row per record on rejected credentials");
    let marks: i64 = sqlx::query_scalar("SELECT count(*) FROM etl_folder_etllastsync")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(marks, 0, "a failed sync moves no watermark");
    // Fail fast: far fewer requests than chunks.
    let chunks: i64 = sqlx::query_scalar("SELECT count(*) FROM loansync_chunk")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(
        (p.stub.received().status_count(401) as i64) < chunks / 2,
        "remaining chunks were still sent"
    );
    assert_books_balance(&db.pool).await;
    p.stop().await;
}

/// Worker and planner driven directly (no broker): the units the loops are made of.
mod units {
    use super::*;

    async fn stub() -> StubHandle {
        crate::harness::stub(Faults::default()).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn the_same_chunk_job_delivered_twice_counts_once() {
        let db = seeded_db(small()).await;
        let stub = stub().await;
        let settings = settings_for(&db, &stub.url(), &[]);
        let queue = MemoryQueue::new();
        let req = full_request();
        let PlanOutcome::Planned { totals, .. } =
            planner::plan_sync(&db.pool, &settings, &req, &queue)
                .await
                .unwrap()
        else {
            panic!("not planned")
        };
        let ctx = loansync::app::worker_context(&settings, db.pool.clone()).unwrap();
        let mut settled = 0;
        let mut duplicates = 0;
        while let Some(job) = queue.try_pop() {
            // Two deliveries of the same job racing each other, then a third one late.
            let (a, b) = tokio::join!(
                worker::process_chunk(&ctx, &job),
                worker::process_chunk(&ctx, &job)
            );
            let late = worker::process_chunk(&ctx, &job).await.unwrap();
            assert_eq!(late, ChunkOutcome::Duplicate);
            for o in [a.unwrap(), b.unwrap()] {
                match o {
                    ChunkOutcome::Settled { .. } => settled += 1,
                    ChunkOutcome::Duplicate => duplicates += 1,
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!(settled, totals.chunks);
        assert_eq!(duplicates, totals.chunks);
        let h = history(&db.pool).await;
        assert_eq!(h[0].status, "completed");
        for (e, n) in &totals.records {
            assert_eq!(h[0].counts(*e), (*n as i32, *n as i32, 0), "{e}");
        }
        assert_books_balance(&db.pool).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_planning_messages_at_once_yield_one_sync() {
        let db = seeded_db(small()).await;
        let stub = stub().await;
        let settings = settings_for(&db, &stub.url(), &[]);
        let queue = MemoryQueue::new();
        let req = |id: &str| PlanRequest {
            sync_type: SyncType::Full,
            entities: None,
            request_id: Some(id.into()),
            since: None,
            until: None,
            sweep: false,
        };
        let (r1, r2) = (req("a"), req("b"));
        let (a, b) = tokio::join!(
            planner::plan_sync(&db.pool, &settings, &r1, &queue),
            planner::plan_sync(&db.pool, &settings, &r2, &queue)
        );
        let outcomes = [a.unwrap(), b.unwrap()];
        let planned = outcomes
            .iter()
            .filter(|o| matches!(o, PlanOutcome::Planned { .. }))
            .count();
        let busy = outcomes
            .iter()
            .filter(|o| matches!(o, PlanOutcome::Busy { .. }))
            .count();
        assert_eq!((planned, busy), (1, 1), "{outcomes:?}");
        assert_eq!(history(&db.pool).await.len(), 1);
        // While it runs, a third message is refused too; a repeated id plans nothing.
        let c = planner::plan_sync(&db.pool, &settings, &req("c"), &queue)
            .await
            .unwrap();
        assert!(matches!(c, PlanOutcome::Busy { .. }), "{c:?}");
        let again = planner::plan_sync(&db.pool, &settings, &req("a"), &queue)
            .await
            .unwrap();
        assert!(
            matches!(
                again,
                PlanOutcome::Duplicate { .. } | PlanOutcome::Busy { .. }
            ),
            "{again:?}"
        );
        assert_eq!(history(&db.pool).await.len(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn single_process_mode_syncs_the_same_rows() {
        let db = seeded_db(small()).await;
        let stub = stub().await;
        let settings = settings_for(&db, &stub.url(), &[]);
        let expected = expected_full(&db.pool).await;
        let summary = db.full_sync_in_process(&settings).await;
        assert_eq!(summary.exit_code(), 0, "{}", summary.render());
        let received = stub.received();
        assert_delivered_all(&received, &expected);
        // Nothing to send: completes at once, zero counters, watermarks still move.
        let only_loans = PlanRequest {
            sync_type: SyncType::Incremental,
            entities: Some(vec![EntityKind::Loan]),
            request_id: None,
            since: None,
            until: None,
            sweep: false,
        };
        let s2 = loansync::app::sync_in_process(&db.pool, &settings, &only_loans)
            .await
            .unwrap();
        assert_eq!(s2.exit_code(), 0);
        let h = history(&db.pool).await;
        assert_eq!(h[1].status, "completed");
        assert_eq!(h[1].counts(EntityKind::Loan), (0, 0, 0));
        let wm: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(
            "SELECT last_sync_timestamp FROM etl_folder_etllastsync WHERE entity_type = 'loan'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(Some(wm), h[1].sync_end_date);
        assert_books_balance(&db.pool).await;
    }
}
