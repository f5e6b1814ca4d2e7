//! The life of one step delivery: decode it (or dead-letter it), run its handler, publish the
//! result with a confirm, and only then acknowledge it. A delivery whose result could not be
//! published is requeued after a delay, never acknowledged. An unreadable delivery is never
//! requeued (CONTRACT §6.3): if it cannot be dead-lettered, it is rejected, so the broker
//! dead-letters it through its queue's own dead-letter exchange.

use crate::context::StepContext;
use crate::execute::{outcome_status, run_handler};
use crate::publish::{PublishError, message_properties, publish_confirmed, with_user_id};
use crate::session::SessionEnv;
use backon::{ExponentialBuilder, Retryable};
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, ShortString};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tasker_schemas::message::{HEADER_DEAD_LETTER_REASON, HEADER_TRACEPARENT};
use tasker_schemas::{
    Envelope, Heartbeat, Outcome, Started, StepMessage, StepResult, decode, encode,
};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::task::AbortOnDropHandle;
use tracing::{Instrument, debug, error, info, info_span, warn};

/// Delay before requeueing after the first failed publish; doubles with each failure in a row.
const REQUEUE_DELAY: Duration = Duration::from_millis(250);
const MAX_REQUEUE_DELAY: Duration = Duration::from_secs(5);

/// Handles one delivery, holding one concurrency slot throughout.
pub(crate) async fn process(env: SessionEnv, delivery: Delivery, permit: OwnedSemaphorePermit) {
    let hard_stop = env.shared.hard_stop.clone();
    tokio::select! {
        biased;
        _ = hard_stop.cancelled() => debug!("step message abandoned at shutdown"),
        _ = handle(&env, delivery) => {}
    }
    drop(permit);
}

async fn handle(env: &SessionEnv, delivery: Delivery) {
    let message = match decode_step(&delivery.data) {
        Ok(message) => message,
        Err(reason) => return dead_letter(env, delivery, reason).await,
    };
    let span = info_span!(
        "step",
        task_id = %message.task_id,
        step = %message.step,
        attempt = message.attempt,
        handler = %message.handler,
    );
    // The handler's span continues the attempt's trace (its OpenTelemetry parent is the span
    // of the step message's `traceparent`), when an OpenTelemetry layer is installed.
    crate::telemetry::continue_trace(&span, traceparent_of(&delivery).as_ref());
    run_step(env, delivery, message).instrument(span).await
}

/// Decodes a step message; the error is the dead-letter reason.
fn decode_step(bytes: &[u8]) -> Result<StepMessage, String> {
    let message = decode::<StepMessage>(bytes)
        .map_err(|e| e.to_string())?
        .payload;
    if ShortString::try_new(message.result_routing_key.as_str()).is_err() {
        return Err(format!(
            "result_routing_key is {} bytes long; at most 255 are allowed",
            message.result_routing_key.len()
        ));
    }
    Ok(message)
}

