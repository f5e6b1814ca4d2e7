//! The worker against a real RabbitMQ. Each test declares its own topology under a random prefix
//! (standing in for the orchestrator), publishes step messages and reads the results.

mod common;

use anyhow::{Result, bail};
use common::{Broker, NAMESPACE, Proxy, broker, start, upstream_of};
use lapin::types::AMQPValue;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tasker_schemas::message::{CONTENT_TYPE, HEADER_DEAD_LETTER_REASON};
use tasker_schemas::{Envelope, Kind, MessageId, Outcome, StepId, encode};
use tasker_worker::{Decision, StepContext, StepError, Worker, WorkerError};

const STOP: Duration = Duration::from_secs(15);

macro_rules! broker_or_skip {
    () => {
        match broker().await? {
            Some(b) => b,
            None => return Ok(()),
        }
    };
}

fn reason_of(props: &lapin::BasicProperties) -> Option<String> {
    match props
        .headers()
        .as_ref()?
        .inner()
        .get(HEADER_DEAD_LETTER_REASON)?
    {
        AMQPValue::LongString(s) => Some(s.to_string()),
        other => Some(format!("{other:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_succeeding_step_reports_its_output_and_is_acked() -> Result<()> {
    let b: Broker = broker_or_skip!();
    let worker = start(b.worker().handler("ship", |ctx: StepContext| async move {
        let order: Value = ctx.input()?;
        let charge: Value = ctx.parent("charge")?;
        Ok(json!({
            "order": order["order_id"],
            "charge": charge["charge_id"],
            "attempt": ctx.attempt(),
            "key": ctx.idempotency_key(),
            "worker": ctx.worker(),
            "step": ctx.step(),
            "namespace": ctx.namespace(),
        }))
    }));
    let mut step = b.step("ship");
    step.attempt = 3;
    step.context = json!({"order_id": "o-1"});
    step.parent_outputs
        .insert("charge".into(), json!({"charge_id": "c-9"}));
    b.publish_step(&step).await?;

    let Some((envelope, props)) = b.next_result(Duration::from_secs(10)).await? else {
        bail!("no result")
    };
    let result = envelope.payload;
    assert_eq!(
        (result.task_id, result.step_id, result.attempt),
        (step.task_id, step.step_id, 3)
    );
    assert_eq!(result.worker, "test-worker");
    assert_eq!(
        result.outcome,
        Outcome::Succeeded {
            output: json!({
                "order": "o-1", "charge": "c-9", "attempt": 3, "key": step.idempotency_key,
                "worker": "test-worker", "step": "ship_step", "namespace": "shop",
            }),
            branches: None,
        }
    );
    assert_eq!(
        props.content_type().as_ref().map(|c| c.as_str()),
        Some(CONTENT_TYPE)
    );
    assert_eq!(props.delivery_mode(), &Some(2));
    assert_eq!(
        props.message_id().as_ref().map(|m| m.to_string()),
        Some(envelope.message_id.to_string())
    );

    // Acked: once the worker is gone (which would requeue anything unacked) the queue is empty.
    worker.stop(STOP).await?;
    assert_eq!(b.step_queue_state("default").await?, (0, 0));
    b.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_steps_say_whether_to_retry() -> Result<()> {
    let b = broker_or_skip!();
    let worker = start(
        b.worker()
            .handler_fn("flaky", |_| async {
                Err(StepError::retry_after(
                    "rate limited",
                    Duration::from_millis(1_500),
                ))
            })
            .handler_fn("broken", |_| async {
                Err(StepError::permanent("card declined"))
            })
            .handler_fn("plain", |_| async { Err("try later".into()) }),
    );
    let steps = [b.step("flaky"), b.step("broken"), b.step("plain")];
    for s in &steps {
        b.publish_step(s).await?;
    }
    let mut outcomes: HashMap<StepId, Outcome> = HashMap::new();
    for _ in 0..steps.len() {
        let r = b.expect_result().await?;
        outcomes.insert(r.step_id, r.outcome);
    }
    assert_eq!(
        outcomes[&steps[0].step_id],
        Outcome::Failed {
            message: "rate limited".into(),
            retryable: true,
            retry_after_ms: Some(1_500)
        }
    );
    assert_eq!(
        outcomes[&steps[1].step_id],
        Outcome::Failed {
            message: "card declined".into(),
            retryable: false,
            retry_after_ms: None
        }
    );
    assert_eq!(
        outcomes[&steps[2].step_id],
        Outcome::Failed {
            message: "try later".into(),
            retryable: true,
            retry_after_ms: None
        }
    );
    worker.stop(STOP).await?;
    assert_eq!(b.step_queue_state("default").await?.0, 0);
    b.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_fails_the_attempt_and_the_worker_survives() -> Result<()> {
    let b = broker_or_skip!();
    let worker = start(
        b.worker()
            .handler_fn("boom", |_| async { panic!("kaboom") })
            .handler_fn("fine", |_| async { Ok(json!("still here")) }),
    );
    b.publish_step(&b.step("boom")).await?;
    let r = b.expect_result().await?;
    assert_eq!(
        r.outcome,
        Outcome::Failed {
            message: "handler panicked: kaboom".into(),
            retryable: true,
            retry_after_ms: None
        }
    );
    b.publish_step(&b.step("fine")).await?;
    assert_eq!(
        b.expect_result().await?.outcome,
        Outcome::Succeeded {
            output: json!("still here"),
            branches: None,
        }
    );
    worker.stop(STOP).await?;
    assert_eq!(b.step_queue_state("default").await?.0, 0);
    b.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_over_its_timeout_fails_and_its_handler_is_cancelled() -> Result<()> {
    let b = broker_or_skip!();
    let cancelled = Arc::new(AtomicBool::new(false));
    let seen = cancelled.clone();
    let worker = start(b.worker().handler_fn("sleepy", move |ctx| {
        let seen = seen.clone();
        async move {
            let token = ctx.cancellation_token().clone();
            tokio::spawn(async move {
                token.cancelled().await;
                seen.store(true, Ordering::SeqCst);
            });
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(Value::Null)
        }
    }));
    let mut step = b.step("sleepy");
    step.timeout_ms = 200;
    b.publish_step(&step).await?;
    let r = b.expect_result().await?;
    assert_eq!(
        r.outcome,
        Outcome::Failed {
            message: "timed out after 200 ms".into(),
            retryable: true,
            retry_after_ms: None
        }
    );
    assert!(
        r.duration_ms >= 200 && r.duration_ms < 5_000,
        "{}",
        r.duration_ms
    );
    assert!(cancelled.load(Ordering::SeqCst));
    worker.stop(STOP).await?;
    b.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_handler_is_reported_as_missing() -> Result<()> {
    let b = broker_or_skip!();
    let worker = start(
        b.worker()
            .handler_fn("known", |_| async { Ok(Value::Null) }),
    );
    b.publish_step(&b.step("unknown_handler")).await?;
    let r = b.expect_result().await?;
    assert_eq!(
        r.outcome,
        Outcome::HandlerMissing {
            handler: "unknown_handler".into()
        }
    );
    worker.stop(STOP).await?;
    assert_eq!(b.step_queue_state("default").await?.0, 0);
    b.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_messages_are_dead_lettered_with_the_reason() -> Result<()> {
    let b = broker_or_skip!();
    let worker = start(b.worker().handler_fn("fine", |_| async { Ok(json!(1)) }));

    b.publish_raw("default", b"\xc1 definitely not msgpack")
        .await?;
    let future_major = Envelope {
        kind: Kind::Step,
        schema_version: "2.0".into(),
        message_id: MessageId::new(),
        payload: b.step("fine"),
    };
    b.publish_raw("default", &encode(&future_major)?).await?;

    let mut reasons = Vec::new();
    for _ in 0..2 {
        let Some((bytes, props)) = b.next_dead_letter(Duration::from_secs(10)).await? else {
            bail!("no dead letter")
        };
        assert_eq!(props.delivery_mode(), &Some(2));
        reasons.push((bytes, reason_of(&props).unwrap_or_default()));
    }
    reasons.sort();
    let garbage = reasons
        .iter()
        .find(|(bytes, _)| bytes.starts_with(b"\xc1"))
        .map(|(_, r)| r.clone());
    assert!(
        garbage.is_some_and(|r| r.contains("not a MessagePack envelope")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|(_, r)| r.contains("unsupported schema major version 2")),
        "{reasons:?}"
    );

    // The worker keeps going.
    b.publish_step(&b.step("fine")).await?;
    assert_eq!(
        b.expect_result().await?.outcome,
        Outcome::succeeded(json!(1))
    );
    worker.stop(STOP).await?;
    assert_eq!(b.step_queue_state("default").await?.0, 0);
    b.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_message_that_cannot_be_dead_lettered_is_rejected_not_requeued() -> Result<()>
{
    let b = broker_or_skip!();
    // Nothing takes dead letters: publishing one comes back unroutable.
    b.unbind(
        &b.names.dead_letter_queue(),
        &b.names.dead_letter_exchange(),
        "",
    )
    .await?;
    let worker = start(b.worker().handler_fn("fine", |_| async { Ok(json!(1)) }));
    b.publish_raw("default", b"\xc1 junk").await?;
    // Rejected without requeue, so the broker dead-letters it through the step queue's own
    // dead-letter exchange.
    let Some((bytes, _)) = b
        .take(&b.dead_steps_queue(), Duration::from_secs(10))
        .await?
    else {
        bail!("the unreadable message was not rejected to the queue's dead-letter exchange")
    };
    assert_eq!(bytes, b"\xc1 junk");
    b.publish_step(&b.step("fine")).await?;
    assert_eq!(
        b.expect_result().await?.outcome,
        Outcome::succeeded(json!(1))
    );
    worker.stop(STOP).await?;
    assert_eq!(b.step_queue_state("default").await?.0, 0);
    b.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_is_bounded() -> Result<()> {
    let b = broker_or_skip!();
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (r, m) = (running.clone(), most.clone());
    let worker = start(b.worker().concurrency(2).handler_fn("slow", move |_| {
        let (running, most) = (r.clone(), m.clone());
        async move {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(300)).await;
            running.fetch_sub(1, Ordering::SeqCst);
            Ok(Value::Null)
        }
    }));
    for _ in 0..6 {
        b.publish_step(&b.step("slow")).await?;
    }
    for _ in 0..6 {
        assert!(matches!(
            b.expect_result().await?.outcome,
            Outcome::Succeeded { .. }
        ));
    }
    assert_eq!(
        most.load(Ordering::SeqCst),
        2,
        "at most 2 steps may run at once, and 2 should have"
    );
    worker.stop(STOP).await?;
    b.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_short_steps_and_returns_long_ones_to_the_queue() -> Result<()> {
    let b = broker_or_skip!();
    let started = Arc::new(AtomicUsize::new(0));
    let slow_saw_cancel = Arc::new(AtomicBool::new(false));
    let (s1, s2, s3, seen) = (
        started.clone(),
        started.clone(),
        started.clone(),
        slow_saw_cancel.clone(),
    );
    let worker = start(
        b.worker()
            .grace_period(Duration::from_millis(1_500))
            .handler_fn("quick", move |_| {
                let started = s1.clone();
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(700)).await;
                    Ok(json!("quick done"))
                }
            })
            .handler_fn("polite", move |ctx| {
                let started = s3.clone();
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    tokio::select! {
                        _ = ctx.cancelled() => Err(StepError::retryable("cancelled")),
                        _ = tokio::time::sleep(Duration::from_secs(60)) => Ok(json!("too late")),
                    }
                }
            })
            .handler_fn("stubborn", move |ctx| {
                let (started, seen) = (s2.clone(), seen.clone());
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    let token = ctx.cancellation_token().clone();
                    tokio::spawn(async move {
                        token.cancelled().await;
                        seen.store(true, Ordering::SeqCst);
                    });
                    // Ignores cancellation on purpose.
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    Ok(json!("too late"))
                }
            }),
    );
    let quick = b.step("quick");
    let mut stubborn = b.step("stubborn");
    stubborn.timeout_ms = 120_000;
    let mut polite = b.step("polite");
    polite.timeout_ms = 120_000;
    b.publish_step(&quick).await?;
    b.publish_step(&stubborn).await?;
    b.publish_step(&polite).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while started.load(Ordering::SeqCst) < 3 {
        if std::time::Instant::now() > deadline {
            bail!("steps did not start");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let took = worker.stop(STOP).await?;
    assert!(
        took >= Duration::from_millis(1_500),
        "the grace period was not honoured: {took:?}"
    );
    assert!(took < Duration::from_secs(6), "shutdown took {took:?}");
    assert!(
        slow_saw_cancel.load(Ordering::SeqCst),
        "the stubborn handler was not cancelled"
    );

    // The quick step finished within the grace period: reported and acked.
    let r = b.expect_result().await?;
    assert_eq!(
        (r.step_id, r.outcome),
        (
            quick.step_id,
            Outcome::Succeeded {
                output: json!("quick done"),
                branches: None,
            }
        )
    );
    assert!(
        b.next_result(Duration::from_millis(300)).await?.is_none(),
        "the abandoned step must not be reported"
    );
    // The other two were not acked (the polite one's "cancelled" error was not reported either,
    // so no attempt is spent): both are back in the queue.
    b.wait_for_depth("default", 2, Duration::from_secs(5))
        .await?;
    let mut back = Vec::new();
    while let Some((bytes, _)) = b
        .take(
            &b.names.step_queue(NAMESPACE, "default"),
            Duration::from_millis(500),
        )
        .await?
    {
        back.push(
            tasker_schemas::decode::<tasker_schemas::StepMessage>(&bytes)?
                .payload
                .step_id,
        );
    }
    back.sort();
    let mut expected = vec![stubborn.step_id, polite.step_id];
    expected.sort();
    assert_eq!(back, expected);
    b.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unroutable_result_is_not_acked_and_is_retried() -> Result<()> {
    let b = broker_or_skip!();
    let results = b.names.results_queue(0);
    b.unbind(&results, &b.names.results_exchange(), "#").await?;
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let worker = start(b.worker().handler_fn("once", move |_| {
        let calls = c.clone();
        async move {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(json!("done"))
        }
    }));
    b.publish_step(&b.step("once")).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while calls.load(Ordering::SeqCst) < 2 {
        if std::time::Instant::now() > deadline {
            bail!("the step was not redelivered after its result was returned");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.bind(&results, &b.names.results_exchange(), "#").await?;
    let r = b.expect_result().await?;
    assert_eq!(
        r.outcome,
        Outcome::Succeeded {
            output: json!("done"),
            branches: None,
        }
    );
    worker.stop(STOP).await?;
    assert_eq!(b.step_queue_state("default").await?.0, 0);
    b.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_queue_is_a_clear_error() -> Result<()> {
    let b = broker_or_skip!();
    let run = b.worker().queue("nope").build().run(Default::default());
    let err = tokio::time::timeout(Duration::from_secs(10), run)
        .await?
        .unwrap_err();
    assert!(matches!(err, WorkerError::QueueMissing { .. }));
    assert_eq!(
        err.to_string(),
        format!(
            "queue {}.step.shop.nope does not exist; register a template that uses it first",
            b.names.prefix()
        )
    );
    b.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_reconnects_after_the_connection_drops() -> Result<()> {
    let b = broker_or_skip!();
    let proxy = Proxy::start(upstream_of(&b.url)?).await?;
    let worker = start(
        Worker::builder(proxy.url_for(&b.url)?)
            .prefix(b.names.prefix())
            .namespace(NAMESPACE)
            .name("test-worker")
            .handler_fn("echo", |ctx| async move { Ok(ctx.context().clone()) }),
    );

    let mut first = b.step("echo");
    first.context = json!(1);
    b.publish_step(&first).await?;
    assert_eq!(
        b.expect_result().await?.outcome,
        Outcome::succeeded(json!(1))
    );

    // Let the ack of the first step reach the broker, then drop the connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut();
    let mut second = b.step("echo");
    second.context = json!(2);
    b.publish_step(&second).await?;
    // Delivery is at-least-once: tolerate a repeat of the first step, nothing else.
    let r = loop {
        let r = b.expect_result().await?;
        if r.step_id != first.step_id {
            break r;
        }
    };
    assert_eq!(
        (r.step_id, r.outcome),
        (second.step_id, Outcome::succeeded(json!(2)))
    );
    assert_eq!(
        b.step_queue_state("default").await?.1,
        1,
        "exactly one consumer after reconnecting"
    );

    worker.stop(STOP).await?;
    assert_eq!(b.step_queue_state("default").await?, (0, 0));
    b.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_resubscribes_when_its_queue_comes_back() -> Result<()> {
    let b = broker_or_skip!();
    let worker = start(
        b.worker()
            .handler_fn("echo", |ctx| async move { Ok(ctx.context().clone()) }),
    );
    b.publish_step(&b.step("echo")).await?;
    b.expect_result().await?;

    // Deleting the queue cancels the consumer; the worker retries until the queue exists again.
    b.delete_queue(&b.names.step_queue(NAMESPACE, "default"))
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.declare_step_queue("default").await?;
    let mut step = b.step("echo");
    step.context = json!("back");
    b.publish_step(&step).await?;
    let r = b.expect_result().await?;
    assert_eq!(
        r.outcome,
        Outcome::Succeeded {
            output: json!("back"),
            branches: None,
        }
    );
    assert_eq!(
        b.step_queue_state("default").await?.1,
        1,
        "exactly one consumer"
    );
    worker.stop(STOP).await?;
    b.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_output_fails_permanently() -> Result<()> {
    let b = broker_or_skip!();
    let worker = start(
        b.worker()
            .max_output_bytes(1_000)
            .handler_fn("big", |_| async { Ok(json!("x".repeat(2_000))) }),
    );
    b.publish_step(&b.step("big")).await?;
    let Outcome::Failed {
        message, retryable, ..
    } = b.expect_result().await?.outcome
    else {
        bail!("expected a failure")
    };
    assert!(!retryable);
    assert!(
        message.contains("over the limit of 1000 bytes"),
        "{message}"
    );
    worker.stop(STOP).await?;
    b.cleanup().await
}

/// Schema 1.1: a decision handler's branches reach the result; a map instance's index and item
/// reach the handler (a null element too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_and_map_instances() -> Result<()> {
    let b = broker_or_skip!();
    let worker = start(
        b.worker()
            .decision_fn("route", |ctx| async move {
                let order: Value = ctx.input()?;
                Ok(if order["express"] == true {
                    Decision::choose(["express"]).output(json!({"carrier": "dhl"}))
                } else {
                    Decision::none()
                })
            })
            .handler_fn("resize", |ctx| async move {
                Ok(json!({
                    "index": ctx.index(),
                    "item": ctx.item(),
                    "key": ctx.idempotency_key(),
                }))
            }),
    );
    let mut express = b.step("route");
    express.context = json!({"express": true});
    let none = b.step("route");
    let mut instance = b.step("resize");
    instance.idempotency_key = format!("{}:resize_step:4", instance.task_id);
    instance.map_index = Some(4);
    instance.map_item = Some(json!({"key": "e.jpg"}));
    let mut null_item = b.step("resize");
    null_item.map_index = Some(0);
    null_item.map_item = Some(Value::Null);
    let plain = b.step("resize");
    for s in [&express, &none, &instance, &null_item, &plain] {
        b.publish_step(s).await?;
    }
    let mut seen: HashMap<StepId, Outcome> = HashMap::new();
    while seen.len() < 5 {
        let r = b.expect_result().await?;
        seen.insert(r.step_id, r.outcome);
    }
    let succeeded = |output: Value, branches: Option<&[&str]>| Outcome::Succeeded {
        output,
        branches: branches.map(|b| b.iter().map(|s| s.to_string()).collect()),
    };
    assert_eq!(
        seen[&express.step_id],
        succeeded(json!({"carrier": "dhl"}), Some(&["express"]))
    );
    assert_eq!(seen[&none.step_id], succeeded(Value::Null, Some(&[])));
    assert_eq!(
        seen[&instance.step_id],
        succeeded(
            json!({"index": 4, "item": {"key": "e.jpg"}, "key": instance.idempotency_key}),
            None
        )
    );
    assert_eq!(
        seen[&null_item.step_id],
        succeeded(
            json!({"index": 0, "item": null, "key": null_item.idempotency_key}),
            None
        )
    );
    assert_eq!(
        seen[&plain.step_id],
        succeeded(
            json!({"index": null, "item": null, "key": plain.idempotency_key}),
            None
        )
    );
    worker.stop(STOP).await?;
    b.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_queues_are_consumed() -> Result<()> {
    let b = broker_or_skip!();
    b.declare_step_queue("payments").await?;
    let worker = start(
        b.worker()
            .queue("default")
            .queue("payments")
            .handler_fn("echo", |ctx| async move { Ok(json!(ctx.queue())) }),
    );
    let mut on_payments = b.step("echo");
    on_payments.queue = "payments".into();
    b.publish_step(&on_payments).await?;
    b.publish_step(&b.step("echo")).await?;
    let mut queues = vec![
        b.expect_result().await?.outcome,
        b.expect_result().await?.outcome,
    ];
    queues.sort_by_key(|o| format!("{o:?}"));
    assert_eq!(
        queues,
        vec![
            Outcome::Succeeded {
                output: json!("default"),
                branches: None,
            },
            Outcome::Succeeded {
                output: json!("payments"),
                branches: None,
            }
        ]
    );
    worker.stop(STOP).await?;
    b.cleanup().await
}

/// Results that finish while another publish awaits its confirm go out together as
/// `result_batch` messages; every result arrives exactly once and every step message is acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_finishing_together_are_batched() -> Result<()> {
    const N: usize = 40;
    let b = broker_or_skip!();
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let gate = barrier.clone();
    let worker = start(
        b.worker()
            .concurrency(N)
            .handler_fn("together", move |ctx| {
                let gate = gate.clone();
                async move {
                    gate.wait().await;
                    Ok(json!(ctx.step_id().to_string()))
                }
            }),
    );
    let steps: Vec<_> = (0..N).map(|_| b.step("together")).collect();
    // Each step message with its own traceparent: a batch carries each in its entry.
    let trace_of = |id: StepId| {
        format!(
            "00-{}-{}-01",
            id.0.simple(),
            &id.0.simple().to_string()[16..]
        )
    };
    for s in &steps {
        b.publish_step_traced(s, &trace_of(s.step_id)).await?;
    }
    let (mut messages, mut batches) = (0, 0);
    let mut seen: HashMap<StepId, Outcome> = HashMap::new();
    while seen.len() < N {
        let Some((bytes, props)) = b
            .take(&b.names.results_queue(0), Duration::from_secs(10))
            .await?
        else {
            bail!("only {} of {N} results arrived", seen.len());
        };
        messages += 1;
        let (_, message) = tasker_schemas::WorkerMessage::decode(&bytes)?;
        let tasker_schemas::WorkerMessage::Results(results) = message else {
            bail!("not a result: {message:?}");
        };
        if results.len() > 1 {
            batches += 1;
            assert_eq!(
                props.kind().as_ref().map(|k| k.as_str()),
                Some(Kind::ResultBatch.as_str())
            );
            for r in &results {
                assert_eq!(
                    r.traceparent,
                    Some(trace_of(r.step_id)),
                    "a batch entry's trace"
                );
            }
        } else {
            let header = props
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("traceparent").cloned());
            assert_eq!(
                header,
                Some(lapin::types::AMQPValue::LongString(
                    trace_of(results[0].step_id).into()
                )),
                "a single result's trace is its header"
            );
            assert_eq!(results[0].traceparent, None);
        }
        for r in results {
            assert!(
                seen.insert(r.step_id, r.outcome).is_none(),
                "result for {} arrived twice",
                r.step_id
            );
        }
    }
    for s in &steps {
        assert_eq!(
            seen[&s.step_id],
            Outcome::Succeeded {
                output: json!(s.step_id.to_string()),
                branches: None,
            }
        );
    }
    assert!(
        batches >= 1 && messages < N,
        "{N} results finishing together came in {messages} messages ({batches} batches)"
    );
    worker.stop(STOP).await?;
    assert_eq!(b.step_queue_state("default").await?.0, 0);
    b.cleanup().await
}
