//! The dead-letter reader: AMQP cannot browse a queue without consuming it, so the orchestrator
//! consumes `{prefix}.dead_letters` into the bounded `dead_letters` table
//! ([`crate::service::dead_letters`]): each message is recorded, then acked (at least once: a
//! redelivered one is recorded once, by its `message_id`). Nothing is ever dead-lettered from
//! here: whatever arrives is recorded, readable or not.

use super::outage_backoff;
use crate::Result;
use crate::broker::BrokerError;
use crate::service::dead_letters::DeadLetterOutcome;
use crate::service::{ServiceError, Shared, dead_letters};
use crate::store::dead_letters::{DeadLetterFull, DeadLetterRow, NewDeadLetter};
use backon::Retryable;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Map, Value, json};
use tasker_schemas::message::HEADER_DEAD_LETTER_REASON;
use tasker_schemas::operate::{
    DeadLetterList, DeadLetterOutcomeView, DeadLetterOutcomes, DeadLetterView,
};
use tasker_schemas::{Names, StepMessage, TaskRequest, decode};
use tokio_util::sync::CancellationToken;

/// Consumes the dead-letter queue into the table until shutdown.
pub async fn run_consumer(shared: Shared, shutdown: CancellationToken) -> Result<()> {
    let conn = crate::broker::connect(&shared.config.amqp_url, &shared.amqp_tls).await?;
    let channel = conn.create_channel().await?;
    channel.basic_qos(32, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            shared.names.dead_letter_queue().into(),
            "tasker-dead-letters".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    loop {
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => break,
            d = consumer.next() => d,
        };
        let Some(delivery) = delivery else { break };
        let delivery = delivery.map_err(BrokerError::from)?;
        let row = describe(&shared.names, &delivery, shared.config.max_request_bytes);
        let recorded = (|| dead_letters::record(&shared, &row))
            .retry(outage_backoff())
            .when(|e: &ServiceError| e.is_retryable() && !shutdown.is_cancelled())
            .notify(|e, _| tracing::warn!(error = %e, "database unavailable; pausing dead-letter recording"))
            .await;
        match recorded {
            Ok(_) => {
                delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(BrokerError::from)?;
            }
            // Shutting down (or a fault): left unacked, delivered again later.
            Err(e) => {
                tracing::warn!(error = %e, "could not record a dead letter; leaving it unacked");
                if shutdown.is_cancelled() {
                    break;
                }
                return Err(e.into());
            }
        }
    }
    let _ = conn.close(200, "shutdown".into()).await;
    Ok(())
}

/// An AMQP field value as JSON (byte arrays as lists of numbers, unknown kinds as text).
fn value_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(n) => json!(n),
        AMQPValue::Double(n) => json!(n),
        AMQPValue::Timestamp(n) => json!(n),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(s.to_string()),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_json).collect()),
        AMQPValue::FieldTable(t) => table_json(t),
        AMQPValue::Void => Value::Null,
        other => json!(format!("{other:?}")),
    }
}

fn table_json(t: &FieldTable) -> Value {
    Value::Object(
        t.inner()
            .iter()
            .map(|(k, v)| (k.to_string(), value_json(v)))
            .collect::<Map<_, _>>(),
    )
}

fn text(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(str::to_owned)
}

/// What kind of message a dead letter is: its envelope's kind when it can be read, else the
/// queue it died in (`x-first-death-queue`), else its routing key (a result's is
/// `{namespace}.{shard}` or `workers.heartbeat`: it has a dot; nothing else's has).
pub fn classify(
    names: &Names,
    body_kind: Option<&str>,
    death_queue: Option<&str>,
    routing_key: &str,
) -> &'static str {
    match body_kind {
        Some("task_request") => return "task_request",
        Some("step") => return "step",
        Some("result" | "result_batch" | "started" | "heartbeat" | "worker_heartbeat") => {
            return "result";
        }
        Some(_) => return "other",
        None => {}
    }
    if let Some(q) = death_queue {
        if q == names.task_requests_queue() {
            return "task_request";
        }
        if q.starts_with(&format!("{}.step.", names.prefix())) {
            return "step";
        }
        if q.starts_with(&format!("{}.results.", names.prefix())) {
            return "result";
        }
    }
    if routing_key.contains('.') {
        return "result";
    }
    "other"
}