async fn run_step(env: &SessionEnv, delivery: Delivery, message: StepMessage) {
    let shared = &env.shared;
    let handler = shared.handlers.get(&message.handler).cloned();
    if handler.is_none() {
        warn!(
            handler = %message.handler,
            worker = %shared.worker,
            queue = %message.queue,
            "no handler registered under this name on this worker; reporting handler_missing"
        );
    }
    let (task_id, step_id, attempt, timeout_ms) = (
        message.task_id,
        message.step_id,
        message.attempt,
        message.timeout_ms,
    );
    let routing_key = message.result_routing_key.clone();
    let ids = LeaseIds {
        task_id,
        step_id,
        attempt,
        worker: shared.worker.clone(),
        // Kept past the delivery (a long step acks it early): every report of the attempt
        // carries the step message's trace context.
        traceparent: traceparent_of(&delivery),
    };
    // A long step must not hold its delivery (the broker's acknowledgement timeout): it takes a
    // lease in the orchestrator, acks, and keeps the lease alive while it runs.
    let long = Duration::from_millis(timeout_ms) > shared.long_steps.after;
    // When the orchestrator published it: a cancel refuses only what came before it.
    let published = published_ms(&delivery.properties);
    let mut delivery = Some(delivery);
    let mut _heartbeats = None;
    let cancel = if long {
        let lease_ms = lease_ms(shared.long_steps.heartbeat);
        match publish_lease::<Started>(env, &ids, lease_ms, &routing_key).await {
            Ok(()) => {
                if let Some(d) = delivery.take() {
                    ack(d).await;
                }
                _heartbeats = Some(AbortOnDropHandle::new(tokio::spawn(heartbeat_loop(
                    env.clone(),
                    ids.clone(),
                    routing_key.clone(),
                ))));
            }
            Err(e) => {
                if let Some(d) = delivery.take() {
                    requeue_later(env, d, &e).await;
                }
                return;
            }
        }
        // The delivery is gone: losing this session must not stop the handler.
        shared.abort.child_token()
    } else {
        env.handler_cancel.child_token()
    };
    let ctx = StepContext::new(message, shared.worker.clone(), cancel);

    let started = Instant::now();
    let outcome = if shared.cancellations.is_cancelled(task_id, published) {
        info!("task cancelled: refusing the step without running it");
        Outcome::Failed {
            message: "the task was cancelled".into(),
            retryable: false,
            retry_after_ms: None,
        }
    } else {
        let _tracked = shared
            .cancellations
            .track(task_id, ctx.cancellation_token().clone());
        run_handler(handler, ctx, timeout_ms, shared.limits.max_output_bytes).await
    };
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);

    if shared.abort.is_cancelled() && !matches!(outcome, Outcome::Succeeded { .. }) {
        // Most likely the handler stopped because we cancelled it: reporting that would spend
        // an attempt. Leave the message unacknowledged; it runs again elsewhere.
        warn!(
            outcome = outcome_status(&outcome),
            "grace period over: not reporting this attempt; its message returns to the queue"
        );
        return;
    }
    match &outcome {
        Outcome::Failed {
            message, retryable, ..
        } => info!(duration_ms, retryable, error = %message, "step failed"),
        other => debug!(
            duration_ms,
            outcome = outcome_status(other),
            "step finished"
        ),
    }
    let result = StepResult {
        task_id,
        step_id,
        attempt,
        worker: shared.worker.clone(),
        duration_ms,
        outcome,
        traceparent: None,
    };
    match delivery {
        Some(delivery) => report(env, delivery, result, &routing_key, ids.traceparent).await,
        None => report_leased(env, result, &routing_key, ids.traceparent).await,
    }
}

/// The ids a lease message names, and the step message's trace context.
#[derive(Clone)]
struct LeaseIds {
    task_id: tasker_schemas::TaskId,
    step_id: tasker_schemas::StepId,
    attempt: u32,
    worker: String,
    traceparent: Option<AMQPValue>,
}

/// The step message's `traceparent` header, to copy onto what the worker sends about it.
fn traceparent_of(delivery: &Delivery) -> Option<AMQPValue> {
    delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(HEADER_TRACEPARENT))
        .cloned()
}

/// The orchestrator's publish time of a message (Unix ms, header `x-tasker-published-ms`).
pub(crate) fn published_ms(properties: &lapin::BasicProperties) -> Option<u64> {
    let value = properties
        .headers()
        .as_ref()?
        .inner()
        .get(tasker_schemas::message::HEADER_PUBLISHED_MS)?;
    match value {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::Timestamp(n) => Some(*n),
        _ => None,
    }
}

/// Three heartbeat intervals: a lease survives two lost heartbeats.
fn lease_ms(heartbeat: Duration) -> u64 {
    u64::try_from(heartbeat.saturating_mul(3).as_millis()).unwrap_or(u64::MAX)
}

/// A lease message: `started` or `heartbeat`.
trait LeaseMessage: tasker_schemas::Payload {
    fn new(ids: &LeaseIds, lease_ms: u64) -> Self;
}

impl LeaseMessage for Started {
    fn new(ids: &LeaseIds, lease_ms: u64) -> Self {
        Started {
            task_id: ids.task_id,
            step_id: ids.step_id,
            attempt: ids.attempt,
            worker: ids.worker.clone(),
            lease_ms,
        }
    }
}

impl LeaseMessage for Heartbeat {
    fn new(ids: &LeaseIds, lease_ms: u64) -> Self {
        Heartbeat {
            task_id: ids.task_id,
            step_id: ids.step_id,
            attempt: ids.attempt,
            worker: ids.worker.clone(),
            lease_ms,
        }
    }
}

