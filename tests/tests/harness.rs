//! The harness itself: what a failing test tells you (blocked steps and why they wait, a worker
//! that cannot start, a worker lacking handlers) and that a failed test leaves nothing behind.

use lapin::options::QueueDeclareOptions;
use serde_json::json;
use sqlx::PgPool;
use std::time::{Duration, Instant};
use tasker_schemas::{StepState, TaskState};
use tasker_tests::tasker_worker::{StepError, WorkerError};
use tasker_tests::{Harness, TaskNotFinished, WorkerLacksHandlers, services};

const STUCK: &str = "namespace: t\nname: stuck\nversion: 1\nsteps:\n  - name: fetch\n    handler: ghost\n  - name: store\n    handler: store\n    depends_on: [fetch]\n";

fn not_finished(err: &anyhow::Error) -> &TaskNotFinished {
    err.downcast_ref::<TaskNotFinished>()
        .unwrap_or_else(|| panic!("expected TaskNotFinished, got: {err:#}"))
}

/// Every blocked step is named with its state and its waiting reason, as the view had them.
fn assert_lists_blocked_steps(e: &TaskNotFinished, text: &str) {
    assert_eq!(e.task.state, TaskState::Running, "{text}");
    let blocked: Vec<_> = e.blocked_steps().collect();
    assert!(!blocked.is_empty(), "{text}");
    for s in blocked {
        assert!(
            text.contains(&format!("step {}: {}", s.name, s.state)),
            "{text}"
        );
        let reason = s.waiting_reason.as_deref().expect("a waiting reason");
        assert!(text.contains(reason), "{reason:?} missing from:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_stuck_on_a_missing_handler_fails_the_wait_with_its_steps_and_why()
-> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(STUCK).await?;
    // A worker on the right queue without `ghost`: every attempt is refused as handler_missing.
    h.spawn_worker_unchecked(
        h.worker("t")
            .name("half-worker")
            .handler_fn("store", |_| async { Ok(json!("stored")) }),
    )
    .await?;
    let id = h.submit("t", "stuck", json!({})).await?;
    let started = Instant::now();
    let err = h
        .wait_for(id, Duration::from_millis(1500))
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(10));
    let e = not_finished(&err);
    let text = err.to_string();
    assert_lists_blocked_steps(e, &text);
    assert!(
        text.contains(&format!(
            "task {id} (t/stuck v1) did not finish within 1.5s"
        )),
        "{text}"
    );
    // The child waits on its parent ...
    let store = e.task.steps.iter().find(|s| s.name == "store").unwrap();
    assert_eq!(store.state, StepState::Waiting);
    assert!(
        text.contains("step store: waiting") && text.contains("unfinished parent(s): fetch"),
        "{text}"
    );
    // ... which was offered to a worker that lacks its handler: the last error says so.
    assert!(text.contains("step fetch: "), "{text}");
    assert!(text.contains("handler \"ghost\""), "{text}");
    assert!(
        text.contains("handler_missing") && text.contains("half-worker"),
        "{text}"
    );
    assert!(
        text.contains(
            "hint: no running worker on queue \"default\" has handler \"ghost\" (workers there: half-worker [store])"
        ),
        "{text}"
    );
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_timeout_names_a_step_held_by_a_slow_worker_and_a_queue_nobody_consumes()
-> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: two\nversion: 1\nsteps:\n  - { name: slow, handler: sleep }\n  - { name: lonely, handler: echo, queue: nobody }\n",
    )
    .await?;
    let (taken_tx, taken_rx) = tokio::sync::oneshot::channel::<()>();
    let taken_tx = std::sync::Mutex::new(Some(taken_tx));
    h.spawn_worker(
        h.worker("t")
            .name("sleeper")
            .grace_period(Duration::from_millis(100))
            .handler_fn("sleep", move |ctx| {
                if let Some(tx) = taken_tx.lock().unwrap().take() {
                    let _ = tx.send(());
                }
                async move {
                    tokio::select! {
                        _ = ctx.cancelled() => Err(StepError::retryable("cancelled")),
                        _ = tokio::time::sleep(Duration::from_secs(30)) => Ok(json!("late")),
                    }
                }
            }),
    )
    .await?;
    let id = h.submit("t", "two", json!({})).await?;
    tokio::time::timeout(Duration::from_secs(10), taken_rx).await??;
    let err = h
        .wait_for(id, Duration::from_millis(300))
        .await
        .unwrap_err();
    let e = not_finished(&err);
    let text = err.to_string();
    assert_lists_blocked_steps(e, &text);
    assert!(text.contains("step slow: dispatched"), "{text}");
    assert!(text.contains("step lonely: dispatched"), "{text}");
    assert!(
        text.contains("hint: no running worker started by this harness consumes queue \"nobody\""),
        "{text}"
    );
    // The slow step has a worker with its handler: no hint about it.
    assert!(!text.contains("handler \"sleep\" (workers"), "{text}");
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_worker_fails_with_the_workers_start_up_error() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let started = Instant::now();
    let err = h
        .spawn_worker(
            h.worker("t")
                .queue("nowhere")
                .handler_fn("x", |_| async { Ok(json!(null)) }),
        )
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(20));
    let text = format!("{err:#}");
    assert!(
        text.contains(&format!(
            "queue {}.step.t.nowhere does not exist; register a template that uses it first",
            h.prefix
        )),
        "{text}"
    );
    assert!(
        matches!(
            err.downcast_ref::<WorkerError>(),
            Some(WorkerError::QueueMissing { .. })
        ),
        "{err:?}"
    );
    // start_worker and the unchecked variants report it the same way.
    let err = h
        .start_worker_unchecked(h.worker("t").queue("nowhere"))
        .await
        .err()
        .expect("a start-up error");
    assert!(
        format!("{err:#}").contains("does not exist; register a template that uses it first"),
        "{err:#}"
    );
    // Once a template uses the queue, the same worker starts.
    h.register_yaml(
        "namespace: t\nname: there\nversion: 1\nsteps:\n  - { name: s, handler: x, queue: nowhere }\n",
    )
    .await?;
    h.spawn_worker(
        h.worker("t")
            .queue("nowhere")
            .handler_fn("x", |_| async { Ok(json!("here")) }),
    )
    .await?;
    let task = h.run("t", "there", json!({})).await?;
    assert_eq!(task.state, TaskState::Completed);
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_worker_refuses_a_worker_lacking_handlers_unless_unchecked() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: media\nname: thumbnails\nversion: 1\nsteps:\n  - { name: resize, handler: resize }\n  - { name: publish, handler: publish, depends_on: [resize] }\n  - { name: render, handler: render, queue: gpu }\n",
    )
    .await?;
    let resize = |_| async { Ok(json!("resized")) };
    let err = h
        .spawn_worker(h.worker("media").handler_fn("resize", resize))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with(
            "template media/thumbnails needs handlers [publish] that this worker lacks"
        ),
        "{text}"
    );
    assert!(text.contains("spawn_worker_unchecked"), "{text}");
    let lacks = err
        .downcast_ref::<WorkerLacksHandlers>()
        .expect("WorkerLacksHandlers");
    assert_eq!(lacks.missing.len(), 1);
    assert_eq!(lacks.missing[0].handlers, ["publish"]);
    // `render` is on `gpu`, which that worker does not consume; a gpu worker lacks it.
    let err = h
        .start_worker(h.worker("media").queue("gpu"))
        .await
        .err()
        .expect("refused");
    assert!(
        err.to_string().starts_with(
            "template media/thumbnails needs handlers [render] that this worker lacks"
        ),
        "{err}"
    );
    // The opt-out runs it anyway.
    h.spawn_worker_unchecked(h.worker("media").handler_fn("resize", resize))
        .await?;
    // Complete workers pass.
    h.spawn_worker(
        h.worker("media")
            .handler_fn("resize", resize)
            .handler_fn("publish", |_| async { Ok(json!("published")) }),
    )
    .await?;
    h.spawn_worker(
        h.worker("media")
            .queue("gpu")
            .handler_fn("render", |_| async { Ok(json!("rendered")) }),
    )
    .await?;
    let task = h.run("media", "thumbnails", json!({})).await?;
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    h.finish().await;
    Ok(())
}

