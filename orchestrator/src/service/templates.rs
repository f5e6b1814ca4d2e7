//! Templates: validating, storing and declaring the queues of a template; reading them.

use super::{Result, ServiceError, Shared, audit, keys};
use crate::auth::{Principal, Role};
use crate::store::templates::{self, Registered, StoredTemplate};
use std::path::Path;
use tasker_schemas::Template;

/// Validates, stores and declares the queues of a template. Same content again is a no-op;
/// different content under the same version is a conflict. Needs role `admin` in the template's
/// namespace; a new version is recorded in the audit log.
pub async fn register(shared: &Shared, who: &Principal, template: &Template) -> Result<Registered> {
    template.validate()?;
    keys::require(who, Role::Admin, &template.namespace, "register templates")?;
    let outcome = templates::register(&shared.db, template).await?;
    if outcome == Registered::Created {
        let mut conn = shared.db.acquire().await?;
        audit::record(
            &mut conn,
            who,
            "template.register",
            Some(&template.namespace),
            None,
            serde_json::json!({ "name": template.name, "version": template.version }),
        )
        .await?;
    }
    if outcome == Registered::Conflict {
        let newest = shared
            .templates
            .find(&shared.db, &template.namespace, &template.name, None)
            .await?
            .map_or(template.version, |t| t.template.version);
        return Err(ServiceError::TemplateConflict {
            namespace: template.namespace.clone(),
            name: template.name.clone(),
            version: template.version,
            next_version: newest.max(template.version).saturating_add(1),
        });
    }
    // Every queue a step may be sent to (the on_failure handler's included), in the template's
    // namespace: `{namespace}.{queue}` keys.
    let mut queues: Vec<String> = template
        .steps
        .iter()
        .filter(|s| !s.has_no_handler())
        .map(|s| s.queue())
        .chain(template.on_failure.as_ref().map(|h| {
            h.queue
                .as_deref()
                .unwrap_or(tasker_schemas::template::DEFAULT_QUEUE)
        }))
        .map(|q| tasker_schemas::topology::step_routing_key(&template.namespace, q))
        .collect();
    queues.sort_unstable();
    queues.dedup();
    for q in &queues {
        shared.publisher.declare_step_queue(q).await?;
    }
    shared.dispatch.know(queues);
    Ok(outcome)
}

/// The given version, or the newest one when `version` is `None`.
pub async fn find(
    shared: &Shared,
    namespace: &str,
    name: &str,
    version: Option<u32>,
) -> Result<StoredTemplate> {
    super::name_arg("namespace", namespace)?;
    super::name_arg("template", name)?;
    match shared
        .templates
        .find(&shared.db, namespace, name, version)
        .await?
    {
        Some(t) => Ok(t),
        None => Err(ServiceError::TemplateNotFound {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            version,
            hint: not_found_hint(shared, namespace, name, version).await,
        }),
    }
}

/// What to tell a caller who asked for a template that is not there: the closest registered name
/// in that namespace ("did you mean ...?"), the versions of the name when only the version was
/// wrong, or that the namespace has no template at all (and the closest namespace that has).
/// `None` when there is nothing useful to add (or the lookup failed: the not-found answer stands
/// on its own).
async fn not_found_hint(
    shared: &Shared,
    namespace: &str,
    name: &str,
    version: Option<u32>,
) -> Option<String> {
    let registered = match templates::list(&shared.db, Some(namespace)).await {
        Ok(registered) => registered,
        Err(e) => {
            tracing::debug!(error = %e, "cannot list templates for a suggestion");
            return None;
        }
    };
    if registered.is_empty() {
        let all = templates::list(&shared.db, None).await.unwrap_or_default();
        let closest = closest_name(namespace, all.iter().map(|t| t.template.namespace.as_str()));
        return Some(match closest {
            Some(closest) => {
                format!("namespace {namespace} has no templates; did you mean {closest}?")
            }
            None => format!("namespace {namespace} has no templates"),
        });
    }
    let versions: Vec<String> = registered
        .iter()
        .filter(|t| t.template.name == name)
        .map(|t| t.template.version.to_string())
        .collect();
    if !versions.is_empty() && version.is_some() {
        return Some(format!("registered versions: {}", versions.join(", ")));
    }
    closest_name(name, registered.iter().map(|t| t.template.name.as_str()))
        .map(|closest| format!("did you mean {closest}?"))
}

/// The candidate closest to `wanted` by edit distance (ignoring case), when it is close enough to
/// be a likely typo: at most a third of the longer name's length, and 2 edits for any name.
/// Ties go to the first candidate; `wanted` itself is no suggestion.
pub fn closest_name<'a>(
    wanted: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let wanted_lower = wanted.to_lowercase();
    let mut best: Option<(usize, &'a str)> = None;
    for candidate in candidates {
        let distance = edit_distance(&wanted_lower, &candidate.to_lowercase());
        let longer = wanted.chars().count().max(candidate.chars().count());
        let allowed = (longer / 3).max(2);
        if distance > allowed || candidate == wanted {
            continue;
        }
        if best.is_none_or(|(d, _)| distance < d) {
            best = Some((distance, candidate));
        }
    }
    best.map(|(_, name)| name)
}

/// Levenshtein distance: the fewest single-character insertions, deletions and substitutions
/// that turn `a` into `b`.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        current[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

/// Every registered template version (newest first per name), optionally of one namespace;
/// only the namespaces `who` may read.
pub async fn list(
    shared: &Shared,
    who: &Principal,
    namespace: Option<&str>,
) -> Result<Vec<StoredTemplate>> {
    if let Some(n) = namespace {
        super::name_arg("namespace", n)?;
        keys::require(who, Role::Read, n, "list templates")?;
    }
    let mut all = templates::list(&shared.db, namespace).await?;
    all.retain(|t| who.sees(&t.template.namespace));
    Ok(all)
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

#[cfg(test)]
mod tests {
    use super::{closest_name, edit_distance};

    #[test]
    fn edit_distance_counts_insertions_deletions_and_substitutions() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("abc", ""), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("order_fulfillment", "order_fulfilment"), 1);
        assert_eq!(edit_distance("flaw", "lawn"), 2);
        assert_eq!(edit_distance("same", "same"), 0);
    }

    #[test]
    fn the_closest_likely_typo_is_suggested() {
        let names = ["order_fulfilment", "order_refund", "invoice"];
        assert_eq!(
            closest_name("order_fulfillment", names),
            Some("order_fulfilment")
        );
        assert_eq!(closest_name("Order_Refnud", names), Some("order_refund"));
        assert_eq!(closest_name("invoise", names), Some("invoice"));
        // Too far from everything: no suggestion rather than a silly one.
        assert_eq!(closest_name("shipping_label", names), None);
        assert_eq!(closest_name("x", names), None);
        assert_eq!(closest_name("anything", []), None);
        // An exact match is not a suggestion.
        assert_eq!(closest_name("invoice", ["invoice"]), None);
    }
}
