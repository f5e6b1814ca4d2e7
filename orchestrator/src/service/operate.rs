//! Operator actions (console, API, CLI): retry one failed step, rerun from a step, mark a failed
//! step succeeded, and bulk cancel / retry by filter. Each needs the `operate` role in the
//! task's namespace and is recorded in the audit log with who acted, in the action's own
//! transaction. The rules (which states allow which action, what happens to each step) are
//! [`transition::plan_step_action`] and [`transition::bulk_allowed`].

use super::{Result, ServiceError, Shared, events};
use crate::auth::{Principal, Role};
use crate::store::operate::{self as store, BulkSelect};
use crate::store::tasks::record_event;
use crate::transition::{self, StepAction, TaskNow};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::PgConnection;
use tasker_schemas::{TaskId, TaskState};

/// Most tasks one bulk action acts on ([`transition::MAX_BULK_TASKS`]).
pub const MAX_BULK_TASKS: u64 = transition::MAX_BULK_TASKS;

/// The task filter of a bulk action: the task list's filters (all optional; together they
/// must match at most [`MAX_BULK_TASKS`] tasks).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, Serialize)]
pub struct BulkFilter {
    pub state: Option<TaskState>,
    pub namespace: Option<String>,
    pub template: Option<String>,
    /// Tasks created at or after this time.
    pub created_after: Option<DateTime<Utc>>,
    /// Tasks created before this time.
    pub created_before: Option<DateTime<Utc>>,
}

/// What a bulk action did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BulkOutcome {
    /// Tasks the filter matched when the action ran (at most the confirmed count).
    pub matched: u64,
    /// Tasks acted on.
    pub acted: u64,
    /// Tasks matched whose state does not allow the action (e.g. a cancel of a finished task),
    /// or that went away meanwhile: left as they are.
    pub skipped: u64,
}

/// Which bulk action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BulkAction {
    Cancel,
    Retry,
}

impl BulkAction {
    pub const fn as_str(self) -> &'static str {
        match self {
            BulkAction::Cancel => "tasks.bulk_cancel",
            BulkAction::Retry => "tasks.bulk_retry",
        }
    }
}

/// Records an action in the audit log (inside the action's transaction).
async fn audit(
    conn: &mut PgConnection,
    who: &Principal,
    action: &str,
    namespace: Option<&str>,
    task_id: Option<TaskId>,
    detail: Value,
) -> Result<()> {
    super::audit::record(conn, who, action, namespace, task_id, detail).await
}

fn forbidden(who: &Principal, what: &str, namespace: &str) -> ServiceError {
    ServiceError::Forbidden(format!(
        "{} may not {what} in namespace {namespace:?}: the operate role is needed",
        who.actor
    ))
}

/// Retries one failed step: it waits again with its failures reset; the task runs again if it
/// had failed (rules: [`transition::plan_step_action`]).
pub async fn retry_step(shared: &Shared, who: &Principal, id: TaskId, step: &str) -> Result<()> {
    step_action(shared, who, id, step, StepAction::Retry, None).await
}

/// Reruns from a step: it and everything that depends on it, transitively, wait again from
/// scratch (outputs dropped); the task runs again.
pub async fn rerun_from(shared: &Shared, who: &Principal, id: TaskId, step: &str) -> Result<()> {
    step_action(shared, who, id, step, StepAction::Rerun, None).await
}

/// Marks a failed step succeeded with `output` (bounded like a worker's output): its children
/// proceed; the task runs again if it had failed.
pub async fn mark_succeeded(
    shared: &Shared,
    who: &Principal,
    id: TaskId,
    step: &str,
    output: Value,
) -> Result<()> {
    tasker_schemas::data::check_value("output", &output, shared.config.max_output_bytes)?;
    step_action(
        shared,
        who,
        id,
        step,
        StepAction::MarkSucceeded,
        Some(output),
    )
    .await
}

async fn step_action(
    shared: &Shared,
    who: &Principal,
    id: TaskId,
    step: &str,
    action: StepAction,
    output: Option<Value>,
) -> Result<()> {
    super::name_arg("step", step)?;
    let mut tx = shared.db.begin().await?;
    let task = store::lock_task(&mut tx, id)
        .await?
        .ok_or(ServiceError::TaskNotFound(id))?;
    if !who.allows(Role::Operate, &task.namespace) {
        // A task outside the caller's scope is not even seen.
        if !who.sees(&task.namespace) {
            return Err(ServiceError::TaskNotFound(id));
        }
        return Err(forbidden(who, action.as_str(), &task.namespace));
    }
    let steps = store::read_steps(&mut tx, id).await?;
    let now = TaskNow {
        failing: task.failing,
        cancel_requested: task.cancel_requested,
    };
    let plan =
        transition::plan_step_action(action, task.state, now, &steps, step).map_err(|r| {
            ServiceError::ActionRefused {
                task_id: id,
                message: r.0,
            }
        })?;
    let written = store::write_plan(&mut tx, id, &plan, output.as_ref()).await?;
    let mut queues = written.queues;
    let resumed = crate::store::dynamic::recount_maps(&mut tx, &[id.0]).await?;
    let detail = json!({
        "step": step,
        "previous_state": task.state,
        "steps_reset": written.reset,
        "by": who.actor,
    });
    record_event(&mut tx, id, action.event(), detail.clone()).await?;
    audit(
        &mut tx,
        who,
        action.as_str(),
        Some(&task.namespace),
        Some(id),
        detail,
    )
    .await?;
    let cause = super::dynamic::Cause {
        started: written.started,
        touched: resumed.iter().map(|m| m.id).collect(),
        ..Default::default()
    };
    let (woken, mut finished) = super::dynamic::cascade_task(
        &mut tx,
        &shared.templates,
        id.0,
        cause,
        shared.config.max_task_output_bytes,
    )
    .await?;
    queues.extend(woken);
    // Nothing left to run (e.g. the last step marked succeeded): the task finishes now.
    let ending = transition::final_state(TaskNow::default());
    finished.extend(crate::store::apply::finalize(&mut tx, &[(id.0, ending)]).await?);
    tx.commit().await?;
    shared.dispatch.wake(queues);
    events::announce(shared, &finished).await;
    tracing::info!(task_id = %id, step, action = action.as_str(), actor = %who.actor, "operator action");
    Ok(())
}

