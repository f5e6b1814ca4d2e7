//! The outbox: one entry per admitted attempt, written in the admitting transaction and deleted
//! once the broker confirmed the step message. Entries left behind (a crash, a failed publish)
//! are claimed by the relay and published again.

use super::Result;
use serde_json::{Map, Value};
use sqlx::{PgConnection, PgExecutor, Row};
use tasker_schemas::{StepId, StepState, TaskId};
use uuid::Uuid;

/// An admitted attempt: publish it, then clear its outbox entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    pub outbox_id: i64,
    pub step_id: StepId,
    pub attempt: i32,
}

/// Everything needed to build a step message.
#[derive(Debug, Clone)]
pub struct MessageData {
    pub step_id: StepId,
    pub task_id: TaskId,
    pub namespace: String,
    pub template: String,
    pub step: String,
    pub handler: String,
    pub queue: String,
    pub attempt: i32,
    pub state: StepState,
    pub execution_timeout_ms: i64,
    pub context: Value,
    pub parent_outputs: Map<String, Value>,
    /// An instance of a mapped step: its index and element.
    pub map_index: Option<i32>,
    pub map_item: Option<Value>,
    /// The `on_failure` step: what failed its task.
    pub failure: Option<Value>,
    /// The size of the data the message carries (context, parent outputs, element), as JSON.
    /// Over the limit the loader was given, `context` and `parent_outputs` are left empty: the
    /// message is refused before it is assembled.
    pub data_bytes: i64,
    /// The task's submit `traceparent` (`tasks.trace_parent`): the trace its messages are in.
    pub trace_parent: Option<String>,
}

impl MessageData {
    /// From a row with the step's columns (`map_index` and `map_item` among them),
    /// `template_name`, `trace_parent`, `context` and `parent_outputs`.
    pub(super) fn from_row(r: &sqlx::postgres::PgRow) -> Self {
        let parent_outputs = match r.get::<Option<Value>, _>("parent_outputs") {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        MessageData {
            step_id: StepId(r.get("id")),
            task_id: TaskId(r.get("task_id")),
            namespace: r.get("namespace"),
            template: r.get("template_name"),
            step: r.get("name"),
            handler: r.get("handler"),
            queue: r.get("queue"),
            attempt: r.get("attempt"),
            state: r.get("state"),
            execution_timeout_ms: r.get("execution_timeout_ms"),
            context: r.get::<Option<Value>, _>("context").unwrap_or(Value::Null),
            parent_outputs,
            map_index: r.get("map_index"),
            map_item: r.get("map_item"),
            failure: r.get("failure"),
            data_bytes: r.get("data_bytes"),
            trace_parent: r.get("trace_parent"),
        }
    }
}

/// Loads message data for the given steps (with their parents' outputs), as
/// [`super::admission::admit_locked`] does: not the data of a step over `max_data_bytes`.
pub async fn load_messages(
    db: impl PgExecutor<'_>,
    steps: &[StepId],
    max_data_bytes: i64,
) -> Result<Vec<MessageData>> {
    let ids: Vec<Uuid> = steps.iter().map(|s| s.0).collect();
    let rows = sqlx::query(
        "SELECT s.id, s.task_id, s.namespace, t.template_name, s.name, s.handler, s.queue, s.attempt,
                s.state, s.execution_timeout_ms, s.map_index, s.map_item, s.failure,
                t.trace_parent, z.bytes AS data_bytes,
                CASE WHEN z.bytes <= $2 THEN t.context END AS context,
                CASE WHEN z.bytes > $2 THEN NULL WHEN s.map_of IS NULL THEN
                    (SELECT coalesce(jsonb_object_agg(p.name, coalesce(p.output, 'null'::jsonb)), '{}'::jsonb)
                     FROM unnest(s.parent_ids) AS pid(id) JOIN steps p ON p.id = pid.id
                     WHERE p.state <> 'skipped')
                ELSE '{}'::jsonb END AS parent_outputs
         FROM unnest($1::uuid[]) AS wanted(id)
         JOIN steps s ON s.id = wanted.id
         JOIN tasks t ON t.id = s.task_id
         CROSS JOIN LATERAL (
             SELECT (octet_length(t.context::text) + coalesce(octet_length(s.map_item::text), 0)
                     + CASE WHEN s.map_of IS NULL THEN coalesce(
                           (SELECT sum(octet_length(p.output::text))
                            FROM unnest(s.parent_ids) AS pid(id) JOIN steps p ON p.id = pid.id
                            WHERE p.state <> 'skipped'), 0)
                       ELSE 0 END)::bigint AS bytes
         ) z",
    )
    .bind(&ids)
    .bind(max_data_bytes)
    .fetch_all(db)
    .await?;
    Ok(rows.iter().map(MessageData::from_row).collect())
}

/// Removes outbox entries whose publish was confirmed.
pub async fn clear(db: impl PgExecutor<'_>, ids: &[i64]) -> Result<()> {
    sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
        .bind(ids)
        .execute(db)
        .await?;
    Ok(())
}

/// Claims outbox entries older than `older_than_ms` (left behind by a crash or a failed
/// publish), locked until the caller commits, and touches them so that they are not claimed
/// again before their new confirm clears them.
pub async fn claim_stale(
    tx: &mut PgConnection,
    older_than_ms: i64,
    limit: i64,
) -> Result<Vec<Admitted>> {
    let rows = sqlx::query(
        "SELECT id, step_id, attempt FROM outbox
         WHERE created_at < now() - $1 * interval '1 millisecond'
         ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(older_than_ms)
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    let claimed: Vec<Admitted> = rows
        .iter()
        .map(|r| Admitted {
            outbox_id: r.get("id"),
            step_id: StepId(r.get("step_id")),
            attempt: r.get("attempt"),
        })
        .collect();
    if !claimed.is_empty() {
        sqlx::query("UPDATE outbox SET created_at = now() WHERE id = ANY($1)")
            .bind(claimed.iter().map(|a| a.outbox_id).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
    }
    Ok(claimed)
}
