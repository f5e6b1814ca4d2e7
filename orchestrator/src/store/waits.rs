//! Time and signals: timed steps (`sleep`, `sleep_until`, `wait_for`) starting and waking,
//! signals recorded and taken, delayed starts and task deadlines. Time is PostgreSQL's `now()`;
//! the decisions are [`crate::transition`]'s ([`crate::transition::wait_start`],
//! [`crate::transition::wake`], [`crate::transition::accept_signal`]).

use super::Result;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor, Row};
use tasker_schemas::{TaskId, Wait};
use uuid::Uuid;

/// A timed step that was just delegated (its parents done), with what its start needs.
#[derive(Debug, Clone)]
pub struct WaitToStart {
    pub step_id: Uuid,
    pub task_id: Uuid,
    pub name: String,
    /// `None` when the stored spec is unreadable.
    pub wait: Option<Wait>,
    /// The outputs of its parents that succeeded, by name.
    pub parent_outputs: Value,
    pub now: DateTime<Utc>,
}

/// The timed steps among `ids` (delegated, waiting to start).
pub async fn read_waits_to_start(tx: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<WaitToStart>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(
        "SELECT s.id, s.task_id, s.name, s.wait, now() AS now,
                (SELECT coalesce(jsonb_object_agg(p.name, coalesce(p.output, 'null'::jsonb)), '{}'::jsonb)
                 FROM unnest(s.parent_ids) AS pid(id) JOIN steps p ON p.id = pid.id
                 WHERE p.state = 'succeeded') AS parent_outputs
         FROM steps s
         WHERE s.id = ANY($1) AND s.state = 'delegated' AND s.wait IS NOT NULL
         ORDER BY s.position",
    )
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .iter()
        .map(|r| WaitToStart {
            step_id: r.get("id"),
            task_id: r.get("task_id"),
            name: r.get("name"),
            wait: serde_json::from_value(r.get("wait")).ok(),
            parent_outputs: r.get("parent_outputs"),
            now: r.get("now"),
        })
        .collect())
}

/// A timed step's attempt begins (attempt + 1): returns the new attempt.
pub async fn begin_attempt(tx: &mut PgConnection, step: Uuid) -> Result<i32> {
    Ok(sqlx::query_scalar(
        "UPDATE steps SET attempt = attempt + 1, dispatched_at = now(), started_at = now(),
                          updated_at = now()
         WHERE id = $1 RETURNING attempt",
    )
    .bind(step)
    .fetch_one(&mut *tx)
    .await?)
}

/// Sets when a waiting timed step wakes.
pub async fn set_wake(tx: &mut PgConnection, step: Uuid, at: DateTime<Utc>) -> Result<()> {
    sqlx::query("UPDATE steps SET wake_at = $2, updated_at = now() WHERE id = $1")
        .bind(step)
        .bind(at)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The waiting step `step` (attempt `attempt`) takes the oldest signal `name` of its task that
/// no step took yet. False when none is kept. Under the task's lock.
pub async fn take_signal(
    tx: &mut PgConnection,
    task: Uuid,
    name: &str,
    step: Uuid,
    attempt: i32,
) -> Result<bool> {
    Ok(sqlx::query(
        "UPDATE signals g SET consumed_by = $3, consumed_attempt = $4, consumed_at = now()
         FROM (SELECT signal_id FROM signals
               WHERE task_id = $1 AND name = $2 AND consumed_by IS NULL
               ORDER BY seq LIMIT 1) oldest
         WHERE g.task_id = $1 AND g.name = $2 AND g.signal_id = oldest.signal_id",
    )
    .bind(task)
    .bind(name)
    .bind(step)
    .bind(attempt)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1)
}

/// A timed step whose time came, claimed for waking.
#[derive(Debug, Clone)]
pub struct DueWait {
    pub task_id: Uuid,
    pub step_id: Uuid,
    pub attempt: i32,
    pub wait: Option<Wait>,
    pub now: DateTime<Utc>,
    /// The payload of the signal it took, if it took one.
    pub signal: Option<Value>,
}

/// Claims timed steps whose `wake_at` has come. The claim pushes `wake_at` out by `claim_ms`
/// (`SKIP LOCKED`), so replicas never wake the same attempt twice; if applying the wake fails,
/// the step comes back once the claim runs out.
pub async fn claim_due_waits(
    db: impl PgExecutor<'_>,
    limit: i64,
    claim_ms: i64,
) -> Result<Vec<DueWait>> {
    let rows = sqlx::query(
        "UPDATE steps s SET wake_at = now() + $2 * interval '1 millisecond'
         FROM (SELECT id FROM steps WHERE state = 'delegated' AND wake_at <= now()
               ORDER BY wake_at LIMIT $1 FOR UPDATE SKIP LOCKED) due
         WHERE s.id = due.id AND s.state = 'delegated' AND s.wait IS NOT NULL
         RETURNING s.id, s.task_id, s.attempt, s.wait, now() AS now,
                   EXISTS (SELECT 1 FROM signals g WHERE g.consumed_by = s.id
                           AND g.consumed_attempt = s.attempt) AS taken,
                   (SELECT g.payload FROM signals g WHERE g.consumed_by = s.id
                    AND g.consumed_attempt = s.attempt LIMIT 1) AS payload",
    )
    .bind(limit)
    .bind(claim_ms)
    .fetch_all(db)
    .await?;
    Ok(rows
        .iter()
        .map(|r| DueWait {
            task_id: r.get("task_id"),
            step_id: r.get("id"),
            attempt: r.get("attempt"),
            wait: serde_json::from_value(r.get("wait")).ok(),
            now: r.get("now"),
            signal: r
                .get::<bool, _>("taken")
                .then(|| r.get::<Option<Value>, _>("payload").unwrap_or(Value::Null)),
        })
        .collect())
}

/// A recorded signal.
#[derive(Debug, Clone)]
pub struct SignalRow {
    pub received_at: DateTime<Utc>,
    pub consumed_by: Option<String>,
}

/// The signal (task, name, signal_id), if it was recorded.
pub async fn find_signal(
    tx: &mut PgConnection,
    task: TaskId,
    name: &str,
    signal_id: &str,
) -> Result<Option<SignalRow>> {
    Ok(sqlx::query(
        "SELECT g.received_at, (SELECT s.name FROM steps s WHERE s.id = g.consumed_by) AS step
         FROM signals g WHERE g.task_id = $1 AND g.name = $2 AND g.signal_id = $3",
    )
    .bind(task.0)
    .bind(name)
    .bind(signal_id)
    .fetch_optional(&mut *tx)
    .await?
    .map(|r| SignalRow {
        received_at: r.get("received_at"),
        consumed_by: r.get("step"),
    }))
}

/// Whether a step of the task waits for signals `name` (its template has such a `wait_for`).
pub async fn waited_for(tx: &mut PgConnection, task: TaskId, name: &str) -> Result<bool> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM steps WHERE task_id = $1 AND wait->'signal'->>'name' = $2)",
    )
    .bind(task.0)
    .bind(name)
    .fetch_one(&mut *tx)
    .await?)
}

