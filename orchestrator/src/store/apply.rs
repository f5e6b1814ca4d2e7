//! Applying a batch of reported attempts: one locking read (the live tasks, then their
//! reported steps), one set-wise write of what [`crate::transition::plan_batch`] decided, and
//! the finish of tasks with nothing left to run. Halting (fail-fast skip) adds one statement
//! and a second counter write only when a task starts failing.

use super::{Result, StoreError};
use crate::transition::{
    BatchPlan, DELEGATE, InstanceOf, MissingStreak, Move, PARENTS_DONE, SkipCause, StepNow, TaskNow,
};
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, Row};
use std::collections::{HashMap, HashSet};
use tasker_schemas::{AttemptOutcome, StepState, TaskId, TaskState};
use uuid::Uuid;

/// Locks the live tasks among `ids` (in id order) and returns their flags. Tasks that are not
/// live are absent.
pub async fn lock_live_tasks(
    tx: &mut PgConnection,
    ids: &[Uuid],
) -> Result<HashMap<Uuid, TaskNow>> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let rows = sqlx::query(
        "SELECT id, failing, cancel_requested FROM tasks
         WHERE id = ANY($1) AND state IN ('pending', 'running')
         ORDER BY id FOR UPDATE",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                r.get::<Uuid, _>("id"),
                TaskNow {
                    failing: r.get("failing"),
                    cancel_requested: r.get("cancel_requested"),
                },
            )
        })
        .collect())
}

#[derive(sqlx::FromRow)]
struct StepRow {
    id: Uuid,
    task_id: Uuid,
    namespace: String,
    name: String,
    state: StepState,
    attempt: i32,
    failures: i32,
    max_attempts: i32,
    retry_policy: Value,
    child_ids: Vec<Uuid>,
    dispatched_at: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    decides: Option<Vec<String>>,
    child_names: Vec<String>,
    map_of: Option<Uuid>,
    map_tolerate: Option<i32>,
    map_failed: Option<i32>,
    failure_handler: bool,
    workflow: bool,
    timed: bool,
    queue_wait_timeout_ms: i64,
    missing_attempt: Option<i32>,
    missing_workers: Option<Vec<String>>,
    missing_for_ms: Option<i64>,
}

/// The reported steps as they are now (their tasks locked by [`lock_live_tasks`]).
pub async fn read_steps(tx: &mut PgConnection, ids: &[Uuid]) -> Result<HashMap<Uuid, StepNow>> {
    let rows: Vec<StepRow> = sqlx::query_as(
        "SELECT s.id, s.task_id, s.namespace, s.name, s.state, s.attempt, s.failures,
                s.max_attempts, s.retry_policy, s.child_ids, s.dispatched_at, s.started_at,
                s.decides,
                CASE WHEN s.decides IS NULL THEN '{}'::text[] ELSE
                    (SELECT coalesce(array_agg(c.name ORDER BY k.n), '{}')
                     FROM unnest(s.child_ids) WITH ORDINALITY AS k(id, n)
                     JOIN steps c ON c.id = k.id) END AS child_names,
                s.map_of, m.map_tolerate, m.map_failed, s.failure_handler,
                s.workflow IS NOT NULL AS workflow, s.wait IS NOT NULL AS timed, s.queue_wait_timeout_ms, s.missing_attempt,
                s.missing_workers,
                (extract(epoch FROM now() - s.missing_since) * 1000)::bigint AS missing_for_ms
         FROM steps s LEFT JOIN steps m ON m.id = s.map_of
         WHERE s.id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|s| {
            (
                s.id,
                StepNow {
                    id: s.id,
                    task_id: s.task_id,
                    namespace: s.namespace,
                    name: s.name,
                    state: s.state,
                    attempt: s.attempt,
                    failures: s.failures,
                    max_attempts: s.max_attempts,
                    retry_policy: s.retry_policy,
                    child_ids: s.child_ids,
                    dispatched_at: s.dispatched_at,
                    started_at: s.started_at,
                    decides: s.decides,
                    child_names: s.child_names,
                    instance_of: s.map_of.map(|map| InstanceOf {
                        map,
                        tolerate: s.map_tolerate.unwrap_or(0),
                        failed: s.map_failed.unwrap_or(0),
                    }),
                    failure_handler: s.failure_handler,
                    workflow: s.workflow,
                    timed: s.timed,
                    queue_wait_timeout_ms: s.queue_wait_timeout_ms,
                    missing: s.missing_attempt.map(|first_attempt| MissingStreak {
                        first_attempt,
                        workers: s.missing_workers.unwrap_or_default(),
                        for_ms: s.missing_for_ms.unwrap_or(0),
                    }),
                },
            )
        })
        .collect())
}