async fn publish_lease<M: LeaseMessage>(
    env: &SessionEnv,
    ids: &LeaseIds,
    lease_ms: u64,
    routing_key: &str,
) -> Result<(), PublishError> {
    let envelope = Envelope::new(M::new(ids, lease_ms));
    let bytes = encode(&envelope)?;
    let mut properties = with_user_id(
        message_properties(envelope.message_id).with_type(M::KIND.as_str().into()),
        &env.shared.identity.user_id,
    );
    if let Some(trace) = &ids.traceparent {
        let mut headers = lapin::types::FieldTable::default();
        headers.insert(HEADER_TRACEPARENT.into(), trace.clone());
        properties = properties.with_headers(headers);
    }
    publish_confirmed(
        &env.publisher,
        &env.shared.names.results_exchange(),
        routing_key,
        &bytes,
        properties,
    )
    .await
}

/// Renews a long step's lease until dropped. A missed heartbeat is logged; if the lease runs out
/// the orchestrator times the attempt out and its late result is ignored.
async fn heartbeat_loop(env: SessionEnv, ids: LeaseIds, routing_key: String) {
    let every = env.shared.long_steps.heartbeat;
    let lease = lease_ms(every);
    loop {
        tokio::time::sleep(every).await;
        if let Err(e) = publish_lease::<Heartbeat>(&env, &ids, lease, &routing_key).await {
            warn!(error = %e, "heartbeat not sent; the lease may run out");
        }
    }
}

/// Reports the result of a leased step (its message is already acked): retries the publish a
/// few times; if it never goes through, the lease runs out and the attempt is retried.
async fn report_leased(
    env: &SessionEnv,
    result: StepResult,
    routing_key: &str,
    traceparent: Option<AMQPValue>,
) {
    let publish = || {
        env.results
            .send(result.clone(), routing_key.to_owned(), traceparent.clone())
    };
    let sent = publish
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(REQUEUE_DELAY)
                .with_max_delay(MAX_REQUEUE_DELAY)
                .with_max_times(7),
        )
        .notify(|e, delay| {
            warn!(error = %e, ?delay, "could not publish a leased step's result; retrying")
        })
        .await;
    if sent.is_err() {
        error!(
            "gave up publishing a leased step's result; its lease will expire and the step will be retried"
        );
    }
}

async fn report(
    env: &SessionEnv,
    delivery: Delivery,
    result: StepResult,
    routing_key: &str,
    traceparent: Option<AMQPValue>,
) {
    let published = env
        .results
        .send(result, routing_key.to_owned(), traceparent);
    match published.await {
        Ok(()) => {
            env.shared.publish_failures.store(0, Ordering::Relaxed);
            ack(delivery).await;
        }
        Err(e) => requeue_later(env, delivery, &e).await,
    }
}

/// Publishes a message that cannot be read to the dead-letter exchange with the reason, then
/// acknowledges it.
async fn dead_letter(env: &SessionEnv, delivery: Delivery, reason: String) {
    warn!(
        routing_key = %delivery.routing_key,
        worker = %env.shared.worker,
        %reason,
        "dead-lettering a step message that cannot be read"
    );
    let properties = with_user_id(
        dead_letter_properties(&delivery.properties, &reason),
        &env.shared.identity.user_id,
    );
    let published = publish_confirmed(
        &env.publisher,
        &env.shared.names.dead_letter_exchange(),
        delivery.routing_key.as_str(),
        &delivery.data,
        properties,
    )
    .await;
    match published {
        Ok(()) => {
            env.shared.publish_failures.store(0, Ordering::Relaxed);
            ack(delivery).await;
        }
        Err(e) => {
            error!(error = %e, "could not publish the dead letter; rejecting the message to the queue's dead-letter exchange");
            note_publish_failure(env, &e);
            let reject = BasicRejectOptions { requeue: false };
            if let Err(e) = delivery.acker.reject(reject).await {
                warn!(error = %e, "rejecting the unreadable message failed; it returns to the queue when its channel closes");
            }
        }
    }
}

/// The original message's properties, persistent, with the reason header added.
fn dead_letter_properties(original: &BasicProperties, reason: &str) -> BasicProperties {
    let mut headers = original.headers().clone().unwrap_or_default();
    headers.insert(
        HEADER_DEAD_LETTER_REASON.into(),
        AMQPValue::LongString(reason.into()),
    );
    original
        .clone()
        .with_headers(headers)
        .with_delivery_mode(crate::publish::PERSISTENT)
}

