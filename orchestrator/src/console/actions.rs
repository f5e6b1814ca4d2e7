//! Acting from the console. Every action is two steps: a `GET` confirmation page that says
//! what will happen, whose form `POST`s the action with the CSRF token. Buttons are shown only
//! to a key with role `operate` in the task's namespace, and the services check it again
//! (and record who acted in the audit log).
//!
//! | action | service |
//! |---|---|
//! | `cancel` | [`crate::service::tasks::cancel`] |
//! | `retry` | [`crate::service::tasks::retry`] |
//! | `retry-step` | [`crate::service::operate::retry_step`] |
//! | `rerun-from` | [`crate::service::operate::rerun_from`] |
//! | `mark-succeeded` | [`crate::service::operate::mark_succeeded`] |
//! | bulk `cancel` / `retry` | [`crate::service::operate::bulk_count`], `bulk_cancel`, `bulk_retry` |

use super::pages::{TasksQuery, parse_time};
use super::{PageError, PageResult, Viewer, layout};
use crate::auth::Role;
use crate::service::operate::{self, BulkFilter};
use crate::service::{self, Shared};
use axum::Form;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Redirect, Response};
use maud::html;
use serde::Deserialize;
use tasker_schemas::{TaskId, TaskState};

/// What each action does, in words, for the confirmation page.
fn describe(action: &str, step: Option<&str>) -> Option<String> {
    let step = step.unwrap_or("?");
    Some(match action {
        "cancel" => "Cancel this task: nothing new starts, steps not started are cancelled, workers are told to stop its running handlers.".into(),
        "retry" => "Retry this task: its failed, skipped and cancelled steps run again; succeeded steps keep their outputs.".into(),
        "retry-step" => format!("Retry the failed step {step:?}: it runs again with its failures reset, and the task runs again."),
        "rerun-from" => format!("Rerun from step {step:?}: it and every step that depends on it run again from scratch (their outputs are dropped)."),
        "mark-succeeded" => format!("Mark the failed step {step:?} succeeded with the output below: the steps after it proceed."),
        _ => return None,
    })
}

fn needs_step(action: &str) -> bool {
    matches!(action, "retry-step" | "rerun-from" | "mark-succeeded")
}

#[derive(Deserialize)]
pub struct StepQuery {
    step: Option<String>,
}

async fn operable(shared: &Shared, viewer: &Viewer, id: TaskId) -> PageResult<(String, TaskState)> {
    let t = super::pages::visible_task(shared, viewer, id).await?;
    if !viewer.who.allows(Role::Operate, &t.namespace) {
        return Err(PageError::forbidden(format!(
            "{} may not act in namespace {:?}: the operate role is needed",
            viewer.who.actor, t.namespace
        )));
    }
    Ok((t.namespace, t.state))
}

fn parse_id(id: &str) -> PageResult<TaskId> {
    id.parse()
        .map_err(|_| PageError::bad_request(format!("{id:?} is not a task id")))
}

/// `GET /ui/tasks/{id}/actions/{action}?step=`: the confirmation page.
pub async fn confirm(
    State(shared): State<Shared>,
    viewer: Viewer,
    Path((id, action)): Path<(String, String)>,
    Query(q): Query<StepQuery>,
) -> Response {
    let run = async {
        let id = parse_id(&id)?;
        let step = q.step.as_deref().filter(|s| !s.is_empty());
        let what = describe(&action, step)
            .ok_or_else(|| PageError::not_found(format!("no action {action:?}")))?;
        if needs_step(&action) && step.is_none() {
            return Err(PageError::bad_request("which step? (?step=name)"));
        }
        operable(&shared, &viewer, id).await?;
        let body = html! {
            h1 { "Confirm" }
            p #confirm-what { (what) }
            p { "Task " a href={"/ui/tasks/" (id)} { (id) } }
            form #confirm-form method="post" action={"/ui/tasks/" (id) "/actions/" (action)} {
                input type="hidden" name="csrf" value=(viewer.csrf);
                @if let Some(s) = step { input type="hidden" name="step" value=(s); }
                @if action == "cancel" {
                    label for="reason" { "Reason (optional)" }
                    input #reason name="reason" maxlength="1024" size="60";
                }
                @if action == "mark-succeeded" {
                    label for="output" { "Output (JSON)" }
                    textarea #output name="output" rows="8" cols="60" required { "{}" }
                }
                p {
                    button #confirm type="submit" autofocus { "Yes, " (action.replace('-', " ")) }
                    " "
                    a href={"/ui/tasks/" (id)} { "No, go back" }
                }
            }
        };
        Ok(layout(&viewer, "Confirm", "/ui/tasks", body))
    };
    match run.await {
        Ok(r) => r,
        Err(e) => e.page(Some(&viewer)),
    }
}

