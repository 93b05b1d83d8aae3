//! Loader micro-benchmark (issue 12 item 4): loansync's own CPU per record for loading a
//! chunk (decoding the rows, fingerprinting, transforming, encoding the records) and
//! building its request body, with no API, no queue and no settle in the way.
//!
//! Reads an already seeded database (`DATABASE_URL`, e.g. the one `BENCH_KEEP=1 bash
//! bench/scale.sh --size M` leaves): for each entity, the first `BENCH_CHUNKS` chunks of
//! its ids at the designed chunk size, loaded one after the other on a single-threaded
//! runtime, for `BENCH_ROUNDS` rounds. Prints, per entity and round, the process's CPU
//! time (from /proc/thread-self/schedstat: PostgreSQL's work is in its own processes)
//! per record. The first round also warms PostgreSQL's cache.
//!
//! `cargo run --release --example load_bench`. Environment: `DATABASE_URL` (required),
//! `BENCH_CHUNKS` (default 200), `BENCH_ROUNDS` (default 3), `BENCH_ENTITIES` (default
//! `loan,repayment,customer`). For figures that do not depend on what else the machine
//! does, count instructions instead: `valgrind --tool=callgrind` with one entity, a few
//! chunks and one round.

use loansync::domain::{EntityKind, SyncType};
use loansync::sink::encoder;
use loansync::source;
use std::time::Instant;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The CPU time of this thread so far, in seconds (/proc/thread-self/schedstat, in
/// nanoseconds: the single-threaded runtime runs everything on it).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").expect("schedstat");
    let ns: f64 = stat
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a schedstat line");
    ns / 1e9
}

fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL").map_err(|_| anyhow::anyhow!("set DATABASE_URL"))?;
    let chunks: usize = env_or("BENCH_CHUNKS", 200);
    let rounds: usize = env_or("BENCH_ROUNDS", 3);
    let only: String = env_or("BENCH_ENTITIES", "loan,repayment,customer".to_string());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let pool = loansync::db::connect_url(&url, 1).await?;
        println!("| entity | round | records | CPU µs/record | wall µs/record |");
        println!("|---|---|---|---|---|");
        for (entity, size, table, filter) in [
            (EntityKind::Loan, 100usize, "loans_ajoloan", "is_disbursed"),
            (EntityKind::Repayment, 200, "loans_ajoloanrepayment", "true"),
            (
                EntityKind::Customer,
                100,
                "ajo_ajouser",
                "onboarding_complete",
            ),
        ] {
            if !only.split(',').any(|e| e.trim() == entity.as_str()) {
                continue;
            }
            let ids: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT id::int8 FROM {table} WHERE {filter} ORDER BY id LIMIT $1"
            )))
            .bind((chunks * size) as i64)
            .fetch_all(&pool)
            .await?;
            for round in 1..=rounds {
                let (cpu0, wall0) = (cpu_seconds(), Instant::now());
                let mut records = 0usize;
                let mut bytes = 0usize;
                for (seq, chunk) in ids.chunks(size).enumerate() {
                    let loaded = source::load_chunk(&pool, entity, chunk).await?;
                    let body =
                        encoder::body("bench", SyncType::Full, entity, seq as i32, &loaded.records);
                    records += loaded.records.len();
                    bytes += body.len();
                }
                let cpu = cpu_seconds() - cpu0;
                let wall = wall0.elapsed().as_secs_f64();
                println!(
                    "| {} | {round} | {records} | {:.2} | {:.2} |",
                    entity.as_str(),
                    cpu * 1e6 / records as f64,
                    wall * 1e6 / records as f64,
                );
                std::hint::black_box(bytes);
            }
        }
        anyhow::Ok(())
    })
}
