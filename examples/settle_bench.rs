//! Settle micro-benchmark (issue 12 item 2): settles per second against 1, 2, 4, 8 and
//! 16 concurrent settlers, no API in the way, `synchronous_commit` on.
//!
//! Creates its own database (Django source schema + loansync's migrations), and for each
//! settler count plans a sync of loans with many chunks straight into the ledger, then
//! runs N tasks, each with its own connection, that settle chunks (every record accepted,
//! its fingerprint written, as a worker's settle does) as fast as they can for a few
//! seconds. Meanwhile another connection samples every 50 ms how many backends of the
//! database wait on a lock (`pg_stat_activity.wait_event_type = 'Lock'`). Prints one
//! table row per settler count, and drops its database at the end.
//!
//! `cargo run --release --example settle_bench` (or `bash bench/settle.sh`). Environment:
//! `BENCH_PG_ADMIN_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`),
//! `BENCH_SETTLERS` (default `1,2,4,8,16`), `BENCH_SECS` (default 5), `BENCH_CHUNKS`
//! (default 20000), `BENCH_CHUNK_IDS` (default 100).

use loansync::domain::{EntityKind, SyncType};
use loansync::ledger::lifecycle::{self, Claim};
use loansync::ledger::{
    self,
    lifecycle::{RowLock, SyncSpec},
    plan::PlanTotals,
    settle::ChunkResult,
    states::Purpose,
};
use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const SOURCE_SCHEMA: &str = include_str!("../schema/django_source_schema.sql");

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Run {
    settlers: usize,
    settles: u64,
    secs: f64,
    lock_waiters_mean: f64,
    lock_waiters_max: i64,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let admin_url = std::env::var("BENCH_PG_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
    let settlers: Vec<usize> = std::env::var("BENCH_SETTLERS")
        .unwrap_or_else(|_| "1,2,4,8,16".to_string())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let secs: f64 = env_or("BENCH_SECS", 5.0);
    let chunks: i64 = env_or("BENCH_CHUNKS", 20_000);
    let chunk_ids: i64 = env_or("BENCH_CHUNK_IDS", 100);

    let name = format!("loansync_settle_bench_{}", std::process::id());
    let admin = PgPool::connect(&admin_url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await?;
    let url = match admin_url.rfind('/') {
        Some(i) => format!("{}/{name}", &admin_url[..i]),
        None => anyhow::bail!("BENCH_PG_ADMIN_URL has no database part"),
    };
    let outcome = bench(&url, &settlers, secs, chunks, chunk_ids).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&admin)
    .await?;
    admin.close().await;
    let runs = outcome?;
    println!();
    println!(
        "| settlers | settles | seconds | settles/s | backends waiting on a lock (mean) | (max) |"
    );
    println!("|---|---|---|---|---|---|");
    for r in &runs {
        println!(
            "| {} | {} | {:.1} | {:.0} | {:.2} | {} |",
            r.settlers,
            r.settles,
            r.secs,
            r.settles as f64 / r.secs,
            r.lock_waiters_mean,
            r.lock_waiters_max
        );
    }
    Ok(())
}

async fn bench(
    url: &str,
    settlers: &[usize],
    secs: f64,
    chunks: i64,
    chunk_ids: i64,
) -> anyhow::Result<Vec<Run>> {
    let pool = loansync::db::connect_url(url, 4).await?;
    sqlx::raw_sql(SOURCE_SCHEMA).execute(&pool).await?;
    loansync::db::migrate(&pool).await?;
    let sync_commit: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&pool)
        .await?;
    let fsync: String = sqlx::query_scalar("SHOW fsync").fetch_one(&pool).await?;
    eprintln!(
        "synchronous_commit = {sync_commit}, fsync = {fsync}; {chunks} chunks of {chunk_ids} ids per run, {secs} s per run"
    );
    let mut runs = Vec::new();
    for (i, &n) in settlers.iter().enumerate() {
        let base = i as i64 * chunks * chunk_ids;
        let sync_id = plan(&pool, chunks, chunk_ids, base).await?;
        let run = settle_for(url, &pool, &sync_id, n, secs, chunks, chunk_ids, base).await?;
        eprintln!(
            "{n:>2} settlers: {:.0} settles/s, {:.2} backends waiting on a lock",
            run.settles as f64 / run.secs,
            run.lock_waiters_mean
        );
        runs.push(run);
        // Ends the sync without settling the rest, so that the next run can claim the slot.
        sqlx::query("UPDATE loansync_sync SET state = 'done' WHERE sync_id = $1")
            .bind(&sync_id)
            .execute(&pool)
            .await?;
        sqlx::query("VACUUM ANALYZE").execute(&pool).await?;
    }
    pool.close().await;
    Ok(runs)
}