/// Per task: steps that reached a terminal state, and the error that makes it fail.
#[derive(Debug, Default)]
pub struct TaskCounts {
    id: Vec<Uuid>,
    done: Vec<i32>,
    error: Vec<Option<String>>,
}

impl TaskCounts {
    pub fn new(
        terminal: &HashMap<Uuid, i32>,
        failing: &std::collections::BTreeMap<Uuid, String>,
    ) -> Self {
        let (id, done): (Vec<Uuid>, Vec<i32>) = terminal.iter().map(|(k, v)| (*k, *v)).unzip();
        let error = id.iter().map(|id| failing.get(id).cloned()).collect();
        Self { id, done, error }
    }
}

/// What [`write`] did.
#[derive(Debug, Default)]
pub struct Written {
    /// Steps that left `dispatched`, per queue: their slots to release.
    pub released: HashMap<String, i64>,
    /// Queues with children that became ready.
    pub queued: HashSet<String>,
    pub attempts_inserted: usize,
    /// Tasks with no unfinished step left.
    pub finished: Vec<Uuid>,
    /// Mapped steps whose parent succeeded: they were delegated ([`DELEGATE`]).
    pub delegated: Vec<Uuid>,
}

/// Writes a batch's decisions in one statement (one round trip): step transitions (guarded by
/// attempt and state `dispatched`), attempt history (the primary key refuses an outcome applied
/// twice), children's parent counters (children reaching zero are [`PARENTS_DONE`]), and the
/// tasks' unfinished-step counters. The transitions touch only `dispatched` steps and the
/// counters only `waiting` ones, so no row is changed twice. A mapped step whose parents are
/// done is delegated ([`DELEGATE`]) instead of being queued.
///
/// The state guards are written `IS NOT DISTINCT FROM` so that they cannot match a partial
/// index predicate: with statistics taken while few steps were in that state (a fresh or idle
/// database), the planner otherwise scans every dispatched step through `steps_lease` instead
/// of looking the batch up by primary key (20 ms instead of 1 ms per batch, measured).
pub async fn write(
    tx: &mut PgConnection,
    plan: &BatchPlan<'_>,
    tasks: &TaskCounts,
) -> Result<Written> {
    let n = plan.changes.len();
    let mut id = Vec::with_capacity(n);
    let mut attempt = Vec::with_capacity(n);
    let mut state = Vec::with_capacity(n);
    let mut failures = Vec::with_capacity(n);
    let mut output: Vec<Option<Value>> = Vec::with_capacity(n);
    let mut error: Vec<Option<String>> = Vec::with_capacity(n);
    let mut delay_ms: Vec<Option<i64>> = Vec::with_capacity(n);
    let mut task_id = Vec::with_capacity(n);
    let mut namespace = Vec::with_capacity(n);
    let mut outcome: Vec<AttemptOutcome> = Vec::with_capacity(n);
    let mut dispatched_at = Vec::with_capacity(n);
    let mut started_at = Vec::with_capacity(n);
    let mut worker = Vec::with_capacity(n);
    let mut outcome_error = Vec::with_capacity(n);
    let mut missing_from: Vec<Option<i32>> = Vec::with_capacity(n);
    let mut missing_workers: Vec<Option<Value>> = Vec::with_capacity(n);
    for c in &plan.changes {
        id.push(c.step.id);
        attempt.push(c.reported.attempt);
        state.push(c.to);
        failures.push(c.failures);
        output.push(c.output.clone());
        error.push(c.error.clone());
        delay_ms.push(c.retry_in_ms.map(|d| d.min(i64::MAX as u64) as i64));
        task_id.push(c.step.task_id);
        namespace.push(c.step.namespace.as_str());
        outcome.push(c.outcome);
        dispatched_at.push(c.step.dispatched_at);
        started_at.push(c.step.started_at);
        worker.push(c.reported.worker.as_deref());
        outcome_error.push(c.outcome_error.as_deref());
        missing_from.push(c.missing_from);
        missing_workers.push(c.missing_from.map(|_| serde_json::json!(c.missing_workers)));
    }
    let (child, parents_done): (Vec<Uuid>, Vec<i32>) =
        plan.children.iter().map(|(k, v)| (*k, *v)).unzip();
    let rows = sqlx::query(
        "WITH outcome AS (
             UPDATE steps s
             SET state = u.state, failures = u.failures, output = u.output, error = u.error,
                 next_attempt_at = CASE WHEN u.delay_ms IS NULL THEN NULL
                                        ELSE now() + u.delay_ms * interval '1 millisecond' END,
                 lease_expires_at = NULL, wake_at = NULL,
                 missing_since = CASE WHEN u.missing_from IS NULL THEN NULL
                                      ELSE coalesce(s.missing_since, now()) END,
                 missing_attempt = u.missing_from,
                 missing_workers = CASE WHEN u.missing_from IS NULL THEN NULL
                                        ELSE ARRAY(SELECT jsonb_array_elements_text(u.workers)) END,
                 updated_at = now()
             FROM unnest($1::uuid[], $2::int[], $3::text[], $4::int[], $5::jsonb[], $6::text[],
                         $7::bigint[], $22::int[], $23::jsonb[])
                  AS u(id, attempt, state, failures, output, error, delay_ms, missing_from, workers)
             WHERE s.id = u.id AND s.attempt = u.attempt
               AND (s.state IS NOT DISTINCT FROM 'dispatched'
                    OR (s.state IS NOT DISTINCT FROM 'delegated'
                        AND (s.workflow IS NOT NULL OR s.wait IS NOT NULL)))
             RETURNING s.namespace || '.' || s.queue AS queue,
                       s.workflow IS NULL AND s.wait IS NULL AS held_slot
         ), history AS (
             INSERT INTO attempts (step_id, attempt, task_id, namespace, outcome, dispatched_at,
                                   started_at, worker, error)
             SELECT h.id, h.attempt, h.task_id, h.namespace, h.outcome, h.dispatched_at,
                    h.started_at, h.worker, h.error
             FROM unnest($1::uuid[], $2::int[], $8::uuid[], $9::text[], $10::text[],
                         $11::timestamptz[], $12::timestamptz[], $13::text[], $14::text[], $22::int[])
                  AS h(id, attempt, task_id, namespace, outcome, dispatched_at, started_at, worker,
                       error, missing_from)
             WHERE h.missing_from IS NULL OR h.missing_from = h.attempt
             ON CONFLICT (step_id, attempt) DO NOTHING
             RETURNING 1
         ), repeated AS (
             -- A streak of handler_missing re-offers: one row, counted up.
             UPDATE attempts a SET repeats = a.repeats + 1, finished_at = now(), worker = h.worker,
                                   error = h.error, outcome = h.outcome
             FROM unnest($1::uuid[], $2::int[], $22::int[], $13::text[], $14::text[], $10::text[])
                  AS h(id, attempt, missing_from, worker, error, outcome)
             WHERE h.missing_from IS NOT NULL AND h.missing_from <> h.attempt
               AND a.step_id = h.id AND a.attempt = h.missing_from
             RETURNING 1
         ), ready AS (
             UPDATE steps s
             SET pending_parents = s.pending_parents - k.n,
                 state = CASE WHEN s.pending_parents - k.n > 0 THEN s.state
                              WHEN s.map_over IS NULL AND s.workflow IS NULL AND s.wait IS NULL THEN $17
                              ELSE $21 END,
                 queued_at = CASE WHEN s.pending_parents - k.n = 0 THEN now() ELSE s.queued_at END,
                 updated_at = now()
             FROM unnest($15::uuid[], $16::int[]) AS k(id, n)
             WHERE s.id = k.id AND s.state IS NOT DISTINCT FROM 'waiting'
             RETURNING s.id, s.namespace || '.' || s.queue AS queue, s.state
         ), counted AS (
             UPDATE tasks t
             SET unfinished_steps = t.unfinished_steps - d.n,
                 failing = t.failing OR d.error IS NOT NULL,
                 error = coalesce(t.error, d.error),
                 updated_at = now()
             FROM unnest($18::uuid[], $19::int[], $20::text[]) AS d(id, n, error)
             WHERE t.id = d.id
             RETURNING t.id, t.unfinished_steps
         )
         SELECT 'released' AS kind, queue AS name, count(*) AS n FROM outcome WHERE held_slot
         GROUP BY queue
         UNION ALL
         SELECT 'queued', queue, count(*) FROM ready WHERE state = $17 GROUP BY queue
         UNION ALL
         SELECT 'delegated', id::text, 0 FROM ready WHERE state = $21
         UNION ALL
         SELECT 'inserted', NULL, (SELECT count(*) FROM history) + (SELECT count(*) FROM repeated)
         UNION ALL
         SELECT 'finished', id::text, 0 FROM counted WHERE unfinished_steps = 0",
    )
    .bind(&id)
    .bind(&attempt)
    .bind(&state)
    .bind(&failures)
    .bind(&output)
    .bind(&error)
    .bind(&delay_ms)
    .bind(&task_id)
    .bind(&namespace)
    .bind(&outcome)
    .bind(&dispatched_at)
    .bind(&started_at)
    .bind(&worker)
    .bind(&outcome_error)
    .bind(&child)
    .bind(&parents_done)
    .bind(PARENTS_DONE.to)
    .bind(&tasks.id)
    .bind(&tasks.done)
    .bind(&tasks.error)
    .bind(DELEGATE.to)
    .bind(&missing_from)
    .bind(&missing_workers)
    .fetch_all(&mut *tx)
    .await?;
    let mut w = Written::default();
    for r in rows {
        let name: Option<String> = r.get("name");
        let n: i64 = r.get("n");
        match (r.get::<&str, _>("kind"), name) {
            ("released", Some(queue)) => {
                w.released.insert(queue, n);
            }
            ("queued", Some(queue)) => {
                w.queued.insert(queue);
            }
            ("inserted", _) => w.attempts_inserted = n as usize,
            ("finished", Some(id)) => w.finished.push(parse_id(&id)?),
            ("delegated", Some(id)) => w.delegated.push(parse_id(&id)?),
            _ => {}
        }
    }
    Ok(w)
}

