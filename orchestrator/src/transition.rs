//! Every rule that decides a step's or a task's fate, as pure functions: (current rows, what
//! happened, policy) → transitions. No I/O: the store reads the rows and writes what these
//! functions decide; SQL holds guards only ("still dispatched with this attempt", "task still
//! live"), never a decision.
//!
//! | rule | function |
//! |---|---|
//! | admit queued steps within the in-flight bound | [`admission`], [`ADMIT`] |
//! | a step whose parents all succeeded becomes ready | [`PARENTS_DONE`] |
//! | apply a reported attempt: succeed, retry with backoff, give up, fail fast, handler missing | [`plan_batch`] |
//! | the delay before the next attempt | [`retry_delay_ms`] |
//! | a due retry becomes ready | [`PROMOTE_RETRY`] |
//! | skip what a failing task can no longer run / cancel what a cancelled one has not started | [`halt`] |
//! | cancel a task (what has not started finishes at once; a repeat is a no-op) | [`cancel_task`] |
//! | retry a failed or cancelled task | [`retry_task`] |
//! | lease expiry (queue wait, execution) | [`lease_expired`] |
//! | a step message the broker dead-lettered | [`dead_step`] |
//! | a step message too large or unencodable / unroutable | [`undeliverable`], [`unroutable`] |
//! | the state a task finishes in | [`final_state`] |
//! | a failed task runs its `on_failure` handler first | [`may_run_failure_handler`] |
//! | a child-workflow step starts (create, retry the same child, depth bound) | [`child_start`], [`child_context`] |
//! | a child task's end is its step's outcome | [`child_finished`] |
//! | a decision's branches: checked, the ones not chosen skipped | [`plan_batch`] (`check_branches`) |
//! | skips propagate: `join: all` skips, `join: any` runs if a parent succeeded | [`propagate_skips`] |
//! | a mapped step starts: instances, an empty output, or a clear failure | [`expand`] |
//! | how many instances of a mapped step are let in (max_parallel) | [`map_window`] |
//! | when a mapped step finishes, and how (tolerate) | [`map_finished`] |
//! | what a retried task runs again (never a decision's choice or a map's expansion) | [`retry_task`] |
//! | a schedule's ticks (time zones, DST), which fire now (catch-up), its next tick | [`schedule`] |
//! | a timed step starts: when a sleep wakes, a signal wait times out, a kept signal is taken | [`wait_start`] |
//! | a timed step wakes: `woke_at`, the signal's payload, the timeout's default or failure | [`wake`] |
//! | a signal is recorded, repeated (no-op) or refused (finished task, name nobody waits for) | [`accept_signal`] |
//! | a delayed start: when the task starts (`run_at`, `delay`) | [`start_at`] |
//! | a task deadline: which one applies, and the cancel it causes | [`deadline_ms`], [`deadline_exceeded`] |
//! | operator actions on a step: retry it, rerun from it, mark it succeeded | [`plan_step_action`] |
//! | a bulk action goes ahead only within the count the operator confirmed | [`bulk_allowed`] |
//! | replaying a dead step message retries its step if its task still needs it | [`dead_step_replay`] |
//!
//! Attempt numbers only grow: admission is the only place that sets one (the current one plus
//! one), and a report for any attempt other than the step's current dispatched one is stale.

use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use tasker_schemas::{AttemptOutcome, RetryPolicy, StepId, StepState, TaskId, TaskState};
use uuid::Uuid;

pub mod schedule;

/// What an attempt reported (a worker's result, or what the orchestrator observed).
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptResult {
    Succeeded {
        output: Value,
        /// A decision step's chosen branches (`None`: the result named none).
        branches: Option<Vec<String>>,
    },
    Failed {
        error: String,
        retryable: bool,
        retry_after_ms: Option<u64>,
    },
    /// No worker had the handler: offer it again later without spending an attempt.
    HandlerMissing { handler: String },
    /// The lease ran out (queue wait or execution).
    TimedOut { error: String },
    /// The step message was dead-lettered (poison, unroutable, too large).
    DeadLettered { error: String, retryable: bool },
}

/// A reported attempt of one step.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub task_id: TaskId,
    pub step_id: StepId,
    pub attempt: i32,
    pub worker: Option<String>,
    pub result: AttemptResult,
    /// The handler's run time as the worker reported it (`duration_ms`); `None` for outcomes
    /// the orchestrator decides (timeouts, dead letters). Informational: metrics only.
    pub duration_ms: Option<u64>,
}

/// Settings the rules depend on.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Largest accepted step output (bytes of JSON); larger is a permanent failure.
    pub max_output_bytes: usize,
    /// How long a step waits before it is offered again after `handler_missing`.
    pub handler_missing_delay_ms: u64,
    /// Largest output of a completed task (bytes of JSON, its leaf steps' outputs together);
    /// larger fails the task ([`task_output_refused`]).
    pub max_task_output_bytes: usize,
}

/// A step as it is now (read under its task's lock).
#[derive(Debug, Clone)]
pub struct StepNow {
    pub id: Uuid,
    pub task_id: Uuid,
    pub namespace: String,
    pub name: String,
    pub state: StepState,
    pub attempt: i32,
    pub failures: i32,
    pub max_attempts: i32,
    /// The step's [`RetryPolicy`] as stored (an unreadable one counts as the default).
    pub retry_policy: Value,
    pub child_ids: Vec<Uuid>,
    pub dispatched_at: Option<chrono::DateTime<chrono::Utc>>,
    pub started_at: Option<chrono::DateTime<chrono::Utc>>,
    /// A decision step: the children it may choose among.
    pub decides: Option<Vec<String>>,
    /// The names of `child_ids`, in the same order (read for decision steps only).
    pub child_names: Vec<String>,
    /// An instance of a mapped step.
    pub instance_of: Option<InstanceOf>,
    /// The task's `on_failure` step: it runs in a failed task, so its task being halted does
    /// not stop its retries.
    pub failure_handler: bool,
    /// A child-workflow step: its attempt runs as a child task while it is `delegated`.
    pub workflow: bool,
    /// A timed step (`sleep`, `sleep_until`, `wait_for`): its attempt is the wait, while it is
    /// `delegated`; the timers report how it ended ([`wake`]).
    pub timed: bool,
    /// How long it may wait for a worker; also the bound on a streak of `handler_missing`.
    pub queue_wait_timeout_ms: i64,
    /// The streak of `handler_missing` re-offers it is in, if any.
    pub missing: Option<MissingStreak>,
}

/// A streak of `handler_missing` re-offers of one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingStreak {
    /// The streak's first attempt: its history row counts the whole streak.
    pub first_attempt: i32,
    /// The workers that reported the handler missing (at most [`MAX_MISSING_WORKERS`]).
    pub workers: Vec<String>,
    /// How long the streak has lasted.
    pub for_ms: i64,
}

/// Longest error text kept for a step or an attempt (bytes): a longer one a worker reports is
/// cut at a character boundary and marked.
pub const MAX_ERROR_BYTES: usize = 4_096;

/// `text` cut to [`MAX_ERROR_BYTES`], with the cut said at its end; a NUL character (which
/// PostgreSQL text cannot hold) becomes U+FFFD.
pub fn capped_error(text: &str) -> String {
    if text.contains('\0') {
        return capped_error(&text.replace('\0', "\u{FFFD}"));
    }
    if text.len() <= MAX_ERROR_BYTES {
        return text.to_owned();
    }
    let mut end = MAX_ERROR_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}… (cut: {} bytes, at most {MAX_ERROR_BYTES} are kept)",
        &text[..end],
        text.len()
    )
}

/// Most worker names a streak of `handler_missing` remembers.
pub const MAX_MISSING_WORKERS: usize = 10;

/// The mapped step an instance belongs to, as it is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceOf {
    pub map: Uuid,
    /// Failed instances it tolerates.
    pub tolerate: i32,
    /// Instances failed so far.
    pub failed: i32,
}

/// Why a step was skipped (`steps.skip_cause`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipCause {
    /// A decision did not choose it.
    NotChosen,
    /// A parent was skipped (`join: all`), or every parent was (`join: any`).
    ParentSkipped,
    /// Its task failed (fail fast): a retry runs it again.
    Halted,
}

impl SkipCause {
    pub const fn as_str(self) -> &'static str {
        match self {
            SkipCause::NotChosen => "not_chosen",
            SkipCause::ParentSkipped => "parent_skipped",
            SkipCause::Halted => "halted",
        }
    }
}

/// A step to skip, with its cause and the reason in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skip {
    pub step: Uuid,
    pub task: Uuid,
    pub cause: SkipCause,
    pub reason: String,
}

/// Instances of one mapped step that finished in a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InstancesDone {
    pub task: Uuid,
    pub done: i32,
    pub failed: i32,
}

/// A live task's flags (read under its lock). Tasks that are not live have none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TaskNow {
    /// A step failed for good: nothing new is admitted.
    pub failing: bool,
    pub cancel_requested: bool,
}

/// What happens to one reported step.
#[derive(Debug, Clone)]
pub struct StepChange<'a> {
    pub step: &'a StepNow,
    pub reported: &'a Finished,
    /// The step's new state: `succeeded`, `retrying` or `failed`.
    pub to: StepState,
    /// Attempts that counted against `max_attempts` so far.
    pub failures: i32,
    pub output: Option<Value>,
    /// The step's error (the last failure's, with "gave up" when retries ran out).
    pub error: Option<String>,
    /// For `retrying`: when the next attempt is due.
    pub retry_in_ms: Option<u64>,
    /// The attempt's history row: how it ended and its error.
    pub outcome: AttemptOutcome,
    pub outcome_error: Option<String>,
    /// A decision that succeeded: the branches it chose.
    pub chosen: Option<Vec<String>>,
    /// A `handler_missing` report: the first attempt of its streak (its history row, counted
    /// up instead of a row per re-offer) and the workers that reported it. `None` ends a streak.
    pub missing_from: Option<i32>,
    pub missing_workers: Vec<String>,
}

/// The decisions for a batch of reported attempts.
#[derive(Debug, Default)]
pub struct BatchPlan<'a> {
    pub changes: Vec<StepChange<'a>>,
    /// Reports for an attempt that is not the step's current dispatched one (late, duplicate,
    /// unknown, or naming the wrong task), or for a task no longer live.
    pub stale: usize,
    /// Per child: parents that succeeded in this batch (only while the task is not halted).
    pub children: BTreeMap<Uuid, i32>,
    /// Per task: steps that reached a terminal state in this batch.
    pub terminal: HashMap<Uuid, i32>,
    /// Tasks that start failing in this batch, with the task's error (the first failure wins).
    pub failing: BTreeMap<Uuid, String>,
    pub retries: usize,
    /// Branches a decision did not choose (only while the task is not halted).
    pub skips: Vec<Skip>,
    /// Per mapped step: its instances that finished in this batch.
    pub instances: BTreeMap<Uuid, InstancesDone>,
}

/// Decides a batch of reported attempts against the steps and live tasks as they are now.
///
/// Rules, in order, per report: one report per (step, attempt) counts, the rest are stale; a
/// report is applied only to the step's current `dispatched` attempt of a live task. Then:
/// - **succeed**: the output (if within the size cap) is kept, the children's parent counters
///   go down (not while the task is halted: failing or cancelled);
/// - **retry with backoff**: a retryable failure with attempts left goes to `retrying`, due
///   after the worker's `retry_after` or the policy's delay with jitter;
/// - **give up**: a retryable failure without attempts left fails, "(gave up after N attempts)";
/// - **fail fast**: a permanent failure fails the step and makes the task fail: the first such
///   failure in the batch names the task's error, and later reports of that task in the same
///   batch are treated as halted (successes release no children, failures are not retried);
/// - **handler missing**: offered again after `handler_missing_delay_ms`, spending no attempt;
/// - **decide**: a decision step's success names its branches (checked against `decides`: a
///   missing list, an unknown name, or branches from a step that decides nothing is a permanent
///   failure); the children it did not choose are skipped ("not chosen by <step>");
/// - **instances**: an instance of a mapped step counts toward its mapped step (done, failed);
///   a failed instance fails the task only beyond the mapped step's `tolerate`.
///
/// `unit` yields uniform picks in [0, 1) for the jitter.
pub fn plan_batch<'a>(
    batch: &'a [Finished],
    steps: &'a HashMap<Uuid, StepNow>,
    tasks: &HashMap<Uuid, TaskNow>,
    policy: &Policy,
    unit: &mut dyn FnMut() -> f64,
) -> BatchPlan<'a> {
    let mut plan = BatchPlan::default();
    let mut seen = HashSet::new();
    for f in batch {
        if !seen.insert((f.step_id, f.attempt)) {
            plan.stale += 1;
            continue;
        }
        let Some(step) = steps.get(&f.step_id.0) else {
            plan.stale += 1;
            continue;
        };
        let Some(task) = tasks.get(&step.task_id) else {
            plan.stale += 1;
            continue;
        };
        let running = step.state == StepState::Dispatched
            || (step.state == StepState::Delegated && (step.workflow || step.timed));
        if step.task_id != f.task_id.0 || !running || step.attempt != f.attempt {
            plan.stale += 1;
            continue;
        }
        let halted = !step.failure_handler
            && (task.failing || task.cancel_requested || plan.failing.contains_key(&step.task_id));
        let change = decide(step, f, halted, policy, unit);
        if change.to != StepState::Retrying
            && let Some(of) = step.instance_of
        {
            let n = plan.instances.entry(of.map).or_insert(InstancesDone {
                task: step.task_id,
                ..InstancesDone::default()
            });
            n.done += 1;
            if change.to == StepState::Failed {
                n.failed += 1;
                if of.failed + n.failed <= of.tolerate {
                    // Tolerated: recorded, the task goes on.
                    *plan.terminal.entry(step.task_id).or_default() += 1;
                    plan.changes.push(change);
                    continue;
                }
            }
        }
        match change.to {
            StepState::Succeeded => {
                *plan.terminal.entry(step.task_id).or_default() += 1;
                if !halted {
                    let chosen = change.chosen.as_deref();
                    for (i, c) in step.child_ids.iter().enumerate() {
                        let name = step.child_names.get(i).map(String::as_str);
                        let skipped = match (chosen, name, &step.decides) {
                            (Some(chosen), Some(name), Some(decides)) => {
                                decides.iter().any(|d| d == name)
                                    && !chosen.iter().any(|b| b == name)
                            }
                            _ => false,
                        };
                        if skipped {
                            plan.skips.push(Skip {
                                step: *c,
                                task: step.task_id,
                                cause: SkipCause::NotChosen,
                                reason: format!("not chosen by {}", step.name),
                            });
                        } else {
                            *plan.children.entry(*c).or_default() += 1;
                        }
                    }
                }
            }
            StepState::Retrying => plan.retries += 1,
            _ => {
                *plan.terminal.entry(step.task_id).or_default() += 1;
                if !halted {
                    plan.failing.insert(
                        step.task_id,
                        format!(
                            "step {:?} failed: {}",
                            step.name,
                            change.error.as_deref().unwrap_or_default()
                        ),
                    );
                }
            }
        }
        plan.changes.push(change);
    }
    plan
}

