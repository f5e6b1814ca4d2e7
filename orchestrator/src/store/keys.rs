//! API keys: stored by the SHA-256 of the key (never the key itself), with a role and a
//! namespace scope (`NULL` = every namespace).

use super::Result;
use chrono::{DateTime, Utc};
use sqlx::PgExecutor;
use uuid::Uuid;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyRow {
    pub id: Uuid,
    pub name: String,
    pub role: String,
    pub namespaces: Option<Vec<String>>,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoked_by: Option<String>,
}

pub struct NewKey<'a> {
    pub id: Uuid,
    pub name: &'a str,
    pub token_hash: &'a [u8],
    pub role: &'a str,
    pub namespaces: Option<&'a [String]>,
    pub created_by: &'a str,
}

pub async fn insert(db: impl PgExecutor<'_>, k: &NewKey<'_>) -> Result<KeyRow> {
    Ok(sqlx::query_as(
        "INSERT INTO api_keys (id, name, token_hash, role, namespaces, created_by)
         VALUES ($1, $2, $3, $4, $5, $6)
         RETURNING id, name, role, namespaces, created_at, created_by, revoked_at, revoked_by",
    )
    .bind(k.id)
    .bind(k.name)
    .bind(k.token_hash)
    .bind(k.role)
    .bind(k.namespaces)
    .bind(k.created_by)
    .fetch_one(db)
    .await?)
}

/// The key with this hash, revoked or not.
pub async fn by_hash(db: impl PgExecutor<'_>, hash: &[u8]) -> Result<Option<KeyRow>> {
    Ok(sqlx::query_as(
        "SELECT id, name, role, namespaces, created_at, created_by, revoked_at, revoked_by
         FROM api_keys WHERE token_hash = $1",
    )
    .bind(hash)
    .fetch_optional(db)
    .await?)
}

pub async fn get(db: impl PgExecutor<'_>, id: Uuid) -> Result<Option<KeyRow>> {
    Ok(sqlx::query_as(
        "SELECT id, name, role, namespaces, created_at, created_by, revoked_at, revoked_by
         FROM api_keys WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(db)
    .await?)
}

/// Every key, newest first (revoked ones too, when `revoked`), at most `limit`.
pub async fn list(db: impl PgExecutor<'_>, revoked: bool, limit: i64) -> Result<Vec<KeyRow>> {
    Ok(sqlx::query_as(
        "SELECT id, name, role, namespaces, created_at, created_by, revoked_at, revoked_by
         FROM api_keys WHERE ($1 OR revoked_at IS NULL)
         ORDER BY created_at DESC, id LIMIT $2",
    )
    .bind(revoked)
    .bind(limit)
    .fetch_all(db)
    .await?)
}

/// Revokes a live key; `None` when there is no such key or it was revoked already.
pub async fn revoke(db: impl PgExecutor<'_>, id: Uuid, by: &str) -> Result<Option<KeyRow>> {
    Ok(sqlx::query_as(
        "UPDATE api_keys SET revoked_at = now(), revoked_by = $2
         WHERE id = $1 AND revoked_at IS NULL
         RETURNING id, name, role, namespaces, created_at, created_by, revoked_at, revoked_by",
    )
    .bind(id)
    .bind(by)
    .fetch_optional(db)
    .await?)
}