fn parse_id(id: &str) -> Result<Uuid> {
    id.parse()
        .map_err(|e| StoreError::Corrupt(format!("id {id:?} from the database: {e}")))
}

/// Releases children whose parents succeeded outside a batch of reports (a mapped step that
/// finished): their counters go down, ready ones are queued or are delegated.
pub async fn release_children(
    tx: &mut PgConnection,
    children: std::collections::BTreeMap<Uuid, i32>,
) -> Result<Written> {
    let plan = BatchPlan {
        children,
        ..BatchPlan::default()
    };
    write(tx, &plan, &TaskCounts::default()).await
}

/// Writes only the tasks' counters (after halting their steps); returns the tasks with no
/// unfinished step left.
pub async fn write_counts(tx: &mut PgConnection, tasks: &TaskCounts) -> Result<Vec<Uuid>> {
    Ok(write(tx, &BatchPlan::default(), tasks).await?.finished)
}

/// Carries out a halt ([`crate::transition::halt`]) for the given tasks: their steps in one of
/// `m.from` move to `m.to`. Returns, per task, how many steps moved.
pub async fn halt_steps(
    tx: &mut PgConnection,
    tasks: &[Uuid],
    m: Move,
) -> Result<HashMap<Uuid, i32>> {
    // A skipped step records why (a retry runs it again); instances of a mapped step are
    // counted by their mapped step afterwards (`store::dynamic::recount_maps`). A failing
    // task's `on_failure` step is the one step a halt leaves to run.
    let rows = sqlx::query(
        "UPDATE steps SET state = $3, next_attempt_at = NULL, wake_at = NULL, updated_at = now(),
                          skip_cause = CASE WHEN $3 = $4 THEN $5 END,
                          skip_reason = CASE WHEN $3 = $4 THEN $6 END
         WHERE task_id = ANY($1) AND NOT failure_handler
           AND (state = ANY($2) OR ($7 AND state = 'delegated' AND wait IS NOT NULL))
         RETURNING task_id",
    )
    .bind(tasks)
    .bind(m.from)
    .bind(m.to)
    .bind(StepState::Skipped)
    .bind(SkipCause::Halted.as_str())
    .bind("its task failed")
    .bind(m.timed_waits)
    .fetch_all(&mut *tx)
    .await?;
    let mut moved: HashMap<Uuid, i32> = HashMap::new();
    for r in rows {
        *moved.entry(r.get("task_id")).or_default() += 1;
    }
    Ok(moved)
}

