//! Tasks: submit (HTTP and AMQP alike), cancel, retry, read.

use super::{Result, ServiceError, Shared, audit, events, keys};
use crate::auth::{Principal, Role};
use crate::slots;
use crate::store::tasks::{self, CreateOutcome, Created, NewTask};
use crate::store::views::{self, ListFilter, TaskDetail, TaskSummaryRow};
use crate::transition::{self, Cancel, Refused, TaskNow};
use tasker_schemas::api::SubmitTask;
use tasker_schemas::{RequestId, TaskId, TaskState};

/// Longest cancel reason (bytes).
pub const MAX_CANCEL_REASON_LEN: usize = 1_024;

/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;

/// Refuses a text with a NUL character (PostgreSQL text cannot hold one).
fn no_nul(what: &str, text: &str) -> Result<()> {
    if text.contains('\0') {
        return Err(ServiceError::InvalidRequest(format!(
            "{what} contains a NUL character, which is not allowed"
        )));
    }
    Ok(())
}

/// Validates and creates a task (or returns the existing one for an idempotent repeat).
/// Needs role `submit` in the task's namespace.
pub async fn submit(
    shared: &Shared,
    who: &Principal,
    req: &SubmitTask,
    request_id: Option<RequestId>,
) -> Result<Created> {
    submit_traced(shared, who, req, request_id, None).await
}

/// [`submit`] of a request that carried a W3C `traceparent`: the task's trace continues it (an
/// invalid one is ignored: the trace starts at the task).
pub async fn submit_traced(
    shared: &Shared,
    who: &Principal,
    req: &SubmitTask,
    request_id: Option<RequestId>,
    traceparent: Option<&str>,
) -> Result<Created> {
    let trace_parent = traceparent
        .and_then(crate::telemetry::TraceParent::parse)
        .map(|t| t.to_header());
    // A bad namespace in a request is the request's fault, not a template's.
    tasker_schemas::template::validate_namespace(&req.namespace)
        .map_err(|e| ServiceError::InvalidRequest(e.to_string()))?;
    keys::require(who, Role::Submit, &req.namespace, "submit tasks")?;
    if req.template.is_empty() {
        return Err(ServiceError::InvalidRequest(
            "template must not be empty".into(),
        ));
    }
    if let Some(key) = &req.idempotency_key {
        if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN {
            return Err(ServiceError::InvalidRequest(format!(
                "idempotency_key must be 1-{MAX_IDEMPOTENCY_KEY_LEN} bytes"
            )));
        }
        no_nul("idempotency_key", key)?;
    }
    if let Some(id) = req.task_id
        && id.0.get_version_num() != 7
    {
        return Err(ServiceError::InvalidRequest(format!(
            "task_id {id} must be a UUIDv7"
        )));
    }
    tasker_schemas::data::check_value("context", &req.context, shared.config.max_context_bytes)?;
    let run_at = match &req.run_at {
        None => None,
        Some(text) => Some(
            chrono::DateTime::parse_from_rfc3339(text)
                .map_err(|e| {
                    ServiceError::InvalidRequest(format!(
                        "run_at {:?} is not an RFC 3339 time ({e})",
                        text.chars().take(64).collect::<String>()
                    ))
                })?
                .with_timezone(&chrono::Utc),
        ),
    };
    let template =
        super::templates::find(shared, &req.namespace, &req.template, req.version).await?;
    let deadline_ms = transition::deadline_ms(
        req.deadline.map(|d| d.0),
        template.template.deadline.map(|d| d.0),
    )
    .map_err(ServiceError::InvalidRequest)?;
    let new = NewTask {
        namespace: &req.namespace,
        template_id: template.id,
        template: &template.template,
        requested_version: req.version,
        context: &req.context,
        idempotency_key: req.idempotency_key.as_deref(),
        request_id,
        priority: req.priority,
        task_id: req.task_id,
        parent: None,
        trace_parent: trace_parent.as_deref(),
        start_at: None,
        deadline_ms,
        start_request: match (&req.run_at, req.delay) {
            (Some(at), _) => Some(format!("run_at {at}")),
            (None, Some(d)) => Some(format!("delay {}", d.0)),
            (None, None) => None,
        },
    };
    let mut new = new;
    let mut tx = shared.db.begin().await?;
    // A delayed start is decided against the database's clock.
    if run_at.is_some() || req.delay.is_some() {
        let now = sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>("SELECT now()")
            .fetch_one(&mut *tx)
            .await?;
        new.start_at = transition::start_at(run_at, req.delay.map(|d| d.0), now)
            .map_err(ServiceError::InvalidRequest)?;
    }
    let made = create_in(shared, &mut tx, &new).await?;
    tx.commit().await?;
    let created = match made.outcome {
        CreateOutcome::Created(ref c) => c.clone(),
        CreateOutcome::Conflict { task_id } => {
            return Err(match &req.idempotency_key {
                Some(key) => ServiceError::IdempotencyConflict {
                    key: key.clone(),
                    task_id,
                },
                None => ServiceError::TaskIdConflict(task_id),
            });
        }
    };
    after_create(shared, &req.namespace, &template.template.name, made).await;
    Ok(created)
}

