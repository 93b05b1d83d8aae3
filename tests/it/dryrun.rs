//! `--dry-run` (issue 26): a dry run reports exactly what the following real run sends
//! (the stub API's received ids), per entity split into new, changed and unchanged (and
//! deleted for a sweep), and writes nothing: no history, error, request, sync, chunk,
//! delivered or deleted row, no watermark moved, nothing sent. Single-process mode
//! against real PostgreSQL and the stub API; the command line's output at the end.

use crate::fixtures::{insert_customer, insert_repayment};
use crate::harness::{loansync_process, seeded_db, settings_for, small, stub};
use loansync::config::Settings;
use loansync::domain::{EntityKind, PlanRequest, SyncType};
use loansync::planner::DryRun;
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

/// A dry run with every id, as `sync --dry-run --ids` computes it.
async fn dry(pool: &sqlx::PgPool, settings: &Settings, req: &PlanRequest) -> DryRun {
    let dry = loansync::app::dryrun::dry_run(pool, settings, req, true)
        .await
        .expect("dry run");
    assert!(dry.dry_run);
    dry
}

/// Runs the real sync in this process; returns the records it planned per entity.
async fn run(
    pool: &sqlx::PgPool,
    settings: &Settings,
    req: &PlanRequest,
) -> BTreeMap<EntityKind, i64> {
    let s = loansync::app::sync_in_process(pool, settings, req)
        .await
        .expect("sync");
    assert_eq!(s.exit_code(), 0, "{}", s.render());
    s.progress
        .iter()
        .map(|p| (p.entity, i64::from(p.total)))
        .collect()
}

/// What the dry run says would be sent, per entity: new, changed and, unless it is a
/// sweep, unchanged. Entities with nothing to send are left out.
fn would_send(dry: &DryRun) -> BTreeMap<EntityKind, BTreeSet<i64>> {
    dry.entities
        .iter()
        .map(|e| {
            let ids = e.ids.as_ref().expect("ids kept");
            let mut send: BTreeSet<i64> = ids.new.iter().chain(&ids.changed).copied().collect();
            if e.deleted.is_none() {
                send.extend(&ids.unchanged);
            }
            assert_eq!(send.len() as u64, e.would_send, "{}", e.entity);
            assert_eq!(
                (ids.new.len(), ids.changed.len(), ids.unchanged.len()),
                (e.new as usize, e.changed as usize, e.unchanged as usize),
                "{}",
                e.entity
            );
            (e.entity, send)
        })
        .filter(|(_, ids)| !ids.is_empty())
        .collect()
}

fn counts(dry: &DryRun) -> BTreeMap<EntityKind, i64> {
    dry.entities
        .iter()
        .map(|e| (e.entity, e.would_send as i64))
        .collect()
}

fn sent_since(now: &Received, before: &Received) -> BTreeMap<EntityKind, BTreeSet<i64>> {
    EntityKind::ALL
        .into_iter()
        .map(|e| (e, now.ids_sent_since(before, e)))
        .filter(|(_, ids)| !ids.is_empty())
        .collect()
}

fn kind(dry: &DryRun, entity: EntityKind) -> &loansync::planner::EntityDryRun {
    dry.entities
        .iter()
        .find(|e| e.entity == entity)
        .expect("the entity is in the dry run")
}

