//! The planner loop: planning messages recorded and acked, what is pending planned,
//! house kept, until shutdown or the consumer is lost.

use super::PlanError;
use super::housekeeping::{HOUSEKEEPING_EVERY, housekeep};
use super::plan::plan_pending;
use super::request::{parse_plan, record_message};
use crate::config::Settings;
use crate::failure::{Classify, Failure};
use crate::queue::amqp::Broker;
use crate::queue::{ChunkPublisher, Consumer, Disposition};
use crate::telemetry::Event;
use sqlx::PgPool;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// How often a long-running planner looks for planning work (pending requests and a
/// free slot, a dead planner's sync): a cheap read; the planning lock is taken only when
/// there is work ([`lifecycle::planning_work`]).
const PENDING_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// When the planner next plans what is pending: at once, or, after a failure, after a
/// pause that doubles with each failure in a row (2 s up to [`PENDING_BACKOFF_MAX`]), so
/// that a failure that keeps coming back (a plan too large for the statement timeout, a
/// broker that refuses publishes) is not tried every tick.
#[derive(Debug, Default)]
struct PendingBackoff {
    failures: u32,
    not_before: Option<tokio::time::Instant>,
}

/// The longest pause between two planning passes that failed.
const PENDING_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(60);

impl PendingBackoff {
    fn due(&self) -> bool {
        self.not_before
            .is_none_or(|t| tokio::time::Instant::now() >= t)
    }

    fn failed(&mut self) -> std::time::Duration {
        self.failures = self.failures.saturating_add(1);
        let pause = PENDING_EVERY
            .saturating_mul(1u32 << self.failures.min(6).saturating_sub(1))
            .min(PENDING_BACKOFF_MAX);
        self.not_before = Some(tokio::time::Instant::now() + pause);
        pause
    }

    fn succeeded(&mut self) {
        *self = PendingBackoff::default();
    }
}

/// Plans what is pending, if it is time ([`PendingBackoff`]); a failure is logged and
/// tried again later (the requests stay pending in PostgreSQL), except a fatal one (the
/// installation must be fixed), which is returned: the planner stops.
async fn run_pending(
    pool: &PgPool,
    settings: &Settings,
    publisher: &dyn ChunkPublisher,
    backoff: &mut PendingBackoff,
) -> Result<(), PlanError> {
    if !backoff.due() {
        return Ok(());
    }
    match plan_pending(pool, settings, publisher).await {
        Ok(_) => {
            backoff.succeeded();
            Ok(())
        }
        Err(e) if e.failure() == Failure::Fatal => Err(e),
        Err(e) => {
            let pause = backoff.failed();
            tracing::warn!(error = %format!("{e:#}"), retry_in_secs = pause.as_secs(), "could not plan the pending requests; they stay pending");
            Ok(())
        }
    }
}

/// The planner loop: takes planning messages from `consumer` one at a time until
/// `shutdown` resolves, the consumer is lost (an error: the caller reconnects) or its
/// queue says the work is over. Each message is acked once its request is recorded as
/// pending ([`record_message`]), before anything waits on the planning lock or the
/// clock: no broker delivery is spent by waiting. One that cannot be parsed is
/// dead-lettered with the reason; one that cannot be recorded now (database down) is
/// published again (a delivery is not spent either). After each message, and every
/// [`PENDING_EVERY`], it plans what is pending ([`super::plan_pending`]); every
/// [`HOUSEKEEPING_EVERY`] it keeps house.
pub async fn run(
    pool: &PgPool,
    settings: &Settings,
    consumer: &mut dyn Consumer,
    publisher: &dyn ChunkPublisher,
    consuming: &AtomicBool,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), PlanError> {
    consuming.store(true, Ordering::SeqCst);
    tokio::pin!(shutdown);
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING_EVERY);
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending = tokio::time::interval(PENDING_EVERY);
    pending.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u64;
    let mut backoff = PendingBackoff::default();
    let result = loop {
        let delivery = tokio::select! {
            _ = &mut shutdown => break Ok(()),
            _ = housekeeping.tick() => {
                housekeep(pool, settings, ticks).await;
                ticks += 1;
                continue;
            }
            _ = pending.tick() => {
                if let Err(e) = run_pending(pool, settings, publisher, &mut backoff).await {
                    break Err(e);
                }
                continue;
            }
            next = consumer.next() => match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => break Err(PlanError::Queue(e)),
                None => break Ok(()),
            },
        };
        let disposition = match parse_plan(delivery.body()) {
            Err(reason) => {
                settings
                    .telemetry
                    .emit(Event::PlanInvalid { reason: &reason });
                Disposition::DeadLetter(reason)
            }
            Ok(req) => match crate::db::through_outage(
                pool,
                settings.db_outage_wait,
                "the planning message",
                &settings.telemetry,
                || record_message(pool, &settings.telemetry, &req),
            )
            .await
            {
                Ok(_) => Disposition::Ack,
                // Decided by the error's type: a request that can never be recorded is
                // dead-lettered, a wrong installation stops the planner, anything else
                // goes back without spending a delivery.
                Err(e) if e.failure() == Failure::Permanent => {
                    let reason = format!("the planning request cannot be recorded: {e:#}");
                    tracing::error!(%reason, "dead-lettering a planning message");
                    Disposition::DeadLetter(reason)
                }
                Err(e) if e.failure() == Failure::Fatal => {
                    tracing::error!(error = %format!("{e:#}"), "fatal: the installation must be fixed (credentials, privileges, migrations); the planner stops and the message goes back to the queue");
                    if let Err(e) = delivery.settle(Disposition::Republish).await {
                        tracing::warn!(error = %format!("{e:#}"), "could not settle a planning message");
                    }
                    break Err(e);
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "could not record a planning request: the message goes back to the queue");
                    Disposition::Republish
                }
            },
        };
        fail::fail_point!("planner::message_before_settle");
        if let Err(e) = delivery.settle(disposition).await {
            tracing::warn!(error = %format!("{e:#}"), "could not settle a planning message");
        }
        if let Err(e) = run_pending(pool, settings, publisher, &mut backoff).await {
            break Err(e);
        }
    };
    consuming.store(false, Ordering::SeqCst);
    consumer.close().await;
    result
}

/// How long a planning message that failed transiently waits before it goes back.
pub const PLAN_REQUEUE_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// [`run`] over `<prefix>.plan` on `broker`, publishing chunks on the same connection;
/// closes the connection when it ends.
pub async fn run_amqp(
    pool: PgPool,
    settings: Arc<Settings>,
    broker: Broker,
    consuming: Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), PlanError> {
    let queue = broker.topology.plan.clone();
    let tag = format!("loansync-planner-{}", uuid::Uuid::new_v4().simple());
    let mut consumer = broker.consumer(&queue, 1, &tag, PLAN_REQUEUE_PAUSE).await?;
    tracing::info!(%queue, "planner consuming");
    let result = run(
        &pool,
        &settings,
        &mut consumer,
        &broker,
        &consuming,
        shutdown,
    )
    .await;
    broker.close().await;
    result
}
