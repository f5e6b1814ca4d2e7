//! Tasks: creation (with idempotency), the writes of cancel and retry, and the task history.

use super::Result;
use crate::transition::Move;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, Row};
use std::collections::HashMap;
use tasker_schemas::topology::step_routing_key;
use tasker_schemas::{Join, RequestId, StepState, TaskId, TaskState, Template};
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
    /// A child workflow's task: the step that runs it.
    pub parent: Option<ParentLink>,
    /// The submit request's W3C `traceparent` (validated): the task's trace continues it.
    pub trace_parent: Option<&'a str>,
    /// Delayed start ([`crate::transition::start_at`]): the task is created `pending`, every
    /// step `waiting`, and starts at this time.
    pub start_at: Option<chrono::DateTime<chrono::Utc>>,
    /// [`crate::transition::deadline_ms`]: cancelled when still live this long after its start.
    pub deadline_ms: Option<u64>,
    /// The delayed start as the client asked for it (`run_at` or `delay`), for the idempotency
    /// digest: a repeat of `delay: 10m` is the same request, though its start time differs.
    pub start_request: Option<String>,
}

/// The step a child workflow's task runs for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParentLink {
    pub task_id: Uuid,
    pub step_id: Uuid,
    /// The child's depth (its parent's plus one).
    pub depth: i32,
}

/// Result of [`create`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateOutcome {
    Created(Created),
    /// Something unique already exists with a different request: the same idempotency key (when
    /// one was given) or the same task id; `task_id` is the existing task.
    Conflict {
        task_id: TaskId,
    },
}

/// A created task, or the existing one for an idempotent repeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub task_id: TaskId,
    /// False when an idempotent repeat returned the existing task.
    pub created: bool,
    /// Queues (`{namespace}.{queue}` keys) that got admissible (root) steps.
    pub queues: Vec<String>,
    /// Root steps that run a child workflow or wait (sleep, wait_for): delegated, still to
    /// start.
    pub delegated: Vec<Uuid>,
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
        // Fields added later count only when given, so earlier requests keep their digest.
        let mut body = body;
        if let Some(asked) = &self.start_request {
            body["start"] = json!(asked);
        }
        if let Some(ms) = self.deadline_ms {
            body["deadline_ms"] = json!(ms);
        }
        hex::encode(Sha256::digest(body.to_string().as_bytes()))
    }
}

