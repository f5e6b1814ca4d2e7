//! API keys: turning a bearer token into a [`Principal`], and creating, listing and revoking
//! keys. A key is `tsk_` + 64 hex digits (256 random bits), shown once; only its SHA-256 is
//! stored. The bootstrap keys of `TASKER_API_KEYS` are admins over every namespace.

use super::{Result, ServiceError, Shared, audit, name_arg};
use crate::auth::{Principal, Role};
use crate::store::keys::{self as store, KeyRow, NewKey};
use rand::RngCore;
use serde_json::json;
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Every key starts with this.
pub const TOKEN_PREFIX: &str = "tsk_";
/// Most namespaces one key may name.
pub const MAX_KEY_NAMESPACES: usize = 100;
/// Longest key name (a label for people).
pub const MAX_KEY_NAME_LEN: usize = 128;
/// Most keys one listing returns.
pub const MAX_KEYS_LISTED: i64 = 1000;

/// The SHA-256 of a token: what is stored and looked up.
pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{TOKEN_PREFIX}{}", hex::encode(bytes))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Who a bearer token is: a bootstrap key, or a stored key that is not revoked. Unknown and
/// revoked keys are [`ServiceError::Unauthorized`].
pub async fn authenticate(shared: &Shared, token: &str) -> Result<Principal> {
    authenticate_hash(shared, &token_hash(token)).await
}

/// [`authenticate`] by the token's hash (what a console session keeps instead of the key).
pub async fn authenticate_hash(shared: &Shared, hash: &[u8]) -> Result<Principal> {
    if shared
        .config
        .api_keys
        .iter()
        .any(|k| constant_time_eq(&token_hash(k), hash))
    {
        return Ok(Principal::bootstrap());
    }
    match store::by_hash(&shared.db, hash).await? {
        None => Err(ServiceError::Unauthorized("unknown API key".into())),
        Some(k) if k.revoked_at.is_some() => Err(ServiceError::Unauthorized(
            "this API key was revoked".into(),
        )),
        Some(k) => principal(&k),
    }
}

fn principal(k: &KeyRow) -> Result<Principal> {
    let role = Role::parse(&k.role).ok_or_else(|| {
        crate::store::StoreError::Corrupt(format!("key {} has role {:?}", k.id, k.role))
    })?;
    Ok(Principal {
        key_id: Some(k.id),
        actor: actor(k),
        role,
        namespaces: k.namespaces.clone(),
    })
}

/// How the audit log names a stored key: `key:<first 8 hex digits of its id>`, plus its name.
pub fn actor(k: &KeyRow) -> String {
    let short = &k.id.simple().to_string()[..8];
    if k.name.is_empty() {
        format!("key:{short}")
    } else {
        format!("key:{short} ({})", k.name)
    }
}

/// A key just created: the row, and the key itself (shown once, never stored).
#[derive(Debug)]
pub struct CreatedKey {
    pub key: KeyRow,
    pub token: String,
}

