//! Applying reported attempts: one transaction per batch (the locking read, the decisions of
//! [`transition::plan_batch`], one set-wise write, fail-fast halting, finishing tasks, and the
//! admission of the children that became ready, under their queues' slot locks), then the
//! after-commit work: publish what was admitted, wake the dispatcher and the timers, announce
//! finished tasks, count.

use super::publish::publish_admitted;
use super::{Result, Shared, dynamic, events};
use crate::metrics::Metrics;
use crate::slots::{self, SlotKey};
use crate::store::admission::{self, Dispatched};
use crate::store::apply::{self as store_apply, FinishedTask, TaskCounts};
use crate::store::outbox::{Admitted, MessageData};
use crate::store::{self, StoreError};
use crate::transition::{self, Finished, Policy};
use backon::{ExponentialBuilder, Retryable};
use sqlx::PgConnection;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tasker_schemas::StepId;
use uuid::Uuid;

/// What one [`apply_outcomes`] did.
#[derive(Debug, Default)]
pub struct ApplyReport {
    pub applied: usize,
    /// Outcomes for an attempt that is not the step's current dispatched one (late, duplicate,
    /// or naming the wrong task): recorded nowhere, counted here.
    pub stale: usize,
    /// Outcomes refused by the attempts primary key (must stay 0).
    pub applied_twice: usize,
    /// Queues that got ready steps the same transaction could not admit (the dispatcher's).
    pub queued: HashSet<String>,
    /// Dispatched steps that left `dispatched`, per queue (their slots were released).
    pub released: HashMap<String, i64>,
    /// Attempts that failed and were scheduled again (wakes the timer).
    pub retries: usize,
    pub finished: Vec<FinishedTask>,
    /// The applied outcomes, for the metrics.
    pub outcomes: Vec<AppliedOutcome>,
}

/// One applied outcome, as the metrics (and the traces) see it.
#[derive(Debug)]
pub struct AppliedOutcome {
    pub namespace: String,
    pub outcome: &'static str,
    /// The attempt, for its span (when traces are on).
    pub task_id: Uuid,
    pub step_id: Uuid,
    pub step: String,
    pub attempt: i32,
    pub dispatched_at: Option<chrono::DateTime<chrono::Utc>>,
    pub applied_at: chrono::DateTime<chrono::Utc>,
    /// Admitted (dispatched) to now.
    pub end_to_end: Option<Duration>,
    /// The handler's run time the worker reported.
    pub execution: Option<Duration>,
}

/// Applies outcomes in one transaction (retried at once after a deadlock or serialization
/// failure), then publishes what it admitted and does the after-commit work. Attempts whose
/// step message then cannot be sent are applied as failed in turn.
///
/// Children that became ready are admitted in the same transaction (under the same per-queue
/// slot lock as the dispatcher's admission), so a chain moves on without a second transaction
/// and a hop through the dispatcher; what does not fit in one batch is left to the dispatcher.
pub async fn apply_outcomes(shared: &Shared, batch: Vec<Finished>) -> Result<ApplyReport> {
    let (report, admitted, messages) = apply_committed(shared, &batch).await?;
    publish_and_settle(shared, &admitted, messages).await;
    after_commit(shared, &report).await;
    Ok(report)
}

/// Publishes admitted attempts; those whose message cannot be sent are applied as failed
/// (which may admit and publish further steps: a loop, not a recursion).
pub async fn publish_and_settle(
    shared: &Shared,
    admitted: &[Admitted],
    messages: Vec<MessageData>,
) {
    if admitted.is_empty() {
        return;
    }
    let mut failed = publish_admitted(shared, admitted, messages).await;
    while !failed.is_empty() {
        match apply_committed(shared, &failed).await {
            Ok((report, admitted, messages)) => {
                failed = publish_admitted(shared, &admitted, messages).await;
                after_commit(shared, &report).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not fail undeliverable step attempts; the relay will retry");
                return;
            }
        }
    }
}

