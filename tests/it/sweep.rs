//! The sweep (SPEC.md section 2): what timestamps miss (updates that bypass `auto_now`,
//! changed schedule rows and repayments, deletes) is found by comparing fingerprints of
//! what was delivered with the source. Single-process mode against real PostgreSQL and
//! the stub API, which keeps the last record it accepted per id.

use crate::fixtures::insert_repayment;
use crate::harness::TestApp;
use crate::harness::{loansync_process, seeded_db, settings_for, small, stub};
use loansync::config::Settings;
use loansync::domain::{EntityKind, PlanRequest, SyncType};
use loansync::stub_api::{Faults, Received};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

fn request(sync_type: SyncType, sweep: bool) -> PlanRequest {
    PlanRequest {
        sync_type,
        entities: None,
        request_id: None,
        since: None,
        until: None,
        sweep,
    }
}

/// Runs one sync in this process; returns its id and records planned per entity.
async fn run(
    pool: &sqlx::PgPool,
    settings: &Settings,
    req: &PlanRequest,
) -> (String, BTreeMap<EntityKind, i32>) {
    let s = loansync::app::sync_in_process(pool, settings, req)
        .await
        .expect("sync");
    assert!(s.status.is_some(), "{}", s.render());
    let planned = s.progress.iter().map(|p| (p.entity, p.total)).collect();
    (s.sync_id.clone().expect("a sync id"), planned)
}

fn sent_since(now: &Received, before: &Received) -> BTreeMap<EntityKind, BTreeSet<i64>> {
    EntityKind::ALL
        .into_iter()
        .map(|e| (e, now.ids_sent_since(before, e)))
        .filter(|(_, ids)| !ids.is_empty())
        .collect()
}

