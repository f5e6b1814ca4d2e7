//! What follows a decision or a mapped step's progress, within the transaction that caused it
//! (under the tasks' locks): skips propagate, mapped steps start, instances are let in, mapped
//! steps end and release their children — in a loop, since each may cause the next (a mapped
//! step that ends at once releases a child that is delegated, ...). The rules are
//! [`transition`]'s; this module only sequences them.

use crate::store::apply as store_apply;
use crate::store::dynamic::{self as store, MapEnd, MapRow};
use crate::store::tasks::{self, CreateOutcome, Created, NewTask, ParentLink};
use crate::store::templates::TemplateCache;
use crate::store::{self as db};
use crate::transition::ChildStart;
use crate::transition::{self, Expansion, InstancesDone, Skip, SkipCause, TaskNow};
use serde_json::Value;
use sqlx::PgConnection;
use std::collections::{BTreeMap, HashMap, HashSet};
use tasker_schemas::StepState;
use tasker_schemas::{TaskId, WorkflowRef};
use uuid::Uuid;

/// The bookkeeping a cascade adds to its transaction's.
#[derive(Debug, Default)]
pub struct Cascade {
    /// Per task: steps that reached a terminal state, less instances created (they count as
    /// unfinished steps).
    pub terminal: HashMap<Uuid, i32>,
    /// Tasks that start failing, with the task's error (the first failure wins).
    pub failing: BTreeMap<Uuid, String>,
    /// Queues that got ready steps.
    pub queued: HashSet<String>,
}

/// What set a cascade off.
#[derive(Debug, Default)]
pub struct Cause {
    pub skips: Vec<Skip>,
    pub instances: BTreeMap<Uuid, InstancesDone>,
    /// Mapped steps that were delegated.
    pub started: Vec<Uuid>,
    /// Mapped steps whose progress changed otherwise (a retry): let instances in, or end.
    pub touched: Vec<Uuid>,
}

impl Cause {
    pub fn is_empty(&self) -> bool {
        self.skips.is_empty()
            && self.instances.is_empty()
            && self.started.is_empty()
            && self.touched.is_empty()
    }
}

