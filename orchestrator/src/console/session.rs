//! Who is looking: sign-in with an API key, the session cookie, and CSRF tokens.
//!
//! A browser cannot send a bearer token on a page load, so `/ui/login` takes an API key once,
//! checks it ([`crate::service::keys::authenticate`]) and stores a session in PostgreSQL: the
//! SHA-256 of a random session id (the cookie `tasker_session`, HttpOnly, SameSite=Strict,
//! path `/ui`, Secure over HTTPS), the key's hash (never the key), a random CSRF token and an
//! expiry. Every request re-checks the key by its hash
//! ([`crate::service::keys::authenticate_hash`]), so a revoked key ends its sessions at once.
//!
//! Every form that POSTs carries the CSRF token and is refused without it. Signed in, the token
//! is the session's; otherwise (the sign-in form; every form when authentication is off) it is
//! a random `tasker_csrf` cookie the form repeats (double submit): a page of another site can
//! neither read the cookie nor, with SameSite=Strict, send it.
//!
//! With authentication off (no keys configured) the console is open, as admin, like the API.

use super::{PageError, layout};
use crate::auth::Principal;
use crate::service::{self, ServiceError, Shared};
use axum::Form;
use axum::extract::{FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use rand::RngCore;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The session cookie.
pub const SESSION_COOKIE: &str = "tasker_session";
/// The double-submit CSRF cookie (sign-in form; every form when authentication is off).
pub const CSRF_COOKIE: &str = "tasker_csrf";
/// How long a session lasts.
pub const SESSION_TTL_MS: i64 = 12 * 3600 * 1000;
/// Longest API key accepted by the sign-in form.
const MAX_KEY_LEN: usize = 512;

/// Who is looking, and the CSRF token their forms carry.
#[derive(Clone, Debug)]
pub struct Viewer {
    pub who: Principal,
    pub csrf: String,
    /// Signed in with a session (authentication on): a sign-out button is shown.
    pub signed_in: bool,
    /// A `Set-Cookie` the answer must carry (a new double-submit token).
    set_cookie: Option<String>,
}

impl Viewer {
    /// An HTML answer, with the cookie to set if any.
    pub fn respond(&self, status: StatusCode, markup: Markup) -> Response {
        let mut r = (status, markup).into_response();
        if let Some(c) = &self.set_cookie
            && let Ok(v) = HeaderValue::from_str(c)
        {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
        r
    }

    /// Refuses a form whose CSRF token is not this viewer's.
    pub fn check_csrf(&self, token: &str) -> Result<(), PageError> {
        if !self.csrf.is_empty() && constant_time_eq(self.csrf.as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            Err(PageError::forbidden(
                "this form's CSRF token is missing or stale (or the form came from another site); reload the page and try again",
            ))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 32 random bytes in hex.
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn id_hash(id: &str) -> Vec<u8> {
    Sha256::digest(id.as_bytes()).to_vec()
}

/// A cookie's value from the request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .filter(|v| !v.is_empty() && v.len() <= 128)
}

fn secure(shared: &Shared) -> &'static str {
    if shared.config.http_tls_cert.is_some() {
        "; Secure"
    } else {
        ""
    }
}

fn set_cookie(shared: &Shared, name: &str, value: &str, max_age_s: i64) -> String {
    format!(
        "{name}={value}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={max_age_s}{}",
        secure(shared)
    )
}

/// The double-submit token of this browser (a new one, to be set, when it has none).
fn csrf_cookie(shared: &Shared, headers: &HeaderMap) -> (String, Option<String>) {
    match cookie(headers, CSRF_COOKIE) {
        Some(t) => (t.to_owned(), None),
        None => {
            let t = random_token();
            let set = set_cookie(shared, CSRF_COOKIE, &t, SESSION_TTL_MS / 1000);
            (t, Some(set))
        }
    }
}

/// Where a signed-out reader is sent: the sign-in page, back to `path` after.
fn to_login(parts: &Parts) -> Response {
    // Inside the console's router the path has lost its `/ui` prefix (it is nested there).
    let next = match parts.uri.path_and_query().map(|p| p.as_str()) {
        Some(p) if p.starts_with("/ui/") => p.to_owned(),
        Some(p) => format!("/ui{p}"),
        None => "/ui/tasks".to_owned(),
    };
    let mut url = String::from("/ui/login?next=");
    for b in next.bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            url.push(b as char);
        } else {
            url.push_str(&format!("%{b:02X}"));
        }
    }
    Redirect::to(&url).into_response()
}

/// The principal of a session cookie: `Ok(None)` when there is no such (unexpired) session
/// or its key no longer authenticates (revoked).
async fn session_principal(
    shared: &Shared,
    session_id: &str,
) -> Result<Option<(Principal, String)>, ServiceError> {
    let hash = id_hash(session_id);
    let Some(s) = crate::store::console::session(&shared.db, &hash).await? else {
        return Ok(None);
    };
    match service::keys::authenticate_hash(shared, &s.key_hash).await {
        Ok(p) => Ok(Some((p, s.csrf))),
        Err(ServiceError::Unauthorized(_)) => {
            crate::store::console::delete_session(&shared.db, &hash).await?;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

impl FromRequestParts<Shared> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, shared: &Shared) -> Result<Self, Response> {
        if !shared.config.auth_enabled() {
            let (csrf, set_cookie) = csrf_cookie(shared, &parts.headers);
            return Ok(Viewer {
                who: Principal::anonymous(),
                csrf,
                signed_in: false,
                set_cookie,
            });
        }
        let Some(id) = cookie(&parts.headers, SESSION_COOKIE) else {
            return Err(to_login(parts));
        };
        match session_principal(shared, id).await {
            Ok(Some((who, csrf))) => Ok(Viewer {
                who,
                csrf,
                signed_in: true,
                set_cookie: None,
            }),
            Ok(None) => Err(to_login(parts)),
            Err(e) => Err(PageError::from(e).page(None)),
        }
    }
}

#[derive(Deserialize)]
pub struct LoginQuery {
    next: Option<String>,
    error: Option<String>,
}

/// Only a console path may be a sign-in's destination (no open redirect).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with("/ui/") && !n.starts_with("/ui//") && !n.contains('\\') => {
            n.to_owned()
        }
        _ => "/ui/tasks".to_owned(),
    }
}

