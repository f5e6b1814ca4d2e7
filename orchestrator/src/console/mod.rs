//! The console: server-rendered HTML pages under `/ui` (docs/console.md). Like the other
//! edges, pages decode a request, call services ([`crate::service`]) and the console's reads
//! ([`crate::store::console`], [`crate::store::views`]), and render; no page holds SQL.
//!
//! | module | what |
//! |---|---|
//! | [`session`] | sign-in with an API key, the session cookie, CSRF tokens, who is looking |
//! | [`pages`] | tasks, task, queues, workers, templates |
//! | [`actions`] | confirmation pages and the POSTs that act (cancel, retry, …) |
//! | [`live`] | the task page's server-sent events |
//! | [`dag`] | the DAG's layout and SVG (pure) |
//! | [`dead_letters`] | the dead letters: browse, show, replay, discard |
//!
//! HTML comes from `maud` (compile-time templates, escaped by default); the CSS and the small
//! script are embedded in the binary. No CDN, no Node.

pub mod actions;
pub mod dag;
pub mod dead_letters;
pub mod live;
pub mod pages;
pub mod session;

use crate::service::{ServiceError, Shared};
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{DOCTYPE, Markup, PreEscaped, html};
pub use session::Viewer;

const CSS: &str = include_str!("../../static/console.css");
const JS: &str = include_str!("../../static/console.js");

/// The console's routes, nested at `/ui` by [`crate::edge::http::router`].
pub fn router() -> Router<Shared> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/ui/tasks") }))
        .route("/static/console.css", get(css))
        .route("/static/console.js", get(js))
        .route("/login", get(session::login_page).post(session::login))
        .route("/logout", post(session::logout))
        .route("/tasks", get(pages::tasks))
        .route("/tasks/bulk", post(actions::bulk))
        .route("/tasks/{id}", get(pages::task))
        .route("/tasks/{id}/events", get(live::events))
        .route("/tasks/{id}/values/{which}", get(pages::task_value))
        .route("/tasks/{id}/steps/{step}/output", get(pages::step_output))
        .route(
            "/tasks/{id}/actions/{action}",
            get(actions::confirm).post(actions::act),
        )
        .route("/queues", get(pages::queues))
        .route("/workers", get(pages::workers))
        .route("/templates", get(pages::templates))
        .route("/templates/{namespace}/{name}", get(pages::template))
        .route("/dead-letters", get(dead_letters::list))
        .route("/dead-letters/act", post(dead_letters::act))
        .route("/dead-letters/{id}", get(dead_letters::show))
        .layer(axum::Extension(live::Streams::new(live::MAX_STREAMS)))
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        CSS,
    )
        .into_response()
}

async fn js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        JS,
    )
        .into_response()
}

/// The menu: (path, label).
const MENU: [(&str, &str); 5] = [
    ("/ui/tasks", "Tasks"),
    ("/ui/queues", "Queues"),
    ("/ui/workers", "Workers"),
    ("/ui/templates", "Templates"),
    ("/ui/dead-letters", "Dead letters"),
];

/// A whole page: header with the menu and who is signed in, then `body`.
pub fn layout(viewer: &Viewer, title: &str, current: &str, body: Markup) -> Response {
    let markup = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Tasker" }
                link rel="stylesheet" href="/ui/static/console.css";
                script src="/ui/static/console.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/ui/tasks" { "Tasker" }
                    nav aria-label="console" {
                        @for (path, label) in MENU {
                            @if path == current {
                                a href=(path) aria-current="page" { (label) }
                            } @else {
                                a href=(path) { (label) }
                            }
                        }
                    }
                    span #who .who {
                        (viewer.who.actor) " · " span #role { (viewer.who.role.as_str()) }
                        @if let Some(ns) = viewer.who.scope() { " · " (ns.join(", ")) }
                    }
                    @if viewer.signed_in {
                        form #logout method="post" action="/ui/logout" {
                            input type="hidden" name="csrf" value=(viewer.csrf);
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main #main { (body) }
            }
        }
    };
    viewer.respond(StatusCode::OK, markup)
}

