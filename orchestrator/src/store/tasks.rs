//! Tasks: creation (with idempotency) and reads.

use super::rfc3339;
use crate::error::{Error, Result};
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgExecutor, Row};
use std::collections::HashMap;
use tasker_schemas::api::{AttemptView, StepView, TaskList, TaskView};
use tasker_schemas::{RequestId, StepId, TaskId, Template};
use uuid::Uuid;

/// A validated request to create a task.
#[derive(Debug, Clone)]
pub struct NewTask<'a> {
    pub namespace: &'a str,
    pub template_id: Uuid,
    pub template: &'a Template,
    /// The version the client asked for (`None` = newest); part of the idempotency hash.
    pub requested_version: Option<u32>,
    pub context: &'a Value,
    pub idempotency_key: Option<&'a str>,
    pub request_id: Option<RequestId>,
    pub priority: i16,
    pub task_id: Option<TaskId>,
}

/// Result of [`create`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub task_id: TaskId,
    /// False when an idempotent repeat returned the existing task.
    pub created: bool,
    /// Queues that got admissible (root) steps.
    pub queues: Vec<String>,
}

impl NewTask<'_> {
    /// Digest of what the client asked for: equal digests mean "the same request".
    fn request_hash(&self) -> String {
        let body = json!({
            "namespace": self.namespace,
            "template": self.template.name,
            "version": self.requested_version,
            "context": self.context,
            "priority": self.priority,
            "task_id": self.task_id,
        });
        hex::encode(Sha256::digest(body.to_string().as_bytes()))
    }
}

/// Creates the task and all its steps in the caller's transaction, admitting the root steps.
/// Idempotency is decided by the database: concurrent duplicates meet in a unique index.
pub async fn create(tx: &mut PgConnection, new: &NewTask<'_>) -> Result<Created> {
    let hash = new.request_hash();
    let task_id = new.task_id.unwrap_or_default();
    let template = new.template;
    // Step ids first, so edges can be written as id arrays.
    let ids: HashMap<&str, Uuid> = template
        .steps
        .iter()
        .map(|s| (s.name.as_str(), Uuid::now_v7()))
        .collect();
    let children = template.children();
    let mut rows = Vec::with_capacity(template.steps.len());
    let mut queues = Vec::new();
    for (position, step) in template.steps.iter().enumerate() {
        let root = step.depends_on.is_empty();
        if root && !queues.iter().any(|q| q == step.queue()) {
            queues.push(step.queue().to_owned());
        }
        rows.push(json!({
            "id": ids[step.name.as_str()],
            "name": step.name,
            "position": position,
            "handler": step.handler,
            "queue": step.queue(),
            "state": if root { "queued" } else { "waiting" },
            "max_attempts": step.retry.max_attempts,
            "retry_policy": step.retry,
            "queue_wait_timeout_ms": step.queue_wait_timeout.0,
            "execution_timeout_ms": step.execution_timeout.0,
            "pending_parents": step.depends_on.len(),
            "parent_ids": step.depends_on.iter().map(|d| ids[d.as_str()]).collect::<Vec<_>>(),
            "child_ids": children[step.name.as_str()].iter().map(|c| ids[c]).collect::<Vec<_>>(),
        }));
    }
    // One statement: the task and all its steps (none if the task already exists).
    let inserted: Option<Uuid> = sqlx::query_scalar(
        "WITH task AS (
             INSERT INTO tasks (id, namespace, template_id, template_name, template_version, state,
                                priority, context, idempotency_key, request_id, request_hash,
                                unfinished_steps)
             VALUES ($1, $2, $3, $4, $5, 'running', $6, $7, $8, $9, $10, $11)
             ON CONFLICT DO NOTHING
             RETURNING id
         ), task_steps AS (
             INSERT INTO steps (id, task_id, namespace, name, position, handler, queue, state,
                                priority, max_attempts, retry_policy, queue_wait_timeout_ms,
                                execution_timeout_ms, pending_parents, parent_ids, child_ids, queued_at)
             SELECT x.id, task.id, $2, x.name, x.position, x.handler, x.queue, x.state, $6,
                    x.max_attempts, x.retry_policy, x.queue_wait_timeout_ms, x.execution_timeout_ms,
                    x.pending_parents, x.parent_ids, x.child_ids,
                    CASE WHEN x.state = 'queued' THEN now() END
             FROM task, jsonb_to_recordset($12) AS x(id uuid, name text, position int, handler text,
                  queue text, state text, max_attempts int, retry_policy jsonb,
                  queue_wait_timeout_ms bigint, execution_timeout_ms bigint, pending_parents int,
                  parent_ids uuid[], child_ids uuid[])
         )
         SELECT id FROM task",
    )
    .bind(task_id.0)
    .bind(new.namespace)
    .bind(new.template_id)
    .bind(&template.name)
    .bind(template.version as i32)
    .bind(new.priority)
    .bind(new.context)
    .bind(new.idempotency_key)
    .bind(new.request_id.map(|r| r.0))
    .bind(&hash)
    .bind(template.steps.len() as i32)
    .bind(Value::Array(rows))
    .fetch_optional(&mut *tx)
    .await?;

    if inserted.is_none() {
        // Something unique already exists: the same key, the same request id, or the same task id.
        let row = sqlx::query(
            "SELECT id, request_hash FROM tasks
             WHERE (namespace = $1 AND idempotency_key = $2)
                OR (namespace = $1 AND request_id = $3)
                OR id = $4
             ORDER BY (idempotency_key = $2) DESC NULLS LAST LIMIT 1",
        )
        .bind(new.namespace)
        .bind(new.idempotency_key)
        .bind(new.request_id.map(|r| r.0))
        .bind(task_id.0)
        .fetch_one(&mut *tx)
        .await?;
        let existing = TaskId(row.get("id"));
        let existing_hash: String = row.get("request_hash");
        if existing_hash == hash {
            return Ok(Created {
                task_id: existing,
                created: false,
                queues: Vec::new(),
            });
        }
        return Err(match new.idempotency_key {
            Some(key) => Error::IdempotencyConflict {
                key: key.to_owned(),
                task_id: existing,
            },
            None => Error::TaskIdConflict(existing),
        });
    }

    Ok(Created {
        task_id,
        created: true,
        queues,
    })
}

