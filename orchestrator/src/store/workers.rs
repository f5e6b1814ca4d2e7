//! The worker registry: the latest announcement of each worker process.

use super::Result;
use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, Row};
use tasker_schemas::WorkerHeartbeat;
use uuid::Uuid;

/// A worker as the registry knows it.
#[derive(Debug, Clone)]
pub struct WorkerRow {
    pub worker_id: Uuid,
    pub name: String,
    pub host: String,
    pub sdk: String,
    pub sdk_version: String,
    pub queues: Vec<String>,
    pub handlers: Vec<String>,
    pub concurrency: i32,
    pub in_flight: i32,
    pub interval_ms: i64,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
}

/// Records a heartbeat (the latest wins), or forgets the worker when it is stopping.
pub async fn record(db: impl PgExecutor<'_>, h: &WorkerHeartbeat) -> Result<()> {
    if h.stopping {
        sqlx::query("DELETE FROM workers WHERE worker_id = $1")
            .bind(h.worker_id.0)
            .execute(db)
            .await?;
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO workers (worker_id, name, host, sdk, sdk_version, queues, handlers,
                              concurrency, in_flight, interval_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         ON CONFLICT (worker_id) DO UPDATE
         SET name = excluded.name, host = excluded.host, sdk = excluded.sdk,
             sdk_version = excluded.sdk_version, queues = excluded.queues,
             handlers = excluded.handlers, concurrency = excluded.concurrency,
             in_flight = excluded.in_flight, interval_ms = excluded.interval_ms,
             last_seen = now()",
    )
    .bind(h.worker_id.0)
    .bind(&h.worker)
    .bind(&h.host)
    .bind(&h.sdk)
    .bind(&h.sdk_version)
    .bind(&h.queues)
    .bind(&h.handlers)
    .bind(i32::try_from(h.concurrency).unwrap_or(i32::MAX))
    .bind(i32::try_from(h.in_flight).unwrap_or(i32::MAX))
    .bind(i64::try_from(h.interval_ms).unwrap_or(i64::MAX))
    .execute(db)
    .await?;
    Ok(())
}

/// The live workers: heard from within 3 of their intervals. Newest first.
pub async fn live(db: impl PgExecutor<'_>) -> Result<Vec<WorkerRow>> {
    let rows = sqlx::query(
        "SELECT worker_id, name, host, sdk, sdk_version, queues, handlers, concurrency, in_flight,
                interval_ms, first_seen, last_seen
         FROM workers
         WHERE last_seen > now() - 3 * interval_ms * interval '1 millisecond'
         ORDER BY first_seen DESC, worker_id",
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .iter()
        .map(|r| WorkerRow {
            worker_id: r.get("worker_id"),
            name: r.get("name"),
            host: r.get("host"),
            sdk: r.get("sdk"),
            sdk_version: r.get("sdk_version"),
            queues: r.get("queues"),
            handlers: r.get("handlers"),
            concurrency: r.get("concurrency"),
            in_flight: r.get("in_flight"),
            interval_ms: r.get("interval_ms"),
            first_seen: r.get("first_seen"),
            last_seen: r.get("last_seen"),
        })
        .collect())
}

/// Whether the registry has ever heard from a worker that is still listed (live or recently
/// gone): without any, nothing can be said about missing handlers.
pub async fn any(db: impl PgExecutor<'_>) -> Result<bool> {
    Ok(sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM workers)")
        .fetch_one(db)
        .await?)
}

/// Deletes the rows of workers gone for longer than `gone_ms`.
pub async fn forget_gone(db: impl PgExecutor<'_>, gone_ms: i64) -> Result<u64> {
    Ok(sqlx::query(
        "DELETE FROM workers
         WHERE last_seen < now() - (3 * interval_ms + $1) * interval '1 millisecond'",
    )
    .bind(gone_ms)
    .execute(db)
    .await?
    .rows_affected())
}
