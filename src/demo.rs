//! `loansync demo`: the whole system on this machine's local services, in one command.
//!
//! Creates (or resets) a demo database, loads the Django source schema, seeds it,
//! migrates, starts the stub analytics API in-process, runs a planner and two workers
//! over RabbitMQ (or single-process mode when RabbitMQ does not answer), triggers a full
//! sync, changes some rows, triggers an incremental sync, and prints what happened.

use crate::config::Settings;
use crate::domain::{EntityKind, PlanRequest, SyncType};
use crate::redact::redact_url;
use crate::seed::{self, SeedSpec};
use crate::stub_api::{self, Faults, StubConfig};
use crate::{app, db};
use secrecy::ExposeSecret;
use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The source schema exactly as Django creates it (the project's copy of the fixture).
pub const SOURCE_SCHEMA: &str = include_str!("../schema/django_source_schema.sql");

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// The demo database (created or reset; never point this at a real database).
    #[arg(
        long,
        default_value = "postgres://postgres@127.0.0.1:5432/loansync_demo"
    )]
    pub database_url: String,
    /// Dataset size: 1 is 20 users, 1,000 customers, 2,000 loans, 10,000 repayments.
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Reject every Nth record id at the stub API, to see error rows (0: none).
    #[arg(long, default_value_t = 0)]
    pub reject_every_nth: u64,
    /// Run planner and workers in this process without RabbitMQ.
    #[arg(long)]
    pub single_process: bool,
}

/// Drops and recreates the database named in `url`, connecting to `postgres` beside it.
pub async fn reset_database(url: &str) -> anyhow::Result<()> {
    let parsed = url::Url::parse(url)?;
    let name = parsed.path().trim_start_matches('/').to_string();
    anyhow::ensure!(
        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        "the demo database name must be letters, digits and '_' (got {name:?})"
    );
    let mut admin_url = parsed.clone();
    admin_url.set_path("/postgres");
    let admin = db::connect_url(admin_url.as_str(), 2).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&admin)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await?;
    admin.close().await;
    Ok(())
}

