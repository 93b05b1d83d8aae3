//! The in-memory chunk queue of single-process mode (`loansync sync`): the planner
//! publishes into it and the in-process workers consume from it. Nothing survives the
//! process, which is fine: the chunk ledger does, and `loansync resume` re-publishes.

use super::ChunkPublisher;
use crate::domain::ChunkJob;
use std::sync::Arc;
use tokio::sync::{Mutex, mpsc};

/// A multi-consumer queue of chunk jobs.
#[derive(Clone)]
pub struct MemoryQueue {
    tx: mpsc::UnboundedSender<ChunkJob>,
    /// Shared by every in-process worker; each takes the next job.
    rx: Arc<Mutex<mpsc::UnboundedReceiver<ChunkJob>>>,
}

impl Default for MemoryQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryQueue {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        MemoryQueue {
            tx,
            rx: Arc::new(Mutex::new(rx)),
        }
    }

    /// Puts a job (back) at the end of the queue.
    pub fn push(&self, job: ChunkJob) {
        // The receiver lives as long as `self`, so sending cannot fail.
        let _ = self.tx.send(job);
    }

    /// The next job, waiting for one.
    pub async fn pop(&self) -> Option<ChunkJob> {
        self.rx.lock().await.recv().await
    }

    /// The next job if one is waiting.
    pub async fn try_pop(&self) -> Option<ChunkJob> {
        self.rx.lock().await.try_recv().ok()
    }
}

#[async_trait::async_trait]
impl ChunkPublisher for MemoryQueue {
    async fn publish_chunks(&self, jobs: &[ChunkJob]) -> anyhow::Result<()> {
        for j in jobs {
            self.push(j.clone());
        }
        Ok(())
    }
}
