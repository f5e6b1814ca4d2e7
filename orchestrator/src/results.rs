//! Applying attempt outcomes: the results consumer and the shared apply path.
//!
//! Results are consumed with manual acks and applied many per transaction: the consumer takes
//! what is already waiting (up to the batch size) without lingering, applies it, and acks only
//! after the commit. A batch that fails because of one message is split until the message is
//! isolated and dead-lettered; a database outage pauses the consumer (nothing is nacked).

use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::state::Shared;
use crate::store::rfc3339;
use crate::store::steps::{self, ApplyReport, ApplySettings, AttemptOutcome, Finished};
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use std::time::Duration;
use tasker_schemas::{LifecycleEvent, Outcome, WorkerMessage, encode_payload};
use tokio_util::sync::CancellationToken;

/// Applies outcomes in one transaction, retrying transient database errors, then does the
/// after-commit work: publish the steps admitted, wake the dispatcher and timers, publish
/// lifecycle events, count.
///
/// Children that became ready are admitted in the same transaction (the dispatcher's admission
/// under the same per-queue lock), so a chain moves on without a second transaction and a hop
/// through the dispatcher; what does not fit in one dispatch batch is left to the dispatcher.
pub async fn apply_outcomes(shared: &Shared, batch: Vec<Finished>) -> Result<ApplyReport> {
    let settings = ApplySettings {
        max_output_bytes: shared.config.max_output_bytes,
        handler_missing_delay_ms: shared.config.handler_missing_delay_ms,
    };
    let limit = shared.config.dispatch_batch_size.max(1);
    let mut tries = 0;
    let (report, admitted, messages, bounded) = loop {
        let attempt = async {
            let mut tx = shared.db.begin().await?;
            let mut report = steps::apply(&mut tx, &batch, settings).await?;
            let (mut admitted, mut messages, mut bounded) = (Vec::new(), Vec::new(), Vec::new());
            let mut queues: Vec<String> = report.queued.drain().collect();
            queues.sort_unstable();
            let slots = if queues.is_empty() && report.released.is_empty() {
                Default::default()
            } else {
                steps::lock_slots(&mut tx, &queues, &report.released).await?
            };
            for queue in queues {
                let in_flight = slots.get(&queue).copied().unwrap_or(0);
                let room = shared.config.max_in_flight_per_queue - in_flight;
                let d = steps::dispatch_locked(&mut tx, &queue, room, limit).await?;
                if d.full {
                    // Maybe more: the dispatcher takes the rest.
                    report.queued.insert(queue.clone());
                }
                bounded.push((queue, d.bounded));
                admitted.extend(d.admitted);
                messages.extend(d.messages);
            }
            tx.commit().await?;
            Ok::<_, Error>((report, admitted, messages, bounded))
        }
        .await;
        match attempt {
            Ok(r) => break r,
            // Deadlocks and serialization failures are retried at once; outages by the caller.
            Err(Error::Database(ref e)) if tries < 5 && is_conflict(e) => {
                tries += 1;
                Metrics::add(&shared.metrics.db_retries_total, 1);
                tokio::time::sleep(Duration::from_millis(2 * tries)).await;
            }
            Err(e) => return Err(e),
        }
    };
    shared.dispatch.released(report.released.keys());
    for (queue, bounded) in bounded {
        shared.dispatch.note_room(&queue, bounded);
    }
    if !admitted.is_empty() {
        Metrics::add(&shared.metrics.steps_dispatched_total, admitted.len());
        crate::dispatch::publish_admitted(shared, &admitted, messages).await;
    }
    after_commit(shared, &report).await;
    Ok(report)
}

fn is_conflict(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("40001" | "40P01")))
}

