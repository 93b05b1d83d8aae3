//! The torture run (issue 22): a seeded, reproducible schedule of everything that can
//! happen to a deployment at once, against the real PostgreSQL and RabbitMQ, with the
//! real `loansync` binary: two planners and three workers as processes; random planning
//! requests of every kind (full and incremental on random entity subsets, sweeps,
//! backfills, with and without a request id, repeated ids, raw AMQP messages that are
//! poison); SIGKILLs of planners and workers at random moments and at fault points;
//! source changes (saves, updates behind `date_modified`, inserts, deletes, long
//! transactions that read first and write `now()` later); API faults (5xx, 429 with
//! `Retry-After`, dropped connections, NUL in its text, rejections, slow answers, a
//! capacity with 429s beyond it). Each schedule draws its workers' concurrency: fixed or
//! adaptive (the fleet's limit on the board, shares in turns), with or without a
//! fleet-wide cap of 4.
//!
//! Then it quiesces (faults off, every process up and unarmed, no request pending, no
//! sync active), runs one sweep, and checks the invariants:
//! * every request reached a terminal state that `trigger --wait` reports;
//! * no sync is left planning or running, and every finished sync's books balance;
//! * the API's last record for every selected id is what a full sync sends now;
//! * no record the API accepted in a sync is counted failed in it by loansync itself;
//! * nothing was dead-lettered but the poison it sent.
//!
//! Every schedule prints its seed and figures; a failing seed reproduces
//! (`TORTURE_SEEDS=17`). CI runs a few short schedules; a long run:
//! `TORTURE_MINUTES=30 cargo nextest run --run-ignored only -E 'test(torture::long_run)' --no-capture`.

use crate::harness::{assert_books_balance, expected_full, loansync_process, seeded_db, small};
use crate::support::TestDb;
use loansync::config::Settings;
use loansync::domain::{EntityKind, PlanRequest, SyncType};
use loansync::queue::amqp::Broker;
use loansync::stub_api::{Faults, StubHandle};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::Child;

/// What one schedule did, and what it found.
#[derive(Debug, Default, Clone)]
struct Figures {
    steps: u32,
    requests: u32,
    anonymous: u32,
    repeated: u32,
    poison: u32,
    kills: u32,
    failpoint_deaths: u32,
    source_changes: u32,
    long_transactions: u32,
    fault_changes: u32,
    /// Schedules whose workers ran adaptive, and with `ANALYTICS_MAX_IN_FLIGHT`.
    adaptive: u32,
    capped: u32,
    syncs: i64,
    violations: Vec<String>,
}

impl Figures {
    fn add(&mut self, o: &Figures) {
        self.steps += o.steps;
        self.requests += o.requests;
        self.anonymous += o.anonymous;
        self.repeated += o.repeated;
        self.poison += o.poison;
        self.kills += o.kills;
        self.failpoint_deaths += o.failpoint_deaths;
        self.source_changes += o.source_changes;
        self.long_transactions += o.long_transactions;
        self.fault_changes += o.fault_changes;
        self.adaptive += o.adaptive;
        self.capped += o.capped;
        self.syncs += o.syncs;
        self.violations.extend(o.violations.iter().cloned());
    }

    fn line(&self) -> String {
        format!(
            "steps {}, requests {} (anonymous {}, repeated {}, poison {}), kills {} + {} at fault \
             points, source changes {} (long transactions {}), API fault changes {}, schedules \
             with adaptive workers {} and with a fleet-wide cap {}, syncs {}, violations {}",
            self.steps,
            self.requests,
            self.anonymous,
            self.repeated,
            self.poison,
            self.kills,
            self.failpoint_deaths,
            self.source_changes,
            self.long_transactions,
            self.fault_changes,
            self.adaptive,
            self.capped,
            self.syncs,
            self.violations.len()
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Planner,
    Worker,
}

/// The fault points a process of each role reaches.
fn points(role: Role) -> Vec<&'static str> {
    loansync::failpoints::POINTS
        .iter()
        .copied()
        .filter(|p| match role {
            Role::Planner => p.starts_with("planner::") || p.starts_with("lifecycle::"),
            Role::Worker => p.starts_with("worker::") || p.starts_with("ledger::"),
        })
        .collect()
}

/// One `loansync planner` or `loansync worker` process and what it is armed with.
struct Proc {
    role: Role,
    child: Option<Child>,
    armed: bool,
}

/// The processes of a deployment, restarted when they die.
struct Fleet<'a> {
    db: &'a TestDb,
    settings: Arc<Settings>,
    api_url: String,
    procs: Vec<Proc>,
    /// The workers' concurrency settings of this schedule.
    worker_env: Vec<(&'static str, &'static str)>,
}

