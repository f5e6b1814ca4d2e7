//! Per-namespace settings: a retention that overrides `TASKER_RETENTION_MS`.

use super::{Result, ServiceError, Shared, audit, keys, name_arg};
use crate::auth::{Principal, Role};
use crate::store::namespaces::{self as store, NamespaceRow};
use serde_json::json;

/// Longest retention a namespace may set (10 years, in ms).
pub const MAX_RETENTION_MS: u64 = 10 * 366 * 24 * 3600 * 1000;

/// Sets (or with `None` clears) a namespace's retention. Needs `admin` in the namespace.
pub async fn set_retention(
    shared: &Shared,
    who: &Principal,
    namespace: &str,
    retention_ms: Option<u64>,
) -> Result<NamespaceRow> {
    name_arg("namespace", namespace)?;
    keys::require(who, Role::Admin, namespace, "set a namespace's retention")?;
    if let Some(ms) = retention_ms
        && !(1..=MAX_RETENTION_MS).contains(&ms)
    {
        return Err(ServiceError::InvalidRequest(format!(
            "retention_ms={ms} is out of range: 1 to {MAX_RETENTION_MS} (10 years)"
        )));
    }
    let ms = retention_ms.map(|m| m as i64);
    let mut tx = shared.db.begin().await?;
    let row = store::set_retention(&mut *tx, namespace, ms).await?;
    audit::record(
        &mut tx,
        who,
        "namespace.retention",
        Some(namespace),
        None,
        json!({ "retention_ms": ms }),
    )
    .await?;
    tx.commit().await?;
    Ok(row)
}

/// The namespaces with settings that `who` can see.
pub async fn list(shared: &Shared, who: &Principal) -> Result<Vec<NamespaceRow>> {
    Ok(store::list(&shared.db, who.scope()).await?)
}
