//! The pages that read: tasks (search), task (DAG, steps, attempts, timeline, history), a
//! task's or step's whole JSON values, queues, workers, templates.

use super::dag::{self, Node};
use super::{PageError, PageResult, Viewer, badge, duration, json_block, layout, time, time_text};
use crate::auth::Role;
use crate::service::{self, Shared};
use crate::store::console::TaskSearch;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use maud::{Markup, html};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use tasker_schemas::api::{StepView, TaskView};
use tasker_schemas::{StepState, TaskId, TaskState};
use uuid::Uuid;

/// Widest time range a context filter may search (it scans that range's tasks).
pub const MAX_CONTEXT_RANGE_MS: i64 = 7 * 24 * 3600 * 1000;
/// Default and largest page of the tasks list.
const PAGE: i64 = 50;
const MAX_PAGE: i64 = 200;
/// Most index scans one task search merges; past it, one plain query.
const MAX_BRANCHES: usize = 64;

/// The tasks page's query string (empty fields are absent).
#[derive(Debug, Default, Clone, Deserialize)]
pub struct TasksQuery {
    pub state: Option<String>,
    pub namespace: Option<String>,
    pub template: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub key: Option<String>,
    pub task: Option<String>,
    pub field: Option<String>,
    pub value: Option<String>,
    pub after: Option<String>,
    pub limit: Option<String>,
}

fn given(s: &Option<String>) -> Option<&str> {
    s.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// A time from a form: `YYYY-MM-DDTHH:MM[:SS]` (a `datetime-local` field, read as UTC),
/// RFC 3339, or a date.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for f in [
        "%Y-%m-%dT%H:%M:%S",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M:%S",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, f) {
            return Some(t.and_utc());
        }
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
}

/// The smallest (or, `upper`, largest) UUIDv7 of a millisecond: task ids are UUIDv7, so a
/// time range is an id range.
pub fn id_bound(t: DateTime<Utc>, upper: bool) -> Uuid {
    let mut b = if upper { [0xff; 16] } else { [0; 16] };
    let ms = t.timestamp_millis().max(0) as u64;
    b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    Uuid::from_bytes(b)
}

/// Turns the page's query into a search within what the viewer may see, or says what is wrong.
/// `now` bounds an open time range for the context filter.
pub fn search_of(
    q: &TasksQuery,
    scope: Option<&[String]>,
    now: DateTime<Utc>,
) -> Result<TaskSearch, String> {
    let mut s = TaskSearch {
        scope: scope.map(<[String]>::to_vec),
        limit: PAGE,
        ..Default::default()
    };
    if let Some(st) = given(&q.state) {
        s.state = Some(st.parse::<TaskState>().map_err(|e| e.to_string())?);
    }
    for (what, v, out) in [
        ("namespace", given(&q.namespace), &mut s.namespace),
        ("template", given(&q.template), &mut s.template),
    ] {
        if let Some(v) = v {
            tasker_schemas::template::validate_name(what, v).map_err(|e| e.to_string())?;
            *out = Some(v.to_owned());
        }
    }
    let from = match given(&q.from) {
        Some(f) => Some(
            parse_time(f)
                .ok_or_else(|| format!("from: {f:?} is not a time (YYYY-MM-DDTHH:MM, UTC)"))?,
        ),
        None => None,
    };
    let to = match given(&q.to) {
        Some(t) => Some(
            parse_time(t)
                .ok_or_else(|| format!("to: {t:?} is not a time (YYYY-MM-DDTHH:MM, UTC)"))?,
        ),
        None => None,
    };
    if let (Some(f), Some(t)) = (from, to)
        && f > t
    {
        return Err("from is after to: the time range is empty".into());
    }
    s.id_from = from.map(|t| id_bound(t, false));
    s.id_to = to.map(|t| id_bound(t, true));
    if let Some(k) = given(&q.key) {
        if k.len() > service::tasks::MAX_IDEMPOTENCY_KEY_LEN || k.contains('\0') {
            return Err(format!(
                "key: an idempotency key is 1-{} bytes without NUL",
                service::tasks::MAX_IDEMPOTENCY_KEY_LEN
            ));
        }
        s.idempotency_key = Some(k.to_owned());
    }
    if let Some(t) = given(&q.task) {
        s.task_id = Some(
            t.parse::<TaskId>()
                .map_err(|_| format!("task: {t:?} is not a task id"))?
                .0,
        );
    }
    match (given(&q.field), given(&q.value)) {
        (None, None) => {}
        (Some(field), Some(value)) => {
            let Some(from) = from else {
                return Err(format!(
                    "a context filter needs a time range (from, and to or now) of at most {} days",
                    MAX_CONTEXT_RANGE_MS / 86_400_000
                ));
            };
            let to = to.unwrap_or(now);
            if (to - from).num_milliseconds() > MAX_CONTEXT_RANGE_MS {
                return Err(format!(
                    "a context filter searches at most {} days: narrow the time range (from {} to {} is {})",
                    MAX_CONTEXT_RANGE_MS / 86_400_000,
                    time(from),
                    time(to),
                    duration((to - from).num_milliseconds())
                ));
            }
            s.id_to = Some(id_bound(to, true));
            if field.len() > 128
                || value.len() > 1024
                || field.contains('\0')
                || value.contains('\0')
            {
                return Err(
                    "context field (128 bytes) or value (1024 bytes) too long, or has a NUL".into(),
                );
            }
            s.context = Some((field.to_owned(), value.to_owned()));
        }
        _ => return Err("a context filter needs both a field and a value".into()),
    }
    if let Some(a) = given(&q.after) {
        s.after = Some(
            a.parse::<TaskId>()
                .map_err(|_| format!("after: {a:?} is not a task id"))?
                .0,
        );
    }
    if let Some(l) = given(&q.limit) {
        s.limit = l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=MAX_PAGE).contains(l))
            .ok_or_else(|| format!("limit: 1 to {MAX_PAGE}"))?;
    }
    Ok(s)
}

