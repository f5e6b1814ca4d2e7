//! The audit log: who did which operator action, when, on what.

use super::Result;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AuditRow {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub key_id: Option<Uuid>,
    pub action: String,
    pub namespace: Option<String>,
    pub task_id: Option<Uuid>,
    pub detail: Value,
}

pub struct NewEntry<'a> {
    pub actor: &'a str,
    pub key_id: Option<Uuid>,
    pub action: &'a str,
    pub namespace: Option<&'a str>,
    pub task_id: Option<Uuid>,
    pub detail: &'a Value,
}

pub async fn insert(tx: &mut PgConnection, e: &NewEntry<'_>) -> Result<i64> {
    Ok(sqlx::query_scalar(
        "INSERT INTO audit_log (actor, key_id, action, namespace, task_id, detail)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
    )
    .bind(e.actor)
    .bind(e.key_id)
    .bind(e.action)
    .bind(e.namespace)
    .bind(e.task_id)
    .bind(e.detail)
    .fetch_one(&mut *tx)
    .await?)
}

/// What to list: newest first, before `before` (an entry id, for the next page).
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub task_id: Option<Uuid>,
    pub namespace: Option<String>,
    /// Only entries in these namespaces (and those about no namespace: key changes) — a
    /// namespace-scoped key's view. `None` = everything.
    pub scope: Option<Vec<String>>,
    pub action: Option<String>,
    pub before: Option<i64>,
    pub limit: i64,
}

pub async fn list(db: impl PgExecutor<'_>, f: &AuditFilter) -> Result<Vec<AuditRow>> {
    Ok(sqlx::query_as(
        "SELECT id, at, actor, key_id, action, namespace, task_id, detail FROM audit_log
         WHERE ($1::uuid IS NULL OR task_id = $1)
           AND ($2::text IS NULL OR namespace = $2)
           AND ($3::text[] IS NULL OR namespace = ANY($3))
           AND ($4::text IS NULL OR action = $4)
           AND ($5::bigint IS NULL OR id < $5)
         ORDER BY id DESC LIMIT $6",
    )
    .bind(f.task_id)
    .bind(&f.namespace)
    .bind(&f.scope)
    .bind(&f.action)
    .bind(f.before)
    .bind(f.limit)
    .fetch_all(db)
    .await?)
}

/// Deletes entries older than `retention_ms`, at most `limit`. Returns how many went.
pub async fn prune(db: impl PgExecutor<'_>, retention_ms: i64, limit: i64) -> Result<u64> {
    Ok(sqlx::query(
        "DELETE FROM audit_log WHERE id IN (
             SELECT id FROM audit_log WHERE at < now() - $1 * interval '1 millisecond'
             ORDER BY at LIMIT $2)",
    )
    .bind(retention_ms)
    .bind(limit)
    .execute(db)
    .await?
    .rows_affected())
}
