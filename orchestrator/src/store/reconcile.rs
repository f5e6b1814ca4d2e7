//! The reconciler's reads and writes: tasks whose bookkeeping disagrees with their steps, the
//! pieces of a repair, slot recounts, and pruning finished tasks.

use super::Result;
use crate::slots::SlotKey;
use crate::transition::{DELEGATE, PARENTS_DONE, TaskNow};
use sqlx::{PgConnection, PgExecutor, Row};
use uuid::Uuid;

/// Live tasks whose bookkeeping disagrees with their steps, i.e. that may have no live owner.
/// In a healthy system this finds nothing.
pub async fn find_inconsistent(
    db: impl PgExecutor<'_>,
    quiet_ms: i64,
    limit: i64,
) -> Result<Vec<Uuid>> {
    Ok(sqlx::query_scalar(
        "SELECT t.id FROM tasks t
         WHERE t.state IN ('pending', 'running')
           AND t.updated_at < now() - $1 * interval '1 millisecond'
           AND (t.unfinished_steps <> (SELECT count(*) FROM steps s WHERE s.task_id = t.id
                                        AND s.state IN ('waiting', 'queued', 'dispatched', 'retrying', 'delegated'))
                OR EXISTS (SELECT 1 FROM steps s WHERE s.task_id = t.id AND s.state = 'waiting'
                           AND s.map_of IS NULL
                           AND s.pending_parents <> (SELECT count(*) FROM steps p
                                                     WHERE p.id = ANY(s.parent_ids) AND p.state <> 'succeeded'
                                                       AND NOT (s.join_any AND p.state = 'skipped')))
                OR EXISTS (SELECT 1 FROM steps s WHERE s.task_id = t.id
                           AND ((s.state = 'retrying' AND s.next_attempt_at IS NULL)
                             OR (s.state = 'dispatched' AND s.lease_expires_at IS NULL)
                             OR (s.state = 'delegated' AND s.wait IS NOT NULL AND s.wake_at IS NULL)))
                OR ((t.failing OR t.cancel_requested)
                    AND EXISTS (SELECT 1 FROM steps s WHERE s.task_id = t.id
                                AND s.state IN ('waiting', 'queued', 'retrying')
                                AND NOT s.failure_handler)))
         ORDER BY t.updated_at LIMIT $2",
    )
    .bind(quiet_ms)
    .bind(limit)
    .fetch_all(db)
    .await?)
}

/// Locks a task if it is live and returns its flags.
pub async fn lock_live_task(tx: &mut PgConnection, id: Uuid) -> Result<Option<TaskNow>> {
    Ok(sqlx::query(
        "SELECT failing, cancel_requested FROM tasks
         WHERE id = $1 AND state IN ('pending', 'running') FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?
    .map(|r| TaskNow {
        failing: r.get("failing"),
        cancel_requested: r.get("cancel_requested"),
    }))
}

/// Gives every retrying step a due time and every dispatched one a lease (now, when missing),
/// so the timer loop owns them again.
pub async fn restore_due_times(tx: &mut PgConnection, task: Uuid) -> Result<()> {
    sqlx::query(
        "UPDATE steps SET next_attempt_at = CASE WHEN state = 'retrying'
                                                 THEN coalesce(next_attempt_at, now()) END,
                          lease_expires_at = CASE WHEN state = 'dispatched'
                                                  THEN coalesce(lease_expires_at, now()) END,
                          wake_at = CASE WHEN state = 'delegated' THEN coalesce(wake_at, now()) END
         WHERE task_id = $1
           AND (state IN ('retrying', 'dispatched') OR (state = 'delegated' AND wait IS NOT NULL))",
    )
    .bind(task)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Recounts the unfinished parents of a task's waiting steps (a `join: any` step counts a
/// skipped parent as finished; instances of mapped steps are let in by their mapped step);
/// those with none left are [`PARENTS_DONE`], or are delegated ([`DELEGATE`]). Returns the
/// queues that got work and the mapped steps that started.
pub async fn readmit_waiting(
    tx: &mut PgConnection,
    task: Uuid,
) -> Result<(Vec<String>, Vec<Uuid>)> {
    // One UPDATE with the counts computed beforehand: a row must not be updated twice in one
    // statement.
    let rows = sqlx::query(
        "WITH counted AS (
             SELECT s.id, (SELECT count(*) FROM steps p
                           WHERE p.id = ANY(s.parent_ids) AND p.state <> 'succeeded'
                             AND NOT (s.join_any AND p.state = 'skipped'))::int AS n
             FROM steps s WHERE s.task_id = $1 AND s.state = 'waiting' AND s.map_of IS NULL
               -- A pending task (delayed start) starts nothing before its time.
               AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = $1 AND t.state = 'pending')
         )
         UPDATE steps s
         SET pending_parents = c.n,
             state = CASE WHEN c.n > 0 THEN s.state
                          WHEN s.map_over IS NULL AND s.workflow IS NULL AND s.wait IS NULL THEN $2
                          ELSE $3 END,
             queued_at = CASE WHEN c.n = 0 THEN now() END,
             updated_at = now()
         FROM counted c WHERE s.id = c.id
         RETURNING s.id, s.namespace || '.' || s.queue AS queue, s.state",
    )
    .bind(task)
    .bind(PARENTS_DONE.to)
    .bind(DELEGATE.to)
    .fetch_all(&mut *tx)
    .await?;
    let (mut queues, mut delegated) = (Vec::new(), Vec::new());
    for r in rows {
        let state: tasker_schemas::StepState = r.get("state");
        if state == PARENTS_DONE.to {
            queues.push(r.get("queue"));
        } else if state == DELEGATE.to {
            delegated.push(r.get("id"));
        }
    }
    Ok((queues, delegated))
}

