//! Tenancy: scoped API keys (each role allowed and refused on each route, namespaces, revoked
//! keys), the audit log, purge, per-namespace retention, protected /metrics.

use serde_json::{Value, json};
use std::time::Duration;
use tasker_schemas::api::{CreateKey, SubmitTask};
use tasker_schemas::{StepState, TaskId, TaskState};
use tasker_tests::Harness;
use tasker_tests::tasker_worker::client::{AuditQuery, Client, ClientError};
use tokio_util::sync::CancellationToken;

const BOOT: &str = "boot-admin-key-for-tests";

fn template(namespace: &str, name: &str) -> String {
    format!(
        "namespace: {namespace}
name: {name}
version: 1
steps:
  - {{ name: first, handler: echo }}
  - {{ name: second, handler: echo, depends_on: [first] }}
"
    )
}

/// A template whose step no worker runs: its tasks stay running.
fn stuck(namespace: &str) -> String {
    format!(
        "namespace: {namespace}
name: stuck
version: 1
steps:
  - {{ name: wait, handler: nobody_runs_this, queue: nobody }}
"
    )
}

fn parse(yaml: &str) -> tasker_schemas::Template {
    tasker_orchestrator::service::templates::parse_template(yaml).expect("template")
}

async fn key(h: &Harness, role: &str, namespaces: &[&str], name: &str) -> anyhow::Result<Client> {
    let created = h
        .client()
        .create_key(&CreateKey {
            name: name.into(),
            role: role.into(),
            namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
        })
        .await?;
    assert!(created.token.starts_with("tsk_"), "{}", created.token);
    assert_eq!(created.key.role, role);
    Ok(Client::builder(h.http_url(0))
        .api_key(created.token)
        .build()?)
}

/// The HTTP status of a client call's error; 200 for success.
fn status<T>(r: Result<T, ClientError>) -> u16 {
    match r {
        Ok(_) => 200,
        Err(ClientError::Api { status, .. }) => status,
        Err(e) => panic!("not an API answer: {e}"),
    }
}

