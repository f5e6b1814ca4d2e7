//! Decisions and mapped steps: the task graph a skip propagates through, skips, a mapped
//! step's source array and progress, letting instances in, and finishing a mapped step. Every
//! function runs in the caller's transaction, under the task's lock; the decisions are
//! [`crate::transition`]'s.

use super::{Result, StoreError};
use crate::transition::{
    DELEGATE, GraphStep, MapNow, PARENTS_DONE, Propagation, SkipCause, Window,
};
use serde_json::Value;
use sqlx::{PgConnection, Row};
use std::collections::{HashMap, HashSet};
use tasker_schemas::StepState;
use uuid::Uuid;

/// The steps of `tasks` (instances of mapped steps apart), for [`crate::transition::propagate_skips`].
pub async fn read_graph(tx: &mut PgConnection, tasks: &[Uuid]) -> Result<HashMap<Uuid, GraphStep>> {
    let rows = sqlx::query(
        "SELECT id, name, state, join_any, parent_ids, child_ids, pending_parents,
                map_over IS NOT NULL AS mapped
         FROM steps WHERE task_id = ANY($1) AND map_of IS NULL",
    )
    .bind(tasks)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                r.get("id"),
                GraphStep {
                    name: r.get("name"),
                    state: r.get("state"),
                    join_any: r.get("join_any"),
                    parent_ids: r.get("parent_ids"),
                    child_ids: r.get("child_ids"),
                    pending_parents: r.get("pending_parents"),
                    mapped: r.get("mapped"),
                },
            )
        })
        .collect())
}

/// What [`write_propagation`] did.
#[derive(Debug, Default)]
pub struct Propagated {
    /// Per task: steps skipped.
    pub skipped: HashMap<Uuid, i32>,
    /// Queues that got ready steps.
    pub queued: HashSet<String>,
    /// Mapped steps that were delegated.
    pub delegated: Vec<Uuid>,
}

/// Writes a [`Propagation`]: the skips (waiting steps only, with cause and reason), the new
/// counters of `join: any` steps, and the ready ones ([`PARENTS_DONE`] or [`DELEGATE`]).
pub async fn write_propagation(tx: &mut PgConnection, p: &Propagation) -> Result<Propagated> {
    let mut out = Propagated::default();
    if !p.skipped.is_empty() {
        let ids: Vec<Uuid> = p.skipped.iter().map(|s| s.step).collect();
        let causes: Vec<&str> = p.skipped.iter().map(|s| s.cause.as_str()).collect();
        let reasons: Vec<&str> = p.skipped.iter().map(|s| s.reason.as_str()).collect();
        let rows = sqlx::query(
            "UPDATE steps s SET state = $4, skip_cause = k.cause, skip_reason = k.reason,
                                updated_at = now()
             FROM unnest($1::uuid[], $2::text[], $3::text[]) AS k(id, cause, reason)
             WHERE s.id = k.id AND s.state = 'waiting'
             RETURNING s.task_id",
        )
        .bind(&ids)
        .bind(&causes)
        .bind(&reasons)
        .bind(StepState::Skipped)
        .fetch_all(&mut *tx)
        .await?;
        for r in rows {
            *out.skipped.entry(r.get("task_id")).or_default() += 1;
        }
    }
    if !p.pending.is_empty() {
        let (ids, n): (Vec<Uuid>, Vec<i32>) = p.pending.iter().map(|(k, v)| (*k, *v)).unzip();
        sqlx::query(
            "UPDATE steps s SET pending_parents = k.n, updated_at = now()
             FROM unnest($1::uuid[], $2::int[]) AS k(id, n)
             WHERE s.id = k.id AND s.state = 'waiting'",
        )
        .bind(&ids)
        .bind(&n)
        .execute(&mut *tx)
        .await?;
    }
    if !p.ready.is_empty() {
        let rows = sqlx::query(
            "UPDATE steps s SET pending_parents = 0,
                                state = CASE WHEN s.map_over IS NULL AND s.workflow IS NULL
                                                  AND s.wait IS NULL
                                             THEN $2 ELSE $3 END,
                                queued_at = now(), updated_at = now()
             WHERE s.id = ANY($1) AND s.state = 'waiting'
             RETURNING s.id, s.namespace || '.' || s.queue AS queue, s.state",
        )
        .bind(&p.ready)
        .bind(PARENTS_DONE.to)
        .bind(DELEGATE.to)
        .fetch_all(&mut *tx)
        .await?;
        for r in rows {
            if r.get::<StepState, _>("state") == DELEGATE.to {
                out.delegated.push(r.get("id"));
            } else {
                out.queued.insert(r.get("queue"));
            }
        }
    }
    Ok(out)
}