#[derive(Deserialize)]
pub struct ActForm {
    #[serde(default)]
    csrf: String,
    step: Option<String>,
    reason: Option<String>,
    output: Option<String>,
}

/// `POST /ui/tasks/{id}/actions/{action}`: does it, then back to the task.
pub async fn act(
    State(shared): State<Shared>,
    viewer: Viewer,
    Path((id, action)): Path<(String, String)>,
    Form(f): Form<ActForm>,
) -> Response {
    let run = async {
        viewer.check_csrf(&f.csrf)?;
        let id = parse_id(&id)?;
        describe(&action, None)
            .ok_or_else(|| PageError::not_found(format!("no action {action:?}")))?;
        let step = f.step.as_deref().filter(|s| !s.is_empty());
        if needs_step(&action) && step.is_none() {
            return Err(PageError::bad_request("which step? (the form lacks it)"));
        }
        operable(&shared, &viewer, id).await?;
        let who = &viewer.who;
        match (action.as_str(), step) {
            ("cancel", _) => {
                // Who cancelled is in the audit log and the task's history.
                let reason = f.reason.filter(|r| !r.trim().is_empty());
                service::tasks::cancel(&shared, who, id, reason).await?
            }
            ("retry", _) => service::tasks::retry(&shared, who, id).await?,
            ("retry-step", Some(s)) => operate::retry_step(&shared, who, id, s).await?,
            ("rerun-from", Some(s)) => operate::rerun_from(&shared, who, id, s).await?,
            ("mark-succeeded", Some(s)) => {
                let text = f.output.unwrap_or_default();
                let output: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| PageError::bad_request(format!("the output is not JSON: {e}")))?;
                operate::mark_succeeded(&shared, who, id, s, output).await?
            }
            _ => return Err(PageError::not_found(format!("no action {action:?}"))),
        }
        Ok(Redirect::to(&format!("/ui/tasks/{id}")).into_response())
    };
    match run.await {
        Ok(r) => r,
        Err(e) => e.page(Some(&viewer)),
    }
}

#[derive(Deserialize)]
pub struct BulkForm {
    #[serde(default)]
    csrf: String,
    action: String,
    /// The count the operator confirmed; absent on the first step (text: a flattened form
    /// reads every value as text).
    expected: Option<String>,
    #[serde(flatten)]
    filter: TasksQuery,
}