pub async fn run(args: DemoArgs, base: &Settings) -> anyhow::Result<u8> {
    let t0 = Instant::now();
    eprintln!("demo: resetting {}", redact_url(&args.database_url));
    reset_database(&args.database_url).await?;
    let pool = db::connect_url(&args.database_url, 10).await?;
    sqlx::raw_sql(SOURCE_SCHEMA).execute(&pool).await?;
    let spec = SeedSpec::scale(args.scale, 42);
    eprintln!(
        "demo: seeding {} users, {} customers, {} loans, {} repayments",
        spec.users, spec.customers, spec.loans, spec.repayments
    );
    let seeded = seed::seed(&pool, spec).await?;
    // Seeded timestamps reach up to now; move them a day back so the incremental sync
    // below sends exactly the rows this demo changes.
    sqlx::raw_sql(
        "UPDATE ajo_ajouser SET date_modified = date_modified - interval '1 day';
         UPDATE loans_ajoloan SET date_modified = date_modified - interval '1 day';
         UPDATE loans_ajoloanrepayment SET date_created = date_created - interval '1 day';",
    )
    .execute(&pool)
    .await?;
    eprintln!(
        "demo: seeded {} schedule rows too, in {:.1}s",
        seeded.schedules, seeded.seconds
    );
    db::migrate(&pool).await?;

    let stub = stub_api::spawn(
        StubConfig {
            api_key: base.api()?.key.expose_secret().to_string(),
            faults: Faults {
                reject_every_nth: args.reject_every_nth,
                ..Default::default()
            },
        },
        "127.0.0.1:0".parse()?,
    )
    .await?;
    eprintln!("demo: stub analytics API on {}", stub.url());

    let mut settings = base.clone();
    settings.database_url = args.database_url.clone().into();
    let mut api = base.api()?.clone();
    api.base_url = url::Url::parse(&stub.url())?;
    settings.api = Ok(api);
    settings.queue_prefix = format!("loansync-demo-{}", std::process::id());
    let settings = Arc::new(settings);

    let broker = if args.single_process {
        None
    } else {
        match app::connect_broker(&settings).await {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!(
                    "demo: RabbitMQ does not answer at {} ({e:#}); running in single-process mode",
                    settings.amqp_url_redacted()
                );
                None
            }
        }
    };

    let mut syncs = Vec::new();
    match broker {
        Some(admin) => {
            let cancel = CancellationToken::new();
            let mut tasks = Vec::new();
            tasks.push(tokio::spawn(app::run_planner(
                pool.clone(),
                settings.clone(),
                Arc::new(AtomicBool::new(false)),
                cancel.clone(),
            )));
            for _ in 0..2 {
                tasks.push(tokio::spawn(app::run_worker(
                    pool.clone(),
                    settings.clone(),
                    Arc::new(AtomicBool::new(false)),
                    cancel.clone(),
                )));
            }
            eprintln!(
                "demo: planner and two workers on RabbitMQ (queues {}.*)",
                settings.queue_prefix
            );
            for (sync_type, label) in [
                (SyncType::Full, "full"),
                (SyncType::Incremental, "incremental"),
            ] {
                if sync_type == SyncType::Incremental {
                    change_rows(&pool).await?;
                }
                let request_id = uuid::Uuid::new_v4().to_string();
                let req = PlanRequest {
                    sync_type,
                    entities: None,
                    request_id: Some(request_id.clone()),
                    since: None,
                    until: None,
                    sweep: false,
                };
                admin
                    .publish_json(&admin.topology.plan, std::slice::from_ref(&req))
                    .await?;
                eprintln!("demo: triggered the {label} sync");
                syncs.push(watch(&pool, &request_id, label).await?);
            }
            cancel.cancel();
            for t in tasks {
                t.await??;
            }
            admin.delete_topology().await?;
            admin.close().await;
        }
        None => {
            for sync_type in [SyncType::Full, SyncType::Incremental] {
                if sync_type == SyncType::Incremental {
                    change_rows(&pool).await?;
                }
                let req = PlanRequest {
                    sync_type,
                    entities: None,
                    request_id: None,
                    since: None,
                    until: None,
                    sweep: false,
                };
                let s = app::sync_in_process(&pool, &settings, &req).await?;
                eprint!("{}", s.render());
                syncs.push(s.sync_id.unwrap_or_default());
            }
        }
    }

    println!();
    println!("loansync demo: {:.1}s in all", t0.elapsed().as_secs_f64());
    let mut worst = 0u8;
    for (id, label) in syncs.iter().zip(["full", "incremental"]) {
        let summary = app::summarize(&pool, id.clone()).await?;
        println!("\n{label}:");
        print!("{}", summary.render());
        worst = worst.max(summary.exit_code());
    }
    let received = stub.received();
    println!(
        "\nthe stub API accepted {} records in {} requests",
        EntityKind::ALL
            .iter()
            .map(|e| received.ids(*e).len())
            .sum::<usize>(),
        received.requests()
    );
    println!("\nwhere to look next:");
    println!(
        "  DATABASE_URL={} cargo run -- status {}",
        redact_url(&args.database_url),
        syncs.first().map(String::as_str).unwrap_or("")
    );
    println!(
        "  psql {} -c 'SELECT sync_id, sync_type, status, duration_seconds FROM etl_folder_etlsynchistory'",
        redact_url(&args.database_url)
    );
    println!("  psql … -c 'SELECT * FROM etl_folder_etllastsync'   (the watermarks)");
    stub.shutdown();
    pool.close().await;
    Ok(worst)
}

/// What an operator would see change between two syncs: a few loans, customers and
/// repayments touched now.
async fn change_rows(pool: &PgPool) -> anyhow::Result<()> {
    let r = sqlx::raw_sql(
        "UPDATE loans_ajoloan SET date_modified = now(), status = 'COMPLETED' WHERE id % 97 = 0;
         UPDATE ajo_ajouser SET date_modified = now(), trade = 'Tailor' WHERE id % 89 = 0;
         UPDATE loans_ajoloanrepayment SET date_created = now() WHERE id % 193 = 0;",
    )
    .execute(pool)
    .await?;
    eprintln!("demo: changed {} rows", r.rows_affected());
    Ok(())
}

/// Waits for the sync serving `request_id` to finish, printing its progress once a
/// second; returns its id.
async fn watch(pool: &PgPool, request_id: &str, label: &str) -> anyhow::Result<String> {
    let mut last_print = Instant::now() - Duration::from_secs(5);
    let mut print = |r: &app::RequestReport| {
        let Some(s) = &r.sync else { return };
        if s.status.is_some() || last_print.elapsed() >= Duration::from_secs(1) {
            let line: Vec<String> = s
                .progress
                .iter()
                .map(|p| format!("{} {}/{}", p.entity.plural(), p.success + p.failed, p.total))
                .collect();
            eprintln!(
                "demo: {label} sync {}: {}",
                s.history_status,
                line.join(", ")
            );
            last_print = Instant::now();
        }
    };
    let report = app::wait_for_request(
        pool,
        request_id,
        Some(Duration::from_secs(3600)),
        Duration::from_millis(200),
        Some(&mut print),
    )
    .await?;
    anyhow::ensure!(
        !report.timed_out,
        "the {label} sync did not finish within an hour"
    );
    Ok(report.sync.and_then(|s| s.sync_id).unwrap_or_default())
}
