//! Time: durable sleeps (`sleep`, `sleep_until`), signals and `wait_for` (kept
//! before the step, deduplicated, refused, timed out), delayed start and task deadlines, each
//! through the real orchestrator, PostgreSQL and RabbitMQ; sleeps and kept signals across an
//! orchestrator kill.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tasker_schemas::api::SubmitTask;
use tasker_schemas::{Millis, StepState, TaskId, TaskState};
use tasker_tests::Harness;
use tasker_tests::tasker_worker::StepError;
use tasker_tests::tasker_worker::amqp_submit::{confirm_channel, publish_signal};

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{text:?}: {e}"))
        .with_timezone(&Utc)
}

fn ms_between(from: DateTime<Utc>, to: DateTime<Utc>) -> i64 {
    (to - from).num_milliseconds()
}

/// `POST` a JSON body to the first orchestrator; the status and the answer.
async fn post(h: &Harness, path: &str, body: Value) -> anyhow::Result<(u16, Value)> {
    let url = format!("{}{path}", h.client().base_url());
    let r = reqwest::Client::new().post(url).json(&body).send().await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await?))
}

async fn signal(
    h: &Harness,
    id: TaskId,
    name: &str,
    signal_id: &str,
    payload: Value,
) -> anyhow::Result<(u16, Value)> {
    post(
        h,
        &format!("/v1/tasks/{id}/signals/{name}"),
        json!({ "signal_id": signal_id, "payload": payload }),
    )
    .await
}