async fn after_commit(shared: &Shared, report: &ApplyReport) {
    let m = &shared.metrics;
    Metrics::add(&m.results_applied_total, report.applied);
    Metrics::add(&m.results_stale_total, report.stale);
    Metrics::add(&m.results_applied_twice_total, report.applied_twice);
    if report.applied_twice > 0 {
        tracing::error!(
            count = report.applied_twice,
            "outcomes refused by the attempts primary key"
        );
    }
    if !report.queued.is_empty() {
        shared.dispatch.wake(report.queued.iter().cloned());
    }
    if report.retries > 0 {
        Metrics::add(&m.retries_scheduled_total, report.retries);
        shared.timers.notify_one();
    }
    announce(shared, &report.finished).await;
}

/// Counts finished tasks and publishes their lifecycle events.
pub async fn announce(shared: &Shared, finished: &[steps::FinishedTask]) {
    let m = &shared.metrics;
    for f in finished {
        match f.state.as_str() {
            "completed" => Metrics::add(&m.tasks_completed_total, 1),
            "failed" => Metrics::add(&m.tasks_failed_total, 1),
            _ => Metrics::add(&m.tasks_cancelled_total, 1),
        }
        let event = LifecycleEvent {
            task_id: f.task_id,
            namespace: f.namespace.clone(),
            template: f.template.clone(),
            seq: f.seq as u64,
            state: f.state.clone(),
            at: rfc3339(f.at),
            output: f.output.clone(),
            error: f.error.clone(),
        };
        publish_event(shared, event).await;
    }
}

