//! The dead step consumer: step messages the broker dead-lettered (over the delivery limit, or
//! rejected) each become a failed attempt ([`transition::dead_step`]), so their task moves on,
//! and are then passed to the dead-letter queue for inspection.

use super::outage_backoff;
use super::results::{STEP_DEAD_LETTERS, dead_letter};
use crate::Result;
use crate::broker::BrokerError;
use crate::service::{ServiceError, Shared, apply};
use crate::transition::{self, Finished};
use backon::Retryable;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

/// Consumes dead step messages until shutdown.
pub async fn run_consumer(shared: Shared, shutdown: CancellationToken) -> Result<()> {
    let conn = crate::broker::connect(&shared.config.amqp_url, &shared.amqp_tls).await?;
    let channel = conn.create_channel().await?;
    channel.basic_qos(32, BasicQosOptions::default()).await?;
    let mut consumer = channel
        .basic_consume(
            shared.names.step_dead_letter_queue().into(),
            "tasker-dead-steps".into(),
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
        let why = death_reason(&delivery);
        let reason = match tasker_schemas::decode::<tasker_schemas::StepMessage>(&delivery.data) {
            Ok(env) => {
                let m = env.payload;
                let failed = Finished {
                    task_id: m.task_id,
                    step_id: m.step_id,
                    attempt: i32::try_from(m.attempt).unwrap_or(i32::MAX),
                    worker: None,
                    result: transition::dead_step(&why),
                    duration_ms: None,
                };
                (|| apply::apply_outcomes(&shared, vec![failed.clone()]))
                    .retry(outage_backoff())
                    .when(|e: &ServiceError| e.is_retryable() && !shutdown.is_cancelled())
                    .notify(|e, _| tracing::warn!(error = %e, "database unavailable; pausing dead step consumption"))
                    .await?;
                format!("step attempt failed: {why}")
            }
            Err(e) => format!("{why}; unreadable step message: {e}"),
        };
        dead_letter(&shared, &delivery, &reason, &STEP_DEAD_LETTERS).await?;
    }
    let _ = conn.close(200, "shutdown".into()).await;
    Ok(())
}

/// The broker's reason for dead-lettering (`x-first-death-reason`), e.g. `delivery_limit`.
fn death_reason(d: &Delivery) -> String {
    d.properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-first-death-reason").cloned())
        .map(|v| match v {
            lapin::types::AMQPValue::LongString(s) => s.to_string(),
            other => format!("{other:?}"),
        })
        .unwrap_or_else(|| "rejected".into())
}