/// Everything a sync writes, as one value: the row counts of the history, error,
/// request, sync, chunk, delivered, deleted and xid-clock tables, each watermark with
/// its sync, and a digest of the delivered fingerprints.
async fn books(pool: &sqlx::PgPool) -> Value {
    sqlx::query_scalar(
        "SELECT json_build_object(
            'history', (SELECT count(*) FROM etl_folder_etlsynchistory),
            'errors', (SELECT count(*) FROM etl_folder_etlsyncerror),
            'requests', (SELECT count(*) FROM loansync_request),
            'syncs', (SELECT count(*) FROM loansync_sync),
            'entities', (SELECT count(*) FROM loansync_sync_entity),
            'chunks', (SELECT count(*) FROM loansync_chunk),
            'deleted', (SELECT count(*) FROM loansync_deleted),
            'xid_clock', (SELECT count(*) FROM loansync_xid_clock),
            'watermarks', (SELECT json_agg(json_build_object('e', entity_type,
                               'at', last_sync_timestamp, 'by', last_sync_id)
                               ORDER BY entity_type) FROM etl_folder_etllastsync),
            'delivered', (SELECT md5(coalesce(string_agg(entity || id || fingerprint::text
                               || sync_id, ',' ORDER BY entity, id), ''))
                          FROM loansync_delivered))",
    )
    .fetch_one(pool)
    .await
    .expect("books")
}

