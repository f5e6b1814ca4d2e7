//! API bodies built from store rows: a task with its steps, attempts, "why waiting" and history.

use crate::store::rfc3339;
use crate::store::views::{StepRow, TaskDetail, TaskRow, TaskSummaryRow};
use std::collections::HashMap;
use tasker_schemas::api::{
    AttemptView, InstanceList, InstanceView, MapView, ParentView, StepView, TaskEventView,
    TaskList, TaskSummary, TaskView,
};
use tasker_schemas::{StepId, StepState, TaskId};
use uuid::Uuid;

fn task_only(t: TaskRow, steps: Vec<StepView>, events: Vec<TaskEventView>) -> TaskView {
    TaskView {
        id: TaskId(t.id),
        namespace: t.namespace,
        template: t.template_name,
        template_version: t.template_version as u32,
        state: t.state,
        priority: t.priority,
        context: t.context,
        output: t.output,
        error: t.error,
        idempotency_key: t.idempotency_key,
        created_at: rfc3339(t.created_at),
        finished_at: t.finished_at.map(rfc3339),
        steps,
        events,
        parent: t.parent_task_id.map(|task_id| ParentView {
            task_id: TaskId(task_id),
            step: t.parent_step.unwrap_or_default(),
        }),
        start_at: t.start_at.map(rfc3339),
        deadline_at: t.deadline_at.map(rfc3339),
        purged_at: t.purged_at.map(rfc3339),
    }
}

/// A page of task summaries.
pub fn task_list(rows: Vec<TaskSummaryRow>, more: bool) -> TaskList {
    let tasks: Vec<TaskSummary> = rows
        .into_iter()
        .map(|t| TaskSummary {
            id: TaskId(t.id),
            namespace: t.namespace,
            template: t.template_name,
            template_version: t.template_version as u32,
            state: t.state,
            priority: t.priority,
            error: t.error,
            idempotency_key: t.idempotency_key,
            created_at: rfc3339(t.created_at),
            finished_at: t.finished_at.map(rfc3339),
            parent_task_id: t.parent_task_id.map(TaskId),
        })
        .collect();
    let next = if more {
        tasks.last().map(|t| t.id)
    } else {
        None
    };
    TaskList { tasks, next }
}

/// A task with its steps and every attempt (the one in flight included), and its history.
pub fn task_view(d: TaskDetail) -> TaskView {
    let TaskDetail {
        task,
        steps,
        attempts,
        events,
        live_handlers,
    } = d;
    let names: HashMap<Uuid, &str> = steps.iter().map(|s| (s.id, s.name.as_str())).collect();
    // A delayed task: every step waits for its start.
    let pending_until = task
        .start_at
        .filter(|_| task.state == tasker_schemas::TaskState::Pending);
    let mut by_step: HashMap<Uuid, Vec<AttemptView>> = HashMap::new();
    for a in attempts {
        by_step.entry(a.step_id).or_default().push(AttemptView {
            attempt: a.attempt as u32,
            outcome: a.outcome.to_string(),
            dispatched_at: a.dispatched_at.map(rfc3339).unwrap_or_default(),
            started_at: a.started_at.map(rfc3339),
            finished_at: Some(rfc3339(a.finished_at)),
            worker: a.worker,
            error: a.error,
            repeats: a.repeats.max(1) as u32,
        });
    }
    let step_views = steps
        .iter()
        .map(|s| {
            let mut attempts = by_step.remove(&s.id).unwrap_or_default();
            if s.state == StepState::Dispatched {
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
                    repeats: 1,
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
                state: s.state,
                attempt: s.attempt as u32,
                failures: s.failures as u32,
                max_attempts: s.max_attempts as u32,
                waiting_reason: waiting_reason(s, &steps, &names, pending_until)
                    .map(|r| r + &no_live_worker(s, live_handlers.as_ref())),
                depends_on,
                output: s.output.clone(),
                error: s.error.clone(),
                next_attempt_at: s.next_attempt_at.map(rfc3339),
                lease_expires_at: s.lease_expires_at.map(rfc3339),
                attempts,
                skip_reason: s.skip_reason.clone(),
                map: s.map_counts.as_ref().map(|c| map_view(s.map_total, c)),
                child_task_id: s.child_task_id.map(TaskId),
            }
        })
        .collect();
    let events = events
        .into_iter()
        .map(|e| TaskEventView {
            seq: e.seq as u64,
            kind: e.kind,
            detail: e.detail,
            at: rfc3339(e.at),
        })
        .collect();
    task_only(task, step_views, events)
}