/// The query string of `q` with `after` replaced (for the next page's link).
fn query_with_after(q: &TasksQuery, after: &str) -> String {
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for (k, v) in [
        ("state", &q.state),
        ("namespace", &q.namespace),
        ("template", &q.template),
        ("from", &q.from),
        ("to", &q.to),
        ("key", &q.key),
        ("task", &q.task),
        ("field", &q.field),
        ("value", &q.value),
        ("limit", &q.limit),
    ] {
        if let Some(v) = given(v) {
            pairs.push((k, v));
        }
    }
    pairs.push(("after", after));
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-encodes a query value.
pub fn encode(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The namespaces the viewer may pick from.
async fn visible_namespaces(shared: &Shared, viewer: &Viewer) -> PageResult<Vec<String>> {
    let all = crate::store::console::namespaces(&shared.db).await?;
    Ok(all.into_iter().filter(|n| viewer.who.sees(n)).collect())
}

fn filter_form(q: &TasksQuery, namespaces: &[String]) -> Markup {
    let v = |s: &Option<String>| s.clone().unwrap_or_default();
    html! {
        form #filters .filters method="get" action="/ui/tasks" {
            label { "State "
                select #f-state name="state" {
                    option value="" { "any" }
                    @for st in TaskState::ALL {
                        option value=(st.as_str()) selected[given(&q.state) == Some(st.as_str())] { (st.as_str()) }
                    }
                }
            }
            label { "Namespace "
                select #f-namespace name="namespace" {
                    option value="" { "any" }
                    @for n in namespaces {
                        option value=(n) selected[given(&q.namespace) == Some(n.as_str())] { (n) }
                    }
                }
            }
            label { "Template " input #f-template name="template" value=(v(&q.template)) size="14"; }
            label { "From (UTC) " input #f-from type="datetime-local" name="from" value=(v(&q.from)); }
            label { "To (UTC) " input #f-to type="datetime-local" name="to" value=(v(&q.to)); }
            label { "Idempotency key " input #f-key name="key" value=(v(&q.key)) size="14"; }
            label { "Task id " input #f-task name="task" value=(v(&q.task)) size="20"; }
            label { "Context field " input #f-field name="field" value=(v(&q.field)) size="10"; }
            label { "= value " input #f-value name="value" value=(v(&q.value)) size="10"; }
            button type="submit" { "Filter" }
            " " a href="/ui/tasks" { "Clear" }
        }
    }
}

/// `GET /ui/tasks`: tasks newest first, filtered, a page at a time; exact counts of live tasks.
pub async fn tasks(
    State(shared): State<Shared>,
    viewer: Viewer,
    Query(q): Query<TasksQuery>,
) -> Response {
    match tasks_page(&shared, &viewer, &q).await {
        Ok(r) => r,
        Err(e) => e.page(Some(&viewer)),
    }
}

async fn tasks_page(shared: &Shared, viewer: &Viewer, q: &TasksQuery) -> PageResult {
    let namespaces = visible_namespaces(shared, viewer).await?;
    let mut search = match search_of(q, viewer.who.scope(), Utc::now()) {
        Ok(s) => s,
        Err(message) => {
            let body = html! {
                h1 { "Tasks" }
                (filter_form(q, &namespaces))
                p #filter-error .error role="alert" { (message) }
            };
            let mut r = layout(viewer, "Tasks", "/ui/tasks", body);
            *r.status_mut() = axum::http::StatusCode::BAD_REQUEST;
            return Ok(r);
        }
    };
    if let Some(n) = &search.namespace
        && !viewer.who.sees(n)
    {
        return Err(PageError::forbidden(format!(
            "your key cannot see namespace {n:?}"
        )));
    }
    // The (namespace, idempotency_key) index needs the namespace: search each visible one.
    if search.idempotency_key.is_some() && search.namespace.is_none() {
        search.namespace_in = Some(namespaces.clone());
    }
    // A template, or a state within a namespace: one index scan per (namespace, template,
    // state), merged (store::console::search).
    if search.task_id.is_none()
        && search.idempotency_key.is_none()
        && (search.template.is_some() || (search.state.is_some() && search.namespace.is_some()))
    {
        let states: Vec<TaskState> = match search.state {
            Some(s) => vec![s],
            None => TaskState::ALL.to_vec(),
        };
        let combos: Vec<(String, String, TaskState)> =
            crate::store::console::template_names(&shared.db)
                .await?
                .into_iter()
                .filter(|(ns, t)| {
                    viewer.who.sees(ns)
                        && search.namespace.as_ref().is_none_or(|n| n == ns)
                        && search.template.as_ref().is_none_or(|x| x == t)
                })
                .flat_map(|(ns, t)| states.iter().map(move |s| (ns.clone(), t.clone(), *s)))
                .collect();
        if combos.len() <= MAX_BRANCHES {
            search.branches = Some(combos);
        }
    }
    let (rows, more) = crate::store::console::search(&shared.db, &search).await?;
    let counts = crate::store::console::live_counts(
        &shared.db,
        viewer.who.scope(),
        search.namespace.as_deref(),
        search.template.as_deref(),
    )
    .await?;
    let count_of = |st: TaskState| counts.iter().find(|(s, _)| *s == st).map_or(0, |(_, n)| *n);
    let may_operate = viewer.who.has_role(Role::Operate);
    let body = html! {
        h1 { "Tasks" }
        (filter_form(q, &namespaces))
        p #live-counts .counts {
            "Live (exact): "
            span #count-running { "running " strong { (count_of(TaskState::Running)) } }
            " · "
            span #count-pending { "pending " strong { (count_of(TaskState::Pending)) } }
            span.hint { " — finished tasks are not counted (there may be millions); page through them." }
        }
        @if may_operate {
            form #bulk .bulk method="post" action="/ui/tasks/bulk" {
                input type="hidden" name="csrf" value=(viewer.csrf);
                @for (k, v) in [("state", &q.state), ("namespace", &q.namespace), ("template", &q.template), ("from", &q.from), ("to", &q.to), ("key", &q.key), ("task", &q.task), ("field", &q.field), ("value", &q.value)] {
                    @if let Some(v) = given(v) { input type="hidden" name=(k) value=(v); }
                }
                "Everything matching these filters: "
                button #bulk-cancel name="action" value="cancel" { "Cancel…" }
                " "
                button #bulk-retry name="action" value="retry" { "Retry…" }
                span.hint { " (the count is shown before anything happens)" }
            }
        }
        @if rows.is_empty() {
            p #no-tasks { "No task matches." }
        } @else {
            table #tasks .list {
                thead { tr { th { "Task" } th { "Namespace" } th { "Template" } th { "State" } th { "Created (UTC)" } th { "Finished" } th { "Error" } } }
                tbody {
                    @for t in &rows {
                        tr.task id={"task-" (t.id)} data-id=(t.id) {
                            td { a.mono href={"/ui/tasks/" (t.id)} { (t.id) } }
                            td { (t.namespace) }
                            td { a href={"/ui/templates/" (t.namespace) "/" (t.template_name) "?version=" (t.template_version)} { (t.template_name) " v" (t.template_version) } }
                            td { (badge(t.state.as_str())) }
                            td { (time(t.created_at)) }
                            td { @if let Some(f) = t.finished_at { (duration((f - t.created_at).num_milliseconds())) " later" } }
                            td.err { @if let Some(e) = &t.error { (dag::truncate(e, 80)) } }
                        }
                    }
                }
            }
        }
        @if more && let Some(last) = rows.last() {
            p { a #next rel="next" href={"/ui/tasks?" (query_with_after(q, &last.id.to_string()))} { "Older tasks →" } }
        }
    };
    Ok(layout(viewer, "Tasks", "/ui/tasks", body))
}

fn parse_id(id: &str) -> PageResult<TaskId> {
    id.parse()
        .map_err(|_| PageError::bad_request(format!("{id:?} is not a task id")))
}

/// The task, if the viewer may see its namespace (404 otherwise: no hint it exists).
pub async fn visible_task(shared: &Shared, viewer: &Viewer, id: TaskId) -> PageResult<TaskView> {
    // A task outside the viewer's namespaces is "not found": no hint that it exists.
    let d = match service::tasks::detail(shared, &viewer.who, id).await {
        Err(crate::service::ServiceError::Forbidden(_)) => {
            return Err(PageError::not_found(format!("task {id} not found")));
        }
        d => d?,
    };
    Ok(crate::edge::views::task_view(d))
}

/// The DAG nodes of a task's steps.
pub fn task_nodes(task: &TaskView) -> Vec<Node> {
    let index: HashMap<&str, usize> = task
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    task.steps
        .iter()
        .map(|s| Node {
            name: s.name.clone(),
            parents: s
                .depends_on
                .iter()
                .filter_map(|p| index.get(p.as_str()).copied())
                .collect(),
            state: s.state.as_str().to_owned(),
            sub: node_sub(s),
            // A child workflow's node opens the child task; any other jumps to its step's
            // details below (so the graph is keyboard-usable: Tab to a node, Enter).
            href: Some(match s.child_task_id {
                Some(c) => format!("/ui/tasks/{c}"),
                None => format!("#step-{}", s.name),
            }),
            title: format!(
                "{} ({}): {}{}",
                s.name,
                s.handler,
                s.state.as_str(),
                s.waiting_reason
                    .as_deref()
                    .map(|w| format!(" — {w}"))
                    .unwrap_or_default()
            ),
        })
        .collect()
}

/// A node's second line: a mapped step's counts, a child workflow, or the attempt.
pub fn node_sub(s: &StepView) -> String {
    if let Some(m) = &s.map {
        return map_sub(
            m.total.map(i64::from),
            i64::from(m.succeeded),
            i64::from(m.running),
            i64::from(m.failed),
        );
    }
    if s.child_task_id.is_some() {
        return "child workflow ↗".into();
    }
    attempt_sub(&s.handler, i64::from(s.attempt))
}

pub fn map_sub(total: Option<i64>, succeeded: i64, running: i64, failed: i64) -> String {
    format!(
        "map {succeeded}✓ {running}▶ {failed}✗ / {}",
        total.map_or("?".into(), |t| t.to_string())
    )
}

pub fn attempt_sub(handler: &str, attempt: i64) -> String {
    if attempt > 0 {
        format!("{handler} · #{attempt}")
    } else {
        handler.to_owned()
    }
}

/// Milliseconds between two RFC 3339 times.
fn ms_between(a: &str, b: &str) -> Option<i64> {
    let a = DateTime::parse_from_rfc3339(a).ok()?;
    let b = DateTime::parse_from_rfc3339(b).ok()?;
    Some((b - a).num_milliseconds())
}

fn is_live(s: StepState) -> bool {
    !s.is_terminal()
}

/// The step actions the viewer may take on step `s` (name, label).
fn step_actions(s: &StepView) -> Vec<(&'static str, &'static str)> {
    let mut out = Vec::new();
    if s.state == StepState::Failed {
        out.push(("retry-step", "Retry step…"));
        out.push(("mark-succeeded", "Mark succeeded…"));
    }
    if s.state.is_terminal() {
        out.push(("rerun-from", "Rerun from here…"));
    }
    out
}

/// `GET /ui/tasks/{id}`: the task with its DAG (live), steps, timeline and history.
pub async fn task(
    State(shared): State<Shared>,
    viewer: Viewer,
    Path(id): Path<String>,
) -> Response {
    match task_page(&shared, &viewer, &id).await {
        Ok(r) => r,
        Err(e) => e.page(Some(&viewer)),
    }
}

async fn task_page(shared: &Shared, viewer: &Viewer, id: &str) -> PageResult {
    let id = parse_id(id)?;
    let t = visible_task(shared, viewer, id).await?;
    let audit = service::audit::list(
        shared,
        &viewer.who,
        crate::store::audit::AuditFilter {
            task_id: Some(id.0),
            limit: 200,
            ..Default::default()
        },
    )
    .await?;
    let operate = viewer.who.allows(Role::Operate, &t.namespace);
    let live = !t.state.is_finished();
    let nodes = task_nodes(&t);
    // The timeline: every attempt (finished or running) on one time axis.
    let mut bars: Vec<(String, u32, String, i64, i64)> = Vec::new(); // step, attempt, outcome, start, end
    let now = Utc::now();
    for s in &t.steps {
        for a in &s.attempts {
            let Ok(start) = DateTime::parse_from_rfc3339(&a.dispatched_at) else {
                continue;
            };
            let end = a
                .finished_at
                .as_deref()
                .and_then(|f| DateTime::parse_from_rfc3339(f).ok())
                .map_or(now, |f| f.with_timezone(&Utc));
            bars.push((
                s.name.clone(),
                a.attempt,
                a.outcome.clone(),
                start.timestamp_millis(),
                end.timestamp_millis(),
            ));
        }
    }
    let t0 = bars.iter().map(|b| b.3).min().unwrap_or(0);
    let t1 = bars.iter().map(|b| b.4).max().unwrap_or(0).max(t0 + 1);
    let span = (t1 - t0) as f64;
    let body = html! {
        div #task data-task=(t.id) data-live=(live) data-state=(t.state.as_str()) {
            h1 { "Task " span.mono { (t.id) } " " span #task-state class={"state st-" (t.state.as_str())} { (t.state.as_str()) } }
            dl.facts {
                dt { "Template" } dd { a href={"/ui/templates/" (t.namespace) "/" (t.template) "?version=" (t.template_version)} { (t.namespace) "/" (t.template) " v" (t.template_version) } }
                dt { "Created" } dd { (time_text(&t.created_at)) }
                @if let Some(f) = &t.finished_at { dt { "Finished" } dd { (time_text(f)) " (" (ms_between(&t.created_at, f).map(duration).unwrap_or_default()) ")" } }
                dt { "Priority" } dd { (t.priority) }
                @if let Some(k) = &t.idempotency_key { dt { "Idempotency key" } dd.mono { (k) } }
                @if let Some(p) = &t.parent { dt { "Parent" } dd { a href={"/ui/tasks/" (p.task_id)} { (p.task_id) } " (step " (p.step) ")" } }
                @if let Some(e) = &t.error { dt { "Error" } dd.err #task-error { (e) } }
            }
            p #live-status .live aria-live="polite" {
                @if live { "Live: states update as they change." } @else { "Finished." }
            }
            @if operate {
                div #task-actions .actions {
                    @if live { a.button #action-cancel href={"/ui/tasks/" (t.id) "/actions/cancel"} { "Cancel task…" } }
                    @if matches!(t.state, TaskState::Failed | TaskState::Cancelled) {
                        a.button #action-retry href={"/ui/tasks/" (t.id) "/actions/retry"} { "Retry task…" }
                    }
                }
            }
            h2 { "Graph" }
            div #dag .dag-wrap { (dag::svg(&nodes)) }
            p.legend {
                @for st in ["waiting", "queued", "dispatched", "retrying", "delegated", "succeeded", "failed", "skipped", "cancelled"] { (badge(st)) " " }
            }
            h2 { "Steps" }
            @for s in &t.steps {
                section.step id={"step-" (s.name)} data-step=(s.name) {
                    h3 { (s.name) " " span class={"state step-state st-" (s.state.as_str())} { (s.state.as_str()) } }
                    p.meta {
                        "handler " code { (s.handler) } " · queue " code { (s.queue) }
                        " · attempt " (s.attempt) " · failures " (s.failures) "/" (s.max_attempts)
                        @if let Some(c) = s.child_task_id { " · child task " a href={"/ui/tasks/" (c)} { (c) } }
                        @if let Some(m) = &s.map { " · " span.mapcounts { (map_sub(m.total.map(i64::from), i64::from(m.succeeded), i64::from(m.running), i64::from(m.failed))) " (" (m.waiting) " waiting, " (m.halted) " halted)" } }
                    }
                    @if let Some(w) = &s.waiting_reason { @if is_live(s.state) { p.why { strong { "Why waiting: " } (w) } } }
                    @if let Some(r) = &s.skip_reason { p.why { strong { "Skipped: " } (r) } }
                    @if let Some(e) = &s.error { p.err { strong { "Error: " } (e) } }
                    @if !s.attempts.is_empty() {
                        table.attempts {
                            thead { tr { th { "#" } th { "Outcome" } th { "Dispatched" } th { "Started" } th { "Finished" } th { "Duration" } th { "Worker" } th { "Error" } } }
                            tbody {
                                @for a in &s.attempts {
                                    tr {
                                        td { (a.attempt) @if a.repeats > 1 { " ×" (a.repeats) } }
                                        td { (badge(&a.outcome)) }
                                        td { (time_text(&a.dispatched_at)) }
                                        td { @if let Some(x) = &a.started_at { (time_text(x)) } }
                                        td { @if let Some(x) = &a.finished_at { (time_text(x)) } }
                                        td { @if let Some(x) = &a.finished_at { (ms_between(&a.dispatched_at, x).map(duration).unwrap_or_default()) } }
                                        td { @if let Some(w) = &a.worker { (w) } }
                                        td.err { @if let Some(e) = &a.error { (e) } }
                                    }
                                }
                            }
                        }
                    }
                    @if let Some(o) = &s.output {
                        details.output open[s.map.is_none()] {
                            summary { "Output" }
                            (json_block(o, &format!("/ui/tasks/{}/steps/{}/output", t.id, s.name)))
                        }
                    }
                    @if operate {
                        @let acts = step_actions(s);
                        @if !acts.is_empty() {
                            div.actions {
                                @for (action, label) in acts {
                                    a.button id={"action-" (action) "-" (s.name)} href={"/ui/tasks/" (t.id) "/actions/" (action) "?step=" (s.name)} { (label) }
                                    " "
                                }
                            }
                        }
                    }
                }
            }
            h2 { "Timeline" }
            @if bars.is_empty() { p { "No attempt yet." } } @else {
                div #timeline .timeline {
                    @for (step, attempt, outcome, start, end) in &bars {
                        div.tl-row {
                            span.tl-label { (step) " #" (attempt) }
                            span.tl-track {
                                span class={"tl-bar st-" (outcome)}
                                    style={"left:" (format!("{:.2}", (*start - t0) as f64 / span * 100.0)) "%;width:" (format!("{:.2}", ((*end - *start) as f64 / span * 100.0).max(0.4))) "%"}
                                    title={(outcome) ", " (duration(end - start))} {}
                            }
                            span.tl-dur { (duration(end - start)) }
                        }
                    }
                }
            }
            h2 { "Context" }
            (json_block(&t.context, &format!("/ui/tasks/{}/values/context", t.id)))
            @if let Some(o) = &t.output {
                h2 { "Output" }
                (json_block(o, &format!("/ui/tasks/{}/values/output", t.id)))
            }
            h2 { "History" }
            table #history .list {
                thead { tr { th { "When (UTC)" } th { "What" } th { "Who" } th { "Detail" } } }
                tbody {
                    @for e in &t.events {
                        tr.event { td { (time_text(&e.at)) } td { (e.kind) } td { "orchestrator" } td.mono { @if let Some(d) = &e.detail { (dag::truncate(&d.to_string(), 200)) } } }
                    }
                    @for a in &audit {
                        tr.audit { td { (time(a.at)) } td { (a.action) } td.actor { (a.actor) } td.mono { (dag::truncate(&a.detail.to_string(), 200)) } }
                    }
                }
            }
        }
    };
    Ok(layout(viewer, &format!("Task {}", t.id), "/ui/tasks", body))
}

/// `GET /ui/tasks/{id}/values/{context|output}`: a task's whole context or output (JSON).
pub async fn task_value(
    State(shared): State<Shared>,
    viewer: Viewer,
    Path((id, which)): Path<(String, String)>,
) -> Response {
    let run = async {
        let id = parse_id(&id)?;
        let ns = crate::store::console::task_namespace(&shared.db, id.0)
            .await?
            .filter(|ns| viewer.who.sees(ns))
            .ok_or_else(|| PageError::not_found(format!("task {id} not found")))?;
        let _ = ns;
        let (context, output) = crate::store::console::task_values(&shared.db, id.0)
            .await?
            .ok_or_else(|| PageError::not_found(format!("task {id} not found")))?;
        match which.as_str() {
            "context" => Ok(Json(context).into_response()),
            "output" => Ok(Json(output).into_response()),
            _ => Err(PageError::not_found("only context and output")),
        }
    };
    match run.await {
        Ok(r) => r,
        Err(e) => e.page(Some(&viewer)),
    }
}

/// `GET /ui/tasks/{id}/steps/{step}/output`: a step's whole output (JSON).
pub async fn step_output(
    State(shared): State<Shared>,
    viewer: Viewer,
    Path((id, step)): Path<(String, String)>,
) -> Response {
    let run = async {
        let id = parse_id(&id)?;
        crate::store::console::task_namespace(&shared.db, id.0)
            .await?
            .filter(|ns| viewer.who.sees(ns))
            .ok_or_else(|| PageError::not_found(format!("task {id} not found")))?;
        let out = crate::store::console::step_output(&shared.db, id.0, &step)
            .await?
            .ok_or_else(|| PageError::not_found(format!("task {id} has no step {step:?}")))?;
        Ok::<_, PageError>(Json(out).into_response())
    };
    match run.await {
        Ok(r) => r,
        Err(e) => e.page(Some(&viewer)),
    }
}

/// Results applied per (namespace, outcome) by this replica: the totals and when read, kept to
/// turn the next reading into a rate.
/// Figures per (namespace, outcome).
type PerOutcome = BTreeMap<(String, String), f64>;

static LAST_RATES: std::sync::Mutex<Option<(std::time::Instant, PerOutcome)>> =
    std::sync::Mutex::new(None);

/// `name{namespace="a",outcome="b"} 12` lines of a Prometheus text, summed per label pair.
pub fn counter_by(text: &str, name: &str) -> PerOutcome {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let Some(rest) = rest.strip_prefix('{') else {
            continue;
        };
        let Some((labels, value)) = rest.split_once("} ") else {
            continue;
        };
        let Ok(v) = value.trim().parse::<f64>() else {
            continue;
        };
        let label = |k: &str| {
            labels
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.trim_matches('"').to_owned())
                .unwrap_or_default()
        };
        *out.entry((label("namespace"), label("outcome")))
            .or_default() += v;
    }
    out
}