/// One report against its step (already known to be the current attempt).
fn decide<'a>(
    step: &'a StepNow,
    f: &'a Finished,
    halted: bool,
    policy: &Policy,
    unit: &mut dyn FnMut() -> f64,
) -> StepChange<'a> {
    let mut chosen = None;
    let (outcome, mut error, output, mut retryable, retry_after) = match &f.result {
        AttemptResult::Succeeded { output, branches } => {
            let checked =
                tasker_schemas::data::check_value("output", output, policy.max_output_bytes)
                    .map_err(|e| e.to_string())
                    .and_then(|_| check_branches(step, branches.as_deref()));
            match checked {
                Ok(c) => {
                    chosen = c;
                    (
                        AttemptOutcome::Succeeded,
                        None,
                        Some(output.clone()),
                        false,
                        None,
                    )
                }
                // Too large, malformed, or bad branches: the handler would produce it again.
                Err(e) => (AttemptOutcome::Failed, Some(e), None, false, None),
            }
        }
        AttemptResult::Failed {
            error,
            retryable,
            retry_after_ms,
        } => (
            AttemptOutcome::Failed,
            Some(capped_error(error)),
            None,
            *retryable,
            *retry_after_ms,
        ),
        AttemptResult::HandlerMissing { handler } => (
            AttemptOutcome::HandlerMissing,
            Some(format!(
                "worker {} has no handler {handler:?}",
                f.worker.as_deref().unwrap_or("(unknown)")
            )),
            None,
            true,
            Some(policy.handler_missing_delay_ms),
        ),
        AttemptResult::TimedOut { error } => (
            AttemptOutcome::TimedOut,
            Some(error.clone()),
            None,
            true,
            None,
        ),
        AttemptResult::DeadLettered { error, retryable } => (
            AttemptOutcome::DeadLettered,
            Some(error.clone()),
            None,
            *retryable,
            None,
        ),
    };
    // A missing handler is offered again, but only for as long as the step may wait for a
    // worker (its queue-wait timeout): then it fails, naming the handler and the workers.
    let (mut missing_from, mut missing_workers) = (None, Vec::new());
    if let AttemptResult::HandlerMissing { handler } = &f.result {
        let (first, mut workers, for_ms) = match &step.missing {
            Some(m) => (m.first_attempt, m.workers.clone(), m.for_ms),
            None => (f.attempt, Vec::new(), 0),
        };
        let worker = f.worker.clone().unwrap_or_else(|| "(unknown)".into());
        if !workers.contains(&worker) && workers.len() < MAX_MISSING_WORKERS {
            workers.push(worker);
        }
        if for_ms >= step.queue_wait_timeout_ms {
            retryable = false;
            error = Some(format!(
                "no worker has handler {handler:?}: reported missing by {} for {for_ms} ms (queue_wait_timeout {} ms)",
                workers.join(", "),
                step.queue_wait_timeout_ms
            ));
        }
        missing_from = Some(first);
        missing_workers = workers;
    }
    let mut change = StepChange {
        step,
        reported: f,
        to: StepState::Succeeded,
        failures: step.failures,
        output,
        error: None,
        retry_in_ms: None,
        outcome,
        outcome_error: error.clone(),
        chosen,
        missing_from,
        missing_workers,
    };
    if outcome == AttemptOutcome::Succeeded {
        return change;
    }
    // A missing handler does not spend an attempt.
    let spends = outcome != AttemptOutcome::HandlerMissing;
    change.failures = step.failures + i32::from(spends);
    if retryable && !halted && change.failures < step.max_attempts {
        let policy: RetryPolicy =
            serde_json::from_value(step.retry_policy.clone()).unwrap_or_default();
        change.to = StepState::Retrying;
        change.retry_in_ms = Some(retry_delay_ms(
            &policy,
            change.failures,
            retry_after,
            unit(),
        ));
        change.error = error;
    } else {
        let error = error.unwrap_or_default();
        change.to = StepState::Failed;
        change.error = Some(if retryable && change.failures >= step.max_attempts {
            format!("{error} (gave up after {} attempts)", change.failures)
        } else {
            error
        });
    }
    change
}

/// A success's `branches` against the step's `decides`: the chosen branches of a decision step,
/// `None` for any other step, or why the result is refused (a permanent failure).
fn check_branches(
    step: &StepNow,
    branches: Option<&[String]>,
) -> Result<Option<Vec<String>>, String> {
    match (&step.decides, branches) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(format!(
            "step {:?} returned branches but declares no decides (only a decision step chooses branches)",
            step.name
        )),
        (Some(decides), None) => Err(format!(
            "step {:?} declares decides [{}]; its result must name the chosen branches (branches: [] chooses none)",
            step.name,
            decides.join(", ")
        )),
        (Some(decides), Some(branches)) => {
            for b in branches {
                if !decides.contains(b) {
                    return Err(format!(
                        "step {:?} chose unknown branch {b:?}: it may choose from [{}]",
                        step.name,
                        decides.join(", ")
                    ));
                }
            }
            Ok(Some(branches.to_vec()))
        }
    }
}

/// The delay before the next attempt after `failures` counted failures: the worker's
/// `retry_after` when it gave one, else the policy's exponential backoff with jitter (`unit` a
/// uniform pick in [0, 1)).
pub fn retry_delay_ms(
    policy: &RetryPolicy,
    failures: i32,
    retry_after_ms: Option<u64>,
    unit: f64,
) -> u64 {
    retry_after_ms.unwrap_or_else(|| policy.delay_ms(failures.max(1) as u32, unit))
}

/// A set-wise step transition the store carries out: steps of a task in one of `from` move to
/// `to` (the store adds the guards: which task, which rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub from: &'static [StepState],
    pub to: StepState,
    /// Timed steps still waiting (`delegated` with a due time: a sleep, a signal wait) move
    /// too: they have not started anything a worker runs.
    pub timed_waits: bool,
}

/// Admission: a queued step gets the next attempt number, a lease of queue wait plus execution
/// timeout, and an outbox entry. (The hot path's SQL spells `from` as a literal so that it
/// matches the partial index of queued steps.)
pub const ADMIT: Move = Move {
    from: &[StepState::Queued],
    to: StepState::Dispatched,
    timed_waits: false,
};

/// A waiting step whose last unfinished parent succeeded is ready.
pub const PARENTS_DONE: Move = Move {
    from: &[StepState::Waiting],
    to: StepState::Queued,
    timed_waits: false,
};

/// A retry whose due time came is ready again.
pub const PROMOTE_RETRY: Move = Move {
    from: &[StepState::Retrying],
    to: StepState::Queued,
    timed_waits: false,
};

/// What a halted task does with the steps it has not started: a failing task skips them (cause
/// [`SkipCause::Halted`]), a cancelled one cancels them. Dispatched steps are left to report
/// (or time out); a mapped step ends once its live instances have ([`map_finished`]).
pub fn halt(cancel_requested: bool) -> Move {
    Move {
        from: StepState::NOT_STARTED,
        to: if cancel_requested {
            StepState::Cancelled
        } else {
            StepState::Skipped
        },
        timed_waits: true,
    }
}

/// A mapped step whose parent succeeded starts mapping (it is never queued itself): [`expand`].
pub const DELEGATE: Move = Move {
    from: &[StepState::Waiting],
    to: StepState::Delegated,
    timed_waits: false,
};

/// A step of a task's graph (mapped steps' instances apart), as [`propagate_skips`] sees it.
#[derive(Debug, Clone)]
pub struct GraphStep {
    pub name: String,
    pub state: StepState,
    pub join_any: bool,
    pub parent_ids: Vec<Uuid>,
    pub child_ids: Vec<Uuid>,
    /// Parents not yet succeeded or skipped.
    pub pending_parents: i32,
    pub mapped: bool,
}

/// What skipping some steps does to the rest of their task's graph.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Propagation {
    /// Steps to skip (the seeds included), in order.
    pub skipped: Vec<Skip>,
    /// `join: any` steps still waiting, with their new count of pending parents.
    pub pending: BTreeMap<Uuid, i32>,
    /// `join: any` steps whose last pending parent was skipped while another succeeded: ready
    /// ([`PARENTS_DONE`], or [`DELEGATE`] for a mapped step).
    pub ready: Vec<Uuid>,
}

/// Skips `seeds` (waiting steps; others are left alone) and what follows from it, in one pass:
/// a `join: all` child of a skipped step is skipped ("parent X was skipped"); a `join: any`
/// child counts the skipped parent as finished and, once no parent is pending, runs if one
/// succeeded and is skipped if none did ("every parent was skipped").
pub fn propagate_skips(graph: &HashMap<Uuid, GraphStep>, seeds: &[Skip]) -> Propagation {
    let mut out = Propagation::default();
    let mut state: HashMap<Uuid, StepState> = HashMap::new();
    let now = |state: &HashMap<Uuid, StepState>, id: &Uuid| {
        state
            .get(id)
            .copied()
            .or_else(|| graph.get(id).map(|g| g.state))
    };
    let mut queue: std::collections::VecDeque<Skip> = seeds.iter().cloned().collect();
    while let Some(skip) = queue.pop_front() {
        if now(&state, &skip.step) != Some(StepState::Waiting) {
            continue;
        }
        state.insert(skip.step, StepState::Skipped);
        let Some(node) = graph.get(&skip.step) else {
            continue;
        };
        for c in &node.child_ids {
            let Some(child) = graph.get(c) else { continue };
            if now(&state, c) != Some(StepState::Waiting) {
                continue;
            }
            if !child.join_any {
                queue.push_back(Skip {
                    step: *c,
                    task: skip.task,
                    cause: SkipCause::ParentSkipped,
                    reason: format!("parent {} was skipped", node.name),
                });
                continue;
            }
            let pending = out.pending.entry(*c).or_insert(child.pending_parents);
            *pending = (*pending - 1).max(0);
            if *pending > 0 {
                continue;
            }
            out.pending.remove(c);
            let ran = child
                .parent_ids
                .iter()
                .any(|p| now(&state, p) == Some(StepState::Succeeded));
            if ran {
                state.insert(*c, StepState::Queued);
                out.ready.push(*c);
            } else {
                queue.push_back(Skip {
                    step: *c,
                    task: skip.task,
                    cause: SkipCause::ParentSkipped,
                    reason: "every parent was skipped".into(),
                });
            }
        }
        out.skipped.push(skip);
    }
    out
}

/// How a mapped step starts, from what its `map.over` path finds in the parent's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expansion {
    /// An empty array: the mapped step succeeds at once with output `[]`.
    Empty,
    /// One instance per element.
    Instances { total: i32 },
    /// Not an array, or too long: the mapped step fails (permanently) with this error.
    Fail(String),
}

/// `found` is the JSON type at the path (`None`: the path is not there), `len` the array's
/// length.
pub fn expand(over: &str, found: Option<&str>, len: Option<i64>, max_items: i32) -> Expansion {
    match (found, len) {
        (Some("array"), Some(0)) => Expansion::Empty,
        (Some("array"), Some(n)) if n > i64::from(max_items) => Expansion::Fail(format!(
            "map over {over:?} found {n} elements; at most {max_items} are allowed (map.max_items)"
        )),
        (Some("array"), Some(n)) => Expansion::Instances { total: n as i32 },
        (None, _) => Expansion::Fail(format!(
            "map over {over:?}: the parent's output has nothing at that path"
        )),
        (Some(kind), _) => Expansion::Fail(format!("map over {over:?} found {kind}, not an array")),
    }
}

/// A mapped step's progress (its `map_*` columns).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MapNow {
    pub max_parallel: i32,
    pub tolerate: i32,
    /// Elements; `None` before it started.
    pub total: Option<i32>,
    pub created: i32,
    /// Instances queued, dispatched or retrying.
    pub live: i32,
    /// Instances a task retry reset, waiting to be let in again.
    pub waiting: i32,
    pub done: i32,
    pub failed: i32,
}

/// Instances to let in now: first the waiting ones (after a retry), then new ones, so that at
/// most `max_parallel` are live (queued, dispatched or retrying) at once. A halted task lets in
/// none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    pub readmit: i32,
    pub create: i32,
}

pub fn map_window(m: &MapNow, halted: bool) -> Window {
    if halted {
        return Window::default();
    }
    let room = (m.max_parallel - m.live).max(0);
    let readmit = room.min(m.waiting);
    let create = (room - readmit).min((m.total.unwrap_or(0) - m.created).max(0));
    Window { readmit, create }
}

