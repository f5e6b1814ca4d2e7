//! Deterministic crash points that random kills may miss. Each test recreates the state a crash
//! at that point leaves behind and checks that nothing is lost and nothing is applied twice.

use futures_util::StreamExt;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tasker_schemas::TaskState;
use tasker_schemas::{Outcome, StepMessage, StepResult, decode, encode_payload};
use tasker_tests::Harness;

const ONE: &str = "namespace: t\nname: one\nversion: 1\nsteps:\n  - { name: s, handler: echo, queue: q }\n  - { name: after, handler: echo, depends_on: [s], queue: q }\n";

async fn counting_worker(h: &Harness) -> anyhow::Result<Arc<AtomicUsize>> {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    h.spawn_worker(h.worker("t").queue("q").handler_fn("echo", move |ctx| {
        r.fetch_add(1, Ordering::SeqCst);
        async move { Ok(json!(ctx.step())) }
    }))
    .await?;
    Ok(runs)
}

async fn wait_until(h: &Harness, sql: &'static str) -> anyhow::Result<()> {
    for _ in 0..250 {
        if sqlx::query_scalar::<_, bool>(sql).fetch_one(&h.db).await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("condition never held: {sql}")
}

fn stale(h: &Harness) -> u64 {
    h.shared(0).metrics.value("tasker_results_stale_total") as u64
}

async fn assert_applied_once(h: &Harness) -> anyhow::Result<()> {
    let twice: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT step_id, attempt FROM attempts GROUP BY 1, 2 HAVING count(*) > 1) d",
    )
    .fetch_one(&h.db)
    .await?;
    assert_eq!(twice, 0);
    assert_eq!(
        h.shared(0)
            .metrics
            .value("tasker_results_applied_twice_total") as u64,
        0
    );
    Ok(())
}

/// Killed after the publish but before the confirm cleared the outbox entry: the relay publishes
/// the attempt a second time; the worker may run it twice; the second result is stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_but_outbox_not_cleared() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(ONE).await?;
    let id = h.submit("t", "one", json!({})).await?;
    wait_until(&h, "SELECT count(*) = 1 FROM steps WHERE state = 'dispatched' AND (SELECT count(*) FROM outbox) = 0").await?;
    // The entry the crash left behind, old enough for the relay.
    sqlx::query("INSERT INTO outbox (step_id, attempt, namespace, created_at) SELECT id, attempt, namespace, now() - interval '1 hour' FROM steps WHERE state = 'dispatched'")
        .execute(&h.db)
        .await?;
    wait_until(&h, "SELECT count(*) = 0 FROM outbox").await?;
    let runs = counting_worker(&h).await?;
    let task = h.wait(id).await?;
    assert_eq!(task.state, TaskState::Completed);
    assert_eq!(task.steps[0].attempt, 1);
    assert_eq!(
        task.steps[0].attempts.len(),
        1,
        "one outcome applied for attempt 1"
    );
    // Both copies ran (at-least-once); the second outcome was dropped as stale. The second copy
    // may run after the task finished, so wait for it.
    for _ in 0..250 {
        if runs.load(Ordering::SeqCst) >= 3 && stale(&h) >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3, "s twice, after once");
    assert!(stale(&h) >= 1);
    assert_applied_once(&h).await?;
    h.finish().await;
    Ok(())
}