/// Runs the cascade. `live` holds the flags of the (locked) tasks concerned, as read before
/// this transaction changed them; `out` accumulates (and already holds) this transaction's
/// failing tasks.
pub async fn cascade(
    tx: &mut PgConnection,
    templates: &TemplateCache,
    live: &HashMap<Uuid, TaskNow>,
    cause: Cause,
    out: &mut Cascade,
) -> db::Result<()> {
    let Cause {
        mut skips,
        instances,
        mut started,
        mut touched,
    } = cause;
    // Instances that finished: their mapped steps' progress, as counted.
    let mut counted = store::count_instances(tx, &instances).await?;
    loop {
        if !skips.is_empty() {
            let mut tasks: Vec<Uuid> = skips.iter().map(|s| s.task).collect();
            tasks.sort_unstable();
            tasks.dedup();
            let graph = store::read_graph(tx, &tasks).await?;
            let p = transition::propagate_skips(&graph, &skips);
            let w = store::write_propagation(tx, &p).await?;
            for (task, n) in w.skipped {
                *out.terminal.entry(task).or_default() += n;
            }
            out.queued.extend(w.queued);
            started.extend(w.delegated);
            skips.clear();
        }
        let mut ends = Vec::new();
        for src in store::read_sources(tx, &started).await? {
            match transition::expand(&src.over, src.found.as_deref(), src.len, src.max_items) {
                Expansion::Empty => {
                    store::set_total(tx, src.id, 0).await?;
                    touched.push(src.id);
                }
                Expansion::Instances { total } => {
                    store::set_total(tx, src.id, total).await?;
                    touched.push(src.id);
                }
                Expansion::Fail(error) => ends.push(MapEnd {
                    id: src.id,
                    state: StepState::Failed,
                    error: Some(error),
                    skip: None,
                }),
            }
        }
        // Child-workflow steps start: their children are created (or retried).
        let mut next: Vec<Uuid> = Vec::new();
        for c in store::read_children_to_start(tx, &started).await? {
            if let Some(end) = start_child(tx, templates, &c, out, &mut next, &mut touched).await? {
                ends.push(end);
            }
        }
        // Timed steps start: their due time, or a kept signal taken.
        ends.extend(start_waits(tx, &started).await?);
        started.clear();
        touched.sort_unstable();
        touched.dedup();
        let mut maps = std::mem::take(&mut counted);
        maps.extend(store::read_maps(tx, &touched).await?);
        touched.clear();
        for m in &maps {
            let halt = halted(live, out, m.task_id);
            if let Some(end) = ending(m, halt) {
                ends.push(end);
                continue;
            }
            let w = transition::map_window(&m.now, halt.is_some());
            if w.readmit > 0 || w.create > 0 {
                let l = store::let_in(tx, m, w).await?;
                *out.terminal.entry(m.task_id).or_default() -= l.created;
                out.queued.insert(m.queue.clone());
                next.extend(l.delegated);
            }
        }
        if ends.is_empty() {
            if next.is_empty() && touched.is_empty() {
                return Ok(());
            }
            started = next;
            continue;
        }
        let mut children: BTreeMap<Uuid, i32> = BTreeMap::new();
        for e in store::end_maps(tx, &ends).await? {
            *out.terminal.entry(e.task_id).or_default() += 1;
            let halt = halted(live, out, e.task_id);
            match e.state {
                StepState::Succeeded if halt.is_none() => {
                    for c in e.child_ids {
                        *children.entry(c).or_default() += 1;
                    }
                }
                StepState::Failed if halt.is_none() => {
                    out.failing.entry(e.task_id).or_insert_with(|| {
                        format!(
                            "step {:?} failed: {}",
                            e.name,
                            e.error.as_deref().unwrap_or_default()
                        )
                    });
                }
                _ => {}
            }
        }
        if !children.is_empty() {
            let w = store_apply::release_children(tx, children).await?;
            out.queued.extend(w.queued);
            next.extend(w.delegated);
        }
        if next.is_empty() && touched.is_empty() {
            return Ok(());
        }
        started = next;
    }
}