/// Polls the task until step `step` is in `state`; returns its why-waiting text.
async fn until_step(
    h: &Harness,
    id: TaskId,
    step: &str,
    state: StepState,
) -> anyhow::Result<String> {
    for _ in 0..200 {
        let t = h.client().task(id).await?;
        if let Some(s) = t.steps.iter().find(|s| s.name == step)
            && s.state == state
        {
            return Ok(s.waiting_reason.clone().unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("step {step} of {id} never reached {state}")
}

fn submit(template: &str) -> SubmitTask {
    SubmitTask {
        namespace: "time".into(),
        template: template.into(),
        version: None,
        context: json!({}),
        idempotency_key: None,
        priority: 0,
        task_id: None,
        run_at: None,
        delay: None,
        deadline: None,
    }
}

const SLEEPS: &str = "
namespace: time
name: sleeps
version: 1
steps:
  - { name: stamp, handler: stamp }
  - { name: nap, depends_on: [stamp], sleep: 1200ms }
  - { name: until, depends_on: [stamp], sleep_until: stamp.times.resume_at }
  - { name: past, depends_on: [stamp], sleep_until: stamp.times.past }
  - { name: done, handler: echo, depends_on: [nap, until, past] }
";

const BAD_UNTIL: &str = "
namespace: time
name: bad_until
version: 1
steps:
  - { name: stamp, handler: stamp }
  - { name: until, depends_on: [stamp], sleep_until: stamp.times.nope }
";

fn stamping_worker(h: &Harness) -> tasker_tests::tasker_worker::WorkerBuilder {
    h.worker("time")
        .handler_fn("stamp", |_| async move {
            let resume = Utc::now() + chrono::Duration::milliseconds(800);
            Ok(json!({ "times": {
                "resume_at": resume.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                "past": "2000-01-01T00:00:00Z",
                "nope": 42,
            }}))
        })
        .handler_fn("echo", |_| async move { Ok(json!("ok")) })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sleeps_wake_after_their_time_and_a_past_time_at_once() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(SLEEPS).await?;
    h.register_yaml(BAD_UNTIL).await?;
    h.spawn_worker(stamping_worker(&h)).await?;
    let id = h.submit("time", "sleeps", json!({})).await?;
    let why = until_step(&h, id, "nap", StepState::Delegated).await?;
    assert!(why.starts_with("sleeping until 20"), "{why}");
    let task = h.wait_for(id, Duration::from_secs(20)).await?;
    assert_eq!(task.state, TaskState::Completed, "{:?}", task.error);
    let step = |name: &str| task.steps.iter().find(|s| s.name == name).unwrap();
    let began = |name: &str| at(&step(name).attempts[0].dispatched_at);
    let woke = |name: &str| {
        at(step(name).output.as_ref().unwrap()["woke_at"]
            .as_str()
            .unwrap())
    };
    // A sleep wakes after its duration (no sooner), counted from when it became ready.
    let slept = ms_between(began("nap"), woke("nap"));
    assert!((1_200..5_000).contains(&slept), "nap slept {slept} ms");
    // sleep_until wakes at the time in the parent's output; a past time at once.
    let resume = at(step("stamp").output.as_ref().unwrap()["times"]["resume_at"]
        .as_str()
        .unwrap());
    assert!(woke("until") >= resume, "woke before {resume}");
    let late = ms_between(began("past"), woke("past"));
    assert!(late < 1_000, "a past time waited {late} ms");
    assert_eq!(step("nap").attempts[0].outcome, "succeeded");

    // A path that holds no time fails the step, saying so.
    let bad = h.submit("time", "bad_until", json!({})).await?;
    let task = h.wait_for(bad, Duration::from_secs(20)).await?;
    assert_eq!(task.state, TaskState::Failed);
    let error = task.error.unwrap_or_default();
    assert!(
        error.contains("sleep_until \"stamp.times.nope\" found a number, not an RFC 3339 time"),
        "{error}"
    );
    h.finish().await;
    Ok(())
}

const NAP_THEN_APPROVE: &str = "
namespace: time
name: nap_then_approve
version: 1
steps:
  - { name: nap, sleep: 1500ms }
  - name: approve
    depends_on: [nap]
    wait_for: { signal: approval, timeout: 30s }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleep_and_kept_signals_survive_an_orchestrator_kill() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(NAP_THEN_APPROVE).await?;
    let id = h.submit("time", "nap_then_approve", json!({})).await?;
    until_step(&h, id, "nap", StepState::Delegated).await?;
    // Signals before their step is reached are kept; the step takes the oldest.
    let (status, first) = signal(&h, id, "approval", "a-1", json!({"by": "ana"})).await?;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["consumed_by"], Value::Null, "kept: {first}");
    let (status, _) = signal(&h, id, "approval", "a-2", json!({"by": "bo"})).await?;
    assert_eq!(status, 201);
    let task = h.client().task(id).await?;
    let approve = task.steps.iter().find(|s| s.name == "approve").unwrap();
    assert_eq!(approve.state, StepState::Waiting);

    // The only orchestrator dies while the step sleeps; a new one takes over from the database.
    h.take_orchestrator(0).kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.start_orchestrator().await?;
    let task = h.wait_for(id, Duration::from_secs(20)).await?;
    assert_eq!(task.state, TaskState::Completed, "{:?}", task.error);
    // The new replica woke the sleep and applied the signal.
    let applied = h.shared(0).metrics.value("tasker_results_applied_total");
    assert!(
        applied >= 2.0,
        "the new orchestrator applied {applied} outcomes"
    );
    let approve = task.steps.iter().find(|s| s.name == "approve").unwrap();
    assert_eq!(
        approve.output,
        Some(json!({"by": "ana"})),
        "the oldest signal"
    );
    let nap = task.steps.iter().find(|s| s.name == "nap").unwrap();
    let slept = ms_between(
        at(&nap.attempts[0].dispatched_at),
        at(nap.output.as_ref().unwrap()["woke_at"].as_str().unwrap()),
    );
    assert!(slept >= 1_500, "nap slept {slept} ms");
    // The second signal is still kept, and its repeat answers that it was never taken.
    let (status, again) = signal(&h, id, "approval", "a-2", json!({})).await?;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["created"], false);
    assert_eq!(again["consumed_by"], Value::Null);
    h.finish().await;
    Ok(())
}

const APPROVAL: &str = "
namespace: time
name: approval
version: 1
steps:
  - name: approve
    wait_for: { signal: approval, timeout: 20s }
  - { name: after, handler: echo, depends_on: [approve] }
";

const TIMEOUTS: &str = "
namespace: time
name: timeouts
version: 1
steps:
  - name: fails
    wait_for: { signal: approval, timeout: 400ms }
";

