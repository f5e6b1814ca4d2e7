//! The console's reads (`crate::console`): the task search with its filters, exact counts of
//! live tasks, a task's live node states and change fingerprint (for server-sent events), a
//! step's full output, and browser sessions.
//!
//! Every query is index-backed at a million tasks (docs/console.md lists the plans): task ids
//! are UUIDv7, so a time range is an id range of the primary key or of `tasks_namespace_id`;
//! the search adds only the predicates a filter asks for (fixed SQL fragments, values bound),
//! so each combination gets a plan of its own.

use super::Result;
use super::views::TaskSummaryRow;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgExecutor, Postgres, QueryBuilder};
use tasker_schemas::{StepState, TaskState};
use uuid::Uuid;

/// The filters of the tasks page. A context filter needs an id range (a time range): the
/// caller bounds its width.
#[derive(Debug, Default, Clone)]
pub struct TaskSearch {
    /// The namespaces the reader may see (`None` = every namespace).
    pub scope: Option<Vec<String>>,
    /// Only these namespaces (used to reach the `(namespace, idempotency_key)` index when no
    /// namespace is chosen).
    pub namespace_in: Option<Vec<String>>,
    pub namespace: Option<String>,
    pub state: Option<TaskState>,
    pub template: Option<String>,
    /// Ids at or above this one (created at or after a time).
    pub id_from: Option<Uuid>,
    /// Ids at or below this one.
    pub id_to: Option<Uuid>,
    pub idempotency_key: Option<String>,
    pub task_id: Option<Uuid>,
    /// `context ->> field = value`.
    pub context: Option<(String, String)>,
    /// Keyset: ids below this one (the last of the previous page).
    pub after: Option<Uuid>,
    pub limit: i64,
    /// Search as one scan per (namespace, template, state) of the `tasks_template` index,
    /// merged (see [`search`]); `Some(empty)` matches nothing.
    pub branches: Option<Vec<(String, String, TaskState)>>,
}

/// Tasks newest first matching `f`: a page and whether more follow.
///
/// With [`TaskSearch::branches`], one index range scan of `tasks_template` per
/// (namespace, template, state), each newest first and limited, merged: a rare combination
/// (the failed tasks of one template) costs what it finds, not a scan of everything newer.
pub async fn search(
    db: impl PgExecutor<'_>,
    f: &TaskSearch,
) -> Result<(Vec<TaskSummaryRow>, bool)> {
    let limit = f.limit.clamp(1, super::views::MAX_LIST_PAGE);
    let mut q = QueryBuilder::<Postgres>::new("");
    match &f.branches {
        Some(branches) if !branches.is_empty() => {
            q.push("SELECT * FROM (");
            for (i, (ns, template, state)) in branches.iter().enumerate() {
                if i > 0 {
                    q.push(" UNION ALL ");
                }
                q.push("(");
                push_select(&mut q, f);
                q.push(" AND namespace = ")
                    .push_bind(ns)
                    .push(" AND template_name = ")
                    .push_bind(template)
                    .push(" AND state = ")
                    .push_bind(*state);
                q.push(" ORDER BY id DESC LIMIT ")
                    .push_bind(limit + 1)
                    .push(")");
            }
            q.push(") b");
        }
        Some(_) => return Ok((Vec::new(), false)),
        None => push_select(&mut q, f),
    }
    q.push(" ORDER BY id DESC LIMIT ").push_bind(limit + 1);
    let mut rows: Vec<TaskSummaryRow> = q.build_query_as().fetch_all(db).await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    Ok((rows, more))
}

