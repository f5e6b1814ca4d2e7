//! Operator actions' reads and writes: a task's steps as [`crate::transition::plan_step_action`]
//! sees them, the write of its plan, and the task selection of bulk actions. Every write runs in
//! the caller's transaction, under the task's lock.

use super::Result;
use crate::transition::{DELEGATE, OpStep, SkipCause, StepActionPlan};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor, Row};
use tasker_schemas::{StepState, TaskId, TaskState};
use uuid::Uuid;

/// A task locked for an operator action.
#[derive(Debug, Clone)]
pub struct OpTask {
    pub state: TaskState,
    pub namespace: String,
    pub failing: bool,
    pub cancel_requested: bool,
}

/// Locks a task row; `None` when there is no such task.
pub async fn lock_task(tx: &mut PgConnection, id: TaskId) -> Result<Option<OpTask>> {
    Ok(sqlx::query(
        "SELECT state, namespace, failing, cancel_requested FROM tasks WHERE id = $1 FOR UPDATE",
    )
    .bind(id.0)
    .fetch_optional(&mut *tx)
    .await?
    .map(|r| OpTask {
        state: r.get("state"),
        namespace: r.get("namespace"),
        failing: r.get("failing"),
        cancel_requested: r.get("cancel_requested"),
    }))
}

fn skip_cause(text: Option<String>) -> Option<SkipCause> {
    match text.as_deref() {
        Some("not_chosen") => Some(SkipCause::NotChosen),
        Some("parent_skipped") => Some(SkipCause::ParentSkipped),
        Some("halted") => Some(SkipCause::Halted),
        _ => None,
    }
}

/// A task's steps (mapped steps' instances apart).
pub async fn read_steps(tx: &mut PgConnection, id: TaskId) -> Result<Vec<OpStep>> {
    let rows = sqlx::query(
        "SELECT id, name, state, skip_cause, child_ids, map_over IS NOT NULL AS mapped,
                decides IS NOT NULL AS decision, failure_handler
         FROM steps WHERE task_id = $1 AND map_of IS NULL ORDER BY position, id",
    )
    .bind(id.0)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| OpStep {
            id: r.get("id"),
            name: r.get("name"),
            state: r.get("state"),
            skip_cause: skip_cause(r.get("skip_cause")),
            child_ids: r.get("child_ids"),
            mapped: r.get("mapped"),
            decision: r.get("decision"),
            failure_handler: r.get("failure_handler"),
        })
        .collect())
}

/// What [`write_plan`] did.
#[derive(Debug, Default)]
pub struct Written {
    /// Queues that got ready steps.
    pub queues: Vec<String>,
    /// Steps delegated (mapped steps to expand, child workflows to start).
    pub started: Vec<Uuid>,
    /// Steps that wait again (both kinds).
    pub reset: i32,
}

/// Writes a [`StepActionPlan`]: the `on_failure` handler's step is dropped (it runs again if
/// the task fails again), the plan's steps wait again (`fresh` ones from scratch: instances
/// deleted, child task forgotten), the step to succeed succeeds with `output`, waiting steps
/// are recounted and the ready ones admitted, and the task runs again (not failing, no cancel,
/// no error or output) with its unfinished steps recounted.
pub async fn write_plan(
    tx: &mut PgConnection,
    id: TaskId,
    plan: &StepActionPlan,
    output: Option<&Value>,
) -> Result<Written> {
    sqlx::query("DELETE FROM steps WHERE task_id = $1 AND failure_handler")
        .bind(id.0)
        .execute(&mut *tx)
        .await?;
    let mut reset = 0;
    if !plan.fresh.is_empty() {
        // Instances of mapped steps that run from scratch, and their attempts.
        sqlx::query(
            "WITH gone AS (DELETE FROM steps WHERE task_id = $1 AND map_of = ANY($2) RETURNING id)
             DELETE FROM attempts WHERE step_id IN (SELECT id FROM gone)",
        )
        .bind(id.0)
        .bind(&plan.fresh)
        .execute(&mut *tx)
        .await?;
        reset += sqlx::query(
            "UPDATE steps SET state = $3, failures = 0, error = NULL, output = NULL,
                              skip_cause = NULL, skip_reason = NULL, next_attempt_at = NULL,
                              lease_expires_at = NULL, child_task_id = NULL,
                              map_total = NULL, map_created = 0, map_live = 0, map_waiting = 0,
                              map_done = 0, map_failed = 0, updated_at = now()
             WHERE task_id = $1 AND id = ANY($2)",
        )
        .bind(id.0)
        .bind(&plan.fresh)
        .bind(StepState::Waiting)
        .execute(&mut *tx)
        .await?
        .rows_affected() as i32;
    }
    if !plan.again.is_empty() {
        // As a task retry: instances of these mapped steps that did not succeed wait to be let
        // in again; a mapped step that had expanded maps again, others wait.
        sqlx::query(
            "UPDATE steps SET state = $3, failures = 0, error = NULL, output = NULL,
                              skip_cause = NULL, skip_reason = NULL, next_attempt_at = NULL,
                              lease_expires_at = NULL, updated_at = now()
             WHERE task_id = $1 AND map_of = ANY($2) AND state = ANY($4)",
        )
        .bind(id.0)
        .bind(&plan.again)
        .bind(StepState::Waiting)
        .bind(StepState::RETRYABLE)
        .execute(&mut *tx)
        .await?;
        reset += sqlx::query(
            "UPDATE steps SET state = CASE WHEN map_total IS NOT NULL THEN $4 ELSE $3 END,
                              failures = 0, error = NULL, output = NULL, skip_cause = NULL,
                              skip_reason = NULL, next_attempt_at = NULL, lease_expires_at = NULL,
                              updated_at = now()
             WHERE task_id = $1 AND id = ANY($2)",
        )
        .bind(id.0)
        .bind(&plan.again)
        .bind(StepState::Waiting)
        .bind(DELEGATE.to)
        .execute(&mut *tx)
        .await?
        .rows_affected() as i32;
    }
    if let Some(step) = plan.succeed {
        sqlx::query(
            "UPDATE steps SET state = $3, output = $4, error = NULL, next_attempt_at = NULL,
                              lease_expires_at = NULL, updated_at = now()
             WHERE task_id = $1 AND id = $2",
        )
        .bind(id.0)
        .bind(step)
        .bind(StepState::Succeeded)
        .bind(output.cloned().unwrap_or(Value::Null))
        .execute(&mut *tx)
        .await?;
    }
    let (queues, started) = super::reconcile::readmit_waiting(tx, id.0).await?;
    sqlx::query(
        "UPDATE tasks SET state = $2, failing = false, cancel_requested = false, error = NULL,
                          output = NULL, finished_at = NULL, updated_at = now()
         WHERE id = $1",
    )
    .bind(id.0)
    .bind(TaskState::Running)
    .execute(&mut *tx)
    .await?;
    super::reconcile::recount_unfinished(tx, id.0).await?;
    Ok(Written {
        queues,
        started,
        reset,
    })
}

