//! The results consumer: worker results, `started` and heartbeats, applied many per
//! transaction. The consumer takes what is already waiting (up to the batch size) without
//! lingering, applies it, and acks only after the commit. A batch that fails because of one
//! message is split until the message is isolated and dead-lettered; a database outage pauses
//! the consumer (nothing is nacked).

use super::outage_backoff;
use crate::Result;
use crate::broker::{self, BrokerError, Delivered};
use crate::metrics::Metrics;
use crate::service::{self, ServiceError, Shared, apply};
use crate::transition::{AttemptResult, Finished};
use backon::Retryable;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tasker_schemas::{Outcome, WorkerMessage};
use tokio_util::sync::CancellationToken;

/// An attempt number from a worker as stored (a PostgreSQL integer); out of range is the
/// message's fault and dead-letters it with this reason.
fn attempt_of(attempt: u32) -> Result<i32, String> {
    i32::try_from(attempt)
        .map_err(|_| format!("attempt {attempt} is out of range (at most {})", i32::MAX))
}

/// Converts a worker's result into an outcome to apply; an out-of-range attempt number is an
/// error with the reason.
pub fn to_finished(r: tasker_schemas::StepResult) -> Result<Finished, String> {
    let attempt = attempt_of(r.attempt)?;
    let result = match r.outcome {
        Outcome::Succeeded { output, branches } => AttemptResult::Succeeded { output, branches },
        Outcome::Failed {
            message,
            retryable,
            retry_after_ms,
        } => AttemptResult::Failed {
            error: message,
            retryable,
            retry_after_ms,
        },
        Outcome::HandlerMissing { handler } => AttemptResult::HandlerMissing { handler },
        other => AttemptResult::Failed {
            error: format!("unsupported outcome {other:?}"),
            retryable: false,
            retry_after_ms: None,
        },
    };
    Ok(Finished {
        task_id: r.task_id,
        step_id: r.step_id,
        attempt,
        worker: Some(r.worker),
        result,
    })
}

/// One delivery and what it carried.
struct Item {
    delivery: Delivery,
    work: Work,
}

enum Work {
    Results(Vec<Finished>),
    Started {
        step: tasker_schemas::StepId,
        attempt: i32,
        worker: String,
        lease_ms: i64,
    },
    /// Undecodable: dead-letter with this reason.
    Bad(String),
}

/// A `started` or a `heartbeat`: the attempt's execution lease, taken or renewed.
fn lease(step: tasker_schemas::StepId, attempt: u32, worker: String, lease_ms: u64) -> Work {
    match attempt_of(attempt) {
        Ok(attempt) => Work::Started {
            step,
            attempt,
            worker,
            lease_ms: lease_ms.min(i64::MAX as u64) as i64,
        },
        Err(reason) => Work::Bad(reason),
    }
}

fn classify(delivery: Delivery) -> Item {
    let work = match WorkerMessage::decode(&delivery.data) {
        Ok((_, WorkerMessage::Results(results))) => {
            match results.into_iter().map(to_finished).collect() {
                Ok(finished) => Work::Results(finished),
                Err(reason) => Work::Bad(reason),
            }
        }
        Ok((_, WorkerMessage::Started(s))) => lease(s.step_id, s.attempt, s.worker, s.lease_ms),
        Ok((_, WorkerMessage::Heartbeat(h))) => lease(h.step_id, h.attempt, h.worker, h.lease_ms),
        Ok((_, other)) => Work::Bad(format!(
            "unsupported message on the results queue: {other:?}"
        )),
        Err(e) => Work::Bad(e.to_string()),
    };
    Item { delivery, work }
}

/// Consumes one result shard until shutdown.
pub async fn run_consumer(shared: Shared, shard: u16, shutdown: CancellationToken) -> Result<()> {
    let conn = broker::connect(&shared.config.amqp_url).await?;
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(shared.config.result_prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            shared.names.results_queue(shard).into(),
            format!("tasker-results-{shard}").into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let max = shared.config.result_batch_size.max(1);
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => break,
            d = consumer.next() => d,
        };
        let Some(first) = first else { break };
        let mut items = vec![classify(first.map_err(BrokerError::from)?)];
        // Take what is already waiting; never wait to fill a batch.
        while items.len() < max {
            match consumer.next().now_or_never() {
                Some(Some(Ok(d))) => items.push(classify(d)),
                _ => break,
            }
        }
        process(&shared, items, &shutdown).await?;
    }
    let _ = channel.close(200, "shutdown".into()).await;
    let _ = conn.close(200, "shutdown".into()).await;
    Ok(())
}