/// Creates a key with `role` over `namespaces` (`None` = every namespace). Needs `admin`, and
/// the new key cannot exceed the creator's role or scope.
pub async fn create(
    shared: &Shared,
    who: &Principal,
    name: &str,
    role: Role,
    namespaces: Option<Vec<String>>,
) -> Result<CreatedKey> {
    if name.len() > MAX_KEY_NAME_LEN || name.contains('\0') {
        return Err(ServiceError::InvalidRequest(format!(
            "a key name is at most {MAX_KEY_NAME_LEN} bytes, without NUL"
        )));
    }
    if let Some(list) = &namespaces {
        if list.is_empty() || list.len() > MAX_KEY_NAMESPACES {
            return Err(ServiceError::InvalidRequest(format!(
                "a key names 1 to {MAX_KEY_NAMESPACES} namespaces (or every namespace: \"*\"), not {}",
                list.len()
            )));
        }
        for n in list {
            name_arg("namespace", n)?;
        }
    }
    let namespaces = namespaces.map(|mut l| {
        l.sort();
        l.dedup();
        l
    });
    if !who.may_grant(role, namespaces.as_deref()) {
        return Err(ServiceError::Forbidden(format!(
            "{} (role {}{}) cannot create a {role} key over {}",
            who.actor,
            who.role,
            scope_text(who.namespaces.as_deref()),
            scope_text(namespaces.as_deref()).trim_start_matches(" in ")
        )));
    }
    let token = new_token();
    let hash = token_hash(&token);
    let mut tx = shared.db.begin().await?;
    let key = store::insert(
        &mut *tx,
        &NewKey {
            id: Uuid::now_v7(),
            name,
            token_hash: &hash,
            role: role.as_str(),
            namespaces: namespaces.as_deref(),
            created_by: &who.actor,
        },
    )
    .await?;
    audit::record(
        &mut tx,
        who,
        "key.create",
        single(namespaces.as_deref()),
        None,
        json!({ "key_id": key.id, "name": name, "role": role, "namespaces": namespaces }),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(key_id = %key.id, role = %role, by = %who.actor, "API key created");
    Ok(CreatedKey { key, token })
}

/// The keys an admin may see: every key for a global admin; for a namespace-scoped admin, the
/// keys whose namespaces all lie in its scope.
pub async fn list(shared: &Shared, who: &Principal, revoked: bool) -> Result<Vec<KeyRow>> {
    if !who.has_role(Role::Admin) {
        return Err(forbidden(who, Role::Admin, "list keys"));
    }
    let all = store::list(&shared.db, revoked, MAX_KEYS_LISTED).await?;
    Ok(all
        .into_iter()
        .filter(|k| who.may_grant(Role::Read, k.namespaces.as_deref()))
        .collect())
}

/// Revokes a key: it is refused from then on, on every replica.
pub async fn revoke(shared: &Shared, who: &Principal, id: Uuid) -> Result<KeyRow> {
    let not_found = || ServiceError::InvalidRequest(format!("no live key with id {id}"));
    let key = store::get(&shared.db, id).await?.ok_or_else(not_found)?;
    let role = Role::parse(&key.role).unwrap_or(Role::Admin);
    if !who.may_grant(role, key.namespaces.as_deref()) {
        return Err(ServiceError::Forbidden(format!(
            "{} cannot revoke key {id}: it is outside its role or namespaces",
            who.actor
        )));
    }
    let mut tx = shared.db.begin().await?;
    let revoked = store::revoke(&mut *tx, id, &who.actor)
        .await?
        .ok_or_else(not_found)?;
    audit::record(
        &mut tx,
        who,
        "key.revoke",
        single(revoked.namespaces.as_deref()),
        None,
        json!({ "key_id": id, "name": revoked.name }),
    )
    .await?;
    tx.commit().await?;
    tracing::info!(key_id = %id, by = %who.actor, "API key revoked");
    Ok(revoked)
}

fn single(namespaces: Option<&[String]>) -> Option<&str> {
    match namespaces {
        Some([one]) => Some(one.as_str()),
        _ => None,
    }
}

fn scope_text(namespaces: Option<&[String]>) -> String {
    match namespaces {
        None => " in every namespace".into(),
        Some(l) => format!(" in {}", l.join(", ")),
    }
}

/// The 403 for `who` lacking `role` to `what`.
pub fn forbidden(who: &Principal, role: Role, what: &str) -> ServiceError {
    ServiceError::Forbidden(format!(
        "{} has role {}{}; to {what} it needs role {role}",
        who.actor,
        who.role,
        scope_text(who.namespaces.as_deref())
    ))
}

/// Refuses unless `who` has `role` in `namespace`, with a message saying what is missing.
pub fn require(who: &Principal, role: Role, namespace: &str, what: &str) -> Result<()> {
    if who.allows(role, namespace) {
        return Ok(());
    }
    if !who.sees(namespace) {
        return Err(ServiceError::Forbidden(format!(
            "{} may act only{}; to {what} it needs namespace {namespace}",
            who.actor,
            scope_text(who.namespaces.as_deref())
        )));
    }
    Err(forbidden(who, role, what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_hash_to_32_bytes() {
        let a = new_token();
        let b = new_token();
        assert!(a.starts_with(TOKEN_PREFIX));
        assert_eq!(a.len(), TOKEN_PREFIX.len() + 64);
        assert_ne!(a, b);
        assert_eq!(token_hash(&a).len(), 32);
        assert_eq!(token_hash(&a), token_hash(&a));
        assert_ne!(token_hash(&a), token_hash(&b));
    }

    #[test]
    fn require_explains_role_and_scope() {
        let p = Principal {
            key_id: None,
            actor: "key:1".into(),
            role: Role::Submit,
            namespaces: Some(vec!["shop".into()]),
        };
        assert!(require(&p, Role::Submit, "shop", "submit").is_ok());
        let e = require(&p, Role::Operate, "shop", "cancel a task").unwrap_err();
        assert!(e.to_string().contains("needs role operate"), "{e}");
        let e = require(&p, Role::Read, "billing", "read a task").unwrap_err();
        assert!(e.to_string().contains("needs namespace billing"), "{e}");
    }
}