/// Starts one child-workflow step ([`transition::child_start`]): creates its child task (in
/// the same transaction; its ready steps' queues and delegated steps join the cascade) or
/// retries it, or returns how the step ends when it cannot start.
async fn start_child(
    tx: &mut PgConnection,
    templates: &TemplateCache,
    c: &store::ChildToStart,
    out: &mut Cascade,
    next: &mut Vec<Uuid>,
    touched: &mut Vec<Uuid>,
) -> db::Result<Option<MapEnd>> {
    let fail = |error: String| {
        Some(MapEnd {
            id: c.step_id,
            state: StepState::Failed,
            error: Some(error),
            skip: None,
        })
    };
    let spec: WorkflowRef = match serde_json::from_value(c.workflow.clone()) {
        Ok(w) => w,
        Err(e) => {
            return Ok(fail(format!(
                "unreadable workflow of step {:?}: {e}",
                c.name
            )));
        }
    };
    match transition::child_start(c.depth, c.child.map(|(_, state)| state)) {
        ChildStart::Fail(error) => Ok(fail(error)),
        ChildStart::Wait => Ok(None),
        ChildStart::Create { depth } => {
            let namespace = spec
                .namespace
                .clone()
                .unwrap_or_else(|| c.namespace.clone());
            let Some(found) = templates
                .find(&mut *tx, &namespace, &spec.name, spec.version)
                .await?
            else {
                return Ok(fail(format!(
                    "child workflow {namespace}/{}{} is not registered",
                    spec.name,
                    spec.version
                        .map(|v| format!(" version {v}"))
                        .unwrap_or_default()
                )));
            };
            let item = c.map_item.as_ref().zip(c.map_index);
            let item = match (&c.map_index, item) {
                (Some(i), None) => Some((&Value::Null, *i)),
                (_, item) => item,
            };
            let context = transition::child_context(spec.context.as_ref(), &c.parent_outputs, item);
            let new = NewTask {
                namespace: &namespace,
                template_id: found.id,
                template: &found.template,
                requested_version: spec.version,
                context: &context,
                idempotency_key: None,
                request_id: None,
                priority: c.priority,
                task_id: Some(TaskId(Uuid::now_v7())),
                parent: Some(ParentLink {
                    task_id: c.task_id,
                    step_id: c.step_id,
                    depth,
                }),
                // A child workflow's task has a trace of its own.
                trace_parent: None,
                start_at: None,
                deadline_ms: found.template.deadline.map(|d| d.0),
                start_request: None,
            };
            let Created {
                task_id: child,
                queues,
                delegated,
                ..
            } = match tasks::create(tx, &new).await? {
                CreateOutcome::Created(created) => created,
                CreateOutcome::Conflict { task_id } => {
                    return Err(db::StoreError::Corrupt(format!(
                        "a fresh child task id {task_id} is taken"
                    )));
                }
            };
            out.queued.extend(queues);
            next.extend(delegated);
            store::child_started(tx, c.step_id, child.0).await?;
            tasks::record_event(
                tx,
                TaskId(c.task_id),
                "child_started",
                serde_json::json!({ "step": c.name, "child_task_id": child, "map_index": c.map_index }),
            )
            .await?;
            Ok(None)
        }
        ChildStart::Retry => {
            let Some((child, _)) = c.child else {
                return Ok(None);
            };
            let child = TaskId(child);
            let Some(locked) = tasks::lock(tx, child).await? else {
                return Ok(fail(format!("child task {child} no longer exists")));
            };
            let Ok(reset) = transition::retry_task(locked.state) else {
                return Ok(None);
            };
            let (queues, delegated) = tasks::retry(tx, child, locked.state, reset).await?;
            out.queued.extend(queues);
            next.extend(delegated);
            touched.extend(
                store::recount_maps(tx, &[child.0])
                    .await?
                    .iter()
                    .map(|m| m.id),
            );
            store::child_started(tx, c.step_id, child.0).await?;
            tasks::record_event(
                tx,
                TaskId(c.task_id),
                "child_retried",
                serde_json::json!({ "step": c.name, "child_task_id": child, "map_index": c.map_index }),
            )
            .await?;
            Ok(None)
        }
    }
}

/// Starts timed steps that were just delegated ([`transition::wait_start`]): each begins an
/// attempt and gets its due time (a signal wait first takes the oldest kept signal of its name,
/// and then wakes at once). Returns how those that cannot start end (a `sleep_until` that
/// found no time).
async fn start_waits(tx: &mut PgConnection, started: &[Uuid]) -> db::Result<Vec<MapEnd>> {
    let mut ends = Vec::new();
    for w in crate::store::waits::read_waits_to_start(tx, started).await? {
        let Some(wait) = &w.wait else {
            ends.push(MapEnd {
                id: w.step_id,
                state: StepState::Failed,
                error: Some(format!("unreadable wait of step {:?}", w.name)),
                skip: None,
            });
            continue;
        };
        let found = match wait {
            tasker_schemas::Wait::SleepUntil { path } => {
                transition::value_at(&w.parent_outputs, path)
            }
            _ => None,
        };
        let attempt = crate::store::waits::begin_attempt(tx, w.step_id).await?;
        let taken = match wait {
            tasker_schemas::Wait::Signal { name, .. } => {
                crate::store::waits::take_signal(tx, w.task_id, name, w.step_id, attempt).await?
            }
            _ => false,
        };
        match transition::wait_start(wait, w.now, found, taken) {
            transition::WaitStart::Until(at) => {
                crate::store::waits::set_wake(tx, w.step_id, at).await?;
            }
            transition::WaitStart::Fail(error) => ends.push(MapEnd {
                id: w.step_id,
                state: StepState::Failed,
                error: Some(error),
                skip: None,
            }),
        }
    }
    Ok(ends)
}

