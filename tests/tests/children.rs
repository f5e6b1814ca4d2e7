//! Child workflows end to end: a step that runs another template as a child task (success,
//! failure retried as the same child, cancel through the parent and directly, a map over
//! children, the depth bound).

use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tasker_schemas::api::{StepView, TaskView};
use tasker_schemas::{StepState, TaskState};
use tasker_tests::Harness;
use tasker_tests::tasker_worker::StepError;

fn step<'a>(task: &'a TaskView, name: &str) -> &'a StepView {
    task.steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step {name} in {task:#?}"))
}

const CHILD: &str = "namespace: t
name: pack
version: 1
steps:
  - { name: box, handler: pack }
  - { name: label, handler: label, depends_on: [box] }
";

const PARENT: &str = "namespace: t
name: order
version: 1
steps:
  - { name: validate, handler: validate }
  - name: packing
    depends_on: [validate]
    workflow: { name: pack, context: { order: validate.order } }
    retry: { max_attempts: 2, initial_delay: 10ms }
  - { name: ship, handler: ship, depends_on: [packing] }
";

fn worker(
    h: &Harness,
    box_failures: Arc<AtomicUsize>,
) -> tasker_tests::tasker_worker::WorkerBuilder {
    h.worker("t")
        .concurrency(16)
        .handler_fn("validate", |ctx| async move {
            Ok(json!({ "order": ctx.input::<Value>()?["order"].clone() }))
        })
        .handler_fn("pack", move |ctx| {
            let failures = box_failures.clone();
            async move {
                let input = ctx.input::<Value>()?;
                if input["order"] == json!("slow") {
                    tokio::select! {
                        _ = ctx.cancelled() => return Err(StepError::retryable("cancelled")),
                        _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                    }
                }
                // Fails for good as often as asked: a failed child task.
                if failures
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
                {
                    return Err(StepError::permanent("no boxes left"));
                }
                Ok(json!({ "boxed": input["order"].clone() }))
            }
        })
        .handler_fn("label", |ctx| async move {
            let boxed: Value = ctx.parent("box")?;
            Ok(json!({ "label": boxed["boxed"].clone() }))
        })
        .handler_fn("ship", |ctx| async move {
            let packed: Value = ctx.parent("packing")?;
            Ok(json!({ "shipped": packed }))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_workflow_runs_and_its_output_is_the_steps() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(CHILD).await?;
    h.register_yaml(PARENT).await?;
    h.spawn_worker(worker(&h, Arc::new(AtomicUsize::new(0))))
        .await?;
    let task = h.run("t", "order", json!({"order": 42})).await?;
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    let packing = step(&task, "packing");
    assert_eq!(packing.output, Some(json!({"label": {"label": 42}})));
    let child_id = packing.child_task_id.expect("the child's id");
    assert_eq!(
        task.output,
        Some(json!({"ship": {"shipped": {"label": {"label": 42}}}}))
    );
    let child = h.client().task(child_id).await?;
    assert_eq!(child.state, TaskState::Completed);
    assert_eq!(child.context, json!({"order": 42}), "the YAML mapping");
    let parent = child.parent.expect("the child links to its parent");
    assert_eq!((parent.task_id, parent.step.as_str()), (task.id, "packing"));
    assert!(
        task.events.iter().any(|e| e.kind == "child_started"
            && e.detail.as_ref().unwrap()["child_task_id"] == json!(child_id)),
        "{:#?}",
        task.events
    );
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_child_is_retried_as_the_same_child() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(CHILD).await?;
    h.register_yaml(PARENT).await?;
    h.spawn_worker(worker(&h, Arc::new(AtomicUsize::new(1))))
        .await?;
    let task = h.run("t", "order", json!({"order": 7})).await?;
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    let packing = step(&task, "packing");
    assert_eq!(packing.attempt, 2, "{packing:#?}");
    assert_eq!(packing.attempts[0].outcome, "failed");
    assert!(
        packing.attempts[0]
            .error
            .as_deref()
            .unwrap()
            .contains("no boxes left"),
        "{packing:#?}"
    );
    let child = h.client().task(packing.child_task_id.unwrap()).await?;
    assert_eq!(child.state, TaskState::Completed);
    assert!(
        child.events.iter().any(|e| e.kind == "retried"),
        "the same child was retried: {:#?}",
        child.events
    );
    // Only one child task exists for the step.
    let children: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE parent_task_id = $1")
        .bind(task.id.0)
        .fetch_one(&h.db)
        .await?;
    assert_eq!(children, 1);
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_the_parent_cancels_its_child_and_a_child_cancelled_directly_fails_its_step()
-> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(CHILD).await?;
    h.register_yaml(PARENT).await?;
    h.spawn_worker(worker(&h, Arc::new(AtomicUsize::new(0))))
        .await?;
    let child_of = |h: &Harness, id| {
        let db = h.db.clone();
        async move {
            for _ in 0..250 {
                let child: Option<uuid::Uuid> = sqlx::query_scalar(
                    "SELECT child_task_id FROM steps WHERE task_id = $1 AND name = 'packing'",
                )
                .bind(id)
                .fetch_one(&db)
                .await?;
                if let Some(c) = child {
                    return anyhow::Ok(tasker_schemas::TaskId(c));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::bail!("no child started")
        }
    };

    // Through the parent.
    let id = h.submit("t", "order", json!({"order": "slow"})).await?;
    let child = child_of(&h, id.0).await?;
    h.client()
        .cancel(id, Some("customer changed their mind"))
        .await?;
    let task = h.wait(id).await?;
    assert_eq!(task.state, TaskState::Cancelled, "{task:#?}");
    assert_eq!(step(&task, "packing").state, StepState::Cancelled);
    let child = h.wait(child).await?;
    assert_eq!(child.state, TaskState::Cancelled, "{child:#?}");
    assert!(
        child
            .error
            .as_deref()
            .unwrap()
            .contains(&format!("its parent task {id} was cancelled")),
        "{child:#?}"
    );

    // Directly: the parent's step fails for good (no retry, though it has attempts left).
    let id = h.submit("t", "order", json!({"order": "slow"})).await?;
    let child = child_of(&h, id.0).await?;
    h.client().cancel(child, None).await?;
    let task = h.wait(id).await?;
    assert_eq!(task.state, TaskState::Failed, "{task:#?}");
    let packing = step(&task, "packing");
    assert_eq!((packing.state, packing.attempt), (StepState::Failed, 1));
    assert!(
        packing
            .error
            .as_deref()
            .unwrap()
            .contains(&format!("child task {child} was cancelled")),
        "{packing:#?}"
    );
    assert_eq!(step(&task, "ship").state, StepState::Skipped);
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_over_child_workflows() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(CHILD).await?;
    h.register_yaml(
        "namespace: t
name: batch
version: 1
steps:
  - { name: list, handler: list }
  - name: each
    depends_on: [list]
    map: { over: list.orders, max_parallel: 2 }
    workflow: { name: pack, context: { order: item } }
",
    )
    .await?;
    h.spawn_worker(
        worker(&h, Arc::new(AtomicUsize::new(0))).handler_fn("list", |_ctx| async move {
            Ok(json!({ "orders": ["a", "b", "c", "d", "e"] }))
        }),
    )
    .await?;
    let task = h.run("t", "batch", json!({})).await?;
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    let out = step(&task, "each").output.clone().unwrap();
    assert_eq!(
        out,
        json!(
            ["a", "b", "c", "d", "e"]
                .iter()
                .map(|o| json!({"label": {"label": o}}))
                .collect::<Vec<_>>()
        )
    );
    let children: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasks WHERE parent_task_id = $1 AND state = 'completed'",
    )
    .bind(task.id.0)
    .fetch_one(&h.db)
    .await?;
    assert_eq!(children, 5);
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_workflows_nest_at_most_eight_deep() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    // Runs itself: each task starts a child until the bound stops it.
    h.register_yaml(
        "namespace: t\nname: deep\nversion: 1\nsteps:\n  - { name: down, workflow: { name: deep }, retry: { max_attempts: 1 } }\n",
    )
    .await?;
    let id = h.submit("t", "deep", json!({})).await?;
    let task = h.wait(id).await?;
    assert_eq!(task.state, TaskState::Failed, "{task:#?}");
    let depth: i32 = sqlx::query_scalar("SELECT max(depth) FROM tasks")
        .fetch_one(&h.db)
        .await?;
    assert_eq!(depth, 8);
    let deepest_error: String = sqlx::query_scalar(
        "SELECT s.error FROM steps s JOIN tasks t ON t.id = s.task_id WHERE t.depth = 8",
    )
    .fetch_one(&h.db)
    .await?;
    assert_eq!(
        deepest_error,
        "child workflow depth 9 exceeds the limit of 8"
    );
    assert!(
        step(&task, "down")
            .error
            .as_deref()
            .unwrap()
            .contains("failed"),
        "{task:#?}"
    );
    h.finish().await;
    Ok(())
}
