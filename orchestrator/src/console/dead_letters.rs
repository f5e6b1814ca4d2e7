//! The dead letters page: browse and filter the dead-letter table ([`crate::service::dead_letters`]),
//! show one (headers, body), replay or discard one or many (with a confirmation step).

use super::pages::{encode, parse_time};
use super::{PageError, PageResult, Viewer, badge, json_block, layout, time};
use crate::auth::Role;
use crate::service::Shared;
use crate::service::dead_letters::{self as service, KINDS};
use crate::store::dead_letters::DeadLetterFilter;
use axum::Form;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use maud::html;
use serde::Deserialize;

const PAGE: i64 = 50;

#[derive(Debug, Default, Deserialize)]
pub struct Filters {
    kind: Option<String>,
    namespace: Option<String>,
    reason: Option<String>,
    from: Option<String>,
    to: Option<String>,
    before: Option<String>,
}

fn given(s: &Option<String>) -> Option<String> {
    s.as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn filter_of(q: &Filters) -> PageResult<DeadLetterFilter> {
    let time = |s: &Option<String>, what: &str| -> PageResult<_> {
        match given(s) {
            Some(t) => parse_time(&t)
                .map(Some)
                .ok_or_else(|| PageError::bad_request(format!("{what}: {t:?} is not a time"))),
            None => Ok(None),
        }
    };
    Ok(DeadLetterFilter {
        kind: given(&q.kind),
        namespace: given(&q.namespace),
        reason: given(&q.reason),
        received_after: time(&q.from, "from")?,
        received_before: time(&q.to, "to")?,
        before_id: match given(&q.before) {
            Some(b) => Some(
                b.parse()
                    .map_err(|_| PageError::bad_request(format!("before: {b:?} is not an id")))?,
            ),
            None => None,
        },
        scope: None,
        limit: PAGE,
    })
}

/// `GET /ui/dead-letters`: newest first, filtered, a page at a time.
pub async fn list(
    State(shared): State<Shared>,
    viewer: Viewer,
    Query(q): Query<Filters>,
) -> Response {
    let run = async {
        let filter = filter_of(&q)?;
        let (rows, more) = service::list(&shared, &viewer.who, filter).await?;
        let operate = viewer.who.has_role(Role::Operate);
        let v = |s: &Option<String>| s.clone().unwrap_or_default();
        let next = rows.last().filter(|_| more).map(|last| {
            let mut qs = String::new();
            for (k, val) in [
                ("kind", &q.kind),
                ("namespace", &q.namespace),
                ("reason", &q.reason),
                ("from", &q.from),
                ("to", &q.to),
            ] {
                if let Some(val) = given(val) {
                    qs.push_str(&format!("{k}={}&", encode(&val)));
                }
            }
            format!("/ui/dead-letters?{qs}before={}", last.id)
        });
        let body = html! {
            h1 { "Dead letters" }
            p.hint { "Messages nobody could process, moved from the broker into a bounded table: a task request is replayed by resubmitting it, a dead step by retrying its step (when its task still needs it)." }
            form #dl-filters .filters method="get" action="/ui/dead-letters" {
                label { "Kind "
                    select #dl-kind name="kind" {
                        option value="" { "any" }
                        @for k in KINDS { option value=(k) selected[given(&q.kind).as_deref() == Some(k)] { (k) } }
                    }
                }
                label { "Namespace " input #dl-namespace name="namespace" value=(v(&q.namespace)) size="12"; }
                label { "Reason contains " input #dl-reason name="reason" value=(v(&q.reason)) size="16"; }
                label { "From (UTC) " input type="datetime-local" name="from" value=(v(&q.from)); }
                label { "To (UTC) " input type="datetime-local" name="to" value=(v(&q.to)); }
                button type="submit" { "Filter" }
                " " a href="/ui/dead-letters" { "Clear" }
            }
            @if rows.is_empty() { p #no-dead-letters { "No dead letter matches." } } @else {
                form #dl-bulk method="post" action="/ui/dead-letters/act" {
                    input type="hidden" name="csrf" value=(viewer.csrf);
                    table #dead-letters .list {
                        thead { tr { @if operate { th { span.hint { "select" } } } th { "Id" } th { "Received (UTC)" } th { "Kind" } th { "Namespace" } th { "Task / step" } th { "Reason" } th { "Bytes" } } }
                        tbody {
                            @for d in &rows {
                                tr.dead-letter id={"dl-" (d.id)} {
                                    @if operate { td { input type="checkbox" name="id" value=(d.id) aria-label={"select dead letter " (d.id)}; } }
                                    td { a href={"/ui/dead-letters/" (d.id)} { (d.id) } }
                                    td { (time(d.received_at)) }
                                    td { (badge(&d.kind)) }
                                    td { (d.namespace.as_deref().unwrap_or("")) }
                                    td { @if let Some(t) = d.task_id { a href={"/ui/tasks/" (t)} { (t) } } @if let Some(s) = &d.step { " / " (s) } }
                                    td.err { (super::dag::truncate(&d.reason, 120)) }
                                    td.num { (d.body_bytes) }
                                }
                            }
                        }
                    }
                    @if operate {
                        p.actions {
                            "Selected: "
                            button #dl-replay name="action" value="replay" { "Replay…" }
                            " "
                            button #dl-discard name="action" value="discard" { "Discard…" }
                        }
                    }
                }
            }
            @if let Some(n) = next { p { a #next rel="next" href=(n) { "Older dead letters →" } } }
        };
        Ok::<_, PageError>(layout(&viewer, "Dead letters", "/ui/dead-letters", body))
    };
    match run.await {
        Ok(r) => r,
        Err(e) => e.page(Some(&viewer)),
    }
}

/// `GET /ui/dead-letters/{id}`: one dead letter with its headers and body.
pub async fn show(
    State(shared): State<Shared>,
    viewer: Viewer,
    Path(id): Path<String>,
) -> Response {
    let run = async {
        let id: i64 = id
            .parse()
            .map_err(|_| PageError::bad_request(format!("{id:?} is not a dead letter id")))?;
        let d = service::show(&shared, &viewer.who, id).await?;
        let r = &d.row;
        let body_json: Option<serde_json::Value> = serde_json::from_slice(&d.body).ok();
        let operate = match &r.namespace {
            Some(ns) => viewer.who.allows(Role::Operate, ns),
            None => viewer.who.has_role(Role::Operate) && viewer.who.is_global(),
        };
        let body = html! {
            h1 { "Dead letter " (r.id) " " (badge(&r.kind)) }
            dl.facts #dl-facts {
                dt { "Received" } dd { (time(r.received_at)) }
                dt { "Reason" } dd.err #dl-reason-text { (r.reason) }
                dt { "Exchange" } dd.mono { (r.exchange) }
                dt { "Routing key" } dd.mono { (r.routing_key) }
                @if let Some(m) = &r.message_id { dt { "Message id" } dd.mono { (m) } }
                @if let Some(n) = &r.namespace { dt { "Namespace" } dd { (n) } }
                @if let Some(t) = r.task_id { dt { "Task" } dd { a href={"/ui/tasks/" (t)} { (t) } @if let Some(s) = &r.step { " step " (s) } } }
                dt { "Size" } dd { (r.body_bytes) " bytes" }
            }
            @if operate {
                form #dl-one method="post" action="/ui/dead-letters/act" .actions {
                    input type="hidden" name="csrf" value=(viewer.csrf);
                    input type="hidden" name="id" value=(r.id);
                    button #dl-replay name="action" value="replay" { "Replay…" }
                    button #dl-discard name="action" value="discard" { "Discard…" }
                }
            }
            h2 { "Headers" }
            (json_block(&r.headers, "#"))
            h2 { "Body" }
            @match &body_json {
                Some(v) => (json_block(v, "#")),
                None => pre.json { (super::dag::truncate(&String::from_utf8_lossy(&d.body), 4096)) },
            }
        };
        Ok::<_, PageError>(layout(
            &viewer,
            &format!("Dead letter {id}"),
            "/ui/dead-letters",
            body,
        ))
    };
    match run.await {
        Ok(r) => r,
        Err(e) => e.page(Some(&viewer)),
    }
}

