//! Retries with backoff, fail-fast, exhausted attempts, missing handlers and lease timeouts.

use chrono::DateTime;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tasker_schemas::{StepState, TaskState};
use tasker_tests::Harness;
use tasker_tests::tasker_worker::StepError;

fn at(s: &str) -> DateTime<chrono::FixedOffset> {
    DateTime::parse_from_rfc3339(s).expect("RFC 3339 time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_twice_then_succeeds_with_backoff() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: flaky\nversion: 1\nsteps:\n  - name: s\n    handler: flaky\n    retry: { max_attempts: 3, initial_delay: 200ms, multiplier: 2.0, max_delay: 10s, jitter: 0.0 }\n",
    )
    .await?;
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    h.spawn_worker(h.worker("t").handler_fn("flaky", move |ctx| {
        let c = c.clone();
        async move {
            c.fetch_add(1, Ordering::SeqCst);
            if ctx.attempt() < 3 {
                Err(StepError::retryable(format!("flake {}", ctx.attempt())))
            } else {
                Ok(json!({"ok": ctx.attempt()}))
            }
        }
    }))
    .await?;
    let task = h.run("t", "flaky", json!({})).await?;
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    let s = &task.steps[0];
    assert_eq!((s.attempt, s.failures), (3, 2));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let outcomes: Vec<&str> = s.attempts.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(outcomes, ["failed", "failed", "succeeded"]);
    assert_eq!(s.attempts[0].error.as_deref(), Some("flake 1"));
    // Backoff: 200 ms after the first failure, 400 ms after the second.
    let gap1 = at(&s.attempts[1].dispatched_at) - at(s.attempts[0].finished_at.as_deref().unwrap());
    let gap2 = at(&s.attempts[2].dispatched_at) - at(s.attempts[1].finished_at.as_deref().unwrap());
    assert!(
        gap1.num_milliseconds() >= 195,
        "first backoff too short: {gap1}"
    );
    assert!(
        gap2.num_milliseconds() >= 395,
        "second backoff too short: {gap2}"
    );
    assert_eq!(s.output, Some(json!({"ok": 3})));
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_fails_fast_and_skips_dependants() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    // a -> (bad -> after_bad), (slow -> after_slow)
    h.register_yaml(
        "namespace: t\nname: ff\nversion: 1\nsteps:\n  - { name: a, handler: ok }\n  - { name: bad, handler: bad, depends_on: [a] }\n  - { name: slow, handler: slow, depends_on: [a] }\n  - { name: after_bad, handler: ok, depends_on: [bad] }\n  - { name: after_slow, handler: ok, depends_on: [slow] }\n",
    )
    .await?;
    h.spawn_worker(
        h.worker("t")
            .handler_fn("ok", |_| async { Ok(json!("ok")) })
            .handler_fn("bad", |_| async {
                Err(StepError::permanent("card declined"))
            })
            .handler_fn("slow", |_| async {
                tokio::time::sleep(Duration::from_millis(500)).await;
                Ok(json!("slow done"))
            }),
    )
    .await?;
    let task = h.run("t", "ff", json!({})).await?;
    let state = |n: &str| task.steps.iter().find(|s| s.name == n).unwrap().state;
    assert_eq!(task.state, TaskState::Failed, "{task:#?}");
    let err = task.error.clone().unwrap();
    assert!(
        err.contains("bad") && err.contains("card declined"),
        "{err}"
    );
    assert_eq!(state("a"), StepState::Succeeded);
    assert_eq!(state("bad"), StepState::Failed);
    // Permanent: no retry although max_attempts is 3 by default.
    assert_eq!(
        task.steps.iter().find(|s| s.name == "bad").unwrap().attempt,
        1
    );
    // The sibling already dispatched finished and was recorded; nothing new was admitted.
    assert_eq!(state("slow"), StepState::Succeeded);
    assert_eq!(state("after_bad"), StepState::Skipped);
    assert_eq!(state("after_slow"), StepState::Skipped);
    assert!(task.finished_at.is_some() && task.output.is_none());
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_fail_the_task() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: never\nversion: 1\nsteps:\n  - name: s\n    handler: never\n    retry: { max_attempts: 3, initial_delay: 20ms, max_delay: 50ms }\n  - { name: next, handler: never, depends_on: [s] }\n",
    )
    .await?;
    h.spawn_worker(h.worker("t").handler_fn("never", |_| async {
        Err(StepError::retryable("still broken"))
    }))
    .await?;
    let task = h.run("t", "never", json!({})).await?;
    assert_eq!(task.state, TaskState::Failed);
    let s = &task.steps[0];
    assert_eq!((s.state, s.attempt, s.failures), (StepState::Failed, 3, 3));
    assert_eq!(s.attempts.len(), 3);
    assert!(
        s.error
            .as_deref()
            .unwrap()
            .contains("gave up after 3 attempts"),
        "{:?}",
        s.error
    );
    assert_eq!(task.steps[1].state, StepState::Skipped);
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_handler_is_rescheduled_without_spending_attempts() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: ghost\nversion: 1\nsteps:\n  - name: s\n    handler: ghost\n    retry: { max_attempts: 1 }\n",
    )
    .await?;
    // An old worker without the handler (a rolling deploy): unchecked, it lacks one on purpose.
    let old = h
        .start_worker_unchecked(
            h.worker("t")
                .name("old-worker")
                .handler_fn("other", |_| async { Ok(json!(null)) }),
        )
        .await?;
    let id = h.submit("t", "ghost", json!({})).await?;
    // Let it be refused a few times; the task must not fail (max_attempts is 1).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let view = h.client().task(id).await?;
    assert_eq!(view.state, TaskState::Running);
    assert!(
        view.steps[0]
            .attempts
            .iter()
            .any(|a| a.outcome == "handler_missing"
                && a.error.as_deref().unwrap_or("").contains("old-worker")
                && a.error.as_deref().unwrap_or("").contains("ghost"))
    );
    old.stop().await?;
    h.spawn_worker(
        h.worker("t")
            .handler_fn("ghost", |_| async { Ok(json!("boo")) }),
    )
    .await?;
    let task = h.wait(id).await?;
    assert_eq!(task.state, TaskState::Completed);
    assert_eq!(task.steps[0].failures, 0);
    assert!(task.steps[0].attempt >= 2);
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_attempts_time_out_and_are_retried() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: lost\nversion: 1\nsteps:\n  - name: s\n    handler: h\n    queue: nobody\n    queue_wait_timeout: 200ms\n    execution_timeout: 200ms\n    retry: { max_attempts: 2, initial_delay: 10ms, max_delay: 10ms }\n",
    )
    .await?;
    // No worker consumes queue "nobody": each lease expires.
    let task = h.run("t", "lost", json!({})).await?;
    assert_eq!(task.state, TaskState::Failed);
    let s = &task.steps[0];
    let outcomes: Vec<&str> = s.attempts.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(outcomes, ["timed_out", "timed_out"]);
    assert!(
        s.attempts[0]
            .error
            .as_deref()
            .unwrap()
            .contains("queue-wait"),
        "{:?}",
        s.attempts[0].error
    );
    assert!(h.shared(0).metrics.value("tasker_timeouts_total") as u64 >= 2);
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_timeout_counts_as_a_retryable_failure() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: slow\nversion: 1\nsteps:\n  - name: s\n    handler: slow\n    execution_timeout: 300ms\n    retry: { max_attempts: 2, initial_delay: 10ms, max_delay: 10ms }\n",
    )
    .await?;
    h.spawn_worker(h.worker("t").handler_fn("slow", |ctx| async move {
        if ctx.attempt() == 1 {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        Ok(json!(ctx.attempt()))
    }))
    .await?;
    let task = h.run("t", "slow", json!({})).await?;
    assert_eq!(task.state, TaskState::Completed);
    let s = &task.steps[0];
    assert_eq!(s.attempts[0].outcome, "failed");
    assert!(
        s.attempts[0]
            .error
            .as_deref()
            .unwrap()
            .contains("timed out"),
        "{:?}",
        s.attempts[0].error
    );
    assert_eq!(s.output, Some(json!(2)));
    h.finish().await;
    Ok(())
}