/// What [`create_in`] did, for [`after_create`] once its transaction committed.
#[derive(Debug)]
pub(crate) struct Made {
    pub outcome: CreateOutcome,
    /// When a new task was created: the transaction's time, its `created_at`.
    created_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Tasks that finished in the creating transaction (a child workflow with nothing to run).
    finished: Vec<crate::store::apply::FinishedTask>,
    /// The task starts later (`run_at`/`delay`): announced when it starts, not now.
    delayed: bool,
}

/// Creates a task in the caller's transaction (the request already validated): its steps, and
/// the child workflows its root steps start. Nothing is announced or woken before the caller
/// commits and calls [`after_create`]. Submits and schedule ticks both come here.
pub(crate) async fn create_in(
    shared: &Shared,
    tx: &mut sqlx::PgConnection,
    new: &NewTask<'_>,
) -> Result<Made> {
    let mut outcome = tasks::create(&mut *tx, new).await?;
    // When a new task was created: the transaction's time, which is its `created_at` (the
    // database clock), for its `running` event.
    let created_at = match &outcome {
        CreateOutcome::Created(c) if c.created => Some(
            sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>("SELECT now()")
                .fetch_one(&mut *tx)
                .await?,
        ),
        _ => None,
    };
    // Root steps that run child workflows start them in the same transaction.
    let mut finished = Vec::new();
    if let CreateOutcome::Created(c) = &mut outcome
        && !c.delegated.is_empty()
    {
        let cause = super::dynamic::Cause {
            started: std::mem::take(&mut c.delegated),
            ..Default::default()
        };
        let (queues, ended) = super::dynamic::cascade_task(
            &mut *tx,
            &shared.templates,
            c.task_id.0,
            cause,
            shared.config.max_task_output_bytes,
        )
        .await?;
        c.queues.extend(queues);
        finished = ended;
    }
    Ok(Made {
        outcome,
        created_at,
        finished,
        delayed: new.start_at.is_some(),
    })
}

/// After the transaction of [`create_in`] committed: counts a new task, announces it and wakes
/// the dispatcher for its queues, then announces the tasks that finished in it.
pub(crate) async fn after_create(shared: &Shared, namespace: &str, template: &str, made: Made) {
    if let CreateOutcome::Created(created) = &made.outcome
        && created.created
    {
        shared
            .metrics
            .counter("tasker_tasks_submitted_total", &[("namespace", namespace)])
            .increment(1);
        // Announced before its steps are dispatched, so that it usually precedes their news (a
        // delayed task is announced when it starts).
        if let Some(at) = made.created_at.filter(|_| !made.delayed) {
            events::announce_created(shared, created.task_id, namespace, template, at).await;
        }
        shared.dispatch.wake(created.queues.iter().cloned());
        tracing::debug!(task_id = %created.task_id, template = %template, "task created");
    }
    // Finishes decided in the creating transaction come after the `running` event.
    events::announce(shared, &made.finished).await;
}

fn refused(task_id: TaskId, r: Refused) -> ServiceError {
    ServiceError::InvalidState {
        task_id,
        state: r.state,
        action: r.action,
    }
}

