//! Admission outside the apply path: the dispatcher's wake handle, and admitting a queue's
//! backlog in batches (one transaction each, published after the commit).

use super::apply::publish_and_settle;
use super::{Result, Shared};
use crate::metrics::Metrics;
use crate::slots::SlotKey;
use crate::store::admission;
use crate::transition;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

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

    /// Takes the queues marked since the last call.
    pub fn take(&self) -> Vec<String> {
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect()
    }

    /// Marks every known queue (the backstop poll).
    pub fn wake_all_known(&self) {
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

impl DispatchHandle {
    /// Resolves when some queue was marked.
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}

impl Default for DispatchHandle {
    fn default() -> Self {
        Self::new()
    }
}

/// Admits and publishes batches for one queue until it has no more room or work.
pub async fn admit_queue(shared: &Shared, queue: &str) -> Result<()> {
    let batch = shared.config.dispatch_batch_size.max(1);
    let slot = SlotKey::queue(queue);
    loop {
        let mut tx = shared.db.begin().await?;
        let slots =
            admission::lock_slots(&mut tx, std::slice::from_ref(&slot), &HashMap::new()).await?;
        let in_flight = slots.get(&slot).copied().unwrap_or(0);
        let a = transition::admission(shared.config.max_in_flight_per_queue, in_flight, batch);
        let d = admission::admit_locked(&mut tx, queue, a).await?;
        tx.commit().await?;
        shared.dispatch.note_room(queue, d.bounded);
        if d.admitted.is_empty() {
            return Ok(());
        }
        Metrics::add(&shared.metrics.steps_dispatched_total, d.admitted.len());
        publish_and_settle(shared, &d.admitted, d.messages).await;
        if !d.full {
            return Ok(());
        }
    }
}
