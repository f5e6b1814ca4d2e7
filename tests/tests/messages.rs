//! Bad, duplicate and stale messages; replicas sharing a join; graceful worker shutdown.

use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tasker_schemas::TaskState;
use tasker_schemas::{Outcome, StepResult, TaskId, encode_payload};
use tasker_tests::Harness;
use tokio::sync::Barrier;

async fn publish_raw(h: &Harness, routing_key: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let conn = lapin::Connection::connect(&h.services.amqp_url, Default::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(Default::default()).await?;
    ch.basic_publish(
        h.names().results_exchange().into(),
        routing_key.into(),
        lapin::options::BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        bytes,
        lapin::BasicProperties::default().with_delivery_mode(2),
    )
    .await?
    .await?;
    conn.close(200, "bye".into()).await?;
    Ok(())
}

async fn wait_counter(
    h: &Harness,
    f: impl Fn(&tasker_orchestrator::metrics::Metrics) -> u64,
    at_least: u64,
) -> u64 {
    let m = h.shared(0).metrics.clone();
    for _ in 0..200 {
        let v = f(&m);
        if v >= at_least {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    f(&m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_result_is_dead_lettered_and_work_goes_on() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: one\nversion: 1\nsteps:\n  - { name: s, handler: echo }\n",
    )
    .await?;
    publish_raw(&h, "t.0", b"\xc1 definitely not msgpack").await?;
    let (bytes, reason) = h.next_dead_letter(Duration::from_secs(10)).await?;
    assert_eq!(bytes, b"\xc1 definitely not msgpack");
    assert!(
        reason.contains("MessagePack") || reason.contains("malformed") || reason.contains("not a"),
        "{reason}"
    );
    // Unknown major version: dead-lettered too.
    let v2 = rmp_serde_envelope("result", "2.0");
    publish_raw(&h, "t.0", &v2).await?;
    let (_, reason) = h.next_dead_letter(Duration::from_secs(10)).await?;
    assert!(reason.contains("major version 2"), "{reason}");
    // The orchestrator still works.
    h.spawn_worker(h.worker("t").handler_fn("echo", |_| async { Ok(json!(1)) }))
        .await?;
    let task = h.run("t", "one", json!({})).await?;
    assert_eq!(task.state, TaskState::Completed);
    assert_eq!(
        h.shared(0).metrics.value("tasker_dead_lettered_total") as u64,
        2
    );
    h.finish().await;
    Ok(())
}

/// A minimal envelope with the given kind and version and an empty payload.
fn rmp_serde_envelope(kind: &str, version: &str) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct E<'a> {
        kind: &'a str,
        schema_version: &'a str,
        message_id: &'a str,
        payload: HashMap<String, String>,
    }
    rmp_serde::to_vec_named(&E {
        kind,
        schema_version: version,
        message_id: "x",
        payload: HashMap::new(),
    })
    .unwrap()
}

/// Attempt numbers are stored as PostgreSQL integers: a report with one out of that range is
/// dead-lettered with the reason (it used to be saturated or wrapped silently), and a template
/// version out of range is refused at registration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_numbers_get_a_clear_error() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: one\nversion: 1\nsteps:\n  - { name: s, handler: echo }\n",
    )
    .await?;
    let too_big = i32::MAX as u32 + 1;
    let result = StepResult {
        task_id: TaskId::new(),
        step_id: tasker_schemas::StepId::new(),
        attempt: too_big,
        worker: "w".into(),
        duration_ms: 1,
        outcome: Outcome::succeeded(json!(1)),
        traceparent: None,
    };
    let started = tasker_schemas::Started {
        task_id: TaskId::new(),
        step_id: tasker_schemas::StepId::new(),
        attempt: u32::MAX,
        worker: "w".into(),
        lease_ms: 1_000,
    };
    for bytes in [encode_payload(result)?, encode_payload(started)?] {
        publish_raw(&h, "t.0", &bytes).await?;
        let (dead, reason) = h.next_dead_letter(Duration::from_secs(10)).await?;
        assert_eq!(dead, bytes);
        assert!(
            reason.contains("is out of range (at most 2147483647)"),
            "{reason}"
        );
    }
    let template = tasker_orchestrator::service::templates::parse_template(
        "namespace: t\nname: big\nversion: 2147483648\nsteps:\n  - { name: s, handler: echo }\n",
    )
    .map_err(anyhow::Error::msg)?;
    let err = h.client().register_template(&template).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("400") || text.contains("invalid_template"),
        "{text}"
    );
    assert!(text.contains("is too large: at most 2147483647"), "{text}");
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_and_stale_results_are_ignored() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: two\nversion: 1\nsteps:\n  - { name: a, handler: echo }\n  - { name: b, handler: echo, depends_on: [a] }\n",
    )
    .await?;
    h.spawn_worker(
        h.worker("t")
            .handler_fn("echo", |ctx| async move { Ok(json!(ctx.step())) }),
    )
    .await?;
    let task = h.run("t", "two", json!({})).await?;
    assert_eq!(task.state, TaskState::Completed);
    let a = &task.steps[0];
    let result = |attempt: u32, output| StepResult {
        task_id: task.id,
        step_id: a.id,
        attempt,
        worker: "impostor".into(),
        duration_ms: 1,
        outcome: Outcome::succeeded(output),
        traceparent: None,
    };
    let before = h.shared(0).metrics.value("tasker_results_stale_total") as u64;
    // A duplicate of the applied attempt, and a result for an attempt that never existed.
    publish_raw(&h, "t.0", &encode_payload(result(1, json!("dup")))?).await?;
    publish_raw(&h, "t.0", &encode_payload(result(7, json!("stale")))?).await?;
    let stale = wait_counter(
        &h,
        |m| m.value("tasker_results_stale_total") as u64,
        before + 2,
    )
    .await;
    assert_eq!(stale, before + 2);
    let after = h.client().task(task.id).await?;
    assert_eq!(
        after.steps, task.steps,
        "ignored results must change nothing"
    );
    assert_eq!(after.output, task.output);
    let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM attempts")
        .fetch_one(&h.db)
        .await?;
    assert_eq!(attempts, 2);
    assert_eq!(
        h.shared(0)
            .metrics
            .value("tasker_results_applied_twice_total") as u64,
        0
    );
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_is_admitted_once_when_parents_finish_together_on_two_replicas() -> anyhow::Result<()>
{
    let h = Harness::start_with(|c| c.result_prefetch = 1).await?;
    h.start_orchestrator().await?;
    h.register_yaml(
        "namespace: t\nname: join\nversion: 1\nsteps:\n  - { name: a, handler: go }\n  - { name: b, handler: sync, depends_on: [a] }\n  - { name: c, handler: sync, depends_on: [a] }\n  - { name: d, handler: count, depends_on: [b, c] }\n",
    )
    .await?;
    // b and c of one task leave their handlers at the same moment.
    let barriers: Arc<Mutex<HashMap<TaskId, Arc<Barrier>>>> = Arc::default();
    let joins = Arc::new(AtomicUsize::new(0));
    let (b2, j2) = (barriers.clone(), joins.clone());
    h.spawn_worker(
        h.worker("t")
            .concurrency(64)
            .handler_fn("go", |_| async { Ok(json!(null)) })
            .handler_fn("sync", move |ctx| {
                let barrier = b2
                    .lock()
                    .unwrap()
                    .entry(ctx.task_id())
                    .or_insert_with(|| Arc::new(Barrier::new(2)))
                    .clone();
                async move {
                    barrier.wait().await;
                    Ok(json!(ctx.step()))
                }
            })
            .handler_fn("count", move |_| {
                j2.fetch_add(1, Ordering::SeqCst);
                async { Ok(json!("joined")) }
            }),
    )
    .await?;
    let n = 40;
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(h.submit("t", "join", json!({})).await?);
    }
    for id in &ids {
        let task = h.wait(*id).await?;
        assert_eq!(task.state, TaskState::Completed);
        let d = task.steps.iter().find(|s| s.name == "d").unwrap();
        assert_eq!(
            (d.attempt, d.attempts.len()),
            (1, 1),
            "join admitted more than once"
        );
    }
    assert_eq!(
        joins.load(Ordering::SeqCst),
        n,
        "each join ran exactly once"
    );
    // Both replicas applied results.
    for i in 0..2 {
        assert!(
            h.shared(i).metrics.value("tasker_results_applied_total") as u64 > 0,
            "replica {i} idle"
        );
    }
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_shuts_down_gracefully_mid_step() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: one\nversion: 1\nsteps:\n  - { name: s, handler: slow }\n",
    )
    .await?;
    let (started_tx, started_rx) = tokio::sync::oneshot::channel::<()>();
    let started_tx = Arc::new(Mutex::new(Some(started_tx)));
    let worker = h
        .start_worker(h.worker("t").handler_fn("slow", move |_| {
            let tx = started_tx.lock().unwrap().take();
            async move {
                if let Some(tx) = tx {
                    let _ = tx.send(());
                }
                tokio::time::sleep(Duration::from_millis(700)).await;
                Ok(json!("finished during shutdown"))
            }
        }))
        .await?;
    let id = h.submit("t", "one", json!({})).await?;
    started_rx.await?;
    // SIGTERM equivalent while the step runs: it must finish and report before the worker exits.
    worker.stop().await?;
    let task = h.wait_for(id, Duration::from_secs(10)).await?;
    assert_eq!(task.state, TaskState::Completed);
    assert_eq!(
        task.steps[0].output,
        Some(json!("finished during shutdown"))
    );
    assert_eq!(
        task.steps[0].attempt, 1,
        "the step must not have been redelivered"
    );
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_refused_before_they_are_decoded() -> anyhow::Result<()> {
    let h = Harness::start_with(|c| c.max_request_bytes = 1024).await?;
    // Valid MessagePack framing is not even looked at: the size decides first.
    let big = vec![0x80u8; 2_000];
    let conn = lapin::Connection::connect(&h.services.amqp_url, Default::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(Default::default()).await?;
    ch.basic_publish(
        h.names().tasks_exchange().into(),
        "t".into(),
        lapin::options::BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        &big,
        lapin::BasicProperties::default().with_delivery_mode(2),
    )
    .await?
    .await?;
    conn.close(200, "bye".into()).await?;
    let (bytes, reason) = h.next_dead_letter(Duration::from_secs(10)).await?;
    assert_eq!(bytes.len(), 2_000);
    assert_eq!(
        reason,
        "the task request is 2000 bytes, over the limit of 1024 bytes"
    );
    // The results queue's bound (16 MiB) is checked the same way.
    let huge = vec![0x80u8; tasker_schemas::message::MAX_WORKER_MESSAGE_BYTES + 1];
    publish_raw(&h, "t.0", &huge).await?;
    let (_, reason) = h.next_dead_letter(Duration::from_secs(20)).await?;
    assert_eq!(
        reason,
        format!(
            "the message is {} bytes, over the limit of {} bytes",
            huge.len(),
            tasker_schemas::message::MAX_WORKER_MESSAGE_BYTES
        )
    );
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlong_worker_name_is_dead_lettered_with_the_limit() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let result = StepResult {
        task_id: TaskId::new(),
        step_id: tasker_schemas::StepId::new(),
        attempt: 1,
        worker: "w".repeat(300),
        duration_ms: 1,
        outcome: Outcome::succeeded(json!(1)),
        traceparent: None,
    };
    let started = tasker_schemas::Started {
        task_id: TaskId::new(),
        step_id: tasker_schemas::StepId::new(),
        attempt: 1,
        worker: "w".repeat(300),
        lease_ms: 1_000,
    };
    for bytes in [encode_payload(result)?, encode_payload(started)?] {
        publish_raw(&h, "t.0", &bytes).await?;
        let (dead, reason) = h.next_dead_letter(Duration::from_secs(10)).await?;
        assert_eq!(dead, bytes);
        assert_eq!(reason, "worker name is 300 bytes; at most 256 are allowed");
    }
    h.finish().await;
    Ok(())
}
