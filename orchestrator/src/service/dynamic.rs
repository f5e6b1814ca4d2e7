//! What follows a decision or a mapped step's progress, within the transaction that caused it
//! (under the tasks' locks): skips propagate, mapped steps start, instances are let in, mapped
//! steps end and release their children — in a loop, since each may cause the next (a mapped
//! step that ends at once releases a child that starts mapping, ...). The rules are
//! [`transition`]'s; this module only sequences them.

use crate::store::apply as store_apply;
use crate::store::dynamic::{self as store, MapEnd, MapRow};
use crate::store::{self as db};
use crate::transition::{self, Expansion, InstancesDone, Skip, SkipCause, TaskNow};
use sqlx::PgConnection;
use std::collections::{BTreeMap, HashMap, HashSet};
use tasker_schemas::StepState;
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
    /// Mapped steps that started mapping.
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
            started.extend(w.mapping);
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
                let created = store::let_in(tx, m, w).await?;
                *out.terminal.entry(m.task_id).or_default() -= created;
                out.queued.insert(m.queue.clone());
            }
        }
        if ends.is_empty() {
            return Ok(());
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
        if children.is_empty() {
            return Ok(());
        }
        let w = store_apply::release_children(tx, children).await?;
        out.queued.extend(w.queued);
        started = w.mapping;
        if started.is_empty() {
            return Ok(());
        }
    }
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
    ending: Vec<(Uuid, tasker_schemas::TaskState)>,
) -> db::Result<(Vec<store_apply::FinishedTask>, Vec<String>)> {
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