/// What a mapped step found at its `map.over` path when it started.
#[derive(Debug, Clone)]
pub struct MapSource {
    pub id: Uuid,
    pub task_id: Uuid,
    /// `<parent>.<path>` as written in the template.
    pub over: String,
    /// The JSON type at the path, `None` when nothing is there.
    pub found: Option<String>,
    pub len: Option<i64>,
    pub max_items: i32,
}

/// Reads what the mapped steps `ids` map over (their single parent's output at their path).
pub async fn read_sources(tx: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<MapSource>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(
        "WITH src AS (
             SELECT c.id, c.task_id, p.name AS parent, c.map_over, c.map_max_items,
                    p.output #> c.map_over AS found
             FROM steps c JOIN steps p ON p.id = c.parent_ids[1]
             WHERE c.id = ANY($1) AND c.state = 'delegated' AND c.map_over IS NOT NULL
         )
         SELECT id, task_id, parent, map_over, map_max_items, jsonb_typeof(found) AS found,
                CASE WHEN jsonb_typeof(found) = 'array' THEN jsonb_array_length(found)::bigint END AS len
         FROM src",
    )
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let parent: String = r.get("parent");
            let path: Vec<String> = r.get("map_over");
            let over = std::iter::once(parent)
                .chain(path)
                .collect::<Vec<_>>()
                .join(".");
            MapSource {
                id: r.get("id"),
                task_id: r.get("task_id"),
                over,
                found: r.get("found"),
                len: r.get("len"),
                max_items: r.get::<Option<i32>, _>("map_max_items").unwrap_or(i32::MAX),
            }
        })
        .collect())
}

/// Records how many elements a started mapped step has.
pub async fn set_total(tx: &mut PgConnection, id: Uuid, total: i32) -> Result<()> {
    sqlx::query("UPDATE steps SET map_total = $2, updated_at = now() WHERE id = $1")
        .bind(id)
        .bind(total)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Counts instances that finished (they were live) toward their mapped steps; returns those
/// still mapping, with their progress.
pub async fn count_instances(
    tx: &mut PgConnection,
    done: &std::collections::BTreeMap<Uuid, crate::transition::InstancesDone>,
) -> Result<Vec<MapRow>> {
    if done.is_empty() {
        return Ok(Vec::new());
    }
    let (ids, (n, failed)): (Vec<Uuid>, (Vec<i32>, Vec<i32>)) =
        done.iter().map(|(k, v)| (*k, (v.done, v.failed))).unzip();
    let rows = sqlx::query(
        "UPDATE steps s SET map_done = s.map_done + d.n, map_failed = s.map_failed + d.failed,
                            map_live = greatest(s.map_live - d.n, 0), updated_at = now()
         FROM unnest($1::uuid[], $2::int[], $3::int[]) AS d(id, n, failed)
         WHERE s.id = d.id
         RETURNING s.id, s.task_id, s.name, s.namespace || '.' || s.queue AS queue, s.child_ids,
                   s.map_max_parallel,
                   s.map_tolerate, s.map_total, s.map_created, s.map_live, s.map_waiting,
                   s.map_done, s.map_failed, s.state",
    )
    .bind(&ids)
    .bind(&n)
    .bind(&failed)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .iter()
        .filter(|r| r.get::<StepState, _>("state") == StepState::Delegated)
        .map(map_row)
        .collect())
}