/// `POST /ui/dead-letters/act` (`csrf`, `action` = replay|discard, `id`…, `confirmed`): first a
/// confirmation page naming how many, then the action and each one's outcome.
pub async fn act(
    State(shared): State<Shared>,
    viewer: Viewer,
    Form(pairs): Form<Vec<(String, String)>>,
) -> Response {
    let run = async {
        let field = |k: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        viewer.check_csrf(field("csrf").unwrap_or(""))?;
        let action = field("action").unwrap_or("");
        if !matches!(action, "replay" | "discard") {
            return Err(PageError::bad_request(format!("no action {action:?}")));
        }
        let ids: Vec<i64> = pairs
            .iter()
            .filter(|(k, _)| k == "id")
            .map(|(_, v)| v.parse::<i64>())
            .collect::<Result<_, _>>()
            .map_err(|_| PageError::bad_request("an id is not a number"))?;
        if ids.is_empty() {
            return Err(PageError::bad_request("select at least one dead letter"));
        }
        if field("confirmed") != Some("yes") {
            let body = html! {
                h1 { "Confirm" }
                p #confirm-what {
                    @if action == "replay" { "Replay " } @else { "Discard " }
                    strong #dl-count { (ids.len()) } " dead letter(s): "
                    @if action == "replay" { "task requests are resubmitted, dead steps retried if their task still needs them." } @else { "they are removed for good (recorded in the audit log)." }
                }
                form #confirm-form method="post" action="/ui/dead-letters/act" {
                    input type="hidden" name="csrf" value=(viewer.csrf);
                    input type="hidden" name="action" value=(action);
                    input type="hidden" name="confirmed" value="yes";
                    @for id in &ids { input type="hidden" name="id" value=(id); }
                    button #confirm type="submit" autofocus { "Yes, " (action) " " (ids.len()) }
                    " " a href="/ui/dead-letters" { "No, go back" }
                }
            };
            return Ok(layout(&viewer, "Confirm", "/ui/dead-letters", body));
        }
        let outcomes = if action == "replay" {
            service::replay(&shared, &viewer.who, &ids).await?
        } else {
            service::discard(&shared, &viewer.who, &ids).await?
        };
        let body = html! {
            h1 { "Dead letters: " (action) }
            table #dl-outcomes .list {
                thead { tr { th { "Id" } th { "Outcome" } th { "Task" } th { "Message" } } }
                tbody {
                    @for o in &outcomes {
                        tr { td { (o.id) } td.outcome { (o.outcome) } td { @if let Some(t) = o.task_id { a href={"/ui/tasks/" (t)} { (t) } } } td { (o.message.as_deref().unwrap_or("")) } }
                    }
                }
            }
            p { a href="/ui/dead-letters" { "Back to the dead letters" } }
        };
        Ok(layout(&viewer, "Done", "/ui/dead-letters", body))
    };
    match run.await {
        Ok(r) => r,
        Err(e) => e.page(Some(&viewer)),
    }
}