impl Fleet<'_> {
    fn spawn(&self, role: Role, failpoint: Option<String>) -> Child {
        let mut cmd = loansync_process(self.db, &self.settings, &self.api_url);
        cmd.arg(match role {
            Role::Planner => "planner",
            Role::Worker => "worker",
        })
        .env("ETL_RETRY_INITIAL_MS", "20")
        .env("ETL_RETRY_MAX_INTERVAL_SECS", "1")
        .env("ETL_RETRY_MAX_ELAPSED_SECS", "3")
        .env("ETL_HTTP_TIMEOUT_SECS", "3")
        .env("ETL_DELIVERY_LIMIT", "20")
        .env("ETL_WORKER_CONCURRENCY", "3")
        .env("ETL_DB_OUTAGE_WAIT_SECS", "5")
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
        if role == Role::Worker {
            cmd.envs(self.worker_env.iter().copied());
        }
        if let Some(f) = failpoint {
            cmd.env(loansync::failpoints::ENV, f);
        }
        cmd.spawn().expect("spawn loansync")
    }

    /// Restarts the processes that died (killed, or at an armed fault point); returns
    /// how many had died at a fault point.
    fn restart_dead(&mut self) -> u32 {
        let mut died_armed = 0;
        for i in 0..self.procs.len() {
            let exited = match self.procs[i].child.as_mut() {
                Some(c) => c.try_wait().ok().flatten().is_some(),
                None => true,
            };
            if exited {
                if self.procs[i].armed && self.procs[i].child.is_some() {
                    died_armed += 1;
                }
                let child = self.spawn(self.procs[i].role, None);
                self.procs[i].child = Some(child);
                self.procs[i].armed = false;
            }
        }
        died_armed
    }

    /// SIGKILLs process `i` and starts it again, armed with `failpoint` if given.
    async fn kill(&mut self, i: usize, failpoint: Option<String>) {
        if let Some(mut c) = self.procs[i].child.take() {
            let _ = c.kill().await;
        }
        self.procs[i].armed = failpoint.is_some();
        let child = self.spawn(self.procs[i].role, failpoint);
        self.procs[i].child = Some(child);
    }

    /// Every process up, none armed.
    async fn disarm(&mut self) {
        for i in 0..self.procs.len() {
            if self.procs[i].armed {
                self.kill(i, None).await;
            }
        }
        self.restart_dead();
    }

    async fn stop(&mut self) {
        for p in &mut self.procs {
            if let Some(mut c) = p.child.take() {
                let _ = c.kill().await;
            }
        }
    }
}

/// A planning message the schedule sent, and whether it is valid.
#[derive(Debug, Clone)]
struct Sent {
    body: Vec<u8>,
    request_id: Option<String>,
}

fn entity_subset(rng: &mut fastrand::Rng) -> Vec<EntityKind> {
    let mut set: Vec<EntityKind> = EntityKind::ALL.into_iter().filter(|_| rng.bool()).collect();
    if set.is_empty() {
        set.push(EntityKind::ALL[rng.usize(..4)]);
    }
    set
}

