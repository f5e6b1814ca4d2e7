//! Time-driven work, safe on any number of replicas: due retries become queued again, expired
//! leases become timed-out attempts, and the relay republishes outbox entries left behind.
//! Time comes from Postgres `now()`.

use crate::dispatch::publish_admitted;
use crate::error::Result;
use crate::metrics::Metrics;
use crate::state::Shared;
use crate::store::steps;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Runs the reconciler until shutdown: proves, every `reconcile_interval_ms`, that every live
/// task has a live owner, and repairs those that do not (counted in
/// `tasker_reconciler_repairs_total`).
pub async fn run_reconciler(shared: Shared, shutdown: CancellationToken) {
    let every = Duration::from_millis(shared.config.reconcile_interval_ms);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
        if let Err(e) = reconcile(&shared).await {
            tracing::warn!(error = %e, "reconciler round failed; will retry");
        }
        let retention = shared.config.retention_hours as i64;
        match crate::store::tasks::prune(&shared.db, retention, 1_000).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(tasks = n, "pruned finished tasks past retention");
                Metrics::add(&shared.metrics.tasks_pruned_total, n as usize);
            }
            Err(e) => tracing::warn!(error = %e, "pruning failed; will retry"),
        }
    }
}

/// One reconciler round; returns how many tasks were repaired.
pub async fn reconcile(shared: &Shared) -> Result<usize> {
    let quiet = shared.config.reconcile_quiet_ms as i64;
    let ids = steps::find_inconsistent(&shared.db, quiet, 100).await?;
    for id in &ids {
        let mut tx = shared.db.begin().await?;
        let (queues, finished) = steps::repair(&mut tx, *id).await?;
        tx.commit().await?;
        tracing::warn!(task_id = %id, "reconciler repaired a task without a live owner");
        shared.dispatch.wake(queues);
        crate::results::announce(shared, &finished).await;
    }
    let slots = steps::recount_slots(&shared.db).await?;
    for (queue, recorded, counted) in &slots {
        tracing::warn!(%queue, recorded, counted, "reconciler corrected a queue's in-flight count");
    }
    Metrics::add(
        &shared.metrics.reconciler_repairs_total,
        ids.len() + slots.len(),
    );
    Ok(ids.len() + slots.len())
}

/// Runs the timer loop until shutdown.
pub async fn run(shared: Shared, shutdown: CancellationToken) {
    let poll = shared.config.poll_interval();
    loop {
        let next = match tick(&shared).await {
            Ok(next) => next,
            Err(e) => {
                tracing::warn!(error = %e, "timer round failed; will retry");
                poll
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = shared.timers.notified() => {}
            _ = tokio::time::sleep(next) => {}
        }
    }
}

/// One round; returns how long to sleep before the next.
async fn tick(shared: &Shared) -> Result<Duration> {
    let poll = shared.config.poll_interval();
    loop {
        let queues = steps::promote_due_retries(&shared.db, 1000).await?;
        let n = queues.len();
        if n > 0 {
            shared.dispatch.wake(queues);
        }
        if n < 1000 {
            break;
        }
    }
    let expired = steps::expired_leases(&shared.db, 500, 30_000).await?;
    if !expired.is_empty() {
        Metrics::add(&shared.metrics.timeouts_total, expired.len());
        crate::results::apply_outcomes(shared, expired).await?;
    }
    relay(shared).await?;
    let next = steps::next_retry_in_ms(&shared.db).await?;
    Ok(next.map_or(poll, |ms| Duration::from_millis(ms.max(1) as u64).min(poll)))
}

/// Republishes outbox entries older than `relay_after_ms`. The claimed rows stay locked while
/// their messages are published, so two replicas never relay the same entry at once.
async fn relay(shared: &Shared) -> Result<()> {
    let mut tx = shared.db.begin().await?;
    let claimed =
        steps::claim_stale_outbox(&mut tx, shared.config.relay_after_ms as i64, 500).await?;
    if claimed.is_empty() {
        tx.commit().await?;
        return Ok(());
    }
    let ids: Vec<_> = claimed.iter().map(|a| a.step_id).collect();
    let messages = steps::load_messages(&mut *tx, &ids).await?;
    tracing::info!(
        entries = claimed.len(),
        "relaying outbox entries left behind"
    );
    Metrics::add(&shared.metrics.outbox_relayed_total, claimed.len());
    // Touch the entries so they are not relayed again before the confirm clears them.
    sqlx::query("UPDATE outbox SET created_at = now() WHERE id = ANY($1)")
        .bind(claimed.iter().map(|a| a.outbox_id).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    publish_admitted(shared, &claimed, messages).await;
    Ok(())
}
