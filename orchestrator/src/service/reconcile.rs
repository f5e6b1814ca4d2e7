//! The reconciler's work: prove that every live task has a live owner and repair those that do
//! not; recount slots; prune finished tasks past their retention.

use super::{Result, Shared, events};
use crate::metrics::Metrics;
use crate::store::{apply, reconcile};
use crate::transition;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// One reconciler round; returns how many tasks and slots were repaired.
pub async fn reconcile(shared: &Shared) -> Result<usize> {
    let quiet = shared.config.reconcile_quiet_ms as i64;
    let ids = reconcile::find_inconsistent(&shared.db, quiet, 100).await?;
    for id in &ids {
        repair(shared, *id).await?;
        tracing::warn!(task_id = %id, "reconciler repaired a task without a live owner");
    }
    let slots = reconcile::recount_slots(&shared.db).await?;
    for (slot, recorded, counted) in &slots {
        tracing::warn!(%slot, recorded, counted, "reconciler corrected a slot's in-flight count");
    }
    Metrics::add(
        &shared.metrics.counters.reconciler_repairs_total,
        ids.len() + slots.len(),
    );
    Ok(ids.len() + slots.len())
}

/// Recomputes a live task's bookkeeping from its steps, under the task lock: every non-terminal
/// step gets an owner again (a due time, a lease, a queue slot, or unfinished parents), a
/// halted task halts what it has not started ([`transition::halt`]), and the task finishes if
/// nothing is left ([`transition::final_state`]).
async fn repair(shared: &Shared, id: Uuid) -> Result<()> {
    let mut tx = shared.db.begin().await?;
    let Some(task) = reconcile::lock_live_task(&mut tx, id).await? else {
        tx.commit().await?;
        return Ok(());
    };
    reconcile::restore_due_times(&mut tx, id).await?;
    let mut queues = Vec::new();
    if task.failing || task.cancel_requested {
        let halt = transition::halt(task.cancel_requested);
        apply::halt_steps(&mut tx, &[id], halt).await?;
        super::dynamic::settle_halted(&mut tx, &[id], halt.to).await?;
    } else {
        let (ready, started) = reconcile::readmit_waiting(&mut tx, id).await?;
        queues = ready;
        let cause = super::dynamic::Cause {
            started,
            ..Default::default()
        };
        if !cause.is_empty() {
            let live = HashMap::from([(id, task)]);
            let mut out = super::dynamic::Cascade::default();
            super::dynamic::cascade(&mut tx, &shared.templates, &live, cause, &mut out).await?;
            queues.extend(out.queued);
        }
    }
    reconcile::recount_unfinished(&mut tx, id).await?;
    let (finished, handlers) = super::dynamic::finish(
        &mut tx,
        vec![(id, transition::final_state(task))],
        shared.config.max_task_output_bytes,
    )
    .await?;
    queues.extend(handlers);
    tx.commit().await?;
    shared.dispatch.wake(queues);
    events::announce(shared, &finished).await;
    Ok(())
}

/// Deletes the tasks past their retention in batches of `batch` (each its own statement, safe on
/// several replicas) until none is left or `budget` is spent, so pruning keeps pace with the
/// finish rate instead of one batch per reconciler round. Stops between batches when `stop` is
/// cancelled. Returns how many went.
pub async fn prune(
    shared: &Shared,
    batch: i64,
    budget: Duration,
    stop: &CancellationToken,
) -> Result<u64> {
    let retention = i64::try_from(shared.config.retention_ms).unwrap_or(i64::MAX);
    let started = Instant::now();
    let mut total = 0;
    loop {
        let n = reconcile::prune(&shared.db, retention, batch).await?;
        total += n;
        if (n as i64) < batch || started.elapsed() >= budget || stop.is_cancelled() {
            break;
        }
    }
    // The audit log keeps its own retention (TASKER_AUDIT_RETENTION_MS), one batch a round.
    let audit = super::audit::prune(shared, batch).await?;
    if audit > 0 {
        tracing::info!(entries = audit, "pruned audit log entries past retention");
    }
    if total > 0 {
        tracing::info!(tasks = total, "pruned finished tasks past retention");
        Metrics::add(&shared.metrics.counters.tasks_pruned_total, total as usize);
    }
    Ok(total)
}