const DEFAULTS: &str = "
namespace: time
name: defaults
version: 1
steps:
  - name: approve
    wait_for: { signal: approval, timeout: 400ms, default: { approved: false } }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_are_deduplicated_refused_when_nobody_waits_and_time_out() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    for t in [APPROVAL, TIMEOUTS, DEFAULTS] {
        h.register_yaml(t).await?;
    }
    h.spawn_worker(
        h.worker("time")
            .handler_fn("echo", |_| async move { Ok(json!("ok")) }),
    )
    .await?;
    let id = h.submit("time", "approval", json!({})).await?;
    let why = until_step(&h, id, "approve", StepState::Delegated).await?;
    assert!(
        why.starts_with("waiting for signal approval (until 20"),
        "{why}"
    );

    // A name no step waits for: 409.
    let (status, body) = signal(&h, id, "nope", "x", json!(1)).await?;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "signal_refused");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("waits for signal \"nope\""),
        "{body}"
    );
    // Bad input: an empty signal id, an unknown task.
    let (status, _) = signal(&h, id, "approval", "", json!(1)).await?;
    assert_eq!(status, 400);
    let (status, _) = signal(&h, TaskId::new(), "approval", "x", json!(1)).await?;
    assert_eq!(status, 404);

    // The waiting step takes the signal; a repeat of its id is a no-op with the first answer.
    let sent = h
        .client()
        .signal(id, "approval", "s-1", json!({"approved": true}))
        .await?;
    assert!(sent.created);
    assert_eq!(sent.consumed_by.as_deref(), Some("approve"));
    let (status, repeat) = signal(&h, id, "approval", "s-1", json!({"approved": false})).await?;
    assert_eq!(status, 200, "{repeat}");
    assert_eq!(repeat["created"], false);
    assert_eq!(repeat["received_at"], json!(sent.received_at));
    let task = h.wait_for(id, Duration::from_secs(20)).await?;
    assert_eq!(task.state, TaskState::Completed, "{:?}", task.error);
    assert_eq!(task.steps[0].output, Some(json!({"approved": true})));
    // A finished task takes no new signal (409); a repeat is still answered.
    let (status, body) = signal(&h, id, "approval", "s-2", json!(1)).await?;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is completed: it takes no more signals"),
        "{body}"
    );
    let (status, _) = signal(&h, id, "approval", "s-1", json!(1)).await?;
    assert_eq!(status, 200);

    // Over AMQP: a `signal` message on the tasks exchange does the same.
    let id = h.submit("time", "approval", json!({})).await?;
    let conn =
        lapin::Connection::connect(&h.services.amqp_url, lapin::ConnectionProperties::default())
            .await?;
    let channel = confirm_channel(&conn).await?;
    let message = tasker_schemas::Signal {
        task_id: id,
        name: "approval".into(),
        signal_id: "amqp-1".into(),
        payload: json!({"via": "amqp"}),
    };
    publish_signal(&channel, &h.names(), "time", &message).await?;
    let task = h.wait_for(id, Duration::from_secs(20)).await?;
    assert_eq!(task.steps[0].output, Some(json!({"via": "amqp"})));
    // A refused signal message (here: to a finished task) is dead-lettered with the reason.
    let refused = tasker_schemas::Signal {
        name: "nope".into(),
        signal_id: "amqp-2".into(),
        ..message
    };
    publish_signal(&channel, &h.names(), "time", &refused).await?;
    let (_, reason) = h.next_dead_letter(Duration::from_secs(10)).await?;
    assert!(reason.contains("it takes no more signals"), "{reason}");
    let _ = conn.close(200, "done".into()).await;

    // Timeouts: a failure that says so, or the declared default.
    let failed = h.submit("time", "timeouts", json!({})).await?;
    let defaulted = h.submit("time", "defaults", json!({})).await?;
    let task = h.wait_for(failed, Duration::from_secs(20)).await?;
    assert_eq!(task.state, TaskState::Failed);
    let error = task.error.unwrap_or_default();
    assert!(
        error.contains("timed out: no signal \"approval\" within 400 ms"),
        "{error}"
    );
    let task = h.wait_for(defaulted, Duration::from_secs(20)).await?;
    assert_eq!(task.state, TaskState::Completed, "{:?}", task.error);
    assert_eq!(task.steps[0].output, Some(json!({"approved": false})));
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_task_is_pending_until_its_time() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(APPROVAL).await?;
    h.spawn_worker(
        h.worker("time")
            .handler_fn("echo", |_| async move { Ok(json!("ok")) }),
    )
    .await?;
    let delayed = SubmitTask {
        delay: Some(Millis(1_200)),
        idempotency_key: Some("delayed-1".into()),
        ..submit("approval")
    };
    let r = h.client().submit(&delayed).await?;
    // The same request again is a repeat, though "1.2 s from now" is later now.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let again = h.client().submit(&delayed).await?;
    assert_eq!((again.task_id, again.created), (r.task_id, false));
    let task = h.client().task(r.task_id).await?;
    assert_eq!(task.state, TaskState::Pending);
    let start = at(task.start_at.as_deref().expect("start_at"));
    assert!(ms_between(at(&task.created_at), start) >= 1_200);
    assert_eq!(task.steps[0].state, StepState::Waiting);
    let why = task.steps[0].waiting_reason.clone().unwrap_or_default();
    assert!(why.starts_with("task starts at 20"), "{why}");
    // A signal to a pending task is kept for its step.
    h.client()
        .signal(r.task_id, "approval", "early", json!("yes"))
        .await?;
    let task = h.wait_for(r.task_id, Duration::from_secs(20)).await?;
    assert_eq!(task.state, TaskState::Completed, "{:?}", task.error);
    let began = at(&task.steps[0].attempts[0].dispatched_at);
    assert!(began >= start, "started at {began}, before {start}");
    assert_eq!(task.steps[0].output, Some(json!("yes")));
    assert!(task.events.iter().any(|e| e.kind == "started"));

    // run_at in the past starts at once; run_at with delay, or too far ahead, is refused.
    let now = h
        .client()
        .submit(&SubmitTask {
            run_at: Some("2000-01-01T00:00:00Z".into()),
            ..submit("approval")
        })
        .await?;
    assert_eq!(
        h.client().task(now.task_id).await?.state,
        TaskState::Running
    );
    h.client().cancel(now.task_id, None).await?;
    for body in [
        json!({"namespace": "time", "template": "approval", "run_at": "2000-01-01T00:00:00Z", "delay": "1s"}),
        json!({"namespace": "time", "template": "approval", "run_at": "next tuesday"}),
        json!({"namespace": "time", "template": "approval", "delay": "30d"}),
        json!({"namespace": "time", "template": "approval", "delay": 999_999_999_999u64}),
        json!({"namespace": "time", "template": "approval", "deadline": 0}),
    ] {
        let (status, answer) = post(&h, "/v1/tasks", body.clone()).await?;
        assert_eq!(status, 400, "{body} → {answer}");
    }
    h.finish().await;
    Ok(())
}