fn bulk_filter(q: &TasksQuery) -> PageResult<BulkFilter> {
    let given = |s: &Option<String>| {
        s.as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    if given(&q.key).is_some()
        || given(&q.task).is_some()
        || given(&q.field).is_some()
        || given(&q.value).is_some()
    {
        return Err(PageError::bad_request(
            "bulk actions filter by state, namespace, template and time range only: clear the other filters",
        ));
    }
    let time = |s: &Option<String>, what: &str| -> PageResult<_> {
        match given(s) {
            Some(t) => parse_time(&t)
                .map(Some)
                .ok_or_else(|| PageError::bad_request(format!("{what}: {t:?} is not a time"))),
            None => Ok(None),
        }
    };
    Ok(BulkFilter {
        state: match given(&q.state) {
            Some(s) => Some(
                s.parse::<TaskState>()
                    .map_err(|e| PageError::bad_request(e.to_string()))?,
            ),
            None => None,
        },
        namespace: given(&q.namespace),
        template: given(&q.template),
        created_after: time(&q.from, "from")?,
        // The page's "to" is inclusive to the minute.
        created_before: time(&q.to, "to")?.map(|t| t + chrono::Duration::milliseconds(1)),
    })
}

/// `POST /ui/tasks/bulk`: first the count (a confirmation form carrying it), then the action.
pub async fn bulk(
    State(shared): State<Shared>,
    viewer: Viewer,
    Form(f): Form<BulkForm>,
) -> Response {
    let run = async {
        viewer.check_csrf(&f.csrf)?;
        let filter = bulk_filter(&f.filter)?;
        let verb = match f.action.as_str() {
            "cancel" => "Cancel",
            "retry" => "Retry",
            a => return Err(PageError::bad_request(format!("no bulk action {a:?}"))),
        };
        let who = &viewer.who;
        let described = format!(
            "state {}, namespace {}, template {}, created from {} to {}",
            filter.state.map_or("any", |s| s.as_str()),
            filter.namespace.as_deref().unwrap_or("any"),
            filter.template.as_deref().unwrap_or("any"),
            filter.created_after.map_or("the start".into(), super::time),
            filter.created_before.map_or("now".into(), super::time),
        );
        let expected = match f.expected.as_deref().filter(|e| !e.is_empty()) {
            Some(e) => Some(
                e.parse::<u64>()
                    .map_err(|_| PageError::bad_request("expected: not a count"))?,
            ),
            None => None,
        };
        let Some(expected) = expected else {
            let n = operate::bulk_count(&shared, who, &filter).await?;
            let too_many = n > operate::MAX_BULK_TASKS;
            let body = html! {
                h1 { (verb) " tasks" }
                p { "Filter: " (described) }
                p #bulk-count { strong { (if too_many { format!("more than {}", operate::MAX_BULK_TASKS) } else { n.to_string() }) } " task(s) match." }
                @if too_many {
                    p.error { "That is more than one bulk action may touch (" (operate::MAX_BULK_TASKS) "): narrow the filter." }
                } @else if n == 0 {
                    p { "Nothing to do." }
                } @else {
                    form #bulk-confirm method="post" action="/ui/tasks/bulk" {
                        input type="hidden" name="csrf" value=(viewer.csrf);
                        input type="hidden" name="action" value=(f.action);
                        input type="hidden" name="expected" value=(n);
                        @for (k, v) in [("state", &f.filter.state), ("namespace", &f.filter.namespace), ("template", &f.filter.template), ("from", &f.filter.from), ("to", &f.filter.to)] {
                            @if let Some(v) = v { input type="hidden" name=(k) value=(v); }
                        }
                        p { "Tasks whose state does not allow it are left as they are. If more than " (n) " match when it runs, nothing is done." }
                        button #confirm type="submit" autofocus { "Yes, " (verb.to_lowercase()) " " (n) " task(s)" }
                        " " a href="/ui/tasks" { "No, go back" }
                    }
                }
            };
            return Ok(layout(&viewer, "Confirm", "/ui/tasks", body));
        };
        let out = match f.action.as_str() {
            "cancel" => operate::bulk_cancel(&shared, who, &filter, expected).await?,
            _ => operate::bulk_retry(&shared, who, &filter, expected).await?,
        };
        let body = html! {
            h1 { (verb) " tasks: done" }
            p #bulk-outcome { (out.acted) " acted on, " (out.skipped) " left as they were (of " (out.matched) " matched)." }
            p { a href="/ui/tasks" { "Back to the tasks" } }
        };
        Ok(layout(&viewer, "Done", "/ui/tasks", body))
    };
    match run.await {
        Ok(r) => r,
        Err(e) => e.page(Some(&viewer)),
    }
}