/// Applies and commits a batch and tells the dispatcher about the slots it released; returns
/// the attempts to publish (before the rest of the after-commit work).
async fn apply_committed(
    shared: &Shared,
    batch: &[Finished],
) -> Result<(ApplyReport, Vec<Admitted>, Vec<MessageData>)> {
    let policy = Policy {
        max_output_bytes: shared.config.max_output_bytes,
        handler_missing_delay_ms: shared.config.handler_missing_delay_ms,
        max_task_output_bytes: shared.config.max_task_output_bytes,
    };
    let once = || async {
        let mut tx = shared.db.begin().await?;
        let mut report = apply_batch(&mut tx, &shared.templates, batch, &policy).await?;
        let admitted = admit_ready(shared, &mut tx, &mut report).await?;
        tx.commit().await?;
        Ok::<_, StoreError>((report, admitted))
    };
    let began = std::time::Instant::now();
    let (report, (admitted, messages, bounded)) = once
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(2))
                .with_max_times(5),
        )
        .when(StoreError::is_conflict)
        .notify(|_, _| Metrics::add(&shared.metrics.counters.db_retries_total, 1))
        .await?;
    let m = &shared.metrics;
    m.histogram("tasker_apply_batch_seconds", &[])
        .record(began.elapsed().as_secs_f64());
    m.histogram("tasker_apply_batch_size", &[])
        .record(batch.len() as f64);
    shared.dispatch.released(report.released.keys());
    for (queue, bounded) in bounded {
        shared.dispatch.note_room(&queue, bounded);
    }
    if !admitted.is_empty() {
        Metrics::add(
            &shared.metrics.counters.steps_dispatched_total,
            admitted.len(),
        );
    }
    Ok((report, admitted, messages))
}

/// The rows of one batch: lock, decide, write, halt, finish.
async fn apply_batch(
    tx: &mut PgConnection,
    templates: &crate::store::templates::TemplateCache,
    batch: &[Finished],
    policy: &Policy,
) -> store::Result<ApplyReport> {
    let mut report = ApplyReport::default();
    let task_ids: Vec<Uuid> = batch.iter().map(|f| f.task_id.0).collect();
    let live = store_apply::lock_live_tasks(tx, &task_ids).await?;
    let step_ids: Vec<Uuid> = batch.iter().map(|f| f.step_id.0).collect();
    let current = store_apply::read_steps(tx, &step_ids).await?;
    let plan = transition::plan_batch(batch, &current, &live, policy, &mut || {
        rand::random::<f64>()
    });
    report.stale = plan.stale;
    report.applied = plan.changes.len();
    let now = chrono::Utc::now();
    report.outcomes = plan
        .changes
        .iter()
        .map(|c| AppliedOutcome {
            namespace: c.step.namespace.clone(),
            outcome: c.outcome.as_str(),
            task_id: c.step.task_id,
            step_id: c.step.id,
            step: c.step.name.clone(),
            attempt: c.step.attempt,
            dispatched_at: c.step.dispatched_at,
            applied_at: now,
            end_to_end: c.step.dispatched_at.and_then(|d| (now - d).to_std().ok()),
            execution: c.reported.duration_ms.map(Duration::from_millis),
        })
        .collect();
    report.retries = plan.retries;
    if plan.changes.is_empty() {
        return Ok(report);
    }
    // The common case writes the tasks' counters with the outcomes. A decision, an instance of
    // a mapped step, or a failure has more to write first (skips, mapped steps, the halt): the
    // counters are written after it, with everything counted.
    let mut cause = dynamic::Cause {
        skips: plan.skips.clone(),
        instances: plan.instances.clone(),
        ..dynamic::Cause::default()
    };
    let deferred = !cause.is_empty() || !plan.failing.is_empty();
    let counts = if deferred {
        TaskCounts::default()
    } else {
        TaskCounts::new(&plan.terminal, &plan.failing)
    };
    let w = store_apply::write(tx, &plan, &counts).await?;
    report.released = w.released;
    report.queued = w.queued;
    report.applied_twice = plan.changes.len() - w.attempts_inserted;
    let done = w.finished;
    cause.started = w.delegated;
    let mut out = dynamic::Cascade {
        terminal: if deferred {
            plan.terminal.clone()
        } else {
            HashMap::new()
        },
        failing: plan.failing.clone(),
        queued: HashSet::new(),
    };
    if !cause.is_empty() {
        dynamic::cascade(tx, templates, &live, cause, &mut out).await?;
        report.queued.extend(out.queued.drain());
    }
    let (finished, queues) =
        dynamic::conclude(tx, &live, &mut out, done, policy.max_task_output_bytes).await?;
    report.finished = finished;
    report.queued.extend(queues);
    Ok(report)
}