/// `GET /ui/queues`: per namespace and queue, ready, in flight, retrying, oldest ready age and
/// live consumers (the gauges' shared snapshot), and results per minute by namespace.
pub async fn queues(State(shared): State<Shared>, viewer: Viewer) -> Response {
    let run = async {
        let snap = crate::store::gauges::load(&shared.db).await?;
        let consumers: HashMap<&str, i64> =
            snap.workers.iter().map(|(q, n)| (q.as_str(), *n)).collect();
        let totals = counter_by(&shared.metrics.render(), "tasker_results_applied_total");
        let rates: Option<(f64, PerOutcome)> = {
            let mut last = LAST_RATES.lock().unwrap_or_else(|e| e.into_inner());
            let now = std::time::Instant::now();
            let out = last.as_ref().map(|(at, prev)| {
                let secs = now.duration_since(*at).as_secs_f64().max(0.001);
                let per_min = totals
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            (v - prev.get(k).copied().unwrap_or(0.0)) / secs * 60.0,
                        )
                    })
                    .collect();
                (secs, per_min)
            });
            if last
                .as_ref()
                .is_none_or(|(at, _)| now.duration_since(*at).as_secs() >= 10)
            {
                *last = Some((now, totals.clone()));
            }
            out
        };
        let body = html! {
            h1 { "Queues" }
            p.hint { "From the gauges' snapshot (computed by one replica every metrics interval, shared by all)." }
            table #queues .list {
                thead { tr { th { "Namespace" } th { "Queue" } th { "Ready" } th { "In flight" } th { "Retrying" } th { "Oldest ready" } th { "Consumers" } } }
                tbody {
                    @for q in snap.queues.iter().filter(|q| viewer.who.sees(&q.namespace)) {
                        tr.queue id={"queue-" (q.namespace) "-" (q.queue)} {
                            td { (q.namespace) } td { (q.queue) } td.num { (q.ready) } td.num { (q.in_flight) }
                            td.num { (q.retrying) } td { (duration((q.oldest_ready_s * 1000.0) as i64)) }
                            td.num { (consumers.get(q.queue.as_str()).copied().unwrap_or(0)) }
                        }
                    }
                }
            }
            h2 { "Results applied by this replica" }
            table #rates .list {
                thead { tr { th { "Namespace" } th { "Outcome" } th { "Total" } th { "Per minute" } } }
                tbody {
                    @for ((ns, outcome), total) in totals.iter().filter(|((ns, _), _)| viewer.who.sees(ns)) {
                        tr { td { (ns) } td { (outcome) } td.num { (total) }
                             td.num { @if let Some((_, r)) = &rates { (format!("{:.1}", r.get(&(ns.clone(), outcome.clone())).copied().unwrap_or(0.0))) } @else { "—" } } }
                    }
                }
            }
            @if let Some((secs, _)) = rates { p.hint { "Rates over the last " (format!("{secs:.0}")) " s (since an earlier view of this page)." } }
            h2 { "Live tasks per template" }
            table #live-tasks .list {
                thead { tr { th { "Namespace" } th { "Template" } th { "Running" } } }
                tbody {
                    @for t in snap.tasks.iter().filter(|t| viewer.who.sees(&t.namespace)) {
                        tr { td { (t.namespace) } td { a href={"/ui/tasks?state=running&namespace=" (encode(&t.namespace)) "&template=" (encode(&t.template))} { (t.template) } } td.num { (t.running) } }
                    }
                }
            }
        };
        Ok::<_, PageError>(layout(&viewer, "Queues", "/ui/queues", body))
    };
    match run.await {
        Ok(r) => r,
        Err(e) => e.page(Some(&viewer)),
    }
}

