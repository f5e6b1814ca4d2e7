//! Task intake, shared by the HTTP API and the AMQP task-request consumer.

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::state::Shared;
use crate::store::tasks::{self, Created, NewTask};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use std::time::Duration;
use tasker_schemas::api::SubmitTask;
use tasker_schemas::{RequestId, TaskRequest, decode};
use tokio_util::sync::CancellationToken;

/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;

/// Validates and creates a task (or returns the existing one for an idempotent repeat).
pub async fn submit(
    shared: &Shared,
    req: &SubmitTask,
    request_id: Option<RequestId>,
) -> Result<Created> {
    tasker_schemas::template::validate_namespace(&req.namespace)?;
    if req.template.is_empty() {
        return Err(Error::InvalidRequest("template must not be empty".into()));
    }
    if let Some(key) = &req.idempotency_key
        && (key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY_LEN)
    {
        return Err(Error::InvalidRequest(format!(
            "idempotency_key must be 1-{MAX_IDEMPOTENCY_KEY_LEN} bytes"
        )));
    }
    if let Some(id) = req.task_id
        && id.0.get_version_num() != 7
    {
        return Err(Error::InvalidRequest(format!(
            "task_id {id} must be a UUIDv7"
        )));
    }
    tasker_schemas::data::check_value("context", &req.context, shared.config.max_context_bytes)?;
    let template = shared
        .templates
        .find(&shared.db, &req.namespace, &req.template, req.version)
        .await?;
    let new = NewTask {
        namespace: &req.namespace,
        template_id: template.id,
        template: &template.template,
        requested_version: req.version,
        context: &req.context,
        idempotency_key: req.idempotency_key.as_deref(),
        request_id,
        priority: req.priority,
        task_id: req.task_id,
    };
    let mut tx = shared.db.begin().await?;
    let created = tasks::create(&mut tx, &new).await?;
    tx.commit().await?;
    if created.created {
        Metrics::add(&shared.metrics.tasks_submitted_total, 1);
        shared.dispatch.wake(created.queues.iter().cloned());
        tracing::debug!(task_id = %created.task_id, template = %req.template, "task created");
    }
    Ok(created)
}

/// Consumes AMQP task requests until shutdown. A request is acked only after its task is
/// committed; a request that can never succeed is dead-lettered with the reason.
pub async fn run_consumer(shared: Shared, shutdown: CancellationToken) -> Result<()> {
    let conn = crate::broker::connect(&shared.config.amqp_url).await?;
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
    let req = match decode::<TaskRequest>(&d.data) {
        Ok(env) => env.payload,
        Err(e) => return reject(shared, &d, &e.to_string()).await,
    };
    let submit_req = SubmitTask {
        namespace: req.namespace,
        template: req.template,
        version: req.version,
        context: req.context,
        idempotency_key: req.idempotency_key,
        priority: req.priority,
        task_id: req.task_id,
    };
    let mut delay = Duration::from_millis(50);
    loop {
        match submit(shared, &submit_req, Some(req.request_id)).await {
            Ok(created) => {
                tracing::debug!(task_id = %created.task_id, request_id = %req.request_id, "task request applied");
                let _ = d.acker.ack(BasicAckOptions::default()).await;
                return;
            }
            Err(e) if e.is_retryable() && !shutdown.is_cancelled() => {
                // Pause this request rather than nack it: an outage must not burn deliveries.
                tracing::warn!(error = %e, "database unavailable; retrying task request");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            // Shutting down: leave it unacked; it is redelivered to another consumer.
            Err(e) if e.is_retryable() => return,
            Err(e) => return reject(shared, &d, &e.to_string()).await,
        }
    }
}

async fn reject(shared: &Shared, d: &Delivery, reason: &str) {
    tracing::warn!(reason, "dead-lettering task request");
    match shared
        .publisher
        .dead_letter(&shared.names, &d.data, d.properties.clone(), reason)
        .await
    {
        Ok(crate::broker::Delivered::Confirmed) => {
            Metrics::add(&shared.metrics.dead_lettered_total, 1);
            let _ = d.acker.ack(BasicAckOptions::default()).await;
        }
        other => tracing::warn!(
            ?other,
            "could not dead-letter task request; leaving it unacked"
        ),
    }
}