/// A mapped step's instances counted by state (`counts`: state → number).
fn map_view(total: Option<i32>, counts: &serde_json::Value) -> MapView {
    let n = |state: StepState| {
        counts
            .get(state.as_str())
            .and_then(|v| v.as_u64())
            .unwrap_or(0) as u32
    };
    let created: u32 = StepState::ALL.iter().map(|s| n(*s)).sum();
    let total = total.map(|t| t.max(0) as u32);
    MapView {
        total,
        succeeded: n(StepState::Succeeded),
        running: n(StepState::Dispatched) + n(StepState::Retrying),
        failed: n(StepState::Failed),
        waiting: n(StepState::Queued)
            + n(StepState::Waiting)
            + total.unwrap_or(0).saturating_sub(created),
        halted: n(StepState::Skipped) + n(StepState::Cancelled),
    }
}

/// A page of a mapped step's instances.
pub fn instance_list(rows: Vec<crate::store::dynamic::InstanceRow>, more: bool) -> InstanceList {
    InstanceList {
        instances: rows
            .into_iter()
            .map(|r| InstanceView {
                index: r.map_index.max(0) as u32,
                state: r.state,
                attempt: r.attempt.max(0) as u32,
                output: r.output,
                error: r.error,
            })
            .collect(),
        more,
    }
}

/// What the worker registry adds to why a queued, retrying or dispatched (not started) step
/// waits: that
/// no live worker runs its handler on its queue. Empty otherwise, or when no worker ever
/// announced itself.
fn no_live_worker(
    s: &StepRow,
    live: Option<&HashMap<String, std::collections::HashSet<String>>>,
) -> String {
    let waiting = matches!(s.state, StepState::Queued | StepState::Retrying)
        || (s.state == StepState::Dispatched && s.started_at.is_none());
    match live {
        Some(live) if waiting && !live.get(&s.queue).is_some_and(|h| h.contains(&s.handler)) => {
            format!(
                "; no live worker runs handler {:?} on queue {:?} ({})",
                s.handler,
                s.queue,
                if live.contains_key(&s.queue) {
                    "the live workers on that queue lack it"
                } else {
                    "no live worker consumes that queue"
                }
            )
        }
        _ => String::new(),
    }
}

/// "Why is this step not running?" in words, for every non-terminal state.
fn waiting_reason(
    s: &StepRow,
    steps: &[StepRow],
    names: &HashMap<Uuid, &str>,
    pending_until: Option<chrono::DateTime<chrono::Utc>>,
) -> Option<String> {
    if let (StepState::Waiting, Some(at)) = (s.state, pending_until) {
        return Some(format!("task starts at {}", rfc3339(at)));
    }
    let wait = s
        .wait
        .as_ref()
        .and_then(|w| serde_json::from_value::<tasker_schemas::Wait>(w.clone()).ok());
    if let (StepState::Delegated, Some(wait)) = (s.state, wait) {
        let until = s.wake_at.map(rfc3339).unwrap_or_default();
        return Some(match wait {
            tasker_schemas::Wait::Signal { name, .. } => {
                format!("waiting for signal {name} (until {until})")
            }
            _ => format!("sleeping until {until}"),
        });
    }
    match s.state {
        StepState::Waiting => {
            let open: Vec<&str> = steps
                .iter()
                .filter(|p| s.parent_ids.contains(&p.id) && p.state != StepState::Succeeded)
                .filter_map(|p| names.get(&p.id).copied())
                .collect();
            Some(format!(
                "waiting on {} unfinished parent(s): {}",
                s.pending_parents,
                open.join(", ")
            ))
        }
        StepState::Queued => Some(format!(
            "queued for queue {:?} since {} (in-flight limit reached or dispatch pending)",
            s.queue,
            s.queued_at.map(rfc3339).unwrap_or_default()
        )),
        StepState::Dispatched => Some(match (&s.started_at, &s.worker) {
            (Some(at), worker) => format!(
                "attempt {} running on {} since {}, leased until {}",
                s.attempt,
                worker.as_deref().unwrap_or("a worker"),
                rfc3339(*at),
                s.lease_expires_at.map(rfc3339).unwrap_or_default()
            ),
            _ => format!(
                "attempt {} published to queue {:?} at {}; no worker reported it started (waiting in the queue, or running: only long steps report a start); lease expires {}",
                s.attempt,
                s.queue,
                s.dispatched_at.map(rfc3339).unwrap_or_default(),
                s.lease_expires_at.map(rfc3339).unwrap_or_default()
            ),
        }),
        StepState::Retrying => Some(format!(
            "backing off after attempt {} until {}",
            s.attempt,
            s.next_attempt_at.map(rfc3339).unwrap_or_default()
        )),
        StepState::Delegated => Some(match (s.child_task_id, s.map_total) {
            (Some(child), _) => format!("delegated: its child workflow runs as task {child}"),
            (None, Some(total)) => format!("delegated: its instances run ({total} elements)"),
            (None, None) => "delegated: reading the array from its parent's output".into(),
        }),
        _ => None,
    }
}