/// `GET /ui/workers`: the worker registry.
pub async fn workers(State(shared): State<Shared>, viewer: Viewer) -> Response {
    let run = async {
        let ws = service::workers::live(&shared).await?;
        let body = html! {
            h1 { "Workers" }
            p.hint { "Live workers (their last heartbeat within 3 intervals)." }
            @if ws.is_empty() { p #no-workers { "No live worker." } } @else {
                table #workers .list {
                    thead { tr { th { "Name" } th { "Host" } th { "SDK" } th { "Queues" } th { "Handlers" } th { "In flight" } th { "Last seen" } th { "Up since" } } }
                    tbody {
                        @for w in &ws {
                            tr.worker id={"worker-" (w.worker_id)} {
                                td { (w.name) } td { (w.host) } td { (w.sdk) " " (w.sdk_version) }
                                td { (w.queues.join(", ")) } td { (w.handlers.join(", ")) }
                                td.num { (w.in_flight) "/" (w.concurrency) } td { (time(w.last_seen)) } td { (time(w.first_seen)) }
                            }
                        }
                    }
                }
            }
        };
        Ok::<_, PageError>(layout(&viewer, "Workers", "/ui/workers", body))
    };
    match run.await {
        Ok(r) => r,
        Err(e) => e.page(Some(&viewer)),
    }
}

