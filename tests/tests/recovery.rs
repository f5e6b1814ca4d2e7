//! Operator actions and recovery paths: cancel, retry, the outbox relay, dead step messages and
//! the reconciler.

use futures_util::StreamExt;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tasker_orchestrator::store::reconcile;
use tasker_schemas::{StepState, TaskState};
use tasker_tests::Harness;
use tasker_tests::tasker_worker::StepError;

/// Results counted as stale by the first orchestrator so far.
fn stale(h: &Harness) -> u64 {
    h.shared(0).metrics.value("tasker_results_stale_total") as u64
}

async fn post(h: &Harness, path: &str) -> anyhow::Result<serde_json::Value> {
    let url = format!("{}{path}", h.client().base_url());
    let r = reqwest::Client::new().post(url).send().await?;
    let status = r.status();
    let body: serde_json::Value = r.json().await?;
    anyhow::ensure!(status.is_success(), "{status}: {body}");
    Ok(body)
}

/// A template whose first step is long (a worker reports it `started`), then a second step.
const LONG_THEN_NEXT: &str = "namespace: t\nname: c\nversion: 1\nsteps:\n  - { name: slow, handler: slow, execution_timeout: 10s }\n  - { name: next, handler: slow, depends_on: [slow] }\n";

/// A worker whose `slow` handler takes `ms` and reports steps over 1 s as started.
fn long_worker(h: &Harness, ms: u64) -> tasker_tests::tasker_worker::WorkerBuilder {
    h.worker("t")
        .long_steps(Duration::from_secs(1), Duration::from_millis(100))
        .handler_fn("slow", move |_| async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok(json!("done"))
        })
}

/// Waits until a worker reported the first step of task `id` started.
async fn until_started(h: &Harness, id: tasker_schemas::TaskId) -> anyhow::Result<()> {
    for _ in 0..100 {
        let t = h.client().task(id).await?;
        if t.steps[0]
            .attempts
            .last()
            .is_some_and(|a| a.outcome == "started")
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("the first step of {id} was never reported started")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_admission_and_records_started_steps_results() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(LONG_THEN_NEXT).await?;
    h.spawn_worker(long_worker(&h, 800)).await?;
    let id = h.submit("t", "c", json!({})).await?;
    until_started(&h, id).await?;
    let view = post(&h, &format!("/v1/tasks/{id}/cancel")).await?;
    assert_eq!(view["steps"][1]["state"], "cancelled");
    assert_eq!(view["state"], "running", "the started step is waited for");
    let task = h.wait(id).await?;
    assert_eq!(task.state, TaskState::Cancelled);
    // The step a worker had started finished and was recorded; its child never ran.
    assert_eq!(task.steps[0].state, StepState::Succeeded);
    assert_eq!(task.steps[1].state, StepState::Cancelled);
    assert_eq!(task.steps[1].attempt, 0);
    let kinds: Vec<&str> = task.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["cancel_requested", "cancelled"]);
    // Cancelling again is a no-op: 200, the same task, no second event.
    let again = post(&h, &format!("/v1/tasks/{id}/cancel")).await?;
    assert_eq!(again["state"], "cancelled");
    assert_eq!(again["events"].as_array().map(Vec::len), Some(2));
    h.finish().await;
    Ok(())
}