/// The task filter of a bulk action (the task list's filters).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BulkSelect {
    pub state: Option<TaskState>,
    pub namespace: Option<String>,
    pub template: Option<String>,
    /// Created at or after.
    pub created_after: Option<DateTime<Utc>>,
    /// Created before.
    pub created_before: Option<DateTime<Utc>>,
    /// Only these namespaces (the caller's scope); `None` = any.
    pub scope: Option<Vec<String>>,
}

/// The ids of the tasks `f` matches, oldest first, at most `limit`.
pub async fn select_tasks(
    db: impl PgExecutor<'_>,
    f: &BulkSelect,
    limit: i64,
) -> Result<Vec<TaskId>> {
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM tasks
         WHERE ($1::text IS NULL OR state = $1)
           AND ($2::text IS NULL OR namespace = $2)
           AND ($3::text IS NULL OR template_name = $3)
           AND ($4::timestamptz IS NULL OR created_at >= $4)
           AND ($5::timestamptz IS NULL OR created_at < $5)
           AND ($6::text[] IS NULL OR namespace = ANY($6))
         ORDER BY id LIMIT $7",
    )
    .bind(f.state)
    .bind(&f.namespace)
    .bind(&f.template)
    .bind(f.created_after)
    .bind(f.created_before)
    .bind(&f.scope)
    .bind(limit)
    .fetch_all(db)
    .await?;
    Ok(ids.into_iter().map(TaskId).collect())
}

/// How many tasks `f` matches, counted up to `limit`.
pub async fn count_tasks(db: impl PgExecutor<'_>, f: &BulkSelect, limit: i64) -> Result<u64> {
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM tasks
         WHERE ($1::text IS NULL OR state = $1)
           AND ($2::text IS NULL OR namespace = $2)
           AND ($3::text IS NULL OR template_name = $3)
           AND ($4::timestamptz IS NULL OR created_at >= $4)
           AND ($5::timestamptz IS NULL OR created_at < $5)
           AND ($6::text[] IS NULL OR namespace = ANY($6))
         LIMIT $7) AS matched",
    )
    .bind(f.state)
    .bind(&f.namespace)
    .bind(&f.template)
    .bind(f.created_after)
    .bind(f.created_before)
    .bind(&f.scope)
    .bind(limit)
    .fetch_one(db)
    .await?;
    Ok(n.max(0) as u64)
}

/// A task's state and its step `step`'s (mapped steps' instances apart; `None` when there is no
/// such step); `None` when there is no such task.
pub async fn step_state(
    db: impl PgExecutor<'_>,
    task: TaskId,
    step: &str,
) -> Result<Option<(TaskState, Option<StepState>)>> {
    Ok(sqlx::query_as(
        "SELECT t.state, (SELECT s.state FROM steps s
                          WHERE s.task_id = t.id AND s.name = $2 AND s.map_of IS NULL
                            AND NOT s.failure_handler)
         FROM tasks t WHERE t.id = $1",
    )
    .bind(task.0)
    .bind(step)
    .fetch_optional(db)
    .await?)
}