#[derive(sqlx::FromRow)]
struct TaskRow {
    id: Uuid,
    namespace: String,
    template_name: String,
    template_version: i32,
    state: String,
    priority: i16,
    context: Value,
    output: Option<Value>,
    error: Option<String>,
    idempotency_key: Option<String>,
    created_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
}

impl TaskRow {
    fn into_view(self, steps: Vec<StepView>) -> TaskView {
        TaskView {
            id: TaskId(self.id),
            namespace: self.namespace,
            template: self.template_name,
            template_version: self.template_version as u32,
            state: self.state,
            priority: self.priority,
            context: self.context,
            output: self.output,
            error: self.error,
            idempotency_key: self.idempotency_key,
            created_at: rfc3339(self.created_at),
            finished_at: self.finished_at.map(rfc3339),
            steps,
            events: Vec::new(),
        }
    }
}

/// The state of a task, or `None` if there is no such task.
pub async fn state(db: impl PgExecutor<'_>, id: TaskId) -> Result<Option<String>> {
    Ok(sqlx::query_scalar("SELECT state FROM tasks WHERE id = $1")
        .bind(id.0)
        .fetch_optional(db)
        .await?)
}

#[derive(sqlx::FromRow)]
struct StepRow {
    id: Uuid,
    name: String,
    handler: String,
    queue: String,
    state: String,
    attempt: i32,
    failures: i32,
    max_attempts: i32,
    parent_ids: Vec<Uuid>,
    output: Option<Value>,
    error: Option<String>,
    pending_parents: i32,
    queued_at: Option<DateTime<Utc>>,
    dispatched_at: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    worker: Option<String>,
    lease_expires_at: Option<DateTime<Utc>>,
    next_attempt_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct AttemptRow {
    step_id: Uuid,
    attempt: i32,
    outcome: String,
    dispatched_at: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    finished_at: DateTime<Utc>,
    worker: Option<String>,
    error: Option<String>,
}

/// A task with its steps and every attempt.
pub async fn view(db: &sqlx::PgPool, id: TaskId) -> Result<TaskView> {
    let task: TaskRow = sqlx::query_as(
        "SELECT id, namespace, template_name, template_version, state, priority, context,
                output, error, idempotency_key, created_at, finished_at
         FROM tasks WHERE id = $1",
    )
    .bind(id.0)
    .fetch_optional(db)
    .await?
    .ok_or(Error::TaskNotFound(id))?;
    let steps: Vec<StepRow> = sqlx::query_as(
        "SELECT id, name, handler, queue, state, attempt, failures, max_attempts, parent_ids, output,
                error, pending_parents, queued_at, dispatched_at, started_at, worker,
                lease_expires_at, next_attempt_at
         FROM steps WHERE task_id = $1 ORDER BY position",
    )
    .bind(id.0)
    .fetch_all(db)
    .await?;
    let attempts: Vec<AttemptRow> = sqlx::query_as(
        "SELECT step_id, attempt, outcome, dispatched_at, started_at, finished_at, worker, error
         FROM attempts WHERE task_id = $1 ORDER BY step_id, attempt",
    )
    .bind(id.0)
    .fetch_all(db)
    .await?;
    let names: HashMap<Uuid, &str> = steps.iter().map(|s| (s.id, s.name.as_str())).collect();
    let mut by_step: HashMap<Uuid, Vec<AttemptView>> = HashMap::new();
    for a in attempts {
        by_step.entry(a.step_id).or_default().push(AttemptView {
            attempt: a.attempt as u32,
            outcome: a.outcome,
            dispatched_at: a.dispatched_at.map(rfc3339).unwrap_or_default(),
            started_at: a.started_at.map(rfc3339),
            finished_at: Some(rfc3339(a.finished_at)),
            worker: a.worker,
            error: a.error,
        });
    }
    let step_views = steps
        .iter()
        .map(|s| {
            let mut attempts = by_step.remove(&s.id).unwrap_or_default();
            if s.state == "dispatched" {
                // The attempt in flight has no row yet: attempts are written when they finish.
                attempts.push(AttemptView {
                    attempt: s.attempt as u32,
                    outcome: if s.started_at.is_some() {
                        "started"
                    } else {
                        "dispatched"
                    }
                    .into(),
                    dispatched_at: s.dispatched_at.map(rfc3339).unwrap_or_default(),
                    started_at: s.started_at.map(rfc3339),
                    finished_at: None,
                    worker: s.worker.clone(),
                    error: None,
                });
            }
            let depends_on: Vec<String> = s
                .parent_ids
                .iter()
                .filter_map(|p| names.get(p))
                .map(|n| n.to_string())
                .collect();
            StepView {
                id: StepId(s.id),
                name: s.name.clone(),
                handler: s.handler.clone(),
                queue: s.queue.clone(),
                state: s.state.clone(),
                attempt: s.attempt as u32,
                failures: s.failures as u32,
                max_attempts: s.max_attempts as u32,
                waiting_reason: waiting_reason(s, &steps, &names),
                depends_on,
                output: s.output.clone(),
                error: s.error.clone(),
                next_attempt_at: s.next_attempt_at.map(rfc3339),
                lease_expires_at: s.lease_expires_at.map(rfc3339),
                attempts,
            }
        })
        .collect();
    let mut view = task.into_view(step_views);
    view.events = events(db, id).await?;
    Ok(view)
}

/// "Why is this step not running?" in words, for every non-terminal state.
fn waiting_reason(s: &StepRow, steps: &[StepRow], names: &HashMap<Uuid, &str>) -> Option<String> {
    match s.state.as_str() {
        "waiting" => {
            let open: Vec<&str> = steps
                .iter()
                .filter(|p| s.parent_ids.contains(&p.id) && p.state != "succeeded")
                .filter_map(|p| names.get(&p.id).copied())
                .collect();
            Some(format!(
                "waiting on {} unfinished parent(s): {}",
                s.pending_parents,
                open.join(", ")
            ))
        }
        "queued" => Some(format!(
            "queued for queue {:?} since {} (in-flight limit reached or dispatch pending)",
            s.queue,
            s.queued_at.map(rfc3339).unwrap_or_default()
        )),
        "dispatched" => Some(match (&s.started_at, &s.worker) {
            (Some(at), worker) => format!(
                "attempt {} running on {} since {}, leased until {}",
                s.attempt,
                worker.as_deref().unwrap_or("a worker"),
                rfc3339(*at),
                s.lease_expires_at.map(rfc3339).unwrap_or_default()
            ),
            _ => format!(
                "attempt {} published to queue {:?} at {}, waiting for a worker; lease expires {}",
                s.attempt,
                s.queue,
                s.dispatched_at.map(rfc3339).unwrap_or_default(),
                s.lease_expires_at.map(rfc3339).unwrap_or_default()
            ),
        }),
        "retrying" => Some(format!(
            "backing off after attempt {} until {}",
            s.attempt,
            s.next_attempt_at.map(rfc3339).unwrap_or_default()
        )),
        _ => None,
    }
}

/// Filters for [`list`].
#[derive(Debug, Default, Clone)]
pub struct ListFilter {
    pub namespace: Option<String>,
    pub state: Option<String>,
    pub template: Option<String>,
    /// Page after this id (ids are time-ordered, newest first).
    pub after: Option<TaskId>,
    pub limit: i64,
}

/// Tasks newest first, keyset-paginated.
pub async fn list(db: impl PgExecutor<'_>, f: &ListFilter) -> Result<TaskList> {
    let limit = f.limit.clamp(1, 1000);
    let rows: Vec<TaskRow> = sqlx::query_as(
        "SELECT id, namespace, template_name, template_version, state, priority, context,
                output, error, idempotency_key, created_at, finished_at
         FROM tasks
         WHERE ($1::text IS NULL OR namespace = $1)
           AND ($2::text IS NULL OR state = $2)
           AND ($3::text IS NULL OR template_name = $3)
           AND ($4::uuid IS NULL OR id < $4)
         ORDER BY id DESC LIMIT $5",
    )
    .bind(&f.namespace)
    .bind(&f.state)
    .bind(&f.template)
    .bind(f.after.map(|a| a.0))
    .bind(limit + 1)
    .fetch_all(db)
    .await?;
    let more = rows.len() as i64 > limit;
    let tasks: Vec<TaskView> = rows
        .into_iter()
        .take(limit as usize)
        .map(|r| r.into_view(Vec::new()))
        .collect();
    let next = if more {
        tasks.last().map(|t| t.id)
    } else {
        None
    };
    Ok(TaskList { tasks, next })
}

/// Locks a task row and returns its state, or `TaskNotFound`.
async fn lock(tx: &mut PgConnection, id: TaskId) -> Result<String> {
    sqlx::query_scalar("SELECT state FROM tasks WHERE id = $1 FOR UPDATE")
        .bind(id.0)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or(Error::TaskNotFound(id))
}

/// Records an operator action in the task's history with the next sequence number.
async fn record_event(tx: &mut PgConnection, id: TaskId, kind: &str, detail: Value) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "WITH t AS (UPDATE tasks SET event_seq = event_seq + 1 WHERE id = $1 RETURNING id, event_seq, namespace)
         INSERT INTO task_events (task_id, seq, namespace, kind, detail)
         SELECT id, event_seq, namespace, $2, $3 FROM t
         RETURNING seq",
    )
    .bind(id.0)
    .bind(kind)
    .bind(detail)
    .fetch_one(&mut *tx)
    .await?)
}