/// A live worker of the registry.
pub fn worker_view(w: crate::store::workers::WorkerRow) -> tasker_schemas::api::WorkerView {
    tasker_schemas::api::WorkerView {
        worker_id: tasker_schemas::WorkerId(w.worker_id),
        name: w.name,
        host: w.host,
        sdk: w.sdk,
        sdk_version: w.sdk_version,
        queues: w.queues,
        handlers: w.handlers,
        concurrency: u32::try_from(w.concurrency).unwrap_or(0),
        in_flight: u32::try_from(w.in_flight).unwrap_or(0),
        interval_ms: u64::try_from(w.interval_ms).unwrap_or(0),
        first_seen: rfc3339(w.first_seen),
        last_seen: rfc3339(w.last_seen),
    }
}

/// A schedule, with its next runs when given (and the zone to show them in).
pub fn schedule_view(
    s: crate::store::schedules::ScheduleRow,
    runs: &[chrono::DateTime<chrono::Utc>],
    tz: Option<chrono_tz::Tz>,
) -> tasker_schemas::api::ScheduleView {
    use tasker_schemas::api::{ScheduleRun, ScheduleView};
    ScheduleView {
        id: s.id,
        namespace: s.namespace,
        name: s.name,
        template: s.template_name,
        cron: s.cron,
        timezone: s.timezone,
        context: s.context,
        catch_up: s.catch_up.parse().unwrap_or_default(),
        paused: s.paused,
        next_tick: s.next_tick_at.map(rfc3339),
        last_tick: s.last_tick_at.map(rfc3339),
        last_error: s.last_error,
        created_at: rfc3339(s.created_at),
        next_runs: runs
            .iter()
            .map(|t| ScheduleRun {
                at: rfc3339(*t),
                local: match tz {
                    Some(tz) => t
                        .with_timezone(&tz)
                        .to_rfc3339_opts(chrono::SecondsFormat::Secs, false),
                    None => rfc3339(*t),
                },
            })
            .collect(),
    }
}

/// An API key as listed: `["*"]` for every namespace.
pub fn key_view(k: crate::store::keys::KeyRow) -> tasker_schemas::api::KeyView {
    tasker_schemas::api::KeyView {
        id: k.id,
        name: k.name,
        role: k.role,
        namespaces: k
            .namespaces
            .unwrap_or_else(|| vec![crate::auth::EVERY_NAMESPACE.to_owned()]),
        created_at: rfc3339(k.created_at),
        created_by: k.created_by,
        revoked_at: k.revoked_at.map(rfc3339),
        revoked_by: k.revoked_by,
    }
}

pub fn audit_entry(a: crate::store::audit::AuditRow) -> tasker_schemas::api::AuditEntry {
    tasker_schemas::api::AuditEntry {
        id: a.id,
        at: rfc3339(a.at),
        actor: a.actor,
        key_id: a.key_id,
        action: a.action,
        namespace: a.namespace,
        task_id: a.task_id.map(TaskId),
        detail: a.detail,
    }
}

pub fn namespace_view(
    n: crate::store::namespaces::NamespaceRow,
) -> tasker_schemas::api::NamespaceView {
    tasker_schemas::api::NamespaceView {
        namespace: n.namespace,
        retention_ms: n.retention_ms.map(|m| m.max(0) as u64),
        updated_at: rfc3339(n.updated_at),
    }
}