/// `SELECT … FROM tasks WHERE` the filters of `f`.
fn push_select(q: &mut QueryBuilder<Postgres>, f: &TaskSearch) {
    q.push(
        "SELECT id, namespace, template_name, template_version, state, priority, error,
                idempotency_key, created_at, finished_at, parent_task_id
         FROM tasks WHERE true",
    );
    if let Some(scope) = &f.scope {
        q.push(" AND namespace = ANY(")
            .push_bind(scope.clone())
            .push(")");
    }
    if let Some(list) = &f.namespace_in {
        q.push(" AND namespace = ANY(")
            .push_bind(list.clone())
            .push(")");
    }
    if let Some(n) = &f.namespace {
        q.push(" AND namespace = ").push_bind(n.clone());
    }
    if let Some(s) = f.state {
        q.push(" AND state = ").push_bind(s);
    }
    if let Some(t) = &f.template {
        q.push(" AND template_name = ").push_bind(t.clone());
    }
    if let Some(id) = f.id_from {
        q.push(" AND id >= ").push_bind(id);
    }
    if let Some(id) = f.id_to {
        q.push(" AND id <= ").push_bind(id);
    }
    if let Some(k) = &f.idempotency_key {
        q.push(" AND idempotency_key = ").push_bind(k.clone());
    }
    if let Some(id) = f.task_id {
        q.push(" AND id = ").push_bind(id);
    }
    if let Some((field, value)) = &f.context {
        q.push(" AND context ->> ")
            .push_bind(field.clone())
            .push(" = ")
            .push_bind(value.clone());
    }
    if let Some(after) = f.after {
        q.push(" AND id < ").push_bind(after);
    }
}

/// The (namespace, template name) pairs templates are registered under, sorted.
pub async fn template_names(db: impl PgExecutor<'_>) -> Result<Vec<(String, String)>> {
    Ok(
        sqlx::query_as("SELECT DISTINCT namespace, name FROM templates ORDER BY namespace, name")
            .fetch_all(db)
            .await?,
    )
}

/// Exact counts of live tasks (`pending`, `running`) by state, within the scope and the
/// namespace and template filters (from the partial index of live tasks).
pub async fn live_counts(
    db: impl PgExecutor<'_>,
    scope: Option<&[String]>,
    namespace: Option<&str>,
    template: Option<&str>,
) -> Result<Vec<(TaskState, i64)>> {
    let mut q = QueryBuilder::<Postgres>::new(
        "SELECT state, count(*) FROM tasks WHERE state IN ('pending', 'running')",
    );
    if let Some(scope) = scope {
        q.push(" AND namespace = ANY(").push_bind(scope).push(")");
    }
    if let Some(n) = namespace {
        q.push(" AND namespace = ").push_bind(n);
    }
    if let Some(t) = template {
        q.push(" AND template_name = ").push_bind(t);
    }
    q.push(" GROUP BY state ORDER BY state");
    Ok(q.build_query_as::<(TaskState, i64)>().fetch_all(db).await?)
}

/// The namespaces templates are registered in (tasks exist only there), sorted.
pub async fn namespaces(db: impl PgExecutor<'_>) -> Result<Vec<String>> {
    Ok(
        sqlx::query_scalar("SELECT DISTINCT namespace FROM templates ORDER BY namespace")
            .fetch_all(db)
            .await?,
    )
}

/// What changes whenever a task or one of its steps (mapped steps included, by their
/// counters) changes: compared by the live page's event stream. `None` for no such task.
pub async fn fingerprint(db: impl PgExecutor<'_>, task: Uuid) -> Result<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT t.state || ':' || t.unfinished_steps || ':' || t.event_seq || ':' ||
                coalesce((SELECT max(s.updated_at) FROM steps s
                          WHERE s.task_id = t.id AND s.map_of IS NULL)::text, '')
         FROM tasks t WHERE t.id = $1",
    )
    .bind(task)
    .fetch_optional(db)
    .await?)
}

/// A step as the live page redraws it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct NodeRow {
    pub name: String,
    pub handler: String,
    pub child_task_id: Option<Uuid>,
    pub state: StepState,
    pub attempt: i32,
    pub map_total: Option<i32>,
    /// A mapped step's instances counted by state.
    pub map_counts: Option<Value>,
}

