//! Workflow shapes run end to end: chain, diamond, wide fan-out and fan-in, parent outputs.

use serde_json::{Value, json};
use tasker_schemas::{StepState, TaskState};
use tasker_tests::Harness;

fn echo_worker(h: &Harness) -> tasker_tests::tasker_worker::WorkerBuilder {
    h.worker("t")
        .concurrency(32)
        .handler_fn("echo", |ctx| async move {
            let parents: Vec<String> = ctx.parent_outputs().keys().cloned().collect();
            Ok(json!({ "step": ctx.step(), "attempt": ctx.attempt(), "parents": parents }))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linear_chain_runs_in_order() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: chain\nversion: 1\nsteps:\n  - { name: s1, handler: echo }\n  - { name: s2, handler: echo, depends_on: [s1] }\n  - { name: s3, handler: echo, depends_on: [s2] }\n  - { name: s4, handler: echo, depends_on: [s3] }\n",
    )
    .await?;
    h.spawn_worker(echo_worker(&h)).await?;
    let task = h.run("t", "chain", json!({"n": 1})).await?;
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    assert!(
        task.steps
            .iter()
            .all(|s| s.state == StepState::Succeeded && s.attempt == 1)
    );
    // Each step saw exactly its parent.
    assert_eq!(
        task.steps[1].output.as_ref().unwrap()["parents"],
        json!(["s1"])
    );
    assert_eq!(
        task.steps[3].output.as_ref().unwrap()["parents"],
        json!(["s3"])
    );
    // Output of a task = outputs of its leaf steps.
    assert_eq!(task.output.as_ref().unwrap()["s4"]["step"], "s4");
    // Finished in dependency order.
    let finished: Vec<&str> = task
        .steps
        .iter()
        .map(|s| s.attempts[0].finished_at.as_deref().unwrap())
        .collect();
    assert!(finished.windows(2).all(|w| w[0] <= w[1]), "{finished:?}");
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diamond_joins_both_parents_outputs() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: diamond\nversion: 1\nsteps:\n  - { name: a, handler: num }\n  - { name: b, handler: add, depends_on: [a] }\n  - { name: c, handler: add, depends_on: [a] }\n  - { name: d, handler: sum, depends_on: [b, c] }\n",
    )
    .await?;
    h.spawn_worker(
        h.worker("t")
            .handler_fn("num", |ctx| async move {
                Ok(json!(ctx.input::<Value>()?["start"].as_i64().unwrap_or(0)))
            })
            .handler_fn("add", |ctx| async move {
                let a: i64 = ctx.parent("a")?;
                Ok(json!(a + if ctx.step() == "b" { 10 } else { 100 }))
            })
            .handler_fn("sum", |ctx| async move {
                let b: i64 = ctx.parent("b")?;
                let c: i64 = ctx.parent("c")?;
                Ok(json!({ "total": b + c }))
            }),
    )
    .await?;
    let task = h.run("t", "diamond", json!({"start": 1})).await?;
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    // d = (1 + 10) + (1 + 100)
    assert_eq!(task.output, Some(json!({"d": {"total": 112}})));
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_to_1000_and_fan_in() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    let mut yaml = String::from(
        "namespace: t\nname: fan\nversion: 1\nsteps:\n  - { name: root, handler: echo }\n",
    );
    let mut leaves = Vec::new();
    for i in 0..1000 {
        yaml.push_str(&format!(
            "  - {{ name: p{i}, handler: echo, depends_on: [root] }}\n"
        ));
        leaves.push(format!("p{i}"));
    }
    yaml.push_str(&format!(
        "  - {{ name: join, handler: count, depends_on: [{}] }}\n",
        leaves.join(", ")
    ));
    h.register_yaml(&yaml).await?;
    h.spawn_worker(echo_worker(&h).handler_fn("count", |ctx| async move {
        Ok(json!({ "parents": ctx.parent_outputs().len() }))
    }))
    .await?;
    let id = h.submit("t", "fan", json!({})).await?;
    let task = h.wait_for(id, std::time::Duration::from_secs(120)).await?;
    assert_eq!(task.state, TaskState::Completed);
    assert_eq!(task.steps.len(), 1002);
    assert!(task.steps.iter().all(|s| s.state == StepState::Succeeded));
    // The join ran once, with all 1,000 parent outputs.
    let join = task.steps.iter().find(|s| s.name == "join").unwrap();
    assert_eq!(join.attempts.len(), 1);
    assert_eq!(join.output, Some(json!({"parents": 1000})));
    h.finish().await;
    Ok(())
}

/// The in-flight bound per queue holds (and is reached), released slots admit the backlog at
/// once (the backstop poll is an hour here, so the run depends on it), and the queue's slot
/// count is back to zero afterwards, agreeing with a recount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_bound_holds_and_released_slots_admit_the_backlog() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let h = Harness::start_with(|c| {
        c.max_in_flight_per_queue = 3;
        c.poll_interval_ms = 3_600_000;
    })
    .await?;
    let mut yaml = String::from(
        "namespace: t\nname: bounded\nversion: 1\nsteps:\n  - { name: root, handler: slow, queue: narrow }\n",
    );
    for i in 0..20 {
        yaml.push_str(&format!(
            "  - {{ name: p{i}, handler: slow, queue: narrow, depends_on: [root] }}\n"
        ));
    }
    h.register_yaml(&yaml).await?;
    let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (r, m) = (running.clone(), most.clone());
    h.spawn_worker(
        h.worker("t")
            .queue("narrow")
            .concurrency(16)
            .handler_fn("slow", move |_| {
                let (running, most) = (r.clone(), m.clone());
                async move {
                    most.fetch_max(running.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok(json!(null))
                }
            }),
    )
    .await?;
    let id = h.submit("t", "bounded", json!({})).await?;
    let task = h.wait_for(id, std::time::Duration::from_secs(60)).await?;
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    assert_eq!(
        most.load(Ordering::SeqCst),
        3,
        "the bound is 3 and 20 steps were ready"
    );
    let in_flight: i64 = sqlx::query_scalar(
        "SELECT in_flight FROM slots WHERE scope = 'queue' AND key = 't.narrow'",
    )
    .fetch_one(&h.db)
    .await?;
    assert_eq!(in_flight, 0);
    let pool = h.db.clone();
    assert!(
        tasker_orchestrator::store::reconcile::recount_slots(&pool)
            .await?
            .is_empty()
    );
    h.finish().await;
    Ok(())
}