/// A mapped step still mapping, with its progress.
#[derive(Debug, Clone)]
pub struct MapRow {
    pub id: Uuid,
    pub task_id: Uuid,
    pub name: String,
    /// The queue key of its instances, `{namespace}.{queue}`.
    pub queue: String,
    pub child_ids: Vec<Uuid>,
    pub now: MapNow,
}

fn map_row(r: &sqlx::postgres::PgRow) -> MapRow {
    MapRow {
        id: r.get("id"),
        task_id: r.get("task_id"),
        name: r.get("name"),
        queue: r.get("queue"),
        child_ids: r.get("child_ids"),
        now: MapNow {
            max_parallel: r.get::<Option<i32>, _>("map_max_parallel").unwrap_or(1),
            tolerate: r.get::<Option<i32>, _>("map_tolerate").unwrap_or(0),
            total: r.get("map_total"),
            created: r.get("map_created"),
            live: r.get("map_live"),
            waiting: r.get("map_waiting"),
            done: r.get("map_done"),
            failed: r.get("map_failed"),
        },
    }
}

/// The mapped steps `ids` that are still mapping.
pub async fn read_maps(tx: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<MapRow>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(
        "SELECT id, task_id, name, namespace || '.' || queue AS queue, child_ids, map_max_parallel, map_tolerate, map_total,
                map_created, map_live, map_waiting, map_done, map_failed
         FROM steps WHERE id = ANY($1) AND state = 'delegated' ORDER BY id",
    )
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows.iter().map(map_row).collect())
}

/// Recounts the progress of the mapping steps of `tasks` from their instances (after a halt
/// or a retry moved instances without counting them) and returns them.
pub async fn recount_maps(tx: &mut PgConnection, tasks: &[Uuid]) -> Result<Vec<MapRow>> {
    let rows = sqlx::query(
        "WITH counted AS (
             SELECT c.id,
                    count(i.id) FILTER (WHERE i.state IN ('queued', 'dispatched', 'retrying'))::int AS live,
                    count(i.id) FILTER (WHERE i.state = 'waiting')::int AS waiting,
                    count(i.id) FILTER (WHERE i.state IN ('succeeded', 'failed', 'skipped', 'cancelled'))::int AS done,
                    count(i.id) FILTER (WHERE i.state = 'failed')::int AS failed
             FROM steps c LEFT JOIN steps i ON i.map_of = c.id
             WHERE c.task_id = ANY($1) AND c.state = 'delegated' AND c.map_of IS NULL
             GROUP BY c.id
         )
         UPDATE steps s SET map_live = c.live, map_waiting = c.waiting, map_done = c.done,
                            map_failed = c.failed, updated_at = now()
         FROM counted c WHERE s.id = c.id
         RETURNING s.id, s.task_id, s.name, s.namespace || '.' || s.queue AS queue, s.child_ids,
                   s.map_max_parallel,
                   s.map_tolerate, s.map_total, s.map_created, s.map_live, s.map_waiting,
                   s.map_done, s.map_failed",
    )
    .bind(tasks)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows.iter().map(map_row).collect())
}

