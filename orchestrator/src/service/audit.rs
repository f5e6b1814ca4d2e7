//! The audit log: every operator action records who acted, in the action's own transaction.

use super::{Result, Shared};
use crate::auth::{Principal, Role};
use crate::store::audit::{self as store, AuditFilter, AuditRow, NewEntry};
use serde_json::Value;
use sqlx::PgConnection;
use tasker_schemas::TaskId;

/// Most entries one listing returns.
pub const MAX_AUDIT_PAGE: i64 = 500;

/// Records that `who` did `action` (e.g. `task.cancel`, `template.register`, `key.create`),
/// inside the caller's transaction so the entry commits with the action or not at all.
pub async fn record(
    conn: &mut PgConnection,
    who: &Principal,
    action: &str,
    namespace: Option<&str>,
    task_id: Option<TaskId>,
    detail: Value,
) -> Result<()> {
    store::insert(
        conn,
        &NewEntry {
            actor: &who.actor,
            key_id: who.key_id,
            action,
            namespace,
            task_id: task_id.map(|t| t.0),
            detail: &detail,
        },
    )
    .await?;
    tracing::info!(actor = %who.actor, action, namespace, task_id = ?task_id.map(|t| t.to_string()), "audit");
    Ok(())
}

/// Entries newest first. A namespace-scoped key sees only entries of its namespaces.
pub async fn list(
    shared: &Shared,
    who: &Principal,
    mut filter: AuditFilter,
) -> Result<Vec<AuditRow>> {
    if !who.has_role(Role::Read) {
        return Err(super::keys::forbidden(
            who,
            Role::Read,
            "read the audit log",
        ));
    }
    if let Some(ns) = &filter.namespace {
        super::keys::require(who, Role::Read, ns, "read the audit log")?;
    }
    filter.scope = who.scope().map(<[String]>::to_vec);
    filter.limit = filter.limit.clamp(1, MAX_AUDIT_PAGE);
    Ok(store::list(&shared.db, &filter).await?)
}

/// Deletes entries past `TASKER_AUDIT_RETENTION_MS`, in batches. Returns how many went.
pub async fn prune(shared: &Shared, batch: i64) -> Result<u64> {
    let retention = i64::try_from(shared.config.audit_retention_ms).unwrap_or(i64::MAX);
    Ok(store::prune(&shared.db, retention, batch).await?)
}
