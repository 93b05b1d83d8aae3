//! Publishing micro-benchmark: how long the planner's publishing of a sync's chunk jobs
//! takes on its own, with nobody consuming (`Broker::publish_chunks`: persistent,
//! publisher-confirmed, to the chunk queue as the broker declares it: quorum when it
//! can). Each round connects with a queue prefix of its own, publishes the jobs, and
//! deletes its queues. Prints one line per round: seconds and jobs per second.
//!
//! `cargo run --release --example publish_bench`. Environment: `AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`), `BENCH_JOBS` (default 6664, dataset M's
//! chunks), `BENCH_ROUNDS` (default 5).

use loansync::app::connect_broker;
use loansync::config::Settings;
use loansync::domain::{ChunkJob, EntityKind};
use loansync::queue::ChunkPublisher;
use std::collections::HashMap;
use std::time::Instant;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let jobs_n: i32 = env_or("BENCH_JOBS", 6_664);
    let rounds: u32 = env_or("BENCH_ROUNDS", 5);
    let amqp = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string());
    let jobs: Vec<ChunkJob> = (0..jobs_n)
        .map(|seq| ChunkJob {
            sync_id: "publish-bench-00000000-0000-0000-0000-000000000000".into(),
            entity: EntityKind::Repayment,
            seq,
        })
        .collect();
    println!("| round | jobs | seconds | jobs/s |");
    println!("|---|---|---|---|");
    for round in 1..=rounds {
        let env: HashMap<&str, String> = [
            // Not connected to: the settings need one.
            (
                "DATABASE_URL",
                "postgres://unused@127.0.0.1:1/unused".to_string(),
            ),
            ("ANALYTICS_API_URL", "http://127.0.0.1:9".to_string()),
            ("AMQP_URL", amqp.clone()),
            (
                "ETL_QUEUE_PREFIX",
                format!("publish-bench-{}-{round}", std::process::id()),
            ),
        ]
        .into_iter()
        .collect();
        let settings = Settings::from_lookup(|k| env.get(k).cloned())
            .map_err(|e| anyhow::anyhow!("settings: {e}"))?;
        let broker = connect_broker(&settings).await?;
        let started = Instant::now();
        let published = broker.publish_chunks(&jobs).await;
        let secs = started.elapsed().as_secs_f64();
        let depth = broker.queue_depth(&broker.topology.chunks).await;
        broker.delete_topology().await?;
        broker.close().await;
        published?;
        anyhow::ensure!(
            depth? == jobs.len() as u32,
            "the chunk queue does not hold every job"
        );
        println!(
            "| {round} | {} | {secs:.3} | {:.0} |",
            jobs.len(),
            jobs.len() as f64 / secs
        );
    }
    Ok(())
}
