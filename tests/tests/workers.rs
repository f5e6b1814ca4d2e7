//! The worker registry: workers announce themselves (`worker_heartbeat`), `GET /v1/workers`
//! lists the live ones, a graceful stop leaves at once, a dead worker is forgotten after three
//! missed intervals, and why a step waits names a handler no live worker runs.

use serde_json::json;
use std::time::Duration;
use tasker_schemas::StepState;
use tasker_schemas::api::WorkerView;
use tasker_tests::Harness;
use tasker_tests::tasker_worker::CancellationToken;

const TEMPLATE: &str = "namespace: reg
name: one
version: 1
steps:
  - { name: s, handler: known }
";

async fn workers(h: &Harness) -> anyhow::Result<Vec<WorkerView>> {
    Ok(h.client().workers().await?.workers)
}

/// Polls the registry until `ok` holds.
async fn until(
    h: &Harness,
    what: &str,
    ok: impl Fn(&[WorkerView]) -> bool,
) -> anyhow::Result<Vec<WorkerView>> {
    let mut seen = Vec::new();
    for _ in 0..100 {
        seen = workers(h).await?;
        if ok(&seen) {
            return Ok(seen);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("{what}: the registry shows {seen:#?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_are_listed_while_live_and_forgotten_when_gone() -> anyhow::Result<()> {
    let h = Harness::start_with(|c| c.metrics_interval_ms = 200).await?;
    h.register_yaml(TEMPLATE).await?;
    assert!(workers(&h).await?.is_empty());

    // A worker that stops gracefully: listed, then gone at once.
    let polite = h
        .start_worker(
            h.worker("reg")
                .name("polite")
                .concurrency(3)
                .registry_interval(Duration::from_millis(200))
                .handler_fn("known", |_ctx| async move { Ok(json!({})) }),
        )
        .await?;
    let seen = until(&h, "the worker announced", |w| w.len() == 1).await?;
    let w = &seen[0];
    assert_eq!(w.name, "polite");
    assert_eq!(w.sdk, "rust");
    assert_eq!(w.queues, ["default"]);
    assert_eq!(w.handlers, ["known"]);
    assert_eq!((w.concurrency, w.in_flight), (3, 0));
    assert_eq!(w.interval_ms, 200);
    assert!(!w.host.is_empty() && !w.last_seen.is_empty());
    // The gauge of live workers per queue follows.
    let url = format!("{}/metrics", h.client().base_url());
    let live = r#"tasker_workers_live{queue="default"} 1"#;
    let mut text = String::new();
    for _ in 0..50 {
        text = reqwest::get(&url).await?.text().await?;
        if text.contains(live) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(text.contains(live), "{text}");
    assert!(text.contains("tasker_ready 1"), "{text}");
    polite.stop().await?;
    until(&h, "a stopped worker leaves at once", |w| w.is_empty()).await?;

    // A worker that dies (no goodbye): forgotten after 3 missed intervals (600 ms here).
    let worker = h
        .worker("reg")
        .name("doomed")
        .registry_interval(Duration::from_millis(200))
        .handler_fn("known", |_ctx| async move { Ok(json!({})) })
        .build();
    let run = tokio::spawn(worker.run(CancellationToken::new()));
    until(&h, "the second worker announced", |w| {
        w.iter().any(|w| w.name == "doomed")
    })
    .await?;
    run.abort();
    let died = std::time::Instant::now();
    until(&h, "a dead worker is forgotten", |w| w.is_empty()).await?;
    assert!(
        died.elapsed() >= Duration::from_millis(300),
        "listed until its intervals ran out, not dropped at once"
    );
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_whose_handler_no_live_worker_runs_says_so() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(TEMPLATE).await?;
    // A live worker on the queue, without the handler the step needs.
    h.spawn_worker_unchecked(
        h.worker("reg")
            .name("other")
            .registry_interval(Duration::from_millis(200))
            .handler_fn("something_else", |_ctx| async move { Ok(json!({})) }),
    )
    .await?;
    until(&h, "the worker announced", |w| w.len() == 1).await?;
    let id = h.submit("reg", "one", json!({})).await?;
    let mut reason = None;
    for _ in 0..100 {
        let task = h.client().task(id).await?;
        let s = &task.steps[0];
        if matches!(
            s.state,
            StepState::Queued | StepState::Dispatched | StepState::Retrying
        ) {
            reason = s.waiting_reason.clone();
            if reason
                .as_deref()
                .is_some_and(|r| r.contains("no live worker runs handler"))
            {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reason = reason.expect("a waiting reason");
    assert!(
        reason.contains(r#"no live worker runs handler "known" on queue "default" (the live workers on that queue lack it)"#),
        "{reason}"
    );
    h.client().cancel(id, None).await?;
    h.finish().await;
    Ok(())
}