async fn one_id(pool: &sqlx::PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar::<_, i64>(sql)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn exec(pool: &sqlx::PgPool, sql: &'static str, id: i64) {
    let done = sqlx::query(sql).bind(id).execute(pool).await.unwrap();
    assert_eq!(done.rows_affected(), 1, "{sql} ({id})");
}

/// `loansync deletes list --json`, as an operator would run it.
async fn deletes_list(db: &crate::support::TestDb, settings: &Settings, api: &str) -> Vec<Value> {
    let out = loansync_process(db, settings, api)
        .args(["deletes", "list", "--json"])
        .output()
        .await
        .expect("run loansync deletes list");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("deletes list --json is JSON")
}

/// What the platform holds (`held`) for every id equals what a full sync sends now; the
/// ids it holds beyond that are exactly `listed` (entity, id): the deletions listed.
async fn assert_platform_holds_the_source(
    db: &crate::support::TestDb,
    held: &Received,
    listed: &BTreeSet<(String, i64)>,
) {
    let fresh = stub(Faults::default()).await;
    fresh.keep_records();
    let fresh_settings = settings_for(db, &fresh.url(), &[]);
    run(&db.pool, &fresh_settings, &request(SyncType::Full, false)).await;
    let now = fresh.received();
    for e in EntityKind::ALL {
        let mut held = held.latest(e);
        let now = now.latest(e);
        assert!(!now.is_empty(), "{e}: the full sync sent records");
        let gone: BTreeSet<i64> = held
            .keys()
            .filter(|id| !now.contains_key(id))
            .copied()
            .collect();
        let listed_gone: BTreeSet<i64> = listed
            .iter()
            .filter(|(le, _)| le == e.as_str())
            .map(|(_, id)| *id)
            .collect();
        assert_eq!(gone, listed_gone, "{e}: held but no longer in the source");
        held.retain(|id, _| now.contains_key(id));
        for (id, record) in &now {
            assert_eq!(
                held.get(id),
                Some(record),
                "{e} {id}: the platform is behind"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sweep_converges_the_platform_to_the_source_and_lists_deletions() {
    let db = seeded_db(small()).await;
    let pool = &db.pool;
    let api = stub(Faults::default()).await;
    api.keep_records();
    let settings = settings_for(&db, &api.url(), &[]);
    run(pool, &settings, &request(SyncType::Full, false)).await;
    let fingerprints: i64 = sqlx::query_scalar("SELECT count(*) FROM loansync_delivered")
        .fetch_one(pool)
        .await
        .unwrap();
    let accepted: usize = EntityKind::ALL
        .into_iter()
        .map(|e| api.received().ids(e).len())
        .sum();
    assert_eq!(
        fingerprints as usize, accepted,
        "one fingerprint per record"
    );

    // Distinct disbursed loans with schedule rows and repayments, for each change.
    let loans: Vec<i64> = sqlx::query_scalar(
        "SELECT l.id::int8 FROM loans_ajoloan l WHERE l.is_disbursed \
           AND EXISTS (SELECT 1 FROM loans_ajoloanschedule s WHERE s.loan_id = l.id AND NOT s.fully_paid) \
           AND (SELECT count(*) FROM loans_ajoloanrepayment p WHERE p.ajo_loan_id = l.id) >= 2 \
         ORDER BY l.id LIMIT 4",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        loans.len(),
        4,
        "the seed has loans with schedules and repayments"
    );
    let (bypassed, paid, lost_repayment, old) = (loans[0], loans[1], loans[2], loans[3]);

    // 1. A save that bumps the timestamp (incremental syncs see it).
    let saved = one_id(
        pool,
        "SELECT id::int8 FROM ajo_ajouser WHERE onboarding_complete ORDER BY id LIMIT 1",
    )
    .await;
    exec(
        pool,
        "UPDATE ajo_ajouser SET first_name = 'Saved', date_modified = now() WHERE id = $1::int4",
        saved,
    )
    .await;
    // 2. An UPDATE that does not touch date_modified.
    exec(
        pool,
        "UPDATE loans_ajoloan SET status = 'RESTRUCTURED' WHERE id = $1::int4",
        bypassed,
    )
    .await;
    // 3. An instalment paid (a schedule row changed; the loan's row did not).
    exec(
        pool,
        "UPDATE loans_ajoloanschedule SET fully_paid = true, paid_amount = due_amount, amount_left = 0 \
         WHERE id = (SELECT min(id) FROM loans_ajoloanschedule WHERE loan_id = $1::int4 AND NOT fully_paid)",
        paid,
    )
    .await;
    // 4. A repayment's status changed, without its timestamps.
    let changed_repayment = one_id(
        pool,
        "SELECT id::int8 FROM loans_ajoloanrepayment ORDER BY id DESC LIMIT 1",
    )
    .await;
    exec(
        pool,
        "UPDATE loans_ajoloanrepayment SET settlement_status = NOT settlement_status WHERE id = $1::int4",
        changed_repayment,
    )
    .await;
    // 5. A repayment added to an old loan (created long ago, by the fixture's clock).
    let added = insert_repayment(pool, old).await;
    // 6. A row deleted.
    let deleted = sqlx::query_scalar::<_, i64>(
        "DELETE FROM loans_ajoloanrepayment WHERE id = (SELECT min(id) FROM loans_ajoloanrepayment \
         WHERE ajo_loan_id = $1::int4) RETURNING id::int8",
    )
    .bind(lost_repayment)
    .fetch_one(pool)
    .await
    .unwrap();
    // 7. A customer un-onboarded (no longer selected), without its timestamp.
    let unonboarded = one_id(
        pool,
        "SELECT id::int8 FROM ajo_ajouser WHERE onboarding_complete ORDER BY id DESC LIMIT 1",
    )
    .await;
    exec(
        pool,
        "UPDATE ajo_ajouser SET onboarding_complete = false WHERE id = $1::int4",
        unonboarded,
    )
    .await;

    run(pool, &settings, &request(SyncType::Incremental, false)).await;
    let marks = || async {
        sqlx::query_as::<_, (String, chrono::DateTime<chrono::Utc>)>(
            "SELECT entity_type::text, last_sync_timestamp FROM etl_folder_etllastsync ORDER BY 1",
        )
        .fetch_all(pool)
        .await
        .unwrap()
    };
    let marks_before = marks().await;
    let before = api.received();
    let (sweep_id, _) = run(pool, &settings, &request(SyncType::Incremental, true)).await;
    let swept = sent_since(&api.received(), &before);

    // What no timestamp shows was sent; nothing the incremental sync had sent already.
    let must: BTreeMap<EntityKind, BTreeSet<i64>> = BTreeMap::from([
        (
            EntityKind::Loan,
            BTreeSet::from([bypassed, paid, lost_repayment]),
        ),
        (EntityKind::Repayment, BTreeSet::from([changed_repayment])),
    ]);
    // The added repayment (and its loan's aggregates) carry old times: a sweep finds
    // them unless a wider incremental selection already sent them.
    let may: BTreeMap<EntityKind, BTreeSet<i64>> = BTreeMap::from([
        (EntityKind::Loan, BTreeSet::from([old])),
        (EntityKind::Repayment, BTreeSet::from([added])),
    ]);
    for e in EntityKind::ALL {
        let got = swept.get(&e).cloned().unwrap_or_default();
        let must = must.get(&e).cloned().unwrap_or_default();
        let allowed: BTreeSet<i64> = must
            .iter()
            .chain(may.get(&e).into_iter().flatten())
            .copied()
            .collect();
        assert!(got.is_superset(&must), "{e}: swept {got:?}, must {must:?}");
        assert!(
            got.is_subset(&allowed),
            "{e}: swept {got:?}, allowed {allowed:?}"
        );
    }
    // A sweep moves no watermark; its history row says incremental.
    assert_eq!(marks().await, marks_before);
    let (sync_type, purpose): (String, String) = sqlx::query_as(
        "SELECT h.sync_type::text, s.purpose FROM etl_folder_etlsynchistory h \
         JOIN loansync_sync s USING (sync_id) WHERE sync_id = $1",
    )
    .bind(&sweep_id)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(
        (sync_type.as_str(), purpose.as_str()),
        ("incremental", "sweep")
    );

    // The deletions are listed, not sent.
    let listed: BTreeSet<(String, i64)> = deletes_list(&db, &settings, &api.url())
        .await
        .iter()
        .map(|d| {
            assert_eq!(d["sync_id"], Value::String(sweep_id.clone()));
            (
                d["entity"].as_str().unwrap().to_string(),
                d["id"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        BTreeSet::from([
            ("customer".to_string(), unonboarded),
            ("repayment".to_string(), deleted)
        ])
    );

    // Nothing changed since: a sweep plans nothing and sends nothing.
    let before = api.received();
    let (_, planned) = run(pool, &settings, &request(SyncType::Incremental, true)).await;
    assert!(planned.values().all(|n| *n == 0), "{planned:?}");
    assert_eq!(api.received().requests(), before.requests());

    assert_platform_holds_the_source(&db, &api.received(), &listed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rejected_record_has_no_fingerprint_and_is_swept_again() {
    let db = seeded_db(small()).await;
    let pool = &db.pool;
    let api = stub(Faults {
        reject_every_nth: 7,
        ..Default::default()
    })
    .await;
    let settings = settings_for(&db, &api.url(), &[]);
    run(pool, &settings, &request(SyncType::Full, false)).await;
    let rejected: BTreeMap<EntityKind, BTreeSet<i64>> = crate::harness::expected_full(pool)
        .await
        .into_iter()
        .map(|(e, ids)| (e, ids.into_iter().filter(|id| id % 7 == 0).collect()))
        .filter(|(_, ids): &(EntityKind, BTreeSet<i64>)| !ids.is_empty())
        .collect();
    assert!(!rejected.is_empty(), "the seed has ids the stub rejects");
    for (e, ids) in &rejected {
        let ids: Vec<i64> = ids.iter().copied().collect();
        let with_fp: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM loansync_delivered WHERE entity = $1 AND id = ANY($2)",
        )
        .bind(e.as_str())
        .bind(&ids)
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(with_fp, 0, "{e}: rejected records have no fingerprint");
    }

    // A sweep while the API still rejects them plans them again and they are rejected
    // again (the stub keeps accepted records only): their buckets are not taken for
    // clean (no digest stored), so the next sweep compares them again.
    let before = api.received();
    let (_, planned) = run(pool, &settings, &request(SyncType::Incremental, true)).await;
    assert!(sent_since(&api.received(), &before).is_empty());
    for (e, ids) in &rejected {
        assert_eq!(planned.get(e).copied(), Some(ids.len() as i32), "{e}");
    }

    api.set_faults(Faults::default());
    let before = api.received();
    run(pool, &settings, &request(SyncType::Incremental, true)).await;
    assert_eq!(sent_since(&api.received(), &before), rejected);
}

#[test]
fn a_sweep_message_is_validated_like_the_others() {
    use loansync::planner::parse_plan;
    let ok = parse_plan(br#"{"sync_type":"incremental","sweep":true,"entities":["loan"]}"#)
        .expect("a sweep");
    assert!(ok.sweep);
    let full = parse_plan(br#"{"sync_type":"full","sweep":true}"#).unwrap_err();
    assert!(full.contains("a sweep is incremental"), "{full}");
    let since =
        parse_plan(br#"{"sync_type":"incremental","sweep":true,"since":"2026-01-01T00:00:00Z"}"#)
            .unwrap_err();
    assert!(since.contains("takes no `since`"), "{since}");
    let typo = parse_plan(br#"{"sync_type":"incremental","sweep":"yes"}"#).unwrap_err();
    assert!(typo.contains("invalid planning message"), "{typo}");
    assert!(!parse_plan(br#"{"sync_type":"incremental"}"#).unwrap().sweep);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_records_are_a_gauge_read_at_scrape_time() {
    let db = TestApp::migrated().await;
    let metrics = loansync::telemetry::Metrics::new();
    metrics.refresh_state(&db.pool, 3600.0, None).await;
    assert!(
        metrics
            .render()
            .contains("etl_deleted_records{entity=\"loan\"} 0")
    );
    sqlx::query(
        "INSERT INTO loansync_deleted (entity, id, sync_id) \
         VALUES ('loan', 1, 's1'), ('loan', 2, 's1'), ('customer', 3, 's1')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    metrics.refresh_state(&db.pool, 3600.0, None).await;
    let text = metrics.render();
    for line in [
        "etl_deleted_records{entity=\"loan\"} 2",
        "etl_deleted_records{entity=\"customer\"} 1",
        "etl_deleted_records{entity=\"officer\"} 0",
        "etl_deleted_records{entity=\"repayment\"} 0",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
}

/// A loan's sums must not depend on the physical order of its repayment rows: a
/// repayment row rewritten with the same values (deleted and inserted again with its id,
/// as a restore does; a non-HOT UPDATE moves it alike) changes nothing any record is
/// built from, so the sweep sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_rewritten_with_the_same_values_changes_no_record() {
    use crate::fixtures::{insert_customer, insert_loan, insert_officer, insert_repayment_with};
    let db = TestApp::migrated().await;
    let pool = &db.pool;
    let agent = insert_officer(pool, "AGENT", "REGULAR").await;
    let borrower = insert_customer(pool, Some(agent), true).await;
    let loan = insert_loan(pool, agent, borrower, true).await;
    let paid = crate::fixtures::fixture_time();
    // (0.1 + 0.2) + 0.3 and (0.2 + 0.3) + 0.1 differ in float8.
    let first = insert_repayment_with(pool, loan, 0.1, paid).await;
    insert_repayment_with(pool, loan, 0.2, paid).await;
    insert_repayment_with(pool, loan, 0.3, paid).await;
    let api = stub(Faults::default()).await;
    let settings = settings_for(&db, &api.url(), &[]);
    run(pool, &settings, &request(SyncType::Full, false)).await;
    assert!(api.received().ids(EntityKind::Loan).contains(&loan));

    exec(
        pool,
        "WITH d AS (DELETE FROM loans_ajoloanrepayment WHERE id = $1::int4 RETURNING *) \
         INSERT INTO loans_ajoloanrepayment SELECT * FROM d",
        first,
    )
    .await;
    let before = api.received();
    let (_, planned) = run(pool, &settings, &request(SyncType::Incremental, true)).await;
    assert!(planned.values().all(|n| *n == 0), "{planned:?}");
    assert_eq!(sent_since(&api.received(), &before), BTreeMap::new());
}

/// A sweep asked for while a sync runs is kept, and planned on its own when the slot
/// frees: never merged with the incremental request that waits beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pending_sweep_runs_alone_after_the_running_sync() {
    use loansync::planner::{self, PlanOutcome};
    use loansync::queue::memory::MemoryQueue;
    use std::sync::Arc;
    let db = seeded_db(small()).await;
    let pool = &db.pool;
    let api = stub(Faults::default()).await;
    let settings = settings_for(&db, &api.url(), &[]);
    let work = |queue: MemoryQueue| async {
        let ctx = Arc::new(loansync::app::worker_context(&settings, pool.clone()).unwrap());
        loansync::worker::run_memory(ctx, queue, 2).await;
    };
    // A full sync planned, its chunks not worked yet: it holds the slot.
    let running = MemoryQueue::new();
    let planned = planner::plan_sync(pool, &settings, &request(SyncType::Full, false), &running)
        .await
        .unwrap();
    assert!(
        matches!(planned, PlanOutcome::Planned { .. }),
        "{planned:?}"
    );
    let with_id = |sweep: bool, id: &str| PlanRequest {
        request_id: Some(id.to_string()),
        ..request(SyncType::Incremental, sweep)
    };
    let unused = MemoryQueue::new();
    for (sweep, id) in [(true, "sweep-1"), (false, "incr-1")] {
        let recorded = planner::record_message(pool, &settings.telemetry, &with_id(sweep, id))
            .await
            .unwrap();
        assert_eq!(recorded, loansync::ledger::lifecycle::Recorded::New, "{id}");
        // Recorded as pending; the slot is taken, so nothing is planned yet.
        let nothing = planner::plan_pending(pool, &settings, &unused)
            .await
            .unwrap();
        assert_eq!(nothing, None, "{id}");
    }
    work(running).await;

    let purpose_of = |id: &'static str| async move {
        sqlx::query_scalar::<_, Option<String>>(
            "SELECT s.purpose FROM loansync_request r LEFT JOIN loansync_sync s USING (sync_id) \
             WHERE r.request_id = $1",
        )
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
    };
    let queue = MemoryQueue::new();
    let Some(PlanOutcome::Planned { sync_id, .. }) = planner::plan_pending(pool, &settings, &queue)
        .await
        .unwrap()
    else {
        panic!("the pending sweep was not planned")
    };
    assert_eq!(purpose_of("sweep-1").await.as_deref(), Some("sweep"));
    assert_eq!(
        purpose_of("incr-1").await,
        None,
        "still pending, not merged"
    );
    work(queue).await;
    assert!(ledger_finished(pool, &sync_id).await);

    let queue = MemoryQueue::new();
    let next = planner::plan_pending(pool, &settings, &queue)
        .await
        .unwrap();
    assert!(
        matches!(next, Some(PlanOutcome::Planned { .. })),
        "{next:?}"
    );
    assert_eq!(purpose_of("incr-1").await.as_deref(), Some("sync"));
    work(queue).await;
}

async fn ledger_finished(pool: &sqlx::PgPool, sync_id: &str) -> bool {
    loansync::ledger::lifecycle::sync_finished(pool, sync_id)
        .await
        .unwrap()
}

/// The fingerprint each loaded record carries, by id.
fn fingerprints(chunk: &loansync::source::LoadedChunk) -> Vec<(i64, uuid::Uuid)> {
    chunk
        .records
        .iter()
        .map(|r| (r.id, r.fingerprint))
        .collect()
}

/// A record's fingerprint is hashed by loansync from the values PostgreSQL sends in
/// binary format, not from their text: a session with another `TimeZone`, `DateStyle`
/// or `extra_float_digits` (a role's settings, a pooler's) loads the same fingerprints,
/// so a sweep resends nothing for them. One changed column changes one record's
/// fingerprint, and only that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fingerprints_are_the_values_not_the_session_s_text_of_them() {
    let db = seeded_db(small()).await;
    let odd = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .after_connect(|conn, _| {
            Box::pin(async move {
                for set in [
                    "SET TimeZone = 'Pacific/Chatham'",
                    "SET DateStyle = 'SQL, DMY'",
                    "SET extra_float_digits = 0",
                ] {
                    sqlx::query(set).execute(&mut *conn).await?;
                }
                Ok(())
            })
        })
        .connect(&db.url)
        .await
        .expect("a pool with other session settings");
    let mut checked = 0;
    for entity in EntityKind::ALL {
        let ids: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT id::int8 FROM {} ORDER BY id LIMIT 40",
            match entity {
                EntityKind::Officer => "accounts_customuser",
                EntityKind::Customer => "ajo_ajouser",
                EntityKind::Loan => "loans_ajoloan",
                EntityKind::Repayment => "loans_ajoloanrepayment",
            }
        )))
        .fetch_all(&db.pool)
        .await
        .unwrap();
        let plain = loansync::source::load_chunk(&db.pool, entity, &ids)
            .await
            .unwrap();
        let other = loansync::source::load_chunk(&odd, entity, &ids)
            .await
            .unwrap();
        let plain = fingerprints(&plain);
        assert_eq!(plain, fingerprints(&other), "{entity}");
        let distinct: BTreeSet<_> = plain.iter().map(|(_, fp)| fp).collect();
        assert_eq!(distinct.len(), plain.len(), "{entity}: one per record");
        assert!(!distinct.contains(&uuid::Uuid::nil()), "{entity}");
        checked += plain.len();
    }
    assert!(
        checked > 40,
        "records of several entities were compared ({checked})"
    );

    // One loan's amount changes: its fingerprint, and no other.
    let ids: Vec<i64> =
        sqlx::query_scalar("SELECT id::int8 FROM loans_ajoloan ORDER BY id LIMIT 40")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    let before = loansync::source::load_chunk(&db.pool, EntityKind::Loan, &ids)
        .await
        .unwrap();
    exec(
        &db.pool,
        "UPDATE loans_ajoloan SET amount = amount + 0.01 WHERE id = $1",
        ids[7],
    )
    .await;
    let after = loansync::source::load_chunk(&db.pool, EntityKind::Loan, &ids)
        .await
        .unwrap();
    let changed: Vec<i64> = fingerprints(&before)
        .into_iter()
        .zip(fingerprints(&after))
        .filter(|(b, a)| b != a)
        .map(|(b, _)| b.0)
        .collect();
    assert_eq!(changed, vec![ids[7]]);
}

/// Buckets a sweep went through, by outcome (`unchanged`, `clean`, `changed`), all
/// entities together, as counted so far.
fn buckets(settings: &Settings) -> [u64; 3] {
    ["unchanged", "clean", "changed"].map(|outcome| {
        EntityKind::ALL
            .into_iter()
            .map(|e| {
                settings
                    .telemetry
                    .value(
                        "etl_sweep_buckets_total",
                        &[("entity", e.as_str()), ("outcome", outcome)],
                    )
                    .unwrap_or(0.0) as u64
            })
            .sum()
    })
}

/// What the sweep since `before` did with the buckets: `[unchanged, clean, changed]`.
fn buckets_since(settings: &Settings, before: [u64; 3]) -> [u64; 3] {
    let now = buckets(settings);
    [0, 1, 2].map(|i| now[i] - before[i])
}

/// A sweep reads only the id buckets written since a sweep last found them clean, and
/// what it skips holds nothing to send: every change behind the timestamps below (in a
/// row a record joins or aggregates too) is found, the buckets nothing touched are not
/// read, and the platform ends equal to the source. Run as the least-privilege role.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sweep_reads_only_the_buckets_written_since_it_found_them_clean() {
    let roles = crate::safety::Roles::new();
    let db = seeded_db(small()).await;
    roles.create(&db).await;
    let pool = &db.pool;
    // The repayments of the loans above 75 move to ids above 10,000: buckets of their own.
    sqlx::query("UPDATE loans_ajoloanrepayment SET id = id + 10000 WHERE ajo_loan_id > 75")
        .execute(pool)
        .await
        .unwrap();
    let api = stub(Faults::default()).await;
    api.keep_records();
    let settings = settings_for(&db, &api.url(), &[]);
    let app = loansync::db::connect_url(&crate::safety::Roles::url(&db, &roles.app), 6)
        .await
        .unwrap();
    run(&app, &settings, &request(SyncType::Full, false)).await;

    // The first sweep compares every bucket and finds each clean; the second reads none.
    let start = buckets(&settings);
    let before = api.received();
    run(&app, &settings, &request(SyncType::Incremental, true)).await;
    let [unchanged, all, changed] = buckets_since(&settings, start);
    assert_eq!((unchanged, changed), (0, 0), "first sweep");
    assert!(
        all >= 5,
        "a bucket per entity and two more of repayments: {all}"
    );
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM loansync_sweep_digest")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(stored as u64, all);
    let start = buckets(&settings);
    run(&app, &settings, &request(SyncType::Incremental, true)).await;
    assert_eq!(buckets_since(&settings, start), [all, 0, 0], "no change");
    assert!(sent_since(&api.received(), &before).is_empty());

    // Changes no timestamp shows, each in a row other records are built from, one sweep
    // after each: every one is found alone (so a term missing from a digest would be).
    let (loan, agent): (i64, i64) = sqlx::query_as(
        "SELECT id::int8, agent_id::int8 FROM loans_ajoloan \
         WHERE is_disbursed AND id <= 75 AND agent_id IS NOT NULL ORDER BY id LIMIT 1",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let ids = |sql: &'static str, id: i64| async move {
        sqlx::query_scalar::<_, i64>(sql)
            .bind(id)
            .fetch_all(pool)
            .await
            .unwrap()
    };
    let officers = |candidates: Vec<i64>| async move {
        sqlx::query_scalar::<_, i64>(
            "SELECT id::int8 FROM accounts_customuser WHERE id = ANY($1::int8[]) AND user_type IN \
             ('AGENT', 'STAFF_AGENT', 'PROSPER_AGENT', 'DMO_AGENT', 'AJO_AGENT', 'RECOVERY_AGENT')",
        )
        .bind(candidates)
        .fetch_all(pool)
        .await
        .unwrap()
    };
    let sweep_finds = async |what: &str, must: Vec<(EntityKind, Vec<i64>)>| {
        let start = buckets(&settings);
        let before = api.received();
        run(&app, &settings, &request(SyncType::Incremental, true)).await;
        let [unchanged, clean, changed] = buckets_since(&settings, start);
        let swept = sent_since(&api.received(), &before);
        for (e, must) in must {
            let got = swept.get(&e).cloned().unwrap_or_default();
            let must: BTreeSet<i64> = must.into_iter().collect();
            assert!(!must.is_empty(), "{what}: {e}");
            assert!(
                got.is_superset(&must),
                "{what}: {e} swept {got:?}, must {must:?}"
            );
        }
        assert!(changed >= 1, "{what}");
        assert!(
            unchanged >= 2,
            "{what}: the repayments above 10,000 were not read"
        );
        assert_eq!(unchanged + clean + changed, all, "{what}");
        // The buckets found changed are compared once more (what was sent changed their
        // delivered rows) and found clean: the next change is alone in its buckets.
        let start = buckets(&settings);
        run(&app, &settings, &request(SyncType::Incremental, true)).await;
        let [_, clean, changed] = buckets_since(&settings, start);
        assert_eq!(changed, 0, "{what}: after");
        assert!(clean >= 1, "{what}: after");
    };

    // 1. The agent's email: the officer and the agent's loans (agent_email).
    exec(
        pool,
        "UPDATE accounts_customuser SET email = 'moved@example.com' WHERE id = $1::int4",
        agent,
    )
    .await;
    let agent_loans = ids(
        "SELECT id::int8 FROM loans_ajoloan WHERE is_disbursed AND agent_id = $1::int4",
        agent,
    )
    .await;
    let officer = officers(vec![agent]).await;
    let mut must = vec![(EntityKind::Loan, agent_loans)];
    if !officer.is_empty() {
        must.push((EntityKind::Officer, officer));
    }
    sweep_finds("an agent's email", must).await;

    // 2. The loan's reference: the loan and its repayments (loan_ref).
    exec(
        pool,
        "UPDATE loans_ajoloan SET loan_ref = 'REF-CHANGED' WHERE id = $1::int4",
        loan,
    )
    .await;
    let loan_repayments = ids(
        "SELECT id::int8 FROM loans_ajoloanrepayment WHERE ajo_loan_id = $1::int4",
        loan,
    )
    .await;
    sweep_finds(
        "a loan's reference",
        vec![
            (EntityKind::Loan, vec![loan]),
            (EntityKind::Repayment, loan_repayments),
        ],
    )
    .await;

    // 3. A schedule row of another loan: that loan's aggregates.
    let scheduled = one_id(
        pool,
        "SELECT l.id::int8 FROM loans_ajoloan l WHERE l.is_disbursed AND l.id <= 75 \
         AND EXISTS (SELECT 1 FROM loans_ajoloanschedule s WHERE s.loan_id = l.id) ORDER BY l.id DESC LIMIT 1",
    )
    .await;
    exec(
        pool,
        "UPDATE loans_ajoloanschedule SET due_amount = due_amount + 1 \
         WHERE id = (SELECT min(id) FROM loans_ajoloanschedule WHERE loan_id = $1::int4)",
        scheduled,
    )
    .await;
    sweep_finds("a schedule row", vec![(EntityKind::Loan, vec![scheduled])]).await;

    // 4. A repayment's amount, behind its timestamps: the repayment and its loan's total.
    let (repayment, paid_loan): (i64, i64) = sqlx::query_as(
        "SELECT p.id::int8, p.ajo_loan_id::int8 FROM loans_ajoloanrepayment p \
         JOIN loans_ajoloan l ON l.id = p.ajo_loan_id WHERE l.is_disbursed AND p.id < 1024 \
         ORDER BY p.id LIMIT 1",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    exec(
        pool,
        "UPDATE loans_ajoloanrepayment SET repayment_amount = repayment_amount + 1 WHERE id = $1::int4",
        repayment,
    )
    .await;
    sweep_finds(
        "a repayment's amount",
        vec![
            (EntityKind::Repayment, vec![repayment]),
            (EntityKind::Loan, vec![paid_loan]),
        ],
    )
    .await;

    // 5. A customer moved to another officer: the customer, the officers' counts, and
    // the loans it borrows (borrower_agent_id).
    let (customer, from, to): (i64, i64, i64) = sqlx::query_as(
        "SELECT c.id::int8, c.user_id::int8, \
                (SELECT min(u.id)::int8 FROM accounts_customuser u WHERE u.id <> c.user_id \
                   AND u.user_type = 'AGENT') \
         FROM ajo_ajouser c WHERE c.onboarding_complete AND c.user_id IS NOT NULL ORDER BY c.id LIMIT 1",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    exec(
        pool,
        "UPDATE ajo_ajouser SET user_id = (SELECT min(u.id) FROM accounts_customuser u \
           WHERE u.id <> ajo_ajouser.user_id AND u.user_type = 'AGENT') WHERE id = $1::int4",
        customer,
    )
    .await;
    let officer = officers(vec![from, to]).await;
    assert!(officer.contains(&to));
    sweep_finds(
        "a customer's officer",
        vec![
            (EntityKind::Customer, vec![customer]),
            (EntityKind::Officer, officer),
        ],
    )
    .await;
    assert_platform_holds_the_source(&db, &api.received(), &BTreeSet::new()).await;

    // Nothing changed since: no bucket is read.
    let start = buckets(&settings);
    run(&app, &settings, &request(SyncType::Incremental, true)).await;
    assert_eq!(buckets_since(&settings, start), [all, 0, 0]);
}
