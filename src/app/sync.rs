//! A sync run in this process: the planner publishes into an in-memory queue and the
//! worker loop works it until it is empty (no broker). One path for `loansync sync`,
//! `resume --in-process`, `errors retry --in-process`, the demo and the tests.

use super::error::AppError;
use super::report::{SyncReport, summarize};
use super::worker_context;
use crate::config::Settings;
use crate::domain::{EntityKind, PlanRequest};
use crate::planner::{self, PlanOutcome};
use crate::queue::memory::MemoryQueue;
use crate::worker::{self, WorkerContext};
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Instant;

/// What to run in this process.
#[derive(Debug, Clone)]
pub enum Work {
    /// Plan a sync for this request, then deliver it.
    Plan(PlanRequest),
    /// Deliver the unsettled chunks of a stalled sync (`resume --in-process`).
    Resume(String),
    /// Re-deliver the unresolved error rows of these entities (all when empty) in a new
    /// sync (`errors retry --in-process`).
    Retry(Vec<EntityKind>),
}

/// A sync planned (or resumed) into an in-memory queue, ready to be worked.
pub struct InProcess {
    pool: PgPool,
    settings: Settings,
    ctx: Arc<WorkerContext>,
    queue: MemoryQueue,
    sync_id: String,
    /// Whether the chunk ledger is pruned afterwards (single-process installs have no
    /// long-running planner to do it).
    prune: bool,
    started: Instant,
}

impl std::fmt::Debug for InProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcess")
            .field("sync_id", &self.sync_id)
            .field("queue", &self.queue)
            .field("prune", &self.prune)
            .finish_non_exhaustive()
    }
}

/// What [`start`] did.
#[derive(Debug)]
pub enum Started {
    /// The sync is planned; [`InProcess::run`] delivers it.
    Running(Box<InProcess>),
    /// Another sync is in progress: nothing was planned.
    Busy(SyncReport),
}

/// Plans (or resumes) `work` into an in-memory queue. The analytics client is built
/// first, so that a client that cannot be built plans no sync.
pub async fn start(pool: &PgPool, settings: &Settings, work: Work) -> Result<Started, AppError> {
    let started = Instant::now();
    let ctx = Arc::new(worker_context(settings, pool.clone())?);
    let queue = MemoryQueue::new();
    // What planning did: the sync to work, or the report of a busy slot.
    let planned = |outcome: PlanOutcome, what: &str| match outcome {
        PlanOutcome::Planned { sync_id, .. } | PlanOutcome::Duplicate { sync_id, .. } => {
            Ok(Ok(sync_id))
        }
        PlanOutcome::Busy { active_sync_id } => Ok(Err(SyncReport::busy(
            active_sync_id,
            started.elapsed().as_secs_f64(),
        ))),
        PlanOutcome::Pending { request_id, .. } => Err(AppError::refused(format!(
            "{what} {request_id} was queued instead of planned{}",
            if what == "request" {
                " in this process"
            } else {
                ""
            }
        ))),
    };
    let (planned, prune) = match work {
        Work::Plan(req) => (
            planned(
                planner::plan_sync(pool, settings, &req, &queue).await?,
                "request",
            )?,
            true,
        ),
        Work::Resume(sync_id) => {
            planner::resume(pool, &sync_id, &queue).await?;
            (Ok(sync_id), false)
        }
        Work::Retry(entities) => (
            planned(
                planner::plan_retry(pool, settings, &entities, &queue).await?,
                "retry",
            )?,
            false,
        ),
    };
    let sync_id = match planned {
        Ok(sync_id) => sync_id,
        Err(busy) => return Ok(Started::Busy(busy)),
    };
    Ok(Started::Running(Box::new(InProcess {
        pool: pool.clone(),
        settings: settings.clone(),
        ctx,
        queue,
        sync_id,
        prune,
        started,
    })))
}

impl InProcess {
    /// The sync being run.
    pub fn sync_id(&self) -> &str {
        &self.sync_id
    }

    /// The chunks waiting to be worked.
    pub fn chunks(&self) -> usize {
        self.queue.len()
    }

    /// Works the queue until it is empty and nothing is in flight (showing progress bars
    /// on stderr with `progress`), then reads the sync's outcome back.
    pub async fn run(self, progress: bool) -> Result<SyncReport, AppError> {
        let (done, watching) = tokio::sync::watch::channel(false);
        let watcher = progress.then(|| {
            tokio::spawn(crate::progress::watch(
                self.pool.clone(),
                self.sync_id.clone(),
                watching,
            ))
        });
        worker::run_memory(self.ctx, self.queue, self.settings.worker_prefetch()).await;
        let _ = done.send(true);
        if let Some(w) = watcher {
            let _ = w.await;
        }
        // Single-process installs have no long-running planner: a sync whose last settle
        // committed without its finalize (a connection lost in between) is finalized
        // here, and the chunk ledger is pruned.
        planner::finalize_settled(&self.pool, &self.settings.telemetry).await;
        if self.prune {
            planner::prune(&self.pool, &self.settings).await;
        }
        tracing::debug!(
            seconds = self.started.elapsed().as_secs_f64(),
            "in-process sync worked"
        );
        summarize(&self.pool, self.sync_id).await
    }
}

/// Runs `work` in this process from start to end: the one way every caller runs a sync
/// without a broker. `progress` shows progress bars on stderr.
pub async fn run_in_process(
    pool: &PgPool,
    settings: &Settings,
    work: Work,
    progress: bool,
) -> Result<SyncReport, AppError> {
    match start(pool, settings, work).await? {
        Started::Busy(report) => Ok(report),
        Started::Running(sync) => sync.run(progress).await,
    }
}

/// Plans `req` and works its chunks in this process, without progress bars
/// ([`run_in_process`] with [`Work::Plan`]).
pub async fn sync_in_process(
    pool: &PgPool,
    settings: &Settings,
    req: &PlanRequest,
) -> Result<SyncReport, AppError> {
    run_in_process(pool, settings, Work::Plan(req.clone()), false).await
}
