//! The counting queries behind the gauges of `/metrics`, and the snapshot every replica reads.

use super::Result;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::{PgExecutor, Row};

/// The figures of one queue of one namespace.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueFigures {
    pub namespace: String,
    pub queue: String,
    /// Ready, waiting in PostgreSQL for room in the queue.
    pub ready: i64,
    /// Dispatched and not finished.
    pub in_flight: i64,
    /// Waiting for the backoff of their next attempt.
    pub retrying: i64,
    /// Age of the oldest ready step, in seconds (0 with none).
    pub oldest_ready_s: f64,
}

/// Live tasks of one template.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskFigures {
    pub namespace: String,
    pub template: String,
    pub running: i64,
}

/// Everything the gauges show, as one replica computed it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub queues: Vec<QueueFigures>,
    pub tasks: Vec<TaskFigures>,
    /// Messages waiting per dead-letter queue.
    pub dead_letters: Vec<(String, i64)>,
    /// Live workers per queue they consume (the registry).
    #[serde(default)]
    pub workers: Vec<(String, i64)>,
}

/// Takes this interval's turn to compute the snapshot: true for the one replica whose update
/// of `computed_at` found it older than `every_ms`.
pub async fn claim_turn(db: impl PgExecutor<'_>, every_ms: i64) -> Result<bool> {
    let row = sqlx::query(
        "UPDATE gauge_snapshot SET computed_at = now()
         WHERE id = 1 AND computed_at < now() - $1 * interval '1 millisecond'
         RETURNING id",
    )
    .bind(every_ms)
    .fetch_optional(db)
    .await?;
    Ok(row.is_some())
}

/// Counts steps by state per (namespace, queue) — ready from the queued-steps index, in flight
/// and retrying from theirs — and live tasks per template.
pub async fn count(db: &sqlx::PgPool) -> Result<(Vec<QueueFigures>, Vec<TaskFigures>)> {
    let rows = sqlx::query(
        "SELECT namespace, queue,
                count(*) FILTER (WHERE state = 'queued') AS ready,
                count(*) FILTER (WHERE state = 'dispatched') AS in_flight,
                count(*) FILTER (WHERE state = 'retrying') AS retrying,
                coalesce(extract(epoch FROM now() - min(queued_at) FILTER (WHERE state = 'queued')), 0)::float8
                    AS oldest_ready_s
         FROM steps
         WHERE state IN ('queued', 'dispatched', 'retrying')
         GROUP BY namespace, queue
         ORDER BY namespace, queue",
    )
    .fetch_all(db)
    .await?;
    let queues = rows
        .iter()
        .map(|r| QueueFigures {
            namespace: r.get("namespace"),
            queue: r.get("queue"),
            ready: r.get("ready"),
            in_flight: r.get("in_flight"),
            retrying: r.get("retrying"),
            oldest_ready_s: r.get("oldest_ready_s"),
        })
        .collect();
    let rows = sqlx::query(
        "SELECT namespace, template_name, count(*) AS running FROM tasks
         WHERE state IN ('pending', 'running')
         GROUP BY namespace, template_name
         ORDER BY namespace, template_name",
    )
    .fetch_all(db)
    .await?;
    let tasks = rows
        .iter()
        .map(|r| TaskFigures {
            namespace: r.get("namespace"),
            template: r.get("template_name"),
            running: r.get("running"),
        })
        .collect();
    Ok((queues, tasks))
}

pub async fn save(db: impl PgExecutor<'_>, snapshot: &Snapshot) -> Result<()> {
    let body = serde_json::to_value(snapshot).unwrap_or(Value::Null);
    sqlx::query("UPDATE gauge_snapshot SET body = $1 WHERE id = 1")
        .bind(body)
        .execute(db)
        .await?;
    Ok(())
}

/// The latest snapshot (empty before the first one).
pub async fn load(db: impl PgExecutor<'_>) -> Result<Snapshot> {
    let body: Option<Value> = sqlx::query_scalar("SELECT body FROM gauge_snapshot WHERE id = 1")
        .fetch_optional(db)
        .await?;
    Ok(body
        .and_then(|b| serde_json::from_value(b).ok())
        .unwrap_or_default())
}