/// Lets instances of a mapped step in ([`crate::transition::map_window`]): waiting ones first
/// (in index order), then new ones, each created with its element of the parent's output (read
/// once per call). Returns how many were created.
pub async fn let_in(tx: &mut PgConnection, map: &MapRow, w: Window) -> Result<LetIn> {
    let ids: Vec<Uuid> = (0..w.create).map(|_| Uuid::now_v7()).collect();
    let index: Vec<i32> = (0..w.create).map(|i| map.now.created + i).collect();
    // One statement: readmit, create (the parent's output read once), count.
    let created = sqlx::query(
        "WITH readmitted AS (
             UPDATE steps SET state = CASE WHEN workflow IS NULL THEN $4 ELSE $6 END,
                              queued_at = now(), updated_at = now()
             WHERE id IN (SELECT id FROM steps WHERE map_of = $1 AND state = 'waiting'
                          ORDER BY map_index LIMIT $5)
             RETURNING id, workflow IS NOT NULL AS delegated
         ), src AS MATERIALIZED (
             SELECT c.*, p.output #> c.map_over AS items
             FROM steps c JOIN steps p ON p.id = c.parent_ids[1]
             WHERE c.id = $1 AND cardinality($2::uuid[]) > 0
         ), created AS (
             INSERT INTO steps (id, task_id, namespace, name, position, handler, queue, state,
                                priority, max_attempts, retry_policy, queue_wait_timeout_ms,
                                execution_timeout_ms, pending_parents, parent_ids, child_ids,
                                queued_at, map_of, map_index, map_item, workflow)
             SELECT n.id, src.task_id, src.namespace, src.name, src.position, src.handler,
                    src.queue, CASE WHEN src.workflow IS NULL THEN $4 ELSE $6 END, src.priority,
                    src.max_attempts, src.retry_policy, src.queue_wait_timeout_ms,
                    src.execution_timeout_ms, 0, src.parent_ids, '{}', now(), src.id, n.idx,
                    src.items -> n.idx, src.workflow
             FROM src, unnest($2::uuid[], $3::int[]) AS n(id, idx)
             RETURNING id, workflow IS NOT NULL AS delegated
         ), counted AS (
             SELECT (SELECT count(*) FROM created)::int AS created,
                    (SELECT count(*) FROM readmitted)::int AS readmitted
         ), progress AS (
             UPDATE steps SET map_created = map_created + counted.created,
                              map_live = map_live + counted.created + counted.readmitted,
                              map_waiting = map_waiting - counted.readmitted, updated_at = now()
             FROM counted WHERE id = $1
         )
         SELECT (SELECT created FROM counted) AS created,
                coalesce((SELECT array_agg(id) FROM (SELECT id FROM created WHERE delegated
                                                     UNION ALL
                                                     SELECT id FROM readmitted WHERE delegated) d),
                         '{}') AS delegated",
    )
    .bind(map.id)
    .bind(&ids)
    .bind(&index)
    .bind(PARENTS_DONE.to)
    .bind(w.readmit)
    .bind(DELEGATE.to)
    .fetch_one(&mut *tx)
    .await?;
    Ok(LetIn {
        created: created.get("created"),
        delegated: created.get("delegated"),
    })
}

/// What [`let_in`] did.
#[derive(Debug, Default)]
pub struct LetIn {
    /// Instances created (they count as unfinished steps).
    pub created: i32,
    /// Instances of a child-workflow map let in: their children to start.
    pub delegated: Vec<Uuid>,
}

/// A mapped step that ends now, and how.
#[derive(Debug, Clone)]
pub struct MapEnd {
    pub id: Uuid,
    pub state: StepState,
    pub error: Option<String>,
    pub skip: Option<(SkipCause, String)>,
}

/// A mapped step that ended.
#[derive(Debug, Clone)]
pub struct MapEnded {
    pub id: Uuid,
    pub task_id: Uuid,
    pub name: String,
    pub state: StepState,
    pub error: Option<String>,
    pub child_ids: Vec<Uuid>,
}