/// Cancels a live task: nothing new is admitted, unstarted steps become `cancelled`; steps
/// already dispatched may still report (recorded, advancing nothing). Finishes the task at once
/// when nothing is in flight.
pub async fn cancel(
    tx: &mut PgConnection,
    id: TaskId,
    reason: Option<&str>,
) -> Result<Vec<super::steps::FinishedTask>> {
    let state = lock(tx, id).await?;
    if !matches!(state.as_str(), "pending" | "running") {
        return Err(Error::InvalidState {
            task_id: id,
            state,
            action: "cancel",
        });
    }
    let n = sqlx::query(
        "UPDATE steps SET state = 'cancelled', next_attempt_at = NULL, updated_at = now()
         WHERE task_id = $1 AND state IN ('waiting', 'queued', 'retrying')",
    )
    .bind(id.0)
    .execute(&mut *tx)
    .await?
    .rows_affected() as i32;
    sqlx::query(
        "UPDATE tasks SET cancel_requested = true, unfinished_steps = unfinished_steps - $2,
                          error = coalesce(error, $3), updated_at = now()
         WHERE id = $1",
    )
    .bind(id.0)
    .bind(n)
    .bind(format!("cancelled: {}", reason.unwrap_or("by request")))
    .execute(&mut *tx)
    .await?;
    record_event(
        tx,
        id,
        "cancel_requested",
        json!({ "reason": reason, "steps_cancelled": n }),
    )
    .await?;
    super::steps::finalize(tx, &[id.0]).await
}

