//! Per-namespace settings: a retention that overrides the global one.

use super::Result;
use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct NamespaceRow {
    pub namespace: String,
    pub retention_ms: Option<i64>,
    pub updated_at: DateTime<Utc>,
}

/// Sets (or with `None` clears) a namespace's retention.
pub async fn set_retention(
    db: impl PgExecutor<'_>,
    namespace: &str,
    retention_ms: Option<i64>,
) -> Result<NamespaceRow> {
    Ok(sqlx::query_as(
        "INSERT INTO namespace_settings (namespace, retention_ms) VALUES ($1, $2)
         ON CONFLICT (namespace) DO UPDATE SET retention_ms = $2, updated_at = now()
         RETURNING namespace, retention_ms, updated_at",
    )
    .bind(namespace)
    .bind(retention_ms)
    .fetch_one(db)
    .await?)
}

/// The namespaces that have settings, or those of `scope` when given.
pub async fn list(db: impl PgExecutor<'_>, scope: Option<&[String]>) -> Result<Vec<NamespaceRow>> {
    Ok(sqlx::query_as(
        "SELECT namespace, retention_ms, updated_at FROM namespace_settings
         WHERE ($1::text[] IS NULL OR namespace = ANY($1)) ORDER BY namespace",
    )
    .bind(scope)
    .fetch_all(db)
    .await?)
}