/// A step published to a queue no worker consumes is not started: cancel finishes the task at
/// once, records the attempt as cancelled and releases its slot; when a worker comes later, its
/// result for that attempt is stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_finishes_unstarted_steps_at_once_and_their_late_results_are_stale()
-> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: idle\nversion: 1\nsteps:\n  - { name: only, handler: h, queue: nobody }\n",
    )
    .await?;
    let id = h.submit("t", "idle", json!({})).await?;
    // Wait until it is dispatched (published, waiting for a worker).
    for _ in 0..100 {
        if h.client().task(id).await?.steps[0].state == StepState::Dispatched {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let view = post(&h, &format!("/v1/tasks/{id}/cancel")).await?;
    assert_eq!(view["state"], "cancelled", "{view:#}");
    assert_eq!(view["steps"][0]["state"], "cancelled");
    assert_eq!(view["steps"][0]["attempts"][0]["outcome"], "cancelled");
    let in_flight: i64 = sqlx::query_scalar(
        "SELECT in_flight FROM slots WHERE scope = 'queue' AND key = 't.nobody'",
    )
    .fetch_one(&h.db)
    .await?;
    assert_eq!(
        in_flight, 0,
        "the slot of the cancelled attempt is released"
    );
    // A worker that starts now never heard the cancel: it runs the step, and the result is stale.
    let before = stale(&h);
    h.spawn_worker(
        h.worker("t")
            .queue("nobody")
            .handler_fn("h", |_| async { Ok(json!("late")) }),
    )
    .await?;
    for _ in 0..200 {
        if stale(&h) > before {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stale(&h), before + 1, "the late result is counted as stale");
    let task = h.client().task(id).await?;
    assert_eq!(task.state, TaskState::Cancelled);
    assert_eq!(task.steps[0].state, StepState::Cancelled);
    assert_eq!(task.steps[0].output, None);
    h.finish().await;
    Ok(())
}

/// A cancel that arrives while the last step runs (started) leaves a cancelled task whose steps
/// all succeeded; retrying it has nothing to run again, so it completes at once (it used to
/// stay `running` with no unfinished step, owned by nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrying_a_cancelled_task_with_nothing_left_to_run_completes_it() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: last\nversion: 1\nsteps:\n  - { name: only, handler: slow, execution_timeout: 10s }\n",
    )
    .await?;
    h.spawn_worker(long_worker(&h, 600)).await?;
    let id = h.submit("t", "last", json!({})).await?;
    until_started(&h, id).await?;
    post(&h, &format!("/v1/tasks/{id}/cancel")).await?;
    let task = h.wait(id).await?;
    assert_eq!(task.state, TaskState::Cancelled, "{task:#?}");
    assert_eq!(task.steps[0].state, StepState::Succeeded);
    let view = post(&h, &format!("/v1/tasks/{id}/retry")).await?;
    assert_eq!(view["state"], "completed", "{view:#}");
    assert_eq!(view["output"], json!({"only": "done"}));
    let task = h.wait(id).await?;
    let kinds: Vec<&str> = task.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["cancel_requested", "cancelled", "retried", "completed"]
    );
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_reruns_failed_steps_with_higher_attempts() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: r\nversion: 1\nsteps:\n  - { name: a, handler: ok }\n  - { name: b, handler: fragile, depends_on: [a] }\n  - { name: c, handler: ok, depends_on: [b] }\n",
    )
    .await?;
    let fixed = Arc::new(AtomicBool::new(false));
    let f = fixed.clone();
    h.spawn_worker(
        h.worker("t")
            .handler_fn("ok", |ctx| async move { Ok(json!(ctx.attempt())) })
            .handler_fn("fragile", move |_| {
                let ok = f.load(Ordering::SeqCst);
                async move {
                    if ok {
                        Ok(json!("fixed"))
                    } else {
                        Err(StepError::permanent("bug"))
                    }
                }
            }),
    )
    .await?;
    let id = h.submit("t", "r", json!({})).await?;
    let failed = h.wait(id).await?;
    assert_eq!(failed.state, TaskState::Failed);
    assert_eq!(failed.steps[2].state, StepState::Skipped);
    fixed.store(true, Ordering::SeqCst);
    post(&h, &format!("/v1/tasks/{id}/retry")).await?;
    let task = h.wait(id).await?;
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    // a kept its output and attempt; b ran again with a higher attempt number.
    assert_eq!(
        (task.steps[0].attempt, task.steps[0].output.clone()),
        (1, Some(json!(1)))
    );
    assert_eq!(task.steps[1].attempt, 2);
    assert_eq!(
        task.steps[1]
            .attempts
            .iter()
            .map(|a| a.outcome.as_str())
            .collect::<Vec<_>>(),
        ["failed", "succeeded"]
    );
    assert_eq!(task.steps[2].attempt, 1);
    let kinds: Vec<&str> = task.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["failed", "retried", "completed"]);
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempt_admitted_but_never_published_is_relayed() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: one\nversion: 1\nsteps:\n  - { name: s, handler: echo, queue: q1 }\n",
    )
    .await?;
    let id = h.submit("t", "one", json!({})).await?;
    // No worker yet: wait until the attempt is dispatched, published and its outbox entry cleared.
    for _ in 0..200 {
        let (dispatched, outbox): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM steps WHERE state = 'dispatched'), (SELECT count(*) FROM outbox)",
        )
        .fetch_one(&h.db)
        .await?;
        if dispatched == 1 && outbox == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Model a crash between the admission commit and the publish: the message never reached the
    // broker (purge it) and the outbox entry is still there.
    let conn = lapin::Connection::connect(&h.services.amqp_url, Default::default()).await?;
    let ch = conn.create_channel().await?;
    let purged = ch
        .queue_purge(
            h.names().step_queue("t", "q1").as_str().into(),
            Default::default(),
        )
        .await?;
    assert_eq!(purged, 1, "the step message was published");
    // Put the outbox entry back, as if the process died before the confirm cleared it.
    sqlx::query("INSERT INTO outbox (step_id, attempt, namespace, created_at) SELECT id, attempt, namespace, now() - interval '1 hour' FROM steps")
        .execute(&h.db)
        .await?;
    h.spawn_worker(
        h.worker("t")
            .queue("q1")
            .handler_fn("echo", |_| async { Ok(json!("relayed")) }),
    )
    .await?;
    let task = h.wait(id).await?;
    assert_eq!(task.state, TaskState::Completed);
    assert_eq!(
        task.steps[0].attempt, 1,
        "the relay republishes the same attempt"
    );
    assert!(h.shared(0).metrics.value("tasker_outbox_relayed_total") as u64 >= 1);
    // Confirmed entries are cleared in batches, within 50 ms.
    let mut left: i64 = -1;
    for _ in 0..50 {
        left = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&h.db)
            .await?;
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(left, 0, "confirmed entries are cleared");
    conn.close(200, "bye".into()).await?;
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_step_messages_become_failed_attempts() -> anyhow::Result<()> {
    let h = Harness::start_with(|c| c.delivery_limit = 1).await?;
    h.register_yaml(
        "namespace: t\nname: poison\nversion: 1\nsteps:\n  - name: s\n    handler: h\n    queue: poison\n    retry: { max_attempts: 2, initial_delay: 10ms, max_delay: 10ms }\n",
    )
    .await?;
    // A broken consumer that rejects every delivery back to the queue.
    let conn = lapin::Connection::connect(&h.services.amqp_url, Default::default()).await?;
    let ch = conn.create_channel().await?;
    let mut consumer = ch
        .basic_consume(
            h.names().step_queue("t", "poison").as_str().into(),
            "broken".into(),
            Default::default(),
            Default::default(),
        )
        .await?;
    let nacker = tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let _ = d
                .acker
                .nack(lapin::options::BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
        }
    });
    let task = h.run("t", "poison", json!({})).await?;
    assert_eq!(task.state, TaskState::Failed);
    let s = &task.steps[0];
    assert_eq!(s.attempts.len(), 2);
    assert!(
        s.attempts.iter().all(|a| a.outcome == "dead_lettered"),
        "{:?}",
        s.attempts
    );
    assert!(
        s.attempts[0]
            .error
            .as_deref()
            .unwrap()
            .contains("delivery_limit"),
        "{:?}",
        s.attempts[0].error
    );
    // The message itself is kept for inspection, with the reason.
    let (_, reason) = h.next_dead_letter(Duration::from_secs(5)).await?;
    assert!(reason.contains("delivery_limit"), "{reason}");
    nacker.abort();
    conn.close(200, "bye".into()).await?;
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciler_repairs_a_task_without_a_live_owner() -> anyhow::Result<()> {
    let h = Harness::start_with(|c| c.reconcile_quiet_ms = 0).await?;
    h.register_yaml(
        "namespace: t\nname: two\nversion: 1\nsteps:\n  - { name: a, handler: echo }\n  - { name: b, handler: echo, depends_on: [a] }\n",
    )
    .await?;
    h.spawn_worker(h.worker("t").handler_fn("echo", |_| async { Ok(json!(1)) }))
        .await?;
    let done = h.run("t", "two", json!({})).await?;
    assert_eq!(done.state, TaskState::Completed);
    // Corrupt a second task as a bug or lost write would: a succeeded, b still waiting on it.
    let id = h.submit("t", "two", json!({})).await?;
    h.wait(id).await?;
    sqlx::query("UPDATE tasks SET state = 'running', finished_at = NULL, unfinished_steps = 1 WHERE id = $1")
        .bind(id.0)
        .execute(&h.db)
        .await?;
    sqlx::query("UPDATE steps SET state = 'waiting', pending_parents = 1, output = NULL, attempt = 1 WHERE task_id = $1 AND name = 'b'")
        .bind(id.0)
        .execute(&h.db)
        .await?;
    let repaired = tasker_orchestrator::service::reconcile::reconcile(&h.shared(0)).await?;
    assert_eq!(repaired, 1);
    assert_eq!(
        h.shared(0).metrics.value("tasker_reconciler_repairs_total") as u64,
        1
    );
    let task = h.wait(id).await?;
    assert_eq!(task.state, TaskState::Completed);
    assert_eq!(task.steps[1].attempt, 2, "b ran again with a new attempt");
    // A healthy database has nothing to repair.
    assert!(reconcile::find_inconsistent(&h.db, 0, 10).await?.is_empty());
    assert!(reconcile::recount_slots(&h.db).await?.is_empty());
    h.finish().await;
    Ok(())
}

