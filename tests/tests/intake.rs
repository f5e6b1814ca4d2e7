//! Submitting tasks and registering templates: idempotency, validation, clear errors.

use serde_json::json;
use tasker_schemas::TaskState;
use tasker_schemas::api::SubmitTask;
use tasker_tests::Harness;
use tasker_tests::tasker_worker::{ClientError, amqp_submit};

const TEMPLATE: &str =
    "namespace: t\nname: one\nversion: 1\nsteps:\n  - { name: s, handler: echo }\n";

fn submit(key: Option<&str>, context: serde_json::Value) -> SubmitTask {
    SubmitTask {
        namespace: "t".into(),
        template: "one".into(),
        version: None,
        context,
        idempotency_key: key.map(String::from),
        priority: 0,
        task_id: None,
        run_at: None,
        delay: None,
        deadline: None,
    }
}

fn api_code(e: &ClientError) -> (u16, String, String) {
    match e {
        ClientError::Api {
            status,
            code,
            message,
            ..
        } => (*status, code.clone(), message.clone()),
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_submit_same_body_same_task_different_body_conflict() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(TEMPLATE).await?;
    let c = h.client();
    let first = c.submit(&submit(Some("order-1"), json!({"a": 1}))).await?;
    assert!(first.created);
    let again = c.submit(&submit(Some("order-1"), json!({"a": 1}))).await?;
    assert_eq!((again.task_id, again.created), (first.task_id, false));
    let err = c
        .submit(&submit(Some("order-1"), json!({"a": 2})))
        .await
        .unwrap_err();
    let (status, code, message) = api_code(&err);
    assert_eq!((status, code.as_str()), (409, "idempotency_conflict"));
    assert!(message.contains(&first.task_id.to_string()), "{message}");
    assert!(matches!(err, ClientError::Api { task_id: Some(id), .. } if id == first.task_id));
    // Keys are scoped to the namespace: the same key elsewhere is a new task.
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&h.db)
        .await?;
    assert_eq!(n, 1);
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_duplicates_create_one_task() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(TEMPLATE).await?;
    let c = h.client();
    let mut joins = Vec::new();
    for _ in 0..20 {
        let c = c.clone();
        joins.push(tokio::spawn(async move {
            c.submit(&submit(Some("dup"), json!({"x": true}))).await
        }));
    }
    let mut ids = std::collections::HashSet::new();
    let mut created = 0;
    for j in joins {
        let r = j.await??;
        ids.insert(r.task_id);
        created += usize::from(r.created);
    }
    assert_eq!(ids.len(), 1, "all duplicates must name one task");
    assert_eq!(created, 1, "exactly one submit creates it");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&h.db)
        .await?;
    let steps: i64 = sqlx::query_scalar("SELECT count(*) FROM steps")
        .fetch_one(&h.db)
        .await?;
    assert_eq!((n, steps), (1, 1));
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(TEMPLATE).await?;
    let c = h.client();

    // Oversized context: 413 naming the limit; nothing stored.
    let big = json!({"blob": "x".repeat(300 * 1024)});
    let (status, code, message) = api_code(&c.submit(&submit(None, big)).await.unwrap_err());
    assert_eq!((status, code.as_str()), (413, "payload_too_large"));
    assert!(
        message.contains("context") && message.contains("262144"),
        "{message}"
    );

    // Unknown template: 404.
    let mut req = submit(None, json!({}));
    req.template = "nope".into();
    let (status, code, message) = api_code(&c.submit(&req).await.unwrap_err());
    assert_eq!((status, code.as_str()), (404, "template_not_found"));
    assert!(message.contains("nope"), "{message}");

    // A bad namespace is the request's fault: 400 invalid_request (not invalid_template).
    let mut req = submit(None, json!({}));
    req.namespace = "Bad Namespace!".into();
    let (status, code, message) = api_code(&c.submit(&req).await.unwrap_err());
    assert_eq!(
        (status, code.as_str()),
        (400, "invalid_request"),
        "{message}"
    );
    assert!(message.contains("namespace"), "{message}");

    // A NUL in the context: 400.
    let (status, _, message) = api_code(
        &c.submit(&submit(None, json!({"k": "a\u{0}b"})))
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 400);
    assert!(message.contains("NUL"), "{message}");

    // Malformed JSON body: 400 with the parser's reason.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/tasks", c.base_url()))
        .header("content-type", "application/json")
        .body("{\"namespace\": \"t\", \"template\": 5}")
        .send()
        .await?;
    assert_eq!(resp.status(), 400);
    let body: serde_json::Value = resp.json().await?;
    assert_eq!(body["error"]["code"], "invalid_request");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("template"),
        "{body}"
    );

    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&h.db)
        .await?;
    assert_eq!(n, 0, "no bad request may store anything");
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_are_immutable_and_validated() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let c = h.client();
    let t = h.register_yaml(TEMPLATE).await?;
    // Same content again: a no-op.
    assert!(!c.register_template(&t).await?.created);
    // Different content under the same version: refused.
    let mut changed = t.clone();
    changed.steps[0].handler = "other".into();
    let (status, code, _) = api_code(&c.register_template(&changed).await.unwrap_err());
    assert_eq!((status, code.as_str()), (409, "template_conflict"));
    // A new version is fine, and becomes the default.
    changed.version = 2;
    assert!(c.register_template(&changed).await?.created);
    let id = h.submit("t", "one", json!({})).await?;
    assert_eq!(c.task(id).await?.template_version, 2);

    let cycle = tasker_orchestrator::service::templates::parse_template(
        "namespace: t\nname: cyc\nversion: 1\nsteps:\n  - { name: root, handler: h }\n  - { name: x, handler: h, depends_on: [root, z] }\n  - { name: y, handler: h, depends_on: [x] }\n  - { name: z, handler: h, depends_on: [y] }\n",
    )
    .unwrap();
    let (status, code, message) = api_code(&c.register_template(&cycle).await.unwrap_err());
    assert_eq!((status, code.as_str()), (400, "invalid_template"));
    assert!(
        message.contains("cycle") && message.contains("x") && message.contains("z"),
        "{message}"
    );

    let unknown = tasker_orchestrator::service::templates::parse_template(
        "namespace: t\nname: unk\nversion: 1\nsteps:\n  - { name: a, handler: h, depends_on: [ghost] }\n  - { name: b, handler: h }\n",
    )
    .unwrap();
    let (status, _, message) = api_code(&c.register_template(&unknown).await.unwrap_err());
    assert_eq!(status, 400);
    assert!(message.contains("unknown step \"ghost\""), "{message}");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM templates")
        .fetch_one(&h.db)
        .await?;
    assert_eq!(stored, 2);
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_over_amqp_once_even_when_redelivered() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(TEMPLATE).await?;
    h.spawn_worker(
        h.worker("t")
            .handler_fn("echo", |ctx| async move { Ok(ctx.context().clone()) }),
    )
    .await?;
    let conn = lapin::Connection::connect(&h.services.amqp_url, Default::default()).await?;
    let ch = amqp_submit::confirm_channel(&conn).await?;
    let mut req = amqp_submit::task_request("t", "one", json!({"via": "amqp"}));
    let task_id = tasker_schemas::TaskId::new();
    req.task_id = Some(task_id);
    // The same request twice, as a redelivery would.
    amqp_submit::publish_task_request(&ch, &h.names(), &req).await?;
    amqp_submit::publish_task_request(&ch, &h.names(), &req).await?;
    let task = h
        .wait_submitted(task_id, std::time::Duration::from_secs(30))
        .await?;
    assert_eq!(task.state, TaskState::Completed);
    assert_eq!(task.output, Some(json!({"s": {"via": "amqp"}})));
    // A bad request over AMQP is dead-lettered, not lost and not fatal.
    let mut bad = amqp_submit::task_request("t", "missing-template", json!({}));
    bad.task_id = Some(tasker_schemas::TaskId::new());
    amqp_submit::publish_task_request(&ch, &h.names(), &bad).await?;
    let dead = h
        .next_dead_letter(std::time::Duration::from_secs(10))
        .await?;
    assert!(dead.1.contains("missing-template"), "{}", dead.1);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&h.db)
        .await?;
    assert_eq!(n, 1, "a redelivered request must not create a second task");
    conn.close(200, "bye".into()).await?;
    h.finish().await;
    Ok(())
}