fn login_form(csrf: &str, next: &str, error: Option<&str>) -> Markup {
    html! {
        section.login {
            h1 { "Sign in" }
            p { "Sign in with an API key (" code { "tasker keys create" } "). Its role and namespaces decide what you see and may do." }
            @if let Some(e) = error { p #login-error .error role="alert" { (e) } }
            form #login-form method="post" action="/ui/login" {
                input type="hidden" name="csrf" value=(csrf);
                input type="hidden" name="next" value=(next);
                label for="key" { "API key" }
                input #key type="password" name="key" autocomplete="off" required autofocus;
                button type="submit" { "Sign in" }
            }
        }
    }
}

/// `GET /ui/login`: the sign-in form (to the tasks when authentication is off).
pub async fn login_page(
    State(shared): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<LoginQuery>,
) -> Response {
    let next = safe_next(q.next.as_deref());
    if !shared.config.auth_enabled() {
        return Redirect::to(&next).into_response();
    }
    let (csrf, set) = csrf_cookie(&shared, &headers);
    let viewer = Viewer {
        who: Principal {
            key_id: None,
            actor: "not signed in".into(),
            role: crate::auth::Role::Read,
            namespaces: Some(Vec::new()),
        },
        csrf: csrf.clone(),
        signed_in: false,
        set_cookie: set,
    };
    let error = q.error.as_deref().map(|e| match e {
        "csrf" => "The form expired; try again.",
        _ => "That API key is unknown or revoked.",
    });
    layout(&viewer, "Sign in", "", login_form(&csrf, &next, error))
}

#[derive(Deserialize)]
pub struct LoginForm {
    key: String,
    csrf: String,
    next: Option<String>,
}

/// `POST /ui/login`: checks the key, starts a session, goes to `next`.
pub async fn login(
    State(shared): State<Shared>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    let next = safe_next(f.next.as_deref());
    if !shared.config.auth_enabled() {
        return Redirect::to(&next).into_response();
    }
    let retry = |error: &str| {
        Redirect::to(&format!(
            "/ui/login?error={error}&next={}",
            next.replace('%', "%25")
                .replace('&', "%26")
                .replace('#', "%23")
        ))
        .into_response()
    };
    let csrf_ok = cookie(&headers, CSRF_COOKIE)
        .is_some_and(|c| constant_time_eq(c.as_bytes(), f.csrf.as_bytes()));
    if !csrf_ok {
        return retry("csrf");
    }
    let key = f.key.trim();
    if key.is_empty() || key.len() > MAX_KEY_LEN || key.contains('\0') {
        return retry("key");
    }
    match service::keys::authenticate(&shared, key).await {
        Ok(who) => {
            let id = random_token();
            let csrf = random_token();
            if let Err(e) = crate::store::console::create_session(
                &shared.db,
                &id_hash(&id),
                &service::keys::token_hash(key),
                &csrf,
                SESSION_TTL_MS,
            )
            .await
            {
                return PageError::from(e).page(None);
            }
            tracing::info!(actor = %who.actor, "console sign-in");
            let mut r = Redirect::to(&next).into_response();
            if let Ok(v) = HeaderValue::from_str(&set_cookie(
                &shared,
                SESSION_COOKIE,
                &id,
                SESSION_TTL_MS / 1000,
            )) {
                r.headers_mut().append(header::SET_COOKIE, v);
            }
            r
        }
        Err(ServiceError::Unauthorized(_)) => retry("key"),
        Err(e) => PageError::from(e).page(None),
    }
}

#[derive(Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /ui/logout`: ends the session.
pub async fn logout(
    State(shared): State<Shared>,
    viewer: Viewer,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Err(e) = viewer.check_csrf(&f.csrf) {
        return e.page(Some(&viewer));
    }
    if let Some(id) = cookie(&headers, SESSION_COOKIE)
        && let Err(e) = crate::store::console::delete_session(&shared.db, &id_hash(id)).await
    {
        return PageError::from(e).page(Some(&viewer));
    }
    let mut r = Redirect::to("/ui/login").into_response();
    if let Ok(v) = HeaderValue::from_str(&set_cookie(&shared, SESSION_COOKIE, "", 0)) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_console_paths_are_destinations() {
        assert_eq!(
            safe_next(Some("/ui/tasks?state=failed")),
            "/ui/tasks?state=failed"
        );
        assert_eq!(safe_next(Some("https://evil.example/")), "/ui/tasks");
        assert_eq!(safe_next(Some("//evil.example/ui/")), "/ui/tasks");
        assert_eq!(safe_next(Some("/ui//evil.example")), "/ui/tasks");
        assert_eq!(safe_next(None), "/ui/tasks");
    }

    #[test]
    fn cookies_are_read_by_name() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; tasker_session=abc; b=2"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&h, CSRF_COOKIE), None);
    }
}