/// Releases the slots of the steps that left `dispatched` and admits the ready children, in
/// the applying transaction. Returns the admitted attempts, their messages, and per queue
/// whether the in-flight bound stopped the admission.
async fn admit_ready(
    shared: &Shared,
    tx: &mut PgConnection,
    report: &mut ApplyReport,
) -> store::Result<(Vec<Admitted>, Vec<MessageData>, Vec<(String, bool)>)> {
    let (mut admitted, mut messages, mut bounded) = (Vec::new(), Vec::new(), Vec::new());
    let mut queues: Vec<String> = report.queued.drain().collect();
    queues.sort_unstable();
    if queues.is_empty() && report.released.is_empty() {
        return Ok((admitted, messages, bounded));
    }
    let wanted: Vec<SlotKey> = queues.iter().map(SlotKey::queue).collect();
    let slots = admission::lock_slots(tx, &wanted, &slots::per_queue(&report.released)).await?;
    let limit = shared.config.dispatch_batch_size.max(1);
    for (queue, slot) in queues.into_iter().zip(wanted) {
        let in_flight = slots.get(&slot).copied().unwrap_or(0);
        let a = transition::admission(shared.config.max_in_flight_per_queue, in_flight, limit);
        let Dispatched {
            admitted: a,
            messages: m,
            bounded: b,
            full,
        } = admission::admit_locked(tx, &queue, a, shared.config.step_data_limit()).await?;
        if full {
            // Maybe more: the dispatcher takes the rest.
            report.queued.insert(queue.clone());
        }
        bounded.push((queue, b));
        admitted.extend(a);
        messages.extend(m);
    }
    Ok((admitted, messages, bounded))
}

async fn after_commit(shared: &Shared, report: &ApplyReport) {
    let m = &shared.metrics;
    record_outcomes(m, &report.outcomes);
    Metrics::add(&m.counters.results_stale_total, report.stale);
    Metrics::add(
        &m.counters.results_applied_twice_total,
        report.applied_twice,
    );
    if report.applied_twice > 0 {
        tracing::error!(
            count = report.applied_twice,
            "outcomes refused by the attempts primary key"
        );
    }
    if !report.queued.is_empty() {
        shared.dispatch.wake(report.queued.iter().cloned());
    }
    if report.retries > 0 {
        Metrics::add(&m.counters.retries_scheduled_total, report.retries);
        shared.timers.notify_one();
    }
    if shared.traces.is_on() {
        let attempts: Vec<crate::telemetry::Attempt> = report
            .outcomes
            .iter()
            .map(|o| crate::telemetry::Attempt {
                task_id: o.task_id,
                step_id: o.step_id,
                step: o.step.clone(),
                namespace: o.namespace.clone(),
                attempt: o.attempt,
                outcome: o.outcome,
                dispatched_at: o.dispatched_at,
                ended_at: o.applied_at,
            })
            .collect();
        shared.traces.record_attempts(&shared.db, &attempts).await;
    }
    events::announce(shared, &report.finished).await;
}

/// Counts applied outcomes per namespace and outcome, and times their steps: end to end
/// (admitted to applied), execution (as the worker reported it) and queue wait (the rest).
fn record_outcomes(m: &Metrics, outcomes: &[AppliedOutcome]) {
    let mut counts: HashMap<(&str, &str), u64> = HashMap::new();
    for o in outcomes {
        *counts.entry((&o.namespace, o.outcome)).or_default() += 1;
    }
    for ((namespace, outcome), n) in counts {
        m.counter(
            "tasker_results_applied_total",
            &[("namespace", namespace), ("outcome", outcome)],
        )
        .increment(n);
    }
    let mut by_namespace: HashMap<&str, Vec<&AppliedOutcome>> = HashMap::new();
    for o in outcomes {
        by_namespace.entry(&o.namespace).or_default().push(o);
    }
    for (namespace, list) in by_namespace {
        let labels = [("namespace", namespace)];
        let e2e = m.histogram("tasker_step_end_to_end_seconds", &labels);
        let exec = m.histogram("tasker_step_execution_seconds", &labels);
        let wait = m.histogram("tasker_step_queue_wait_seconds", &labels);
        for o in list {
            if let Some(d) = o.end_to_end {
                e2e.record(d.as_secs_f64());
            }
            if let Some(d) = o.execution {
                exec.record(d.as_secs_f64());
            }
            if let (Some(total), Some(ran)) = (o.end_to_end, o.execution) {
                wait.record(total.saturating_sub(ran).as_secs_f64());
            }
        }
    }
}

/// Records that a worker started (or still runs) an attempt: its execution lease from now.
/// Stale reports change nothing.
pub async fn record_started(
    shared: &Shared,
    step: StepId,
    attempt: i32,
    worker: &str,
    lease_ms: i64,
) -> Result<()> {
    store::timers::record_started(&shared.db, step, attempt, worker, lease_ms).await?;
    Ok(())
}

/// The namespace of each existing step of `steps` (for the broker identity check of worker
/// messages).
pub async fn step_namespaces(
    shared: &Shared,
    steps: &[uuid::Uuid],
) -> Result<std::collections::HashMap<uuid::Uuid, String>> {
    Ok(store::apply::step_namespaces(&shared.db, steps).await?)
}
