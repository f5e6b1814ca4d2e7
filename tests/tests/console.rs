//! The console's HTML routes (`/ui`, docs/console.md) against a real orchestrator, PostgreSQL
//! and RabbitMQ: pages answer, filters select the right tasks and refuse a too-wide context
//! search, keyset pages follow on, the DAG is SVG with a node per step in its state, live
//! updates arrive as server-sent events, actions need the CSRF token; with keys configured,
//! pages redirect to the sign-in, sessions carry the key's role (a `read` key sees no action
//! buttons and cannot act, nor see other namespaces), and revoking the key ends its session.

use anyhow::{Context, bail};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use serde_json::json;
use std::time::Duration;
use tasker_orchestrator::auth::{Principal, Role};
use tasker_orchestrator::service;
use tasker_schemas::api::SubmitTask;
use tasker_schemas::{TaskId, TaskState, Template};
use tasker_tests::Harness;

/// `a → b`, both on queue `default`.
fn chain(namespace: &str) -> Template {
    serde_json::from_value(json!({
        "namespace": namespace, "name": "chain", "version": 1,
        "steps": [
            { "name": "a", "handler": "ok" },
            { "name": "b", "handler": "ok", "depends_on": ["a"] }
        ]
    }))
    .expect("template")
}

/// One step on a queue no worker consumes: its tasks stay live.
fn stuck(namespace: &str) -> Template {
    serde_json::from_value(json!({
        "namespace": namespace, "name": "stuck", "version": 1,
        "steps": [ { "name": "wait", "handler": "nobody", "queue": "console_nobody" },
                   { "name": "after", "handler": "nobody", "queue": "console_nobody", "depends_on": ["wait"] } ]
    }))
    .expect("template")
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// A page: status, body and its `Set-Cookie` name=value pairs.
struct Page {
    status: StatusCode,
    location: Option<String>,
    cookies: Vec<(String, String, String)>,
    body: String,
}

async fn get(base: &str, path: &str, cookie: &str) -> anyhow::Result<Page> {
    let mut req = http().get(format!("{base}{path}"));
    if !cookie.is_empty() {
        req = req.header(COOKIE, cookie);
    }
    page(req.send().await?).await
}

async fn post(base: &str, path: &str, cookie: &str, form: &[(&str, &str)]) -> anyhow::Result<Page> {
    let body: Vec<String> = form
        .iter()
        .map(|(k, v)| format!("{}={}", urlencode(k), urlencode(v)))
        .collect();
    let mut req = http()
        .post(format!("{base}{path}"))
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(body.join("&"));
    if !cookie.is_empty() {
        req = req.header(COOKIE, cookie);
    }
    page(req.send().await?).await
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

async fn page(r: reqwest::Response) -> anyhow::Result<Page> {
    let status = r.status();
    let location = r
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let cookies = r
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| {
            let (kv, attrs) = v.split_once(';').unwrap_or((v, ""));
            let (k, val) = kv.split_once('=')?;
            Some((k.to_owned(), val.to_owned(), attrs.to_owned()))
        })
        .collect();
    let body = r.text().await?;
    Ok(Page {
        status,
        location,
        cookies,
        body,
    })
}

impl Page {
    fn cookie(&self, name: &str) -> Option<&str> {
        self.cookies
            .iter()
            .find(|(k, _, _)| k == name)
            .map(|(_, v, _)| v.as_str())
    }

    /// The CSRF token of the page's first form.
    fn csrf(&self) -> anyhow::Result<String> {
        let at = self
            .body
            .find(r#"name="csrf" value=""#)
            .context("no CSRF field on the page")?;
        let rest = &self.body[at + r#"name="csrf" value=""#.len()..];
        Ok(rest[..rest.find('"').context("unterminated")?].to_owned())
    }
}

async fn submit(
    h: &Harness,
    who: &Principal,
    ns: &str,
    template: &str,
    context: serde_json::Value,
) -> anyhow::Result<TaskId> {
    let req = SubmitTask {
        namespace: ns.into(),
        template: template.into(),
        version: None,
        context,
        idempotency_key: None,
        priority: 0,
        task_id: None,
        run_at: None,
        delay: None,
        deadline: None,
    };
    Ok(service::tasks::submit(&h.shared(0), who, &req, None)
        .await?
        .task_id)
}

async fn state_of(h: &Harness, id: TaskId) -> anyhow::Result<TaskState> {
    Ok(service::tasks::state(&h.shared(0), id).await?)
}

fn base(h: &Harness) -> String {
    h.client().base_url().trim_end_matches('/').to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_filters_dag_live_updates_and_csrf_without_keys() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let b = base(&h);
    let admin = Principal::anonymous();
    let shared = h.shared(0);
    service::templates::register(&shared, &admin, &chain("cons")).await?;
    service::templates::register(&shared, &admin, &stuck("cons")).await?;
    h.spawn_worker(
        h.worker("cons")
            .handler_fn("ok", |_ctx| async move { Ok(json!({"done": true})) }),
    )
    .await?;
    let mut done = Vec::new();
    for i in 0..3 {
        let id = submit(
            &h,
            &admin,
            "cons",
            "chain",
            json!({"order": format!("o-{i}")}),
        )
        .await?;
        h.wait(id).await?;
        done.push(id);
    }
    let live = submit(&h, &admin, "cons", "stuck", json!({"order": "o-live"})).await?;

    // Every page answers.
    for path in [
        "/ui/tasks",
        "/ui/queues",
        "/ui/workers",
        "/ui/templates",
        "/ui/templates/cons/chain",
    ] {
        let p = get(&b, path, "").await?;
        assert_eq!(p.status, StatusCode::OK, "{path}: {}", p.body);
    }
    let p = get(&b, "/ui", "").await?;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    // Authentication off: no sign-in.
    let p = get(&b, "/ui/login", "").await?;
    assert_eq!(p.status, StatusCode::SEE_OTHER);

    // The list: newest first, with exact live counts.
    let p = get(&b, "/ui/tasks", "").await?;
    let pos = |id: &TaskId| p.body.find(&format!("id=\"task-{id}\""));
    assert!(
        pos(&done[2]) < pos(&done[0]) && pos(&done[0]).is_some(),
        "{}",
        p.body
    );
    assert!(
        p.body
            .contains(r#"<span id="count-running">running <strong>1</strong>"#),
        "{}",
        p.body
    );
    // Filters.
    let p = get(&b, "/ui/tasks?state=completed", "").await?;
    assert!(done.iter().all(|id| p.body.contains(&id.to_string())));
    assert!(!p.body.contains(&live.to_string()));
    let p = get(&b, "/ui/tasks?template=stuck&namespace=cons", "").await?;
    assert!(p.body.contains(&live.to_string()) && !p.body.contains(&done[0].to_string()));
    let p = get(&b, &format!("/ui/tasks?task={}", done[1]), "").await?;
    assert_eq!(p.body.matches("class=\"task\"").count(), 1, "{}", p.body);
    // A context filter needs a time range of at most 7 days.
    let p = get(&b, "/ui/tasks?field=order&value=o-1", "").await?;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.body.contains("needs a time range"), "{}", p.body);
    let p = get(
        &b,
        "/ui/tasks?field=order&value=o-1&from=2020-01-01T00:00",
        "",
    )
    .await?;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.body.contains("at most 7 days"), "{}", p.body);
    let from = (chrono::Utc::now() - chrono::Duration::hours(1)).format("%Y-%m-%dT%H:%M");
    let p = get(
        &b,
        &format!("/ui/tasks?field=order&value=o-1&from={from}"),
        "",
    )
    .await?;
    assert_eq!(p.status, StatusCode::OK, "{}", p.body);
    assert_eq!(p.body.matches("class=\"task\"").count(), 1, "{}", p.body);
    assert!(p.body.contains(&done[1].to_string()));
    // Keyset pages: 2, then the rest through the `next` link.
    let p = get(&b, "/ui/tasks?limit=2", "").await?;
    assert_eq!(p.body.matches("class=\"task\"").count(), 2);
    let at = p
        .body
        .find(r#"id="next" rel="next" href=""#)
        .context("a next link")?;
    let rest = &p.body[at + r#"id="next" rel="next" href=""#.len()..];
    let next = rest[..rest.find('"').unwrap()].replace("&amp;", "&");
    let p2 = get(&b, &next, "").await?;
    assert_eq!(p2.body.matches("class=\"task\"").count(), 2, "{next}");
    assert!(!p2.body.contains("id=\"next\""));

    // The task page: the DAG as SVG with a node per step in its state.
    let p = get(&b, &format!("/ui/tasks/{}", done[0]), "").await?;
    assert_eq!(p.status, StatusCode::OK);
    assert!(p.body.contains("<svg class=\"dag\""));
    assert!(
        p.body.contains(r#"id="node-a" class="node st-succeeded""#),
        "{}",
        p.body
    );
    assert!(p.body.contains(r#"id="node-b" class="node st-succeeded""#));
    assert!(p.body.contains(r#"id="edge-a-b""#));
    assert!(
        p.body.contains("&quot;done&quot;: true"),
        "the output, pretty"
    );
    let p = get(&b, &format!("/ui/tasks/{live}"), "").await?;
    assert!(p.body.contains(r#"id="node-wait" class="node st-"#));
    assert!(p.body.contains("Why waiting"), "{}", p.body);
    assert!(p.body.contains("id=\"action-cancel\""));
    let p = get(&b, &format!("/ui/tasks/{}", TaskId::new()), "").await?;
    assert_eq!(p.status, StatusCode::NOT_FOUND);
    let p = get(&b, "/ui/tasks/not-an-id", "").await?;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);

    // Live updates: the current states, then the change, then the end.
    let mut sse = http()
        .get(format!("{b}/ui/tasks/{live}/events"))
        .send()
        .await?;
    assert_eq!(sse.status(), StatusCode::OK);
    assert!(
        sse.headers()[reqwest::header::CONTENT_TYPE]
            .to_str()?
            .starts_with("text/event-stream")
    );
    let mut seen = String::new();
    let read_until =
        async |sse: &mut reqwest::Response, seen: &mut String, what: &str| -> anyhow::Result<()> {
            tokio::time::timeout(Duration::from_secs(10), async {
                while !seen.contains(what) {
                    match sse.chunk().await? {
                        Some(c) => seen.push_str(&String::from_utf8_lossy(&c)),
                        None => bail!("the stream ended before {what:?}: {seen}"),
                    }
                }
                Ok(())
            })
            .await
            .with_context(|| format!("no {what:?} within 10 s: {seen}"))?
        };
    read_until(&mut sse, &mut seen, r#""name":"wait""#).await?;
    assert!(seen.contains("event: nodes"), "{seen}");

    // Acting needs the CSRF token: the confirmation page's form carries it (the double-submit
    // cookie, authentication being off).
    let confirm = get(&b, &format!("/ui/tasks/{live}/actions/cancel"), "").await?;
    assert_eq!(confirm.status, StatusCode::OK);
    let csrf_cookie = confirm
        .cookie("tasker_csrf")
        .context("a CSRF cookie")?
        .to_owned();
    let token = confirm.csrf()?;
    assert_eq!(token, csrf_cookie);
    let cookie = format!("tasker_csrf={csrf_cookie}");
    let path = format!("/ui/tasks/{live}/actions/cancel");
    let p = post(&b, &path, &cookie, &[("csrf", "forged")]).await?;
    assert_eq!(p.status, StatusCode::FORBIDDEN);
    let p = post(&b, &path, "", &[("csrf", &token)]).await?;
    assert_eq!(
        p.status,
        StatusCode::FORBIDDEN,
        "a token without its cookie"
    );
    assert_eq!(state_of(&h, live).await?, TaskState::Running);
    let p = post(
        &b,
        &path,
        &cookie,
        &[("csrf", &token), ("reason", "from the test")],
    )
    .await?;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
    assert_eq!(state_of(&h, live).await?, TaskState::Cancelled);
    read_until(&mut sse, &mut seen, r#""state":"cancelled""#).await?;
    read_until(&mut sse, &mut seen, "event: end").await?;

    // Bulk: the count first, then the action on exactly that many.
    let live2 = submit(&h, &admin, "cons", "stuck", json!({})).await?;
    let form = [
        ("csrf", token.as_str()),
        ("action", "cancel"),
        ("state", "running"),
        ("namespace", "cons"),
    ];
    let p = post(&b, "/ui/tasks/bulk", &cookie, &form).await?;
    assert_eq!(p.status, StatusCode::OK, "{}", p.body);
    assert!(
        p.body.contains(r#"<p id="bulk-count"><strong>1</strong>"#),
        "{}",
        p.body
    );
    assert_eq!(
        state_of(&h, live2).await?,
        TaskState::Running,
        "nothing before the confirmation"
    );
    let mut confirmed = form.to_vec();
    confirmed.push(("expected", "1"));
    let p = post(&b, "/ui/tasks/bulk", &cookie, &confirmed).await?;
    assert!(p.body.contains("1 acted on"), "{}", p.body);
    assert_eq!(state_of(&h, live2).await?, TaskState::Cancelled);
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_in_sessions_roles_and_revocation() -> anyhow::Result<()> {
    let h = Harness::start_with(|c| c.api_keys = vec!["console-bootstrap-key".into()]).await?;
    let b = base(&h);
    let shared = h.shared(0);
    let boot = Principal::bootstrap();
    service::templates::register(&shared, &boot, &stuck("cons")).await?;
    service::templates::register(&shared, &boot, &stuck("other")).await?;
    let mine = submit(&h, &boot, "cons", "stuck", json!({})).await?;
    let theirs = submit(&h, &boot, "other", "stuck", json!({})).await?;
    let reader = service::keys::create(
        &shared,
        &boot,
        "reader",
        Role::Read,
        Some(vec!["cons".into()]),
    )
    .await?;
    let operator = service::keys::create(
        &shared,
        &boot,
        "operator",
        Role::Operate,
        Some(vec!["cons".into()]),
    )
    .await?;

    // Signed out: every page goes to the sign-in, which comes back after.
    let p = get(&b, "/ui/tasks?state=running", "").await?;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    assert_eq!(
        p.location.as_deref(),
        Some("/ui/login?next=/ui/tasks%3Fstate%3Drunning")
    );
    let p = get(&b, &format!("/ui/tasks/{mine}/events"), "").await?;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    let p = post(
        &b,
        &format!("/ui/tasks/{mine}/actions/cancel"),
        "",
        &[("csrf", "x")],
    )
    .await?;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    assert_eq!(state_of(&h, mine).await?, TaskState::Running);
    let p = get(&b, "/ui/tasks/bogus", "tasker_session=forged").await?;
    assert_eq!(p.status, StatusCode::SEE_OTHER);

    let sign_in = async |key: &str| -> anyhow::Result<Page> {
        let form = get(&b, "/ui/login?next=/ui/tasks", "").await?;
        assert_eq!(form.status, StatusCode::OK);
        assert!(form.body.contains("id=\"login-form\""));
        let csrf = form
            .cookie("tasker_csrf")
            .context("a CSRF cookie")?
            .to_owned();
        post(
            &b,
            "/ui/login",
            &format!("tasker_csrf={csrf}"),
            &[("key", key), ("csrf", &csrf), ("next", "/ui/tasks")],
        )
        .await
    };
    let p = sign_in("tsk_wrong").await?;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    assert!(
        p.location
            .as_deref()
            .unwrap_or("")
            .starts_with("/ui/login?error=key")
    );
    assert!(p.cookie("tasker_session").is_none());
    // The sign-in form refuses a post without its CSRF cookie.
    let p = post(
        &b,
        "/ui/login",
        "",
        &[("key", &reader.token), ("csrf", "x")],
    )
    .await?;
    assert!(p.cookie("tasker_session").is_none());

    let p = sign_in(&reader.token).await?;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
    assert_eq!(p.location.as_deref(), Some("/ui/tasks"));
    let (_, session, attrs) = p
        .cookies
        .iter()
        .find(|(k, _, _)| k == "tasker_session")
        .context("a session cookie")?;
    assert!(
        attrs.contains("HttpOnly")
            && attrs.contains("SameSite=Strict")
            && attrs.contains("Path=/ui"),
        "{attrs}"
    );
    let reader_cookie = format!("tasker_session={session}");
    // The key itself is not stored, only hashes.
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM console_sessions WHERE position(convert_to($1, 'UTF8') in key_hash) > 0")
        .bind(&reader.token)
        .fetch_one(&h.db)
        .await?;
    assert_eq!(stored, 0);

    // A read key: its namespace only, no action buttons, and acting is refused.
    let p = get(&b, "/ui/tasks", &reader_cookie).await?;
    assert_eq!(p.status, StatusCode::OK);
    assert!(p.body.contains(&mine.to_string()) && !p.body.contains(&theirs.to_string()));
    assert!(p.body.contains(r#"<span id="role">read</span>"#));
    assert!(!p.body.contains("id=\"bulk\""));
    let p = get(&b, &format!("/ui/tasks/{mine}"), &reader_cookie).await?;
    assert_eq!(p.status, StatusCode::OK);
    assert!(
        !p.body.contains("id=\"action-cancel\""),
        "no buttons for read"
    );
    let read_csrf = p.csrf()?;
    let p = post(
        &b,
        &format!("/ui/tasks/{mine}/actions/cancel"),
        &reader_cookie,
        &[("csrf", &read_csrf)],
    )
    .await?;
    assert_eq!(p.status, StatusCode::FORBIDDEN, "{}", p.body);
    assert_eq!(state_of(&h, mine).await?, TaskState::Running);
    let p = get(&b, &format!("/ui/tasks/{theirs}"), &reader_cookie).await?;
    assert_eq!(p.status, StatusCode::NOT_FOUND);

    // An operate key: the buttons, and the action with its session's token only.
    let p = sign_in(&operator.token).await?;
    let (_, session, _) = p
        .cookies
        .iter()
        .find(|(k, _, _)| k == "tasker_session")
        .context("a session cookie")?;
    let op_cookie = format!("tasker_session={session}");
    let p = get(&b, &format!("/ui/tasks/{mine}"), &op_cookie).await?;
    assert!(p.body.contains("id=\"action-cancel\""));
    let op_csrf = p.csrf()?;
    assert_ne!(op_csrf, read_csrf);
    let path = format!("/ui/tasks/{mine}/actions/cancel");
    let p = post(&b, &path, &op_cookie, &[("csrf", &read_csrf)]).await?;
    assert_eq!(p.status, StatusCode::FORBIDDEN, "another session's token");
    let p = post(&b, &path, &op_cookie, &[("csrf", &op_csrf)]).await?;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
    assert_eq!(state_of(&h, mine).await?, TaskState::Cancelled);
    // Who acted is in the task's history.
    let p = get(&b, &format!("/ui/tasks/{mine}"), &op_cookie).await?;
    assert!(p.body.contains("class=\"actor\">key:"), "{}", p.body);

    // Revoking the read key ends its session at once; signing out ends the other.
    service::keys::revoke(&shared, &boot, reader.key.id).await?;
    let p = get(&b, "/ui/tasks", &reader_cookie).await?;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    let p = post(&b, "/ui/logout", &op_cookie, &[("csrf", &op_csrf)]).await?;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    let p = get(&b, "/ui/tasks", &op_cookie).await?;
    assert_eq!(p.status, StatusCode::SEE_OTHER);
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_actions_mapped_nodes_templates_and_dead_letters_from_the_pages() -> anyhow::Result<()>
{
    use tasker_tests::tasker_worker::StepError;
    let h = Harness::start().await?;
    let b = base(&h);
    let admin = Principal::anonymous();
    let shared = h.shared(0);
    let flaky: Template = serde_json::from_value(json!({
        "namespace": "cons", "name": "flaky", "version": 1,
        "steps": [
            { "name": "first", "handler": "boom", "retry": { "max_attempts": 1 } },
            { "name": "second", "handler": "ok", "depends_on": ["first"] }
        ]
    }))?;
    let mapped: Template = serde_json::from_value(json!({
        "namespace": "cons", "name": "mapped", "version": 1,
        "steps": [
            { "name": "list", "handler": "list" },
            { "name": "each", "handler": "ok", "depends_on": ["list"], "map": { "over": "list.items" } }
        ]
    }))?;
    service::templates::register(&shared, &admin, &flaky).await?;
    service::templates::register(&shared, &admin, &mapped).await?;
    h.spawn_worker(
        h.worker("cons")
            .handler_fn("boom", |_ctx| async move {
                Err(StepError::permanent("no such order"))
            })
            .handler_fn("ok", |_ctx| async move { Ok(json!({"ok": true})) })
            .handler_fn(
                "list",
                |_ctx| async move { Ok(json!({"items": [1, 2, 3]})) },
            ),
    )
    .await?;

    // A failed step: its actions are offered; "mark succeeded" with an output finishes the task.
    let id = submit(&h, &admin, "cons", "flaky", json!({})).await?;
    assert_eq!(h.wait(id).await?.state, TaskState::Failed);
    let p = get(&b, &format!("/ui/tasks/{id}"), "").await?;
    assert!(
        p.body.contains(r#"id="node-first" class="node st-failed""#),
        "{}",
        p.body
    );
    assert!(
        p.body
            .contains(r#"id="node-second" class="node st-skipped""#)
    );
    for button in [
        "action-retry",
        "action-retry-step-first",
        "action-mark-succeeded-first",
        "action-rerun-from-first",
    ] {
        assert!(p.body.contains(&format!("id=\"{button}\"")), "{button}");
    }
    assert!(p.body.contains("no such order"), "the error is shown");
    let confirm = get(
        &b,
        &format!("/ui/tasks/{id}/actions/mark-succeeded?step=first"),
        "",
    )
    .await?;
    assert!(confirm.body.contains("id=\"output\""));
    let token = confirm.csrf()?;
    let cookie = format!(
        "tasker_csrf={}",
        confirm.cookie("tasker_csrf").context("cookie")?
    );
    let path = format!("/ui/tasks/{id}/actions/mark-succeeded");
    let p = post(
        &b,
        &path,
        &cookie,
        &[("csrf", &token), ("step", "first"), ("output", "not json")],
    )
    .await?;
    assert_eq!(p.status, StatusCode::BAD_REQUEST);
    assert!(p.body.contains("not JSON"));
    let p = post(
        &b,
        &path,
        &cookie,
        &[
            ("csrf", &token),
            ("step", "first"),
            ("output", r#"{"manual": 1}"#),
        ],
    )
    .await?;
    assert_eq!(p.status, StatusCode::SEE_OTHER, "{}", p.body);
    assert_eq!(h.wait(id).await?.state, TaskState::Completed);
    let p = get(&b, &format!("/ui/tasks/{id}"), "").await?;
    assert!(
        p.body
            .contains(r#"id="node-first" class="node st-succeeded""#)
    );
    assert!(p.body.contains("&quot;manual&quot;: 1"));
    assert!(
        p.body.contains(r#"class="actor">anonymous"#),
        "who acted, in the history: {}",
        p.body
    );
    // A step action the state does not allow is refused, with the reason.
    let p = post(
        &b,
        &format!("/ui/tasks/{id}/actions/retry-step"),
        &cookie,
        &[("csrf", &token), ("step", "first")],
    )
    .await?;
    assert_eq!(p.status, StatusCode::CONFLICT, "{}", p.body);

    // A mapped step is one node with its instances' counts.
    let id = submit(&h, &admin, "cons", "mapped", json!({})).await?;
    assert_eq!(h.wait(id).await?.state, TaskState::Completed);
    let p = get(&b, &format!("/ui/tasks/{id}"), "").await?;
    assert_eq!(p.body.matches("id=\"node-each\"").count(), 1);
    assert!(p.body.contains("map 3✓ 0▶ 0✗ / 3"), "{}", p.body);

    // A template's picture.
    let p = get(&b, "/ui/templates/cons/flaky?version=1", "").await?;
    assert_eq!(p.status, StatusCode::OK);
    assert!(
        p.body.contains(r#"id="node-first" class="node""#)
            && p.body.contains(r#"id="edge-first-second""#)
    );
    let p = get(&b, "/ui/templates/cons/nothing", "").await?;
    assert_eq!(p.status, StatusCode::NOT_FOUND);

    // Dead letters: listed, filtered, shown, discarded after a confirmation.
    service::dead_letters::record(
        &shared,
        &tasker_orchestrator::store::dead_letters::NewDeadLetter {
            kind: "task_request",
            reason: "unreadable task request: expected value".into(),
            exchange: "t.tasks".into(),
            routing_key: "cons".into(),
            message_id: Some("console-test-1".into()),
            headers: json!({"x-tasker-reason": "unreadable"}),
            body: b"{not json".to_vec(),
            body_bytes: 9,
            namespace: Some("cons".into()),
            task_id: None,
            step: None,
        },
    )
    .await?;
    let p = get(&b, "/ui/dead-letters", "").await?;
    assert_eq!(p.status, StatusCode::OK);
    let at = p
        .body
        .find("class=\"dead-letter\" id=\"dl-")
        .context("a dead letter row")?;
    let rest = &p.body[at + "class=\"dead-letter\" id=\"dl-".len()..];
    let dl = rest[..rest.find('"').unwrap()].to_owned();
    let p = get(&b, "/ui/dead-letters?kind=step", "").await?;
    assert!(p.body.contains("id=\"no-dead-letters\""));
    let p = get(&b, &format!("/ui/dead-letters/{dl}"), "").await?;
    assert!(p.body.contains("unreadable task request") && p.body.contains("{not json"));
    let token = p.csrf()?;
    let cookie = format!(
        "tasker_csrf={}",
        p.cookie("tasker_csrf")
            .map(str::to_owned)
            .unwrap_or_else(|| token.clone())
    );
    let p = post(
        &b,
        "/ui/dead-letters/act",
        &cookie,
        &[("csrf", &token), ("action", "discard"), ("id", &dl)],
    )
    .await?;
    assert!(
        p.body.contains(r#"<strong id="dl-count">1</strong>"#),
        "{}",
        p.body
    );
    let p = post(
        &b,
        "/ui/dead-letters/act",
        &cookie,
        &[
            ("csrf", &token),
            ("action", "discard"),
            ("id", &dl),
            ("confirmed", "yes"),
        ],
    )
    .await?;
    assert!(
        p.body.contains(r#"<td class="outcome">discarded</td>"#),
        "{}",
        p.body
    );
    let p = get(&b, "/ui/dead-letters", "").await?;
    assert!(p.body.contains("id=\"no-dead-letters\""));
    h.finish().await;
    Ok(())
}