/// Creates the task and all its steps in the caller's transaction, the root steps ready
/// (`queued`), the others `waiting`. Idempotency is decided by the database: concurrent
/// duplicates meet in a unique index.
pub async fn create(tx: &mut PgConnection, new: &NewTask<'_>) -> Result<CreateOutcome> {
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
    let mut delegated = Vec::new();
    for (position, step) in template.steps.iter().enumerate() {
        // A delayed task starts nothing yet: its roots wait for its start.
        let root = step.depends_on.is_empty() && new.start_at.is_none();
        let state = match (root, step.has_no_handler()) {
            (false, _) => StepState::Waiting,
            (true, true) => {
                delegated.push(ids[step.name.as_str()]);
                crate::transition::DELEGATE.to
            }
            (true, false) => {
                let key = step_routing_key(new.namespace, step.queue());
                if !queues.contains(&key) {
                    queues.push(key);
                }
                StepState::Queued
            }
        };
        rows.push(json!({
            "id": ids[step.name.as_str()],
            "name": step.name,
            "position": position,
            "handler": step.handler,
            "queue": step.queue(),
            "state": state,
            "max_attempts": step.retry.max_attempts,
            "retry_policy": step.retry,
            "queue_wait_timeout_ms": step.queue_wait_timeout.0,
            "execution_timeout_ms": step.execution_timeout.0,
            "pending_parents": step.depends_on.len(),
            "parent_ids": step.depends_on.iter().map(|d| ids[d.as_str()]).collect::<Vec<_>>(),
            "child_ids": children[step.name.as_str()].iter().map(|c| ids[c]).collect::<Vec<_>>(),
            "decides": (!step.decides.is_empty()).then_some(&step.decides),
            "join_any": step.join == Join::Any,
            "map_over": step.map.as_ref().map(|m| m.source().1),
            "map_max_parallel": step.map.as_ref().map(|m| m.max_parallel),
            "map_max_items": step.map.as_ref().map(|m| m.max_items),
            "map_tolerate": step.map.as_ref().map(|m| m.tolerate),
            "workflow": step.workflow.as_ref().map(|w| json!(w)),
            "wait": step.wait().map(|w| json!(w)),
        }));
    }
    // One statement: the task and all its steps (none if the task already exists).
    let inserted: Option<Uuid> = sqlx::query_scalar(
        "WITH task AS (
             INSERT INTO tasks (id, namespace, template_id, template_name, template_version, state,
                                priority, context, idempotency_key, request_id, request_hash,
                                unfinished_steps, on_failure, parent_task_id, parent_step_id,
                                depth, trace_parent, start_at, deadline_ms, deadline_at)
             VALUES ($1, $2, $3, $4, $5, $13, $6, $7, $8, $9, $10, $11, $15, $16, $17,
                     coalesce($18, 0), $19, $20, $21,
                     coalesce($20, now()) + $21 * interval '1 millisecond')
             ON CONFLICT DO NOTHING
             RETURNING id
         ), task_steps AS (
             INSERT INTO steps (id, task_id, namespace, name, position, handler, queue, state,
                                priority, max_attempts, retry_policy, queue_wait_timeout_ms,
                                execution_timeout_ms, pending_parents, parent_ids, child_ids, queued_at,
                                decides, join_any, map_over, map_max_parallel, map_max_items,
                                map_tolerate, workflow, wait)
             SELECT x.id, task.id, $2, x.name, x.position, x.handler, x.queue, x.state, $6,
                    x.max_attempts, x.retry_policy, x.queue_wait_timeout_ms, x.execution_timeout_ms,
                    x.pending_parents, x.parent_ids, x.child_ids,
                    CASE WHEN x.state = $14 THEN now() END,
                    x.decides, coalesce(x.join_any, false), x.map_over, x.map_max_parallel,
                    x.map_max_items, x.map_tolerate, x.workflow, x.wait
             FROM task, jsonb_to_recordset($12) AS x(id uuid, name text, position int, handler text,
                  queue text, state text, max_attempts int, retry_policy jsonb,
                  queue_wait_timeout_ms bigint, execution_timeout_ms bigint, pending_parents int,
                  parent_ids uuid[], child_ids uuid[], decides text[], join_any boolean,
                  map_over text[], map_max_parallel int, map_max_items int, map_tolerate int,
                  workflow jsonb, wait jsonb)
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
    .bind(if new.start_at.is_some() {
        TaskState::Pending
    } else {
        TaskState::Running
    })
    .bind(StepState::Queued)
    .bind(template.on_failure.as_ref().map(|h| json!(h)))
    .bind(new.parent.map(|p| p.task_id))
    .bind(new.parent.map(|p| p.step_id))
    .bind(new.parent.map(|p| p.depth))
    .bind(new.trace_parent)
    .bind(new.start_at)
    .bind(new.deadline_ms.map(|ms| ms.min(i64::MAX as u64) as i64))
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
            return Ok(CreateOutcome::Created(Created {
                task_id: existing,
                created: false,
                queues: Vec::new(),
                delegated: Vec::new(),
            }));
        }
        return Ok(CreateOutcome::Conflict { task_id: existing });
    }

    Ok(CreateOutcome::Created(Created {
        task_id,
        created: true,
        queues,
        delegated,
    }))
}

/// A locked task's state and whether a cancel was requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Locked {
    pub state: TaskState,
    pub cancel_requested: bool,
    /// Its context and outputs were erased (`tasker purge`).
    pub purged: bool,
}