const DEADLINE: &str = "
namespace: time
name: deadline
version: 1
deadline: 1s
steps:
  - { name: slow, handler: slow }
  - { name: next, handler: slow, depends_on: [slow] }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_cancels_a_running_task_and_its_running_step() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(DEADLINE).await?;
    let told = Arc::new(AtomicBool::new(false));
    let flag = told.clone();
    h.spawn_worker(h.worker("time").handler_fn("slow", move |ctx| {
        let flag = flag.clone();
        async move {
            tokio::select! {
                _ = ctx.cancelled() => {
                    flag.store(true, Ordering::SeqCst);
                    Err(StepError::retryable("cancelled"))
                }
                _ = tokio::time::sleep(Duration::from_secs(30)) => Ok(json!("late")),
            }
        }
    }))
    .await?;
    let id = h.submit("time", "deadline", json!({})).await?;
    let view = h.client().task(id).await?;
    let deadline = at(view.deadline_at.as_deref().expect("deadline_at"));
    assert_eq!(ms_between(at(&view.created_at), deadline), 1_000);
    let task = h.wait_for(id, Duration::from_secs(20)).await?;
    assert_eq!(task.state, TaskState::Cancelled);
    let error = task.error.unwrap_or_default();
    assert_eq!(
        error,
        "cancelled: deadline exceeded (1000 ms after the task started)"
    );
    assert_ne!(task.steps[1].state, StepState::Succeeded);
    for _ in 0..100 {
        if told.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        told.load(Ordering::SeqCst),
        "the running step was not told to stop"
    );

    // A submit's deadline overrides the template's.
    let r = h
        .client()
        .submit(&SubmitTask {
            deadline: Some(Millis(60_000)),
            ..submit("deadline")
        })
        .await?;
    let view = h.client().task(r.task_id).await?;
    let deadline = at(view.deadline_at.as_deref().expect("deadline_at"));
    assert_eq!(ms_between(at(&view.created_at), deadline), 60_000);
    h.client().cancel(r.task_id, None).await?;
    h.finish().await;
    Ok(())
}