/// Ends mapped steps (still mapping). One that succeeded gets its output: its instances'
/// outputs in index order, `null` for each that did not succeed.
pub async fn end_maps(tx: &mut PgConnection, ends: &[MapEnd]) -> Result<Vec<MapEnded>> {
    if ends.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = ends.iter().map(|e| e.id).collect();
    let states: Vec<StepState> = ends.iter().map(|e| e.state).collect();
    let errors: Vec<Option<&str>> = ends.iter().map(|e| e.error.as_deref()).collect();
    let causes: Vec<Option<&str>> = ends
        .iter()
        .map(|e| e.skip.as_ref().map(|s| s.0.as_str()))
        .collect();
    let reasons: Vec<Option<&str>> = ends
        .iter()
        .map(|e| e.skip.as_ref().map(|s| s.1.as_str()))
        .collect();
    let rows = sqlx::query(
        "UPDATE steps c
         SET state = e.state, error = e.error, skip_cause = e.cause, skip_reason = e.reason,
             output = CASE WHEN e.state = $6 THEN
                 (SELECT coalesce(jsonb_agg(CASE WHEN i.state = $6 THEN coalesce(i.output, 'null')
                                                 ELSE 'null'::jsonb END ORDER BY i.map_index),
                                  '[]'::jsonb)
                  FROM steps i WHERE i.map_of = c.id) END,
             updated_at = now()
         FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[])
              AS e(id, state, error, cause, reason)
         WHERE c.id = e.id AND c.state = 'delegated'
         RETURNING c.id, c.task_id, c.name, c.state, c.error, c.child_ids",
    )
    .bind(&ids)
    .bind(&states)
    .bind(&errors)
    .bind(&causes)
    .bind(&reasons)
    .bind(StepState::Succeeded)
    .fetch_all(&mut *tx)
    .await?;
    let ended: Vec<MapEnded> = rows
        .into_iter()
        .map(|r| MapEnded {
            id: r.get("id"),
            task_id: r.get("task_id"),
            name: r.get("name"),
            state: r.get("state"),
            error: r.get("error"),
            child_ids: r.get("child_ids"),
        })
        .collect();
    if ended.len() != ends.len() {
        return Err(StoreError::Corrupt(format!(
            "{} of {} mapped steps were not mapping when they ended",
            ends.len() - ended.len(),
            ends.len()
        )));
    }
    Ok(ended)
}

/// One instance of a mapped step, for the instance listing.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct InstanceRow {
    pub map_index: i32,
    pub state: StepState,
    pub attempt: i32,
    pub output: Option<Value>,
    pub error: Option<String>,
}

/// A child-workflow step to start (delegated; its child task not running).
#[derive(Debug, Clone)]
pub struct ChildToStart {
    pub step_id: Uuid,
    pub task_id: Uuid,
    pub name: String,
    /// The parent task's namespace, depth and priority.
    pub namespace: String,
    pub depth: i32,
    pub priority: i16,
    pub workflow: Value,
    pub child: Option<(Uuid, tasker_schemas::TaskState)>,
    /// The outputs of its parents that succeeded, by name (`{}` for an instance).
    pub parent_outputs: Value,
    pub map_index: Option<i32>,
    pub map_item: Option<Value>,
}

/// The child-workflow steps among `ids` (delegated, not mapped steps themselves).
pub async fn read_children_to_start(
    tx: &mut PgConnection,
    ids: &[Uuid],
) -> Result<Vec<ChildToStart>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(
        "SELECT s.id, s.task_id, s.name, t.namespace, t.depth, t.priority, s.workflow,
                s.child_task_id, c.state AS child_state, s.map_index, s.map_item,
                CASE WHEN s.map_of IS NULL THEN
                    (SELECT coalesce(jsonb_object_agg(p.name, coalesce(p.output, 'null'::jsonb)), '{}'::jsonb)
                     FROM unnest(s.parent_ids) AS pid(id) JOIN steps p ON p.id = pid.id
                     WHERE p.state = 'succeeded')
                ELSE '{}'::jsonb END AS parent_outputs
         FROM steps s JOIN tasks t ON t.id = s.task_id
         LEFT JOIN tasks c ON c.id = s.child_task_id
         WHERE s.id = ANY($1) AND s.state = 'delegated' AND s.workflow IS NOT NULL
           AND s.map_over IS NULL
         ORDER BY s.id",
    )
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let child: Option<Uuid> = r.get("child_task_id");
            let state: Option<tasker_schemas::TaskState> = r.get("child_state");
            ChildToStart {
                step_id: r.get("id"),
                task_id: r.get("task_id"),
                name: r.get("name"),
                namespace: r.get("namespace"),
                depth: r.get("depth"),
                priority: r.get("priority"),
                workflow: r.get("workflow"),
                child: child.zip(state),
                parent_outputs: r.get("parent_outputs"),
                map_index: r.get("map_index"),
                map_item: r.get("map_item"),
            }
        })
        .collect())
}

