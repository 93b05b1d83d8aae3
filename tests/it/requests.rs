//! No planning request is lost (issue 11): a request that arrives while a sync runs is
//! kept in PostgreSQL and run when the slot frees, coalesced; `trigger --wait` follows
//! its request to the sync's outcome; a backfill moves no watermark.

use crate::harness::{
    InProcess, assert_books_balance, expected_full, history, loansync_process, seeded_db,
    settings_for, small, stub, wait_syncs_finished,
};
use crate::support::{amqp_url, wait_for};
use loansync::domain::{EntityKind, PlanRequest, SyncType};
use loansync::queue::amqp::Broker;
use loansync::stub_api::Faults;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);

fn request(sync_type: SyncType, id: &str) -> PlanRequest {
    PlanRequest {
        sync_type,
        entities: None,
        request_id: Some(id.into()),
        since: None,
        until: None,
        sweep: false,
    }
}

/// A request without an id, as single-process mode makes.
fn anonymous(sync_type: SyncType) -> PlanRequest {
    PlanRequest {
        request_id: None,
        ..request(sync_type, "")
    }
}

async fn request_state(pool: &sqlx::PgPool, id: &str) -> Option<(String, Option<String>)> {
    sqlx::query_as("SELECT state, sync_id::text FROM loansync_request WHERE request_id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_sync_asked_for_during_a_sync_runs_after_it_and_trigger_wait_reports_it() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let settings = Arc::new(settings_for(&db, &stub.url(), &[]));
    let expected = expected_full(&db.pool).await;
    let admin = Broker::connect(&amqp_url(), &settings.queue_prefix, 7)
        .await
        .unwrap();

    // A planner alone: the first sync is planned and stays running (no worker yet).
    let stop = CancellationToken::new();
    let planner_up = Arc::new(AtomicBool::new(false));
    let planner = tokio::spawn(loansync::app::run_planner(
        db.pool.clone(),
        settings.clone(),
        planner_up.clone(),
        stop.clone(),
    ));
    wait_for("the planner consuming", DEADLINE, || async {
        planner_up.load(Ordering::SeqCst)
    })
    .await;
    admin
        .publish_json(
            &admin.topology.plan,
            &[request(SyncType::Incremental, "first")],
        )
        .await
        .unwrap();
    wait_for("the first sync running", DEADLINE, || async {
        request_state(&db.pool, "first")
            .await
            .is_some_and(|(s, _)| s == "planned")
    })
    .await;

    // The nightly full arrives meanwhile, through `trigger --wait`, and two incrementals.
    let waiting = loansync_process(&db, &settings, &stub.url())
        .args(["trigger", "--full", "--wait", "--timeout", "2m", "--json"])
        .env("ETL_REQUEST_ID", "nightly")
        .output();
    let waiting = tokio::spawn(waiting);
    wait_for("the full request kept as pending", DEADLINE, || async {
        request_state(&db.pool, "nightly")
            .await
            .is_some_and(|(s, _)| s == "pending")
    })
    .await;
    admin
        .publish_json(
            &admin.topology.plan,
            &[
                request(SyncType::Incremental, "inc-1"),
                request(SyncType::Incremental, "inc-2"),
                // A repeated id while pending plans nothing new either.
                request(SyncType::Full, "nightly"),
            ],
        )
        .await
        .unwrap();
    wait_for("the incrementals kept as pending", DEADLINE, || async {
        request_state(&db.pool, "inc-2")
            .await
            .is_some_and(|(s, _)| s == "pending")
    })
    .await;
    let status = loansync_process(&db, &settings, &stub.url())
        .arg("status")
        .output()
        .await
        .unwrap();
    let shown = String::from_utf8_lossy(&status.stdout);
    assert!(shown.contains("3 planning request(s) pending"), "{shown}");
    assert!(shown.contains("nightly"), "{shown}");
    assert_eq!(history(&db.pool).await.len(), 1, "nothing else planned yet");

    // The planner that kept them stops (a rollout); a new planner and workers come, and
    // nothing else is triggered. The first sync ends, then one full sync serves the
    // three pending requests, kept in PostgreSQL across the planner's restart.
    stop.cancel();
    planner.await.unwrap().unwrap();
    let running = InProcess::start(&db, &settings).await;
    let h = wait_syncs_finished(&db.pool, 2).await;
    assert_eq!(h.len(), 2, "{h:?}");
    let full = h
        .iter()
        .find(|h| h.sync_type == "full")
        .expect("the full sync ran");
    assert_eq!(full.status, "completed");
    for id in ["nightly", "inc-1", "inc-2"] {
        assert_eq!(
            request_state(&db.pool, id).await,
            Some(("planned".into(), Some(full.sync_id.clone()))),
            "{id}"
        );
    }
    // The incremental sent what changed in its window; the full sent every row it selects.
    for e in EntityKind::ALL {
        assert!(expected[&e].is_subset(&stub.received().ids(e)), "{e}");
        assert_eq!(full.counts(e).0 as usize, expected[&e].len(), "{e}");
    }

    // `trigger --wait` exited with the full sync's outcome.
    let out = waiting.await.unwrap().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let waited: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(waited["request_id"], "nightly");
    assert_eq!(waited["sync"]["sync_id"], full.sync_id.as_str());
    assert_eq!(waited["sync"]["status"], "completed");
    assert_books_balance(&db.pool).await;

    // Asked again (a retried Job pod), the same id plans nothing and reports the outcome.
    let again = loansync_process(&db, &settings, &stub.url())
        .args([
            "trigger",
            "--full",
            "--wait",
            "--timeout",
            "1m",
            "--request-id",
            "nightly",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(again.status.code(), Some(0), "{again:?}");
    assert_eq!(history(&db.pool).await.len(), 2);

    running.shutdown().await;
    admin.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trigger_wait_times_out_with_its_own_exit_code_and_the_request_stays_kept() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let settings = Arc::new(settings_for(&db, &stub.url(), &[]));
    // No planner runs: the request waits in the queue, and --wait gives up.
    let out = loansync_process(&db, &settings, &stub.url())
        .args([
            "trigger",
            "--wait",
            "--timeout",
            "1s",
            "--json",
            "--request-id",
            "lonely",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(i32::from(loansync::app::EXIT_TIMEOUT)),
        "{out:?}"
    );
    let waited: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(waited["timed_out"], true);
    assert_eq!(waited["request_state"], "unseen");
    // A planner started later plans it: the message was kept by the broker.
    let running = InProcess::start(&db, &settings).await;
    let h = wait_syncs_finished(&db.pool, 1).await;
    assert_eq!(h[0].status, "completed");
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backfill_sends_its_window_and_moves_no_watermark() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let settings = Arc::new(settings_for(&db, &stub.url(), &[]));
    let running = InProcess::start(&db, &settings).await;
    // Seven loans changed in a window long before any seeded row.
    let (since, until): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT now() - interval '20 years', now() - interval '19 years'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let changed: Vec<i32> = sqlx::query_scalar(
        "UPDATE loans_ajoloan SET date_modified = now() - interval '19 years 6 months' \
         WHERE id IN (SELECT id FROM loans_ajoloan WHERE is_disbursed ORDER BY id LIMIT 7) RETURNING id",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    let out = loansync_process(&db, &settings, &stub.url())
        .args([
            "trigger",
            "--entity",
            "loan",
            "--since",
            &since.to_rfc3339(),
            "--until",
            &until.to_rfc3339(),
            "--wait",
            "--timeout",
            "1m",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let sent = stub.received().ids(EntityKind::Loan);
    let want: std::collections::BTreeSet<i64> = changed.iter().map(|&i| i64::from(i)).collect();
    assert_eq!(sent, want, "exactly the loans changed in the window");
    let purpose: String = sqlx::query_scalar("SELECT purpose FROM loansync_sync")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(purpose, "backfill");
    let h = &history(&db.pool).await[0];
    assert_eq!(
        (h.sync_type.as_str(), h.status.as_str()),
        ("incremental", "completed")
    );
    let watermarks: i64 = sqlx::query_scalar("SELECT count(*) FROM etl_folder_etllastsync")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(watermarks, 0, "a backfill moves no watermark");
    // Nonsense bounds are refused before anything is published.
    let bad = loansync_process(&db, &settings, &stub.url())
        .args([
            "trigger",
            "--since",
            &until.to_rfc3339(),
            "--until",
            &since.to_rfc3339(),
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("`since` is not before `until`"));
    assert_books_balance(&db.pool).await;
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watermark_set_by_hand_is_audited_and_drives_the_next_incremental_sync() {
    let db = seeded_db(small()).await;
    let stub = stub(Faults::default()).await;
    let settings = settings_for(&db, &stub.url(), &[]);
    let sync = |t| {
        let (pool, settings) = (db.pool.clone(), settings.clone());
        async move {
            loansync::app::sync_in_process(&pool, &settings, &anonymous(t))
                .await
                .unwrap()
        }
    };
    assert_eq!(sync(SyncType::Full).await.exit_code(), 0);
    let show = loansync_process(&db, &settings, &stub.url())
        .args(["watermark", "show", "--json"])
        .output()
        .await
        .unwrap();
    assert!(show.status.success(), "{show:?}");
    let marks: serde_json::Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(marks.as_array().unwrap().len(), 4, "{marks}");

    // Back ten years: the next incremental sync sends every loan changed since then.
    let to: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT date_trunc('second', now() - interval '10 years')")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let set = loansync_process(&db, &settings, &stub.url())
        .args([
            "watermark",
            "set",
            "loan",
            &to.to_rfc3339(),
            "--reason",
            "re-send a decade",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(set.status.code(), Some(0), "{set:?}");
    let (wm, by): (chrono::DateTime<chrono::Utc>, String) = sqlx::query_as(
        "SELECT last_sync_timestamp, last_sync_id FROM etl_folder_etllastsync WHERE entity_type = 'loan'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(wm, to);
    let audit: String = sqlx::query_scalar(
        "SELECT error_message FROM etl_folder_etlsynchistory WHERE sync_id = $1",
    )
    .bind(&by)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(
        audit.contains("set by hand") && audit.contains("re-send a decade"),
        "{audit}"
    );
    let before = stub.received();
    let inc = sync(SyncType::Incremental).await;
    assert_eq!(inc.exit_code(), 0, "{}", inc.render());
    let all_loans: i64 = sqlx::query_scalar("SELECT count(*) FROM loans_ajoloan")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        stub.received()
            .ids_sent_since(&before, EntityKind::Loan)
            .len() as i64,
        all_loans,
        "every loan changed in the last ten years"
    );

    // Refused while a sync is running: its end would overwrite the watermark.
    let queue = loansync::queue::memory::MemoryQueue::new();
    loansync::planner::plan_sync(&db.pool, &settings, &anonymous(SyncType::Full), &queue)
        .await
        .unwrap();
    let busy = loansync_process(&db, &settings, &stub.url())
        .args(["watermark", "set", "loan", &to.to_rfc3339()])
        .output()
        .await
        .unwrap();
    assert_eq!(
        busy.status.code(),
        Some(i32::from(loansync::app::EXIT_BUSY)),
        "{busy:?}"
    );
}
