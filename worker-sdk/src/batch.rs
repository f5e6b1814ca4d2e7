//! Result publishing for a session (results of short and of leased steps alike): results that
//! finish while others are being published go out together, as one `result_batch` message per
//! result routing key, under one confirm.
//!
//! Nothing waits to fill a batch: a result that finds the publisher idle goes out at once, alone
//! (as a plain `result` message, with its trace context). Each caller still learns whether its
//! own result was confirmed, and acknowledges its step message only then.

use crate::publish::{PublishError, check_confirmation, message_properties, publish_mandatory};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use tasker_schemas::message::HEADER_TRACEPARENT;
use tasker_schemas::{Envelope, Kind, MessageId, Outcome, ResultBatch, StepResult, encode};
use tokio::sync::{mpsc, oneshot};

/// Most results in one message.
const MAX_BATCH: usize = 128;
/// Most encoded result bytes in one message (a larger single result still goes, alone).
const MAX_BATCH_BYTES: usize = 1024 * 1024;

struct Outgoing {
    result: StepResult,
    routing_key: String,
    traceparent: Option<AMQPValue>,
    done: oneshot::Sender<Result<(), PublishError>>,
}

/// Hands results to the session's result publisher.
#[derive(Clone)]
pub(crate) struct ResultSender(mpsc::Sender<Outgoing>);

impl ResultSender {
    /// Starts the publisher task; it ends when every sender is gone.
    /// `user_id` is the `user_id` property of every result message (the connection's user).
    pub(crate) fn start(channel: Channel, exchange: String, user_id: String) -> Self {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(run(channel, exchange, user_id, rx));
        Self(tx)
    }

    /// Publishes a result (possibly together with others) and waits for its confirm.
    pub(crate) async fn send(
        &self,
        result: StepResult,
        routing_key: String,
        traceparent: Option<AMQPValue>,
    ) -> Result<(), PublishError> {
        let (done, confirmed) = oneshot::channel();
        let outgoing = Outgoing {
            result,
            routing_key,
            traceparent,
            done,
        };
        self.0
            .send(outgoing)
            .await
            .map_err(|_| PublishError::Stopped)?;
        confirmed.await.map_err(|_| PublishError::Stopped)?
    }
}

/// One message to publish and the callers waiting for its confirm.
struct Message {
    routing_key: String,
    results: Vec<StepResult>,
    /// The message id and encoding of the only result, when there is one.
    single: Option<(MessageId, Vec<u8>)>,
    bytes: usize,
    traceparent: Option<AMQPValue>,
    waiting: Vec<oneshot::Sender<Result<(), PublishError>>>,
}

async fn run(
    channel: Channel,
    exchange: String,
    user_id: String,
    mut rx: mpsc::Receiver<Outgoing>,
) {
    let mut buf = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut buf, MAX_BATCH).await > 0 {
        let mut messages: Vec<Message> = Vec::new();
        for o in buf.drain(..) {
            let (result, message_id, bytes) = match checked(o.result) {
                Ok(r) => r,
                Err(e) => {
                    let _ = o.done.send(Err(e));
                    continue;
                }
            };
            let fits = |m: &&mut Message| {
                m.routing_key == o.routing_key
                    && m.bytes + bytes.len() <= MAX_BATCH_BYTES
                    && m.results.len() < MAX_BATCH
            };
            match messages.iter_mut().find(fits) {
                Some(m) => {
                    // A batch carries each entry's traceparent in the entry (one AMQP header
                    // cannot carry several): the first entry's too, once it has company.
                    if m.single.is_some()
                        && let Some(first) = m.results.first_mut()
                    {
                        first.traceparent = m.traceparent.as_ref().and_then(header_text);
                    }
                    let mut result = result;
                    result.traceparent = o.traceparent.as_ref().and_then(header_text);
                    m.results.push(result);
                    m.single = None;
                    m.bytes += bytes.len();
                    m.traceparent = None;
                    m.waiting.push(o.done);
                }
                None => messages.push(Message {
                    routing_key: o.routing_key,
                    results: vec![result],
                    bytes: bytes.len(),
                    single: Some((message_id, bytes)),
                    traceparent: o.traceparent,
                    waiting: vec![o.done],
                }),
            }
        }
        // Publish everything, then await the confirms (pipelined).
        let mut sent = Vec::with_capacity(messages.len());
        for m in messages {
            let confirm = publish(&channel, &exchange, &user_id, &m).await;
            sent.push((m, confirm));
        }
        for (m, confirm) in sent {
            let outcome = match confirm {
                Ok(confirm) => match confirm.await {
                    Ok(c) => check_confirmation(c, &exchange, &m.routing_key),
                    Err(e) => Err(PublishError::Amqp(e)),
                },
                Err(e) => Err(e),
            };
            for done in m.waiting {
                let _ = done.send(match &outcome {
                    Ok(()) => Ok(()),
                    Err(e) => Err(e.clone()),
                });
            }
        }
    }
}

/// The result as it will be sent and its encoding as a single message: a result that cannot be
/// encoded becomes a permanent failure saying why.
fn checked(result: StepResult) -> Result<(StepResult, MessageId, Vec<u8>), PublishError> {
    let envelope = Envelope::new(result.clone());
    match encode(&envelope) {
        Ok(bytes) => Ok((result, envelope.message_id, bytes)),
        Err(e) => {
            let result = StepResult {
                outcome: Outcome::Failed {
                    message: format!("cannot encode the step result: {e}"),
                    retryable: false,
                    retry_after_ms: None,
                },
                ..result
            };
            let envelope = Envelope::new(result.clone());
            let bytes = encode(&envelope)?;
            Ok((result, envelope.message_id, bytes))
        }
    }
}

async fn publish(
    channel: &Channel,
    exchange: &str,
    user_id: &str,
    m: &Message,
) -> Result<lapin::PublisherConfirm, PublishError> {
    let (kind, message_id, bytes) = match &m.single {
        Some((message_id, bytes)) => (Kind::Result, *message_id, bytes.clone()),
        None => {
            let envelope = Envelope::new(ResultBatch {
                results: m.results.clone(),
            });
            (Kind::ResultBatch, envelope.message_id, encode(&envelope)?)
        }
    };
    let mut properties: BasicProperties = crate::publish::with_user_id(
        message_properties(message_id).with_type(kind.as_str().into()),
        user_id,
    );
    if let Some(trace) = &m.traceparent {
        let mut headers = FieldTable::default();
        headers.insert(HEADER_TRACEPARENT.into(), trace.clone());
        properties = properties.with_headers(headers);
    }
    publish_mandatory(channel, exchange, &m.routing_key, &bytes, properties).await
}

/// The text of a `traceparent` header value.
fn header_text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tasker_schemas::{StepId, TaskId, decode};

    #[test]
    fn results_encode() {
        let result = StepResult {
            task_id: TaskId::new(),
            step_id: StepId::new(),
            attempt: 2,
            worker: "w".into(),
            duration_ms: 5,
            outcome: Outcome::succeeded(json!({"a": 1})),
            traceparent: None,
        };
        let (checked, message_id, bytes) = checked(result.clone()).unwrap();
        assert_eq!(checked, result);
        let decoded = decode::<StepResult>(&bytes).unwrap();
        assert_eq!(decoded.payload, result);
        assert_eq!(decoded.message_id, message_id);
    }
}
