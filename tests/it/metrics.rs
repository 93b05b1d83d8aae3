//! `/metrics` during and after a sync agrees with the ETL tables; `/healthz`, `/readyz`.

use crate::harness::{history, seeded_db, settings_for, small};
use loansync::config::Settings;
use loansync::domain::{EntityKind, PlanRequest, SyncType};
use loansync::http::{self, Readiness};
use loansync::queue::amqp::BrokerHealth;
use loansync::stub_api::Faults;
use loansync::telemetry::Telemetry;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The value of one sample line `name{labels} value` of the exposition.
fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_agree_with_the_etl_tables() {
    // The sync and /metrics share a registry of their own: every value is this test's.
    let db = seeded_db(small()).await;
    let stub = crate::harness::stub(Faults {
        reject_every_nth: 9,
        ..Default::default()
    })
    .await;
    let telemetry = Telemetry::fresh();
    let settings = Settings {
        telemetry: telemetry.clone(),
        ..settings_for(&db, &stub.url(), &[])
    };
    let consuming = Arc::new(AtomicBool::new(false));
    let addr = http::serve(
        "127.0.0.1:0".parse().unwrap(),
        Readiness {
            pool: db.pool.clone(),
            broker: None,
            consuming: consuming.clone(),
            stale_after_secs: 900.0,
            telemetry: telemetry.clone(),
        },
    )
    .await
    .unwrap();
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();
    let get = |path: &str| {
        let http = http.clone();
        let url = format!("{base}{path}");
        async move {
            let r = http.get(url).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    assert_eq!(get("/healthz").await.0, 200);
    assert_eq!(
        get("/readyz").await.0,
        503,
        "not ready before the consumer runs"
    );
    consuming.store(true, Ordering::SeqCst);
    assert_eq!(get("/readyz").await.0, 200);
    // Nothing counted yet, every series there at zero.
    let (_, baseline) = get("/metrics").await;
    let zeros = [
        "etl_records_total{entity=\"loan\",outcome=\"success\"}",
        "etl_records_planned_total{entity=\"repayment\"}",
        "etl_chunks_total{entity=\"customer\",outcome=\"settled\"}",
        "etl_syncs_total{status=\"partial_success\",sync_type=\"full\"}",
        "etl_http_responses_total{endpoint=\"/etl/sync\",status_class=\"2xx\"}",
        "etl_sync_duration_seconds_count{sync_type=\"full\"}",
    ];
    for name in zeros {
        assert_eq!(sample(&baseline, name), Some(0.0), "{name}\n{baseline}");
    }

    let req = PlanRequest {
        sync_type: SyncType::Full,
        entities: None,
        request_id: None,
        since: None,
        until: None,
        sweep: false,
    };
    let pool = db.pool.clone();
    let sync = tokio::spawn(async move {
        loansync::app::sync_in_process(&pool, &settings, &req)
            .await
            .unwrap()
    });
    // Scrapes while the sync runs: served, and never ahead of what is settled.
    let mut during = 0;
    while !sync.is_finished() {
        let (status, text) = get("/metrics").await;
        assert_eq!(status, 200);
        let settled: f64 = text
            .lines()
            .filter(|l| l.starts_with("etl_records_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>();
        let planned: i64 = sqlx::query_scalar(
            "SELECT COALESCE(sum(total_loans + total_repayments + total_customers + total_officers), 0)::int8 \
             FROM etl_folder_etlsynchistory",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert!(
            settled <= planned as f64 || planned == 0,
            "{settled} > {planned}"
        );
        during += 1;
    }
    assert!(during >= 1);
    let summary = sync.await.unwrap();
    assert_eq!(summary.exit_code(), loansync::app::EXIT_PARTIAL);
    let (status, text) = get("/metrics").await;
    assert_eq!(status, 200);
    let h = &history(&db.pool).await[0];
    for e in EntityKind::ALL {
        let (total, ok, failed) = h.counts(e);
        let m = |outcome: &str| {
            let name = format!("etl_records_total{{entity=\"{e}\",outcome=\"{outcome}\"}}");
            sample(&text, &name).expect("a series per entity and outcome") as i32
        };
        assert_eq!((m("success"), m("failed")), (ok, failed), "{e}");
        let name = format!("etl_records_planned_total{{entity=\"{e}\"}}");
        let planned = sample(&text, &name).expect("a series per entity") as i32;
        assert_eq!(planned, total, "{e}");
        // The registry read directly agrees with the exposition.
        assert_eq!(
            telemetry.value(
                "etl_records_total",
                &[("entity", e.as_str()), ("outcome", "success")]
            ),
            Some(f64::from(ok))
        );
        let age = sample(
            &text,
            &format!("etl_watermark_age_seconds{{entity=\"{e}\"}}"),
        )
        .expect("a watermark age");
        assert!((0.0..60.0).contains(&age), "{e}: {age}");
    }
    let partial = "etl_syncs_total{status=\"partial_success\",sync_type=\"full\"}";
    assert_eq!(sample(&text, partial), Some(1.0), "{text}");
    // Exactly one sync finished, as partial_success.
    let syncs: f64 = text
        .lines()
        .filter(|l| l.starts_with("etl_syncs_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(syncs, 1.0, "{text}");
    assert_eq!(sample(&text, "etl_stalled_syncs"), Some(0.0));
    assert!(
        sample(
            &text,
            "etl_http_responses_total{endpoint=\"/etl/sync\",status_class=\"2xx\"}"
        )
        .unwrap()
            > 0.0
    );
    let durations = "etl_sync_duration_seconds_count{sync_type=\"full\"}";
    assert_eq!(sample(&text, durations), Some(1.0), "{text}");
    // Every chunk planned was settled once by the worker, none requeued or dead.
    let chunks: i64 = sqlx::query_scalar("SELECT count(*) FROM loansync_chunk")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let chunk_outcome = |outcome: &str| -> f64 {
        text.lines()
            .filter(|l| {
                l.starts_with("etl_chunks_total{") && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(chunk_outcome("settled"), chunks as f64, "{text}");
    for other in [
        "duplicate",
        "aborted",
        "requeued",
        "republished",
        "dead_letter",
    ] {
        assert_eq!(chunk_outcome(other), 0.0, "{other}\n{text}");
    }
    assert_eq!(sample(&text, "etl_chunks_in_flight"), Some(0.0));
    assert!(sample(&text, "process_resident_memory_bytes").unwrap() > 1e6);
    assert!(
        !text.contains(h.sync_id.as_str()),
        "a sync id leaked into a label"
    );
}

/// The state gauges read at scrape time: the last sync of each type (status, end time,
/// records), the last successful sync, pending planning requests, dead letters waiting,
/// the build info; and the process collector's metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn state_gauges_follow_the_etl_tables() {
    // The gauges are in a registry of their own: every value is this test's.
    let telemetry = Telemetry::fresh();
    let db = seeded_db(small()).await;
    let stub = crate::harness::stub(Faults {
        reject_every_nth: 9,
        ..Default::default()
    })
    .await;
    let settings = Settings {
        telemetry: telemetry.clone(),
        ..settings_for(&db, &stub.url(), &[])
    };
    let prefix = db.queue_prefix();
    let broker = loansync::queue::amqp::Broker::connect_with(
        &crate::support::amqp_url(),
        &prefix,
        7,
        None,
        loansync::queue::amqp::BrokerOptions {
            health: BrokerHealth::with_telemetry(telemetry.clone()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let addr = http::serve(
        "127.0.0.1:0".parse().unwrap(),
        Readiness {
            pool: db.pool.clone(),
            broker: Some(broker.health().clone()),
            consuming: Arc::new(AtomicBool::new(true)),
            stale_after_secs: 900.0,
            telemetry: telemetry.clone(),
        },
    )
    .await
    .unwrap();
    let scrape = || async move {
        reqwest::get(format!("http://{addr}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let status = |text: &str, t: &str, st: &str| {
        sample(
            text,
            &format!("etl_last_sync_status{{status=\"{st}\",sync_type=\"{t}\"}}"),
        )
    };

    // Nothing synced yet: zeros everywhere.
    let text = scrape().await;
    for t in ["full", "incremental"] {
        for st in ["completed", "partial_success", "failed"] {
            assert_eq!(status(&text, t, st), Some(0.0), "{t} {st}\n{text}");
        }
        let ts = format!("etl_last_successful_sync_timestamp_seconds{{sync_type=\"{t}\"}}");
        assert_eq!(sample(&text, &ts), Some(0.0), "{text}");
        let pending = format!("etl_pending_requests{{sync_type=\"{t}\"}}");
        assert_eq!(sample(&text, &pending), Some(0.0), "{text}");
    }
    assert_eq!(sample(&text, "etl_dead_letter_messages"), Some(0.0));
    let build = format!(
        "loansync_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&text, &build), Some(1.0), "{text}");
    for name in [
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_start_time_seconds",
        "process_open_fds",
    ] {
        assert!(
            text.lines()
                .any(|l| l == format!("# TYPE {name} gauge")
                    || l == format!("# TYPE {name} counter")),
            "{name} missing"
        );
    }
    assert!(sample(&text, "process_resident_memory_bytes").unwrap() > 1e6);

    // A full sync with refused records: partial_success, which moved the watermarks.
    let req = PlanRequest {
        sync_type: SyncType::Full,
        entities: None,
        request_id: None,
        since: None,
        until: None,
        sweep: false,
    };
    let summary = loansync::app::sync_in_process(&db.pool, &settings, &req)
        .await
        .unwrap();
    assert_eq!(summary.exit_code(), loansync::app::EXIT_PARTIAL);
    let h = &history(&db.pool).await[0];
    assert_eq!(h.status, "partial_success");
    let completed_at: f64 = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM completed_at)::float8 FROM etl_folder_etlsynchistory WHERE sync_id = $1",
    )
    .bind(&h.sync_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let (ok, failed) = EntityKind::ALL
        .into_iter()
        .map(|e| h.counts(e))
        .fold((0, 0), |(a, b), (_, o, f)| (a + o, b + f));
    assert!(failed > 0 && ok > 0);
    let text = scrape().await;
    assert_eq!(
        status(&text, "full", "partial_success"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(status(&text, "full", "completed"), Some(0.0));
    assert_eq!(status(&text, "full", "failed"), Some(0.0));
    assert_eq!(status(&text, "incremental", "partial_success"), Some(0.0));
    let full = |name: &str| sample(&text, &format!("{name}{{sync_type=\"full\"}}")).unwrap();
    assert!((full("etl_last_sync_completed_timestamp_seconds") - completed_at).abs() < 1e-3);
    assert!((full("etl_last_successful_sync_timestamp_seconds") - completed_at).abs() < 1e-3);
    let records = |o: &str| {
        sample(
            &text,
            &format!("etl_last_sync_records{{outcome=\"{o}\",sync_type=\"full\"}}"),
        )
    };
    assert_eq!(records("success"), Some(f64::from(ok)));
    assert_eq!(records("failed"), Some(f64::from(failed)));

    // The same sync seen as failed: the status moves, the last success goes back to none.
    sqlx::query("UPDATE etl_folder_etlsynchistory SET status = 'failed' WHERE sync_id = $1")
        .bind(&h.sync_id)
        .execute(&db.pool)
        .await
        .unwrap();
    let text = scrape().await;
    assert_eq!(status(&text, "full", "failed"), Some(1.0), "{text}");
    assert_eq!(status(&text, "full", "partial_success"), Some(0.0));
    assert_eq!(
        sample(
            &text,
            "etl_last_successful_sync_timestamp_seconds{sync_type=\"full\"}"
        ),
        Some(0.0)
    );

    // Pending requests (kept while a sync runs), counted by type.
    sqlx::query(
        "INSERT INTO loansync_request (request_id, sync_type, entities, state) VALUES \
         ('a', 'incremental', '{loan}', 'pending'), ('b', 'incremental', '{loan}', 'pending'), \
         ('c', 'full', '{loan}', 'pending')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    // A dead letter waiting in <prefix>.dead.
    broker
        .dead_letter(b"not a chunk", &broker.topology.chunks, "test")
        .await
        .unwrap();
    let text = scrape().await;
    assert_eq!(
        sample(&text, "etl_pending_requests{sync_type=\"incremental\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "etl_pending_requests{sync_type=\"full\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "etl_dead_letter_messages"),
        Some(1.0),
        "{text}"
    );
    broker.close().await;
}