/// A running sync of `chunks` loan chunks of `chunk_ids` ids each, ids from `base + 1`.
async fn plan(pool: &PgPool, chunks: i64, chunk_ids: i64, base: i64) -> anyhow::Result<String> {
    let lock = ledger::lifecycle::PlanningLock::acquire(pool).await?;
    let spec = SyncSpec {
        sync_type: SyncType::Full,
        entities: vec![EntityKind::Loan],
        purpose: Purpose::Sync,
        since: None,
        until: None,
    };
    let claim = lifecycle::claim(pool, &lock, &spec, None).await?;
    let Claim::Started(sync) = claim else {
        anyhow::bail!("no sync claimed: {claim:?}");
    };
    let (sync_id, window_hi) = (sync.sync_id, sync.window_hi);
    let mut tx = pool.begin().await?;
    anyhow::ensure!(lifecycle::hold_planning(&mut tx, &sync_id, RowLock::Update).await?);
    sqlx::query(
        "INSERT INTO loansync_chunk (sync_id, entity, seq, ids) \
         SELECT $1, 'loan', g, ARRAY(SELECT $3 + g::int8 * $2 + k FROM generate_series(1, $2) k) \
         FROM generate_series(0, $4 - 1) g",
    )
    .bind(&sync_id)
    .bind(chunk_ids)
    .bind(base)
    .bind(chunks)
    .execute(&mut *tx)
    .await?;
    let totals = PlanTotals {
        records: vec![(EntityKind::Loan, chunks * chunk_ids)],
        chunks,
    };
    ledger::plan::write_plan(&mut tx, &sync_id, &totals, None, window_hi).await?;
    tx.commit().await?;
    lock.release().await;
    sqlx::query("VACUUM ANALYZE loansync_chunk")
        .execute(pool)
        .await?;
    Ok(sync_id)
}

#[allow(clippy::too_many_arguments)]
async fn settle_for(
    url: &str,
    pool: &PgPool,
    sync_id: &str,
    n: usize,
    secs: f64,
    chunks: i64,
    chunk_ids: i64,
    base: i64,
) -> anyhow::Result<Run> {
    let history_id: i32 =
        sqlx::query_scalar("SELECT id FROM etl_folder_etlsynchistory WHERE sync_id = $1")
            .bind(sync_id)
            .fetch_one(pool)
            .await?;
    // Each settler its own connection, opened before the clock starts.
    let mut pools = Vec::with_capacity(n);
    for _ in 0..n {
        let p = loansync::db::connect_url(url, 1).await?;
        sqlx::query("SELECT 1").execute(&p).await?;
        pools.push(p);
    }
    let next = Arc::new(AtomicI64::new(0));
    let settled = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for p in pools {
        let (next, settled, stop, sync_id) = (
            next.clone(),
            settled.clone(),
            stop.clone(),
            sync_id.to_string(),
        );
        tasks.spawn(async move {
            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= chunks {
                    break;
                }
                let ids: Vec<i64> = (1..=chunk_ids)
                    .map(|k| base + seq * chunk_ids + k)
                    .collect();
                let delivered: Vec<(i64, uuid::Uuid)> =
                    ids.iter().map(|&id| (id, uuid::Uuid::new_v4())).collect();
                let r = ChunkResult {
                    sync_id: &sync_id,
                    entity: EntityKind::Loan,
                    seq: seq as i32,
                    history_id,
                    purpose: Purpose::Sync,
                    succeeded: &ids,
                    delivered: &delivered,
                    failed: &[],
                    api_response: None,
                    upsert: ledger::settle::FingerprintUpsert::plain(),
                };
                ledger::settle::settle_chunk(&p, &r).await?;
                settled.fetch_add(1, Ordering::Relaxed);
            }
            p.close().await;
            anyhow::Ok(())
        });
    }
    // Lock waiters, sampled every 50 ms on a connection of its own.
    let mut sampler = pool.acquire().await?;
    let mut samples: Vec<i64> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    while Instant::now() < deadline {
        tick.tick().await;
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut *sampler)
        .await?;
        samples.push(waiting);
    }
    drop(sampler);
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined? {
            stop.store(true, Ordering::Relaxed);
            return Err(e);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(Run {
        settlers: n,
        settles: settled.load(Ordering::Relaxed),
        secs,
        lock_waiters_mean: samples.iter().sum::<i64>() as f64 / samples.len().max(1) as f64,
        lock_waiters_max: samples.iter().copied().max().unwrap_or(0),
    })
}