/// Starts the `on_failure` handler of the tasks among `ids` that have one and whose handler
/// has not run for this failure: its step is created `queued` (its parents: the steps that
/// succeeded, so its message carries their outputs; `failure`: the failed step's name and
/// error) and counts as unfinished. Returns the tasks that started one, and the queues.
pub async fn start_failure_handlers(
    tx: &mut PgConnection,
    ids: &[Uuid],
) -> Result<(Vec<Uuid>, Vec<String>)> {
    if ids.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    let step_ids: Vec<Uuid> = ids.iter().map(|_| Uuid::now_v7()).collect();
    let rows = sqlx::query(
        "WITH t AS (
             SELECT t.id, t.namespace, t.priority, t.on_failure, t.error, n.step_id
             FROM unnest($1::uuid[], $2::uuid[]) AS n(task_id, step_id)
             JOIN tasks t ON t.id = n.task_id
             WHERE t.on_failure IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM steps s WHERE s.task_id = t.id AND s.failure_handler)
         ), created AS (
             INSERT INTO steps (id, task_id, namespace, name, position, handler, queue, state,
                                priority, max_attempts, retry_policy, queue_wait_timeout_ms,
                                execution_timeout_ms, pending_parents, parent_ids, child_ids,
                                queued_at, failure_handler, failure)
             SELECT t.step_id, t.id, t.namespace, $3, 2147483647, t.on_failure->>'handler',
                    coalesce(t.on_failure->>'queue', $4), $5, t.priority,
                    (t.on_failure->'retry'->>'max_attempts')::int, t.on_failure->'retry',
                    (t.on_failure->>'queue_wait_timeout')::bigint,
                    (t.on_failure->>'execution_timeout')::bigint, 0,
                    (SELECT coalesce(array_agg(s.id ORDER BY s.position), '{}') FROM steps s
                     WHERE s.task_id = t.id AND s.state = 'succeeded' AND s.map_of IS NULL),
                    '{}', now(), true,
                    coalesce(
                        (SELECT jsonb_build_object('step', s.name, 'error', coalesce(s.error, ''))
                         FROM steps s WHERE s.task_id = t.id AND s.state = 'failed' AND s.map_of IS NULL
                         ORDER BY s.updated_at LIMIT 1),
                        jsonb_build_object('step', '', 'error', coalesce(t.error, '')))
             FROM t
             RETURNING task_id, namespace || '.' || queue AS queue
         ), counted AS (
             UPDATE tasks SET unfinished_steps = unfinished_steps + 1, updated_at = now()
             WHERE id IN (SELECT task_id FROM created)
         )
         SELECT task_id, queue FROM created",
    )
    .bind(ids)
    .bind(&step_ids)
    .bind(tasker_schemas::template::ON_FAILURE_STEP)
    .bind(tasker_schemas::template::DEFAULT_QUEUE)
    .bind(crate::transition::PARENTS_DONE.to)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.get::<Uuid, _>("task_id"), r.get::<String, _>("queue")))
        .unzip())
}