async fn ack(delivery: Delivery) {
    match delivery.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => {}
        Ok(false) => warn!(
            "the step message could not be acknowledged (its channel is gone); it will be redelivered"
        ),
        Err(e) => {
            warn!(error = %e, "acknowledging the step message failed; it will be redelivered")
        }
    }
}

/// After a failed publish: wait (longer after each failure in a row), then requeue the message.
async fn requeue_later(env: &SessionEnv, delivery: Delivery, error: &PublishError) {
    let delay = requeue_delay(note_publish_failure(env, error));
    error!(error = %error, ?delay, "could not publish the result; the step message will be requeued");
    tokio::time::sleep(delay).await;
    let requeue = BasicNackOptions {
        requeue: true,
        multiple: false,
    };
    match delivery.acker.nack(requeue).await {
        Ok(_) => {}
        Err(e) => {
            warn!(error = %e, "requeueing the step message failed; it returns to the queue when its channel closes")
        }
    }
}

/// Counts a failed publish and ends the session if the publisher channel is gone. Returns the
/// number of failed publishes in a row.
fn note_publish_failure(env: &SessionEnv, error: &PublishError) -> u32 {
    if !env.publisher.status().connected() {
        env.lose(format!("the publisher channel is closed ({error})"));
    }
    env.shared
        .publish_failures
        .fetch_add(1, Ordering::Relaxed)
        .saturating_add(1)
}

fn requeue_delay(failures_in_a_row: u32) -> Duration {
    let doublings = failures_in_a_row.saturating_sub(1).min(16);
    REQUEUE_DELAY
        .saturating_mul(1 << doublings)
        .min(MAX_REQUEUE_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tasker_schemas::{StepId, TaskId, encode_payload};

    fn step() -> StepMessage {
        StepMessage {
            task_id: TaskId::new(),
            step_id: StepId::new(),
            namespace: "ns".into(),
            template: "t".into(),
            step: "s".into(),
            handler: "h".into(),
            queue: "default".into(),
            attempt: 1,
            idempotency_key: "k".into(),
            context: json!({}),
            parent_outputs: Default::default(),
            timeout_ms: 1_000,
            result_routing_key: "ns.0".into(),
            map_index: None,
            map_item: None,
            failure: None,
        }
    }

    #[test]
    fn decodes_or_names_the_problem() {
        let bytes = encode_payload(step()).unwrap();
        assert_eq!(decode_step(&bytes).unwrap().handler, "h");
        assert!(
            decode_step(b"\x01\x02garbage")
                .unwrap_err()
                .contains("not a MessagePack envelope")
        );
        let mut long = step();
        long.result_routing_key = "r".repeat(300);
        assert!(
            decode_step(&encode_payload(long).unwrap())
                .unwrap_err()
                .contains("result_routing_key")
        );
        let wrong_kind = encode_payload(tasker_schemas::Cancel {
            task_id: TaskId::new(),
            reason: None,
        })
        .unwrap();
        assert!(
            decode_step(&wrong_kind)
                .unwrap_err()
                .contains("unexpected message kind")
        );
    }

    #[test]
    fn requeue_delay_grows_and_is_capped() {
        assert_eq!(requeue_delay(1), Duration::from_millis(250));
        assert_eq!(requeue_delay(2), Duration::from_millis(500));
        assert_eq!(requeue_delay(5), Duration::from_secs(4));
        assert_eq!(requeue_delay(6), MAX_REQUEUE_DELAY);
        assert_eq!(requeue_delay(u32::MAX), MAX_REQUEUE_DELAY);
    }

    #[test]
    fn dead_letters_keep_headers_and_add_the_reason() {
        let mut headers = lapin::types::FieldTable::default();
        headers.insert("traceparent".into(), AMQPValue::LongString("00-abc".into()));
        let original = BasicProperties::default()
            .with_headers(headers)
            .with_message_id("m1".into());
        let props = dead_letter_properties(&original, "bad bytes");
        let headers = props.headers().clone().unwrap();
        assert_eq!(
            headers.inner().get(HEADER_DEAD_LETTER_REASON),
            Some(&AMQPValue::LongString("bad bytes".into()))
        );
        assert!(headers.contains_key("traceparent"));
        assert_eq!(props.delivery_mode(), &Some(2));
        assert_eq!(props.message_id(), &Some("m1".into()));
    }
}
