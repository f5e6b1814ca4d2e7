//! Time and signals: waking timed steps (`sleep`, `sleep_until`, `wait_for`), signals sent to
//! tasks, delayed starts and task deadlines. The rules are [`transition`]'s; SQL is in
//! [`crate::store::waits`]; this module only sequences them.

use super::apply::apply_outcomes;
use super::{Result, ServiceError, Shared, dynamic, events};
use crate::store::{tasks as store_tasks, waits};
use crate::transition::{self, Finished, SignalAccept};
use tasker_schemas::api::{SendSignal, SignalResponse};
use tasker_schemas::{StepId, TaskId};

/// Longest `signal_id` (bytes).
pub const MAX_SIGNAL_ID_LEN: usize = 256;

/// Wakes the timed steps whose time came ([`transition::wake`]): a sleep succeeds with
/// `woke_at`, a signal wait with the payload of the signal it took, or on timeout with its
/// `default` or a failure. Applied like results (a stale wake changes nothing). In batches.
pub async fn wake_due(shared: &Shared) -> Result<()> {
    const BATCH: i64 = 500;
    loop {
        let due = waits::claim_due_waits(&shared.db, BATCH, 30_000).await?;
        let n = due.len() as i64;
        if due.is_empty() {
            return Ok(());
        }
        let batch = due
            .into_iter()
            .map(|d| Finished {
                task_id: TaskId(d.task_id),
                step_id: StepId(d.step_id),
                attempt: d.attempt,
                worker: None,
                result: match &d.wait {
                    Some(wait) => transition::wake(wait, d.now, d.signal),
                    None => transition::AttemptResult::Failed {
                        error: "unreadable wait".into(),
                        retryable: false,
                        retry_after_ms: None,
                    },
                },
                duration_ms: None,
            })
            .collect();
        apply_outcomes(shared, batch).await?;
        if n < BATCH {
            return Ok(());
        }
    }
}

/// Records a signal sent to a task ([`transition::accept_signal`]) and, if a step of the task
/// waits for that name, gives it the oldest kept signal (it wakes at once). A repeat of a
/// `signal_id` is a no-op answering the first signal (`created` false).
/// Needs role `operate` in the task's namespace; a recorded signal is in the audit log.
pub async fn send(
    shared: &Shared,
    who: &crate::auth::Principal,
    task: TaskId,
    name: &str,
    req: &SendSignal,
) -> Result<SignalResponse> {
    super::name_arg("signal name", name)?;
    let namespace = super::tasks::authorize(
        shared,
        who,
        task,
        crate::auth::Role::Operate,
        "send signals",
    )
    .await?;
    if req.signal_id.is_empty() || req.signal_id.len() > MAX_SIGNAL_ID_LEN {
        return Err(ServiceError::InvalidRequest(format!(
            "signal_id must be 1-{MAX_SIGNAL_ID_LEN} bytes"
        )));
    }
    if req.signal_id.contains('\0') {
        return Err(ServiceError::InvalidRequest(
            "signal_id contains a NUL character, which is not allowed".into(),
        ));
    }
    // The payload becomes the output of the step that takes it: the same checks.
    tasker_schemas::data::check_value("payload", &req.payload, shared.config.max_output_bytes)?;
    let mut tx = shared.db.begin().await?;
    let locked = store_tasks::lock(&mut tx, task)
        .await?
        .ok_or(ServiceError::TaskNotFound(task))?;
    let existing = waits::find_signal(&mut tx, task, name, &req.signal_id).await?;
    let waited_for = waits::waited_for(&mut tx, task, name).await?;
    let accept =
        transition::accept_signal(task, locked.state, name, waited_for, existing.is_some())
            .map_err(ServiceError::SignalRefused)?;
    let answer = |received_at, consumed_by, created| SignalResponse {
        task_id: task,
        name: name.to_owned(),
        signal_id: req.signal_id.clone(),
        created,
        received_at: crate::store::rfc3339(received_at),
        consumed_by,
    };
    if let (SignalAccept::Repeat, Some(first)) = (accept, existing) {
        tx.commit().await?;
        return Ok(answer(first.received_at, first.consumed_by, false));
    }
    let received_at =
        waits::record_signal(&mut tx, task, name, &req.signal_id, &req.payload).await?;
    super::audit::record(
        &mut tx,
        who,
        "task.signal",
        Some(&namespace),
        Some(task),
        serde_json::json!({ "name": name, "signal_id": req.signal_id }),
    )
    .await?;
    let mut consumed_by = None;
    if let Some((step, attempt)) = waits::waiting_for_signal(&mut tx, task, name).await?
        && waits::take_signal(&mut tx, task.0, name, step, attempt).await?
    {
        waits::set_wake(&mut tx, step, received_at).await?;
        consumed_by = waits::find_signal(&mut tx, task, name, &req.signal_id)
            .await?
            .and_then(|s| s.consumed_by);
    }
    tx.commit().await?;
    if consumed_by.is_some() {
        shared.timers.notify_one();
    }
    tracing::debug!(task_id = %task, signal = name, "signal recorded");
    Ok(answer(received_at, consumed_by, true))
}

/// Starts pending tasks whose time came (delayed start): each in its own transaction, under
/// its lock, its ready steps queued (and admitted by the dispatcher) and its timed and
/// child-workflow roots started.
pub async fn start_due(shared: &Shared) -> Result<()> {
    for id in waits::due_starts(&shared.db, 100).await? {
        let mut tx = shared.db.begin().await?;
        let Some((namespace, template, at)) = waits::start_task(&mut tx, id).await? else {
            tx.commit().await?;
            continue;
        };
        let (mut queues, started) = crate::store::reconcile::readmit_waiting(&mut tx, id).await?;
        let cause = dynamic::Cause {
            started,
            ..Default::default()
        };
        let (woken, finished) = dynamic::cascade_task(
            &mut tx,
            &shared.templates,
            id,
            cause,
            shared.config.max_task_output_bytes,
        )
        .await?;
        queues.extend(woken);
        store_tasks::record_event(&mut tx, TaskId(id), "started", serde_json::json!({})).await?;
        tx.commit().await?;
        events::announce_created(shared, TaskId(id), &namespace, &template, at).await;
        shared.dispatch.wake(queues);
        events::announce(shared, &finished).await;
        tracing::debug!(task_id = %id, "delayed task started");
    }
    Ok(())
}

/// Cancels live tasks whose deadline passed ([`transition::deadline_exceeded`]), through the
/// ordinary cancel: running steps are told to stop, child workflows are cancelled too.
pub async fn expire_deadlines(shared: &Shared) -> Result<()> {
    for (id, ms) in waits::due_deadlines(&shared.db, 100).await? {
        let reason = transition::deadline_exceeded(ms);
        let system = crate::auth::Principal::system("deadline");
        match super::tasks::cancel(shared, &system, TaskId(id), Some(reason)).await {
            Ok(()) => tracing::info!(task_id = %id, "task deadline exceeded: cancelled"),
            // Finished meanwhile: nothing to do.
            Err(ServiceError::InvalidState { .. }) | Err(ServiceError::TaskNotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