fn submit(namespace: &str, template: &str) -> SubmitTask {
    serde_json::from_value(json!({
        "namespace": namespace, "template": template, "context": {"who": "alice@example.com"}
    }))
    .expect("submit body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_is_allowed_and_refused_on_each_route() -> anyhow::Result<()> {
    let h = Harness::start_with(|c| c.api_keys = vec![BOOT.into()]).await?;
    for ns in ["a", "b"] {
        h.register_yaml(&stuck(ns)).await?;
    }
    let in_a = h.submit("a", "stuck", json!({})).await?;
    let in_b = h.submit("b", "stuck", json!({})).await?;

    // No key, an unknown key: 401 with the JSON error.
    let anonymous = Client::new(h.http_url(0));
    match anonymous.task(in_a).await {
        Err(ClientError::Api {
            status,
            code,
            message,
            ..
        }) => {
            assert_eq!((status, code.as_str()), (401, "unauthorized"));
            assert!(message.contains("Authorization: Bearer"), "{message}");
        }
        other => panic!("expected 401, got {other:?}"),
    }
    let unknown = Client::builder(h.http_url(0)).api_key("tsk_nope").build()?;
    assert_eq!(status(unknown.task(in_a).await), 401);

    let read = key(&h, "read", &["a"], "reader").await?;
    let submitter = key(&h, "submit", &["a"], "submitter").await?;
    let operator = key(&h, "operate", &["a"], "operator").await?;
    let admin_a = key(&h, "admin", &["a"], "admin-a").await?;

    // read: sees a's tasks and templates, nothing of b, changes nothing.
    assert_eq!(status(read.task(in_a).await), 200);
    assert_eq!(status(read.task(in_b).await), 403);
    let listed = read.list(&Default::default()).await?;
    assert!(!listed.tasks.is_empty());
    assert!(
        listed.tasks.iter().all(|t| t.namespace == "a"),
        "{listed:?}"
    );
    let templates = read.templates(None).await?;
    assert!(
        templates.iter().all(|t| t.namespace == "a"),
        "{templates:?}"
    );
    assert_eq!(status(read.templates(Some("b")).await), 403);
    assert_eq!(status(read.submit(&submit("a", "stuck")).await), 403);
    assert_eq!(status(read.cancel(in_a, None).await), 403);
    assert_eq!(status(read.keys(false).await), 403);
    assert_eq!(status(read.audit(&AuditQuery::default()).await), 200);

    // submit: submits in a only; cannot cancel.
    assert_eq!(status(submitter.submit(&submit("a", "stuck")).await), 200);
    assert_eq!(status(submitter.submit(&submit("b", "stuck")).await), 403);
    assert_eq!(status(submitter.cancel(in_a, None).await), 403);

    // operate: cancels and retries in a, not in b; registers nothing, purges nothing.
    assert_eq!(status(operator.cancel(in_b, None).await), 403);
    let cancelled = operator.cancel(in_a, Some("operator test")).await?;
    assert_eq!(cancelled.state, TaskState::Cancelled);
    assert_eq!(status(operator.retry(in_a).await), 200);
    let yaml = parse(&template("a", "t2"));
    assert_eq!(status(operator.register_template(&yaml).await), 403);
    assert_eq!(status(operator.purge(in_a).await), 403);
    assert_eq!(status(operator.keys(false).await), 403);

    // Signals need operate (the task waits for none: 409 once allowed); schedules need operate
    // to manage and read to see, each in its namespace.
    let live = h.submit("a", "stuck", json!({})).await?;
    assert_eq!(
        status(read.signal(live, "approval", "s1", json!({})).await),
        403
    );
    assert_eq!(
        status(submitter.signal(live, "approval", "s1", json!({})).await),
        403
    );
    assert_eq!(
        status(operator.signal(live, "approval", "s1", json!({})).await),
        409
    );
    assert_eq!(
        status(operator.signal(in_b, "approval", "s1", json!({})).await),
        403
    );
    let schedule = |ns: &str| -> tasker_schemas::api::CreateSchedule {
        serde_json::from_value(json!({"namespace": ns, "template": "stuck", "cron": "0 2 * * *"}))
            .expect("schedule body")
    };
    assert_eq!(status(read.create_schedule(&schedule("a")).await), 403);
    assert_eq!(status(operator.create_schedule(&schedule("b")).await), 403);
    let made = operator.create_schedule(&schedule("a")).await?;
    assert_eq!(status(read.pause_schedule(made.id).await), 403);
    assert_eq!(status(operator.pause_schedule(made.id).await), 200);
    h.client().create_schedule(&schedule("b")).await?;
    let seen = read.schedules(None).await?;
    assert_eq!(seen.schedules.len(), 1, "{seen:?}");
    assert!(seen.schedules.iter().all(|s| s.namespace == "a"));
    assert_eq!(status(read.schedules(Some("b")).await), 403);

    // admin of a: templates and keys within a only.
    assert_eq!(status(admin_a.register_template(&yaml).await), 200);
    let yaml_b = parse(&template("b", "t2"));
    assert_eq!(status(admin_a.register_template(&yaml_b).await), 403);
    let grant = |role: &str, ns: &[&str]| CreateKey {
        name: String::new(),
        role: role.into(),
        namespaces: ns.iter().map(|s| s.to_string()).collect(),
    };
    assert_eq!(
        status(admin_a.create_key(&grant("submit", &["a"])).await),
        200
    );
    assert_eq!(
        status(admin_a.create_key(&grant("submit", &["b"])).await),
        403
    );
    assert_eq!(
        status(admin_a.create_key(&grant("read", &["*"])).await),
        403
    );
    let keys = admin_a.keys(false).await?;
    assert!(
        keys.keys.iter().all(|k| k.namespaces == ["a"]),
        "a scoped admin lists only its namespace's keys: {keys:?}"
    );
    // Bad key requests: clear 400s.
    assert_eq!(
        status(h.client().create_key(&grant("root", &["a"])).await),
        400
    );
    assert_eq!(
        status(h.client().create_key(&grant("read", &["*", "a"])).await),
        400
    );
    assert_eq!(
        status(h.client().create_key(&grant("read", &[])).await),
        400
    );

    // /metrics and /ready are open unless protected.
    let http = reqwest::Client::new();
    let url = h.http_url(0);
    assert_eq!(
        http.get(format!("{url}/metrics")).send().await?.status(),
        200
    );
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_keys_are_refused_and_every_operator_action_is_audited() -> anyhow::Result<()> {
    let h = Harness::start_with(|c| c.api_keys = vec![BOOT.into()]).await?;
    h.register_yaml(&stuck("shop")).await?;
    let operator = key(&h, "operate", &["shop"], "night-shift").await?;
    let task = h.submit("shop", "stuck", json!({})).await?;
    operator.cancel(task, Some("stuck for hours")).await?;
    operator.retry(task).await?;

    // The task's audit trail: who cancelled and retried it, newest first.
    let trail = h
        .client()
        .audit(&AuditQuery {
            task_id: Some(task),
            ..Default::default()
        })
        .await?;
    let actions: Vec<&str> = trail.entries.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["task.retry", "task.cancel"], "{trail:#?}");
    for e in &trail.entries {
        assert!(
            e.actor.starts_with("key:") && e.actor.ends_with("(night-shift)"),
            "{e:?}"
        );
        assert!(e.key_id.is_some());
        assert_eq!(e.namespace.as_deref(), Some("shop"));
    }
    assert_eq!(trail.entries[1].detail["reason"], "stuck for hours");

    // Key changes and template registrations are audited too (by the bootstrap key).
    let all = h.client().audit(&AuditQuery::default()).await?;
    let has = |action: &str, actor: &str| {
        all.entries
            .iter()
            .any(|e| e.action == action && e.actor == actor)
    };
    assert!(has("key.create", "bootstrap"), "{all:#?}");
    assert!(has("template.register", "bootstrap"), "{all:#?}");

    // Revoked: refused at once with 401, and the revocation is audited.
    let listed = h.client().keys(false).await?;
    let id = listed
        .keys
        .iter()
        .find(|k| k.name == "night-shift")
        .expect("the key")
        .id;
    let revoked = h.client().revoke_key(id).await?;
    assert!(revoked.revoked_at.is_some());
    match operator.task(task).await {
        Err(ClientError::Api {
            status, message, ..
        }) => {
            assert_eq!(status, 401);
            assert!(message.contains("revoked"), "{message}");
        }
        other => panic!("expected 401, got {other:?}"),
    }
    assert!(
        !h.client()
            .keys(false)
            .await?
            .keys
            .iter()
            .any(|k| k.id == id)
    );
    assert!(h.client().keys(true).await?.keys.iter().any(|k| k.id == id));
    let after = h
        .client()
        .audit(&AuditQuery {
            action: Some("key.revoke".into()),
            ..Default::default()
        })
        .await?;
    assert_eq!(after.entries.len(), 1, "{after:#?}");
    assert_eq!(after.entries[0].detail["key_id"], json!(id));
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_erases_payloads_and_keeps_states_and_history() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(&template("shop", "order")).await?;
    h.register_yaml(&stuck("shop")).await?;
    h.spawn_worker(h.worker("shop").handler_fn("echo", |ctx| async move {
        Ok(json!({"email": ctx.context()["who"], "step": ctx.step()}))
    }))
    .await?;
    let done = h
        .run("shop", "order", json!({"who": "alice@example.com"}))
        .await?;
    assert_eq!(done.state, TaskState::Completed);
    assert_eq!(done.context["who"], "alice@example.com");

    let purged = h.client().purge(done.id).await?;
    assert!(purged.purged_at.is_some());
    assert_eq!(purged.state, TaskState::Completed);
    assert_eq!(purged.context, json!({}));
    assert_eq!(purged.output, None);
    assert_eq!(purged.steps.len(), 2);
    for s in &purged.steps {
        assert_eq!(s.state, StepState::Succeeded, "{s:?}");
        assert_eq!(s.output, None, "{s:?}");
    }
    // Nothing of the payloads is left anywhere in the task's rows.
    let text: String = sqlx::query_scalar(
        "SELECT coalesce(string_agg(row_to_json(x)::text, ' '), '') FROM (
             SELECT context, output FROM tasks WHERE id = $1
             UNION ALL SELECT null, output FROM steps WHERE task_id = $1) x",
    )
    .bind(done.id.0)
    .fetch_one(&h.db)
    .await?;
    assert!(!text.contains("alice"), "{text}");
    // Again: a no-op. A purged task cannot run again; a live one cannot be purged.
    assert!(h.client().purge(done.id).await?.purged_at == purged.purged_at);
    assert_eq!(status(h.client().retry(done.id).await), 409);
    let live = h.submit("shop", "stuck", json!({})).await?;
    assert_eq!(status(h.client().purge(live).await), 409);
    let audit = h
        .client()
        .audit(&AuditQuery {
            task_id: Some(done.id),
            ..Default::default()
        })
        .await?;
    assert_eq!(audit.entries.len(), 2, "{audit:#?}");
    assert!(audit.entries.iter().all(|e| e.action == "task.purge"));
    assert_eq!(status(h.client().purge(TaskId::new()).await), 404);
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_retention_overrides_the_global_one() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    for ns in ["short", "long"] {
        h.register_yaml(&template(ns, "order")).await?;
    }
    h.spawn_worker(
        h.worker("short")
            .namespace("long")
            .handler_fn("echo", |_ctx| async move { Ok(json!({"ok": true})) }),
    )
    .await?;
    let short = h.run("short", "order", json!({})).await?;
    let long = h.run("long", "order", json!({})).await?;
    assert_eq!(
        status(h.client().set_retention("short", Some(0)).await),
        400
    );
    let set = h.client().set_retention("short", Some(1)).await?;
    assert_eq!(set.retention_ms, Some(1));
    let listed = h.client().namespaces().await?;
    assert_eq!(listed.namespaces.len(), 1);
    tokio::time::sleep(Duration::from_millis(20)).await;

    // The global retention is 7 days: only the namespace with 1 ms loses its task.
    let shared = h.shared(0);
    let gone = tasker_orchestrator::service::reconcile::prune(
        &shared,
        100,
        Duration::from_secs(5),
        &CancellationToken::new(),
    )
    .await?;
    assert_eq!(gone, 1);
    assert_eq!(status(h.client().task(short.id).await), 404);
    assert_eq!(h.client().task(long.id).await?.state, TaskState::Completed);

    // Cleared: back to the global retention.
    let cleared = h.client().set_retention("short", None).await?;
    assert_eq!(cleared.retention_ms, None);
    let again = h.run("short", "order", json!({})).await?;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let gone = tasker_orchestrator::service::reconcile::prune(
        &shared,
        100,
        Duration::from_secs(5),
        &CancellationToken::new(),
    )
    .await?;
    assert_eq!(gone, 0);
    assert_eq!(h.client().task(again.id).await?.state, TaskState::Completed);
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_metrics_and_ready_need_a_key() -> anyhow::Result<()> {
    let h = Harness::start_with(|c| {
        c.api_keys = vec![BOOT.into()];
        c.protect_metrics = true;
    })
    .await?;
    let http = reqwest::Client::new();
    let url = h.http_url(0);
    for path in ["/metrics", "/ready"] {
        let r = http.get(format!("{url}{path}")).send().await?;
        assert_eq!(r.status(), 401, "{path}");
        let body: Value = r.json().await?;
        assert_eq!(body["error"]["code"], "unauthorized");
        let r = http
            .get(format!("{url}{path}"))
            .bearer_auth(BOOT)
            .send()
            .await?;
        assert_eq!(r.status(), 200, "{path}");
    }
    // /health stays open (a liveness probe has no key).
    assert_eq!(
        http.get(format!("{url}/health")).send().await?.status(),
        200
    );
    h.finish().await;
    Ok(())
}
