use crate::broker::{Delivered, Publisher};
use crate::service::Pending;
use crate::service::{Shared, apply};
use crate::store::outbox;
use crate::transition::{self, Finished};
use futures_util::FutureExt;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Awaits publisher confirms in order and clears confirmed outbox entries in batches; applies
/// unroutable attempts as failed ([`transition::unroutable`]).
pub struct Confirmer {
    pub shared: Shared,
    pub rx: mpsc::Receiver<Pending>,
}

impl Confirmer {
    /// Runs until `producers_done`, and then until nothing is left in the channel: it outlives
    /// the loops that publish.
    /// Applies of unroutable attempts it started are awaited (at most 2 s) before it returns.
    pub async fn run(self, producers_done: CancellationToken) {
        let Confirmer { shared, mut rx } = self;
        let applies = TaskTracker::new();
        run(shared, &mut rx, producers_done, &applies).await;
        // Their publishes can no longer be confirmed here: the relay covers them.
        drop(rx);
        applies.close();
        if tokio::time::timeout(Duration::from_secs(2), applies.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "applying unroutable attempts did not finish at shutdown; the lease expiry covers them"
            );
        }
    }
}

async fn run(
    shared: Shared,
    rx: &mut mpsc::Receiver<Pending>,
    producers_done: CancellationToken,
    applies: &TaskTracker,
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
        let confirm_seconds = shared
            .metrics
            .histogram("tasker_publish_confirm_seconds", &[]);
        for p in buf.drain(..) {
            let settled = Publisher::settle(p.confirm).await;
            confirm_seconds.record(p.sent_at.elapsed().as_secs_f64());
            match settled {
                Ok(Delivered::Confirmed) => done.push(p.outbox_id),
                Ok(Delivered::Unroutable(text)) => {
                    done.push(p.outbox_id);
                    unroutable.push(Finished {
                        task_id: p.task_id,
                        step_id: p.step_id,
                        attempt: p.attempt,
                        worker: None,
                        result: transition::unroutable(&p.queue, &text),
                        duration_ms: None,
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
            applies.spawn(async move {
                if let Err(e) = apply::apply_outcomes(&shared, unroutable).await {
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
    if let Err(e) = outbox::clear(&shared.db, done).await {
        // Harmless: the relay republishes, and the result guard drops duplicates.
        tracing::warn!(error = %e, "could not clear outbox entries");
    }
    done.clear();
}