/// Cancels a live task ([`transition::cancel_task`]): nothing new is admitted, and every step
/// not started (waiting, queued, retrying, or dispatched without a worker's `started`) is
/// cancelled at once, its slot released; a later result for it is stale. Steps a worker
/// reported started may still report (recorded, advancing nothing). The task finishes at once
/// when nothing is left running. Workers are told. A repeated cancel is a no-op.
/// Needs role `operate` in the task's namespace; recorded in the audit log.
pub async fn cancel(
    shared: &Shared,
    who: &Principal,
    id: TaskId,
    reason: Option<String>,
) -> Result<()> {
    if let Some(r) = &reason {
        if r.len() > MAX_CANCEL_REASON_LEN {
            return Err(ServiceError::InvalidRequest(format!(
                "reason is {} bytes; at most {MAX_CANCEL_REASON_LEN} are allowed",
                r.len()
            )));
        }
        no_nul("reason", r)?;
    }
    let namespace = authorize(shared, who, id, Role::Operate, "cancel tasks").await?;
    let mut tx = shared.db.begin().await?;
    let task = tasks::lock(&mut tx, id)
        .await?
        .ok_or(ServiceError::TaskNotFound(id))?;
    let plan = match transition::cancel_task(task.state, task.cancel_requested, reason.as_deref())
        .map_err(|r| refused(id, r))?
    {
        Cancel::Cancel(plan) => plan,
        Cancel::AlreadyCancelled => return Ok(()),
    };
    audit::record(
        &mut tx,
        who,
        "task.cancel",
        Some(&namespace),
        Some(id),
        serde_json::json!({ "reason": reason }),
    )
    .await?;
    // The task, then its child workflows' tasks (and theirs), in this one transaction.
    let mut released: std::collections::HashMap<String, i64> = Default::default();
    let mut finished = Vec::new();
    let mut cancelled = Vec::new();
    let mut work = vec![(id, plan, reason.clone())];
    while let Some((id, plan, reason)) = work.pop() {
        let written = tasks::cancel(&mut tx, id, &plan, reason.as_deref()).await?;
        for (queue, n) in written.released {
            *released.entry(queue).or_default() += n;
        }
        // Steps running a child workflow are cancelled with their task, and the children too.
        let (children, n) = crate::store::dynamic::cancel_child_steps(&mut tx, id.0).await?;
        // Mapped steps whose instances were all cancelled end now.
        let mut ended = super::dynamic::settle_halted(&mut tx, &[id.0], plan.halt.to).await?;
        *ended.entry(id.0).or_default() += n;
        crate::store::apply::write_counts(
            &mut tx,
            &crate::store::apply::TaskCounts::new(&ended, &Default::default()),
        )
        .await?;
        let ending = transition::final_state(TaskNow {
            failing: false,
            cancel_requested: true,
        });
        finished.extend(crate::store::apply::finalize(&mut tx, &[(id.0, ending)]).await?);
        cancelled.push((id, reason.clone(), written.steps));
        for child in children {
            let child = TaskId(child);
            let Some(locked) = tasks::lock(&mut tx, child).await? else {
                continue;
            };
            let why = format!("its parent task {id} was cancelled");
            if let Ok(Cancel::Cancel(plan)) =
                transition::cancel_task(locked.state, locked.cancel_requested, Some(&why))
            {
                work.push((child, plan, Some(why)));
            }
        }
    }
    if !released.is_empty() {
        let released = slots::per_queue(&released);
        crate::store::admission::lock_slots(&mut tx, &[], &released).await?;
    }
    tx.commit().await?;
    shared.dispatch.released(released.keys());
    // Tell workers: they refuse the tasks' queued messages and cancel their running handlers.
    for (task_id, reason, steps) in cancelled {
        let cancel = tasker_schemas::Cancel { task_id, reason };
        if let Ok(bytes) = tasker_schemas::encode_payload(cancel) {
            let props = crate::broker::properties(tasker_schemas::MessageId::new());
            if let Err(e) = shared
                .publisher
                .send_event(&shared.names.cancel_exchange(), "", &bytes, props)
                .await
            {
                tracing::warn!(task_id = %task_id, error = %e, "could not publish cancel message");
            }
        }
        tracing::info!(task_id = %task_id, steps_cancelled = steps, "task cancel requested");
    }
    events::announce(shared, &finished).await;
    Ok(())
}