/// Sets a task's unfinished-step counter from its steps.
pub async fn recount_unfinished(tx: &mut PgConnection, task: Uuid) -> Result<()> {
    sqlx::query(
        "UPDATE tasks t SET unfinished_steps = (SELECT count(*) FROM steps s WHERE s.task_id = t.id
                                                AND s.state IN ('waiting', 'queued', 'dispatched', 'retrying', 'delegated')),
                            updated_at = now()
         WHERE t.id = $1",
    )
    .bind(task)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Recounts the dispatched steps of every queue slot under its lock and corrects slots that
/// disagree (which only an older orchestrator running beside this one, or a bug, can cause).
/// Returns the slots corrected, with (recorded, counted).
pub async fn recount_slots(db: &sqlx::PgPool) -> Result<Vec<(SlotKey, i64, i64)>> {
    let queues: Vec<String> =
        sqlx::query_scalar("SELECT key FROM slots WHERE scope = 'queue' ORDER BY key")
            .fetch_all(db)
            .await?;
    let mut fixed = Vec::new();
    for queue in queues {
        let mut tx = db.begin().await?;
        let recorded: Option<i64> = sqlx::query_scalar(
            "SELECT in_flight FROM slots WHERE scope = 'queue' AND key = $1 FOR UPDATE",
        )
        .bind(&queue)
        .fetch_optional(&mut *tx)
        .await?;
        let counted: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM steps
             WHERE namespace = split_part($1, '.', 1) AND queue = split_part($1, '.', 2)
               AND state = 'dispatched'",
        )
        .bind(&queue)
        .fetch_one(&mut *tx)
        .await?;
        if let Some(recorded) = recorded
            && recorded != counted
        {
            sqlx::query("UPDATE slots SET in_flight = $2 WHERE scope = 'queue' AND key = $1")
                .bind(&queue)
                .bind(counted)
                .execute(&mut *tx)
                .await?;
            fixed.push((SlotKey::queue(queue), recorded, counted));
        }
        tx.commit().await?;
    }
    Ok(fixed)
}

/// Deletes up to `limit` tasks past their retention — their namespace's (`namespace_settings`)
/// or else `retention_ms` — with their steps, attempts and history. Namespace by namespace
/// (the registered templates' namespaces), each by its own cutoff on the
/// `(namespace, finished_at)` index, so a namespace kept longer is never scanned past. Safe on
/// several replicas (`SKIP LOCKED`). Returns how many went.
pub async fn prune(db: impl PgExecutor<'_>, retention_ms: i64, limit: i64) -> Result<u64> {
    let gone: i64 = sqlx::query_scalar(
        "WITH cut AS (
             SELECT n.namespace,
                    now() - coalesce(s.retention_ms, $1) * interval '1 millisecond' AS before
             FROM (SELECT DISTINCT namespace FROM templates) n
             LEFT JOIN namespace_settings s ON s.namespace = n.namespace
         ), old AS (
             SELECT o.id FROM cut CROSS JOIN LATERAL (
                 SELECT t.id FROM tasks t
                 WHERE t.namespace = cut.namespace AND t.finished_at < cut.before
                   AND t.state IN ('completed', 'failed', 'cancelled')
                 ORDER BY t.finished_at LIMIT $2 FOR UPDATE SKIP LOCKED
             ) o
             LIMIT $2
         ), gone AS (
             DELETE FROM tasks t USING old WHERE t.id = old.id RETURNING t.id
         ), history AS (
             DELETE FROM attempts a USING gone WHERE a.task_id = gone.id
         ), task_steps AS (
             DELETE FROM steps s USING gone WHERE s.task_id = gone.id
         )
         SELECT count(*) FROM gone",
    )
    .bind(retention_ms)
    .bind(limit)
    .fetch_one(db)
    .await?;
    Ok(gone as u64)
}