/// The state a halted task gives what has not started, or `None` while it is not halted.
fn halted(live: &HashMap<Uuid, TaskNow>, out: &Cascade, task: Uuid) -> Option<StepState> {
    let now = live.get(&task).copied().unwrap_or_default();
    if now.cancel_requested || now.failing || out.failing.contains_key(&task) {
        Some(transition::halt(now.cancel_requested).to)
    } else {
        None
    }
}

/// How a mapped step ends now, if it does ([`transition::map_finished`]).
fn ending(m: &MapRow, halt: Option<StepState>) -> Option<MapEnd> {
    let (state, error) = transition::map_finished(&m.now, halt)?;
    Some(MapEnd {
        id: m.id,
        state,
        error,
        skip: (state == StepState::Skipped)
            .then(|| (SkipCause::Halted, "its task failed".to_owned())),
    })
}

/// After a halt ([`transition::halt`]) moved the instances of halted tasks' mapped steps: their
/// progress is recounted, and those with no live instance left end. Returns, per task, the
/// mapped steps that ended.
pub async fn settle_halted(
    tx: &mut PgConnection,
    tasks: &[Uuid],
    halt: StepState,
) -> db::Result<HashMap<Uuid, i32>> {
    let maps = store::recount_maps(tx, tasks).await?;
    let ends: Vec<MapEnd> = maps.iter().filter_map(|m| ending(m, Some(halt))).collect();
    let mut ended: HashMap<Uuid, i32> = HashMap::new();
    for e in store::end_maps(tx, &ends).await? {
        *ended.entry(e.task_id).or_default() += 1;
    }
    Ok(ended)
}

/// Finishes tasks with nothing left to run ([`store_apply::finalize`]), except those about to
/// fail that still have their `on_failure` handler to run ([`transition::may_run_failure_handler`]):
/// those start it instead. Returns the finished tasks and the queues that got a handler's step.
pub async fn finish(
    tx: &mut PgConnection,
    mut ending: Vec<(Uuid, tasker_schemas::TaskState)>,
    max_task_output_bytes: usize,
) -> db::Result<(Vec<store_apply::FinishedTask>, Vec<String>)> {
    // A task whose output would be over its limit fails instead of completing.
    let completing: Vec<Uuid> = ending
        .iter()
        .filter(|(_, state)| *state == tasker_schemas::TaskState::Completed)
        .map(|(id, _)| *id)
        .collect();
    let limit = i64::try_from(max_task_output_bytes).unwrap_or(i64::MAX);
    let mut refused = std::collections::BTreeMap::new();
    for (id, bytes) in store_apply::oversized_outputs(tx, &completing, limit).await? {
        if let Some(error) = transition::task_output_refused(bytes, max_task_output_bytes) {
            refused.insert(id, error);
        }
    }
    if !refused.is_empty() {
        let none: HashMap<Uuid, i32> = refused.keys().map(|id| (*id, 0)).collect();
        store_apply::write_counts(tx, &store_apply::TaskCounts::new(&none, &refused)).await?;
        for (id, state) in &mut ending {
            if refused.contains_key(id) {
                *state = tasker_schemas::TaskState::Failed;
            }
        }
    }
    let candidates: Vec<Uuid> = ending
        .iter()
        .filter(|(_, state)| transition::may_run_failure_handler(*state))
        .map(|(id, _)| *id)
        .collect();
    let (started, queues) = store_apply::start_failure_handlers(tx, &candidates).await?;
    let rest: Vec<(Uuid, tasker_schemas::TaskState)> = ending
        .into_iter()
        .filter(|(id, _)| !started.contains(id))
        .collect();
    Ok((store_apply::finalize(tx, &rest).await?, queues))
}

