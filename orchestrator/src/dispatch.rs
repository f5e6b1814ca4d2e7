//! Admission and publishing of step attempts.
//!
//! The dispatcher admits queued steps in one transaction per batch (state, attempt, lease,
//! outbox entry), publishes them straight after the commit, and hands each publisher confirm to
//! the confirmer, which clears the outbox entries in batches once the broker has them. The
//! publish never changes step state. If this process dies anywhere in between, the outbox entry
//! survives and the relay (in [`crate::timers`]) republishes it.

use crate::broker::{Delivered, Publisher, properties};
use crate::error::Result;
use crate::metrics::Metrics;
use crate::state::Shared;
use crate::store::steps::{self, Admitted, AttemptOutcome, Finished, MessageData};
use futures_util::FutureExt;
use lapin::PublisherConfirm;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tasker_schemas::topology::{result_routing_key, shard_of};
use tasker_schemas::{Envelope, MessageId, StepMessage, encode};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

/// Tells the dispatcher which queues may have admissible steps.
#[derive(Clone)]
pub struct DispatchHandle {
    dirty: Arc<Mutex<HashSet<String>>>,
    known: Arc<Mutex<HashSet<String>>>,
    /// Queues whose last admission on this replica stopped at the in-flight bound: released
    /// slots there wake the dispatcher.
    saturated: Arc<Mutex<HashSet<String>>>,
    notify: Arc<Notify>,
}

impl DispatchHandle {
    pub fn new() -> Self {
        Self {
            dirty: Arc::default(),
            known: Arc::default(),
            saturated: Arc::default(),
            notify: Arc::new(Notify::new()),
        }
    }

    /// Marks queues as having work and wakes the dispatcher.
    pub fn wake<I: IntoIterator<Item = S>, S: Into<String>>(&self, queues: I) {
        let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        let before = dirty.len();
        dirty.extend(queues.into_iter().map(Into::into));
        if dirty.len() > before {
            self.notify.notify_one();
        }
    }

    /// Adds queues the backstop poll should look at.
    pub fn know<I: IntoIterator<Item = S>, S: Into<String>>(&self, queues: I) {
        self.known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(queues.into_iter().map(Into::into));
    }

    /// Records whether an admission on `queue` stopped at the in-flight bound.
    pub fn note_room(&self, queue: &str, bounded: bool) {
        let mut saturated = self.saturated.lock().unwrap_or_else(|p| p.into_inner());
        if bounded {
            saturated.insert(queue.to_owned());
        } else {
            saturated.remove(queue);
        }
    }

    /// Slots were released on these queues: wake the dispatcher for those that were full.
    pub fn released<'a, I: IntoIterator<Item = &'a String>>(&self, queues: I) {
        let woken: Vec<String> = {
            let mut saturated = self.saturated.lock().unwrap_or_else(|p| p.into_inner());
            if saturated.is_empty() {
                return;
            }
            queues
                .into_iter()
                .filter(|q| saturated.remove(*q))
                .cloned()
                .collect()
        };
        self.wake(woken);
    }

    fn take(&self) -> Vec<String> {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect()
    }

    fn wake_all_known(&self) {
        let known: Vec<String> = self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        self.wake(known);
    }
}

impl Default for DispatchHandle {
    fn default() -> Self {
        Self::new()
    }
}

/// A publish awaiting its confirm.
pub struct Pending {
    pub outbox_id: i64,
    pub task_id: tasker_schemas::TaskId,
    pub step_id: tasker_schemas::StepId,
    pub attempt: i32,
    pub queue: String,
    pub confirm: PublisherConfirm,
}