/// An error page: the status and what went wrong, in words.
pub fn error_page(viewer: Option<&Viewer>, status: StatusCode, message: &str) -> Response {
    let body = html! {
        h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
        p #error .error { (message) }
        p { a href="/ui/tasks" { "Back to the tasks" } }
    };
    match viewer {
        Some(v) => {
            let mut r = layout(v, "Error", "", body);
            *r.status_mut() = status;
            r
        }
        None => (
            status,
            html! { (DOCTYPE) html lang="en" { head { meta charset="utf-8"; title { "Error" } link rel="stylesheet" href="/ui/static/console.css"; } body { main #main { (body) } } } },
        )
            .into_response(),
    }
}

/// What a page fails with: a status and a message for the reader.
pub struct PageError {
    pub status: StatusCode,
    pub message: String,
}

impl PageError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }

    /// The page for it, inside the layout when someone is signed in.
    pub fn page(self, viewer: Option<&Viewer>) -> Response {
        error_page(viewer, self.status, &self.message)
    }
}

impl From<ServiceError> for PageError {
    fn from(e: ServiceError) -> Self {
        let status = match &e {
            ServiceError::TaskNotFound(_)
            | ServiceError::StepNotFound { .. }
            | ServiceError::TemplateNotFound { .. }
            | ServiceError::DeadLetterNotFound(_) => StatusCode::NOT_FOUND,
            ServiceError::InvalidState { .. }
            | ServiceError::TemplateConflict { .. }
            | ServiceError::IdempotencyConflict { .. }
            | ServiceError::TaskIdConflict(_)
            | ServiceError::ActionRefused { .. }
            | ServiceError::BulkRefused { .. } => StatusCode::CONFLICT,
            ServiceError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ServiceError::Forbidden(_) => StatusCode::FORBIDDEN,
            e if e.is_retryable() => StatusCode::SERVICE_UNAVAILABLE,
            e if e.is_internal() => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        };
        // Internal faults are logged, never shown (they may name tables, hosts or queries).
        let message = if e.is_internal() {
            tracing::warn!(error = %e, "console request failed");
            if status == StatusCode::SERVICE_UNAVAILABLE {
                "the database or the broker is unavailable; retry later".to_owned()
            } else {
                "internal error; see the orchestrator's log".to_owned()
            }
        } else {
            e.to_string()
        };
        Self { status, message }
    }
}

impl From<crate::store::StoreError> for PageError {
    fn from(e: crate::store::StoreError) -> Self {
        ServiceError::from(e).into()
    }
}

pub type PageResult<T = Response> = Result<T, PageError>;

/// A JSON value pretty-printed, cut at `max` bytes (on a character boundary); whether it was
/// cut.
pub fn pretty(value: &serde_json::Value, max: usize) -> (String, bool) {
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    if text.len() <= max {
        return (text, false);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (text[..end].to_owned(), true)
}

/// Largest JSON shown inline; more is cut, with a link to the whole value.
pub const INLINE_JSON_BYTES: usize = 4_096;

/// A `<pre>` with a JSON value, cut with a link to `full` when large.
pub fn json_block(value: &serde_json::Value, full: &str) -> Markup {
    let (text, cut) = pretty(value, INLINE_JSON_BYTES);
    html! {
        pre.json { (text) @if cut { "\n…" } }
        @if cut { p.cut { "Truncated at " (INLINE_JSON_BYTES) " bytes: " a.full href=(full) { "the whole value" } } }
    }
}

/// A time as `YYYY-MM-DD HH:MM:SS.mmm` (UTC).
pub fn time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.3f").to_string()
}

/// An RFC 3339 time as [`time`] shows it (unchanged when it cannot be read).
pub fn time_text(s: &str) -> String {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| time(t.with_timezone(&chrono::Utc)))
        .unwrap_or_else(|_| s.to_owned())
}

/// A duration in words: `850 ms`, `12.3 s`, `4 min 5 s`, `2 h 3 min`.
pub fn duration(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1_000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1000)
    } else {
        format!("{} h {} min", ms / 3_600_000, (ms % 3_600_000) / 60_000)
    }
}

/// A state badge: `<span class="state st-{state}">`.
pub fn badge(state: &str) -> Markup {
    html! { span class={"state st-" (state)} { (state) } }
}

/// Raw HTML (only for constant, trusted strings).
pub fn raw(s: &'static str) -> PreEscaped<&'static str> {
    PreEscaped(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_json_is_cut_on_a_character_boundary() {
        let v = serde_json::json!({ "s": "é".repeat(5000) });
        let (text, cut) = pretty(&v, 101);
        assert!(cut);
        assert!(text.len() <= 101);
        let (small, cut) = pretty(&serde_json::json!({"a": 1}), 100);
        assert!(!cut);
        assert_eq!(small, "{\n  \"a\": 1\n}");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(duration(850), "850 ms");
        assert_eq!(duration(12_345), "12.3 s");
        assert_eq!(duration(245_000), "4 min 5 s");
        assert_eq!(duration(7_380_000), "2 h 3 min");
        assert_eq!(duration(-5), "0 ms");
    }
}