/// Publishes a lifecycle event (best effort: the database holds the truth).
pub async fn publish_event(shared: &Shared, event: LifecycleEvent) {
    let key = format!("{}.task.{}", event.namespace, event.state);
    match encode_payload(event) {
        Ok(bytes) => {
            let props = crate::broker::properties(tasker_schemas::MessageId::new());
            if let Err(e) = shared
                .publisher
                .send_event(&shared.names.events_exchange(), &key, &bytes, props)
                .await
            {
                tracing::warn!(error = %e, "could not publish lifecycle event");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not encode lifecycle event"),
    }
}

/// Converts a worker's result into an outcome to apply.
pub fn to_finished(r: tasker_schemas::StepResult) -> Finished {
    let outcome = match r.outcome {
        Outcome::Succeeded { output } => AttemptOutcome::Succeeded { output },
        Outcome::Failed {
            message,
            retryable,
            retry_after_ms,
        } => AttemptOutcome::Failed {
            error: message,
            retryable,
            retry_after_ms,
        },
        Outcome::HandlerMissing { handler } => AttemptOutcome::HandlerMissing { handler },
        other => AttemptOutcome::Failed {
            error: format!("unsupported outcome {other:?}"),
            retryable: false,
            retry_after_ms: None,
        },
    };
    Finished {
        task_id: r.task_id,
        step_id: r.step_id,
        attempt: i32::try_from(r.attempt).unwrap_or(i32::MAX),
        worker: Some(r.worker),
        outcome,
    }
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

fn classify(delivery: Delivery) -> Item {
    let work = match WorkerMessage::decode(&delivery.data) {
        Ok((_, WorkerMessage::Results(results))) => {
            Work::Results(results.into_iter().map(to_finished).collect())
        }
        Ok((_, WorkerMessage::Started(s))) => Work::Started {
            step: s.step_id,
            attempt: s.attempt as i32,
            worker: s.worker,
            lease_ms: s.lease_ms.min(i64::MAX as u64) as i64,
        },
        Ok((_, WorkerMessage::Heartbeat(h))) => Work::Started {
            step: h.step_id,
            attempt: h.attempt as i32,
            worker: h.worker,
            lease_ms: h.lease_ms.min(i64::MAX as u64) as i64,
        },
        Ok((_, other)) => Work::Bad(format!(
            "unsupported message on the results queue: {other:?}"
        )),
        Err(e) => Work::Bad(e.to_string()),
    };
    Item { delivery, work }
}

/// Consumes one result shard until shutdown.
pub async fn run_consumer(shared: Shared, shard: u16, shutdown: CancellationToken) -> Result<()> {
    let conn = crate::broker::connect(&shared.config.amqp_url).await?;
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
        let mut items = vec![classify(first?)];
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
    last.ack(BasicAckOptions { multiple: true }).await?;
    Ok(())
}

/// Applies one chunk; retries while the database is unreachable (pausing the consumer), and
/// returns an error only for a permanent failure of this chunk.
async fn apply_items(shared: &Shared, chunk: &[Item], shutdown: &CancellationToken) -> Result<()> {
    let mut delay = Duration::from_millis(50);
    loop {
        let res = async {
            let mut finished = Vec::new();
            for item in chunk {
                match &item.work {
                    Work::Results(r) => finished.extend(r.iter().cloned()),
                    Work::Started {
                        step,
                        attempt,
                        worker,
                        lease_ms,
                    } => {
                        steps::record_started(&shared.db, *step, *attempt, worker, *lease_ms)
                            .await?;
                    }
                    Work::Bad(_) => {}
                }
            }
            if !finished.is_empty() {
                apply_outcomes(shared, finished).await?;
            }
            Ok::<_, Error>(())
        }
        .await;
        match res {
            Ok(()) => return Ok(()),
            Err(e) if e.is_retryable() && !shutdown.is_cancelled() => {
                tracing::warn!(error = %e, "database unavailable; pausing result consumption");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Dead-letters a delivery with the reason and acks it.
async fn dead_letter(shared: &Shared, delivery: &Delivery, reason: &str) -> Result<()> {
    forward_dead(shared, delivery, reason).await?;
    delivery.acker.ack(BasicAckOptions::default()).await?;
    Ok(())
}

/// Publishes a copy of a delivery to the dead-letter exchange with the reason (confirmed); the
/// caller acks the original.
async fn forward_dead(shared: &Shared, delivery: &Delivery, reason: &str) -> Result<()> {
    let verdict = shared
        .publisher
        .dead_letter(
            &shared.names,
            &delivery.data,
            delivery.properties.clone(),
            reason,
        )
        .await?;
    if verdict != crate::broker::Delivered::Confirmed {
        // Keep the message (unacked) rather than lose it; it is redelivered later.
        return Err(Error::InvalidRequest(format!(
            "dead-letter publish not confirmed: {verdict:?}"
        )));
    }
    Metrics::add(&shared.metrics.dead_lettered_total, 1);
    Ok(())
}

/// Consumes dead step messages (over the delivery limit, or rejected): each becomes a failed
/// attempt, so its task moves on, and is then passed to the dead-letter queue for inspection.
pub async fn run_dead_step_consumer(shared: Shared, shutdown: CancellationToken) -> Result<()> {
    let conn = crate::broker::connect(&shared.config.amqp_url).await?;
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
        let delivery = delivery?;
        let why = death_reason(&delivery);
        let reason = match tasker_schemas::decode::<tasker_schemas::StepMessage>(&delivery.data) {
            Ok(env) => {
                let m = env.payload;
                let failed = Finished {
                    task_id: m.task_id,
                    step_id: m.step_id,
                    attempt: i32::try_from(m.attempt).unwrap_or(i32::MAX),
                    worker: None,
                    outcome: AttemptOutcome::DeadLettered {
                        error: format!("step message dead-lettered by the broker ({why})"),
                        retryable: true,
                    },
                };
                let mut delay = Duration::from_millis(50);
                loop {
                    match apply_outcomes(&shared, vec![failed.clone()]).await {
                        Ok(_) => break,
                        Err(e) if e.is_retryable() && !shutdown.is_cancelled() => {
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(5));
                        }
                        Err(e) => return Err(e),
                    }
                }
                format!("step attempt failed: {why}")
            }
            Err(e) => format!("{why}; unreadable step message: {e}"),
        };
        dead_letter(&shared, &delivery, &reason).await?;
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