/// `GET /ui/templates`: every registered template version the viewer may see.
pub async fn templates(State(shared): State<Shared>, viewer: Viewer) -> Response {
    let run = async {
        let all = service::templates::list(&shared, &viewer.who, None).await?;
        let body = html! {
            h1 { "Templates" }
            table #templates .list {
                thead { tr { th { "Namespace" } th { "Name" } th { "Version" } th { "Steps" } th { "Registered" } th { "Description" } } }
                tbody {
                    @for t in all.iter().filter(|t| viewer.who.sees(&t.template.namespace)) {
                        tr.template {
                            td { (t.template.namespace) }
                            td { a href={"/ui/templates/" (t.template.namespace) "/" (t.template.name) "?version=" (t.template.version)} { (t.template.name) } }
                            td.num { (t.template.version) } td.num { (t.template.steps.len()) }
                            td { (time(t.created_at)) } td { (t.template.description.as_deref().unwrap_or("")) }
                        }
                    }
                }
            }
        };
        Ok::<_, PageError>(layout(&viewer, "Templates", "/ui/templates", body))
    };
    match run.await {
        Ok(r) => r,
        Err(e) => e.page(Some(&viewer)),
    }
}

#[derive(Deserialize)]
pub struct VersionQuery {
    version: Option<u32>,
}

