//! What the orchestrator's edges promise on the wire (CONTRACT §1, §2, §3, §5, §6): its own dead
//! letters keep the original routing key and are logged (rate-limited, never with the body);
//! stale results are logged; step messages carry a W3C `traceparent` shared by a task's steps,
//! which workers copy onto what they send back; lifecycle events announce `running` at creation,
//! then the finish, with increasing `seq`.
//!
//! Every test here installs the log capture ([`logs`]) before starting its harness, so that the
//! capture is the process's subscriber whichever test runs first.

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicRejectOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;
use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tasker_orchestrator::broker::traceparent;
use tasker_schemas::message::{HEADER_DEAD_LETTER_REASON, HEADER_TRACEPARENT};
use tasker_schemas::{
    LifecycleEvent, Outcome, StepMessage, StepResult, TaskId, TaskState, WorkerMessage, decode,
    encode_payload,
};
use tasker_tests::Harness;
use tasker_tests::tasker_worker::StepError;

/// Everything logged in this process, as text.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the log capture (once per process) and returns it: warnings, and the orchestrator's
/// info lines, as plain text.
fn logs() -> Captured {
    static CAPTURED: OnceLock<Captured> = OnceLock::new();
    CAPTURED
        .get_or_init(|| {
            let captured = Captured::default();
            let writer = captured.clone();
            tracing_subscriber::fmt()
                .with_env_filter("warn,tasker_orchestrator=info")
                .with_ansi(false)
                .with_writer(move || writer.clone())
                .try_init()
                .expect("the log capture is the first subscriber of this process");
            captured
        })
        .clone()
}

impl Captured {
    fn lines(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The lines containing every one of `needles`.
    fn matching(&self, needles: &[&str]) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .collect()
    }