/// Runs `req` dry, checks it wrote and sent nothing, then runs it for real and checks
/// that the real run sent exactly the ids the dry run said, and planned as many.
async fn dry_then_real(
    pool: &sqlx::PgPool,
    settings: &Settings,
    api: &loansync::stub_api::StubHandle,
    req: &PlanRequest,
) -> DryRun {
    let (books_before, received_before) = (books(pool).await, api.received());
    let dry = dry(pool, settings, req).await;
    assert_eq!(books(pool).await, books_before, "the dry run wrote nothing");
    assert_eq!(
        api.received().requests(),
        received_before.requests(),
        "the dry run sent nothing"
    );
    let planned = run(pool, settings, req).await;
    assert_eq!(
        sent_since(&api.received(), &received_before),
        would_send(&dry),
        "the real run sent what the dry run said"
    );
    assert_eq!(planned, counts(&dry), "the real run planned as many");
    dry
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_dry_run_is_what_the_full_sync_sends_and_unchanged_records_are_sent_again() {
    let db = seeded_db(small()).await;
    let pool = &db.pool;
    let api = stub(Faults::default()).await;
    let settings = settings_for(&db, &api.url(), &[]);
    let full = request(SyncType::Full, false);

    // Never synced: every record is new.
    let first = dry_then_real(pool, &settings, &api, &full).await;
    assert_eq!(first.kind, "full");
    assert_eq!(
        counts(&first),
        crate::harness::expected_full(pool)
            .await
            .into_iter()
            .map(|(e, ids)| (e, ids.len() as i64))
            .collect()
    );
    for e in &first.entities {
        assert!(e.would_send > 0, "{}: the seed has records", e.entity);
        assert_eq!((e.new, e.changed, e.unchanged), (e.would_send, 0, 0));
        assert_eq!((e.window_lo, e.deleted), (None, None), "{}", e.entity);
    }

    // Synced, nothing changed: every record is unchanged, and a full sync sends it again.
    let again = dry_then_real(pool, &settings, &api, &full).await;
    for (e, before) in again.entities.iter().zip(&first.entities) {
        assert_eq!(
            (e.would_send, e.new, e.changed, e.unchanged),
            (before.would_send, 0, 0, before.would_send),
            "{}",
            e.entity
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_incremental_dry_run_is_what_the_next_incremental_sync_sends() {
    let db = seeded_db(small()).await;
    let pool = &db.pool;
    let api = stub(Faults::default()).await;
    // An hour's overlap: the rows changed below are still in the window of the sync after
    // the next one.
    let settings = settings_for(&db, &api.url(), &[("ETL_INCREMENTAL_OVERLAP_SECS", "3600")]);
    run(pool, &settings, &request(SyncType::Full, false)).await;

    // A customer saved with a new name; a customer onboarded now (never delivered); a
    // repayment made now (new, and its loan's aggregates changed).
    let saved: i64 = sqlx::query_scalar(
        "UPDATE ajo_ajouser SET first_name = 'Saved', date_modified = now() \
         WHERE id = (SELECT min(id) FROM ajo_ajouser WHERE onboarding_complete) RETURNING id::int8",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let agent: i64 =
        sqlx::query_scalar("SELECT min(user_id)::int8 FROM ajo_ajouser WHERE user_id IS NOT NULL")
            .fetch_one(pool)
            .await
            .unwrap();
    let onboarded = insert_customer(pool, Some(agent), true).await;
    sqlx::query("UPDATE ajo_ajouser SET date_modified = now() WHERE id = $1::int4")
        .bind(onboarded)
        .execute(pool)
        .await
        .unwrap();
    let loan: i64 =
        sqlx::query_scalar("SELECT min(id)::int8 FROM loans_ajoloan WHERE is_disbursed")
            .fetch_one(pool)
            .await
            .unwrap();
    let repaid = insert_repayment(pool, loan).await;
    sqlx::query(
        "UPDATE loans_ajoloanrepayment SET date_created = now(), date_modified = now() \
         WHERE id = $1::int4",
    )
    .bind(repaid)
    .execute(pool)
    .await
    .unwrap();

    let dry = dry_then_real(
        pool,
        &settings,
        &api,
        &request(SyncType::Incremental, false),
    )
    .await;
    assert_eq!(dry.kind, "incremental");
    let customers = kind(&dry, EntityKind::Customer).ids.clone().unwrap();
    assert_eq!(
        (customers.new, customers.changed, customers.unchanged),
        (vec![onboarded], vec![saved], vec![])
    );
    let loans = kind(&dry, EntityKind::Loan).ids.clone().unwrap();
    assert_eq!((loans.new, loans.changed), (vec![], vec![loan]));
    let repayments = kind(&dry, EntityKind::Repayment).ids.clone().unwrap();
    assert_eq!((repayments.new, repayments.changed), (vec![repaid], vec![]));
    // Officers have no time: every incremental sync sends them, unchanged, but for the
    // agent of the customer onboarded now (its `customers_count` changed).
    let officers = kind(&dry, EntityKind::Officer);
    assert!(officers.unchanged > 0);
    assert_eq!(
        (officers.new, &officers.ids.as_ref().unwrap().changed),
        (0, &vec![agent])
    );
    assert_eq!(officers.would_send, officers.unchanged + 1);
    for e in &dry.entities {
        assert!(e.window_lo.is_some(), "{}: an incremental window", e.entity);
        assert_eq!(e.deleted, None);
    }

    // No dry run moved a watermark (drt#978: a dry run that did made the next real run
    // skip rows): the next dry run's windows start exactly where the real incremental
    // sync above left them, less the overlap; and the real run after it sends what it
    // says (the rows still in the overlap, and the officers).
    let marks: BTreeMap<String, chrono::DateTime<chrono::Utc>> =
        sqlx::query_as("SELECT entity_type::text, last_sync_timestamp FROM etl_folder_etllastsync")
            .fetch_all(pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let after = dry_then_real(
        pool,
        &settings,
        &api,
        &request(SyncType::Incremental, false),
    )
    .await;
    for e in &after.entities {
        assert_eq!(
            e.window_lo,
            Some(marks[e.entity.as_str()] - settings.incremental_overlap),
            "{}",
            e.entity
        );
    }
    // Within the overlap, the rows sent above are selected again: unchanged now, and sent
    // all the same.
    let unchanged = |e: EntityKind| kind(&after, e).ids.clone().unwrap().unchanged;
    assert_eq!(
        (
            unchanged(EntityKind::Customer),
            unchanged(EntityKind::Loan),
            unchanged(EntityKind::Repayment),
            unchanged(EntityKind::Officer).len() as u64
        ),
        (
            BTreeSet::from([saved, onboarded]).into_iter().collect(),
            vec![loan],
            vec![repaid],
            officers.would_send
        )
    );
    for e in &after.entities {
        assert_eq!((e.new, e.changed), (0, 0), "{}", e.entity);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sweep_dry_run_finds_what_the_sweep_sends_and_records_as_deleted() {
    let db = seeded_db(small()).await;
    let pool = &db.pool;
    let api = stub(Faults::default()).await;
    let settings = settings_for(&db, &api.url(), &[]);
    run(pool, &settings, &request(SyncType::Full, false)).await;

    // Behind the timestamps: a loan's status changed, a repayment deleted, a customer's
    // onboarding undone; none touches date_modified.
    let bypassed: i64 = sqlx::query_scalar(
        "UPDATE loans_ajoloan SET status = 'RESTRUCTURED' \
         WHERE id = (SELECT min(id) FROM loans_ajoloan WHERE is_disbursed) RETURNING id::int8",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let (deleted, its_loan): (i64, i64) = sqlx::query_as(
        "DELETE FROM loans_ajoloanrepayment WHERE id = (SELECT max(id) FROM loans_ajoloanrepayment) \
         RETURNING id::int8, ajo_loan_id::int8",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let unonboarded: i64 = sqlx::query_scalar(
        "UPDATE ajo_ajouser SET onboarding_complete = false \
         WHERE id = (SELECT max(id) FROM ajo_ajouser WHERE onboarding_complete) RETURNING id::int8",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    let disbursed: bool =
        sqlx::query_scalar("SELECT is_disbursed FROM loans_ajoloan WHERE id = $1::int4")
            .bind(its_loan)
            .fetch_one(pool)
            .await
            .unwrap();

    let dry = dry_then_real(pool, &settings, &api, &request(SyncType::Incremental, true)).await;
    assert_eq!(dry.kind, "sweep");
    let loans = kind(&dry, EntityKind::Loan).ids.clone().unwrap();
    let mut changed = BTreeSet::from([bypassed]);
    if disbursed {
        changed.insert(its_loan);
    }
    assert_eq!(loans.changed.into_iter().collect::<BTreeSet<_>>(), changed);
    let customers = kind(&dry, EntityKind::Customer);
    assert_eq!(customers.ids.as_ref().unwrap().deleted, vec![unonboarded]);
    assert_eq!(
        kind(&dry, EntityKind::Repayment)
            .ids
            .as_ref()
            .unwrap()
            .deleted,
        vec![deleted]
    );
    for e in &dry.entities {
        assert_eq!(e.new, 0, "{}: everything was delivered", e.entity);
        assert!(e.unchanged > 0, "{}: a sweep skips the unchanged", e.entity);
        assert_eq!(e.would_send, e.changed, "{}", e.entity);
    }
    // What the sweep recorded as deleted is what the dry run said.
    let recorded: BTreeSet<(String, i64)> =
        sqlx::query_as("SELECT entity::text, id FROM loansync_deleted")
            .fetch_all(pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let said: BTreeSet<(String, i64)> = dry
        .entities
        .iter()
        .flat_map(|e| {
            e.ids
                .as_ref()
                .unwrap()
                .deleted
                .iter()
                .map(move |id| (e.entity.as_str().to_string(), *id))
        })
        .collect();
    assert_eq!(recorded, said);
    assert_eq!(
        dry.entities.iter().map(|e| e.deleted.unwrap()).sum::<u64>(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backfill_dry_run_is_what_the_backfill_sends() {
    let db = seeded_db(small()).await;
    let pool = &db.pool;
    let api = stub(Faults::default()).await;
    let settings = settings_for(&db, &api.url(), &[]);
    run(pool, &settings, &request(SyncType::Full, false)).await;
    let now = chrono::Utc::now();
    let backfill = PlanRequest {
        since: Some(now - chrono::Duration::days(30)),
        until: Some(now - chrono::Duration::days(10)),
        ..request(SyncType::Incremental, false)
    };
    let dry = dry_then_real(pool, &settings, &api, &backfill).await;
    assert_eq!(dry.kind, "backfill");
    assert_eq!(dry.window_hi, backfill.until.unwrap());
    let full = crate::harness::expected_full(pool).await;
    for e in [EntityKind::Customer, EntityKind::Repayment] {
        let e = kind(&dry, e);
        assert_eq!(e.window_lo, backfill.since);
        // The window selects some of the records (the seed spreads them over 60 days),
        // not all; the full sync delivered them and nothing changed since.
        assert!(
            e.would_send > 0 && (e.would_send as usize) < full[&e.entity].len(),
            "{}: {} of {}",
            e.entity,
            e.would_send,
            full[&e.entity].len()
        );
        assert_eq!(e.unchanged, e.would_send, "{}", e.entity);
    }
    // An incremental selection of loans takes them whatever their disbursement: those
    // not disbursed were never delivered (new); the disbursed ones are unchanged.
    let loans = kind(&dry, EntityKind::Loan);
    let ids = loans.ids.as_ref().unwrap();
    assert!(
        ids.unchanged
            .iter()
            .all(|id| full[&EntityKind::Loan].contains(id))
    );
    assert!(
        ids.new
            .iter()
            .all(|id| !full[&EntityKind::Loan].contains(id))
    );
    assert!(loans.unchanged > 0 && loans.changed == 0, "{loans:?}");
}

/// The command line: `--json` parses and carries the ids with `--ids`; the text lists
/// them; `trigger --dry-run` never touches the broker (an unreachable AMQP_URL); the
/// flags that make no sense together are usage errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_output_is_json_for_scripts_and_lists_ids_and_publishes_nothing() {
    let db = seeded_db(small()).await;
    let api = stub(Faults::default()).await;
    let settings = settings_for(&db, &api.url(), &[]);
    let books_before = books(&db.pool).await;
    let loansync = |args: &[&str]| {
        let mut cmd = loansync_process(&db, &settings, &api.url());
        cmd.env("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
            .args(args);
        cmd
    };

    let out = loansync(&[
        "sync",
        "--full",
        "--entity",
        "officer",
        "--dry-run",
        "--ids",
        "--json",
    ])
    .output()
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let json: Value = serde_json::from_slice(&out.stdout).expect("--json is JSON");
    assert_eq!(json["dry_run"], true);
    assert_eq!(json["kind"], "full");
    let officers = &json["entities"][0];
    assert_eq!(json["entities"].as_array().unwrap().len(), 1);
    assert_eq!(officers["entity"], "officer");
    let expected: Vec<i64> = crate::harness::expected_full(&db.pool).await[&EntityKind::Officer]
        .iter()
        .copied()
        .collect();
    let listed: Vec<i64> = officers["ids"]["new"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(listed, expected);
    assert_eq!(officers["would_send"], expected.len());
    assert_eq!(officers["deleted"], Value::Null);

    // Without --ids the JSON has counts only.
    let out = loansync(&["trigger", "--sweep", "--dry-run", "--json"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let json: Value = serde_json::from_slice(&out.stdout).expect("--json is JSON");
    assert_eq!(json["kind"], "sweep");
    assert_eq!(json["entities"].as_array().unwrap().len(), 4);
    for e in json["entities"].as_array().unwrap() {
        assert!(e.get("ids").is_none(), "{e}");
        assert_eq!(e["deleted"], 0, "{e}");
    }

    // Text: the table, then one line of ids per entity and kind.
    let out = loansync(&[
        "trigger",
        "--since",
        "2000-01-01T00:00:00Z",
        "--entity",
        "officer",
        "--dry-run",
        "--ids",
    ])
    .output()
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("dry run of a backfill sync"), "{text}");
    let line = expected
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        text.contains(&format!("officer new ({}): {line}\n", expected.len())),
        "{text}"
    );

    for usage in [
        &["trigger", "--json"][..],
        &["trigger", "--dry-run", "--wait"],
        &["sync", "--ids"],
        &["trigger", "--ids"],
    ] {
        let out = loansync(usage).output().await.unwrap();
        assert_eq!(out.status.code(), Some(2), "{usage:?}: {out:?}");
    }
    assert_eq!(books(&db.pool).await, books_before, "nothing was written");
    assert_eq!(api.received().requests(), 0, "nothing was sent");
}
