//! Time-driven work, safe on any number of replicas: due retries become ready again, expired
//! leases become timed-out attempts, and the relay publishes outbox entries left behind.

use super::apply::{apply_outcomes, publish_and_settle};
use super::{Result, Shared};
use crate::metrics::Metrics;
use crate::store::{outbox, timers};
use crate::transition::{self, Finished};
use std::time::Duration;

/// Moves every due retry back to `queued`, in batches, and wakes the dispatcher for their
/// queues.
pub async fn promote_due_retries(shared: &Shared) -> Result<()> {
    const BATCH: i64 = 1000;
    loop {
        let queues = timers::promote_due_retries(&shared.db, BATCH).await?;
        let n = queues.len();
        if n > 0 {
            shared.dispatch.wake(queues);
        }
        if (n as i64) < BATCH {
            return Ok(());
        }
    }
}

/// Applies expired leases as timeouts ([`transition::lease_expired`]).
pub async fn expire_leases(shared: &Shared) -> Result<()> {
    let expired = timers::claim_expired_leases(&shared.db, 500, 30_000).await?;
    if expired.is_empty() {
        return Ok(());
    }
    Metrics::add(&shared.metrics.counters.timeouts_total, expired.len());
    let batch = expired
        .into_iter()
        .map(|l| Finished {
            task_id: l.task_id,
            step_id: l.step_id,
            attempt: l.attempt,
            worker: None,
            result: transition::lease_expired(
                l.attempt,
                l.started,
                l.queue_wait_timeout_ms,
                l.execution_timeout_ms,
            ),
            duration_ms: None,
        })
        .collect();
    apply_outcomes(shared, batch).await?;
    Ok(())
}

/// Publishes again the outbox entries older than `relay_after_ms`. The claim touches them, so
/// no replica claims them again before their new confirm clears them.
pub async fn relay(shared: &Shared) -> Result<()> {
    let mut tx = shared.db.begin().await?;
    let claimed = outbox::claim_stale(&mut tx, shared.config.relay_after_ms as i64, 500).await?;
    if claimed.is_empty() {
        tx.commit().await?;
        return Ok(());
    }
    let ids: Vec<_> = claimed.iter().map(|a| a.step_id).collect();
    let messages = outbox::load_messages(&mut *tx, &ids, shared.config.step_data_limit()).await?;
    tx.commit().await?;
    tracing::info!(
        entries = claimed.len(),
        "relaying outbox entries left behind"
    );
    Metrics::add(&shared.metrics.counters.outbox_relayed_total, claimed.len());
    publish_and_settle(shared, &claimed, messages).await;
    Ok(())
}

/// How long until the next retry, timed step, delayed start or deadline is due, at most `cap`.
pub async fn next_due(shared: &Shared, cap: Duration) -> Result<Duration> {
    let retry = timers::next_retry_in_ms(&shared.db).await?;
    let wait = crate::store::waits::next_due_in_ms(&shared.db).await?;
    let next = match (retry, wait) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(next.map_or(cap, |ms| Duration::from_millis(ms.max(1) as u64).min(cap)))
}

/// Child workflows: applies the end of every finished child task to its step
/// ([`transition::child_finished`]: a stale end, e.g. of a child retried since, changes
/// nothing), and restarts the children of child-workflow steps whose retry is due (each in a
/// transaction under its task's lock). Woken when a child task finishes; also every round, so
/// an end lost to a crash is applied later.
pub async fn settle_children(shared: &Shared) -> Result<()> {
    let ended = crate::store::dynamic::finished_children(&shared.db, 500).await?;
    if !ended.is_empty() {
        let batch = ended
            .into_iter()
            .map(|c| Finished {
                task_id: tasker_schemas::TaskId(c.task_id),
                step_id: tasker_schemas::StepId(c.step_id),
                attempt: c.attempt,
                worker: None,
                result: transition::child_finished(
                    tasker_schemas::TaskId(c.child_id),
                    c.child_state,
                    c.output,
                    c.error.as_deref(),
                ),
                duration_ms: None,
            })
            .collect();
        apply_outcomes(shared, batch).await?;
    }
    for (task, step) in timers::due_workflow_retries(&shared.db, 100).await? {
        super::dynamic::restart_child(shared, task, step).await?;
    }
    Ok(())
}