/// How a mapped step ends, if it does now: with every instance finished, it succeeds when no
/// more than `tolerate` failed (its output the instances' outputs in order, `null` for the
/// failed ones) and fails otherwise. In a halted task (`halt`: the state it gives what has not
/// started) it ends once no instance is live: failed if too many failed, else `halt`.
pub fn map_finished(m: &MapNow, halt: Option<StepState>) -> Option<(StepState, Option<String>)> {
    let too_many = m.failed > m.tolerate;
    let error = || {
        Some(format!(
            "{} of {} instances failed (tolerate: {})",
            m.failed,
            m.total.unwrap_or(0),
            m.tolerate
        ))
    };
    match halt {
        Some(halt) if m.live == 0 => Some(if too_many {
            (StepState::Failed, error())
        } else {
            (halt, None)
        }),
        Some(_) => None,
        None => {
            let total = m.total?;
            if m.created < total || m.done < total {
                return None;
            }
            Some(if too_many {
                (StepState::Failed, error())
            } else {
                (StepState::Succeeded, None)
            })
        }
    }
}

/// What starting a child-workflow step does, given its task's depth and its child task (if it
/// has one: the step's retries and task retries run that same child again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildStart {
    /// Create the child task at this depth.
    Create { depth: i32 },
    /// Retry the child task (it failed or was cancelled).
    Retry,
    /// The child runs already, or finished successfully (settled when it is applied): nothing.
    Wait,
    /// The step fails (permanently) with this error.
    Fail(String),
}

pub fn child_start(parent_depth: i32, child: Option<TaskState>) -> ChildStart {
    match child {
        None => {
            let depth = parent_depth + 1;
            if depth > tasker_schemas::template::MAX_WORKFLOW_DEPTH as i32 {
                ChildStart::Fail(format!(
                    "child workflow depth {depth} exceeds the limit of {}",
                    tasker_schemas::template::MAX_WORKFLOW_DEPTH
                ))
            } else {
                ChildStart::Create { depth }
            }
        }
        Some(TaskState::Failed | TaskState::Cancelled) => ChildStart::Retry,
        Some(_) => ChildStart::Wait,
    }
}

/// A child workflow's context: with a mapping, each key the value at its path (`<parent>.<path>`
/// into the parents' outputs, `item.<path>` into an instance's element; `null` where nothing
/// is); without one, the parents' outputs (an instance: `{"item": …, "index": …}`).
pub fn child_context(
    mapping: Option<&BTreeMap<String, String>>,
    parent_outputs: &Value,
    item: Option<(&Value, i32)>,
) -> Value {
    let Some(mapping) = mapping else {
        return match item {
            Some((item, index)) => serde_json::json!({ "item": item, "index": index }),
            None => parent_outputs.clone(),
        };
    };
    let mut out = serde_json::Map::new();
    for (key, path) in mapping {
        let at = match (path.split('.').next(), item) {
            (Some("item"), Some((item, _))) => {
                let wrapped = serde_json::json!({ "item": item });
                value_at(&wrapped, path).cloned()
            }
            _ => value_at(parent_outputs, path).cloned(),
        };
        out.insert(key.clone(), at.unwrap_or(Value::Null));
    }
    Value::Object(out)
}

/// The value at a template path (`<parent>.<key>.<key>`, a segment of digits indexing an
/// array: the syntax of `map.over`, `workflow.context` and `sleep_until`) in the parents'
/// outputs by name; `None` when nothing is there.
pub fn value_at<'v>(parent_outputs: &'v Value, path: &str) -> Option<&'v Value> {
    let mut parts = path.split('.');
    let mut at = parent_outputs.get(parts.next().unwrap_or_default());
    for part in parts {
        at = at.and_then(|v| match v {
            Value::Array(a) => part.parse::<usize>().ok().and_then(|i| a.get(i)),
            other => other.get(part),
        });
    }
    at
}

/// What a child task's end comes to for its step: its output, or a failure — retryable (the
/// step's retry policy runs the same child again) when the child failed, permanent when it
/// was cancelled directly.
pub fn child_finished(
    child: TaskId,
    state: TaskState,
    output: Option<Value>,
    error: Option<&str>,
) -> AttemptResult {
    match state {
        TaskState::Completed => AttemptResult::Succeeded {
            output: output.unwrap_or(Value::Null),
            branches: None,
        },
        TaskState::Cancelled => AttemptResult::Failed {
            error: format!("child task {child} was cancelled"),
            retryable: false,
            retry_after_ms: None,
        },
        _ => AttemptResult::Failed {
            error: format!(
                "child task {child} failed: {}",
                error.unwrap_or("no error recorded")
            ),
            retryable: true,
            retry_after_ms: None,
        },
    }
}

/// An operator action refused in the task's current state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub state: TaskState,
    pub action: &'static str,
}

/// What a cancel writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelPlan {
    /// Steps not started move to `cancelled` ([`halt`]).
    pub halt: Move,
    /// Dispatched steps no worker reported `started` are not started either: they are
    /// cancelled at once too (their attempt recorded as `cancelled`, their slot released), and
    /// a result for them later is stale. Only started steps wait for their worker.
    pub dispatched_unstarted: bool,
    /// The attempt outcome recorded for a cancelled dispatched attempt.
    pub outcome: AttemptOutcome,
    /// The task's error.
    pub error: String,
}

/// What cancelling a task in `state` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancel {
    Cancel(CancelPlan),
    /// Already cancelled, or a cancel already requested: nothing to do (no second event).
    AlreadyCancelled,
}

/// Cancelling a task: a live one is cancelled ([`CancelPlan`]); a repeated cancel (the task
/// cancelled, or a cancel requested and its started steps still running) is a no-op; a
/// completed or failed task cannot be cancelled.
pub fn cancel_task(
    state: TaskState,
    cancel_requested: bool,
    reason: Option<&str>,
) -> Result<Cancel, Refused> {
    if state == TaskState::Cancelled || (state.is_live() && cancel_requested) {
        return Ok(Cancel::AlreadyCancelled);
    }
    if !state.is_live() {
        return Err(Refused {
            state,
            action: "cancel",
        });
    }
    Ok(Cancel::Cancel(CancelPlan {
        halt: halt(true),
        dispatched_unstarted: true,
        outcome: AttemptOutcome::Cancelled,
        error: format!("cancelled: {}", reason.unwrap_or("by request")),
    }))
}

/// Skipped steps a task retry leaves skipped: a decision that succeeded is never re-decided.
pub const RETRY_KEEPS_SKIPPED: &[SkipCause] = &[SkipCause::NotChosen, SkipCause::ParentSkipped];

/// Retrying a task: only a failed or cancelled one; its failed and cancelled steps and the
/// steps its failure skipped wait again (their failures reset, attempt numbers kept, so they
/// keep growing), succeeded steps keep their outputs, and steps skipped by a decision stay
/// skipped ([`RETRY_KEEPS_SKIPPED`]). A mapped step that had started is not expanded again:
/// it maps again over its failed, skipped and cancelled instances only.
pub fn retry_task(state: TaskState) -> Result<Move, Refused> {
    if !matches!(state, TaskState::Failed | TaskState::Cancelled) {
        return Err(Refused {
            state,
            action: "retry",
        });
    }
    Ok(Move {
        from: StepState::RETRYABLE,
        to: StepState::Waiting,
        timed_waits: false,
    })
}

/// A purged task (its context and outputs erased) never runs again: retrying it, or rerunning
/// any of its steps, is refused.
pub fn may_run_again(state: TaskState, purged: bool) -> Result<(), Refused> {
    if purged {
        return Err(Refused {
            state,
            action: "running again after a purge (its context and outputs are erased)",
        });
    }
    Ok(())
}

/// Purging a task (erasing its context and outputs, keeping states and history): only a
/// finished one; a live task still needs its data.
pub fn purge_task(state: TaskState) -> Result<(), Refused> {
    if state.is_live() {
        return Err(Refused {
            state,
            action: "purge",
        });
    }
    Ok(())
}

/// A task about to finish `failed` runs its template's `on_failure` handler first, if it has
/// one that has not run for this failure (the store knows): its step counts as unfinished, and
/// the task finishes `failed` once it has run, whatever its result. Nothing else runs one.
pub fn may_run_failure_handler(ending: TaskState) -> bool {
    ending == TaskState::Failed
}

/// A task about to complete whose output (its leaf steps' outputs together, `bytes` as JSON)
/// is over `limit` fails instead, with this error; its `on_failure` handler runs as for any
/// failure (`failure.step` is then `""`).
pub fn task_output_refused(bytes: i64, limit: usize) -> Option<String> {
    (bytes > i64::try_from(limit).unwrap_or(i64::MAX)).then(|| {
        format!(
            "task output is {bytes} bytes (all leaf step outputs together), over the limit of {limit} bytes"
        )
    })
}

/// The state a task with no unfinished step finishes in.
pub fn final_state(task: TaskNow) -> TaskState {
    if task.cancel_requested {
        TaskState::Cancelled
    } else if task.failing {
        TaskState::Failed
    } else {
        TaskState::Completed
    }
}

/// A dispatched attempt whose lease ran out: a retryable timeout. `started` tells which lease:
/// the execution lease (renewed by heartbeats), or queue wait plus execution before any start.
pub fn lease_expired(
    attempt: i32,
    started: bool,
    queue_wait_timeout_ms: i64,
    execution_timeout_ms: i64,
) -> AttemptResult {
    let error = if started {
        format!("attempt {attempt} timed out: no result within its execution lease")
    } else {
        format!(
            "attempt {attempt} timed out: no result within queue-wait ({queue_wait_timeout_ms} ms) plus execution ({execution_timeout_ms} ms)"
        )
    };
    AttemptResult::TimedOut { error }
}

/// A step message the broker dead-lettered (delivery limit, rejected): a retryable failure.
pub fn dead_step(why: &str) -> AttemptResult {
    AttemptResult::DeadLettered {
        error: format!("step message dead-lettered by the broker ({why})"),
        retryable: true,
    }
}

/// A step message that cannot be sent at all (too large, unencodable): a permanent failure,
/// since the same data would be refused again.
pub fn undeliverable(error: String) -> AttemptResult {
    AttemptResult::DeadLettered {
        error,
        retryable: false,
    }
}

/// A step message no queue was bound for: retryable (the queue may be declared again).
pub fn unroutable(queue: &str, broker_text: &str) -> AttemptResult {
    AttemptResult::DeadLettered {
        error: format!("step message unroutable: no queue bound for {queue:?} ({broker_text})"),
        retryable: true,
    }
}

/// Largest delayed start, `sleep`, signal timeout and deadline: 7 days.
pub const MAX_WAIT_MS: u64 = tasker_schemas::template::MAX_DURATION_MS;

/// How a timed step starts when it becomes ready (`now`: the database's clock).
#[derive(Debug, Clone, PartialEq)]
pub enum WaitStart {
    /// It wakes at this time (a past time: at once).
    Until(chrono::DateTime<chrono::Utc>),
    /// It fails (permanently) with this error: `sleep_until` found no time.
    Fail(String),
}