async fn database_exists(admin: &PgPool, name: &str) -> anyhow::Result<bool> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(admin)
            .await?,
    )
}

/// Polls (at most 15 s) until the database is gone.
async fn assert_database_goes_away(admin: &PgPool, name: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while database_exists(admin, name).await? {
        assert!(Instant::now() < deadline, "database {name} is still there");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn queue_exists(amqp_url: &str, queue: &str) -> anyhow::Result<bool> {
    let conn = lapin::Connection::connect(amqp_url, Default::default()).await?;
    let ch = conn.create_channel().await?;
    let found = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .is_ok();
    let _ = conn.close(200, "done".into()).await;
    Ok(found)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_harness_dropped_without_finish_deletes_its_database_and_queues() -> anyhow::Result<()> {
    let services = services().await?;
    let admin = PgPool::connect(&services.admin_database_url).await?;
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: one\nversion: 1\nsteps:\n  - { name: s, handler: echo, queue: own }\n",
    )
    .await?;
    h.spawn_worker(
        h.worker("t")
            .queue("own")
            .handler_fn("echo", |_| async { Ok(json!(1)) }),
    )
    .await?;
    assert_eq!(
        h.run("t", "one", json!({})).await?.state,
        TaskState::Completed
    );
    let (name, names) = (h.database_name.clone(), h.names());
    assert!(database_exists(&admin, &name).await?);
    assert!(queue_exists(&services.amqp_url, &names.step_queue("t", "own")).await?);
    drop(h);
    assert_database_goes_away(&admin, &name).await?;
    assert!(!queue_exists(&services.amqp_url, &names.step_queue("t", "own")).await?);
    assert!(!queue_exists(&services.amqp_url, &names.task_requests_queue()).await?);
    admin.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_that_panics_leaves_no_database_behind() -> anyhow::Result<()> {
    let services = services().await?;
    let admin = PgPool::connect(&services.admin_database_url).await?;
    let (name_tx, name_rx) = tokio::sync::oneshot::channel();
    // A "test" that panics while its harness is alive, orchestrator running.
    let failing = tokio::spawn(async move {
        let h = Harness::start().await.expect("harness");
        name_tx.send(h.database_name.clone()).expect("send");
        panic!("a failing assertion");
    });
    let joined = failing.await;
    assert!(joined.is_err_and(|e| e.is_panic()));
    let name = name_rx.await?;
    assert_database_goes_away(&admin, &name).await?;
    admin.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finish_deletes_the_database() -> anyhow::Result<()> {
    let services = services().await?;
    let admin = PgPool::connect(&services.admin_database_url).await?;
    let h = Harness::start().await?;
    let name = h.database_name.clone();
    h.finish().await;
    assert!(!database_exists(&admin, &name).await?);
    admin.close().await;
    Ok(())
}
