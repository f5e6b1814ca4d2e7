//! Who may do what: API keys' roles and namespaces, decided here and nowhere else.
//!
//! A key has a [`Role`] and a namespace scope. Roles are ordered, each including the ones
//! before it: `read` (see tasks, templates, workers, the audit), `submit` (submit tasks),
//! `operate` (cancel, retry, signals, console actions, dead letters), `admin` (templates, keys,
//! purge, namespace settings). A scope is a list of namespaces or every namespace (`*`).
//!
//! Pure: the edges turn a token into a [`Principal`] (through `service::keys`) and ask it
//! [`Principal::allows`] before calling a service.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What a key may do, weakest first; each role includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// See tasks, templates, workers and the audit log.
    Read,
    /// Also submit tasks.
    Submit,
    /// Also cancel and retry tasks, send signals, act from the console, replay dead letters.
    Operate,
    /// Also register templates, manage keys, purge tasks, set namespace retention.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Read, Role::Submit, Role::Operate, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Submit => "submit",
            Role::Operate => "operate",
            Role::Admin => "admin",
        }
    }

    /// Parses `read`, `submit`, `operate` or `admin`.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The scope word for "every namespace", in storage, the API and the CLI.
pub const EVERY_NAMESPACE: &str = "*";

/// Whoever made a request: the key (or the bootstrap key, or nobody when authentication is off),
/// its role and the namespaces it may act in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// The stored key's id; `None` for a bootstrap key from the environment or no key at all.
    pub key_id: Option<Uuid>,
    /// How the audit log names who acted: `key:<first 8 of the key id> (<name>)`, `bootstrap`,
    /// or `anonymous` (authentication off).
    pub actor: String,
    pub role: Role,
    /// The namespaces this key may act in; `None` = every namespace.
    pub namespaces: Option<Vec<String>>,
}

impl Principal {
    /// Authentication is off (no keys configured): everything is allowed, as before keys existed.
    pub fn anonymous() -> Self {
        Self {
            key_id: None,
            actor: "anonymous".into(),
            role: Role::Admin,
            namespaces: None,
        }
    }

    /// A bootstrap admin key from the environment (`TASKER_API_KEYS`).
    pub fn bootstrap() -> Self {
        Self {
            key_id: None,
            actor: "bootstrap".into(),
            role: Role::Admin,
            namespaces: None,
        }
    }

    /// The orchestrator acting on its own behalf (`actor` says how: `templates_dir` for the
    /// templates registered at start, `amqp` for task requests over AMQP, whose namespace the
    /// broker's permissions guard).
    pub fn system(actor: &str) -> Self {
        Self {
            key_id: None,
            actor: actor.into(),
            role: Role::Admin,
            namespaces: None,
        }
    }

    /// Whether this principal may do what needs `role` in `namespace`.
    pub fn allows(&self, role: Role, namespace: &str) -> bool {
        self.role >= role && self.sees(namespace)
    }

    /// Whether `namespace` is in scope (what `read` needs, apart from the role).
    pub fn sees(&self, namespace: &str) -> bool {
        match &self.namespaces {
            None => true,
            Some(list) => list.iter().any(|n| n == namespace),
        }
    }

    /// Whether the scope is every namespace.
    pub fn is_global(&self) -> bool {
        self.namespaces.is_none()
    }

    /// Whether `role` is held somewhere (in at least one namespace); for routes not about one
    /// namespace (listing, the key routes).
    pub fn has_role(&self, role: Role) -> bool {
        self.role >= role
    }

    /// Whether this principal may create a key with `role` over `namespaces` (`None` = every
    /// namespace): an admin can hand out at most its own role, within its own scope.
    pub fn may_grant(&self, role: Role, namespaces: Option<&[String]>) -> bool {
        if self.role < Role::Admin || role > self.role {
            return false;
        }
        match (namespaces, &self.namespaces) {
            (_, None) => true,
            (None, Some(_)) => false,
            (Some(wanted), Some(mine)) => wanted.iter().all(|n| mine.contains(n)),
        }
    }

    /// The namespaces to restrict a listing to: `None` = no restriction.
    pub fn scope(&self) -> Option<&[String]> {
        self.namespaces.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(role: Role, namespaces: Option<&[&str]>) -> Principal {
        Principal {
            key_id: Some(Uuid::nil()),
            actor: "key:test".into(),
            role,
            namespaces: namespaces.map(|n| n.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn roles_include_the_weaker_ones() {
        let p = key(Role::Operate, None);
        assert!(p.allows(Role::Read, "a"));
        assert!(p.allows(Role::Submit, "a"));
        assert!(p.allows(Role::Operate, "a"));
        assert!(!p.allows(Role::Admin, "a"));
        let r = key(Role::Read, None);
        assert!(r.allows(Role::Read, "x"));
        assert!(!r.allows(Role::Submit, "x"));
    }

    #[test]
    fn scope_limits_every_role() {
        let p = key(Role::Admin, Some(&["shop"]));
        assert!(p.allows(Role::Admin, "shop"));
        assert!(!p.allows(Role::Read, "billing"));
        assert!(p.sees("shop") && !p.sees("billing"));
        assert!(!p.is_global());
        assert_eq!(p.scope(), Some(&["shop".to_string()][..]));
    }

    #[test]
    fn anonymous_and_bootstrap_may_do_everything() {
        for p in [Principal::anonymous(), Principal::bootstrap()] {
            for r in Role::ALL {
                assert!(p.allows(r, "any"));
            }
            assert!(p.is_global());
        }
    }

    #[test]
    fn granting_stays_within_role_and_scope() {
        let global = key(Role::Admin, None);
        assert!(global.may_grant(Role::Admin, None));
        assert!(global.may_grant(Role::Read, Some(&["a".into()])));
        let shop = key(Role::Admin, Some(&["shop"]));
        assert!(shop.may_grant(Role::Submit, Some(&["shop".into()])));
        assert!(!shop.may_grant(Role::Submit, None));
        assert!(!shop.may_grant(Role::Submit, Some(&["shop".into(), "billing".into()])));
        let op = key(Role::Operate, None);
        assert!(!op.may_grant(Role::Read, None));
    }

    #[test]
    fn role_names_round_trip() {
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
            assert_eq!(
                serde_json::to_string(&r).unwrap(),
                format!("\"{}\"", r.as_str())
            );
        }
        assert_eq!(Role::parse("root"), None);
    }
}