/// Ends a cascade's bookkeeping in its transaction, as the apply path does: the tasks that
/// started failing halt what they have not started ([`transition::halt`], their mapped steps
/// settled), the tasks' counters are written, and the tasks with nothing left finish
/// ([`finish`]). `done` holds tasks already known to have nothing left. Returns the finished
/// The cascade `cause` sets off in one task (locked by the caller, neither failing nor
/// cancelling), run and concluded: the queues to wake (queued steps, then failure handlers)
/// and the tasks that finished. Nothing when `cause` is empty.
pub async fn cascade_task(
    tx: &mut PgConnection,
    templates: &TemplateCache,
    task: Uuid,
    cause: Cause,
    max_task_output_bytes: usize,
) -> db::Result<(Vec<String>, Vec<store_apply::FinishedTask>)> {
    if cause.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let live = HashMap::from([(task, TaskNow::default())]);
    let mut out = Cascade::default();
    cascade(tx, templates, &live, cause, &mut out).await?;
    let mut queues: Vec<String> = std::mem::take(&mut out.queued).into_iter().collect();
    let (finished, handlers) =
        conclude(tx, &live, &mut out, Vec::new(), max_task_output_bytes).await?;
    queues.extend(handlers);
    Ok((queues, finished))
}

/// tasks and the queues that got an `on_failure` step.
pub async fn conclude(
    tx: &mut PgConnection,
    live: &HashMap<Uuid, TaskNow>,
    out: &mut Cascade,
    mut done: Vec<Uuid>,
    max_task_output_bytes: usize,
) -> db::Result<(Vec<store_apply::FinishedTask>, Vec<String>)> {
    if !out.failing.is_empty() {
        let failing: Vec<Uuid> = out.failing.keys().copied().collect();
        let halt = transition::halt(false);
        let halted = store_apply::halt_steps(tx, &failing, halt).await?;
        let ended = settle_halted(tx, &failing, halt.to).await?;
        for (task, n) in halted.into_iter().chain(ended) {
            *out.terminal.entry(task).or_default() += n;
        }
    }
    if !out.terminal.is_empty() || !out.failing.is_empty() {
        done.extend(
            store_apply::write_counts(
                tx,
                &store_apply::TaskCounts::new(&out.terminal, &out.failing),
            )
            .await?,
        );
    }
    done.sort_unstable();
    done.dedup();
    let ending = done
        .into_iter()
        .map(|id| {
            let now = live.get(&id).copied().unwrap_or_default();
            let failing = now.failing || out.failing.contains_key(&id);
            (id, transition::final_state(TaskNow { failing, ..now }))
        })
        .collect();
    finish(tx, ending, max_task_output_bytes).await
}

/// Restarts a child-workflow step whose retry is due: under its task's lock, the step is
/// delegated again and its child task retried ([`transition::child_start`]), in one
/// transaction.
pub async fn restart_child(shared: &super::Shared, task: Uuid, step: Uuid) -> super::Result<()> {
    let mut tx = shared.db.begin().await?;
    let live = store_apply::lock_live_tasks(&mut tx, &[task]).await?;
    if live.is_empty() || !store::delegate_due_retry(&mut tx, step).await? {
        tx.commit().await?;
        return Ok(());
    }
    let cause = Cause {
        started: vec![step],
        ..Cause::default()
    };
    let mut out = Cascade::default();
    cascade(&mut tx, &shared.templates, &live, cause, &mut out).await?;
    let (finished, queues) = conclude(
        &mut tx,
        &live,
        &mut out,
        Vec::new(),
        shared.config.max_task_output_bytes,
    )
    .await?;
    tx.commit().await?;
    shared.dispatch.wake(out.queued.into_iter().chain(queues));
    super::events::announce(shared, &finished).await;
    Ok(())
}
