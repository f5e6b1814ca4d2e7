//! The results consumer: worker results, `started` and heartbeats, applied many per
//! transaction. The consumer takes what is already waiting (up to the batch size) without
//! lingering, applies it, and acks only after the commit. A batch that fails because of one
//! message is split until the message is isolated and dead-lettered; a database outage pauses
//! the consumer (nothing is nacked).
//!
//! Nothing is dropped silently: every dead letter of the orchestrator's consumers (results, task
//! requests, dead steps) and every stale result is logged with its reason, at most one line a
//! second per kind ([`LogLimit`]), never with a message body.

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
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};
use tasker_schemas::{Outcome, WorkerMessage};
use tokio_util::sync::CancellationToken;

/// At most one log line per `period` for one kind of event, counting the events it held back:
/// a flood of bad or stale messages must not flood the log, and must not go unseen either. The
/// count goes out with the next line let through (so the tail of a burst is reported when the
/// next event of its kind comes).
pub struct LogLimit {
    period: Duration,
    /// When the last line was let through, and the events held back since.
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimit {
    pub const fn new(period: Duration) -> Self {
        Self {
            period,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(held_back)` when this event may be logged now (`held_back`: the events held back
    /// since the last line, to be logged with it); `None` when it is held back.
    pub fn admit(&self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    /// [`admit`](Self::admit) at a given time (for tests).
    pub fn admit_at(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match state.0 {
            Some(last) if now.saturating_duration_since(last) < self.period => {
                state.1 += 1;
                None
            }
            _ => {
                state.0 = Some(now);
                Some(std::mem::take(&mut state.1))
            }
        }
    }
}

/// A kind of dead letter: what the consumer reads, and its own log limit.
pub(super) struct DeadLetters {
    what: &'static str,
    limit: LogLimit,
}

impl DeadLetters {
    const fn new(what: &'static str) -> Self {
        Self {
            what,
            limit: LogLimit::new(Duration::from_secs(1)),
        }
    }
}

/// Messages of the results queues that cannot be read or applied.
static RESULT_DEAD_LETTERS: DeadLetters = DeadLetters::new("result");
/// Task requests that cannot be read or are refused.
pub(super) static REQUEST_DEAD_LETTERS: DeadLetters = DeadLetters::new("task request");
/// Step messages the broker dead-lettered, passed on to the dead-letter queue.
pub(super) static STEP_DEAD_LETTERS: DeadLetters = DeadLetters::new("step");
/// Results dropped as stale.
static STALE_RESULTS: LogLimit = LogLimit::new(Duration::from_secs(1));

/// The most of a reason a log line carries.
const MAX_LOGGED_REASON: usize = 512;

/// `reason`, cut to at most [`MAX_LOGGED_REASON`] bytes (on a character boundary).
fn clip(reason: &str) -> &str {
    if reason.len() <= MAX_LOGGED_REASON {
        return reason;
    }
    let mut end = MAX_LOGGED_REASON;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

/// Logs a dead-lettered delivery (rate-limited per kind): the reason, where the message was
/// going and its id and size; never its body or headers.
pub(super) fn log_dead_letter(kind: &DeadLetters, delivery: &Delivery, reason: &str) {
    let Some(held_back) = kind.limit.admit() else {
        return;
    };
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.as_str().to_owned());
    tracing::warn!(
        kind = kind.what,
        reason = clip(reason),
        exchange = delivery.exchange.as_str(),
        routing_key = delivery.routing_key.as_str(),
        message_id,
        bytes = delivery.data.len(),
        redelivered = delivery.redelivered,
        held_back,
        "dead-lettered a {} message",
        kind.what,
    );
}

/// What names a result: task, step, attempt.
type ResultIds = (tasker_schemas::TaskId, tasker_schemas::StepId, i32);

/// Logs results dropped as stale (rate-limited): how many, and which when every result of the
/// batch was.
fn log_stale(results: &[ResultIds], stale: usize) {
    let Some(held_back) = STALE_RESULTS.admit() else {
        return;
    };
    let which: Vec<String> = if stale == results.len() {
        results
            .iter()
            .take(4)
            .map(|(task, step, attempt)| format!("task {task} step {step} attempt {attempt}"))
            .collect()
    } else {
        Vec::new()
    };
    tracing::info!(
        stale,
        of = results.len(),
        ?which,
        held_back,
        "dropped stale results: not the current dispatched attempt of a step of a live task \
         (unknown step or task, finished task or step, earlier attempt, or a duplicate)"
    );
}

/// An attempt number from a worker as stored (a PostgreSQL integer); out of range is the
/// message's fault and dead-letters it with this reason.
fn attempt_of(attempt: u32) -> Result<i32, String> {
    i32::try_from(attempt)
        .map_err(|_| format!("attempt {attempt} is out of range (at most {})", i32::MAX))
}

/// Longest worker name a message may carry (bytes): it is kept with every attempt.
pub const MAX_WORKER_NAME_LEN: usize = 256;

/// A worker's name as sent; a longer one is the message's fault and dead-letters it.
fn worker_of(worker: &str) -> Result<(), String> {
    if worker.len() > MAX_WORKER_NAME_LEN {
        return Err(format!(
            "worker name is {} bytes; at most {MAX_WORKER_NAME_LEN} are allowed",
            worker.len()
        ));
    }
    if worker.contains('\0') {
        return Err("worker name contains a NUL character, which is not allowed".to_owned());
    }
    Ok(())
}

/// Converts a worker's result into an outcome to apply; an out-of-range attempt number is an
/// error with the reason.
pub fn to_finished(r: tasker_schemas::StepResult) -> Result<Finished, String> {
    let attempt = attempt_of(r.attempt)?;
    worker_of(&r.worker)?;
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
        duration_ms: Some(r.duration_ms),
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
    /// A worker announcing itself (the registry).
    Announce(Box<tasker_schemas::WorkerHeartbeat>),
    /// Undecodable: dead-letter with this reason.
    Bad(String),
}

/// A `started` or a `heartbeat`: the attempt's execution lease, taken or renewed.
fn lease(step: tasker_schemas::StepId, attempt: u32, worker: String, lease_ms: u64) -> Work {
    if let Err(reason) = worker_of(&worker) {
        return Work::Bad(reason);
    }
    match attempt_of(attempt) {
        Ok(attempt) => Work::Started {
            step,
            attempt,
            worker,
            // The lease never outlasts the attempt's timeout (at most 7 days) anyway.
            lease_ms: lease_ms.min(tasker_schemas::template::MAX_DURATION_MS) as i64,
        },
        Err(reason) => Work::Bad(reason),
    }
}

fn classify(delivery: Delivery) -> Item {
    // The size first: a huge message is refused before any of it is decoded.
    if let Err(reason) = tasker_schemas::message::check_size(
        "the message",
        &delivery.data,
        tasker_schemas::message::MAX_WORKER_MESSAGE_BYTES,
    ) {
        return Item {
            delivery,
            work: Work::Bad(reason),
        };
    }
    let work = match WorkerMessage::decode(&delivery.data) {
        Ok((_, WorkerMessage::Results(results))) => {
            match results.into_iter().map(to_finished).collect() {
                Ok(finished) => Work::Results(finished),
                Err(reason) => Work::Bad(reason),
            }
        }
        Ok((_, WorkerMessage::Started(s))) => lease(s.step_id, s.attempt, s.worker, s.lease_ms),
        Ok((_, WorkerMessage::Heartbeat(h))) => lease(h.step_id, h.attempt, h.worker, h.lease_ms),
        Ok((_, WorkerMessage::WorkerHeartbeat(h))) => {
            match worker_of(&h.worker).and_then(|()| crate::service::workers::check(&h)) {
                Ok(()) => Work::Announce(Box::new(h)),
                Err(reason) => Work::Bad(reason),
            }
        }
        Ok((_, other)) => Work::Bad(format!(
            "unsupported message on the results queue: {other:?}"
        )),
        Err(e) => Work::Bad(e.to_string()),
    };
    Item { delivery, work }
}

/// Consumes one result shard until shutdown.
pub async fn run_consumer(shared: Shared, shard: u16, shutdown: CancellationToken) -> Result<()> {
    let conn = broker::connect(&shared.config.amqp_url, &shared.amqp_tls).await?;
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
    let items = match &shared.identity {
        Some(identity) => match check_identity(shared, identity, items, shutdown).await? {
            Some(items) => items,
            // The database is unreachable at shutdown: leave the batch unacked.
            None => return Ok(()),
        },
        None => items,
    };
    let mut good = Vec::with_capacity(items.len());
    for item in items {
        match &item.work {
            Work::Bad(reason) => {
                forward_dead(shared, &item.delivery, reason, &RESULT_DEAD_LETTERS).await?
            }
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
                forward_dead(shared, &chunk[0].delivery, &reason, &RESULT_DEAD_LETTERS).await?;
            }
            Err(e) => {
                tracing::warn!(error = %e, size = chunk.len(), "result batch failed; splitting it");
                Metrics::add(&shared.metrics.counters.batch_splits_total, 1);
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

/// Broker identity: keeps what the delivery's `user_id` may speak for. A result of a step of
/// another namespace is refused: a message of only such results, or a `started` or `heartbeat`
/// of such a step, becomes [`Work::Bad`] (dead-lettered by the caller); a batch with some is dead-lettered whole (a
/// copy, the reason naming the refused steps) and its other results are applied. Results of
/// unknown steps pass (they are dropped as stale). One query per batch reads the steps'
/// namespaces; `None` when the database stayed unreachable until shutdown.
async fn check_identity(
    shared: &Shared,
    identity: &crate::identity::UserFormat,
    mut items: Vec<Item>,
    shutdown: &CancellationToken,
) -> Result<Option<Vec<Item>>> {
    let steps: Vec<uuid::Uuid> = items
        .iter()
        .flat_map(|i| match &i.work {
            Work::Results(r) => r.iter().map(|f| f.step_id.0).collect::<Vec<_>>(),
            Work::Started { step, .. } => vec![step.0],
            _ => Vec::new(),
        })
        .collect();
    let namespaces = if steps.is_empty() {
        Default::default()
    } else {
        let read = || apply::step_namespaces(shared, &steps);
        match read
            .retry(outage_backoff())
            .when(|e: &ServiceError| e.is_retryable() && !shutdown.is_cancelled())
            .await
        {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read step namespaces; leaving a result batch unacked");
                return Ok(None);
            }
        }
    };
    for item in &mut items {
        let user = item
            .delivery
            .properties
            .user_id()
            .as_ref()
            .map(|u| u.as_str().to_owned());
        let refusal = |step: &uuid::Uuid| -> Option<String> {
            identity.refusal(user.as_deref(), namespaces.get(step)?)
        };
        match &mut item.work {
            Work::Results(results) => {
                let mut refused: Vec<String> = Vec::new();
                let mut reason = None;
                results.retain(|f| match refusal(&f.step_id.0) {
                    Some(r) => {
                        refused.push(f.step_id.to_string());
                        reason.get_or_insert(r);
                        false
                    }
                    None => true,
                });
                if let Some(reason) = reason {
                    if results.is_empty() {
                        item.work = Work::Bad(reason);
                    } else {
                        let reason = format!(
                            "{reason}; refused the results of steps [{}], applied the other {}",
                            refused.join(", "),
                            results.len()
                        );
                        forward_dead(shared, &item.delivery, &reason, &RESULT_DEAD_LETTERS).await?;
                    }
                }
            }
            Work::Started { step, .. } => {
                if let Some(reason) = refusal(&step.0) {
                    item.work = Work::Bad(reason);
                }
            }
            // A `worker_heartbeat` names no namespace: the broker's topic permission limits it to
            // `workers.heartbeat`, and it changes no step.
            Work::Announce(_) | Work::Bad(_) => {}
        }
    }
    Ok(Some(items))
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
                Work::Announce(h) => service::workers::record(shared, h).await?,
                Work::Bad(_) => {}
            }
        }
        if !finished.is_empty() {
            let ids: Vec<ResultIds> = finished
                .iter()
                .map(|f| (f.task_id, f.step_id, f.attempt))
                .collect();
            let report = apply::apply_outcomes(shared, finished).await?;
            if report.stale > 0 {
                log_stale(&ids, report.stale);
            }
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
pub(super) async fn dead_letter(
    shared: &Shared,
    delivery: &Delivery,
    reason: &str,
    kind: &DeadLetters,
) -> Result<()> {
    forward_dead(shared, delivery, reason, kind).await?;
    delivery
        .acker
        .ack(BasicAckOptions::default())
        .await
        .map_err(BrokerError::from)?;
    Ok(())
}

/// Publishes a copy of a delivery (its routing key, body and properties) to the dead-letter
/// exchange with the reason (confirmed) and logs it; the caller acks the original.
async fn forward_dead(
    shared: &Shared,
    delivery: &Delivery,
    reason: &str,
    kind: &DeadLetters,
) -> Result<(), BrokerError> {
    let verdict = shared
        .publisher
        .dead_letter(
            &shared.names,
            delivery.routing_key.as_str(),
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
    Metrics::add(&shared.metrics.counters.dead_lettered_total, 1);
    log_dead_letter(kind, delivery, reason);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_limit_lets_one_line_a_period_through_and_counts_the_rest() {
        let limit = LogLimit::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(limit.admit_at(t0), Some(0), "the first event is logged");
        for ms in [1, 10, 500, 999] {
            assert_eq!(limit.admit_at(t0 + Duration::from_millis(ms)), None);
        }
        // A period later: logged, with the 4 held back.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(limit.admit_at(t1), Some(4));
        assert_eq!(limit.admit_at(t1 + Duration::from_millis(1)), None);
        // After a quiet spell: logged, with the 1 held back; then the count starts again.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!(limit.admit_at(t2), Some(1));
        assert_eq!(limit.admit_at(t2 + Duration::from_secs(1)), Some(0));
        // A clock that goes back does not panic; it counts as within the period.
        assert_eq!(limit.admit_at(t0), None);
    }

    #[test]
    fn kinds_are_limited_apart() {
        let a = DeadLetters::new("a");
        let b = DeadLetters::new("b");
        let now = Instant::now();
        assert_eq!(a.limit.admit_at(now), Some(0));
        assert_eq!(
            b.limit.admit_at(now),
            Some(0),
            "one kind does not hold another back"
        );
        assert_eq!(a.limit.admit_at(now), None);
    }

    #[test]
    fn long_reasons_are_clipped_on_a_character_boundary() {
        assert_eq!(clip("short"), "short");
        let long = "é".repeat(MAX_LOGGED_REASON);
        let clipped = clip(&long);
        assert!(clipped.len() <= MAX_LOGGED_REASON);
        assert!(long.starts_with(clipped));
    }
}
