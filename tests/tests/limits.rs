//! Data caps the orchestrator enforces on what tasks produce: a task's output (its leaf steps'
//! outputs together) and a step message's data, refused before the message is assembled.

use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tasker_schemas::{StepState, TaskState};
use tasker_tests::Harness;
use tasker_tests::tasker_worker::StepError;

fn step<'a>(
    task: &'a tasker_schemas::api::TaskView,
    name: &str,
) -> &'a tasker_schemas::api::StepView {
    task.steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step {name} in {task:#?}"))
}

/// A string of `n` bytes (as JSON: `n + 2`).
fn blob(n: usize) -> Value {
    Value::String("x".repeat(n))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_leaf_outputs_are_over_the_task_output_limit_fails_naming_it()
-> anyhow::Result<()> {
    let h = Harness::start_with(|c| c.max_task_output_bytes = 2_000).await?;
    h.register_yaml(
        "namespace: t
name: big_leaves
version: 1
steps:
  - { name: root, handler: sized }
  - { name: left, handler: sized, depends_on: [root] }
  - { name: right, handler: sized, depends_on: [root] }
on_failure: { handler: compensate }
",
    )
    .await?;
    h.spawn_worker(
        h.worker("t")
            .handler_fn("sized", |ctx| async move {
                // Each leaf's output is within the step limit; together they are not (when asked).
                let n = ctx.context()["leaf_bytes"].as_u64().unwrap_or(10) as usize;
                Ok(json!({"data": blob(if ctx.step() == "root" { 10 } else { n })}))
            })
            .handler_fn("compensate", |ctx| async move {
                let failure = ctx.failure().cloned().expect("the failure");
                Ok::<_, StepError>(json!({"step": failure.step, "error": failure.error}))
            }),
    )
    .await?;

    // Under the limit: completes, with both leaves in its output.
    let small = h.run("t", "big_leaves", json!({"leaf_bytes": 500})).await?;
    assert_eq!(small.state, TaskState::Completed, "{small:#?}");
    let output = small.output.as_ref().expect("output");
    assert!(
        output.get("left").is_some() && output.get("right").is_some(),
        "{output}"
    );

    // Over it: 2 × ~1 200 bytes. The task fails with both sizes in its error, keeps no output,
    // and its failure handler runs with the task's error (no step failed: `step` is "").
    let big = h
        .run("t", "big_leaves", json!({"leaf_bytes": 1_200}))
        .await?;
    assert_eq!(big.state, TaskState::Failed, "{big:#?}");
    assert_eq!(big.output, None);
    let error = big.error.as_deref().expect("an error");
    assert!(
        error.contains("task output is") && error.contains("over the limit of 2000 bytes"),
        "{error}"
    );
    for leaf in ["left", "right"] {
        assert_eq!(step(&big, leaf).state, StepState::Succeeded);
    }
    let handler = step(&big, "on_failure");
    assert_eq!(handler.state, StepState::Succeeded, "{big:#?}");
    assert_eq!(
        handler.output,
        Some(json!({"step": "", "error": error})),
        "the handler sees the task's error"
    );
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_message_over_the_limit_is_refused_before_it_is_assembled() -> anyhow::Result<()> {
    let h = Harness::start_with(|c| c.max_step_message_bytes = 4_000).await?;
    h.register_yaml(
        "namespace: t
name: fat_parent
version: 1
steps:
  - { name: produce, handler: produce }
  - { name: consume, handler: consume, depends_on: [produce] }
",
    )
    .await?;
    let consumed = Arc::new(AtomicUsize::new(0));
    let c = consumed.clone();
    h.spawn_worker(
        h.worker("t")
            .handler_fn("produce", |ctx| async move {
                let n = ctx.context()["bytes"].as_u64().unwrap_or(10) as usize;
                Ok::<_, StepError>(json!({"data": blob(n)}))
            })
            .handler_fn("consume", move |_ctx| {
                let c = c.clone();
                async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, StepError>(json!({"ok": true}))
                }
            }),
    )
    .await?;

    let fits = h.run("t", "fat_parent", json!({"bytes": 1_000})).await?;
    assert_eq!(fits.state, TaskState::Completed, "{fits:#?}");
    assert_eq!(consumed.load(Ordering::SeqCst), 1);

    // The context (~2 KB) plus the parent's output (~3 KB) are over 4 000 bytes as JSON: the
    // consumer's message is never assembled nor sent, and the step fails for good at once.
    let context = json!({"bytes": 3_000, "pad": blob(2_000)});
    let task = h.run("t", "fat_parent", context).await?;
    assert_eq!(task.state, TaskState::Failed, "{task:#?}");
    let consume = step(&task, "consume");
    assert_eq!(consume.state, StepState::Failed);
    assert_eq!(consume.attempt, 1, "not retried: {consume:#?}");
    let error = consume.error.as_deref().expect("an error");
    assert!(
        error.contains("step message would be over the limit of 4000 bytes")
            && error.contains("bytes as JSON"),
        "{error}"
    );
    assert_eq!(
        consumed.load(Ordering::SeqCst),
        1,
        "the handler never saw it"
    );
    h.finish().await;
    Ok(())
}