    /// Waits (up to 10 s) for a line containing every one of `needles`.
    async fn wait_for(&self, needles: &[&str]) -> anyhow::Result<String> {
        for _ in 0..500 {
            if let Some(line) = self.matching(needles).pop() {
                return Ok(line);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::bail!(
            "no log line with {needles:?}; the log:\n{}",
            self.lines().join("\n")
        )
    }
}

/// `held_back=N` of a dead-letter or stale log line.
fn held_back(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("held_back="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no held_back in {line}"))
}

/// A dead letter as it sits in the dead-letter queue.
struct DeadLetter {
    routing_key: String,
    body: Vec<u8>,
    headers: FieldTable,
}

impl DeadLetter {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.inner().get(name).map(|v| match v {
            AMQPValue::LongString(s) => s.to_string(),
            other => format!("{other:?}"),
        })
    }

    fn reason(&self) -> String {
        self.header(HEADER_DEAD_LETTER_REASON).unwrap_or_default()
    }
}

/// Takes the next message of the harness's dead-letter queue, with its routing key and headers.
async fn next_dead_letter(h: &Harness, timeout: Duration) -> anyhow::Result<DeadLetter> {
    let conn = lapin::Connection::connect(&h.services.amqp_url, Default::default()).await?;
    let ch = conn.create_channel().await?;
    let queue = h.names().dead_letter_queue();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let got = ch
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await?;
        if let Some(m) = got {
            let _ = conn.close(200, "done".into()).await;
            return Ok(DeadLetter {
                routing_key: m.delivery.routing_key.to_string(),
                body: m.delivery.data,
                headers: m.delivery.properties.headers().clone().unwrap_or_default(),
            });
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no dead letter within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Publishes raw bytes (persistent, mandatory, confirmed) to an exchange.
async fn publish_raw(
    h: &Harness,
    exchange: &str,
    routing_key: &str,
    bytes: &[u8],
) -> anyhow::Result<()> {
    publish_many(h, exchange, routing_key, bytes, 1).await
}

/// Publishes `count` copies of raw bytes at once (pipelined), then waits for every confirm.
async fn publish_many(
    h: &Harness,
    exchange: &str,
    routing_key: &str,
    bytes: &[u8],
    count: usize,
) -> anyhow::Result<()> {
    let conn = lapin::Connection::connect(&h.services.amqp_url, Default::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(Default::default()).await?;
    let mut confirms = Vec::with_capacity(count);
    for _ in 0..count {
        confirms.push(
            ch.basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                bytes,
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await?,
        );
    }
    for confirm in confirms {
        let confirm = confirm.await?;
        anyhow::ensure!(
            matches!(confirm, lapin::Confirmation::Ack(None)),
            "not routed: {confirm:?}"
        );
    }
    conn.close(200, "bye".into()).await?;
    Ok(())
}

/// A server-named queue bound to `exchange` with `key`, and a consumer on it (no acks).
async fn tap(
    h: &Harness,
    exchange: &str,
    key: &str,
) -> anyhow::Result<(lapin::Connection, lapin::Consumer)> {
    let conn = lapin::Connection::connect(&h.services.amqp_url, Default::default()).await?;
    let ch = conn.create_channel().await?;
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    ch.queue_bind(
        q.name().clone(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let consumer = ch
        .basic_consume(
            q.name().clone(),
            "tap".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok((conn, consumer))
}

async fn next_delivery(
    consumer: &mut lapin::Consumer,
    timeout: Duration,
) -> anyhow::Result<lapin::message::Delivery> {
    match tokio::time::timeout(timeout, consumer.next()).await {
        Ok(Some(d)) => Ok(d?),
        Ok(None) => anyhow::bail!("the consumer ended"),
        Err(_) => anyhow::bail!("nothing within {timeout:?}"),
    }
}

fn traceparent_header(d: &lapin::message::Delivery) -> Option<String> {
    d.properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(HEADER_TRACEPARENT).cloned())
        .map(|v| match v {
            AMQPValue::LongString(s) => s.to_string(),
            other => format!("{other:?}"),
        })
}

/// Checks the W3C form `00-{32 hex}-{16 hex}-01` (lowercase, neither id all zeros); returns
/// the trace id and the span id.
fn parse_traceparent(t: &str) -> (String, String) {
    let parts: Vec<&str> = t.split('-').collect();
    assert_eq!(parts.len(), 4, "{t}");
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            && s.bytes().any(|b| b != b'0')
    };
    assert_eq!(parts[0], "00", "version: {t}");
    assert!(hex(parts[1], 32), "trace id: {t}");
    assert!(hex(parts[2], 16), "span id: {t}");
    assert_eq!(parts[3], "01", "flags: {t}");
    (parts[1].to_owned(), parts[2].to_owned())
}

const ONE: &str =
    "namespace: t\nname: one\nversion: 1\nsteps:\n  - { name: s, handler: echo, queue: q }\n";

/// The orchestrator's dead letters, from each of its consumers, keep the routing key the
/// original had and carry the reason; each is logged with its reason, never its body, at most
/// one line a second per consumer, with the number held back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orchestrator_dead_letters_keep_the_routing_key_and_are_logged() -> anyhow::Result<()> {
    let logs = logs();
    let h = Harness::start().await?;
    h.register_yaml(ONE).await?;
    let results = h.names().results_exchange();

    // Results consumer: an unreadable message.
    publish_raw(&h, &results, "t.0", b"\xc1 SECRET-BODY-results").await?;
    let dl = next_dead_letter(&h, Duration::from_secs(10)).await?;
    assert_eq!(dl.routing_key, "t.0", "the original routing key");
    assert_eq!(dl.body, b"\xc1 SECRET-BODY-results");
    assert!(dl.reason().contains("MessagePack"), "{}", dl.reason());
    let line = logs
        .wait_for(&["dead-lettered a result message", "t.0"])
        .await?;
    assert!(line.contains("not a MessagePack envelope"), "{line}");
    assert!(line.contains("WARN"), "{line}");

    // Task request consumer: an unreadable request, routing key = its namespace.
    publish_raw(&h, &h.names().tasks_exchange(), "t", b"SECRET-BODY-request").await?;
    let dl = next_dead_letter(&h, Duration::from_secs(10)).await?;
    assert_eq!(dl.routing_key, "t");
    assert_eq!(dl.body, b"SECRET-BODY-request");
    assert!(dl.reason().contains("MessagePack"), "{}", dl.reason());
    logs.wait_for(&["dead-lettered a task request message", "routing_key"])
        .await?;

    // Dead step consumer: a step message rejected by a worker is dead-lettered by the broker,
    // recorded as a failed attempt, and passed on with its routing key, the template queue.
    let id = h.submit("t", "one", json!({})).await?;
    let conn = lapin::Connection::connect(&h.services.amqp_url, Default::default()).await?;
    let ch = conn.create_channel().await?;
    let mut consumer = ch
        .basic_consume(
            h.names().step_queue("t", "q").as_str().into(),
            "rejecting".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let step = next_delivery(&mut consumer, Duration::from_secs(10)).await?;
    step.acker
        .reject(BasicRejectOptions { requeue: false })
        .await?;
    drop(consumer);
    conn.close(200, "done".into()).await?;
    let dl = next_dead_letter(&h, Duration::from_secs(10)).await?;
    assert_eq!(
        dl.routing_key, "t.q",
        "the step message's routing key: namespace.queue"
    );
    assert_eq!(dl.reason(), "step attempt failed: rejected");
    let message = decode::<StepMessage>(&dl.body)?.payload;
    assert_eq!(message.task_id, id);
    // The step message's own trace context travels on with it.
    assert_eq!(
        dl.header(HEADER_TRACEPARENT),
        Some(traceparent(id, message.step_id, message.attempt))
    );
    logs.wait_for(&["dead-lettered a step message", "rejected"])
        .await?;

    // A flood of bad results: every one is dead-lettered, few lines are logged, and the lines
    // count the rest.
    const FLOOD: usize = 40;
    publish_many(&h, &results, "t.0", b"\xc1 SECRET-BODY-flood", FLOOD).await?;
    for _ in 0..FLOOD {
        assert_eq!(
            next_dead_letter(&h, Duration::from_secs(10))
                .await?
                .routing_key,
            "t.0"
        );
    }
    // A quiet second, then one more: logged, with everything held back since the last line.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    publish_raw(&h, &results, "t.0", b"\xc1 SECRET-BODY-last").await?;
    next_dead_letter(&h, Duration::from_secs(10)).await?;
    let total = 1 + FLOOD + 1;
    let mut lines = Vec::new();
    for _ in 0..500 {
        lines = logs.matching(&["dead-lettered a result message"]);
        let counted: u64 = lines.iter().map(|l| 1 + held_back(l)).sum();
        if counted >= total as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let counted: u64 = lines.iter().map(|l| 1 + held_back(l)).sum();
    assert_eq!(
        counted, total as u64,
        "each dead letter is logged or counted once: {lines:#?}"
    );
    assert!(
        lines.len() < total / 4,
        "rate-limited to about one line a second: {lines:#?}"
    );
    assert!(
        held_back(lines.last().unwrap()) > 0,
        "the flood was held back and counted: {lines:#?}"
    );
    // Never a body.
    let all = logs.lines().join("\n");
    assert!(!all.contains("SECRET-BODY"), "a body was logged:\n{all}");
    h.finish().await;
    Ok(())
}

/// A result for a step the orchestrator does not know is acked, counted as stale and logged
/// (with the ids it named), not dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_results_are_counted_and_logged() -> anyhow::Result<()> {
    let logs = logs();
    let h = Harness::start().await?;
    h.register_yaml(ONE).await?;
    let result = StepResult {
        task_id: TaskId::new(),
        step_id: tasker_schemas::StepId::new(),
        attempt: 3,
        worker: "w".into(),
        duration_ms: 1,
        outcome: Outcome::succeeded(json!("SECRET-OUTPUT")),
        traceparent: None,
    };
    let step = result.step_id.to_string();
    publish_raw(
        &h,
        &h.names().results_exchange(),
        "t.0",
        &encode_payload(result)?,
    )
    .await?;
    let line = logs.wait_for(&["dropped stale results", &step]).await?;
    assert!(line.contains("attempt 3"), "{line}");
    assert!(line.contains("stale=1"), "{line}");
    let metrics = h.shared(0).metrics.clone();
    assert_eq!(metrics.value("tasker_results_stale_total") as u64, 1);
    assert_eq!(metrics.value("tasker_dead_lettered_total") as u64, 0);
    assert!(!logs.lines().join("\n").contains("SECRET-OUTPUT"));
    h.finish().await;
    Ok(())
}

const TWO_ROOTS: &str = "namespace: t\nname: two\nversion: 1\nsteps:\n  - { name: a, handler: echo, queue: q }\n  - { name: b, handler: echo, queue: q }\n";

/// Every step message carries `traceparent` = `00-{task id}-{span}-01`: one trace per task, one
/// span per step attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_messages_carry_a_traceparent_shared_by_the_task() -> anyhow::Result<()> {
    let _logs = logs();
    let h = Harness::start().await?;
    h.register_yaml(TWO_ROOTS).await?;
    let first = h.submit("t", "two", json!({})).await?;
    let second = h.submit("t", "two", json!({})).await?;
    let conn = lapin::Connection::connect(&h.services.amqp_url, Default::default()).await?;
    let ch = conn.create_channel().await?;
    let mut consumer = ch
        .basic_consume(
            h.names().step_queue("t", "q").as_str().into(),
            "inspector".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    // task -> (trace id, span ids)
    let mut seen: HashMap<TaskId, (String, Vec<String>)> = HashMap::new();
    for _ in 0..4 {
        let d = next_delivery(&mut consumer, Duration::from_secs(10)).await?;
        let m = decode::<StepMessage>(&d.data)?.payload;
        let header = traceparent_header(&d).expect("a traceparent header on every step message");
        let (trace, span) = parse_traceparent(&header);
        assert_eq!(trace, m.task_id.0.simple().to_string(), "the task's trace");
        assert_eq!(header, traceparent(m.task_id, m.step_id, m.attempt));
        let entry = seen.entry(m.task_id).or_insert((trace.clone(), Vec::new()));
        assert_eq!(entry.0, trace, "every step of a task shares the trace id");
        entry.1.push(span);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_ne!(seen[&first].0, seen[&second].0, "a trace per task");
    for (_, spans) in seen.values() {
        assert_eq!(spans.len(), 2);
        assert_ne!(spans[0], spans[1], "a span per step");
    }
    drop(consumer);
    conn.close(200, "done".into()).await?;
    h.finish().await;
    Ok(())
}

/// The worker copies the step message's `traceparent` onto its result, for a short step (acked
/// after the result) and for a long one (acked early, its lease reports too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_copy_the_traceparent_onto_what_they_report() -> anyhow::Result<()> {
    let _logs = logs();
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: traced\nversion: 1\nsteps:\n  - { name: short, handler: echo, queue: q }\n  - { name: long, handler: echo, queue: q, execution_timeout: 10s, depends_on: [short] }\n",
    )
    .await?;
    let (_conn, mut reports) = tap(&h, &h.names().results_exchange(), "#").await?;
    h.spawn_worker(
        h.worker("t")
            .queue("q")
            // Steps over 1 s are long: `started`, heartbeats, then the result.
            .long_steps(Duration::from_secs(1), Duration::from_millis(100))
            .handler_fn("echo", |ctx| async move {
                if ctx.step() == "long" {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Ok(json!(ctx.step()))
            }),
    )
    .await?;
    let task = h.run("t", "traced", json!({})).await?;
    assert_eq!(task.state, TaskState::Completed);
    let long_id = task.steps[1].id;
    let mut kinds: HashMap<(String, &str), usize> = HashMap::new();
    let mut results = 0;
    while results < 2 {
        let d = next_delivery(&mut reports, Duration::from_secs(10)).await?;
        let header = traceparent_header(&d);
        let (step, attempt, kind) = match WorkerMessage::decode(&d.data)?.1 {
            WorkerMessage::Results(r) => {
                assert_eq!(r.len(), 1, "one result a message here");
                results += 1;
                (r[0].step_id, r[0].attempt, "result")
            }
            WorkerMessage::Started(s) => (s.step_id, s.attempt, "started"),
            WorkerMessage::Heartbeat(b) => (b.step_id, b.attempt, "heartbeat"),
            // The worker registry's announcements are about the worker, not an attempt.
            WorkerMessage::WorkerHeartbeat(_) => continue,
            other => anyhow::bail!("unexpected {other:?}"),
        };
        assert_eq!(
            header,
            Some(traceparent(task.id, step, attempt)),
            "the {kind} of step {step} carries its step message's traceparent"
        );
        let name = if step == long_id { "long" } else { "short" };
        *kinds.entry((name.to_owned(), kind)).or_default() += 1;
    }
    assert_eq!(
        kinds.get(&("short".into(), "result")),
        Some(&1),
        "{kinds:?}"
    );
    assert_eq!(kinds.get(&("long".into(), "result")), Some(&1), "{kinds:?}");
    assert_eq!(
        kinds.get(&("long".into(), "started")),
        Some(&1),
        "{kinds:?}"
    );
    h.finish().await;
    Ok(())
}

/// Lifecycle events: `running` when the task is created (seq 0), then its finish; after a
/// retry, the next finish. `seq` grows per task but has gaps: `retried` is a history entry
/// that is not announced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_events_announce_running_then_the_finish() -> anyhow::Result<()> {
    let _logs = logs();
    let h = Harness::start().await?;
    h.register_yaml(ONE).await?;
    let (_conn, mut events) = tap(&h, &h.names().events_exchange(), "t.task.*").await?;
    h.spawn_worker(
        h.worker("t")
            .queue("q")
            .handler_fn("echo", |ctx| async move {
                // `fail_once` fails for good on its first attempt; its retry runs attempt 2.
                if ctx.input::<serde_json::Value>()?["fail_once"] == json!(true)
                    && ctx.attempt() == 1
                {
                    return Err(StepError::permanent("first run fails"));
                }
                Ok(json!("done"))
            }),
    )
    .await?;
    let ok = h.run("t", "one", json!({})).await?;
    assert_eq!(ok.state, TaskState::Completed);
    let flaky = h.run("t", "one", json!({"fail_once": true})).await?;
    assert_eq!(flaky.state, TaskState::Failed);
    h.client().retry(flaky.id).await?;
    let flaky = h.wait(flaky.id).await?;
    assert_eq!(flaky.state, TaskState::Completed);

    // Five events: two for the first task, three for the second.
    let mut got: HashMap<TaskId, Vec<(String, String, LifecycleEvent)>> = HashMap::new();
    for _ in 0..5 {
        let d = next_delivery(&mut events, Duration::from_secs(10)).await?;
        let e = decode::<LifecycleEvent>(&d.data)?.payload;
        got.entry(e.task_id)
            .or_default()
            .push((d.routing_key.to_string(), e.state.clone(), e));
    }
    let summary = |id: TaskId| -> Vec<(String, String, u64)> {
        got[&id]
            .iter()
            .map(|(key, state, e)| (key.clone(), state.clone(), e.seq))
            .collect()
    };
    let ok_events = summary(ok.id);
    assert_eq!(
        ok_events,
        [
            ("t.task.running".into(), "running".into(), 0),
            ("t.task.completed".into(), "completed".into(), 1),
        ]
    );
    let running = &got[&ok.id][0].2;
    assert_eq!(
        (running.namespace.as_str(), running.template.as_str()),
        ("t", "one")
    );
    assert_eq!((&running.output, &running.error), (&None, &None));
    // `at` is the task's creation time, from the database clock.
    assert_eq!(running.at, ok.created_at);
    // The finish has the seq of its entry in the history.
    assert_eq!(ok.events.last().map(|e| e.seq), Some(1));

    let flaky_events = summary(flaky.id);
    assert_eq!(
        flaky_events,
        [
            ("t.task.running".into(), "running".into(), 0),
            ("t.task.failed".into(), "failed".into(), 1),
            // seq 2 is the `retried` history entry: not announced.
            ("t.task.completed".into(), "completed".into(), 3),
        ]
    );
    let history: Vec<(&str, u64)> = flaky
        .events
        .iter()
        .map(|e| (e.kind.as_str(), e.seq))
        .collect();
    assert_eq!(history, [("failed", 1), ("retried", 2), ("completed", 3)]);
    // Nothing more.
    assert!(
        next_delivery(&mut events, Duration::from_millis(300))
            .await
            .is_err()
    );
    h.finish().await;
    Ok(())
}