/// A random planning message (or poison) for step `n` of schedule `seed`.
fn random_request(
    rng: &mut fastrand::Rng,
    seed: u64,
    n: u32,
    sent: &[Sent],
) -> (Sent, &'static str) {
    let roll = rng.u32(..100);
    let id = |rng: &mut fastrand::Rng| (rng.u32(..100) >= 25).then(|| format!("t{seed}-{n}"));
    let req = |sync_type, entities, request_id, since, until, sweep| PlanRequest {
        sync_type,
        entities: Some(entities),
        request_id,
        since,
        until,
        sweep,
    };
    let (request, kind) = match roll {
        0..=39 => (
            req(
                SyncType::Incremental,
                entity_subset(rng),
                id(rng),
                None,
                None,
                false,
            ),
            "incremental",
        ),
        40..=51 => (
            req(
                SyncType::Full,
                entity_subset(rng),
                id(rng),
                None,
                None,
                false,
            ),
            "full",
        ),
        52..=63 => (
            req(
                SyncType::Incremental,
                entity_subset(rng),
                id(rng),
                None,
                None,
                true,
            ),
            "sweep",
        ),
        64..=73 => {
            let since = chrono::Utc::now() - chrono::Duration::hours(i64::from(rng.u32(1..72)));
            let until = rng
                .bool()
                .then(|| since + chrono::Duration::hours(i64::from(rng.u32(1..48))));
            (
                req(
                    SyncType::Incremental,
                    entity_subset(rng),
                    id(rng),
                    Some(since),
                    until,
                    false,
                ),
                "backfill",
            )
        }
        74..=87 if !sent.is_empty() => {
            let again = sent[rng.usize(..sent.len())].clone();
            return (again, "repeated");
        }
        88..=93 => {
            let bodies: [&[u8]; 4] = [
                b"{not json",
                br#"{"sync_type":"weekly"}"#,
                br#"{"sync_type":"full","entities":["loan","spaceship"]}"#,
                br#"{"sync_type":"full","sweep":true}"#,
            ];
            let body = bodies[rng.usize(..bodies.len())].to_vec();
            return (
                Sent {
                    body,
                    request_id: None,
                },
                "poison",
            );
        }
        _ => (
            req(
                SyncType::Incremental,
                entity_subset(rng),
                id(rng),
                None,
                None,
                false,
            ),
            "incremental",
        ),
    };
    (
        Sent {
            body: serde_json::to_vec(&request).expect("a request serializes"),
            request_id: request.request_id.clone(),
        },
        kind,
    )
}

/// A random change of the source, as Django and other writers make them.
async fn change_source(
    pool: &sqlx::PgPool,
    rng: &mut fastrand::Rng,
) -> anyhow::Result<&'static str> {
    let pick = |table: &str| format!("(SELECT id FROM {table} ORDER BY random() LIMIT 1)");
    let (sql, what) = match rng.u32(..9) {
        0 => (
            format!(
                "UPDATE loans_ajoloan SET total_paid_amount = total_paid_amount + 1, date_modified = now() WHERE id = {}",
                pick("loans_ajoloan")
            ),
            "save loan",
        ),
        1 => (
            format!(
                "UPDATE ajo_ajouser SET trade = 'trade ' || floor(random() * 1000)::text, date_modified = now() WHERE id = {}",
                pick("ajo_ajouser")
            ),
            "save customer",
        ),
        2 => (
            format!(
                "UPDATE loans_ajoloanrepayment SET repayment_amount = repayment_amount + 1, date_modified = now() WHERE id = {}",
                pick("loans_ajoloanrepayment")
            ),
            "save repayment",
        ),
        3 => (
            // Behind date_modified: only a sweep finds it.
            format!(
                "UPDATE loans_ajoloan SET status = CASE WHEN status = 'OPEN' THEN 'CLOSED' ELSE 'OPEN' END WHERE id = {}",
                pick("loans_ajoloan")
            ),
            "update loan behind date_modified",
        ),
        4 => (
            format!(
                "UPDATE ajo_ajouser SET onboarding_complete = NOT onboarding_complete WHERE id = {}",
                pick("ajo_ajouser")
            ),
            "update customer behind date_modified",
        ),
        5 => (
            format!(
                "UPDATE accounts_customuser SET user_branch = 'branch ' || floor(random() * 100)::text WHERE id = {}",
                pick("accounts_customuser")
            ),
            "update officer",
        ),
        6 => (
            format!(
                "INSERT INTO loans_ajoloanrepayment SELECT (jsonb_populate_record(NULL::loans_ajoloanrepayment, \
                 to_jsonb(r) || jsonb_build_object('id', nextval('public.loans_ajoloanrepayment_id_seq'), \
                 'repayment_ref', gen_random_uuid(), 'date_created', now(), 'date_modified', now()))).* \
                 FROM loans_ajoloanrepayment r WHERE id = {}",
                pick("loans_ajoloanrepayment")
            ),
            "insert repayment",
        ),
        7 => (
            format!(
                "INSERT INTO loans_ajoloan SELECT (jsonb_populate_record(NULL::loans_ajoloan, \
                 to_jsonb(l) || jsonb_build_object('id', nextval('public.loans_ajoloan_id_seq'), \
                 'date_created', now(), 'date_modified', now()))).* \
                 FROM loans_ajoloan l WHERE id = {}",
                pick("loans_ajoloan")
            ),
            "insert loan",
        ),
        _ => (
            format!(
                "DELETE FROM loans_ajoloanrepayment WHERE id = {}",
                pick("loans_ajoloanrepayment")
            ),
            "delete repayment",
        ),
    };
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(pool)
        .await?;
    Ok(what)
}