/// Locks a task row and returns its state, or `None` when there is no such task.
pub async fn lock(tx: &mut PgConnection, id: TaskId) -> Result<Option<Locked>> {
    Ok(sqlx::query(
        "SELECT state, cancel_requested, purged_at IS NOT NULL AS purged
             FROM tasks WHERE id = $1 FOR UPDATE",
    )
    .bind(id.0)
    .fetch_optional(&mut *tx)
    .await?
    .map(|r| Locked {
        state: r.get("state"),
        cancel_requested: r.get("cancel_requested"),
        purged: r.get("purged"),
    }))
}

/// Records an event in the task's history with the next sequence number.
pub async fn record_event(
    tx: &mut PgConnection,
    id: TaskId,
    kind: &str,
    detail: Value,
) -> Result<i64> {
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

/// What [`cancel`] wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cancelled {
    /// Steps that moved to `cancelled`.
    pub steps: i32,
    /// Dispatched (unstarted) attempts cancelled, per queue: their slots to release.
    pub released: HashMap<String, i64>,
}

/// Writes a cancel decided by [`crate::transition::cancel_task`] (the task locked by [`lock`]):
/// the steps it halts move (with their dispatched, unstarted attempts recorded as `plan.outcome`
/// and their leases cleared), and the task records the request, its error and the event. The
/// caller releases the slots and finishes the task if nothing is left in flight.
pub async fn cancel(
    tx: &mut PgConnection,
    id: TaskId,
    plan: &crate::transition::CancelPlan,
    reason: Option<&str>,
) -> Result<Cancelled> {
    // "Not started" for a dispatched step: no worker reported `started` (the guard below).
    let rows = sqlx::query(
        "WITH target AS (
             SELECT id, state AS was, namespace || '.' || queue AS queue, attempt, task_id,
                    namespace, dispatched_at
             FROM steps
             WHERE task_id = $1
               AND (state = ANY($2)
                    OR ($4 AND state IS NOT DISTINCT FROM 'dispatched' AND started_at IS NULL)
                    OR ($7 AND state IS NOT DISTINCT FROM 'delegated' AND wait IS NOT NULL))
             FOR UPDATE
         ), moved AS (
             UPDATE steps s SET state = $3, next_attempt_at = NULL, lease_expires_at = NULL,
                                wake_at = NULL, updated_at = now()
             FROM target WHERE s.id = target.id
             RETURNING s.id
         ), history AS (
             INSERT INTO attempts (step_id, attempt, task_id, namespace, outcome, dispatched_at, error)
             SELECT id, attempt, task_id, namespace, $5, dispatched_at,
                    CASE WHEN was = 'dispatched' THEN $6 ELSE $8 END
             FROM target
             WHERE was = 'dispatched' OR (was = 'delegated' AND attempt > 0)
             ON CONFLICT (step_id, attempt) DO NOTHING
         )
         SELECT was = 'dispatched' AS dispatched, queue, count(*) AS n
         FROM target GROUP BY 1, 2",
    )
    .bind(id.0)
    .bind(plan.halt.from)
    .bind(plan.halt.to)
    .bind(plan.dispatched_unstarted)
    .bind(plan.outcome)
    .bind("cancelled before a worker reported it started")
    .bind(plan.halt.timed_waits)
    .bind("cancelled while it waited (sleep or wait_for)")
    .fetch_all(&mut *tx)
    .await?;
    let mut done = Cancelled::default();
    for r in rows {
        let n: i64 = r.get("n");
        done.steps += n as i32;
        if r.get::<bool, _>("dispatched") {
            *done.released.entry(r.get("queue")).or_default() += n;
        }
    }
    sqlx::query(
        "UPDATE tasks SET cancel_requested = true, unfinished_steps = unfinished_steps - $2,
                          error = coalesce(error, $3), updated_at = now()
         WHERE id = $1",
    )
    .bind(id.0)
    .bind(done.steps)
    .bind(&plan.error)
    .execute(&mut *tx)
    .await?;
    record_event(
        tx,
        id,
        "cancel_requested",
        json!({ "reason": reason, "steps_cancelled": done.steps }),
    )
    .await?;
    Ok(done)
}