/// The caller's view of a filter: its namespace must be one the caller sees; without one, the
/// caller's scope.
fn select(who: &Principal, f: &BulkFilter, role: Role, what: &str) -> Result<BulkSelect> {
    if let Some(n) = &f.namespace {
        super::name_arg("namespace", n)?;
        if !who.allows(role, n) {
            return Err(if role == Role::Read || !who.sees(n) {
                ServiceError::Forbidden(format!("{} may not see namespace {n:?}", who.actor))
            } else {
                forbidden(who, what, n)
            });
        }
    } else if !who.has_role(role) {
        return Err(ServiceError::Forbidden(format!(
            "{} may not {what}: the {role} role is needed",
            who.actor
        )));
    }
    if let Some(t) = &f.template {
        super::name_arg("template", t)?;
    }
    if let (Some(a), Some(b)) = (f.created_after, f.created_before)
        && a >= b
    {
        return Err(ServiceError::InvalidRequest(
            "created_after must be before created_before".into(),
        ));
    }
    Ok(BulkSelect {
        state: f.state,
        namespace: f.namespace.clone(),
        template: f.template.clone(),
        created_after: f.created_after,
        created_before: f.created_before,
        scope: who.scope().map(|s| s.to_vec()),
    })
}

/// How many tasks `filter` matches (in the caller's scope), counted up to [`MAX_BULK_TASKS`]
/// + 1 (a count above the cap means "too many for one bulk action").
pub async fn bulk_count(shared: &Shared, who: &Principal, filter: &BulkFilter) -> Result<u64> {
    let sel = select(who, filter, Role::Read, "count tasks")?;
    Ok(store::count_tasks(&shared.db, &sel, MAX_BULK_TASKS as i64 + 1).await?)
}

/// Cancels every task `filter` matches, if no more match than `expected` (the count the
/// operator saw: [`transition::bulk_allowed`]). Finished tasks are skipped.
pub async fn bulk_cancel(
    shared: &Shared,
    who: &Principal,
    filter: &BulkFilter,
    expected: u64,
) -> Result<BulkOutcome> {
    bulk(shared, who, filter, expected, BulkAction::Cancel).await
}

/// Retries every task `filter` matches, if no more match than `expected`. Tasks that are not
/// failed or cancelled are skipped.
pub async fn bulk_retry(
    shared: &Shared,
    who: &Principal,
    filter: &BulkFilter,
    expected: u64,
) -> Result<BulkOutcome> {
    bulk(shared, who, filter, expected, BulkAction::Retry).await
}

/// One task at a time (each its own transaction under its lock, a single cancel or retry with
/// its own audit entry), then one audit entry for the whole action: filter, confirmed count,
/// outcome and the tasks acted on.
async fn bulk(
    shared: &Shared,
    who: &Principal,
    filter: &BulkFilter,
    expected: u64,
    action: BulkAction,
) -> Result<BulkOutcome> {
    let sel = select(who, filter, Role::Operate, action.as_str())?;
    let ids = store::select_tasks(&shared.db, &sel, MAX_BULK_TASKS as i64 + 1).await?;
    transition::bulk_allowed(expected, ids.len() as u64).map_err(|r| {
        ServiceError::BulkRefused {
            message: r.0,
            matched: ids.len() as u64,
        }
    })?;
    let mut out = BulkOutcome {
        matched: ids.len() as u64,
        ..Default::default()
    };
    let mut acted: Vec<TaskId> = Vec::new();
    for id in ids {
        let r = match action {
            BulkAction::Cancel => {
                super::tasks::cancel(shared, who, id, Some("bulk cancel".into())).await
            }
            BulkAction::Retry => super::tasks::retry(shared, who, id).await,
        };
        match r {
            Ok(()) => {
                out.acted += 1;
                acted.push(id);
            }
            // Its state does not allow it now (finished meanwhile, purged), or it is gone.
            Err(
                ServiceError::InvalidState { .. }
                | ServiceError::TaskNotFound(_)
                | ServiceError::InvalidRequest(_),
            ) => {
                out.skipped += 1;
            }
            Err(e) => {
                // Record what was done before the failure, then report it.
                record_bulk(shared, who, filter, expected, action, &out, &acted).await?;
                return Err(e);
            }
        }
    }
    record_bulk(shared, who, filter, expected, action, &out, &acted).await?;
    tracing::info!(action = action.as_str(), actor = %who.actor, matched = out.matched, acted = out.acted, "bulk operator action");
    Ok(out)
}

async fn record_bulk(
    shared: &Shared,
    who: &Principal,
    filter: &BulkFilter,
    expected: u64,
    action: BulkAction,
    out: &BulkOutcome,
    acted: &[TaskId],
) -> Result<()> {
    let mut tx = shared.db.begin().await?;
    audit(
        &mut tx,
        who,
        action.as_str(),
        filter.namespace.as_deref(),
        None,
        json!({ "filter": filter, "expected": expected, "outcome": out, "task_ids": acted }),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}