/// Runs the dispatcher until shutdown.
pub async fn run(shared: Shared, shutdown: CancellationToken) {
    let poll = shared.config.poll_interval();
    let mut last_refresh = Instant::now() - Duration::from_secs(3600);
    loop {
        if last_refresh.elapsed() > Duration::from_secs(5) {
            // Templates registered on other replicas may name new queues.
            if let Ok(queues) = crate::store::templates::all_queues(&shared.db).await {
                shared.dispatch.know(queues);
            }
            last_refresh = Instant::now();
        }
        let queues = shared.dispatch.take();
        for queue in queues {
            if let Err(e) = dispatch_queue(&shared, &queue).await {
                tracing::warn!(queue = %queue, error = %e, "dispatch failed; will retry");
                // Try this queue again on the next round.
                shared.dispatch.know([queue.clone()]);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = shared.dispatch.notify.notified() => {}
            _ = tokio::time::sleep(poll) => shared.dispatch.wake_all_known(),
        }
    }
}

/// Admits and publishes batches for one queue until it has no more room or work.
async fn dispatch_queue(shared: &Shared, queue: &str) -> Result<()> {
    let batch = shared.config.dispatch_batch_size.max(1);
    loop {
        let mut tx = shared.db.begin().await?;
        let d =
            steps::dispatch(&mut tx, queue, shared.config.max_in_flight_per_queue, batch).await?;
        tx.commit().await?;
        shared.dispatch.note_room(queue, d.bounded);
        if d.admitted.is_empty() {
            return Ok(());
        }
        Metrics::add(&shared.metrics.steps_dispatched_total, d.admitted.len());
        publish_admitted(shared, &d.admitted, d.messages).await;
        if !d.full {
            return Ok(());
        }
    }
}

/// Publishes admitted attempts (pipelined) and queues their confirms. Attempts whose message is
/// too large fail with the reason. Publish errors leave the outbox entry for the relay.
pub async fn publish_admitted(shared: &Shared, admitted: &[Admitted], messages: Vec<MessageData>) {
    let mut failed = Vec::new();
    for m in messages {
        let Some(a) = admitted.iter().find(|a| a.step_id == m.step_id) else {
            continue;
        };
        if m.state != "dispatched" || m.attempt != a.attempt {
            // Already finished (a relay of an old entry): nothing to publish; clear the entry.
            let _ = steps::clear_outbox(&shared.db, &[a.outbox_id]).await;
            continue;
        }
        let idempotency_key = format!("{}:{}", m.task_id, m.step);
        let routing = result_routing_key(
            &m.namespace,
            shard_of(&m.task_id, shared.config.result_shards),
        );
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
        });
        let message_id: MessageId = envelope.message_id;
        let bytes = match encode(&envelope) {
            Ok(b) if b.len() <= shared.config.max_step_message_bytes => b,
            Ok(b) => {
                failed.push(dead(&m.task_id, m.step_id, a, format!(
                    "step message is {} bytes, over the limit of {} bytes (context plus parent outputs)",
                    b.len(),
                    shared.config.max_step_message_bytes
                )));
                let _ = steps::clear_outbox(&shared.db, &[a.outbox_id]).await;
                continue;
            }
            Err(e) => {
                failed.push(dead(&m.task_id, m.step_id, a, e.to_string()));
                let _ = steps::clear_outbox(&shared.db, &[a.outbox_id]).await;
                continue;
            }
        };
        match shared
            .publisher
            .send(
                &shared.names.steps_exchange(),
                &m.queue,
                &bytes,
                properties(message_id),
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
                };
                if shared.confirms.send(pending).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(step_id = %m.step_id, error = %e, "publish failed; the relay will retry")
            }
        }
    }
    // Boxed: applying outcomes may admit and publish further steps.
    if !failed.is_empty()
        && let Err(e) = Box::pin(crate::results::apply_outcomes(shared, failed)).await
    {
        tracing::warn!(error = %e, "could not fail oversized step attempts; the relay will retry");
    }
}

fn dead(
    task: &tasker_schemas::TaskId,
    step: tasker_schemas::StepId,
    a: &Admitted,
    error: String,
) -> Finished {
    Finished {
        task_id: *task,
        step_id: step,
        attempt: a.attempt,
        worker: None,
        outcome: AttemptOutcome::DeadLettered {
            error,
            retryable: false,
        },
    }
}

/// Awaits confirms in order and clears outbox entries in batches, until `producers_done` and
/// then until nothing is left in the channel.
pub async fn run_confirmer(
    shared: Shared,
    mut rx: mpsc::Receiver<Pending>,
    producers_done: CancellationToken,
) {
    let mut buf = Vec::with_capacity(1024);
    // Confirmed entries are deleted together, at most `CLEAR_EVERY` after the first of them:
    // one small transaction per interval instead of one per confirm batch. Far below
    // `relay_after_ms`, so the relay never sees a confirmed entry.
    let mut done: Vec<i64> = Vec::new();
    let mut clear_at: Option<tokio::time::Instant> = None;
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut buf, 1024) => n,
            _ = tokio::time::sleep_until(clear_at.unwrap_or_else(tokio::time::Instant::now)), if clear_at.is_some() => {
                clear(&shared, &mut done).await;
                clear_at = None;
                continue;
            }
            _ = producers_done.cancelled() => {
                rx.recv_many(&mut buf, 1024).now_or_never().unwrap_or_default()
            }
        };
        if n == 0 {
            break;
        }
        let mut unroutable = Vec::new();
        for p in buf.drain(..) {
            match Publisher::settle(p.confirm).await {
                Ok(Delivered::Confirmed) => done.push(p.outbox_id),
                Ok(Delivered::Unroutable(text)) => {
                    done.push(p.outbox_id);
                    unroutable.push(Finished {
                        task_id: p.task_id,
                        step_id: p.step_id,
                        attempt: p.attempt,
                        worker: None,
                        outcome: AttemptOutcome::DeadLettered {
                            error: format!(
                                "step message unroutable: no queue bound for {:?} ({text})",
                                p.queue
                            ),
                            retryable: true,
                        },
                    });
                }
                Ok(Delivered::Nacked) | Err(_) => {
                    tracing::warn!(step_id = %p.step_id, "publish not confirmed; the relay will retry");
                }
            }
        }
        if done.len() >= CLEAR_BATCH {
            clear(&shared, &mut done).await;
            clear_at = None;
        } else if clear_at.is_none() && !done.is_empty() {
            clear_at = Some(tokio::time::Instant::now() + CLEAR_EVERY);
        }
        if !unroutable.is_empty() {
            // Not inline: applying may publish, and this loop must never wait on its own channel.
            let shared = shared.clone();
            tokio::spawn(async move {
                if let Err(e) = crate::results::apply_outcomes(&shared, unroutable).await {
                    tracing::warn!(error = %e, "could not fail unroutable attempts");
                }
            });
        }
    }
    clear(&shared, &mut done).await;
}

/// Longest wait before confirmed outbox entries are deleted.
const CLEAR_EVERY: Duration = Duration::from_millis(50);
/// Most confirmed entries waiting to be deleted.
const CLEAR_BATCH: usize = 4096;

async fn clear(shared: &Shared, done: &mut Vec<i64>) {
    if done.is_empty() {
        return;
    }
    if let Err(e) = steps::clear_outbox(&shared.db, done).await {
        // Harmless: the relay republishes, and the result guard drops duplicates.
        tracing::warn!(error = %e, "could not clear outbox entries");
    }
    done.clear();
}