/// A queue's in-flight count that disagrees with its dispatched steps (an older orchestrator
/// beside this one, or a bug) is corrected by the reconciler, and counted as a repair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciler_corrects_a_drifted_in_flight_count() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: one\nversion: 1\nsteps:\n  - { name: a, handler: echo }\n",
    )
    .await?;
    h.spawn_worker(h.worker("t").handler_fn("echo", |_| async { Ok(json!(1)) }))
        .await?;
    assert_eq!(
        h.run("t", "one", json!({})).await?.state,
        TaskState::Completed
    );
    sqlx::query("UPDATE slots SET in_flight = 7 WHERE scope = 'queue' AND key = 't.default'")
        .execute(&h.db)
        .await?;
    let repaired = tasker_orchestrator::service::reconcile::reconcile(&h.shared(0)).await?;
    assert_eq!(repaired, 1);
    let in_flight: i64 = sqlx::query_scalar(
        "SELECT in_flight FROM slots WHERE scope = 'queue' AND key = 't.default'",
    )
    .fetch_one(&h.db)
    .await?;
    assert_eq!(in_flight, 0);
    // With the count right again, tasks still run.
    assert_eq!(
        h.run("t", "one", json!({})).await?.state,
        TaskState::Completed
    );
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_steps_ack_early_and_keep_a_lease_alive() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: long\nversion: 1\nsteps:\n  - name: s\n    handler: long\n    queue: long\n    queue_wait_timeout: 5s\n    execution_timeout: 10s\n    retry: { max_attempts: 1 }\n",
    )
    .await?;
    let (running_tx, running_rx) = tokio::sync::oneshot::channel::<()>();
    let running_tx = Arc::new(std::sync::Mutex::new(Some(running_tx)));
    h.spawn_worker(
        h.worker("t")
            .queue("long")
            // Anything over 1 s is "long" here; leases of 3 x 250 ms, renewed every 250 ms (a
            // busy machine can delay a heartbeat by more than 100 ms).
            .long_steps(Duration::from_secs(1), Duration::from_millis(250))
            .handler_fn("long", move |_| {
                let tx = running_tx.lock().unwrap().take();
                async move {
                    if let Some(tx) = tx {
                        let _ = tx.send(());
                    }
                    // Far longer than one lease: only heartbeats keep the attempt alive.
                    tokio::time::sleep(Duration::from_millis(2500)).await;
                    Ok(json!("long done"))
                }
            }),
    )
    .await?;
    let id = h.submit("t", "long", json!({})).await?;
    running_rx.await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // While the handler runs: the message is acked, the orchestrator holds a short lease.
    let conn = lapin::Connection::connect(&h.services.amqp_url, Default::default()).await?;
    let ch = conn.create_channel().await?;
    let q = ch
        .queue_declare(
            h.names().step_queue("t", "long").as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await?;
    assert_eq!(q.message_count(), 0);
    let view = h.client().task(id).await?;
    let s = &view.steps[0];
    assert_eq!(s.state, StepState::Dispatched);
    assert_eq!(s.attempts[0].outcome, "started");
    assert!(
        s.waiting_reason.as_deref().unwrap().contains("running on"),
        "{:?}",
        s.waiting_reason
    );
    let task = h.wait(id).await?;
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    assert_eq!(
        task.steps[0].attempt, 1,
        "heartbeats kept the one attempt alive"
    );
    assert!(task.steps[0].attempts[0].started_at.is_some());
    conn.close(200, "bye".into()).await?;
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_handlers_observe_cancellation_and_queued_steps_are_refused() -> anyhow::Result<()>
{
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: c2\nversion: 1\nsteps:\n  - { name: a, handler: wait }\n  - { name: b, handler: wait }\n",
    )
    .await?;
    let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let r = ran.clone();
    h.spawn_worker(h.worker("t").concurrency(1).handler_fn("wait", move |ctx| {
        r.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::select! {
                _ = ctx.cancelled() => Err(StepError::permanent("stopped by cancel")),
                _ = tokio::time::sleep(Duration::from_secs(30)) => Ok(json!("too late")),
            }
        }
    }))
    .await?;
    let id = h.submit("t", "c2", json!({})).await?;
    // Both roots are dispatched; with concurrency 1 one runs and the other waits in the queue.
    for _ in 0..100 {
        if ran.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stale_before = stale(&h);
    let started = std::time::Instant::now();
    post(&h, &format!("/v1/tasks/{id}/cancel")).await?;
    let task = h.wait_for(id, Duration::from_secs(10)).await?;
    assert_eq!(task.state, TaskState::Cancelled);
    // Neither step was reported started: both finish with the cancel, their attempts recorded.
    for s in &task.steps {
        assert_eq!(s.state, StepState::Cancelled, "{s:#?}");
        assert_eq!(
            s.attempts.last().map(|a| a.outcome.as_str()),
            Some("cancelled")
        );
    }
    // The worker heard the cancel: the running handler stopped at once and the queued message
    // was refused; both reports arrive for attempts already cancelled, so they are stale.
    while stale(&h) < stale_before + 2 && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        stale(&h),
        stale_before + 2,
        "the stopped handler's and the refused message's reports, within {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cancel took {:?}",
        started.elapsed()
    );
    assert_eq!(
        ran.load(Ordering::SeqCst),
        1,
        "the queued step was refused, not run"
    );
    h.finish().await;
    Ok(())
}