/// A task that reached a final state.
#[derive(Debug, Clone)]
pub struct FinishedTask {
    pub task_id: TaskId,
    pub namespace: String,
    pub template: String,
    pub state: TaskState,
    pub seq: i64,
    pub at: DateTime<Utc>,
    /// When the task was created (its duration ends at `at`).
    pub created_at: DateTime<Utc>,
    pub output: Option<Value>,
    pub error: Option<String>,
    /// A child workflow's task: the step that runs it.
    pub parent_step: Option<Uuid>,
}

/// The tasks among `ids` whose output would be over `limit` bytes (their leaf steps' outputs
/// together, as JSON), with that size.
pub async fn oversized_outputs(
    tx: &mut PgConnection,
    ids: &[Uuid],
    limit: i64,
) -> Result<Vec<(Uuid, i64)>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(
        "SELECT s.task_id, sum(octet_length(s.output::text))::bigint AS bytes
         FROM steps s
         WHERE s.task_id = ANY($1) AND cardinality(s.child_ids) = 0 AND s.map_of IS NULL
           AND s.output IS NOT NULL
         GROUP BY s.task_id
         HAVING sum(octet_length(s.output::text)) > $2",
    )
    .bind(ids)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get("task_id"), r.get("bytes")))
        .collect())
}