/// Retries a failed or cancelled task: failed, skipped and cancelled steps run again with new,
/// higher attempt numbers; succeeded steps keep their outputs. Returns the queues to wake.
pub async fn retry(tx: &mut PgConnection, id: TaskId) -> Result<Vec<String>> {
    let state = lock(tx, id).await?;
    if !matches!(state.as_str(), "failed" | "cancelled") {
        return Err(Error::InvalidState {
            task_id: id,
            state,
            action: "retry",
        });
    }
    let n = sqlx::query(
        "UPDATE steps SET state = 'waiting', failures = 0, error = NULL, output = NULL,
                          next_attempt_at = NULL, lease_expires_at = NULL, updated_at = now()
         WHERE task_id = $1 AND state IN ('failed', 'skipped', 'cancelled')",
    )
    .bind(id.0)
    .execute(&mut *tx)
    .await?
    .rows_affected() as i32;
    let queues = super::steps::readmit_waiting(tx, id.0).await?;
    sqlx::query(
        "UPDATE tasks SET state = 'running', failing = false, cancel_requested = false, error = NULL,
                          output = NULL, finished_at = NULL, unfinished_steps = $2, updated_at = now()
         WHERE id = $1",
    )
    .bind(id.0)
    .bind(n)
    .execute(&mut *tx)
    .await?;
    record_event(
        tx,
        id,
        "retried",
        json!({ "steps_reset": n, "previous_state": state }),
    )
    .await?;
    Ok(queues)
}