/// Pruning keeps pace with the finish rate: one round deletes every task past retention in
/// bounded batches, not one batch per reconciler interval (it used to be at most 1,000 per 30 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pruning_round_catches_up_in_batches() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: one\nversion: 1\nsteps:\n  - { name: s, handler: echo }\n",
    )
    .await?;
    h.spawn_worker(h.worker("t").handler_fn("echo", |_| async { Ok(json!(1)) }))
        .await?;
    let done = h.run("t", "one", json!({})).await?;
    // 2,500 finished tasks past retention (copies of a finished one, with a step each).
    sqlx::query(
        "WITH copies AS (
             INSERT INTO tasks (id, namespace, template_id, template_name, template_version, state,
                                priority, context, request_hash, unfinished_steps, created_at,
                                finished_at)
             SELECT gen_random_uuid(), namespace, template_id, template_name, template_version,
                    state, priority, context, request_hash, 0, created_at,
                    now() - interval '8 days'
             FROM tasks, generate_series(1, 2500) WHERE id = $1
             RETURNING id
         )
         INSERT INTO steps (id, task_id, namespace, name, position, handler, queue, state,
                            max_attempts, retry_policy, queue_wait_timeout_ms,
                            execution_timeout_ms, pending_parents)
         SELECT gen_random_uuid(), c.id, 't', 's', 0, 'echo', 'default', 'succeeded', 1, '{}',
                1000, 1000, 0
         FROM copies c",
    )
    .bind(done.id.0)
    .execute(&h.db)
    .await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let pruned = tasker_orchestrator::service::reconcile::prune(
        &h.shared(0),
        1_000,
        Duration::from_secs(60),
        &stop,
    )
    .await?;
    assert_eq!(pruned, 2_500);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&h.db)
        .await?;
    assert_eq!(left, 1, "only the task within retention stays");
    let steps_left: i64 = sqlx::query_scalar("SELECT count(*) FROM steps")
        .fetch_one(&h.db)
        .await?;
    assert_eq!(steps_left, 1);
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_tasks_are_pruned_after_retention() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: one\nversion: 1\nsteps:\n  - { name: s, handler: echo }\n",
    )
    .await?;
    h.spawn_worker(h.worker("t").handler_fn("echo", |_| async { Ok(json!(1)) }))
        .await?;
    let old = h.run("t", "one", json!({"n": 1})).await?;
    let recent = h.run("t", "one", json!({"n": 2})).await?;
    sqlx::query("UPDATE tasks SET finished_at = now() - interval '8 days' WHERE id = $1")
        .bind(old.id.0)
        .execute(&h.db)
        .await?;
    let pruned =
        tasker_orchestrator::store::reconcile::prune(&h.db, 7 * 24 * 3_600_000, 100).await?;
    assert_eq!(pruned, 1);
    let count = |sql: &'static str| {
        let db = h.db.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .bind(old.id.0)
                .fetch_one(&db)
                .await
        }
    };
    assert_eq!(count("SELECT count(*) FROM tasks WHERE id = $1").await?, 0);
    assert_eq!(
        count("SELECT count(*) FROM steps WHERE task_id = $1").await?,
        0
    );
    assert_eq!(
        count("SELECT count(*) FROM attempts WHERE task_id = $1").await?,
        0
    );
    assert_eq!(
        h.client().task(recent.id).await?.state,
        TaskState::Completed,
        "recent tasks stay"
    );
    h.finish().await;
    Ok(())
}
