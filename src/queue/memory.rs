//! The in-memory chunk queue of single-process mode (`loansync sync`): the planner
//! publishes into it and the in-process workers consume from it. Nothing survives the
//! process, which is fine: the chunk ledger does, and `loansync resume` re-publishes.
//!
//! It knows how many of its deliveries are in flight (taken, not settled yet), so its
//! [`Consumer`] can say when the work is over: the queue is empty and nothing in flight
//! can come back. Consumers wait on a [`Notify`], never by polling.

use super::{ChunkPublisher, Consumer, Delivery, Disposition, QueueError, REQUEUE_PAUSE};
use crate::domain::ChunkJob;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;

/// A message body: a chunk job or a settle job, as JSON (what RabbitMQ would carry).
type Body = Vec<u8>;

#[derive(Debug, Default)]
struct State {
    jobs: VecDeque<Body>,
    /// Deliveries taken and not settled yet.
    in_flight: usize,
    /// What was dead-lettered, with the reason (the ledger already holds the failure;
    /// kept for tests and logs).
    dead: Vec<(Body, String)>,
}

/// The chunk a body is about (`None` for a body that is none of loansync's messages).
fn chunk_of(body: &[u8]) -> Option<ChunkJob> {
    crate::domain::WorkerMessage::parse(body)
        .ok()
        .map(|m| m.chunk())
}

fn body_of(job: &ChunkJob) -> Body {
    // A ChunkJob is three plain fields: it always serializes.
    serde_json::to_vec(job).unwrap_or_default()
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    changed: Notify,
    requeue_pause: Duration,
}

/// A multi-consumer queue of chunk jobs. Clones share the queue.
#[derive(Debug, Clone)]
pub struct MemoryQueue {
    inner: Arc<Inner>,
}

impl Default for MemoryQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryQueue {
    /// An empty queue whose requeued jobs come back after [`REQUEUE_PAUSE`].
    pub fn new() -> Self {
        Self::with_requeue_pause(REQUEUE_PAUSE)
    }