/// Finishes live tasks that have no unfinished step left, each in the state decided for it
/// ([`crate::transition::final_state`]); a completed task's output is the outputs of its leaf
/// steps. Records the event and notifies waiters (on commit). One statement.
pub async fn finalize(
    tx: &mut PgConnection,
    tasks: &[(Uuid, TaskState)],
) -> Result<Vec<FinishedTask>> {
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    let (ids, states): (Vec<Uuid>, Vec<TaskState>) = tasks.iter().copied().unzip();
    let rows = sqlx::query(
        "WITH fin AS (
             UPDATE tasks t
             SET state = d.state,
                 finished_at = now(),
                 event_seq = t.event_seq + 1,
                 output = CASE WHEN d.state = $3 THEN
                     (SELECT coalesce(jsonb_object_agg(s.name, s.output), '{}'::jsonb)
                      FROM steps s WHERE s.task_id = t.id AND cardinality(s.child_ids) = 0
                        AND s.map_of IS NULL) END,
                 updated_at = now()
             FROM unnest($1::uuid[], $2::text[]) AS d(id, state)
             WHERE t.id = d.id AND t.unfinished_steps = 0 AND t.state IN ('pending', 'running')
             RETURNING t.id, t.namespace, t.template_name, t.state, t.event_seq, t.finished_at,
                       t.created_at, t.output, t.error, t.parent_step_id
         ), events AS (
             INSERT INTO task_events (task_id, seq, namespace, kind, detail)
             SELECT id, event_seq, namespace, state, jsonb_build_object('error', error) FROM fin
         )
         SELECT fin.*, pg_notify('tasker_task_finished', fin.id::text) FROM fin",
    )
    .bind(&ids)
    .bind(&states)
    .bind(TaskState::Completed)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| FinishedTask {
            task_id: TaskId(r.get("id")),
            namespace: r.get("namespace"),
            template: r.get("template_name"),
            state: r.get("state"),
            seq: r.get("event_seq"),
            at: r.get("finished_at"),
            created_at: r.get("created_at"),
            output: r.get("output"),
            error: r.get("error"),
            parent_step: r.get("parent_step_id"),
        })
        .collect())
}

/// The namespace of each of `steps` that exists (broker identity checks a worker message
/// against its step's namespace).
pub async fn step_namespaces(
    db: impl sqlx::PgExecutor<'_>,
    steps: &[Uuid],
) -> Result<HashMap<Uuid, String>> {
    let rows = sqlx::query("SELECT id, namespace FROM steps WHERE id = ANY($1)")
        .bind(steps)
        .fetch_all(db)
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<Uuid, _>("id"), r.get::<String, _>("namespace")))
        .collect())
}
