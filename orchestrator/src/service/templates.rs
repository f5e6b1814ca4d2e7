//! Templates: validating, storing and declaring the queues of a template; reading them.

use super::{Result, ServiceError, Shared};
use crate::store::templates::{self, Registered, StoredTemplate};
use std::path::Path;
use tasker_schemas::Template;

/// Validates, stores and declares the queues of a template. Same content again is a no-op;
/// different content under the same version is a conflict.
pub async fn register(shared: &Shared, template: &Template) -> Result<Registered> {
    template.validate()?;
    let outcome = templates::register(&shared.db, template).await?;
    if outcome == Registered::Conflict {
        return Err(ServiceError::TemplateConflict {
            namespace: template.namespace.clone(),
            name: template.name.clone(),
            version: template.version,
        });
    }
    let mut queues: Vec<&str> = template.steps.iter().map(|s| s.queue()).collect();
    queues.sort_unstable();
    queues.dedup();
    for q in &queues {
        shared.publisher.declare_step_queue(q).await?;
    }
    shared.dispatch.know(queues.iter().map(|q| q.to_string()));
    Ok(outcome)
}

/// The given version, or the newest one when `version` is `None`.
pub async fn find(
    shared: &Shared,
    namespace: &str,
    name: &str,
    version: Option<u32>,
) -> Result<StoredTemplate> {
    shared
        .templates
        .find(&shared.db, namespace, name, version)
        .await?
        .ok_or_else(|| ServiceError::TemplateNotFound {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            version,
        })
}

/// Every registered template version (newest first per name), optionally of one namespace.
pub async fn list(shared: &Shared, namespace: Option<&str>) -> Result<Vec<StoredTemplate>> {
    Ok(templates::list(&shared.db, namespace).await?)
}

/// Every queue named by any registered template.
pub async fn all_queues(shared: &Shared) -> Result<Vec<String>> {
    Ok(templates::all_queues(&shared.db).await?)
}

/// Parses a template written in YAML (or JSON, which is YAML too).
pub fn parse_template(text: &str) -> std::result::Result<Template, String> {
    serde_saphyr::from_str(text).map_err(|e| e.to_string())
}

/// Parses a template file (YAML or JSON).
pub fn read_template_file(path: &Path) -> std::result::Result<Template, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_template(&text).map_err(|e| format!("invalid template {}: {e}", path.display()))
}
