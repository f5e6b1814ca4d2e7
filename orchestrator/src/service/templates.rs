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

/// Registers every `*.yaml`, `*.yml` and `*.json` template in `dir`, in name order.
pub async fn load_dir(shared: &Shared, dir: &Path) -> std::result::Result<(), crate::Error> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        crate::Error::Templates(format!("cannot read templates dir {}: {e}", dir.display()))
    })?;
    let mut paths: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
        })
        .collect();
    paths.sort();
    for path in paths {
        let template = read_template_file(&path).map_err(crate::Error::Templates)?;
        let outcome = register(shared, &template).await?;
        tracing::info!(path = %path.display(), name = %template.name, version = template.version, ?outcome, "template loaded");
    }
    Ok(())
}
