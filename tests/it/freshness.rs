//! Freshness (issue 26): how old is the oldest change not sent yet
//! (`etl_oldest_unsent_change_seconds`, read at scrape time, and `loansync status`), and
//! how long each record took from its change to the API's acknowledgement
//! (`etl_record_lag_seconds`, observed at the settle).

use crate::harness::{loansync_process, seeded_db, settings_for, small, stub};
use loansync::config::Settings;
use loansync::domain::{EntityKind, PlanRequest, SyncType};
use loansync::stub_api::Faults;
use loansync::telemetry::Telemetry;

/// A sample of `text` (Prometheus exposition): the value of the line that starts with
/// `series` followed by a space.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn the_oldest_unsent_change_is_reported_and_each_record_lag_observed() {
    let db = seeded_db(small()).await;
    let api = stub(Faults::default()).await;
    let settings = settings_for(&db, &api.url(), &[]);
    db.full_sync_in_process(&settings).await;

    // No planner runs. The customers' watermark an hour back, one customer changed 30
    // minutes ago (every seeded row is a day old).
    sqlx::query(
        "UPDATE etl_folder_etllastsync SET last_sync_timestamp = now() - interval '1 hour' \
         WHERE entity_type = 'customer'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let changed: i64 = sqlx::query_scalar(
        "UPDATE ajo_ajouser SET date_modified = now() - interval '30 minutes' \
         WHERE id = (SELECT min(id) FROM ajo_ajouser WHERE onboarding_complete) RETURNING id::int8",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();

    let scrape = Telemetry::fresh();
    scrape.refresh_state(&db.pool, 900.0, None).await;
    let age =
        |t: &Telemetry, e: &str| t.value("etl_oldest_unsent_change_seconds", &[("entity", e)]);
    let customer = age(&scrape, "customer").unwrap();
    assert!((1800.0..1800.0 + 120.0).contains(&customer), "{customer}");
    assert_eq!(
        age(&scrape, "loan"),
        Some(0.0),
        "nothing changed after the loans' watermark"
    );
    assert_eq!(age(&scrape, "repayment"), Some(0.0));
    assert_eq!(
        age(&scrape, "officer"),
        None,
        "officers have no modification time"
    );

    // `loansync status` says it too.
    let out = loansync_process(&db, &settings, &api.url())
        .arg("status")
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(
        text.contains("oldest change not sent yet (after the watermark): customer: 30m"),
        "{text}"
    );
    assert!(text.contains("loan: none"), "{text}");

    // An incremental sync sends the customer: its lag is observed from the change time
    // set above, and nothing waits any more.
    let telemetry = Telemetry::fresh();
    let settings = Settings {
        telemetry: telemetry.clone(),
        ..settings
    };
    let req = PlanRequest {
        sync_type: SyncType::Incremental,
        entities: None,
        request_id: None,
        since: None,
        until: None,
        sweep: false,
    };
    loansync::app::sync_in_process(&db.pool, &settings, &req)
        .await
        .expect("incremental sync");
    assert!(
        api.received().ids(EntityKind::Customer).contains(&changed),
        "the changed customer was sent"
    );
    let text = telemetry.render();
    let series = |what: &str| format!("etl_record_lag_seconds_{what}{{entity=\"customer\"}}");
    assert_eq!(sample(&text, &series("count")), Some(1.0), "{text}");
    let lag = sample(&text, &series("sum")).unwrap();
    assert!((1800.0..1800.0 + 120.0).contains(&lag), "{lag}");
    // Officers (no change time) are sent but observe nothing.
    assert_eq!(
        sample(&text, "etl_record_lag_seconds_count{entity=\"officer\"}"),
        Some(0.0)
    );

    telemetry.refresh_state(&db.pool, 900.0, None).await;
    assert_eq!(age(&telemetry, "customer"), Some(0.0));
}
