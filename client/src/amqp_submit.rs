//! Submitting tasks over AMQP instead of HTTP: publish a [`TaskRequest`] to the task-request
//! exchange (routing key: the namespace), `mandatory`, persistent and confirmed.
//!
//! The request id makes this safe to repeat: publishing the same request again (after a lost
//! confirm, say) never creates a second task.
//!
//! Over TLS (`amqps://`) with a private CA, open the connection with
//! [`crate::tls::amqp_connect`] and [`crate::tls::amqp_tls_config`].
//!
//! ```no_run
//! use serde_json::json;
//! use tasker_schemas::Names;
//! use tasker_client::amqp_submit::{confirm_channel, publish_task_request, task_request};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let connection = lapin::Connection::connect("amqp://127.0.0.1:5672/%2f", Default::default()).await?;
//! let channel = confirm_channel(&connection).await?;
//! let request = task_request("shop", "order_fulfilment", json!({"order_id": "o-1"}));
//! publish_task_request(&channel, &Names::default(), &request).await?;
//! println!("submitted request {}", request.request_id);
//! # Ok(())
//! # }
//! ```

use crate::publish::{PublishError, message_properties, publish_confirmed};
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection};
use serde_json::Value;
use tasker_schemas::message::SCHEMA_VERSION;
use tasker_schemas::{Envelope, Kind, MessageId, Names, RequestId, TaskRequest, encode};

/// A request for the newest version of `template` in `namespace`, with a fresh request id,
/// priority 0, no idempotency key and no chosen task id. Set those fields as needed.
pub fn task_request(
    namespace: impl Into<String>,
    template: impl Into<String>,
    context: Value,
) -> TaskRequest {
    TaskRequest {
        request_id: RequestId::new(),
        namespace: namespace.into(),
        template: template.into(),
        version: None,
        context,
        idempotency_key: None,
        priority: 0,
        task_id: None,
        run_at: None,
        delay_ms: None,
        deadline_ms: None,
    }
}

/// Opens a channel with publisher confirms on, as [`publish_task_request`] needs.
pub async fn confirm_channel(connection: &Connection) -> Result<Channel, PublishError> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

/// Publishes `request` and waits for the broker's confirm. Fails if the broker refuses it, if no
/// queue takes it (no orchestrator has declared the topology) or if `channel` is not in confirm
/// mode. Returns the message id of the envelope sent.
pub async fn publish_task_request(
    channel: &Channel,
    names: &Names,
    request: &TaskRequest,
) -> Result<MessageId, PublishError> {
    publish_task_request_as(channel, names, request, None).await
}

/// [`publish_task_request`] with the AMQP `user_id` property set to `user_id` (the user the
/// channel's connection logged in as: the broker refuses any other; see
/// [`crate::publish::amqp_user`]). A deployment with broker identity on dead-letters a task
/// request whose `user_id` is not the user of its namespace.
pub async fn publish_task_request_as(
    channel: &Channel,
    names: &Names,
    request: &TaskRequest,
    user_id: Option<&str>,
) -> Result<MessageId, PublishError> {
    let envelope = Envelope {
        kind: Kind::TaskRequest,
        schema_version: SCHEMA_VERSION.to_owned(),
        message_id: MessageId::new(),
        payload: request,
    };
    let bytes = encode(&envelope)?;
    let mut properties =
        message_properties(envelope.message_id).with_type(Kind::TaskRequest.as_str().into());
    if let Some(user) = user_id {
        properties = crate::publish::with_user_id(properties, user);
    }
    publish_confirmed(
        channel,
        &names.tasks_exchange(),
        &request.namespace,
        &bytes,
        properties,
    )
    .await?;
    Ok(envelope.message_id)
}

/// Publishes a `signal` to task `signal.task_id` (to the task-request exchange; routing key:
/// `namespace`, the task's) and waits for the broker's confirm. The orchestrator records it like
/// `POST /v1/tasks/{id}/signals/{name}`; a refused signal is dead-lettered with the reason.
pub async fn publish_signal(
    channel: &Channel,
    names: &Names,
    namespace: &str,
    signal: &tasker_schemas::Signal,
) -> Result<MessageId, PublishError> {
    let envelope = Envelope {
        kind: Kind::Signal,
        schema_version: SCHEMA_VERSION.to_owned(),
        message_id: MessageId::new(),
        payload: signal,
    };
    let bytes = encode(&envelope)?;
    let properties =
        message_properties(envelope.message_id).with_type(Kind::Signal.as_str().into());
    publish_confirmed(
        channel,
        &names.tasks_exchange(),
        namespace,
        &bytes,
        properties,
    )
    .await?;
    Ok(envelope.message_id)
}