/// The timer sleeps until the next due retry; with none scheduled it must report none (it once
/// reported "due now" and spun every millisecond).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn next_retry_is_none_without_retries_and_the_due_time_with_one() -> anyhow::Result<()> {
    use tasker_orchestrator::store::timers::next_retry_in_ms;
    let h = Harness::start().await?;
    assert_eq!(next_retry_in_ms(&h.db).await?, None);
    h.register_yaml(
        "namespace: t\nname: slow-retry\nversion: 1\nsteps:\n  - name: s\n    handler: fails\n    retry: { max_attempts: 2, initial_delay: 60s, jitter: 0.0 }\n",
    )
    .await?;
    h.spawn_worker(h.worker("t").handler_fn("fails", |_ctx| async move {
        Err::<serde_json::Value, _>(StepError::retryable("not yet"))
    }))
    .await?;
    let id = h.submit("t", "slow-retry", json!({})).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let due = loop {
        if let Some(ms) = next_retry_in_ms(&h.db).await? {
            break ms;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "task {id} never scheduled its retry"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        (50_000..=60_000).contains(&due),
        "retry due in {due} ms, expected about 60 s"
    );
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_handler_fails_the_step_after_its_queue_wait_timeout() -> anyhow::Result<()> {
    let h = Harness::start_with(|c| c.handler_missing_delay_ms = 200).await?;
    h.register_yaml(
        "namespace: t\nname: nohandler\nversion: 1\nsteps:\n  - name: s\n    handler: ghost\n    queue_wait_timeout: 1s\n",
    )
    .await?;
    h.spawn_worker_unchecked(
        h.worker("t")
            .name("lonely-worker")
            .handler_fn("other", |_| async { Ok(json!(null)) }),
    )
    .await?;
    let started = std::time::Instant::now();
    let task = h.run("t", "nohandler", json!({})).await?;
    assert_eq!(task.state, TaskState::Failed, "{task:#?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let s = &task.steps[0];
    assert_eq!(s.state, StepState::Failed);
    let error = s.error.as_deref().unwrap();
    assert!(
        error
            .starts_with("no worker has handler \"ghost\": reported missing by lonely-worker for "),
        "{error}"
    );
    assert!(error.ends_with("(queue_wait_timeout 1000 ms)"), "{error}");
    // Attempt numbers grew with every offer; the history holds one row for the whole streak.
    assert!(s.attempt >= 3, "{s:#?}");
    assert_eq!(s.attempts.len(), 1, "{:#?}", s.attempts);
    let streak = &s.attempts[0];
    assert_eq!(streak.outcome, "handler_missing");
    assert_eq!((streak.attempt, streak.repeats), (1, s.attempt));
    assert_eq!(s.failures, 0, "a missing handler spends no attempt");
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_error_texts_are_cut_and_long_cancel_reasons_refused() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: wordy\nversion: 1\nsteps:\n  - { name: s, handler: wordy, retry: { max_attempts: 1 } }\n  - { name: after, handler: wordy, depends_on: [s], queue: nobody }\n",
    )
    .await?;
    h.spawn_worker(h.worker("t").handler_fn("wordy", |_| async {
        Err::<serde_json::Value, _>(StepError::permanent("x".repeat(100_000)))
    }))
    .await?;
    let task = h.run("t", "wordy", json!({})).await?;
    assert_eq!(task.state, TaskState::Failed);
    let error = task.steps[0].error.as_deref().unwrap();
    assert!(error.len() < 4_200, "{}", error.len());
    assert!(
        error.ends_with("(cut: 100000 bytes, at most 4096 are kept)"),
        "{}",
        &error[4_000..]
    );

    let id = h.submit("t", "wordy", json!({})).await?;
    let err = h
        .client()
        .cancel(id, Some(&"why ".repeat(300)))
        .await
        .unwrap_err();
    let tasker_tests::tasker_worker::ClientError::Api {
        status,
        code,
        message,
        ..
    } = err
    else {
        panic!("{err:?}")
    };
    assert_eq!((status, code.as_str()), (400, "invalid_request"));
    assert!(
        message.contains("reason is 1200 bytes; at most 1024"),
        "{message}"
    );
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_task_retried_runs_on_the_workers_that_saw_the_cancel() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: again\nversion: 1\nsteps:\n  - { name: s, handler: slow }\n  - { name: after, handler: slow, depends_on: [s] }\n",
    )
    .await?;
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    h.spawn_worker(h.worker("t").handler_fn("slow", move |ctx| {
        let c = c.clone();
        async move {
            // The first call runs until its task is cancelled; the later ones return at once.
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                ctx.cancelled().await;
                return Err(StepError::retryable("cancelled"));
            }
            Ok(json!(ctx.step()))
        }
    }))
    .await?;
    let id = h.submit("t", "again", json!({})).await?;
    for _ in 0..250 {
        if calls.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.client().cancel(id, None).await?;
    assert_eq!(h.wait(id).await?.state, TaskState::Cancelled);
    // The worker saw the cancel; the retried task's steps are published after it and run.
    h.client().retry(id).await?;
    let task = h.wait(id).await?;
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    assert_eq!(task.steps[0].output, Some(json!("s")));
    h.finish().await;
    Ok(())
}