/// Retries a failed or cancelled task ([`transition::retry_task`]); a task with no step to run
/// again completes at once.
/// Needs role `operate` in the task's namespace; recorded in the audit log. A purged task
/// cannot run again (its context is gone).
pub async fn retry(shared: &Shared, who: &Principal, id: TaskId) -> Result<()> {
    let namespace = authorize(shared, who, id, Role::Operate, "retry tasks").await?;
    let mut tx = shared.db.begin().await?;
    let locked = tasks::lock(&mut tx, id)
        .await?
        .ok_or(ServiceError::TaskNotFound(id))?;
    let state = locked.state;
    transition::may_run_again(state, locked.purged).map_err(|r| refused(id, r))?;
    let reset = transition::retry_task(state).map_err(|r| refused(id, r))?;
    audit::record(
        &mut tx,
        who,
        "task.retry",
        Some(&namespace),
        Some(id),
        serde_json::json!({}),
    )
    .await?;
    let (mut queues, started) = tasks::retry(&mut tx, id, state, reset).await?;
    // Mapped steps map again: counted afresh from their instances, they let them in.
    let resumed = crate::store::dynamic::recount_maps(&mut tx, &[id.0]).await?;
    let cause = super::dynamic::Cause {
        started,
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
    // A task cancelled while its last steps ran to success has nothing to reset: it finishes
    // at once (the guard in finalize: no unfinished step left; a no-op if it finished above).
    let ending = transition::final_state(TaskNow::default());
    finished.extend(crate::store::apply::finalize(&mut tx, &[(id.0, ending)]).await?);
    tx.commit().await?;
    shared.dispatch.wake(queues);
    events::announce(shared, &finished).await;
    tracing::info!(task_id = %id, "task retried");
    Ok(())
}

/// The namespace of task `id` if `who` may do what needs `role` there (`what` names it in the
/// refusal): 404 for no such task, 403 outside the key's role or namespaces.
pub async fn authorize(
    shared: &Shared,
    who: &Principal,
    id: TaskId,
    role: Role,
    what: &str,
) -> Result<String> {
    let namespace = views::namespace(&shared.db, id)
        .await?
        .ok_or(ServiceError::TaskNotFound(id))?;
    keys::require(who, role, &namespace, what)?;
    Ok(namespace)
}

/// A task with its steps, attempts and history. Needs role `read` in its namespace.
pub async fn detail(shared: &Shared, who: &Principal, id: TaskId) -> Result<TaskDetail> {
    let mut d = views::detail(&shared.db, id)
        .await?
        .ok_or(ServiceError::TaskNotFound(id))?;
    keys::require(who, Role::Read, &d.task.namespace, "read tasks")?;
    // Why a step waits may be that no live worker runs its handler.
    let waits = d.steps.iter().any(|s| {
        matches!(
            s.state,
            tasker_schemas::StepState::Queued
                | tasker_schemas::StepState::Dispatched
                | tasker_schemas::StepState::Retrying
        )
    });
    if waits {
        d.live_handlers = super::workers::live_handlers(shared).await?;
    }
    Ok(d)
}

/// A page of a mapped step's instances and whether more follow.
pub async fn instances(
    shared: &Shared,
    who: &Principal,
    id: TaskId,
    step: &str,
    after: Option<i32>,
    limit: i64,
) -> Result<(Vec<crate::store::dynamic::InstanceRow>, bool)> {
    super::name_arg("step", step)?;
    authorize(shared, who, id, Role::Read, "read tasks").await?;
    views::instances(&shared.db, id, step, after, limit)
        .await?
        .ok_or_else(|| ServiceError::StepNotFound {
            task_id: id,
            step: step.to_owned(),
        })
}

/// A task's state.
pub async fn state(shared: &Shared, id: TaskId) -> Result<TaskState> {
    views::state(&shared.db, id)
        .await?
        .ok_or(ServiceError::TaskNotFound(id))
}

/// Tasks newest first: a page and whether more follow. A namespace-scoped key sees only its
/// namespaces' tasks (naming another namespace is refused).
pub async fn list(
    shared: &Shared,
    who: &Principal,
    filter: &ListFilter,
) -> Result<(Vec<TaskSummaryRow>, bool)> {
    if let Some(n) = &filter.namespace {
        super::name_arg("namespace", n)?;
        keys::require(who, Role::Read, n, "list tasks")?;
    }
    let scoped;
    let filter = match who.scope() {
        Some(scope) if filter.scope.is_none() => {
            scoped = ListFilter {
                scope: Some(scope.to_vec()),
                ..filter.clone()
            };
            &scoped
        }
        _ => filter,
    };
    if let Some(t) = &filter.template {
        super::name_arg("template", t)?;
    }
    Ok(views::list(&shared.db, filter).await?)
}

/// Erases a finished task's context and outputs (its steps' outputs, mapped elements and
/// failure inputs), keeping its states, errors, attempts and history; `purged_at` records when.
/// Needs role `admin` in the task's namespace; recorded in the audit log. Purging again is a
/// no-op. A purged task cannot be retried.
pub async fn purge(shared: &Shared, who: &Principal, id: TaskId) -> Result<()> {
    let namespace = authorize(shared, who, id, Role::Admin, "purge tasks").await?;
    let mut tx = shared.db.begin().await?;
    let locked = tasks::lock(&mut tx, id)
        .await?
        .ok_or(ServiceError::TaskNotFound(id))?;
    transition::purge_task(locked.state).map_err(|r| refused(id, r))?;
    tasks::purge(&mut tx, id).await?;
    audit::record(
        &mut tx,
        who,
        "task.purge",
        Some(&namespace),
        Some(id),
        serde_json::json!({}),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(task_id = %id, by = %who.actor, "task purged");
    Ok(())
}
