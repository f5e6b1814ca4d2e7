//! Time-driven reads and writes: due retries, expired leases, and the leases that `started`
//! and heartbeats renew. Time is PostgreSQL's `now()`.

use super::Result;
use crate::transition::PROMOTE_RETRY;
use sqlx::{PgExecutor, Row};
use tasker_schemas::{StepId, TaskId};
use uuid::Uuid;

/// Records that a worker took a long step: execution lease from now, by that worker. False when
/// the attempt is no longer the step's current dispatched one.
pub async fn record_started(
    db: impl PgExecutor<'_>,
    step: StepId,
    attempt: i32,
    worker: &str,
    lease_ms: i64,
) -> Result<bool> {
    let n = sqlx::query(
        "UPDATE steps
         SET started_at = coalesce(started_at, now()), worker = $3,
             -- Renewed by heartbeats, never past the execution timeout counted from the start.
             lease_expires_at = least(now() + $4 * interval '1 millisecond',
                                      coalesce(started_at, now()) + execution_timeout_ms * interval '1 millisecond'),
             updated_at = now()
         WHERE id = $1 AND attempt = $2 AND state = 'dispatched'",
    )
    .bind(step.0)
    .bind(attempt)
    .bind(worker)
    .bind(lease_ms)
    .execute(db)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Carries out [`PROMOTE_RETRY`] for due retries; returns the queues that got work.
pub async fn promote_due_retries(db: impl PgExecutor<'_>, limit: i64) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "UPDATE steps s SET state = $2, queued_at = now(), next_attempt_at = NULL, updated_at = now()
         FROM (SELECT id FROM steps WHERE state = 'retrying' AND next_attempt_at <= now()
                 AND workflow IS NULL
               ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED) due
         WHERE s.id = due.id AND s.state = 'retrying'
         RETURNING s.queue",
    )
    .bind(limit)
    .bind(PROMOTE_RETRY.to)
    .fetch_all(db)
    .await?)
}

/// Child-workflow steps whose retry is due (their tasks, to lock first): a retry restarts the
/// step's child task, in a transaction of its own ([`crate::service::dynamic`]).
pub async fn due_workflow_retries(
    db: impl PgExecutor<'_>,
    limit: i64,
) -> Result<Vec<(Uuid, Uuid)>> {
    let rows = sqlx::query(
        "SELECT task_id, id FROM steps
         WHERE state = 'retrying' AND next_attempt_at <= now() AND workflow IS NOT NULL
         ORDER BY next_attempt_at LIMIT $1",
    )
    .bind(limit)
    .fetch_all(db)
    .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get("task_id"), r.get("id")))
        .collect())
}

/// Milliseconds until the next retry is due (capped by the caller), if any is scheduled.
pub async fn next_retry_in_ms(db: impl PgExecutor<'_>) -> Result<Option<i64>> {
    // `greatest` ignores NULL: without a scheduled retry, `min` is NULL and must stay NULL (a 0
    // here made the timer loop spin every millisecond).
    let ms: Option<i64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM (min(next_attempt_at) - now())) * 1000)::bigint
         FROM steps WHERE state = 'retrying'",
    )
    .fetch_one(db)
    .await?;
    Ok(ms.map(|ms| ms.max(0)))
}

/// A dispatched attempt whose lease ran out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredLease {
    pub task_id: TaskId,
    pub step_id: StepId,
    pub attempt: i32,
    /// A worker reported `started` (the execution lease ran out, not the queue wait).
    pub started: bool,
    pub queue_wait_timeout_ms: i64,
    pub execution_timeout_ms: i64,
}

/// Claims dispatched attempts whose lease ran out. The claim pushes the lease out by
/// `claim_ms` (`SKIP LOCKED`), so replicas never time out the same attempt twice; if applying
/// the timeout fails, the attempt comes back once the claim runs out.
pub async fn claim_expired_leases(
    db: impl PgExecutor<'_>,
    limit: i64,
    claim_ms: i64,
) -> Result<Vec<ExpiredLease>> {
    let rows = sqlx::query(
        "UPDATE steps s SET lease_expires_at = now() + $2 * interval '1 millisecond'
         FROM (SELECT id FROM steps WHERE state = 'dispatched' AND lease_expires_at < now()
               ORDER BY lease_expires_at LIMIT $1 FOR UPDATE SKIP LOCKED) due
         WHERE s.id = due.id AND s.state = 'dispatched'
         RETURNING s.id, s.task_id, s.attempt, s.started_at IS NOT NULL AS started,
                   s.queue_wait_timeout_ms, s.execution_timeout_ms",
    )
    .bind(limit)
    .bind(claim_ms)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| ExpiredLease {
            task_id: TaskId(r.get("task_id")),
            step_id: StepId(r.get("id")),
            attempt: r.get("attempt"),
            started: r.get("started"),
            queue_wait_timeout_ms: r.get("queue_wait_timeout_ms"),
            execution_timeout_ms: r.get("execution_timeout_ms"),
        })
        .collect())
}