/// Applies a batch of deliveries and acks them after the commit.
async fn process(shared: &Shared, items: Vec<Item>, shutdown: &CancellationToken) -> Result<()> {
    // Deliveries of one consumer arrive in tag order: once every item is either committed or
    // dead-lettered, one `multiple` ack on the last tag settles the whole batch.
    let Some(last) = items.last().map(|i| i.delivery.acker.clone()) else {
        return Ok(());
    };
    let mut good = Vec::with_capacity(items.len());
    for item in items {
        match &item.work {
            Work::Bad(reason) => forward_dead(shared, &item.delivery, reason).await?,
            _ => good.push(item),
        }
    }
    let mut queue = vec![good];
    while let Some(chunk) = queue.pop() {
        if chunk.is_empty() {
            continue;
        }
        match apply_items(shared, &chunk, shutdown).await {
            Ok(()) => {}
            // Shutting down during an outage: ack nothing; the broker redelivers the batch and
            // what was already committed is dropped as stale then.
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, "leaving a result batch unacked at shutdown");
                return Ok(());
            }
            Err(e) if chunk.len() == 1 => {
                let reason = format!("could not apply: {e}");
                tracing::warn!(error = %e, "isolated a bad result message; dead-lettering it");
                forward_dead(shared, &chunk[0].delivery, &reason).await?;
            }
            Err(e) => {
                tracing::warn!(error = %e, size = chunk.len(), "result batch failed; splitting it");
                Metrics::add(&shared.metrics.batch_splits_total, 1);
                let mut chunk = chunk;
                let right = chunk.split_off(chunk.len() / 2);
                queue.push(right);
                queue.push(chunk);
            }
        }
    }
    last.ack(BasicAckOptions { multiple: true })
        .await
        .map_err(BrokerError::from)?;
    Ok(())
}

/// Applies one chunk; retries while the database is unreachable (pausing the consumer), and
/// returns an error only for a permanent failure of this chunk, or a transient one at shutdown.
async fn apply_items(
    shared: &Shared,
    chunk: &[Item],
    shutdown: &CancellationToken,
) -> service::Result<()> {
    let once = || async {
        let mut finished = Vec::new();
        for item in chunk {
            match &item.work {
                Work::Results(r) => finished.extend(r.iter().cloned()),
                Work::Started {
                    step,
                    attempt,
                    worker,
                    lease_ms,
                } => apply::record_started(shared, *step, *attempt, worker, *lease_ms).await?,
                Work::Bad(_) => {}
            }
        }
        if !finished.is_empty() {
            apply::apply_outcomes(shared, finished).await?;
        }
        Ok(())
    };
    once.retry(outage_backoff())
        .when(|e: &ServiceError| e.is_retryable() && !shutdown.is_cancelled())
        .notify(
            |e, _| tracing::warn!(error = %e, "database unavailable; pausing result consumption"),
        )
        .await
}

/// Dead-letters a delivery with the reason and acks it.
pub(super) async fn dead_letter(shared: &Shared, delivery: &Delivery, reason: &str) -> Result<()> {
    forward_dead(shared, delivery, reason).await?;
    delivery
        .acker
        .ack(BasicAckOptions::default())
        .await
        .map_err(BrokerError::from)?;
    Ok(())
}

/// Publishes a copy of a delivery to the dead-letter exchange with the reason (confirmed); the
/// caller acks the original.
async fn forward_dead(
    shared: &Shared,
    delivery: &Delivery,
    reason: &str,
) -> Result<(), BrokerError> {
    let verdict = shared
        .publisher
        .dead_letter(
            &shared.names,
            &delivery.data,
            delivery.properties.clone(),
            reason,
        )
        .await?;
    if verdict != Delivered::Confirmed {
        // Keep the message (unacked) rather than lose it; it is redelivered later.
        return Err(BrokerError::NotConfirmed(format!(
            "dead-letter publish: {verdict:?}"
        )));
    }
    Metrics::add(&shared.metrics.dead_lettered_total, 1);
    Ok(())
}
