//! Submitting task requests over AMQP, against a real RabbitMQ.

mod common;

use anyhow::{Result, bail};
use common::{NAMESPACE, broker};
use serde_json::json;
use std::time::Duration;
use tasker_client::PublishError;
use tasker_client::amqp_submit::{confirm_channel, publish_task_request, task_request};
use tasker_schemas::message::CONTENT_TYPE;
use tasker_schemas::{TaskRequest, decode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_requests_are_published_confirmed_and_checked_for_routing() -> Result<()> {
    let Some(b) = broker().await? else {
        return Ok(());
    };
    b.declare_task_requests().await?;
    let channel = confirm_channel(&b.connection).await?;

    let mut request = task_request(NAMESPACE, "order_fulfilment", json!({"order_id": "o-1"}));
    request.idempotency_key = Some("order-o-1".into());
    request.priority = 5;
    let message_id = publish_task_request(&channel, &b.names, &request).await?;

    let Some((bytes, props)) = b
        .take(&b.names.task_requests_queue(), Duration::from_secs(5))
        .await?
    else {
        bail!("the task request did not arrive")
    };
    let envelope = decode::<TaskRequest>(&bytes)?;
    assert_eq!(envelope.payload, request);
    assert_eq!(envelope.message_id, message_id);
    assert_eq!(
        props.content_type().as_ref().map(|c| c.as_str()),
        Some(CONTENT_TYPE)
    );
    assert_eq!(props.delivery_mode(), &Some(2));
    assert_eq!(
        props.kind().as_ref().map(|k| k.as_str()),
        Some("task_request")
    );

    // No queue for this namespace: the broker returns the message and we say so.
    let stray = task_request("nobody_listens", "t", json!({}));
    let err = publish_task_request(&channel, &b.names, &stray)
        .await
        .unwrap_err();
    assert!(matches!(err, PublishError::Returned { .. }), "{err}");
    assert!(err.to_string().contains("nobody_listens"), "{err}");

    // Without confirms there is no way to know it arrived: refused.
    let plain = b.connection.create_channel().await?;
    let err = publish_task_request(&plain, &b.names, &stray)
        .await
        .unwrap_err();
    assert!(matches!(err, PublishError::NotConfirmed), "{err}");
    b.cleanup().await
}
