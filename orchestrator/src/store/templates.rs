//! Templates: immutable per (namespace, name, version).

use super::{Result, StoreError};
use sqlx::{PgExecutor, Row};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tasker_schemas::Template;
use uuid::Uuid;

/// Outcome of registering a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registered {
    Created,
    /// The same content was already registered: a no-op.
    Unchanged,
    /// This (namespace, name, version) holds different content.
    Conflict,
}

/// Stores a validated template. Same content again is a no-op; different content is a conflict.
pub async fn register(db: impl PgExecutor<'_> + Copy, template: &Template) -> Result<Registered> {
    let hash = template.content_hash();
    let content = serde_json::to_value(template)
        .map_err(|e| StoreError::Corrupt(format!("template not representable as JSON: {e}")))?;
    let inserted = sqlx::query(
        "INSERT INTO templates (id, namespace, name, version, description, content, content_hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (namespace, name, version) DO NOTHING",
    )
    .bind(Uuid::now_v7())
    .bind(&template.namespace)
    .bind(&template.name)
    .bind(template.version as i32)
    .bind(&template.description)
    .bind(&content)
    .bind(&hash)
    .execute(db)
    .await?
    .rows_affected();
    if inserted == 1 {
        return Ok(Registered::Created);
    }
    let existing: String = sqlx::query_scalar(
        "SELECT content_hash FROM templates WHERE namespace = $1 AND name = $2 AND version = $3",
    )
    .bind(&template.namespace)
    .bind(&template.name)
    .bind(template.version as i32)
    .fetch_one(db)
    .await?;
    Ok(if existing == hash {
        Registered::Unchanged
    } else {
        Registered::Conflict
    })
}

/// A stored template version.
#[derive(Debug, Clone)]
pub struct StoredTemplate {
    pub id: Uuid,
    pub template: Arc<Template>,
    pub created_at: chrono::DateTime<chrono::Utc>,
}

/// Templates are immutable, so parsed ones are cached by id for the life of the process.
#[derive(Clone, Default)]
pub struct TemplateCache {
    inner: Arc<Mutex<HashMap<Uuid, Arc<Template>>>>,
}

impl TemplateCache {
    /// The given version, or the newest one when `version` is `None`; `None` when there is none.
    pub async fn find(
        &self,
        db: impl PgExecutor<'_>,
        namespace: &str,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<StoredTemplate>> {
        let row = sqlx::query(
            "SELECT id, created_at, content
             FROM templates
             WHERE namespace = $1 AND name = $2 AND ($3::int IS NULL OR version = $3)
             ORDER BY version DESC LIMIT 1",
        )
        .bind(namespace)
        .bind(name)
        .bind(version.map(|v| v as i32))
        .fetch_optional(db)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let id: Uuid = row.get("id");
        let created_at = row.get("created_at");
        if let Some(t) = self
            .inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            return Ok(Some(StoredTemplate {
                id,
                template: t.clone(),
                created_at,
            }));
        }
        let content: serde_json::Value = row.get("content");
        let template: Template = serde_json::from_value(content)
            .map_err(|e| StoreError::Corrupt(format!("stored template {id} is unreadable: {e}")))?;
        let template = Arc::new(template);
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, template.clone());
        Ok(Some(StoredTemplate {
            id,
            template,
            created_at,
        }))
    }
}

/// Summary rows for listing.
pub async fn list(db: impl PgExecutor<'_>, namespace: Option<&str>) -> Result<Vec<StoredTemplate>> {
    let rows = sqlx::query(
        "SELECT id, content, created_at FROM templates
         WHERE ($1::text IS NULL OR namespace = $1)
         ORDER BY namespace, name, version DESC LIMIT 1000",
    )
    .bind(namespace)
    .fetch_all(db)
    .await?;
    rows.into_iter()
        .map(|row| {
            let template: Template = serde_json::from_value(row.get("content"))
                .map_err(|e| StoreError::Corrupt(format!("stored template unreadable: {e}")))?;
            Ok(StoredTemplate {
                id: row.get("id"),
                template: Arc::new(template),
                created_at: row.get("created_at"),
            })
        })
        .collect()
}

/// Every queue named by any registered template (declared on start).
pub async fn all_queues(db: impl PgExecutor<'_>) -> Result<Vec<String>> {
    Ok(sqlx::query_scalar(
        "SELECT namespace || '.' || coalesce(s->>'queue', $1)
         FROM templates, jsonb_array_elements(content->'steps') AS s
         WHERE NOT (s ? 'workflow' OR s ? 'sleep' OR s ? 'sleep_until' OR s ? 'wait_for')
         UNION
         SELECT namespace || '.' || coalesce(content->'on_failure'->>'queue', $1) FROM templates
         WHERE content ? 'on_failure'",
    )
    .bind(tasker_schemas::template::DEFAULT_QUEUE)
    .fetch_all(db)
    .await?)
}
