//! The `dead_letters` table: dead letters moved out of `{prefix}.dead_letters`, bounded, browsed
//! newest first with keyset pagination, removed when replayed or discarded.

use super::Result;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

/// A dead letter to record.
#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    pub kind: &'static str,
    pub reason: String,
    pub exchange: String,
    pub routing_key: String,
    pub message_id: Option<String>,
    pub headers: Value,
    /// The body, already cut to its bound.
    pub body: Vec<u8>,
    /// The original body's size.
    pub body_bytes: i32,
    pub namespace: Option<String>,
    pub task_id: Option<Uuid>,
    pub step: Option<String>,
}

/// Records a dead letter (a repeat of one already recorded, by message id, is ignored) and
/// deletes the oldest beyond `max_rows`. Returns whether it was new.
pub async fn insert(tx: &mut PgConnection, d: &NewDeadLetter, max_rows: i64) -> Result<bool> {
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO dead_letters (kind, reason, exchange, routing_key, message_id, headers, body,
                                   body_bytes, namespace, task_id, step)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
         ON CONFLICT (message_id) WHERE message_id IS NOT NULL DO NOTHING
         RETURNING id",
    )
    .bind(d.kind)
    .bind(&d.reason)
    .bind(&d.exchange)
    .bind(&d.routing_key)
    .bind(&d.message_id)
    .bind(&d.headers)
    .bind(&d.body)
    .bind(d.body_bytes)
    .bind(&d.namespace)
    .bind(d.task_id)
    .bind(&d.step)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(id) = id else { return Ok(false) };
    // Ids only grow: rows older than the newest `max_rows` ids go (at most `max_rows` stay;
    // fewer when ids were skipped or rows removed).
    sqlx::query("DELETE FROM dead_letters WHERE id <= $1")
        .bind(id - max_rows.max(1))
        .execute(&mut *tx)
        .await?;
    Ok(true)
}

/// A recorded dead letter, without its body.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeadLetterRow {
    pub id: i64,
    pub received_at: DateTime<Utc>,
    pub kind: String,
    pub reason: String,
    pub exchange: String,
    pub routing_key: String,
    pub message_id: Option<String>,
    pub headers: Value,
    pub body_bytes: i32,
    pub namespace: Option<String>,
    pub task_id: Option<Uuid>,
    pub step: Option<String>,
}

/// A browsing filter (all optional) and page.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterFilter {
    pub kind: Option<String>,
    pub namespace: Option<String>,
    /// Rows whose reason contains this text.
    pub reason: Option<String>,
    pub received_after: Option<DateTime<Utc>>,
    pub received_before: Option<DateTime<Utc>>,
    /// Keyset: rows with a smaller id than this (the last of the previous page).
    pub before_id: Option<i64>,
    /// Only these namespaces (the caller's scope; rows without a namespace excluded); `None`
    /// = any.
    pub scope: Option<Vec<String>>,
    pub limit: i64,
}

/// A page of dead letters, newest first, and whether more follow.
pub async fn list(
    db: impl PgExecutor<'_>,
    f: &DeadLetterFilter,
) -> Result<(Vec<DeadLetterRow>, bool)> {
    let mut rows: Vec<DeadLetterRow> = sqlx::query_as(
        "SELECT id, received_at, kind, reason, exchange, routing_key, message_id, headers,
                body_bytes, namespace, task_id, step
         FROM dead_letters
         WHERE ($1::text IS NULL OR kind = $1)
           AND ($2::text IS NULL OR namespace = $2)
           AND ($3::text IS NULL OR strpos(reason, $3) > 0)
           AND ($4::timestamptz IS NULL OR received_at >= $4)
           AND ($5::timestamptz IS NULL OR received_at < $5)
           AND ($6::bigint IS NULL OR id < $6)
           AND ($7::text[] IS NULL OR namespace = ANY($7))
         ORDER BY id DESC LIMIT $8",
    )
    .bind(&f.kind)
    .bind(&f.namespace)
    .bind(&f.reason)
    .bind(f.received_after)
    .bind(f.received_before)
    .bind(f.before_id)
    .bind(&f.scope)
    .bind(f.limit + 1)
    .fetch_all(db)
    .await?;
    let more = rows.len() as i64 > f.limit;
    rows.truncate(f.limit.max(0) as usize);
    Ok((rows, more))
}

/// A dead letter with its body.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeadLetterFull {
    #[sqlx(flatten)]
    pub row: DeadLetterRow,
    pub body: Vec<u8>,
}

/// One dead letter with its body.
pub async fn get(db: impl PgExecutor<'_>, id: i64) -> Result<Option<DeadLetterFull>> {
    Ok(sqlx::query_as(
        "SELECT id, received_at, kind, reason, exchange, routing_key, message_id, headers,
                body_bytes, namespace, task_id, step, body
         FROM dead_letters WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(db)
    .await?)
}

/// One dead letter with its body, locked (replay, discard); `None` when gone.
pub async fn lock(tx: &mut PgConnection, id: i64) -> Result<Option<DeadLetterFull>> {
    Ok(sqlx::query_as(
        "SELECT id, received_at, kind, reason, exchange, routing_key, message_id, headers,
                body_bytes, namespace, task_id, step, body
         FROM dead_letters WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?)
}

/// Removes a dead letter (replayed or discarded).
pub async fn delete(tx: &mut PgConnection, id: i64) -> Result<bool> {
    Ok(sqlx::query("DELETE FROM dead_letters WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
        > 0)
}