/// When a timed step wakes, from the moment it became ready: a `sleep` after its duration; a
/// `sleep_until` at the RFC 3339 time found at its path (`found`: the value there, `None` when
/// nothing is; a past time wakes at once); a `wait_for` at its timeout, or at once when a kept
/// signal of its name was taken for it (`signal_taken`).
pub fn wait_start(
    wait: &tasker_schemas::Wait,
    now: chrono::DateTime<chrono::Utc>,
    found: Option<&Value>,
    signal_taken: bool,
) -> WaitStart {
    use tasker_schemas::Wait;
    let after = |ms: u64| now + chrono::Duration::milliseconds(ms.min(MAX_WAIT_MS) as i64);
    match wait {
        Wait::Sleep { ms } => WaitStart::Until(after(*ms)),
        Wait::SleepUntil { path } => match found {
            None | Some(Value::Null) => WaitStart::Fail(format!(
                "sleep_until {path:?}: the parent's output has no time at that path"
            )),
            Some(Value::String(text)) => match chrono::DateTime::parse_from_rfc3339(text) {
                Ok(at) => WaitStart::Until(at.with_timezone(&chrono::Utc)),
                Err(e) => WaitStart::Fail(format!(
                    "sleep_until {path:?}: {text:?} is not an RFC 3339 time ({e})"
                )),
            },
            Some(other) => WaitStart::Fail(format!(
                "sleep_until {path:?} found {}, not an RFC 3339 time",
                json_kind(other)
            )),
        },
        Wait::Signal { timeout_ms, .. } => WaitStart::Until(if signal_taken {
            now
        } else {
            after(*timeout_ms)
        }),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// What a timed step's wait came to when it woke (`now`: the database's clock): a taken signal
/// succeeds with its payload (the step's output is the payload itself); a sleep succeeds with
/// `{"woke_at": "<RFC 3339>"}`; a signal wait that timed out succeeds with its `default`, or
/// fails permanently naming the signal and the timeout.
pub fn wake(
    wait: &tasker_schemas::Wait,
    now: chrono::DateTime<chrono::Utc>,
    signal: Option<Value>,
) -> AttemptResult {
    use tasker_schemas::Wait;
    let succeed = |output| AttemptResult::Succeeded {
        output,
        branches: None,
    };
    if let Some(payload) = signal {
        return succeed(payload);
    }
    match wait {
        Wait::Sleep { .. } | Wait::SleepUntil { .. } => succeed(serde_json::json!({
            "woke_at": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
        })),
        Wait::Signal {
            default: Some(default),
            ..
        } if !default.is_null() => succeed(default.clone()),
        Wait::Signal {
            name, timeout_ms, ..
        } => AttemptResult::Failed {
            error: format!("timed out: no signal {name:?} within {timeout_ms} ms"),
            retryable: false,
            retry_after_ms: None,
        },
    }
}

/// A signal sent to a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignalAccept {
    /// Record it (a waiting step of its name takes the oldest kept one).
    Record,
    /// The same (task, name, signal_id) was recorded before: nothing changes, the first
    /// answer is returned.
    Repeat,
}

/// Whether a signal is taken: a repeat of a recorded `signal_id` is a no-op whatever the task's
/// state; otherwise the task must be live and its template must have a `wait_for` step for the
/// name (`waited_for`). The refusal says why.
pub fn accept_signal(
    task: TaskId,
    state: TaskState,
    name: &str,
    waited_for: bool,
    repeat: bool,
) -> Result<SignalAccept, String> {
    if repeat {
        return Ok(SignalAccept::Repeat);
    }
    if !state.is_live() {
        return Err(format!("task {task} is {state}: it takes no more signals"));
    }
    if !waited_for {
        return Err(format!(
            "no step of task {task} waits for signal {name:?} (wait_for.signal)"
        ));
    }
    Ok(SignalAccept::Record)
}

/// A delayed start (`now`: the database's clock): `run_at` or `delay_ms`, not both. `None`:
/// start now (no delay, or a time already past); otherwise the task is created `pending` and
/// starts at the time returned. At most [`MAX_WAIT_MS`] ahead.
pub fn start_at(
    run_at: Option<chrono::DateTime<chrono::Utc>>,
    delay_ms: Option<u64>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, String> {
    let at = match (run_at, delay_ms) {
        (Some(_), Some(_)) => return Err("give run_at or delay, not both".into()),
        (None, None) => return Ok(None),
        (Some(at), None) => at,
        (None, Some(ms)) => {
            if ms > MAX_WAIT_MS {
                return Err(format!("delay must be at most 7 days ({MAX_WAIT_MS} ms)"));
            }
            now + chrono::Duration::milliseconds(ms as i64)
        }
    };
    if at > now + chrono::Duration::milliseconds(MAX_WAIT_MS as i64) {
        return Err(format!(
            "run_at must be at most 7 days ahead ({MAX_WAIT_MS} ms)"
        ));
    }
    Ok((at > now).then_some(at))
}

/// The deadline a task gets: the submit's when it gave one, else its template's. Refused when
/// zero or over [`MAX_WAIT_MS`].
pub fn deadline_ms(submitted: Option<u64>, template: Option<u64>) -> Result<Option<u64>, String> {
    match submitted.or(template) {
        Some(ms) if ms == 0 || ms > MAX_WAIT_MS => Err(format!(
            "deadline must be between 1 ms and 7 days, got {ms} ms"
        )),
        other => Ok(other),
    }
}

/// A live task whose deadline passed is cancelled ([`cancel_task`]) with this reason, so its
/// error reads `cancelled: deadline exceeded (…)`.
pub fn deadline_exceeded(deadline_ms: i64) -> String {
    format!("deadline exceeded ({deadline_ms} ms after the task started)")
}

/// How many queued steps one admission takes, given the in-flight bound and the batch size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// Steps to admit at most.
    pub take: i64,
    /// The in-flight bound is what limits this admission.
    pub bound_limits: bool,
}

/// Admission within `max_in_flight` on a queue that has `in_flight` dispatched steps, at most
/// `limit` at once.
pub fn admission(max_in_flight: i64, in_flight: i64, limit: i64) -> Admission {
    let room = max_in_flight - in_flight;
    Admission {
        take: room.min(limit).max(0),
        bound_limits: room <= limit,
    }
}

// ---------------------------------------------------------------------------------------------
// Operator actions on one step (console, API, CLI): retry a failed step, rerun from a step, mark
// a failed step succeeded; and the guard of bulk actions.
// ---------------------------------------------------------------------------------------------

/// A step of a task as an operator action sees it (mapped steps' instances apart: they are
/// addressed through their mapped step).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpStep {
    pub id: Uuid,
    pub name: String,
    pub state: StepState,
    pub skip_cause: Option<SkipCause>,
    pub child_ids: Vec<Uuid>,
    /// A mapped step (`map:`).
    pub mapped: bool,
    /// A decision step (`decides:`).
    pub decision: bool,
    /// The task's `on_failure` handler step.
    pub failure_handler: bool,
}

impl OpStep {
    /// Stopped by its task's halt (skipped because the task failed, or cancelled): it runs
    /// again when the task does.
    fn halt_stopped(&self) -> bool {
        self.state == StepState::Cancelled
            || (self.state == StepState::Skipped && self.skip_cause == Some(SkipCause::Halted))
    }
}

/// An operator action on one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepAction {
    /// Retry one failed step.
    Retry,
    /// Rerun from a step: it and everything that depends on it, transitively.
    Rerun,
    /// Mark a failed step succeeded with a given output.
    MarkSucceeded,
}

impl StepAction {
    /// The action's name in the audit log (and in refusals).
    pub const fn as_str(self) -> &'static str {
        match self {
            StepAction::Retry => "step.retry",
            StepAction::Rerun => "step.rerun",
            StepAction::MarkSucceeded => "step.mark_succeeded",
        }
    }

    /// The kind of the entry in the task's history.
    pub const fn event(self) -> &'static str {
        match self {
            StepAction::Retry => "step_retried",
            StepAction::Rerun => "rerun",
            StepAction::MarkSucceeded => "step_marked_succeeded",
        }
    }
}

/// What an operator action on a step writes (the task runs again, un-halted, in any case).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepActionPlan {
    /// Steps that wait again as on a task retry: failures reset, attempt numbers kept, a mapped
    /// step maps again over its failed, skipped and cancelled instances, a child-workflow step
    /// retries the same child. The retried step and every step the task's halt stopped
    /// (cancelled, or skipped because the task failed).
    pub again: Vec<Uuid>,
    /// Steps that wait again from scratch (rerun): outputs and errors dropped, a mapped step's
    /// instances deleted (it expands again from its parent's new output), a child-workflow step
    /// starts a new child task (the old one is left as it is), a decision decides again (the
    /// branches it did not choose are among these steps and wait again).
    pub fresh: Vec<Uuid>,
    /// The step that succeeds with the operator's output (mark succeeded).
    pub succeed: Option<Uuid>,
}

/// Why an operator action is refused, in words for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionRefused(pub String);

/// Decides an operator action on the step named `target` of a task in `state` (with its flags
/// `task`, read under its lock), given its steps.
///
/// Rules (every action):
/// - a task being cancelled (cancel requested, still running) is refused: it is about to end;
/// - a task whose `on_failure` handler is running is refused: it is about to fail;
/// - the step must exist (a mapped step's instances are not addressed on their own, nor is the
///   `on_failure` handler);
/// - no other step may stay failed: the task would still fail (refused, naming them: retry the
///   task, or rerun from an earlier step);
/// - the task runs again un-halted: every step its halt stopped (cancelled, or skipped because
///   the task failed) waits again; steps a decision did not choose stay skipped (unless a rerun
///   reaches them); the `on_failure` handler runs again if the task fails again.
///
/// Per action:
/// - **retry** (`retry_step`): only a `failed` step. It waits again with its failures reset
///   (as a task retry does: a mapped step maps again over its failed instances, a
///   child-workflow step retries the same child task).
/// - **rerun**: a finished step (succeeded, failed, cancelled, or skipped because its task
///   failed) with no step downstream of it in flight (queued, dispatched, retrying, or running
///   a child/its instances): it and every step that depends on it, transitively, wait again
///   from scratch ([`StepActionPlan::fresh`]). A step a decision did not choose (or skipped
///   because its parent was) is refused: rerun the decision. A step still waiting has nothing
///   to rerun.
/// - **mark succeeded**: only a `failed` step that is not a decision (a decision's success must
///   name its branches: retry it instead). It succeeds with the operator's output and its
///   children proceed.
pub fn plan_step_action(
    action: StepAction,
    state: TaskState,
    task: TaskNow,
    steps: &[OpStep],
    target: &str,
) -> Result<StepActionPlan, ActionRefused> {
    if state.is_live() && task.cancel_requested {
        return Err(ActionRefused(format!(
            "the task is being cancelled: {} is not possible",
            action.as_str()
        )));
    }
    if let Some(h) = steps
        .iter()
        .find(|s| s.failure_handler && !s.state.is_terminal())
    {
        return Err(ActionRefused(format!(
            "the task's on_failure handler ({}) is {}: wait for the task to fail",
            h.name, h.state
        )));
    }
    let Some(t) = steps
        .iter()
        .find(|s| s.name == target && !s.failure_handler)
    else {
        return Err(ActionRefused(format!("the task has no step {target:?}")));
    };
    let mut fresh: Vec<Uuid> = Vec::new();
    match action {
        StepAction::Retry | StepAction::MarkSucceeded => {
            if t.state != StepState::Failed {
                return Err(ActionRefused(format!(
                    "step {target:?} is {}: only a failed step can be {}",
                    t.state,
                    if action == StepAction::Retry {
                        "retried"
                    } else {
                        "marked succeeded"
                    }
                )));
            }
            if action == StepAction::MarkSucceeded && t.decision {
                return Err(ActionRefused(format!(
                    "step {target:?} is a decision: its success must name its branches; retry it instead"
                )));
            }
        }
        StepAction::Rerun => {
            match t.state {
                StepState::Succeeded | StepState::Failed | StepState::Cancelled => {}
                StepState::Skipped if t.skip_cause == Some(SkipCause::Halted) => {}
                StepState::Skipped => {
                    return Err(ActionRefused(format!(
                        "step {target:?} was skipped by a decision (or after a skipped parent): rerun the decision instead"
                    )));
                }
                s => {
                    return Err(ActionRefused(format!(
                        "step {target:?} is {s}: only a finished step can be rerun"
                    )));
                }
            }
            let by_id: HashMap<Uuid, &OpStep> = steps.iter().map(|s| (s.id, s)).collect();
            let mut seen: std::collections::HashSet<Uuid> = Default::default();
            let mut work = vec![t.id];
            while let Some(id) = work.pop() {
                if !seen.insert(id) {
                    continue;
                }
                let Some(s) = by_id.get(&id) else { continue };
                if s.id != t.id && !matches!(s.state, StepState::Waiting) && !s.state.is_terminal()
                {
                    return Err(ActionRefused(format!(
                        "step {:?}, downstream of {target:?}, is {}: wait for it to finish (or cancel the task) before rerunning",
                        s.name, s.state
                    )));
                }
                fresh.push(id);
                work.extend(s.child_ids.iter().copied());
            }
            fresh.sort();
        }
    }
    let in_fresh = |id: &Uuid| fresh.binary_search(id).is_ok();
    let still_failed: Vec<&str> = steps
        .iter()
        .filter(|s| {
            s.state == StepState::Failed && !s.failure_handler && s.id != t.id && !in_fresh(&s.id)
        })
        .map(|s| s.name.as_str())
        .collect();
    if !still_failed.is_empty() {
        return Err(ActionRefused(format!(
            "other failed steps would still fail the task ({}): retry the task, or rerun from an earlier step",
            still_failed.join(", ")
        )));
    }
    let mut again: Vec<Uuid> = steps
        .iter()
        .filter(|s| !s.failure_handler && !in_fresh(&s.id) && s.halt_stopped())
        .map(|s| s.id)
        .collect();
    let succeed = match action {
        StepAction::Retry => {
            again.push(t.id);
            None
        }
        StepAction::MarkSucceeded => Some(t.id),
        StepAction::Rerun => None,
    };
    again.sort();
    Ok(StepActionPlan {
        again,
        fresh,
        succeed,
    })
}

/// What replaying a dead step message does: republishing the old message would be stale (its
/// attempt was already recorded as failed by the dead step consumer), so the step itself is
/// retried ([`plan_step_action`], [`StepAction::Retry`]) if its task still needs it: the step
/// is `failed`. Otherwise nothing is needed and the dead letter is only removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadStepReplay {
    /// Retry the step (its task runs again if it had failed).
    RetryStep,
    /// Nothing to replay: the words say why.
    NotNeeded(String),
}

/// [`DeadStepReplay`] for a step in `step` state (`None`: the task or the step is gone).
pub fn dead_step_replay(task: Option<TaskState>, step: Option<StepState>) -> DeadStepReplay {
    match (task, step) {
        (None, _) => DeadStepReplay::NotNeeded("its task no longer exists".into()),
        (Some(_), None) => DeadStepReplay::NotNeeded("its step no longer exists".into()),
        (Some(_), Some(StepState::Failed)) => DeadStepReplay::RetryStep,
        (Some(t), Some(s)) => DeadStepReplay::NotNeeded(format!(
            "its step is {s} (task {t}): it moved on after its dead attempt"
        )),
    }
}

/// Most tasks one bulk action (cancel, retry) acts on; a filter matching more is refused
/// (narrow it, e.g. by time range).
pub const MAX_BULK_TASKS: u64 = 10_000;