/// Records a signal (the task locked); returns when it was received.
pub async fn record_signal(
    tx: &mut PgConnection,
    task: TaskId,
    name: &str,
    signal_id: &str,
    payload: &Value,
) -> Result<DateTime<Utc>> {
    Ok(sqlx::query_scalar(
        "INSERT INTO signals (task_id, name, signal_id, payload) VALUES ($1, $2, $3, $4)
         RETURNING received_at",
    )
    .bind(task.0)
    .bind(name)
    .bind(signal_id)
    .bind(payload)
    .fetch_one(&mut *tx)
    .await?)
}

/// The first (by position) step of the task waiting for signal `name` that has not taken one
/// for its current attempt: its id and attempt.
pub async fn waiting_for_signal(
    tx: &mut PgConnection,
    task: TaskId,
    name: &str,
) -> Result<Option<(Uuid, i32)>> {
    Ok(sqlx::query(
        "SELECT s.id, s.attempt FROM steps s
         WHERE s.task_id = $1 AND s.state = 'delegated' AND s.wait->'signal'->>'name' = $2
           AND NOT EXISTS (SELECT 1 FROM signals g WHERE g.consumed_by = s.id
                           AND g.consumed_attempt = s.attempt)
         ORDER BY s.position, s.id LIMIT 1",
    )
    .bind(task.0)
    .bind(name)
    .fetch_optional(&mut *tx)
    .await?
    .map(|r| (r.get("id"), r.get("attempt"))))
}

/// Pending tasks whose start time came (a few per round).
pub async fn due_starts(db: impl PgExecutor<'_>, limit: i64) -> Result<Vec<Uuid>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM tasks WHERE state = 'pending' AND start_at <= now()
         ORDER BY start_at LIMIT $1",
    )
    .bind(limit)
    .fetch_all(db)
    .await?)
}

/// Starts a pending task whose time came (locks it; `SKIP LOCKED`): it runs. Returns its
/// namespace, template and start time, or `None` when it is not (or no longer) due.
pub async fn start_task(
    tx: &mut PgConnection,
    id: Uuid,
) -> Result<Option<(String, String, DateTime<Utc>)>> {
    let locked: Option<Uuid> = sqlx::query_scalar(
        "SELECT id FROM tasks WHERE id = $1 AND state = 'pending' AND start_at <= now()
         FOR UPDATE SKIP LOCKED",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    if locked.is_none() {
        return Ok(None);
    }
    let row = sqlx::query(
        "UPDATE tasks SET state = 'running', updated_at = now() WHERE id = $1
         RETURNING namespace, template_name, now() AS at",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    Ok(Some((
        row.get("namespace"),
        row.get("template_name"),
        row.get("at"),
    )))
}

/// Live tasks past their deadline with no cancel requested yet: id and deadline (ms).
pub async fn due_deadlines(db: impl PgExecutor<'_>, limit: i64) -> Result<Vec<(Uuid, i64)>> {
    let rows = sqlx::query(
        "SELECT id, deadline_ms FROM tasks
         WHERE state IN ('pending', 'running') AND deadline_at IS NOT NULL
           AND NOT cancel_requested AND deadline_at <= now()
         ORDER BY deadline_at LIMIT $1",
    )
    .bind(limit)
    .fetch_all(db)
    .await?;
    Ok(rows
        .iter()
        .map(|r| {
            (
                r.get("id"),
                r.get::<Option<i64>, _>("deadline_ms").unwrap_or(0),
            )
        })
        .collect())
}

/// Milliseconds until the next timed step wakes, pending task starts or deadline passes.
pub async fn next_due_in_ms(db: impl PgExecutor<'_>) -> Result<Option<i64>> {
    let ms: Option<i64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM (least(
                    (SELECT min(wake_at) FROM steps WHERE state = 'delegated' AND wake_at IS NOT NULL),
                    (SELECT min(start_at) FROM tasks WHERE state = 'pending'),
                    (SELECT min(deadline_at) FROM tasks WHERE state IN ('pending', 'running')
                       AND deadline_at IS NOT NULL AND NOT cancel_requested)) - now())) * 1000)::bigint",
    )
    .fetch_one(db)
    .await?;
    Ok(ms.map(|ms| ms.max(0)))
}
