//! `/metrics` during and after a sync agrees with the ETL tables; `/healthz`, `/readyz`.

use crate::pipeline::{history, seeded_db, settings_for, small};
use loansync::domain::{EntityKind, PlanRequest, SyncType};
use loansync::http::{self, Readiness};
use loansync::stub_api::Faults;
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
    // Runs alone: it compares the process-wide registry with one database, and under
    // `cargo test` other tests of this process add to the same counters.
    let _alone = crate::support::exclusive_services().await;
    let db = seeded_db(small()).await;
    let stub = crate::pipeline::stub(Faults {
        reject_every_nth: 9,
        ..Default::default()
    })
    .await;
    let settings = settings_for(&db, &stub.url(), &[]);
    let consuming = Arc::new(AtomicBool::new(false));
    let addr = http::serve(
        "127.0.0.1:0".parse().unwrap(),
        Readiness {
            pool: db.pool.clone(),
            broker: None,
            consuming: consuming.clone(),
            stale_after_secs: 900.0,
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
    // The registry is the process's: under `cargo test`, tests that ran before this one
    // counted in it too. Nothing else runs now (the lock above), so compare increases.
    let (_, baseline) = get("/metrics").await;
    let base = |name: &str| sample(&baseline, name).unwrap_or(0.0);
    let settled_before: f64 = baseline
        .lines()
        .filter(|l| l.starts_with("etl_records_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();

    let req = PlanRequest {
        sync_type: SyncType::Full,
        entities: None,
        request_id: None,
        since: None,
        until: None,
    };
    let pool = db.pool.clone();
    let sync = tokio::spawn(async move {
        loansync::cli::sync_in_process(&pool, &settings, &req)
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
            .sum::<f64>()
            - settled_before;
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
    assert_eq!(summary.exit_code(), loansync::cli::EXIT_PARTIAL);
    let (status, text) = get("/metrics").await;
    assert_eq!(status, 200);
    let h = &history(&db.pool).await[0];
    for e in EntityKind::ALL {
        let (total, ok, failed) = h.counts(e);
        let m = |outcome: &str| {
            let name = format!("etl_records_total{{entity=\"{e}\",outcome=\"{outcome}\"}}");
            (sample(&text, &name).unwrap_or(0.0) - base(&name)) as i32
        };
        assert_eq!((m("success"), m("failed")), (ok, failed), "{e}");
        let name = format!("etl_records_planned_total{{entity=\"{e}\"}}");
        let planned = (sample(&text, &name).unwrap_or(0.0) - base(&name)) as i32;
        assert_eq!(planned, total, "{e}");
        let age = sample(
            &text,
            &format!("etl_watermark_age_seconds{{entity=\"{e}\"}}"),
        )
        .expect("a watermark age");
        assert!((0.0..60.0).contains(&age), "{e}: {age}");
    }
    let partial = "etl_syncs_total{status=\"partial_success\",sync_type=\"full\"}";
    assert_eq!(
        sample(&text, partial).unwrap_or(0.0) - base(partial),
        1.0,
        "{text}"
    );
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
    assert_eq!(
        sample(&text, durations).unwrap_or(0.0) - base(durations),
        1.0,
        "{text}"
    );
    assert!(sample(&text, "process_resident_memory_bytes").unwrap() > 1e6);
    assert!(
        !text.contains(h.sync_id.as_str()),
        "a sync id leaked into a label"
    );
}