    /// An empty queue whose requeued jobs come back after `pause`.
    pub fn with_requeue_pause(pause: Duration) -> Self {
        MemoryQueue {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                changed: Notify::new(),
                requeue_pause: pause,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while the lock is held leaves a consistent state (every update is one
        // statement): go on with it.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Puts a job at the end of the queue.
    pub fn push(&self, job: ChunkJob) {
        self.push_body(body_of(&job));
    }

    /// Puts a message body at the end of the queue (any body: a consumer dead-letters
    /// one that is no job, as on RabbitMQ).
    pub fn push_body(&self, body: Vec<u8>) {
        self.state().jobs.push_back(body);
        self.inner.changed.notify_waiters();
    }

    /// Takes the next waiting job out of the queue, outside any consumer (it is not
    /// counted in flight): for tests and tools that work jobs by hand. A body that is
    /// no job is dropped.
    pub fn try_pop(&self) -> Option<ChunkJob> {
        loop {
            let body = self.state().jobs.pop_front()?;
            if let Some(job) = chunk_of(&body) {
                return Some(job);
            }
        }
    }

    /// Jobs waiting (not counting those in flight).
    pub fn len(&self) -> usize {
        self.state().jobs.len()
    }

    /// True when no job is waiting (some may be in flight).
    pub fn is_empty(&self) -> bool {
        self.state().jobs.is_empty()
    }

    /// Deliveries taken and not settled yet.
    pub fn in_flight(&self) -> usize {
        self.state().in_flight
    }

    /// The jobs dead-lettered so far (the chunk each was about), with their reasons.
    pub fn dead_letters(&self) -> Vec<(ChunkJob, String)> {
        self.state()
            .dead
            .iter()
            .filter_map(|(body, reason)| chunk_of(body).map(|j| (j, reason.clone())))
            .collect()
    }

    /// A consumer of this queue (any number may consume it at once).
    pub fn consumer(&self) -> MemoryConsumer {
        MemoryConsumer {
            queue: self.clone(),
        }
    }

    /// Takes the next job if one is waiting, or says the work is over (`Err(())`) when
    /// none is waiting and none is in flight.
    fn take(&self) -> Option<Result<Body, ()>> {
        let mut s = self.state();
        match s.jobs.pop_front() {
            Some(job) => {
                s.in_flight += 1;
                Some(Ok(job))
            }
            None if s.in_flight == 0 => Some(Err(())),
            None => None,
        }
    }

    /// Ends one delivery: `back` puts its body at the end of the queue again.
    fn finish(&self, job: Body, back: bool, dead: Option<String>) {
        {
            let mut s = self.state();
            s.in_flight = s.in_flight.saturating_sub(1);
            if back {
                s.jobs.push_back(job);
            } else if let Some(reason) = dead {
                s.dead.push((job, reason));
            }
        }
        self.inner.changed.notify_waiters();
    }
}

#[async_trait::async_trait]
impl ChunkPublisher for MemoryQueue {
    async fn publish_chunks(&self, jobs: &[ChunkJob]) -> Result<(), QueueError> {
        {
            let mut s = self.state();
            s.jobs.extend(jobs.iter().map(body_of));
        }
        self.inner.changed.notify_waiters();
        Ok(())
    }
}

/// Takes jobs from a [`MemoryQueue`]; its [`Consumer::next`] returns `None` once the
/// queue is empty and no delivery is in flight: "run until the queue is empty".
#[derive(Debug)]
pub struct MemoryConsumer {
    queue: MemoryQueue,
}

#[async_trait::async_trait]
impl Consumer for MemoryConsumer {
    async fn next(&mut self) -> Option<Result<Box<dyn Delivery>, QueueError>> {
        loop {
            // Registered before looking, so that a change between the look and the wait
            // is not missed.
            let changed = self.queue.inner.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.queue.take() {
                Some(Ok(body)) => {
                    return Some(Ok(Box::new(MemoryDelivery {
                        queue: self.queue.clone(),
                        body: Some(body),
                    })));
                }
                Some(Err(())) => return None,
                None => changed.await,
            }
        }
    }

    async fn close(&mut self) {}
}

/// One job taken from a [`MemoryQueue`]. Dropped unsettled (its task aborted), it goes
/// back to the queue, as an unacked message does on RabbitMQ.
#[derive(Debug)]
struct MemoryDelivery {
    queue: MemoryQueue,
    /// `None` once settled.
    body: Option<Body>,
}

#[async_trait::async_trait]
impl Delivery for MemoryDelivery {
    fn body(&self) -> &[u8] {
        self.body.as_deref().unwrap_or_default()
    }

    async fn settle(mut self: Box<Self>, disposition: Disposition) -> Result<(), QueueError> {
        let Some(body) = self.body.take() else {
            return Ok(());
        };
        match disposition {
            Disposition::Ack => self.queue.finish(body, false, None),
            Disposition::DeadLetter(reason) => self.queue.finish(body, false, Some(reason)),
            Disposition::Requeue | Disposition::Republish | Disposition::Replace(_) => {
                let body = match disposition {
                    Disposition::Replace(new) => new,
                    _ => body,
                };
                // Still in flight while it waits, so that consumers do not end meanwhile.
                tokio::time::sleep(self.queue.inner.requeue_pause).await;
                self.queue.finish(body, true, None);
            }
        }
        Ok(())
    }
}

impl Drop for MemoryDelivery {
    fn drop(&mut self) {
        if let Some(body) = self.body.take() {
            self.queue.finish(body, true, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::EntityKind;

    fn job(seq: i32) -> ChunkJob {
        ChunkJob {
            sync_id: "s".into(),
            entity: EntityKind::Loan,
            seq,
        }
    }

    fn seq_of(d: &dyn Delivery) -> i32 {
        serde_json::from_slice::<ChunkJob>(d.body()).unwrap().seq
    }

    #[tokio::test]
    async fn a_consumer_ends_once_the_queue_is_empty_and_nothing_is_in_flight() {
        let q = MemoryQueue::with_requeue_pause(Duration::ZERO);
        q.publish_chunks(&[job(1), job(2)]).await.unwrap();
        let mut c = q.consumer();
        let a = c.next().await.unwrap().unwrap();
        let b = c.next().await.unwrap().unwrap();
        assert_eq!((seq_of(&*a), seq_of(&*b)), (1, 2));
        assert_eq!(q.in_flight(), 2);
        // Empty, but two in flight: a second consumer waits until both are settled.
        let mut other = q.consumer();
        let waiting = tokio::spawn(async move { other.next().await.is_none() });
        a.settle(Disposition::Ack).await.unwrap();
        // `b` is still in flight: the work cannot be over.
        assert!(!waiting.is_finished());
        b.settle(Disposition::Ack).await.unwrap();
        assert!(
            waiting.await.unwrap(),
            "the consumer ends once nothing is in flight"
        );
        assert!(c.next().await.is_none());
        assert_eq!(q.in_flight(), 0);
    }

    #[tokio::test]
    async fn a_requeued_job_comes_back_and_a_dead_letter_does_not() {
        let q = MemoryQueue::with_requeue_pause(Duration::ZERO);
        q.publish_chunks(&[job(1), job(2)]).await.unwrap();
        let mut c = q.consumer();
        let first = c.next().await.unwrap().unwrap();
        first.settle(Disposition::Requeue).await.unwrap();
        let second = c.next().await.unwrap().unwrap();
        assert_eq!(seq_of(&*second), 2);
        second
            .settle(Disposition::DeadLetter("no such chunk".into()))
            .await
            .unwrap();
        let again = c.next().await.unwrap().unwrap();
        assert_eq!(seq_of(&*again), 1, "the requeued job came back");
        again.settle(Disposition::Republish).await.unwrap();
        let third = c.next().await.unwrap().unwrap();
        assert_eq!(seq_of(&*third), 1, "a republished job comes back too");
        third.settle(Disposition::Ack).await.unwrap();
        assert!(c.next().await.is_none());
        let dead = q.dead_letters();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].0.seq, 2);
        assert_eq!(dead[0].1, "no such chunk");
    }

    #[tokio::test]
    async fn a_delivery_dropped_unsettled_goes_back() {
        let q = MemoryQueue::new();
        q.push(job(7));
        let mut c = q.consumer();
        let d = c.next().await.unwrap().unwrap();
        assert!(q.is_empty());
        drop(d);
        assert_eq!((q.len(), q.in_flight()), (1, 0));
        let d = c.next().await.unwrap().unwrap();
        assert_eq!(seq_of(&*d), 7);
        d.settle(Disposition::Ack).await.unwrap();
        assert!(c.next().await.is_none());
    }

    #[tokio::test]
    async fn a_waiting_consumer_wakes_for_a_job_pushed_later() {
        let q = MemoryQueue::new();
        q.push(job(1));
        let mut c = q.consumer();
        let held = c.next().await.unwrap().unwrap();
        let mut other = q.consumer();
        let waiting = tokio::spawn(async move {
            let d = other.next().await.unwrap().unwrap();
            let seq = seq_of(&*d);
            d.settle(Disposition::Ack).await.unwrap();
            seq
        });
        q.push(job(2));
        assert_eq!(waiting.await.unwrap(), 2);
        held.settle(Disposition::Ack).await.unwrap();
        assert!(c.next().await.is_none());
    }
}
