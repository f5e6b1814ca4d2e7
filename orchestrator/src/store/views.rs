//! Rows read for the API: a task with its steps, attempts and history, and task lists. Plain
//! rows: the HTTP edge turns them into API bodies.

use super::Result;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgExecutor;
use tasker_schemas::{AttemptOutcome, StepState, TaskId, TaskState};
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TaskRow {
    pub id: Uuid,
    pub namespace: String,
    pub template_name: String,
    pub template_version: i32,
    pub state: TaskState,
    pub priority: i16,
    pub context: Value,
    pub output: Option<Value>,
    pub error: Option<String>,
    pub idempotency_key: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub parent_task_id: Option<Uuid>,
    pub parent_step: Option<String>,
    pub start_at: Option<DateTime<Utc>>,
    pub deadline_at: Option<DateTime<Utc>>,
    pub purged_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StepRow {
    pub id: Uuid,
    pub name: String,
    pub handler: String,
    pub queue: String,
    pub state: StepState,
    pub attempt: i32,
    pub failures: i32,
    pub max_attempts: i32,
    pub parent_ids: Vec<Uuid>,
    pub output: Option<Value>,
    pub error: Option<String>,
    pub pending_parents: i32,
    pub queued_at: Option<DateTime<Utc>>,
    pub dispatched_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub worker: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub skip_reason: Option<String>,
    /// A mapped step: its elements and instances counted by state (`None` otherwise).
    pub map_total: Option<i32>,
    pub map_counts: Option<Value>,
    pub child_task_id: Option<Uuid>,
    /// A timed step: what it waits for (`tasker_schemas::Wait`) and when it wakes.
    pub wait: Option<Value>,
    pub wake_at: Option<DateTime<Utc>>,
}

/// A finished attempt.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AttemptRow {
    pub step_id: Uuid,
    pub attempt: i32,
    pub outcome: AttemptOutcome,
    pub dispatched_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: DateTime<Utc>,
    pub worker: Option<String>,
    pub error: Option<String>,
    pub repeats: i32,
}

/// One entry of a task's history.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRow {
    pub seq: i64,
    pub kind: String,
    pub detail: Option<Value>,
    pub at: DateTime<Utc>,
}

/// A task with its steps (in template order), finished attempts and history.
#[derive(Debug, Clone)]
pub struct TaskDetail {
    pub task: TaskRow,
    pub steps: Vec<StepRow>,
    pub attempts: Vec<AttemptRow>,
    pub events: Vec<EventRow>,
    /// The handlers live workers run, per queue (the worker registry); `None` when no worker
    /// ever announced itself. Set by the service.
    pub live_handlers: Option<std::collections::HashMap<String, std::collections::HashSet<String>>>,
}

/// The state of a task, or `None` if there is no such task.
/// A task's namespace (it never changes), or `None` when there is no such task.
pub async fn namespace(db: impl PgExecutor<'_>, id: TaskId) -> Result<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT namespace FROM tasks WHERE id = $1")
            .bind(id.0)
            .fetch_optional(db)
            .await?,
    )
}

pub async fn state(db: impl PgExecutor<'_>, id: TaskId) -> Result<Option<TaskState>> {
    Ok(sqlx::query_scalar("SELECT state FROM tasks WHERE id = $1")
        .bind(id.0)
        .fetch_optional(db)
        .await?)
}

/// A task with everything about it, or `None` if there is no such task.
pub async fn detail(db: &sqlx::PgPool, id: TaskId) -> Result<Option<TaskDetail>> {
    let task: Option<TaskRow> = sqlx::query_as(
        "SELECT t.id, t.namespace, t.template_name, t.template_version, t.state, t.priority,
                t.context, t.output, t.error, t.idempotency_key, t.created_at, t.finished_at,
                t.parent_task_id, (SELECT p.name FROM steps p WHERE p.id = t.parent_step_id) AS parent_step,
                t.start_at, t.deadline_at, t.purged_at
         FROM tasks t WHERE t.id = $1",
    )
    .bind(id.0)
    .fetch_optional(db)
    .await?;
    let Some(task) = task else {
        return Ok(None);
    };
    let steps: Vec<StepRow> = sqlx::query_as(
        "SELECT s.id, s.name, s.handler, s.queue, s.state, s.attempt, s.failures, s.max_attempts,
                s.parent_ids, s.output, s.error, s.pending_parents, s.queued_at, s.dispatched_at,
                s.started_at, s.worker, s.lease_expires_at, s.next_attempt_at, s.skip_reason,
                s.map_total, s.child_task_id, s.wait, s.wake_at,
                CASE WHEN s.map_over IS NOT NULL THEN
                    (SELECT coalesce(jsonb_object_agg(c.state, c.n), '{}'::jsonb)
                     FROM (SELECT i.state, count(*) AS n FROM steps i WHERE i.map_of = s.id
                           GROUP BY i.state) c) END AS map_counts
         FROM steps s WHERE s.task_id = $1 AND s.map_of IS NULL ORDER BY s.position",
    )
    .bind(id.0)
    .fetch_all(db)
    .await?;
    let attempts: Vec<AttemptRow> = sqlx::query_as(
        "SELECT step_id, attempt, outcome, dispatched_at, started_at, finished_at, worker, error,
                repeats
         FROM attempts WHERE task_id = $1 ORDER BY step_id, attempt",
    )
    .bind(id.0)
    .fetch_all(db)
    .await?;
    let events = events(db, id).await?;
    Ok(Some(TaskDetail {
        task,
        steps,
        attempts,
        events,
        live_handlers: None,
    }))
}