/// A task's recorded history.
pub async fn events(
    db: impl PgExecutor<'_>,
    id: TaskId,
) -> Result<Vec<tasker_schemas::api::TaskEventView>> {
    let rows = sqlx::query(
        "SELECT seq, kind, detail, at FROM task_events WHERE task_id = $1 ORDER BY seq",
    )
    .bind(id.0)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| tasker_schemas::api::TaskEventView {
            seq: r.get::<i64, _>("seq") as u64,
            kind: r.get("kind"),
            detail: r.get("detail"),
            at: rfc3339(r.get("at")),
        })
        .collect())
}

/// Deletes up to `limit` tasks that finished more than `retention_hours` ago, with their steps,
/// attempts and history. Safe on several replicas (`SKIP LOCKED`). Returns how many went.
pub async fn prune(db: impl PgExecutor<'_>, retention_hours: i64, limit: i64) -> Result<u64> {
    let gone: i64 = sqlx::query_scalar(
        "WITH old AS (
             SELECT id FROM tasks
             WHERE finished_at < now() - $1 * interval '1 hour'
               AND state IN ('completed', 'failed', 'cancelled')
             ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED
         ), gone AS (
             DELETE FROM tasks t USING old WHERE t.id = old.id RETURNING t.id
         ), history AS (
             DELETE FROM attempts a USING gone WHERE a.task_id = gone.id
         ), task_steps AS (
             DELETE FROM steps s USING gone WHERE s.task_id = gone.id
         )
         SELECT count(*) FROM gone",
    )
    .bind(retention_hours)
    .bind(limit)
    .fetch_one(db)
    .await?;
    Ok(gone as u64)
}