/// Writes a retry decided by [`crate::transition::retry_task`] (the task locked by [`lock`]):
/// the steps it resets wait again with no failures, the ready ones are [`crate::transition::PARENTS_DONE`], and
/// the task runs again. Returns the queues to wake and the mapped steps that map again.
pub async fn retry(
    tx: &mut PgConnection,
    id: TaskId,
    previous: TaskState,
    reset: Move,
) -> Result<(Vec<String>, Vec<Uuid>)> {
    // A mapped step that had started maps again over its reset instances (never expanded
    // again); its instances wait for it to let them in.
    let keep: Vec<&str> = crate::transition::RETRY_KEEPS_SKIPPED
        .iter()
        .map(|c| c.as_str())
        .collect();
    // The failure handler ran for the failure being retried: it runs again if the task fails
    // again (its attempts stay in the task's history).
    sqlx::query("DELETE FROM steps WHERE task_id = $1 AND failure_handler")
        .bind(id.0)
        .execute(&mut *tx)
        .await?;
    let n = sqlx::query(
        "UPDATE steps SET state = CASE WHEN map_total IS NOT NULL THEN $5 ELSE $3 END,
                          failures = 0, error = NULL, output = NULL, skip_cause = NULL,
                          skip_reason = NULL, next_attempt_at = NULL, lease_expires_at = NULL,
                          updated_at = now()
         WHERE task_id = $1 AND state = ANY($2)
           AND (skip_cause IS NULL OR NOT (skip_cause = ANY($4)))",
    )
    .bind(id.0)
    .bind(reset.from)
    .bind(reset.to)
    .bind(&keep)
    .bind(crate::transition::DELEGATE.to)
    .execute(&mut *tx)
    .await?
    .rows_affected() as i32;
    let ready = super::reconcile::readmit_waiting(tx, id.0).await?;
    sqlx::query(
        "UPDATE tasks SET state = $3, failing = false, cancel_requested = false, error = NULL,
                          output = NULL, finished_at = NULL, unfinished_steps = $2, updated_at = now()
         WHERE id = $1",
    )
    .bind(id.0)
    .bind(n)
    .bind(TaskState::Running)
    .execute(&mut *tx)
    .await?;
    record_event(
        tx,
        id,
        "retried",
        json!({ "steps_reset": n, "previous_state": previous }),
    )
    .await?;
    Ok(ready)
}

/// Erases a finished task's payloads (context, output, its steps' outputs, mapped elements and
/// failure inputs) and stamps `purged_at`; states, errors, attempts and history stay. Only a
/// finished task is touched (the caller, holding the task lock, refused a live one); returns
/// whether it was.
pub async fn purge(tx: &mut PgConnection, id: TaskId) -> Result<bool> {
    let purged: bool = sqlx::query_scalar(
        "WITH t AS (
             UPDATE tasks SET context = '{}'::jsonb, output = NULL,
                              purged_at = coalesce(purged_at, now()), updated_at = now()
             WHERE id = $1 AND state IN ('completed', 'failed', 'cancelled')
             RETURNING id
         ), s AS (
             UPDATE steps SET output = NULL, map_item = NULL, failure = NULL
             WHERE task_id IN (SELECT id FROM t)
               AND (output IS NOT NULL OR map_item IS NOT NULL OR failure IS NOT NULL)
         )
         SELECT EXISTS (SELECT 1 FROM t)",
    )
    .bind(id.0)
    .fetch_one(&mut *tx)
    .await?;
    Ok(purged)
}