/// A page of a mapped step's instances, in index order after `after`: the rows and whether
/// more follow. `None` when the task has no mapped step of that name.
pub async fn instances(
    db: &sqlx::PgPool,
    task: TaskId,
    step: &str,
    after: Option<i32>,
    limit: i64,
) -> Result<Option<(Vec<super::dynamic::InstanceRow>, bool)>> {
    let map: Option<Uuid> = sqlx::query_scalar(
        "SELECT id FROM steps WHERE task_id = $1 AND name = $2 AND map_of IS NULL
                                AND map_over IS NOT NULL",
    )
    .bind(task.0)
    .bind(step)
    .fetch_optional(db)
    .await?;
    let Some(map) = map else {
        return Ok(None);
    };
    let mut rows: Vec<super::dynamic::InstanceRow> = sqlx::query_as(
        "SELECT map_index, state, attempt, output, error FROM steps
         WHERE map_of = $1 AND map_index > $2 ORDER BY map_index LIMIT $3",
    )
    .bind(map)
    .bind(after.unwrap_or(-1))
    .bind(limit + 1)
    .fetch_all(db)
    .await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    Ok(Some((rows, more)))
}

/// A task's recorded history.
pub async fn events(db: impl PgExecutor<'_>, id: TaskId) -> Result<Vec<EventRow>> {
    Ok(sqlx::query_as(
        "SELECT seq, kind, detail, at FROM task_events WHERE task_id = $1 ORDER BY seq",
    )
    .bind(id.0)
    .fetch_all(db)
    .await?)
}

/// Filters for [`list`].
#[derive(Debug, Default, Clone)]
pub struct ListFilter {
    pub namespace: Option<String>,
    /// Only these namespaces (a namespace-scoped key's view); `None` = every namespace.
    pub scope: Option<Vec<String>>,
    pub state: Option<TaskState>,
    pub template: Option<String>,
    /// Page after this id (ids are time-ordered, newest first).
    pub after: Option<TaskId>,
    pub limit: i64,
}

/// A task as lists show it: no context, output, steps or history (they can be large).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TaskSummaryRow {
    pub id: Uuid,
    pub namespace: String,
    pub template_name: String,
    pub template_version: i32,
    pub state: TaskState,
    pub priority: i16,
    pub error: Option<String>,
    pub idempotency_key: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub parent_task_id: Option<Uuid>,
}

/// Most tasks in one page of [`list`].
pub const MAX_LIST_PAGE: i64 = tasker_schemas::api::MAX_TASK_PAGE as i64;

/// Tasks newest first, keyset-paginated: a page (at most [`MAX_LIST_PAGE`]) and whether more
/// follow.
pub async fn list(db: impl PgExecutor<'_>, f: &ListFilter) -> Result<(Vec<TaskSummaryRow>, bool)> {
    let limit = f.limit.clamp(1, MAX_LIST_PAGE);
    let mut rows: Vec<TaskSummaryRow> = sqlx::query_as(
        "SELECT id, namespace, template_name, template_version, state, priority, error,
                idempotency_key, created_at, finished_at, parent_task_id
         FROM tasks
         WHERE ($1::text IS NULL OR namespace = $1)
           AND ($2::text IS NULL OR state = $2)
           AND ($3::text IS NULL OR template_name = $3)
           AND ($4::uuid IS NULL OR id < $4)
           AND ($6::text[] IS NULL OR namespace = ANY($6))
         ORDER BY id DESC LIMIT $5",
    )
    .bind(&f.namespace)
    .bind(f.state)
    .bind(&f.template)
    .bind(f.after.map(|a| a.0))
    .bind(limit + 1)
    .bind(&f.scope)
    .fetch_all(db)
    .await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    Ok((rows, more))
}