/// Whether a bulk action may go ahead: `seen` is the count the operator was shown (and
/// confirmed), `now` the count matching the filter now (counted up to [`MAX_BULK_TASKS`] + 1).
/// Rule: refused when more tasks match now than the operator saw (the filter caught tasks the
/// operator did not confirm), or when more than [`MAX_BULK_TASKS`] match; fewer is fine (some
/// finished or were acted on meanwhile): the action applies to those that match now.
pub fn bulk_allowed(seen: u64, now: u64) -> Result<(), ActionRefused> {
    if now > MAX_BULK_TASKS {
        return Err(ActionRefused(format!(
            "more than {MAX_BULK_TASKS} tasks match; narrow the filter (e.g. by time range)"
        )));
    }
    if now > seen {
        return Err(ActionRefused(format!(
            "{now} tasks match now, more than the {seen} confirmed; count again and confirm the new number"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod operate_tests {
    use super::*;

    fn s(n: u128, name: &str, state: StepState, children: &[u128]) -> OpStep {
        OpStep {
            id: Uuid::from_u128(n),
            name: name.into(),
            state,
            skip_cause: None,
            child_ids: children.iter().map(|c| Uuid::from_u128(*c)).collect(),
            mapped: false,
            decision: false,
            failure_handler: false,
        }
    }

    fn halted(mut st: OpStep) -> OpStep {
        st.skip_cause = Some(SkipCause::Halted);
        st
    }

    fn ids(list: &[u128]) -> Vec<Uuid> {
        list.iter().map(|n| Uuid::from_u128(*n)).collect()
    }

    /// a → b → c, d independent; b failed, c skipped by the halt, d cancelled.
    fn failed_task() -> Vec<OpStep> {
        vec![
            s(1, "a", StepState::Succeeded, &[2]),
            s(2, "b", StepState::Failed, &[3]),
            halted(s(3, "c", StepState::Skipped, &[])),
            s(4, "d", StepState::Cancelled, &[]),
        ]
    }

    #[test]
    fn retrying_a_failed_step_revives_what_the_halt_stopped() {
        let plan = plan_step_action(
            StepAction::Retry,
            TaskState::Failed,
            TaskNow::default(),
            &failed_task(),
            "b",
        )
        .unwrap();
        assert_eq!(plan.again, ids(&[2, 3, 4]));
        assert!(plan.fresh.is_empty());
        assert_eq!(plan.succeed, None);
        // Only a failed step.
        let e = plan_step_action(
            StepAction::Retry,
            TaskState::Failed,
            TaskNow::default(),
            &failed_task(),
            "a",
        )
        .unwrap_err();
        assert!(e.0.contains("only a failed step"), "{}", e.0);
    }

    #[test]
    fn another_failed_step_or_a_cancelling_task_refuses() {
        let mut steps = failed_task();
        steps[3].state = StepState::Failed;
        let e = plan_step_action(
            StepAction::Retry,
            TaskState::Failed,
            TaskNow::default(),
            &steps,
            "b",
        )
        .unwrap_err();
        assert!(e.0.contains("(d)"), "{}", e.0);
        let cancelling = TaskNow {
            failing: false,
            cancel_requested: true,
        };
        let e = plan_step_action(
            StepAction::Retry,
            TaskState::Running,
            cancelling,
            &failed_task(),
            "b",
        )
        .unwrap_err();
        assert!(e.0.contains("being cancelled"));
        // A cancelled task (finished) may be acted on.
        assert!(
            plan_step_action(
                StepAction::Retry,
                TaskState::Cancelled,
                cancelling,
                &failed_task(),
                "b"
            )
            .is_ok()
        );
        let e = plan_step_action(
            StepAction::Retry,
            TaskState::Failed,
            TaskNow::default(),
            &failed_task(),
            "zz",
        )
        .unwrap_err();
        assert!(e.0.contains("no step \"zz\""));
    }

    #[test]
    fn rerun_resets_the_step_and_everything_downstream_from_scratch() {
        // a → b → c, a → d; all succeeded; a task that completed.
        let steps = vec![
            s(1, "a", StepState::Succeeded, &[2, 4]),
            s(2, "b", StepState::Succeeded, &[3]),
            s(3, "c", StepState::Succeeded, &[]),
            s(4, "d", StepState::Succeeded, &[]),
            s(5, "e", StepState::Succeeded, &[]),
        ];
        let plan = plan_step_action(
            StepAction::Rerun,
            TaskState::Completed,
            TaskNow::default(),
            &steps,
            "b",
        )
        .unwrap();
        assert_eq!(plan.fresh, ids(&[2, 3]));
        assert!(plan.again.is_empty());
        let plan = plan_step_action(
            StepAction::Rerun,
            TaskState::Completed,
            TaskNow::default(),
            &steps,
            "a",
        )
        .unwrap();
        assert_eq!(plan.fresh, ids(&[1, 2, 3, 4]));
    }

    #[test]
    fn rerun_from_a_failed_task_covers_its_failure_and_revives_the_rest() {
        // Rerun from a (upstream of the failed b): b is in the rerun, d waits again.
        let plan = plan_step_action(
            StepAction::Rerun,
            TaskState::Failed,
            TaskNow::default(),
            &failed_task(),
            "a",
        )
        .unwrap();
        assert_eq!(plan.fresh, ids(&[1, 2, 3]));
        assert_eq!(plan.again, ids(&[4]));
        // Rerun from d leaves b failed: refused.
        let e = plan_step_action(
            StepAction::Rerun,
            TaskState::Failed,
            TaskNow::default(),
            &failed_task(),
            "d",
        )
        .unwrap_err();
        assert!(e.0.contains("(b)"), "{}", e.0);
    }

    #[test]
    fn rerun_refuses_live_downstream_steps_and_unchosen_branches() {
        let mut steps = vec![
            s(1, "a", StepState::Succeeded, &[2]),
            s(2, "b", StepState::Dispatched, &[]),
            s(3, "c", StepState::Waiting, &[]),
        ];
        let e = plan_step_action(
            StepAction::Rerun,
            TaskState::Running,
            TaskNow::default(),
            &steps,
            "a",
        )
        .unwrap_err();
        assert!(
            e.0.contains("\"b\"") && e.0.contains("dispatched"),
            "{}",
            e.0
        );
        let e = plan_step_action(
            StepAction::Rerun,
            TaskState::Running,
            TaskNow::default(),
            &steps,
            "c",
        )
        .unwrap_err();
        assert!(e.0.contains("only a finished step"));
        steps[1].state = StepState::Skipped;
        steps[1].skip_cause = Some(SkipCause::NotChosen);
        let e = plan_step_action(
            StepAction::Rerun,
            TaskState::Completed,
            TaskNow::default(),
            &steps,
            "b",
        )
        .unwrap_err();
        assert!(e.0.contains("rerun the decision"));
        // Rerunning the decision itself resets the unchosen branch too.
        steps[0].decision = true;
        let plan = plan_step_action(
            StepAction::Rerun,
            TaskState::Completed,
            TaskNow::default(),
            &steps,
            "a",
        )
        .unwrap();
        assert_eq!(plan.fresh, ids(&[1, 2]));
    }

    #[test]
    fn mark_succeeded_takes_a_failed_step_that_is_not_a_decision() {
        let plan = plan_step_action(
            StepAction::MarkSucceeded,
            TaskState::Failed,
            TaskNow::default(),
            &failed_task(),
            "b",
        )
        .unwrap();
        assert_eq!(plan.succeed, Some(Uuid::from_u128(2)));
        assert_eq!(plan.again, ids(&[3, 4]));
        let mut steps = failed_task();
        steps[1].decision = true;
        let e = plan_step_action(
            StepAction::MarkSucceeded,
            TaskState::Failed,
            TaskNow::default(),
            &steps,
            "b",
        )
        .unwrap_err();
        assert!(e.0.contains("decision"));
        // A running, failing task (its halt under way) may be acted on.
        let failing = TaskNow {
            failing: true,
            cancel_requested: false,
        };
        assert!(
            plan_step_action(
                StepAction::MarkSucceeded,
                TaskState::Running,
                failing,
                &failed_task(),
                "b"
            )
            .is_ok()
        );
    }

    #[test]
    fn the_failure_handler_is_neither_a_target_nor_a_blocker() {
        let mut steps = failed_task();
        let mut h = s(9, "b", StepState::Failed, &[]);
        h.failure_handler = true;
        steps.insert(0, h);
        let plan = plan_step_action(
            StepAction::Retry,
            TaskState::Failed,
            TaskNow::default(),
            &steps,
            "b",
        )
        .unwrap();
        assert_eq!(plan.again, ids(&[2, 3, 4]));
        // While it runs, nothing can be done.
        steps[0].state = StepState::Dispatched;
        let e = plan_step_action(
            StepAction::Retry,
            TaskState::Running,
            TaskNow::default(),
            &steps,
            "b",
        )
        .unwrap_err();
        assert!(e.0.contains("on_failure handler"), "{}", e.0);
    }

    #[test]
    fn a_dead_step_is_replayed_as_a_retry_only_while_its_step_is_failed() {
        assert_eq!(
            dead_step_replay(Some(TaskState::Failed), Some(StepState::Failed)),
            DeadStepReplay::RetryStep
        );
        for s in [
            StepState::Succeeded,
            StepState::Retrying,
            StepState::Queued,
            StepState::Cancelled,
        ] {
            assert!(matches!(
                dead_step_replay(Some(TaskState::Running), Some(s)),
                DeadStepReplay::NotNeeded(_)
            ));
        }
        assert_eq!(
            dead_step_replay(None, None),
            DeadStepReplay::NotNeeded("its task no longer exists".into())
        );
        assert!(matches!(
            dead_step_replay(Some(TaskState::Completed), None),
            DeadStepReplay::NotNeeded(_)
        ));
    }

    #[test]
    fn a_bulk_action_refuses_more_than_was_confirmed_or_the_cap() {
        assert!(bulk_allowed(10, 10).is_ok());
        assert!(bulk_allowed(10, 7).is_ok());
        assert!(bulk_allowed(0, 0).is_ok());
        let e = bulk_allowed(10, 11).unwrap_err();
        assert!(e.0.contains("11 tasks match now"), "{}", e.0);
        assert!(bulk_allowed(MAX_BULK_TASKS, MAX_BULK_TASKS).is_ok());
        let e = bulk_allowed(MAX_BULK_TASKS + 5, MAX_BULK_TASKS + 1).unwrap_err();
        assert!(e.0.contains("narrow the filter"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tasker_schemas::Millis;

    const POLICY: Policy = Policy {
        max_output_bytes: 1024,
        handler_missing_delay_ms: 1_000,
        max_task_output_bytes: 4096,
    };

    fn task() -> Uuid {
        Uuid::from_u128(1)
    }

    fn step(n: u128, failures: i32, max_attempts: i32, children: &[u128]) -> StepNow {
        StepNow {
            id: Uuid::from_u128(100 + n),
            task_id: task(),
            namespace: "ns".into(),
            name: format!("s{n}"),
            state: StepState::Dispatched,
            attempt: failures + 1,
            failures,
            max_attempts,
            retry_policy: json!({"max_attempts": max_attempts, "initial_delay": "1s",
                                 "multiplier": 2.0, "max_delay": "10s", "jitter": 0.5}),
            child_ids: children.iter().map(|c| Uuid::from_u128(100 + c)).collect(),
            dispatched_at: None,
            started_at: None,
            decides: None,
            child_names: children.iter().map(|c| format!("s{c}")).collect(),
            instance_of: None,
            failure_handler: false,
            workflow: false,
            timed: false,
            queue_wait_timeout_ms: 60_000,
            missing: None,
        }
    }

    fn decided(output: Value, branches: Option<&[&str]>) -> AttemptResult {
        AttemptResult::Succeeded {
            output,
            branches: branches.map(|b| b.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn a_decision_skips_the_branches_it_did_not_choose() {
        // s1 decides between s2 and s3; s4 is an ordinary child.
        let mut d = step(1, 0, 3, &[2, 3, 4]);
        d.decides = Some(vec!["s2".into(), "s3".into()]);
        let st = steps(vec![d]);
        let s = &st[&Uuid::from_u128(101)];
        let batch = [report(s, decided(json!(1), Some(&["s2"])))];
        let p = plan(&batch, &st, TaskNow::default());
        assert_eq!(p.changes[0].to, StepState::Succeeded);
        assert_eq!(
            p.children,
            BTreeMap::from([(Uuid::from_u128(102), 1), (Uuid::from_u128(104), 1)])
        );
        assert_eq!(p.skips.len(), 1);
        assert_eq!(
            (
                p.skips[0].step,
                p.skips[0].cause,
                p.skips[0].reason.as_str()
            ),
            (
                Uuid::from_u128(103),
                SkipCause::NotChosen,
                "not chosen by s1"
            )
        );
        // Choosing none skips both branches.
        let batch = [report(s, decided(json!(1), Some(&[])))];
        let p = plan(&batch, &st, TaskNow::default());
        assert_eq!(p.skips.len(), 2);
        assert_eq!(p.children, BTreeMap::from([(Uuid::from_u128(104), 1)]));
        // A halted task skips nothing itself (the halt does).
        let batch = [report(s, decided(json!(1), Some(&["s2"])))];
        let p = plan(
            &batch,
            &st,
            TaskNow {
                failing: true,
                cancel_requested: false,
            },
        );
        assert!(p.skips.is_empty() && p.children.is_empty());
    }

    #[test]
    fn bad_branches_are_a_permanent_failure() {
        let mut d = step(1, 0, 3, &[2, 3]);
        d.decides = Some(vec!["s2".into(), "s3".into()]);
        let plain = step(5, 0, 3, &[2]);
        let st = steps(vec![d, plain]);
        let d = &st[&Uuid::from_u128(101)];
        let plain = &st[&Uuid::from_u128(105)];
        for (s, result, expected) in [
            (
                d,
                decided(json!(1), Some(&["s9"])),
                "chose unknown branch \"s9\": it may choose from [s2, s3]",
            ),
            (
                d,
                decided(json!(1), None),
                "its result must name the chosen branches",
            ),
            (
                plain,
                decided(json!(1), Some(&["s2"])),
                "declares no decides",
            ),
        ] {
            let batch = [report(s, result)];
            let p = plan(&batch, &st, TaskNow::default());
            let c = &p.changes[0];
            assert_eq!(
                (c.to, c.outcome),
                (StepState::Failed, AttemptOutcome::Failed)
            );
            assert!(c.error.as_deref().unwrap().contains(expected), "{c:?}");
            assert!(p.failing.contains_key(&task()));
            assert!(p.children.is_empty() && p.skips.is_empty());
        }
    }

    #[test]
    fn instances_count_toward_their_map_and_failures_are_tolerated_up_to_the_limit() {
        let map = Uuid::from_u128(900);
        let mut a = step(1, 0, 1, &[]);
        a.instance_of = Some(InstanceOf {
            map,
            tolerate: 1,
            failed: 0,
        });
        let mut b = step(2, 0, 1, &[]);
        b.instance_of = a.instance_of;
        let mut c = step(3, 0, 1, &[]);
        c.instance_of = a.instance_of;
        let st = steps(vec![a, b, c]);
        let r = |n: u128, result| report(&st[&Uuid::from_u128(100 + n)], result);
        let batch = [
            r(
                1,
                AttemptResult::Succeeded {
                    output: json!(1),
                    branches: None,
                },
            ),
            r(2, failed(false)),
        ];
        let p = plan(&batch, &st, TaskNow::default());
        assert_eq!(
            p.instances[&map],
            InstancesDone {
                task: task(),
                done: 2,
                failed: 1
            }
        );
        assert!(p.failing.is_empty(), "one failure is tolerated");
        assert_eq!(p.terminal[&task()], 2);
        // The second failure is one too many.
        let batch = [r(2, failed(false)), r(3, failed(false))];
        let p = plan(&batch, &st, TaskNow::default());
        assert!(p.failing.contains_key(&task()));
        // A retried instance is not done.
        let mut retrying = step(4, 0, 3, &[]);
        retrying.instance_of = Some(InstanceOf {
            map,
            tolerate: 0,
            failed: 0,
        });
        let st = steps(vec![retrying]);
        let batch = [report(&st[&Uuid::from_u128(104)], failed(true))];
        let p = plan(&batch, &st, TaskNow::default());
        assert!(p.instances.is_empty() && p.failing.is_empty());
    }

    fn node(
        name: &str,
        state: StepState,
        join_any: bool,
        parents: &[u128],
        children: &[u128],
    ) -> GraphStep {
        GraphStep {
            name: name.into(),
            state,
            join_any,
            parent_ids: parents.iter().map(|p| Uuid::from_u128(*p)).collect(),
            child_ids: children.iter().map(|c| Uuid::from_u128(*c)).collect(),
            pending_parents: parents.len() as i32,
            mapped: false,
        }
    }

    fn seed(n: u128) -> Skip {
        Skip {
            step: Uuid::from_u128(n),
            task: task(),
            cause: SkipCause::NotChosen,
            reason: "not chosen by route".into(),
        }
    }

    #[test]
    fn skips_propagate_through_join_all_and_join_any() {
        use StepState::*;
        // route(1) -> express(2), standard(3); ship(4) join any of 2, 3; notify(5) join all of 2;
        // audit(6) join all of 4.
        let graph: HashMap<Uuid, GraphStep> = [
            (1, node("route", Succeeded, false, &[], &[2, 3])),
            (2, node("express", Waiting, false, &[1], &[4, 5])),
            (3, node("standard", Waiting, false, &[1], &[4])),
            (4, node("ship", Waiting, true, &[2, 3], &[6])),
            (5, node("notify", Waiting, false, &[2], &[])),
            (6, node("audit", Waiting, false, &[4], &[])),
        ]
        .into_iter()
        .map(|(k, v)| (Uuid::from_u128(k), v))
        .collect();
        // Only express not chosen: notify skipped (join all), ship waits for standard.
        let p = propagate_skips(&graph, &[seed(2)]);
        let skipped: Vec<(u128, SkipCause)> = p
            .skipped
            .iter()
            .map(|s| (s.step.as_u128(), s.cause))
            .collect();
        assert_eq!(
            skipped,
            vec![(2, SkipCause::NotChosen), (5, SkipCause::ParentSkipped)]
        );
        assert_eq!(p.skipped[1].reason, "parent express was skipped");
        assert_eq!(p.pending, BTreeMap::from([(Uuid::from_u128(4), 1)]));
        assert!(p.ready.is_empty());
        // Neither chosen: ship skipped (every parent skipped), audit after it.
        let p = propagate_skips(&graph, &[seed(2), seed(3)]);
        let skipped: Vec<u128> = p.skipped.iter().map(|s| s.step.as_u128()).collect();
        assert_eq!(skipped, vec![2, 3, 5, 4, 6]);
        assert_eq!(p.skipped[3].reason, "every parent was skipped");
        assert!(p.pending.is_empty() && p.ready.is_empty());
        // standard already succeeded (ship has one pending parent): skipping express runs ship.
        let mut g = graph.clone();
        g.get_mut(&Uuid::from_u128(3)).unwrap().state = Succeeded;
        g.get_mut(&Uuid::from_u128(4)).unwrap().pending_parents = 1;
        let p = propagate_skips(&g, &[seed(2)]);
        assert_eq!(p.ready, vec![Uuid::from_u128(4)]);
        // A seed no longer waiting is left alone.
        let p = propagate_skips(&g, &[seed(3)]);
        assert_eq!(p, Propagation::default());
    }

    #[test]
    fn a_map_starts_with_instances_an_empty_output_or_a_clear_failure() {
        assert_eq!(expand("l.x", Some("array"), Some(0), 10), Expansion::Empty);
        assert_eq!(
            expand("l.x", Some("array"), Some(10), 10),
            Expansion::Instances { total: 10 }
        );
        let Expansion::Fail(e) = expand("l.x", Some("array"), Some(11), 10) else {
            panic!()
        };
        assert!(e.contains("found 11 elements; at most 10"), "{e}");
        let Expansion::Fail(e) = expand("l.x", Some("object"), None, 10) else {
            panic!()
        };
        assert!(e.contains("found object, not an array"), "{e}");
        let Expansion::Fail(e) = expand("l.x", None, None, 10) else {
            panic!()
        };
        assert!(e.contains("nothing at that path"), "{e}");
    }

    #[test]
    fn long_error_texts_are_cut_and_say_so() {
        assert_eq!(capped_error("short"), "short");
        assert_eq!(
            capped_error("a\0b"),
            "a\u{FFFD}b",
            "PostgreSQL text holds no NUL"
        );
        let long = "é".repeat(MAX_ERROR_BYTES); // 2 bytes each: the cut falls inside one
        let cut = capped_error(&long);
        assert!(cut.len() < MAX_ERROR_BYTES + 80, "{}", cut.len());
        assert!(cut.ends_with(&format!(
            "(cut: {} bytes, at most 4096 are kept)",
            2 * MAX_ERROR_BYTES
        )));
        let st = steps(vec![step(1, 0, 1, &[])]);
        let batch = [report(
            &st[&Uuid::from_u128(101)],
            AttemptResult::Failed {
                error: "x".repeat(10_000),
                retryable: false,
                retry_after_ms: None,
            },
        )];
        let p = plan(&batch, &st, TaskNow::default());
        assert!(p.changes[0].error.as_deref().unwrap().len() < MAX_ERROR_BYTES + 80);
    }

    #[test]
    fn a_missing_handler_is_offered_again_within_the_queue_wait_timeout_then_fails() {
        let mut s = step(1, 0, 1, &[]);
        s.queue_wait_timeout_ms = 5_000;
        let missing = || AttemptResult::HandlerMissing {
            handler: "ghost".into(),
        };
        // The first offer starts a streak.
        let st = steps(vec![s.clone()]);
        let batch = [report(&st[&Uuid::from_u128(101)], missing())];
        let p = plan(&batch, &st, TaskNow::default());
        let c = &p.changes[0];
        assert_eq!((c.to, c.failures), (StepState::Retrying, 0));
        assert_eq!(
            (c.missing_from, c.missing_workers.clone()),
            (Some(1), vec!["w1".to_string()])
        );
        // Later offers continue it (one history row), still within the timeout.
        s.attempt = 4;
        s.missing = Some(MissingStreak {
            first_attempt: 1,
            workers: vec!["w0".into()],
            for_ms: 3_000,
        });
        let st = steps(vec![s.clone()]);
        let batch = [report(&st[&Uuid::from_u128(101)], missing())];
        let p = plan(&batch, &st, TaskNow::default());
        let c = &p.changes[0];
        assert_eq!(c.to, StepState::Retrying);
        assert_eq!(
            (c.missing_from, c.missing_workers.clone()),
            (Some(1), vec!["w0".to_string(), "w1".to_string()])
        );
        // Past the queue-wait timeout: the step fails for good, naming handler and workers.
        s.missing = Some(MissingStreak {
            first_attempt: 1,
            workers: vec!["w0".into()],
            for_ms: 5_000,
        });
        let st = steps(vec![s]);
        let batch = [report(&st[&Uuid::from_u128(101)], missing())];
        let p = plan(&batch, &st, TaskNow::default());
        let c = &p.changes[0];
        assert_eq!(
            (c.to, c.outcome),
            (StepState::Failed, AttemptOutcome::HandlerMissing)
        );
        assert_eq!(
            c.error.as_deref().unwrap(),
            "no worker has handler \"ghost\": reported missing by w0, w1 for 5000 ms (queue_wait_timeout 5000 ms)"
        );
        assert!(p.failing.contains_key(&task()));
        // Any other outcome ends the streak.
        let mut s = step(2, 0, 3, &[]);
        s.missing = Some(MissingStreak {
            first_attempt: 1,
            workers: vec![],
            for_ms: 10,
        });
        let st = steps(vec![s]);
        let batch = [report(&st[&Uuid::from_u128(102)], failed(true))];
        let p = plan(&batch, &st, TaskNow::default());
        assert_eq!(p.changes[0].missing_from, None);
    }

    #[test]
    fn child_workflows_start_once_retry_the_same_child_and_are_bounded_in_depth() {
        assert_eq!(child_start(0, None), ChildStart::Create { depth: 1 });
        assert_eq!(child_start(7, None), ChildStart::Create { depth: 8 });
        let ChildStart::Fail(e) = child_start(8, None) else {
            panic!()
        };
        assert_eq!(e, "child workflow depth 9 exceeds the limit of 8");
        assert_eq!(child_start(0, Some(TaskState::Failed)), ChildStart::Retry);
        assert_eq!(
            child_start(0, Some(TaskState::Cancelled)),
            ChildStart::Retry
        );
        assert_eq!(child_start(0, Some(TaskState::Running)), ChildStart::Wait);
        let child = TaskId(Uuid::from_u128(5));
        assert_eq!(
            child_finished(child, TaskState::Completed, Some(json!({"a": 1})), None),
            AttemptResult::Succeeded {
                output: json!({"a": 1}),
                branches: None
            }
        );
        let AttemptResult::Failed {
            retryable, error, ..
        } = child_finished(child, TaskState::Failed, None, Some("boom"))
        else {
            panic!()
        };
        assert!(retryable && error.ends_with("failed: boom"), "{error}");
        let AttemptResult::Failed { retryable, .. } =
            child_finished(child, TaskState::Cancelled, None, None)
        else {
            panic!()
        };
        assert!(
            !retryable,
            "a child cancelled directly fails its step for good"
        );
    }

    #[test]
    fn a_child_context_is_the_parents_outputs_or_a_mapping() {
        let parents = json!({"validate": {"order": {"id": 7, "lines": [{"sku": "a"}]}}});
        assert_eq!(child_context(None, &parents, None), parents);
        assert_eq!(
            child_context(None, &json!({}), Some((&json!("x"), 3))),
            json!({"item": "x", "index": 3})
        );
        let mapping = BTreeMap::from([
            ("order".to_string(), "validate.order.id".to_string()),
            (
                "first".to_string(),
                "validate.order.lines.0.sku".to_string(),
            ),
            ("missing".to_string(), "validate.nope".to_string()),
            ("it".to_string(), "item.k".to_string()),
        ]);
        assert_eq!(
            child_context(Some(&mapping), &parents, Some((&json!({"k": true}), 0))),
            json!({"order": 7, "first": "a", "missing": null, "it": true})
        );
    }

    #[test]
    fn the_window_never_lets_more_than_max_parallel_live() {
        let m = MapNow {
            max_parallel: 3,
            total: Some(10),
            ..MapNow::default()
        };
        assert_eq!(
            map_window(&m, false),
            Window {
                readmit: 0,
                create: 3
            }
        );
        let m = MapNow {
            live: 2,
            created: 3,
            done: 1,
            ..m
        };
        assert_eq!(
            map_window(&m, false),
            Window {
                readmit: 0,
                create: 1
            }
        );
        let m = MapNow {
            live: 0,
            waiting: 2,
            created: 10,
            done: 8,
            ..m
        };
        assert_eq!(
            map_window(&m, false),
            Window {
                readmit: 2,
                create: 0
            }
        );
        let m = MapNow {
            live: 3,
            created: 5,
            ..m
        };
        assert_eq!(map_window(&m, false), Window::default());
        let m = MapNow {
            live: 0,
            created: 5,
            ..m
        };
        assert_eq!(
            map_window(&m, true),
            Window::default(),
            "a halted task lets none in"
        );
        // Randomised: whatever finishes, live never exceeds max_parallel.
        let mut m = MapNow {
            max_parallel: 7,
            total: Some(1000),
            ..MapNow::default()
        };
        let mut seed = 17u64;
        while m.done < 1000 {
            let w = map_window(&m, false);
            m.created += w.create;
            m.live += w.create + w.readmit;
            assert!(m.live <= m.max_parallel);
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let finished = ((seed >> 33) as i32 % m.live.max(1)) + 1;
            let finished = finished.min(m.live);
            m.live -= finished;
            m.done += finished;
        }
    }

    #[test]
    fn a_map_finishes_when_every_instance_has_and_tolerates_failures() {
        let m = MapNow {
            max_parallel: 2,
            tolerate: 1,
            total: Some(3),
            created: 3,
            done: 3,
            failed: 1,
            ..MapNow::default()
        };
        assert_eq!(map_finished(&m, None), Some((StepState::Succeeded, None)));
        let m2 = MapNow { failed: 2, ..m };
        let (state, error) = map_finished(&m2, None).unwrap();
        assert_eq!(state, StepState::Failed);
        assert_eq!(error.unwrap(), "2 of 3 instances failed (tolerate: 1)");
        assert_eq!(
            map_finished(
                &MapNow {
                    done: 2,
                    live: 1,
                    ..m
                },
                None
            ),
            None
        );
        assert_eq!(
            map_finished(
                &MapNow {
                    created: 2,
                    done: 2,
                    ..m
                },
                None
            ),
            None
        );
        assert_eq!(map_finished(&MapNow { total: None, ..m }, None), None);
        // Halted: ends when nothing is live.
        let halted = MapNow {
            created: 2,
            done: 1,
            live: 1,
            ..m
        };
        assert_eq!(map_finished(&halted, Some(StepState::Skipped)), None);
        let halted = MapNow { live: 0, ..halted };
        assert_eq!(
            map_finished(&halted, Some(StepState::Cancelled)),
            Some((StepState::Cancelled, None))
        );
        let halted = MapNow {
            failed: 2,
            ..halted
        };
        assert_eq!(
            map_finished(&halted, Some(StepState::Skipped)).unwrap().0,
            StepState::Failed
        );
    }

    fn report(s: &StepNow, result: AttemptResult) -> Finished {
        Finished {
            task_id: TaskId(s.task_id),
            step_id: StepId(s.id),
            attempt: s.attempt,
            worker: Some("w1".into()),
            result,
            duration_ms: None,
        }
    }

    fn failed(retryable: bool) -> AttemptResult {
        AttemptResult::Failed {
            error: "boom".into(),
            retryable,
            retry_after_ms: None,
        }
    }

    fn steps(list: Vec<StepNow>) -> HashMap<Uuid, StepNow> {
        list.into_iter().map(|s| (s.id, s)).collect()
    }

    fn live(t: TaskNow) -> HashMap<Uuid, TaskNow> {
        HashMap::from([(task(), t)])
    }

    fn plan<'a>(
        batch: &'a [Finished],
        steps: &'a HashMap<Uuid, StepNow>,
        t: TaskNow,
    ) -> BatchPlan<'a> {
        plan_batch(batch, steps, &live(t), &POLICY, &mut || 0.5)
    }

    fn t(text: &str) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&chrono::Utc)
    }

    #[test]
    fn a_timed_step_wakes_after_its_sleep_at_its_time_or_at_its_timeout() {
        use tasker_schemas::Wait;
        let now = t("2026-12-02T10:00:00Z");
        let sleep = Wait::Sleep { ms: 600_000 };
        assert_eq!(
            wait_start(&sleep, now, None, false),
            WaitStart::Until(t("2026-12-02T10:10:00Z"))
        );
        let until = Wait::SleepUntil {
            path: "a.at".into(),
        };
        // A future time, and a past one (due at once: the timers wake what is due).
        for at in ["2026-12-03T08:00:00+01:00", "2000-01-01T00:00:00Z"] {
            assert_eq!(
                wait_start(&until, now, Some(&json!(at)), false),
                WaitStart::Until(t(at))
            );
        }
        for (found, says) in [
            (None, "has no time at that path"),
            (Some(json!(null)), "has no time at that path"),
            (Some(json!(42)), "found a number, not an RFC 3339 time"),
            (
                Some(json!("tomorrow")),
                "\"tomorrow\" is not an RFC 3339 time",
            ),
        ] {
            let WaitStart::Fail(error) = wait_start(&until, now, found.as_ref(), false) else {
                panic!("{found:?} must fail");
            };
            assert!(error.starts_with("sleep_until \"a.at\""), "{error}");
            assert!(error.contains(says), "{error}");
        }
        let signal = Wait::Signal {
            name: "approval".into(),
            timeout_ms: 3_600_000,
            default: None,
        };
        // The timeout starts when the step is ready; a kept signal taken wakes it at once.
        assert_eq!(
            wait_start(&signal, now, None, false),
            WaitStart::Until(t("2026-12-02T11:00:00Z"))
        );
        assert_eq!(wait_start(&signal, now, None, true), WaitStart::Until(now));
        // Bounded even if a stored duration is not.
        assert_eq!(
            wait_start(&Wait::Sleep { ms: u64::MAX }, now, None, false),
            WaitStart::Until(now + chrono::Duration::milliseconds(MAX_WAIT_MS as i64))
        );
    }

    #[test]
    fn a_woken_step_succeeds_with_woke_at_a_payload_or_its_default_or_fails_on_timeout() {
        use tasker_schemas::Wait;
        let now = t("2026-12-02T10:00:00.250Z");
        let ok = |output: Value| AttemptResult::Succeeded {
            output,
            branches: None,
        };
        assert_eq!(
            wake(&Wait::Sleep { ms: 1 }, now, None),
            ok(json!({"woke_at": "2026-12-02T10:00:00.250Z"}))
        );
        let signal = |default: Option<Value>| Wait::Signal {
            name: "approval".into(),
            timeout_ms: 400,
            default,
        };
        // The step's output is the payload itself, whatever it is (null included).
        assert_eq!(
            wake(&signal(None), now, Some(json!({"ok": true}))),
            ok(json!({"ok": true}))
        );
        assert_eq!(wake(&signal(None), now, Some(Value::Null)), ok(Value::Null));
        assert_eq!(
            wake(&signal(Some(json!({"approved": false}))), now, None),
            ok(json!({"approved": false}))
        );
        for no_default in [None, Some(Value::Null)] {
            assert_eq!(
                wake(&signal(no_default), now, None),
                AttemptResult::Failed {
                    error: "timed out: no signal \"approval\" within 400 ms".into(),
                    retryable: false,
                    retry_after_ms: None,
                }
            );
        }
    }

    #[test]
    fn a_woken_timed_step_is_applied_like_a_result_and_a_stale_wake_is_not() {
        let mut s = step(1, 0, 3, &[2]);
        s.state = StepState::Delegated;
        s.timed = true;
        let st = steps(vec![s.clone()]);
        let woke = ok_output(json!({"woke_at": "x"}));
        let batch = [report(&s, woke.clone())];
        let p = plan(&batch, &st, TaskNow::default());
        assert_eq!(p.changes[0].to, StepState::Succeeded);
        assert_eq!(p.children.get(&Uuid::from_u128(102)), Some(&1));
        // A timeout without a default is permanent: fail fast.
        let timed_out = AttemptResult::Failed {
            error: "timed out".into(),
            retryable: false,
            retry_after_ms: None,
        };
        let batch = [report(&s, timed_out)];
        let p = plan(&batch, &st, TaskNow::default());
        assert_eq!(p.changes[0].to, StepState::Failed);
        assert!(p.failing.contains_key(&task()));
        // Another attempt, or a delegated step that is no timed step: stale.
        let mut old = report(&s, woke.clone());
        old.attempt -= 1;
        assert_eq!(plan(&[old], &st, TaskNow::default()).stale, 1);
        let mut mapped = s.clone();
        mapped.timed = false;
        let st = steps(vec![mapped.clone()]);
        assert_eq!(
            plan(&[report(&mapped, woke)], &st, TaskNow::default()).stale,
            1
        );
        // A halt moves timed steps still waiting too.
        assert!(halt(true).timed_waits && halt(false).timed_waits);
        assert!(!PARENTS_DONE.timed_waits && !retry_task(TaskState::Failed).unwrap().timed_waits);
    }

    fn ok_output(output: Value) -> AttemptResult {
        AttemptResult::Succeeded {
            output,
            branches: None,
        }
    }

    #[test]
    fn signals_are_recorded_repeated_or_refused() {
        let id = TaskId(Uuid::from_u128(7));
        assert_eq!(
            accept_signal(id, TaskState::Running, "approval", true, false),
            Ok(SignalAccept::Record)
        );
        // Kept for a step not reached yet, in a task not started yet.
        assert_eq!(
            accept_signal(id, TaskState::Pending, "approval", true, false),
            Ok(SignalAccept::Record)
        );
        // A repeat is answered whatever the task's state.
        for state in TaskState::ALL {
            assert_eq!(
                accept_signal(id, *state, "approval", false, true),
                Ok(SignalAccept::Repeat)
            );
        }
        for state in [
            TaskState::Completed,
            TaskState::Failed,
            TaskState::Cancelled,
        ] {
            let e = accept_signal(id, state, "approval", true, false).unwrap_err();
            assert_eq!(e, format!("task {id} is {state}: it takes no more signals"));
        }
        let e = accept_signal(id, TaskState::Running, "nope", false, false).unwrap_err();
        assert!(e.contains("waits for signal \"nope\""), "{e}");
    }

    #[test]
    fn a_delayed_start_is_bounded_and_a_past_time_starts_now() {
        let now = t("2026-12-02T10:00:00Z");
        assert_eq!(start_at(None, None, now), Ok(None));
        assert_eq!(
            start_at(Some(t("2026-12-01T00:00:00Z")), None, now),
            Ok(None)
        );
        assert_eq!(start_at(Some(now), None, now), Ok(None));
        assert_eq!(
            start_at(Some(t("2026-12-02T12:00:00Z")), None, now),
            Ok(Some(t("2026-12-02T12:00:00Z")))
        );
        assert_eq!(
            start_at(None, Some(90_000), now),
            Ok(Some(t("2026-12-02T10:01:30Z")))
        );
        assert!(
            start_at(Some(now), Some(1), now)
                .unwrap_err()
                .contains("not both")
        );
        assert!(start_at(None, Some(MAX_WAIT_MS + 1), now).is_err());
        assert!(start_at(Some(t("2026-12-20T10:00:00Z")), None, now).is_err());
    }

    #[test]
    fn a_submits_deadline_wins_over_its_templates_and_says_what_happened() {
        assert_eq!(deadline_ms(None, None), Ok(None));
        assert_eq!(deadline_ms(None, Some(3_600_000)), Ok(Some(3_600_000)));
        assert_eq!(deadline_ms(Some(60_000), Some(3_600_000)), Ok(Some(60_000)));
        assert!(deadline_ms(Some(0), None).is_err());
        assert!(deadline_ms(Some(MAX_WAIT_MS + 1), None).is_err());
        let Ok(Cancel::Cancel(plan)) =
            cancel_task(TaskState::Running, false, Some(&deadline_exceeded(1_000)))
        else {
            panic!("a live task is cancelled");
        };
        assert_eq!(
            plan.error,
            "cancelled: deadline exceeded (1000 ms after the task started)"
        );
        assert!(plan.halt.timed_waits);
    }

    #[test]
    fn a_template_path_finds_keys_and_array_indexes() {
        let outputs = json!({"a": {"list": [{"at": "x"}], "n": 1}});
        assert_eq!(value_at(&outputs, "a.list.0.at"), Some(&json!("x")));
        assert_eq!(value_at(&outputs, "a"), outputs.get("a"));
        assert_eq!(value_at(&outputs, "a.list.1.at"), None);
        assert_eq!(value_at(&outputs, "b.n"), None);
    }

    #[test]
    fn success_keeps_the_output_and_releases_the_children() {
        let st = steps(vec![step(1, 0, 3, &[2, 3])]);
        let s = &st[&Uuid::from_u128(101)];
        let batch = [report(
            s,
            AttemptResult::Succeeded {
                output: json!(7),
                branches: None,
            },
        )];
        let p = plan(&batch, &st, TaskNow::default());
        assert_eq!(p.changes.len(), 1);
        let c = &p.changes[0];
        assert_eq!(
            (c.to, c.outcome, c.output.clone()),
            (
                StepState::Succeeded,
                AttemptOutcome::Succeeded,
                Some(json!(7))
            )
        );
        assert_eq!(
            p.children,
            BTreeMap::from([(Uuid::from_u128(102), 1), (Uuid::from_u128(103), 1)])
        );
        assert_eq!(p.terminal[&task()], 1);
        assert!(p.failing.is_empty());
    }

    #[test]
    fn an_oversized_output_is_a_permanent_failure() {
        let st = steps(vec![step(1, 0, 3, &[2])]);
        let s = &st[&Uuid::from_u128(101)];
        let big = json!("x".repeat(2000));
        let batch = [report(
            s,
            AttemptResult::Succeeded {
                output: big,
                branches: None,
            },
        )];
        let p = plan(&batch, &st, TaskNow::default());
        let c = &p.changes[0];
        assert_eq!(
            (c.to, c.outcome),
            (StepState::Failed, AttemptOutcome::Failed)
        );
        assert!(c.error.as_deref().unwrap().contains("output"), "{c:?}");
        assert!(p.children.is_empty());
        assert!(p.failing.contains_key(&task()));
    }

    #[test]
    fn a_retryable_failure_with_attempts_left_retries_with_backoff() {
        let st = steps(vec![step(1, 1, 5, &[])]);
        let s = &st[&Uuid::from_u128(101)];
        let batch = [report(s, failed(true))];
        let p = plan(&batch, &st, TaskNow::default());
        let c = &p.changes[0];
        assert_eq!(c.to, StepState::Retrying);
        assert_eq!(c.failures, 2);
        // Second failure: 1 s × 2 = 2 s, jitter 0.5 with a pick of 0.5 takes a quarter off.
        assert_eq!(c.retry_in_ms, Some(1_500));
        assert_eq!(c.error.as_deref(), Some("boom"));
        assert_eq!(p.retries, 1);
        assert!(p.terminal.is_empty() && p.failing.is_empty());
    }

    #[test]
    fn a_retry_delay_stays_within_the_policy_bounds_with_jitter() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial_delay: Millis(100),
            multiplier: 3.0,
            max_delay: Millis(2_000),
            jitter: 0.2,
        };
        for failures in 1..=8 {
            let base = (100.0 * 3f64.powi(failures - 1)).min(2_000.0);
            for i in 0..=10 {
                let unit = f64::from(i) / 10.0 * 0.999;
                let d = retry_delay_ms(&policy, failures, None, unit) as f64;
                assert!(
                    d <= base && d >= (base * 0.8).floor(),
                    "failures {failures}: {d} not in [{}, {base}]",
                    base * 0.8
                );
            }
        }
        // A worker's retry_after wins over the policy.
        assert_eq!(retry_delay_ms(&policy, 3, Some(42), 0.9), 42);
    }

    #[test]
    fn a_worker_retry_after_sets_the_delay() {
        let st = steps(vec![step(1, 0, 3, &[])]);
        let s = &st[&Uuid::from_u128(101)];
        let batch = [report(
            s,
            AttemptResult::Failed {
                error: "busy".into(),
                retryable: true,
                retry_after_ms: Some(250),
            },
        )];
        let p = plan(&batch, &st, TaskNow::default());
        assert_eq!(p.changes[0].retry_in_ms, Some(250));
    }

    #[test]
    fn retries_run_out_and_the_step_gives_up() {
        let st = steps(vec![step(1, 2, 3, &[2])]);
        let s = &st[&Uuid::from_u128(101)];
        let batch = [report(s, failed(true))];
        let p = plan(&batch, &st, TaskNow::default());
        let c = &p.changes[0];
        assert_eq!((c.to, c.failures), (StepState::Failed, 3));
        assert_eq!(c.error.as_deref(), Some("boom (gave up after 3 attempts)"));
        assert_eq!(c.outcome_error.as_deref(), Some("boom"));
        assert_eq!(
            p.failing[&task()],
            r#"step "s1" failed: boom (gave up after 3 attempts)"#
        );
    }

    #[test]
    fn a_permanent_failure_fails_fast_and_halts_the_rest_of_the_batch() {
        // s1 fails for good first; s2's success then releases nothing, s3's retryable failure
        // is not retried, and the task's error names s1 (the first failure in the batch).
        let st = steps(vec![
            step(1, 0, 3, &[4]),
            step(2, 0, 3, &[4]),
            step(3, 0, 3, &[4]),
        ]);
        let batch = [
            report(&st[&Uuid::from_u128(101)], failed(false)),
            report(
                &st[&Uuid::from_u128(102)],
                AttemptResult::Succeeded {
                    output: json!(1),
                    branches: None,
                },
            ),
            report(&st[&Uuid::from_u128(103)], failed(true)),
        ];
        let p = plan(&batch, &st, TaskNow::default());
        let to: Vec<StepState> = p.changes.iter().map(|c| c.to).collect();
        assert_eq!(
            to,
            [StepState::Failed, StepState::Succeeded, StepState::Failed]
        );
        assert_eq!(p.changes[0].error.as_deref(), Some("boom"));
        assert!(p.children.is_empty(), "a halted task releases no children");
        assert_eq!(p.failing.len(), 1);
        assert_eq!(p.failing[&task()], r#"step "s1" failed: boom"#);
        assert_eq!(p.terminal[&task()], 3);
        assert_eq!(p.retries, 0);
    }

    #[test]
    fn a_failing_or_cancelled_task_retries_nothing_and_releases_nothing() {
        for t in [
            TaskNow {
                failing: true,
                cancel_requested: false,
            },
            TaskNow {
                failing: false,
                cancel_requested: true,
            },
        ] {
            let st = steps(vec![step(1, 0, 3, &[2]), step(3, 0, 3, &[2])]);
            let batch = [
                report(
                    &st[&Uuid::from_u128(101)],
                    AttemptResult::Succeeded {
                        output: json!(1),
                        branches: None,
                    },
                ),
                report(&st[&Uuid::from_u128(103)], failed(true)),
            ];
            let p = plan(&batch, &st, t);
            assert!(p.children.is_empty());
            assert_eq!(p.changes[1].to, StepState::Failed);
            assert!(
                p.failing.is_empty(),
                "the task already halted keeps its error"
            );
        }
    }

    #[test]
    fn a_missing_handler_is_offered_again_without_spending_an_attempt() {
        let st = steps(vec![step(1, 0, 1, &[])]);
        let s = &st[&Uuid::from_u128(101)];
        let batch = [report(
            s,
            AttemptResult::HandlerMissing {
                handler: "h".into(),
            },
        )];
        let p = plan(&batch, &st, TaskNow::default());
        let c = &p.changes[0];
        assert_eq!(
            (c.to, c.failures, c.retry_in_ms, c.outcome),
            (
                StepState::Retrying,
                0,
                Some(1_000),
                AttemptOutcome::HandlerMissing
            )
        );
        assert_eq!(
            c.outcome_error.as_deref(),
            Some(r#"worker w1 has no handler "h""#)
        );
    }

    #[test]
    fn stale_reports_change_nothing() {
        let mut st = steps(vec![step(1, 1, 3, &[])]);
        let s = st[&Uuid::from_u128(101)].clone();
        // An older attempt, a duplicate in the batch, the wrong task, an unknown step.
        let mut old = report(&s, failed(true));
        old.attempt -= 1;
        let current = report(
            &s,
            AttemptResult::Succeeded {
                output: json!(1),
                branches: None,
            },
        );
        let mut wrong_task = report(&s, failed(true));
        wrong_task.task_id = TaskId(Uuid::from_u128(9));
        let mut unknown = report(&s, failed(true));
        unknown.step_id = StepId(Uuid::from_u128(999));
        let batch = [old, current.clone(), current, wrong_task, unknown];
        let p = plan(&batch, &st, TaskNow::default());
        assert_eq!(p.changes.len(), 1);
        assert_eq!(p.stale, 4);
        // A step no longer dispatched, or a task no longer live: stale too.
        st.get_mut(&s.id).unwrap().state = StepState::Retrying;
        let batch = [report(&s, failed(true))];
        assert_eq!(plan(&batch, &st, TaskNow::default()).stale, 1);
        st.get_mut(&s.id).unwrap().state = StepState::Dispatched;
        let p = plan_batch(&batch, &st, &HashMap::new(), &POLICY, &mut || 0.0);
        assert_eq!((p.stale, p.changes.len()), (1, 0));
    }

    #[test]
    fn attempt_numbers_only_grow() {
        // Only the current attempt is applied; every older one is stale, whatever it says.
        let st = steps(vec![step(1, 4, 9, &[])]);
        let s = &st[&Uuid::from_u128(101)];
        for older in 1..s.attempt {
            let mut r = report(
                s,
                AttemptResult::Succeeded {
                    output: json!(1),
                    branches: None,
                },
            );
            r.attempt = older;
            let batch = [r];
            assert_eq!(plan(&batch, &st, TaskNow::default()).stale, 1);
        }
        // Retry a task: attempt numbers are not part of the reset; admission adds one.
        let m = retry_task(TaskState::Failed).unwrap();
        assert_eq!(m.to, StepState::Waiting);
        assert_eq!(ADMIT.to, StepState::Dispatched);
    }

    #[test]
    fn lease_expiry_is_a_retryable_timeout_naming_the_lease() {
        assert_eq!(
            lease_expired(2, true, 5_000, 30_000),
            AttemptResult::TimedOut {
                error: "attempt 2 timed out: no result within its execution lease".into()
            }
        );
        let AttemptResult::TimedOut { error } = lease_expired(1, false, 5_000, 30_000) else {
            panic!("not a timeout");
        };
        assert!(error.contains("queue-wait (5000 ms) plus execution (30000 ms)"));
        let st = steps(vec![step(1, 0, 3, &[])]);
        let s = &st[&Uuid::from_u128(101)];
        let batch = [report(s, lease_expired(1, true, 1, 1))];
        let p = plan(&batch, &st, TaskNow::default());
        assert_eq!(
            (p.changes[0].to, p.changes[0].outcome),
            (StepState::Retrying, AttemptOutcome::TimedOut)
        );
    }

    #[test]
    fn a_dead_step_is_retryable_and_an_undeliverable_one_is_not() {
        let st = steps(vec![step(1, 0, 3, &[])]);
        let s = &st[&Uuid::from_u128(101)];
        let batch = [report(s, dead_step("delivery_limit"))];
        let p = plan(&batch, &st, TaskNow::default());
        assert_eq!(
            (p.changes[0].to, p.changes[0].outcome),
            (StepState::Retrying, AttemptOutcome::DeadLettered)
        );
        assert_eq!(
            p.changes[0].error.as_deref(),
            Some("step message dead-lettered by the broker (delivery_limit)")
        );
        let batch = [report(s, undeliverable("too large".into()))];
        let p = plan(&batch, &st, TaskNow::default());
        assert_eq!(p.changes[0].to, StepState::Failed);
        let batch = [report(s, unroutable("q", "NO_ROUTE"))];
        assert_eq!(
            plan(&batch, &st, TaskNow::default()).changes[0].to,
            StepState::Retrying
        );
    }

    #[test]
    fn a_failing_task_skips_and_a_cancelled_one_cancels_what_has_not_started() {
        assert_eq!(
            halt(false),
            Move {
                from: &[StepState::Waiting, StepState::Queued, StepState::Retrying],
                to: StepState::Skipped,
                timed_waits: true,
            }
        );
        assert_eq!(halt(true).to, StepState::Cancelled);
        assert!(!halt(true).from.contains(&StepState::Dispatched));
    }

    #[test]
    fn only_a_live_task_can_be_cancelled_and_a_repeated_cancel_is_a_no_op() {
        let Cancel::Cancel(plan) =
            cancel_task(TaskState::Running, false, Some("no longer needed")).unwrap()
        else {
            panic!("a running task is cancelled");
        };
        assert_eq!(plan.halt.to, StepState::Cancelled);
        assert!(
            plan.dispatched_unstarted,
            "unstarted dispatched steps do not wait"
        );
        assert_eq!(plan.outcome, AttemptOutcome::Cancelled);
        assert_eq!(plan.error, "cancelled: no longer needed");
        let Cancel::Cancel(plan) = cancel_task(TaskState::Pending, false, None).unwrap() else {
            panic!("a pending task is cancelled");
        };
        assert_eq!(plan.error, "cancelled: by request");
        // Repeated: requested already (started steps still running), or finished cancelled.
        assert_eq!(
            cancel_task(TaskState::Running, true, None),
            Ok(Cancel::AlreadyCancelled)
        );
        assert_eq!(
            cancel_task(TaskState::Cancelled, true, None),
            Ok(Cancel::AlreadyCancelled)
        );
        for s in [TaskState::Completed, TaskState::Failed] {
            assert_eq!(
                cancel_task(s, false, None).unwrap_err(),
                Refused {
                    state: s,
                    action: "cancel"
                }
            );
        }
    }

    #[test]
    fn only_a_failed_or_cancelled_task_can_be_retried() {
        for s in TaskState::ALL {
            let ok = matches!(s, TaskState::Failed | TaskState::Cancelled);
            assert_eq!(retry_task(*s).is_ok(), ok, "{s}");
        }
        assert_eq!(
            retry_task(TaskState::Failed).unwrap().from,
            &[StepState::Failed, StepState::Skipped, StepState::Cancelled]
        );
    }

    #[test]
    fn a_finished_task_is_cancelled_before_failed_before_completed() {
        let t = |failing, cancel_requested| TaskNow {
            failing,
            cancel_requested,
        };
        assert_eq!(final_state(t(false, false)), TaskState::Completed);
        assert_eq!(final_state(t(true, false)), TaskState::Failed);
        assert_eq!(final_state(t(true, true)), TaskState::Cancelled);
        assert_eq!(final_state(t(false, true)), TaskState::Cancelled);
    }

    #[test]
    fn admission_never_exceeds_the_in_flight_bound() {
        assert_eq!(
            admission(10, 4, 256),
            Admission {
                take: 6,
                bound_limits: true
            }
        );
        assert_eq!(
            admission(1000, 0, 256),
            Admission {
                take: 256,
                bound_limits: false
            }
        );
        // Over the bound (the bound was lowered): nothing, never a negative count.
        assert_eq!(admission(5, 9, 256).take, 0);
        assert!(admission(5, 9, 256).bound_limits);
        assert_eq!(PARENTS_DONE.to, StepState::Queued);
        assert_eq!(PROMOTE_RETRY.from, &[StepState::Retrying]);
    }

    #[test]
    fn a_task_output_over_its_limit_is_refused_with_both_sizes() {
        assert_eq!(task_output_refused(4096, 4096), None);
        assert_eq!(task_output_refused(0, 0), None);
        let e = task_output_refused(4097, 4096).expect("over the limit");
        assert!(
            e.contains("4097 bytes") && e.contains("limit of 4096 bytes"),
            "{e}"
        );
        assert!(task_output_refused(i64::MAX, usize::MAX).is_none());
    }
}

#[cfg(test)]
mod tenancy_tests {
    use super::*;

    #[test]
    fn only_finished_tasks_are_purged() {
        for state in [TaskState::Pending, TaskState::Running] {
            assert_eq!(purge_task(state).unwrap_err().action, "purge");
        }
        for state in [
            TaskState::Completed,
            TaskState::Failed,
            TaskState::Cancelled,
        ] {
            assert!(purge_task(state).is_ok());
        }
    }

    #[test]
    fn purged_tasks_never_run_again() {
        assert!(may_run_again(TaskState::Failed, false).is_ok());
        let r = may_run_again(TaskState::Failed, true).unwrap_err();
        assert!(r.action.contains("purge"));
    }
}