/// The DAG nodes of a template.
pub fn template_nodes(t: &tasker_schemas::Template) -> Vec<Node> {
    let index: HashMap<&str, usize> = t
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    t.steps
        .iter()
        .map(|s| Node {
            name: s.name.clone(),
            parents: s
                .depends_on
                .iter()
                .filter_map(|p| index.get(p.as_str()).copied())
                .collect(),
            state: String::new(),
            sub: if let Some(m) = &s.map {
                format!("map over {}", m.over)
            } else if let Some(w) = &s.workflow {
                format!("workflow {}", w.name)
            } else if !s.decides.is_empty() {
                format!("{} · decides", s.handler)
            } else {
                s.handler.clone()
            },
            href: None,
            title: format!("{} ({})", s.name, s.handler),
        })
        .collect()
}

/// `GET /ui/templates/{namespace}/{name}?version=`: a version's DAG and its other versions.
pub async fn template(
    State(shared): State<Shared>,
    viewer: Viewer,
    Path((namespace, name)): Path<(String, String)>,
    Query(q): Query<VersionQuery>,
) -> Response {
    let run = async {
        if !viewer.who.sees(&namespace) {
            return Err(PageError::not_found(format!(
                "template {namespace}/{name} not found"
            )));
        }
        let t = service::templates::find(&shared, &namespace, &name, q.version).await?;
        let versions: Vec<u32> = service::templates::list(&shared, &viewer.who, Some(&namespace))
            .await?
            .iter()
            .filter(|v| v.template.name == name)
            .map(|v| v.template.version)
            .collect();
        let yaml = serde_json::to_value(&*t.template).unwrap_or_default();
        let body = html! {
            h1 { "Template " (namespace) "/" (name) " v" (t.template.version) }
            @if let Some(d) = &t.template.description { p { (d) } }
            p #versions { "Versions: "
                @for v in &versions {
                    @if *v == t.template.version { strong { (v) } } @else { a href={"/ui/templates/" (namespace) "/" (name) "?version=" (v)} { (v) } }
                    " "
                }
            }
            p { a href={"/ui/tasks?namespace=" (encode(&namespace)) "&template=" (encode(&name))} { "Tasks of this template" } }
            div #dag .dag-wrap { (dag::svg(&template_nodes(&t.template))) }
            @if let Some(f) = &t.template.on_failure { p { "On failure: handler " code { (f.handler) } } }
            details { summary { "Definition" } (json_block(&yaml, "#")) }
        };
        Ok(layout(
            &viewer,
            &format!("Template {namespace}/{name}"),
            "/ui/templates",
            body,
        ))
    };
    match run.await {
        Ok(r) => r,
        Err(e) => e.page(Some(&viewer)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q() -> TasksQuery {
        TasksQuery::default()
    }

    #[test]
    fn a_context_filter_needs_a_range_of_at_most_seven_days() {
        let now = parse_time("2026-12-02T12:00").unwrap();
        let mut x = q();
        x.field = Some("order".into());
        x.value = Some("42".into());
        let e = search_of(&x, None, now).unwrap_err();
        assert!(e.contains("needs a time range"), "{e}");
        x.from = Some("2026-11-20T00:00".into());
        let e = search_of(&x, None, now).unwrap_err();
        assert!(e.contains("at most 7 days"), "{e}");
        x.from = Some("2026-11-26T00:00".into());
        let s = search_of(&x, None, now).unwrap();
        assert_eq!(s.context, Some(("order".into(), "42".into())));
        assert_eq!(s.id_to, Some(id_bound(now, true)));
        x.value = None;
        assert!(search_of(&x, None, now).unwrap_err().contains("both"));
    }

    #[test]
    fn time_bounds_are_uuidv7_bounds() {
        let t = parse_time("2026-12-02T12:00:00Z").unwrap();
        let id = Uuid::now_v7();
        let lo = id_bound(t, false);
        let hi = id_bound(t, true);
        assert!(lo < hi);
        // An id made at that millisecond lies within.
        let ms = t.timestamp_millis() as u64;
        let mut b = *id.as_bytes();
        b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        let same_ms = Uuid::from_bytes(b);
        assert!(lo <= same_ms && same_ms <= hi);
        assert!(id_bound(t + chrono::Duration::milliseconds(1), false) > hi);
    }

    #[test]
    fn bad_filters_are_explained() {
        let now = Utc::now();
        let mut x = q();
        x.state = Some("sleeping".into());
        assert!(search_of(&x, None, now).is_err());
        let mut x = q();
        x.task = Some("nope".into());
        assert!(
            search_of(&x, None, now)
                .unwrap_err()
                .contains("not a task id")
        );
        let mut x = q();
        x.from = Some("2026-12-02".into());
        x.to = Some("2026-12-01".into());
        assert!(search_of(&x, None, now).unwrap_err().contains("empty"));
        let mut x = q();
        x.namespace = Some("bad name".into());
        assert!(search_of(&x, None, now).is_err());
        let mut x = q();
        x.limit = Some("100000".into());
        assert!(search_of(&x, None, now).unwrap_err().contains("limit"));
    }

    #[test]
    fn empty_fields_are_no_filter_and_the_scope_is_kept() {
        let mut x = q();
        x.state = Some(String::new());
        x.namespace = Some("  ".into());
        let scope = vec!["shop".to_owned()];
        let s = search_of(&x, Some(&scope), Utc::now()).unwrap();
        assert_eq!(s.state, None);
        assert_eq!(s.namespace, None);
        assert_eq!(s.scope, Some(scope));
    }

    #[test]
    fn the_next_link_keeps_the_filters() {
        let mut x = q();
        x.state = Some("failed".into());
        x.value = Some("a b&c".into());
        assert_eq!(
            query_with_after(&x, "X"),
            "state=failed&value=a%20b%26c&after=X"
        );
    }

    #[test]
    fn counters_are_read_per_namespace_and_outcome() {
        let text = "# TYPE x counter\ntasker_results_applied_total{namespace=\"shop\",outcome=\"succeeded\"} 12\ntasker_results_applied_total{namespace=\"shop\",outcome=\"failed\"} 2\nother 1\n";
        let m = counter_by(text, "tasker_results_applied_total");
        assert_eq!(m.get(&("shop".into(), "succeeded".into())), Some(&12.0));
        assert_eq!(m.len(), 2);
    }
}