/// A worker killed after publishing its result but before acking the step message: the message
/// is redelivered and run again; the first result was applied, the second is stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_dies_after_result_before_ack() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(ONE).await?;
    let id = h.submit("t", "one", json!({})).await?;
    // A worker that publishes the result and dies without acking.
    let conn = lapin::Connection::connect(&h.services.amqp_url, Default::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(Default::default()).await?;
    let mut consumer = ch
        .basic_consume(
            h.names().step_queue("t", "q").as_str().into(),
            "doomed".into(),
            Default::default(),
            Default::default(),
        )
        .await?;
    let delivery = consumer.next().await.expect("a step message")?;
    let msg = decode::<StepMessage>(&delivery.data)?.payload;
    let result = StepResult {
        task_id: msg.task_id,
        step_id: msg.step_id,
        attempt: msg.attempt,
        worker: "doomed".into(),
        duration_ms: 1,
        outcome: Outcome::succeeded(json!("first")),
        traceparent: None,
    };
    ch.basic_publish(
        h.names().results_exchange().into(),
        msg.result_routing_key.as_str().into(),
        lapin::options::BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        &encode_payload(result)?,
        lapin::BasicProperties::default().with_delivery_mode(2),
    )
    .await?
    .await?;
    wait_until(
        &h,
        "SELECT count(*) = 1 FROM steps WHERE name = 's' AND state = 'succeeded'",
    )
    .await?;
    drop(consumer);
    conn.close(320, "killed".into()).await?; // unacked: the broker requeues the step message
    let runs = counting_worker(&h).await?;
    let task = h.wait(id).await?;
    assert_eq!(task.state, TaskState::Completed);
    assert_eq!(
        task.steps[0].output,
        Some(json!("first")),
        "the first applied outcome stands"
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "the redelivered s ran again, then after"
    );
    for _ in 0..100 {
        if stale(&h) >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(stale(&h) >= 1, "the duplicate result is counted as stale");
    assert_applied_once(&h).await?;
    h.finish().await;
    Ok(())
}

/// An orchestrator killed after committing a result batch but before acking it: the results are
/// delivered again (here to a second replica) and dropped as stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_committed_but_not_acked() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(ONE).await?;
    let runs = counting_worker(&h).await?;
    let task = h.run("t", "one", json!({})).await?;
    assert_eq!(task.state, TaskState::Completed);
    // Redeliver both committed results, as the broker does when the consumer dies before its ack.
    for s in &task.steps {
        let result = StepResult {
            task_id: task.id,
            step_id: s.id,
            attempt: s.attempt,
            worker: "redelivery".into(),
            duration_ms: 1,
            outcome: Outcome::succeeded(json!("again")),
            traceparent: None,
        };
        let conn = lapin::Connection::connect(&h.services.amqp_url, Default::default()).await?;
        let ch = conn.create_channel().await?;
        ch.basic_publish(
            h.names().results_exchange().into(),
            "t.0".into(),
            Default::default(),
            &encode_payload(result)?,
            Default::default(),
        )
        .await?;
        conn.close(200, "bye".into()).await?;
    }
    for _ in 0..100 {
        if stale(&h) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stale(&h), 2);
    let after = h.client().task(task.id).await?;
    assert_eq!(after.steps, task.steps);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_applied_once(&h).await?;
    h.finish().await;
    Ok(())
}

/// Recreates what a crash after a commit and before its publish leaves behind, for the `n`
/// steps dispatched on queue `q`: their messages never reached the broker (purged) and their
/// outbox entries are old. Returns once the relay published them again.
async fn lose_published_steps(h: &Harness, n: u32) -> anyhow::Result<()> {
    let conn = lapin::Connection::connect(&h.services.amqp_url, Default::default()).await?;
    let ch = conn.create_channel().await?;
    let purged = ch
        .queue_purge(
            h.names().step_queue("t", "q").as_str().into(),
            Default::default(),
        )
        .await?;
    assert_eq!(purged, n);
    conn.close(200, "bye".into()).await?;
    sqlx::query(
        "INSERT INTO outbox (step_id, attempt, namespace, created_at)
         SELECT id, attempt, namespace, now() - interval '1 hour' FROM steps
         WHERE queue = 'q' AND state = 'dispatched'",
    )
    .execute(&h.db)
    .await?;
    wait_until(h, "SELECT count(*) = 0 FROM outbox").await
}