/// The row a delivery is recorded as (its body cut at `max_body`).
fn describe(names: &Names, d: &Delivery, max_body: usize) -> NewDeadLetter {
    let headers = d
        .properties
        .headers()
        .as_ref()
        .map(table_json)
        .unwrap_or_else(|| json!({}));
    let death_queue = text(headers.get("x-first-death-queue"));
    let body_kind = tasker_schemas::message::peek_kind(&d.data).ok();
    let routing_key = d.routing_key.as_str().to_owned();
    let kind = classify(
        names,
        body_kind.as_deref(),
        death_queue.as_deref(),
        &routing_key,
    );
    let reason = text(headers.get(HEADER_DEAD_LETTER_REASON))
        .or_else(|| text(headers.get("x-first-death-reason")).map(|r| format!("broker: {r}")))
        .unwrap_or_else(|| "unknown".into());
    let reason = crate::transition::capped_error(&reason);
    let exchange = text(headers.get("x-first-death-exchange")).unwrap_or_else(|| match kind {
        "task_request" => names.tasks_exchange(),
        "step" => names.steps_exchange(),
        "result" => names.results_exchange(),
        _ => d.exchange.as_str().to_owned(),
    });
    let (mut namespace, mut task_id, mut step) = (None, None, None);
    match kind {
        "task_request" => {
            if let Ok(env) = decode::<TaskRequest>(&d.data) {
                namespace = Some(env.payload.namespace);
                task_id = env.payload.task_id.map(|t| t.0);
            }
        }
        "step" => {
            if let Ok(env) = decode::<StepMessage>(&d.data) {
                namespace = Some(env.payload.namespace);
                task_id = Some(env.payload.task_id.0);
                step = Some(env.payload.step);
            }
        }
        "result" => {
            namespace = routing_key
                .split_once('.')
                .map(|(ns, _)| ns.to_owned())
                .filter(|ns| ns != "workers");
        }
        _ => {}
    }
    // Only valid names are kept (they are filters and scopes).
    let namespace = namespace.filter(|n| tasker_schemas::template::validate_namespace(n).is_ok());
    let mut body = d.data.clone();
    body.truncate(max_body);
    NewDeadLetter {
        kind,
        reason,
        exchange,
        routing_key,
        message_id: d
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().replace('\0', "\u{fffd}")),
        headers,
        body,
        body_bytes: i32::try_from(d.data.len()).unwrap_or(i32::MAX),
        namespace,
        task_id,
        step: step.filter(|s| !s.contains('\0')),
    }
}

/// A dead letter's API body (without its body).
pub fn view(r: DeadLetterRow) -> DeadLetterView {
    DeadLetterView {
        id: r.id,
        received_at: crate::store::rfc3339(r.received_at),
        kind: r.kind,
        reason: r.reason,
        exchange: r.exchange,
        routing_key: r.routing_key,
        message_id: r.message_id,
        headers: r.headers,
        body_bytes: i64::from(r.body_bytes),
        namespace: r.namespace,
        task_id: r.task_id.map(tasker_schemas::TaskId),
        step: r.step,
        body: None,
        body_hex: None,
    }
}

/// A page of dead letters.
pub fn list_view(rows: Vec<DeadLetterRow>, more: bool) -> DeadLetterList {
    let next_before = if more {
        rows.last().map(|r| r.id)
    } else {
        None
    };
    DeadLetterList {
        dead_letters: rows.into_iter().map(view).collect(),
        next_before,
    }
}

/// Most body bytes shown in hex.
const MAX_HEX_BODY: usize = 64 * 1024;

/// One dead letter with its body: as JSON when it is a readable MessagePack envelope, else in
/// hex (its first 64 KiB).
pub fn full_view(d: DeadLetterFull) -> DeadLetterView {
    let json = tasker_schemas::operate::envelope_json(&d.body);
    let mut v = view(d.row);
    if json.is_some() {
        v.body = json;
    } else {
        v.body_hex = Some(hex::encode(&d.body[..d.body.len().min(MAX_HEX_BODY)]));
    }
    v
}

/// The outcomes of a replay or discard.
pub fn outcomes_view(out: Vec<DeadLetterOutcome>) -> DeadLetterOutcomes {
    DeadLetterOutcomes {
        outcomes: out
            .into_iter()
            .map(|o| DeadLetterOutcomeView {
                id: o.id,
                outcome: o.outcome.to_owned(),
                task_id: o.task_id,
                message: o.message,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_letter_is_classified_by_envelope_then_death_queue_then_routing_key() {
        let n = Names::new("t");
        assert_eq!(
            classify(&n, Some("task_request"), None, "x"),
            "task_request"
        );
        assert_eq!(classify(&n, Some("step"), None, "q"), "step");
        assert_eq!(classify(&n, Some("result_batch"), None, "shop.0"), "result");
        assert_eq!(classify(&n, Some("cancel"), None, ""), "other");
        assert_eq!(
            classify(&n, None, Some("t.task_requests"), "shop"),
            "task_request"
        );
        assert_eq!(
            classify(&n, None, Some("t.step.payments"), "payments"),
            "step"
        );
        assert_eq!(classify(&n, None, Some("t.results.3"), "shop.3"), "result");
        assert_eq!(classify(&n, None, None, "shop.0"), "result");
        assert_eq!(classify(&n, None, None, "shop"), "other");
    }

    #[test]
    fn headers_become_json() {
        let mut t = FieldTable::default();
        t.insert("a".into(), AMQPValue::LongString("x".into()));
        t.insert("n".into(), AMQPValue::LongLongInt(3));
        let mut inner = FieldTable::default();
        inner.insert("queue".into(), AMQPValue::LongString("q".into()));
        t.insert(
            "x-death".into(),
            AMQPValue::FieldArray(vec![AMQPValue::FieldTable(inner)].into()),
        );
        assert_eq!(
            table_json(&t),
            json!({"a": "x", "n": 3, "x-death": [{"queue": "q"}]})
        );
    }
}
