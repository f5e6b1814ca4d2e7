//! Publishing admitted attempts. The publish never changes step state: each admitted attempt
//! already has its outbox entry, and the confirmer deletes it once the broker confirmed the
//! message. If this process dies anywhere in between, the relay publishes the entry again.

use super::{Pending, Shared};
use crate::broker::{properties, with_traceparent};
use crate::store::outbox::{self, Admitted, MessageData};
use crate::transition::{self, Finished};
use serde_json::Value;
use tasker_schemas::topology::{result_routing_key, shard_of};
use tasker_schemas::{Envelope, MessageId, StepMessage, StepState, encode};

/// Publishes admitted attempts (pipelined) and queues their confirms for the confirmer.
/// Publish errors leave the outbox entry for the relay. Returns the attempts whose message
/// cannot be sent at all (too large, unencodable), to be applied as failed.
pub async fn publish_admitted(
    shared: &Shared,
    admitted: &[Admitted],
    messages: Vec<MessageData>,
) -> Vec<Finished> {
    let mut failed = Vec::new();
    for m in messages {
        let Some(a) = admitted.iter().find(|a| a.step_id == m.step_id) else {
            continue;
        };
        if m.state != StepState::Dispatched || m.attempt != a.attempt {
            // Already finished (a relay of an old entry): nothing to publish; clear the entry.
            let _ = outbox::clear(&shared.db, &[a.outbox_id]).await;
            continue;
        }
        if m.data_bytes > shared.config.step_data_limit() {
            // Refused before it is assembled: the loader left its data out.
            failed.push(undeliverable(m.task_id, m.step_id, a, format!(
                "step message would be over the limit of {} bytes: its context, parent outputs and element are {} bytes as JSON",
                shared.config.max_step_message_bytes, m.data_bytes
            )));
            let _ = outbox::clear(&shared.db, &[a.outbox_id]).await;
            continue;
        }
        let idempotency_key = match m.map_index {
            Some(i) => format!("{}:{}:{i}", m.task_id, m.step),
            None => format!("{}:{}", m.task_id, m.step),
        };
        let routing = result_routing_key(
            &m.namespace,
            shard_of(&m.task_id, shared.config.result_shards),
        );
        // One trace per task (continuing its submit request's, if any); one span per attempt
        // (the same again when the relay republishes).
        let traceparent = crate::telemetry::step_traceparent(
            m.task_id,
            m.trace_parent.as_deref(),
            m.step_id,
            m.attempt as u32,
        );
        // The step queue of the step's namespace.
        let step_key = tasker_schemas::topology::step_routing_key(&m.namespace, &m.queue);
        let envelope = Envelope::new(StepMessage {
            task_id: m.task_id,
            step_id: m.step_id,
            namespace: m.namespace,
            template: m.template,
            step: m.step,
            handler: m.handler,
            queue: m.queue.clone(),
            attempt: m.attempt as u32,
            idempotency_key,
            context: m.context,
            parent_outputs: m.parent_outputs,
            timeout_ms: m.execution_timeout_ms as u64,
            result_routing_key: routing,
            map_index: m.map_index.map(|i| i as u32),
            map_item: m.map_index.map(|_| m.map_item.unwrap_or(Value::Null)),
            failure: m.failure.and_then(|f| serde_json::from_value(f).ok()),
        });
        let message_id: MessageId = envelope.message_id;
        let bytes = match encode(&envelope) {
            Ok(b) if b.len() <= shared.config.max_step_message_bytes => b,
            Ok(b) => {
                failed.push(undeliverable(m.task_id, m.step_id, a, format!(
                    "step message is {} bytes, over the limit of {} bytes (context plus parent outputs)",
                    b.len(),
                    shared.config.max_step_message_bytes
                )));
                let _ = outbox::clear(&shared.db, &[a.outbox_id]).await;
                continue;
            }
            Err(e) => {
                failed.push(undeliverable(m.task_id, m.step_id, a, e.to_string()));
                let _ = outbox::clear(&shared.db, &[a.outbox_id]).await;
                continue;
            }
        };
        let sent_at = std::time::Instant::now();
        match shared
            .publisher
            .send(
                &shared.names.steps_exchange(),
                &step_key,
                &bytes,
                with_traceparent(properties(message_id), &traceparent),
            )
            .await
        {
            Ok(confirm) => {
                let pending = Pending {
                    outbox_id: a.outbox_id,
                    task_id: m.task_id,
                    step_id: m.step_id,
                    attempt: a.attempt,
                    queue: m.queue,
                    confirm,
                    sent_at,
                };
                if shared.confirms.send(pending).await.is_err() {
                    // Shutting down: the relay publishes the rest later.
                    return failed;
                }
            }
            Err(e) => {
                tracing::warn!(step_id = %m.step_id, error = %e, "publish failed; the relay will retry")
            }
        }
    }
    failed
}

/// An attempt whose step message cannot be sent.
fn undeliverable(
    task_id: tasker_schemas::TaskId,
    step_id: tasker_schemas::StepId,
    a: &Admitted,
    error: String,
) -> Finished {
    Finished {
        task_id,
        step_id,
        attempt: a.attempt,
        worker: None,
        result: transition::undeliverable(error),
        duration_ms: None,
    }
}