/// Killed after committing what a decision or a mapped step admitted but before publishing it:
/// the state such a crash leaves is recreated by dropping the published step messages and
/// putting back old outbox entries. The relay publishes them; every admitted step runs and is
/// applied once, and the decision and the map are not made again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decision_and_map_admitted_but_not_published() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t
name: dyn
version: 1
steps:
  - { name: route, handler: route, queue: d, decides: [fan, other] }
  - { name: fan, handler: list, queue: d, depends_on: [route] }
  - { name: other, handler: list, queue: d, depends_on: [route] }
  - { name: each, handler: each, queue: q, depends_on: [fan], map: { over: fan.items, max_parallel: 4 } }
  - { name: pick, handler: each, queue: q, depends_on: [route] }
",
    )
    .await?;
    let decided = Arc::new(AtomicUsize::new(0));
    let d = decided.clone();
    h.spawn_worker(
        h.worker("t")
            .queue("d")
            .decision_fn("route", move |_ctx| {
                d.fetch_add(1, Ordering::SeqCst);
                async move {
                    Ok(tasker_tests::tasker_worker::Decision::choose(["fan"]).output(json!(1)))
                }
            })
            .handler_fn("list", |_ctx| async move {
                Ok(json!({"items": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}))
            }),
    )
    .await?;
    let id = h.submit("t", "dyn", json!({})).await?;
    // The decision admitted `pick` and, through `fan`, the map its first four instances: all
    // published and confirmed, nobody consuming queue q yet.
    wait_until(
        &h,
        "SELECT count(*) = 5 FROM steps WHERE queue = 'q' AND state = 'dispatched'
         AND (SELECT count(*) FROM outbox) = 0",
    )
    .await?;
    // The crash: none of them reached the broker, their outbox entries are left behind.
    lose_published_steps(&h, 5).await?;
    let runs = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let r = runs.clone();
    h.spawn_worker(h.worker("t").queue("q").handler_fn("each", move |ctx| {
        r.lock()
            .unwrap()
            .push(format!("{}:{:?}", ctx.step(), ctx.index()));
        async move { Ok(json!(ctx.index())) }
    }))
    .await?;
    let task = h.wait(id).await?;
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    assert_eq!(decided.load(Ordering::SeqCst), 1, "decided once");
    let each = task.steps.iter().find(|s| s.name == "each").unwrap();
    assert_eq!(each.output, Some(json!([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])));
    let mut ran = runs.lock().unwrap().clone();
    ran.sort();
    ran.dedup();
    assert_eq!(ran.len(), 11, "every instance and pick ran: {ran:?}");
    let attempts: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM attempts a JOIN steps s ON s.id = a.step_id
         WHERE s.queue = 'q' AND a.attempt <> 1",
    )
    .fetch_one(&h.db)
    .await?;
    assert_eq!(attempts, 0, "no attempt was spent on the lost publish");
    assert_applied_once(&h).await?;
    h.finish().await;
    Ok(())
}

/// Killed after committing a child workflow's creation but before publishing its first step:
/// the relay publishes it; the child runs once and the parent finishes with its output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_created_but_not_published() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: kid\nversion: 1\nsteps:\n  - { name: s, handler: echo, queue: q }\n",
    )
    .await?;
    h.register_yaml(
        "namespace: t\nname: mom\nversion: 1\nsteps:\n  - { name: run, workflow: { name: kid } }\n",
    )
    .await?;
    let id = h.submit("t", "mom", json!({})).await?;
    wait_until(
        &h,
        "SELECT count(*) = 1 FROM steps WHERE queue = 'q' AND state = 'dispatched'
         AND (SELECT count(*) FROM outbox) = 0",
    )
    .await?;
    lose_published_steps(&h, 1).await?;
    let runs = counting_worker(&h).await?;
    let task = h.wait(id).await?;
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    assert_eq!(task.steps[0].output, Some(json!({"s": "s"})));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let children: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE parent_task_id = $1")
        .bind(id.0)
        .fetch_one(&h.db)
        .await?;
    assert_eq!(children, 1);
    assert_applied_once(&h).await?;
    h.finish().await;
    Ok(())
}
