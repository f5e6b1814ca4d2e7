//! `/metrics` as an operator sees it during a run: every gauge, histogram and counter named in
//! the docs is present and moves (ready steps rise under a backlog and fall, histograms count the
//! steps that ran, labels name the namespace and never a task).

use serde_json::json;
use std::time::Duration;
use tasker_orchestrator::metrics::sum_of;
use tasker_schemas::TaskState;
use tasker_tests::Harness;
use tasker_tests::tasker_worker::StepError;

async fn scrape(h: &Harness) -> anyhow::Result<String> {
    let url = format!("{}/metrics", h.client().base_url());
    Ok(reqwest::get(url).await?.error_for_status()?.text().await?)
}

/// Scrapes until `ok` holds for the text (gauges refresh every 200 ms here).
async fn scrape_until(
    h: &Harness,
    what: &str,
    ok: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let mut text = String::new();
    for _ in 0..150 {
        text = scrape(h).await?;
        if ok(&text) {
            return Ok(text);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("{what}: not seen in /metrics:\n{text}")
}

/// The value of one series, e.g. `tasker_queue_ready_steps{namespace="obs",queue="default"}`.
fn series(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_backlog_progress_and_timings() -> anyhow::Result<()> {
    let h = Harness::start_with(|c| {
        c.metrics_interval_ms = 200;
        c.max_in_flight_per_queue = 2;
    })
    .await?;
    h.register_yaml(
        "namespace: obs
name: pair
version: 1
steps:
  - { name: a, handler: ok }
  - { name: b, handler: ok, depends_on: [a] }
",
    )
    .await?;
    h.register_yaml(
        "namespace: obs
name: flaky
version: 1
steps:
  - name: s
    handler: flaky
    queue: slow
    retry: { max_attempts: 2, initial_delay: 3s, jitter: 0.0 }
",
    )
    .await?;

    // A backlog with no worker: two steps in flight (the bound), the rest ready in PostgreSQL.
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(h.submit("obs", "pair", json!({})).await?);
    }
    let ready = r#"tasker_queue_ready_steps{namespace="obs",queue="default"}"#;
    let text = scrape_until(&h, "a backlog of ready steps", |t| {
        series(t, ready) == Some(8.0)
    })
    .await?;
    assert_eq!(
        series(
            &text,
            r#"tasker_queue_in_flight_steps{namespace="obs",queue="default"}"#
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        series(
            &text,
            r#"tasker_tasks_running{namespace="obs",template="pair"}"#
        ),
        Some(10.0)
    );
    assert_eq!(
        series(&text, r#"tasker_tasks_submitted_total{namespace="obs"}"#),
        Some(10.0)
    );
    // The oldest ready step keeps ageing while nothing takes it.
    let age = r#"tasker_queue_oldest_ready_age_seconds{namespace="obs",queue="default"}"#;
    let first = series(&text, age).expect("an age");
    let text = scrape_until(&h, "the oldest ready step ageing", |t| {
        series(t, age).is_some_and(|a| a > first + 0.3)
    })
    .await?;
    assert!(!text.contains("task_id"), "labels never name a task");

    // A retry waiting for its backoff, and a dead letter.
    let flaky = h.submit("obs", "flaky", json!({})).await?;
    h.spawn_worker(
        h.worker("obs")
            .queue("default")
            .queue("slow")
            .handler_fn("ok", |_ctx| async move { Ok(json!({"ok": true})) })
            .handler_fn("flaky", |ctx| async move {
                if ctx.attempt() == 1 {
                    Err(StepError::retryable("not yet"))
                } else {
                    Ok(json!({"ok": true}))
                }
            }),
    )
    .await?;
    scrape_until(&h, "a step waiting for its retry", |t| {
        series(t, r#"tasker_steps_retrying{namespace="obs",queue="slow"}"#) == Some(1.0)
    })
    .await?;
    for id in &ids {
        assert_eq!(h.wait(*id).await?.state, TaskState::Completed);
    }
    assert_eq!(h.wait(flaky).await?.state, TaskState::Completed);

    // Drained: the gauges fall back to 0, and the histograms counted every step.
    let text = scrape_until(&h, "the backlog drained", |t| {
        series(t, ready) == Some(0.0)
            && sum_of(t, "tasker_queue_in_flight_steps") == 0.0
            && sum_of(t, "tasker_tasks_running") == 0.0
            && sum_of(t, "tasker_steps_retrying") == 0.0
    })
    .await?;
    let steps = 10.0 * 2.0 + 2.0; // pairs, plus the flaky step's two attempts
    for histogram in [
        r#"tasker_step_end_to_end_seconds_count{namespace="obs"}"#,
        r#"tasker_step_execution_seconds_count{namespace="obs"}"#,
        r#"tasker_step_queue_wait_seconds_count{namespace="obs"}"#,
    ] {
        assert_eq!(series(&text, histogram), Some(steps), "{histogram}\n{text}");
    }
    assert_eq!(
        series(
            &text,
            r#"tasker_task_duration_seconds_count{namespace="obs",template="pair",state="completed"}"#
        ),
        Some(10.0),
        "{text}"
    );
    assert_eq!(
        series(&text, r#"tasker_tasks_completed_total{namespace="obs"}"#),
        Some(11.0)
    );
    assert_eq!(
        series(
            &text,
            r#"tasker_results_applied_total{namespace="obs",outcome="succeeded"}"#
        ),
        Some(21.0)
    );
    assert_eq!(
        series(
            &text,
            r#"tasker_results_applied_total{namespace="obs",outcome="failed"}"#
        ),
        Some(1.0)
    );
    assert!(
        sum_of(&text, "tasker_apply_batch_size_count") >= 1.0,
        "{text}"
    );
    assert!(sum_of(&text, "tasker_apply_batch_seconds_count") >= 1.0);
    assert!(
        sum_of(&text, "tasker_publish_confirm_seconds_count") >= steps,
        "{text}"
    );
    for help in [
        "# TYPE tasker_step_end_to_end_seconds histogram",
        "# TYPE tasker_queue_ready_steps gauge",
        "# TYPE tasker_tasks_completed_total counter",
        "# HELP tasker_queue_oldest_ready_age_seconds",
    ] {
        assert!(text.contains(help), "{help}\n{text}");
    }

    // A message nobody can read: dead-lettered, and the dead-letter queue's depth shows it.
    let conn = lapin::Connection::connect(&h.services.amqp_url, Default::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(Default::default()).await?;
    ch.basic_publish(
        h.names().results_exchange().into(),
        "obs.0".into(),
        Default::default(),
        b"not msgpack",
        lapin::BasicProperties::default().with_delivery_mode(2),
    )
    .await?
    .await?;
    conn.close(200, "bye".into()).await?;
    let dlq = format!(
        r#"tasker_dead_letters{{queue="{}"}}"#,
        h.names().dead_letter_queue()
    );
    scrape_until(&h, "the dead letter counted", |t| {
        series(t, &dlq) == Some(1.0)
    })
    .await?;
    h.finish().await;
    Ok(())
}