/// A task's state and its (top-level) steps' states; `None` for no such task.
pub async fn nodes(db: &sqlx::PgPool, task: Uuid) -> Result<Option<(TaskState, Vec<NodeRow>)>> {
    let state: Option<TaskState> = sqlx::query_scalar("SELECT state FROM tasks WHERE id = $1")
        .bind(task)
        .fetch_optional(db)
        .await?;
    let Some(state) = state else {
        return Ok(None);
    };
    let rows = sqlx::query_as(
        "SELECT s.name, s.handler, s.child_task_id, s.state, s.attempt, s.map_total,
                CASE WHEN s.map_over IS NOT NULL THEN
                    (SELECT coalesce(jsonb_object_agg(c.state, c.n), '{}'::jsonb)
                     FROM (SELECT i.state, count(*) AS n FROM steps i WHERE i.map_of = s.id
                           GROUP BY i.state) c) END AS map_counts
         FROM steps s WHERE s.task_id = $1 AND s.map_of IS NULL ORDER BY s.position",
    )
    .bind(task)
    .fetch_all(db)
    .await?;
    Ok(Some((state, rows)))
}

/// A step's whole output (`Some(None)`: the step has none yet); `None` for no such step.
pub async fn step_output(
    db: impl PgExecutor<'_>,
    task: Uuid,
    step: &str,
) -> Result<Option<Option<Value>>> {
    Ok(sqlx::query_scalar(
        "SELECT output FROM steps WHERE task_id = $1 AND name = $2 AND map_of IS NULL",
    )
    .bind(task)
    .bind(step)
    .fetch_optional(db)
    .await?)
}

/// A task's context and output, whole; `None` for no such task.
pub async fn task_values(
    db: impl PgExecutor<'_>,
    task: Uuid,
) -> Result<Option<(Value, Option<Value>)>> {
    Ok(
        sqlx::query_as("SELECT context, output FROM tasks WHERE id = $1")
            .bind(task)
            .fetch_optional(db)
            .await?,
    )
}

/// A signed-in browser session.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SessionRow {
    pub key_hash: Vec<u8>,
    pub csrf: String,
    pub expires_at: DateTime<Utc>,
}

/// Stores a new session (and deletes expired ones, a few at a time).
pub async fn create_session(
    db: &sqlx::PgPool,
    id_hash: &[u8],
    key_hash: &[u8],
    csrf: &str,
    ttl_ms: i64,
) -> Result<()> {
    sqlx::query(
        "DELETE FROM console_sessions WHERE id_hash IN
            (SELECT id_hash FROM console_sessions WHERE expires_at < now() LIMIT 100)",
    )
    .execute(db)
    .await?;
    sqlx::query(
        "INSERT INTO console_sessions (id_hash, key_hash, csrf, expires_at)
         VALUES ($1, $2, $3, now() + $4 * interval '1 millisecond')",
    )
    .bind(id_hash)
    .bind(key_hash)
    .bind(csrf)
    .bind(ttl_ms)
    .execute(db)
    .await?;
    Ok(())
}

/// The unexpired session with this id hash.
pub async fn session(db: impl PgExecutor<'_>, id_hash: &[u8]) -> Result<Option<SessionRow>> {
    Ok(sqlx::query_as(
        "SELECT key_hash, csrf, expires_at FROM console_sessions
         WHERE id_hash = $1 AND expires_at > now()",
    )
    .bind(id_hash)
    .fetch_optional(db)
    .await?)
}

/// Ends a session.
pub async fn delete_session(db: impl PgExecutor<'_>, id_hash: &[u8]) -> Result<()> {
    sqlx::query("DELETE FROM console_sessions WHERE id_hash = $1")
        .bind(id_hash)
        .execute(db)
        .await?;
    Ok(())
}

/// A task's namespace (to check who may see it); `None` for no such task.
pub async fn task_namespace(db: impl PgExecutor<'_>, task: Uuid) -> Result<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT namespace FROM tasks WHERE id = $1")
            .bind(task)
            .fetch_optional(db)
            .await?,
    )
}