/// A transaction that reads first and, `hold` later, writes a row stamped with `now()`:
/// its start, earlier than its first write.
async fn long_transaction(pool: sqlx::PgPool, hold: Duration) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT count(*) FROM loans_ajoloan")
        .execute(&mut *tx)
        .await?;
    tokio::time::sleep(hold).await;
    sqlx::query(
        "UPDATE loans_ajoloan SET last_paid_amount = last_paid_amount + 1, date_modified = now() \
         WHERE id = (SELECT id FROM loans_ajoloan ORDER BY random() LIMIT 1)",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

fn random_faults(rng: &mut fastrand::Rng) -> (Faults, &'static str) {
    let seed = rng.u64(..);
    match rng.u32(..7) {
        0 => (
            Faults {
                error_5xx_rate: 0.3,
                seed,
                ..Faults::default()
            },
            "5xx",
        ),
        1 => (
            Faults {
                rate_429: 0.3,
                retry_after_secs: 1,
                seed,
                ..Faults::default()
            },
            "429",
        ),
        2 => (
            Faults {
                drop_rate: 0.15,
                seed,
                ..Faults::default()
            },
            "dropped connections",
        ),
        3 => (
            Faults {
                reject_every_nth: 7,
                nul_text: true,
                seed,
                ..Faults::default()
            },
            "rejections with NUL text",
        ),
        4 => (
            Faults {
                slow_rate: 0.5,
                slow_ms: 300,
                seed,
                ..Faults::default()
            },
            "slow",
        ),
        5 => (
            Faults {
                capacity: 3,
                latency_ms: 20,
                retry_after_secs: 1,
                seed,
                ..Faults::default()
            },
            "capacity 3 (429 + Retry-After beyond)",
        ),
        _ => (Faults::default(), "none"),
    }
}

async fn scalar_i64(pool: &sqlx::PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap_or(-1)
}

/// Runs schedule `seed` of `steps` steps and checks the invariants.
async fn schedule(seed: u64, steps: u32) -> Figures {
    let started = Instant::now();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut f = Figures::default();
    let db = seeded_db(small()).await;
    let stub = crate::harness::stub(Faults::default()).await;
    stub.keep_records();
    let settings = Arc::new(crate::harness::settings_for(&db, &stub.url(), &[]));
    let admin = loansync::app::connect_broker(&settings)
        .await
        .expect("broker");
    let pool = db.pool.clone();
    // The workers' concurrency: fixed or adaptive (the fleet's limit on the board, shares
    // in turns), with or without a fleet-wide cap; heartbeats every second.
    let mut worker_env = vec![("ETL_WORKER_HEARTBEAT_SECS", "1")];
    let mode = rng.u32(..4);
    if mode % 2 == 1 {
        worker_env.push(("ETL_WORKER_CONCURRENCY_MODE", "adaptive"));
        worker_env.push(("ETL_WORKER_MAX_CONCURRENCY", "6"));
        f.adaptive += 1;
    }
    if mode >= 2 {
        worker_env.push(("ANALYTICS_MAX_IN_FLIGHT", "4"));
        f.capped += 1;
    }
    let mut fleet = Fleet {
        db: &db,
        settings: settings.clone(),
        api_url: stub.url(),
        procs: Vec::new(),
        worker_env,
    };
    for role in [
        Role::Planner,
        Role::Planner,
        Role::Worker,
        Role::Worker,
        Role::Worker,
    ] {
        let child = fleet.spawn(role, None);
        fleet.procs.push(Proc {
            role,
            child: Some(child),
            armed: false,
        });
    }
    let mut sent: Vec<Sent> = Vec::new();
    let mut poison: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut long: Vec<tokio::task::JoinHandle<anyhow::Result<()>>> = Vec::new();

    for n in 0..steps {
        f.steps += 1;
        f.failpoint_deaths += fleet.restart_dead();
        match rng.u32(..100) {
            0..=39 => {
                let (msg, kind) = random_request(&mut rng, seed, n, &sent);
                match kind {
                    "poison" => {
                        f.poison += 1;
                        poison.insert(msg.body.clone());
                    }
                    "repeated" => f.repeated += 1,
                    _ => {
                        f.requests += 1;
                        if msg.request_id.is_none() {
                            f.anonymous += 1;
                        }
                    }
                }
                if let Err(e) = admin.publish_bytes(&admin.topology.plan, &msg.body).await {
                    f.violations
                        .push(format!("could not publish a planning message: {e:#}"));
                }
                if kind != "poison" {
                    sent.push(msg);
                }
            }
            40..=59 => {
                let i = rng.usize(..fleet.procs.len());
                let armed = rng.u32(..100) < 40;
                let failpoint = armed.then(|| {
                    let ps = points(fleet.procs[i].role);
                    format!("{}=kill({})", ps[rng.usize(..ps.len())], rng.u32(1..4))
                });
                fleet.kill(i, failpoint).await;
                f.kills += 1;
            }
            60..=84 => {
                if rng.u32(..100) < 20 {
                    f.long_transactions += 1;
                    let hold = Duration::from_millis(u64::from(rng.u32(500..4000)));
                    long.push(tokio::spawn(long_transaction(pool.clone(), hold)));
                } else if let Err(e) = change_source(&pool, &mut rng).await {
                    f.violations.push(format!("a source change failed: {e:#}"));
                }
                f.source_changes += 1;
            }
            _ => {
                let (faults, _) = random_faults(&mut rng);
                stub.set_faults(faults);
                f.fault_changes += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(u64::from(rng.u32(20..400)))).await;
    }

    // Quiesce: the source still, the API healthy, every process up and unarmed.
    for t in long {
        if let Ok(Err(e)) = t.await {
            f.violations
                .push(format!("a long transaction failed: {e:#}"));
        }
    }
    stub.set_faults(Faults::default());
    fleet.disarm().await;
    let end = Instant::now() + Duration::from_secs(240);
    let quiet = loop {
        // A process armed before the quiet may still die: it comes back unarmed.
        fleet.restart_dead();
        let busy = scalar_i64(
            &pool,
            "SELECT (SELECT count(*) FROM loansync_request WHERE state = 'pending') \
                  + (SELECT count(*) FROM loansync_sync WHERE state <> 'done')",
        )
        .await;
        if busy == 0 && admin.queue_depth(&admin.topology.plan).await.unwrap_or(1) == 0 {
            break true;
        }
        if Instant::now() >= end {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if !quiet {
        f.violations.push(format!(
            "no quiet within 240 s: {} pending requests, {} active syncs",
            scalar_i64(
                &pool,
                "SELECT count(*) FROM loansync_request WHERE state = 'pending'"
            )
            .await,
            scalar_i64(
                &pool,
                "SELECT count(*) FROM loansync_sync WHERE state <> 'done'"
            )
            .await
        ));
    }
    // One sweep: what timestamps missed reaches the platform.
    let sweep_id = format!("t{seed}-final-sweep");
    let sweep = PlanRequest {
        sync_type: SyncType::Incremental,
        entities: None,
        request_id: Some(sweep_id.clone()),
        since: None,
        until: None,
        sweep: true,
    };
    admin
        .publish_json(&admin.topology.plan, std::slice::from_ref(&sweep))
        .await
        .expect("publish the final sweep");
    sent.push(Sent {
        body: Vec::new(),
        request_id: Some(sweep_id.clone()),
    });
    let end = Instant::now() + Duration::from_secs(180);
    let swept = loop {
        fleet.restart_dead();
        if loansync::ledger::lifecycle::request_state(&pool, &sweep_id)
            .await
            .ok()
            .flatten()
            .is_some_and(|r| r.finished)
        {
            break true;
        }
        if Instant::now() >= end {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if !swept {
        f.violations
            .push("the final sweep did not finish within 180 s".into());
    }
    fleet.stop().await;

    check(&pool, &stub, &admin, &sent, &poison, &mut f).await;
    f.syncs = scalar_i64(&pool, "SELECT count(*) FROM loansync_sync").await;
    eprintln!(
        "torture seed {seed}: {} in {:.0} s",
        f.line(),
        started.elapsed().as_secs_f64()
    );
    for v in &f.violations {
        eprintln!("torture seed {seed}: VIOLATION {v}");
    }
    admin.close().await;
    f
}

/// The invariants, after the quiet and the sweep.
async fn check(
    pool: &sqlx::PgPool,
    stub: &StubHandle,
    admin: &Broker,
    sent: &[Sent],
    poison: &BTreeSet<Vec<u8>>,
    f: &mut Figures,
) {
    // Every request reached a terminal state that `trigger --wait` reports.
    let ids: BTreeSet<String> = sent.iter().filter_map(|s| s.request_id.clone()).collect();
    for id in &ids {
        match loansync::app::wait_for_request(
            pool,
            id,
            Some(Duration::from_millis(100)),
            Duration::from_millis(50),
            None,
        )
        .await
        {
            Ok(r) if !r.timed_out && r.sync.is_some() => {}
            Ok(r) => f.violations.push(format!(
                "request {id} not answered: {}{}",
                r.request_state,
                if r.timed_out { " (wait timed out)" } else { "" }
            )),
            Err(e) => f.violations.push(format!("request {id}: {e:#}")),
        }
    }
    // None left with a dead planner's sync while it could be planned again.
    let orphaned: Vec<(String, i32)> = sqlx::query_as(
        "SELECT r.request_id, r.plan_attempts FROM loansync_request r \
         JOIN etl_folder_etlsynchistory h USING (sync_id) \
         WHERE h.error_message LIKE '%planner stopped while planning%' AND r.plan_attempts < $1",
    )
    .bind(loansync::ledger::lifecycle::MAX_PLAN_ATTEMPTS)
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    for (id, attempts) in orphaned {
        f.violations.push(format!(
            "request {id} answered by a dead planner's sync after {attempts} claims"
        ));
    }
    let anonymous: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT r.request_id, r.state, coalesce(s.state = 'done', false) FROM loansync_request r \
         LEFT JOIN loansync_sync s USING (sync_id) WHERE r.request_id LIKE 'anonymous-%'",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    if (anonymous.len() as u32) < f.anonymous {
        f.violations.push(format!(
            "{} anonymous requests sent, {} recorded",
            f.anonymous,
            anonymous.len()
        ));
    }
    for (id, state, done) in anonymous {
        if state != "planned" || !done {
            f.violations
                .push(format!("anonymous request {id} not answered ({state})"));
        }
    }

    // No sync left planning or running; every finished sync's books balance.
    let active = scalar_i64(
        pool,
        "SELECT count(*) FROM loansync_sync WHERE state <> 'done'",
    )
    .await;
    if active != 0 {
        f.violations
            .push(format!("{active} syncs left planning or running"));
    }
    use futures::FutureExt;
    if let Err(p) = std::panic::AssertUnwindSafe(assert_books_balance(pool))
        .catch_unwind()
        .await
    {
        let why = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        f.violations.push(format!("books do not balance: {why}"));
    }

    // The API's last record for every selected id is what a full sync sends now.
    let expected = expected_full(pool).await;
    let received = stub.received();
    for e in EntityKind::ALL {
        let latest = received.latest(e);
        let ids: Vec<i64> = expected[&e].iter().copied().collect();
        let mut differ: Vec<i64> = Vec::new();
        for part in ids.chunks(500) {
            let loaded = match loansync::source::load_chunk(pool, e, part).await {
                Ok(l) => l,
                Err(err) => {
                    f.violations
                        .push(format!("{e}: cannot load the source: {err}"));
                    continue;
                }
            };
            for r in &loaded.records {
                let now: serde_json::Value =
                    serde_json::from_str(r.json.get()).unwrap_or(serde_json::Value::Null);
                if latest.get(&r.id) != Some(&now) {
                    differ.push(r.id);
                }
            }
        }
        if !differ.is_empty() {
            let mut msg = format!(
                "{e}: the API's last record differs from the source for {} ids, e.g.",
                differ.len()
            );
            for id in differ.iter().take(3) {
                let _ = write!(msg, " {id}");
            }
            f.violations.push(msg);
        }
    }

    // No record the API accepted in a sync is counted failed in it by loansync itself.
    let failed: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT h.sync_id::text, e.entity_type::text, e.entity_id::text, e.error_code::text \
         FROM etl_folder_etlsyncerror e JOIN etl_folder_etlsynchistory h ON h.id = e.sync_history_id \
         WHERE e.error_code IN ('RECORD_UNREADABLE', 'CHUNK_GAVE_UP', 'WORKER_PANIC', 'API_TEXT_UNSTORABLE')",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    for (sync_id, entity, id, code) in failed {
        let (Ok(entity), Ok(id)) = (entity.parse::<EntityKind>(), id.parse::<i64>()) else {
            continue;
        };
        if received
            .accepted_in
            .contains(&(sync_id.clone(), entity, id))
        {
            f.violations.push(format!(
                "{entity} {id} accepted by the API in sync {sync_id} but counted failed ({code})"
            ));
        }
    }

    // Nothing dead-lettered but the poison sent.
    let mut dead: BTreeMap<String, u32> = BTreeMap::new();
    if let Ok(mut consumer) = admin
        .raw_consumer(&admin.topology.dead, 50, "torture-dead")
        .await
    {
        while let Ok(Some(Ok(d))) =
            tokio::time::timeout(Duration::from_secs(2), consumer.next()).await
        {
            if !poison.contains(d.body()) {
                let why = d.header("x-loansync-reason").unwrap_or_default();
                *dead.entry(why).or_default() += 1;
            }
            let _ = d
                .settle(
                    admin,
                    &admin.topology.dead,
                    loansync::queue::Disposition::Ack,
                )
                .await;
        }
        consumer.close().await;
    }
    for (why, n) in dead {
        f.violations.push(format!(
            "{n} message(s) dead-lettered that were not poison: {why}"
        ));
    }
}

/// The seeds of the short run: `TORTURE_SEEDS` (comma-separated), or three fixed ones.
fn seeds() -> Vec<u64> {
    std::env::var("TORTURE_SEEDS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .filter(|v: &Vec<u64>| !v.is_empty())
        .unwrap_or_else(|| vec![1, 2, 3])
}

fn steps() -> u32 {
    std::env::var("TORTURE_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30)
}

/// A few short schedules: what CI runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn short_schedules() {
    let mut all = Figures::default();
    for seed in seeds() {
        let f = schedule(seed, steps()).await;
        assert!(
            f.violations.is_empty(),
            "torture seed {seed} found violations (reproduce with TORTURE_SEEDS={seed}):\n{}",
            f.violations.join("\n")
        );
        all.add(&f);
    }
    eprintln!("torture: {}", all.line());
}

/// A long run: schedule after schedule, from `TORTURE_SEED` (default 1000) on, for
/// `TORTURE_MINUTES` (default 30).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a long run: TORTURE_MINUTES=30 cargo nextest run --run-ignored only -E 'test(torture::long_run)' --no-capture"]
async fn long_run() {
    let minutes: u64 = std::env::var("TORTURE_MINUTES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let mut seed: u64 = std::env::var("TORTURE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let end = Instant::now() + Duration::from_secs(minutes * 60);
    let (mut all, mut schedules, mut failing) = (Figures::default(), 0u32, Vec::new());
    while Instant::now() < end {
        let f = schedule(seed, steps().max(60)).await;
        if !f.violations.is_empty() {
            failing.push(seed);
        }
        all.add(&f);
        schedules += 1;
        seed += 1;
    }
    eprintln!(
        "torture long run: {minutes} min, {schedules} schedules, {}; failing seeds: {failing:?}",
        all.line()
    );
    assert!(failing.is_empty(), "failing seeds: {failing:?}");
}