/// A child-workflow step's child started (created or retried): its new attempt.
pub async fn child_started(tx: &mut PgConnection, step: Uuid, child: Uuid) -> Result<()> {
    sqlx::query(
        "UPDATE steps SET child_task_id = $2, attempt = attempt + 1, dispatched_at = now(),
                          started_at = now(), updated_at = now()
         WHERE id = $1",
    )
    .bind(step)
    .bind(child)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Child-workflow steps whose child task finished, with what their attempt came to (the
/// child's state, output and error). Bounded by `limit`.
#[derive(Debug, Clone)]
pub struct ChildFinished {
    pub step_id: Uuid,
    pub task_id: Uuid,
    pub attempt: i32,
    pub child_id: Uuid,
    pub child_state: tasker_schemas::TaskState,
    pub output: Option<Value>,
    pub error: Option<String>,
}

pub async fn finished_children(
    db: impl sqlx::PgExecutor<'_>,
    limit: i64,
) -> Result<Vec<ChildFinished>> {
    let rows = sqlx::query(
        "SELECT s.id, s.task_id, s.attempt, c.id AS child_id, c.state, c.output, c.error
         FROM steps s JOIN tasks c ON c.id = s.child_task_id
         WHERE s.state = 'delegated' AND s.child_task_id IS NOT NULL
           AND c.state IN ('completed', 'failed', 'cancelled')
         LIMIT $1",
    )
    .bind(limit)
    .fetch_all(db)
    .await?;
    Ok(rows
        .iter()
        .map(|r| ChildFinished {
            step_id: r.get("id"),
            task_id: r.get("task_id"),
            attempt: r.get("attempt"),
            child_id: r.get("child_id"),
            child_state: r.get("state"),
            output: r.get("output"),
            error: r.get("error"),
        })
        .collect())
}

/// The live children of `task`'s delegated child-workflow steps, and those steps: a cancel of
/// the task cancels them (the steps in the same statement, recorded as cancelled attempts).
/// Returns the child task ids and how many steps were cancelled.
pub async fn cancel_child_steps(tx: &mut PgConnection, task: Uuid) -> Result<(Vec<Uuid>, i32)> {
    let rows = sqlx::query(
        "WITH target AS (
             SELECT id, attempt, task_id, namespace, dispatched_at, child_task_id FROM steps
             WHERE task_id = $1 AND state = 'delegated' AND workflow IS NOT NULL
               AND map_over IS NULL
             FOR UPDATE
         ), moved AS (
             UPDATE steps s SET state = $2, updated_at = now()
             FROM target WHERE s.id = target.id
         ), history AS (
             INSERT INTO attempts (step_id, attempt, task_id, namespace, outcome, dispatched_at, error)
             SELECT id, attempt, task_id, namespace, $3, dispatched_at, $4 FROM target
             WHERE attempt > 0
             ON CONFLICT (step_id, attempt) DO NOTHING
         )
         SELECT target.child_task_id FROM target",
    )
    .bind(task)
    .bind(StepState::Cancelled)
    .bind(tasker_schemas::AttemptOutcome::Cancelled)
    .bind("cancelled with its task (its child workflow too)")
    .fetch_all(&mut *tx)
    .await?;
    let n = rows.len() as i32;
    let children = rows
        .iter()
        .filter_map(|r| r.get::<Option<Uuid>, _>("child_task_id"))
        .collect();
    Ok((children, n))
}

/// A child-workflow step whose retry is due is delegated again (its child restarts in the same
/// transaction). False when it is no longer a due retry.
pub async fn delegate_due_retry(tx: &mut PgConnection, step: Uuid) -> Result<bool> {
    Ok(sqlx::query(
        "UPDATE steps SET state = $2, next_attempt_at = NULL, updated_at = now()
         WHERE id = $1 AND state = 'retrying' AND next_attempt_at <= now()
           AND workflow IS NOT NULL",
    )
    .bind(step)
    .bind(DELEGATE.to)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1)
}
