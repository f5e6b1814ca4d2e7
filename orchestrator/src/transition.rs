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
//!
//! Attempt numbers only grow: admission is the only place that sets one (the current one plus
//! one), and a report for any attempt other than the step's current dispatched one is stale.

use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use tasker_schemas::{AttemptOutcome, RetryPolicy, StepId, StepState, TaskId, TaskState};
use uuid::Uuid;

/// What an attempt reported (a worker's result, or what the orchestrator observed).
#[derive(Debug, Clone, PartialEq)]
pub enum AttemptResult {
    Succeeded {
        output: Value,
    },
    Failed {
        error: String,
        retryable: bool,
        retry_after_ms: Option<u64>,
    },
    /// No worker had the handler: offer it again later without spending an attempt.
    HandlerMissing {
        handler: String,
    },
    /// The lease ran out (queue wait or execution).
    TimedOut {
        error: String,
    },
    /// The step message was dead-lettered (poison, unroutable, too large).
    DeadLettered {
        error: String,
        retryable: bool,
    },
}

/// A reported attempt of one step.
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub task_id: TaskId,
    pub step_id: StepId,
    pub attempt: i32,
    pub worker: Option<String>,
    pub result: AttemptResult,
}

/// Settings the rules depend on.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Largest accepted step output (bytes of JSON); larger is a permanent failure.
    pub max_output_bytes: usize,
    /// How long a step waits before it is offered again after `handler_missing`.
    pub handler_missing_delay_ms: u64,
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
/// - **handler missing**: offered again after `handler_missing_delay_ms`, spending no attempt.
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
        if step.task_id != f.task_id.0
            || step.state != StepState::Dispatched
            || step.attempt != f.attempt
        {
            plan.stale += 1;
            continue;
        }
        let halted =
            task.failing || task.cancel_requested || plan.failing.contains_key(&step.task_id);
        let change = decide(step, f, halted, policy, unit);
        match change.to {
            StepState::Succeeded => {
                *plan.terminal.entry(step.task_id).or_default() += 1;
                if !halted {
                    for c in &step.child_ids {
                        *plan.children.entry(*c).or_default() += 1;
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
    let (outcome, error, output, retryable, retry_after) = match &f.result {
        AttemptResult::Succeeded { output } => {
            match tasker_schemas::data::check_value("output", output, policy.max_output_bytes) {
                Ok(_) => (
                    AttemptOutcome::Succeeded,
                    None,
                    Some(output.clone()),
                    false,
                    None,
                ),
                // Too large or malformed: the handler would produce it again.
                Err(e) => (
                    AttemptOutcome::Failed,
                    Some(e.to_string()),
                    None,
                    false,
                    None,
                ),
            }
        }
        AttemptResult::Failed {
            error,
            retryable,
            retry_after_ms,
        } => (
            AttemptOutcome::Failed,
            Some(error.clone()),
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
}

/// Admission: a queued step gets the next attempt number, a lease of queue wait plus execution
/// timeout, and an outbox entry. (The hot path's SQL spells `from` as a literal so that it
/// matches the partial index of queued steps.)
pub const ADMIT: Move = Move {
    from: &[StepState::Queued],
    to: StepState::Dispatched,
};

/// A waiting step whose last unfinished parent succeeded is ready.
pub const PARENTS_DONE: Move = Move {
    from: &[StepState::Waiting],
    to: StepState::Queued,
};

/// A retry whose due time came is ready again.
pub const PROMOTE_RETRY: Move = Move {
    from: &[StepState::Retrying],
    to: StepState::Queued,
};

/// What a halted task does with the steps it has not started: a failing task skips them, a
/// cancelled one cancels them. Dispatched steps are left to report (or time out).
pub fn halt(cancel_requested: bool) -> Move {
    Move {
        from: StepState::NOT_STARTED,
        to: if cancel_requested {
            StepState::Cancelled
        } else {
            StepState::Skipped
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

/// Retrying a task: only a failed or cancelled one; its failed, skipped and cancelled steps
/// wait again (their failures reset, attempt numbers kept, so they keep growing), succeeded
/// steps keep their outputs.
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tasker_schemas::Millis;

    const POLICY: Policy = Policy {
        max_output_bytes: 1024,
        handler_missing_delay_ms: 1_000,
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
        }
    }

    fn report(s: &StepNow, result: AttemptResult) -> Finished {
        Finished {
            task_id: TaskId(s.task_id),
            step_id: StepId(s.id),
            attempt: s.attempt,
            worker: Some("w1".into()),
            result,
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

    #[test]
    fn success_keeps_the_output_and_releases_the_children() {
        let st = steps(vec![step(1, 0, 3, &[2, 3])]);
        let s = &st[&Uuid::from_u128(101)];
        let batch = [report(s, AttemptResult::Succeeded { output: json!(7) })];
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
        let batch = [report(s, AttemptResult::Succeeded { output: big })];
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
                AttemptResult::Succeeded { output: json!(1) },
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
                    AttemptResult::Succeeded { output: json!(1) },
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
        let current = report(&s, AttemptResult::Succeeded { output: json!(1) });
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
            let mut r = report(s, AttemptResult::Succeeded { output: json!(1) });
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
                to: StepState::Skipped
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
}
