//! The worker loop over a consumer: RabbitMQ's ([`run_amqp`]) or the in-memory
//! queue's ([`run_memory`]).

use super::WorkerContext;
use super::handle::handle_delivery;
use crate::queue::amqp::Broker;
use crate::queue::memory::MemoryQueue;
use crate::queue::{Consumer, QueueError, REQUEUE_PAUSE};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The worker loop: takes chunk jobs from `consumer` and works at most `concurrency` of
/// them at once, settling each delivery with its [`crate::queue::Disposition`], until `shutdown`
/// resolves, the consumer is lost (an error: the caller reconnects) or its queue says
/// the work is over (the in-memory queue, once empty with nothing in flight). On
/// shutdown it stops taking chunks and gives the ones in flight `grace` to finish;
/// unfinished ones go back to the queue.
pub async fn run(
    ctx: Arc<WorkerContext>,
    consumer: &mut dyn Consumer,
    concurrency: u16,
    grace: Duration,
    consuming: &AtomicBool,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), QueueError> {
    let concurrency = usize::from(concurrency.max(1));
    consuming.store(true, Ordering::SeqCst);
    let mut in_flight = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    let result = loop {
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                if let Err(e) = done { tracing::error!(error = %e, "chunk task panicked"); }
            }
            next = consumer.next(), if in_flight.len() < concurrency => {
                match next {
                    Some(Ok(delivery)) => {
                        let ctx = ctx.clone();
                        in_flight.spawn(async move {
                            let disposition = handle_delivery(&ctx, delivery.body(), delivery.returned()).await;
                            if let Err(e) = delivery.settle(disposition).await {
                                tracing::warn!(error = %format!("{e:#}"), "could not settle a delivery: the broker will redeliver it");
                            }
                        });
                    }
                    Some(Err(e)) => break Err(e),
                    // The queue's work is over; nothing is in flight any more.
                    None => break Ok(()),
                }
            }
        }
    };
    consuming.store(false, Ordering::SeqCst);
    if result.is_err() {
        // The connection is gone: what is in flight cannot be settled on it.
        in_flight.abort_all();
        return result;
    }
    if !in_flight.is_empty() {
        tracing::info!(
            in_flight = in_flight.len(),
            "shutting down: finishing chunks in flight"
        );
    }
    let drained = tokio::time::timeout(grace, async {
        while in_flight.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            left = in_flight.len(),
            "grace period over: unfinished chunks go back to the queue"
        );
        in_flight.abort_all();
    }
    consumer.close().await;
    result
}

/// [`run`] over `<prefix>.chunks` on `broker`, with at most `concurrency` chunks in
/// flight (`basic_qos`); closes the connection when it ends.
pub async fn run_amqp(
    ctx: Arc<WorkerContext>,
    broker: Broker,
    concurrency: u16,
    grace: Duration,
    consuming: Arc<AtomicBool>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), QueueError> {
    let queue = broker.topology.chunks.clone();
    // The queue's own delivery limit, when it was made with another setting: a job is
    // renewed two returns before that one drops it, if that comes first.
    let queue_limit = broker
        .argument_mismatches()
        .iter()
        .find(|m| m.queue == queue && m.argument == "x-delivery-limit")
        .and_then(|m| m.broker.parse::<u32>().ok());
    let renew_at = queue_limit.map_or(ctx.delivery_limit, |limit| {
        ctx.delivery_limit.min(limit.saturating_sub(2)).max(1)
    });
    ctx.renew_at
        .store(renew_at, std::sync::atomic::Ordering::Relaxed);
    let tag = format!("loansync-worker-{}", uuid::Uuid::new_v4().simple());
    let mut consumer = broker
        .consumer(&queue, concurrency, &tag, REQUEUE_PAUSE)
        .await?;
    tracing::info!(%queue, concurrency, "worker consuming");
    run(ctx, &mut consumer, concurrency, grace, &consuming, shutdown).await?;
    broker.close().await;
    Ok(())
}

/// [`run`] over the in-memory queue with `concurrency` chunks at once, until the queue
/// is empty and nothing is in flight. A job that fails transiently goes back to the end
/// of the queue after the queue's pause.
pub async fn run_memory(ctx: Arc<WorkerContext>, queue: MemoryQueue, concurrency: u16) {
    let mut consumer = queue.consumer();
    let consuming = AtomicBool::new(false);
    // The in-memory consumer is never lost and there is no shutdown: this ends when the
    // queue's work is over.
    let ended = run(
        ctx,
        &mut consumer,
        concurrency,
        Duration::MAX,
        &consuming,
        std::future::pending::<()>(),
    )
    .await;
    if let Err(e) = ended {
        tracing::error!(error = %format!("{e:#}"), "the in-memory worker loop failed");
    }
}
