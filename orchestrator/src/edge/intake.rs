//! The task request consumer: task requests over AMQP, submitted like `POST /v1/tasks`. A
//! request is acked only after its task is committed; a request that can never succeed is
//! dead-lettered with the reason.

use super::outage_backoff;
use super::results::{REQUEST_DEAD_LETTERS, log_dead_letter};
use crate::Result;
use crate::broker;
use crate::metrics::Metrics;
use crate::service::{ServiceError, Shared, tasks};
use backon::Retryable;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tasker_schemas::api::SubmitTask;
use tasker_schemas::{TaskRequest, decode};
use tokio_util::sync::CancellationToken;

/// Consumes AMQP task requests until shutdown. A request is acked only after its task is
/// committed; a request that can never succeed is dead-lettered with the reason.
pub async fn run_consumer(shared: Shared, shutdown: CancellationToken) -> Result<()> {
    let conn = broker::connect(&shared.config.amqp_url, &shared.amqp_tls).await?;
    let channel = conn.create_channel().await?;
    let prefetch: u16 = 32;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            shared.names.task_requests_queue().into(),
            "tasker-intake".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    consumer
        .take_until(shutdown.cancelled())
        .for_each_concurrent(prefetch as usize, |delivery| {
            let shared = shared.clone();
            let shutdown = shutdown.clone();
            async move {
                match delivery {
                    Ok(d) => handle_request(&shared, d, &shutdown).await,
                    Err(e) => tracing::warn!(error = %e, "task request consumer error"),
                }
            }
        })
        .await;
    let _ = channel.close(200, "shutdown".into()).await;
    let _ = conn.close(200, "shutdown".into()).await;
    Ok(())
}

async fn handle_request(shared: &Shared, d: Delivery, shutdown: &CancellationToken) {
    // The size first: a huge request is refused before any of it is decoded.
    if let Err(reason) = tasker_schemas::message::check_size(
        "the task request",
        &d.data,
        shared.config.max_request_bytes,
    ) {
        return reject(shared, &d, &reason).await;
    }
    // Signals travel the same queue (message kind `signal`).
    if tasker_schemas::message::peek_kind(&d.data).ok().as_deref()
        == Some(tasker_schemas::Kind::Signal.as_str())
    {
        return handle_signal(shared, d, shutdown).await;
    }
    let req = match decode::<TaskRequest>(&d.data) {
        Ok(env) => env.payload,
        Err(e) => return reject(shared, &d, &e.to_string()).await,
    };
    // Broker identity: only the namespace's own user may submit to it.
    if let Some(identity) = &shared.identity {
        let user = d.properties.user_id().as_ref().map(|u| u.as_str());
        if let Some(reason) = identity.refusal(user, &req.namespace) {
            return reject(shared, &d, &reason).await;
        }
    }
    let request_id = req.request_id;
    let submit_req = SubmitTask::from(req);
    // The request's `traceparent` header: the task's trace continues it.
    let traceparent = d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(tasker_schemas::message::HEADER_TRACEPARENT))
        .and_then(|v| match v {
            lapin::types::AMQPValue::LongString(s) => Some(s.to_string()),
            _ => None,
        });
    let (traceparent, request_id) = (traceparent.as_deref(), Some(request_id));
    // Over AMQP the broker's permissions (and, with broker identity on, the publisher's
    // `user_id`) guard the namespace; the orchestrator submits on the request's behalf.
    let amqp = crate::auth::Principal::system("amqp");
    let submitted = (|| tasks::submit_traced(shared, &amqp, &submit_req, request_id, traceparent))
        .retry(outage_backoff())
        // Pause this request rather than nack it: an outage must not burn deliveries.
        .when(|e: &ServiceError| e.is_retryable() && !shutdown.is_cancelled())
        .notify(|e, _| tracing::warn!(error = %e, "database unavailable; retrying task request"))
        .await;
    match submitted {
        Ok(created) => {
            tracing::debug!(task_id = %created.task_id, request_id = ?request_id, "task request applied");
            let _ = d.acker.ack(BasicAckOptions::default()).await;
        }
        // Shutting down: leave it unacked; it is redelivered to another consumer.
        Err(e) if e.is_retryable() => {}
        Err(e) => reject(shared, &d, &e.to_string()).await,
    }
}

/// A `signal` message: recorded like `POST /v1/tasks/{id}/signals/{name}` (a repeat is a
/// no-op), acked after the commit; a refused one (unknown task, finished task, a name no step
/// waits for, bad fields) is dead-lettered with the reason.
async fn handle_signal(shared: &Shared, d: Delivery, shutdown: &CancellationToken) {
    let signal = match decode::<tasker_schemas::Signal>(&d.data) {
        Ok(env) => env.payload,
        Err(e) => return reject(shared, &d, &e.to_string()).await,
    };
    let body = tasker_schemas::api::SendSignal {
        signal_id: signal.signal_id,
        payload: signal.payload,
    };
    // Over AMQP the orchestrator records the signal on the publisher's behalf; with broker
    // identity on, only the user of the task's namespace may signal it.
    let amqp = crate::auth::Principal::system("amqp");
    if let Some(identity) = &shared.identity {
        let namespace = crate::service::tasks::authorize(
            shared,
            &amqp,
            signal.task_id,
            crate::auth::Role::Operate,
            "send signals",
        )
        .await;
        match namespace {
            Ok(namespace) => {
                let user = d.properties.user_id().as_ref().map(|u| u.as_str());
                if let Some(reason) = identity.refusal(user, &namespace) {
                    return reject(shared, &d, &reason).await;
                }
            }
            // Unacked: redelivered once the database answers.
            Err(e) if e.is_retryable() => return,
            Err(e) => return reject(shared, &d, &e.to_string()).await,
        }
    }
    let sent = (|| crate::service::waits::send(shared, &amqp, signal.task_id, &signal.name, &body))
        .retry(outage_backoff())
        .when(|e: &ServiceError| e.is_retryable() && !shutdown.is_cancelled())
        .notify(|e, _| tracing::warn!(error = %e, "database unavailable; retrying signal"))
        .await;
    match sent {
        Ok(_) => {
            let _ = d.acker.ack(BasicAckOptions::default()).await;
        }
        Err(e) if e.is_retryable() => {}
        Err(e) => reject(shared, &d, &e.to_string()).await,
    }
}

async fn reject(shared: &Shared, d: &Delivery, reason: &str) {
    match shared
        .publisher
        .dead_letter(
            &shared.names,
            d.routing_key.as_str(),
            &d.data,
            d.properties.clone(),
            reason,
        )
        .await
    {
        Ok(broker::Delivered::Confirmed) => {
            Metrics::add(&shared.metrics.counters.dead_lettered_total, 1);
            log_dead_letter(&REQUEST_DEAD_LETTERS, d, reason);
            let _ = d.acker.ack(BasicAckOptions::default()).await;
        }
        other => tracing::warn!(
            ?other,
            "could not dead-letter task request; leaving it unacked"
        ),
    }
}
