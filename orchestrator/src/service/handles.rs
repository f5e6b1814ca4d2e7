//! The handles every part of the orchestrator shares. A leaf module: it depends on no other
//! service, so every service, loop and edge can hold them without an import cycle.

use crate::broker::Publisher;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::store::templates::TemplateCache;
use lapin::PublisherConfirm;
use sqlx::PgPool;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use tasker_schemas::{Names, TaskId};
use tokio::sync::{Notify, broadcast, mpsc};

/// The handles every part of the orchestrator shares: cheap to clone.
#[derive(Clone)]
pub struct Shared {
    pub db: PgPool,
    pub config: Arc<Config>,
    pub names: Names,
    pub publisher: Publisher,
    /// TLS settings of every broker connection (the CA of `amqp_ca_cert`, for `amqps://`).
    pub amqp_tls: lapin::tcp::OwnedTLSConfig,
    pub templates: TemplateCache,
    pub metrics: Arc<Metrics>,
    pub dispatch: DispatchHandle,
    /// Publishes awaiting their broker confirm (the confirmer clears their outbox entries).
    pub confirms: mpsc::Sender<Pending>,
    /// Wakes the timer loop (a retry was scheduled).
    pub timers: Arc<Notify>,
    /// Wakes the schedules loop (a schedule was created or resumed here).
    pub schedules: Arc<Notify>,
    /// Ids of tasks that finished, on any replica (from Postgres NOTIFY).
    pub finished: broadcast::Sender<TaskId>,
    /// The trace exporter (off unless an OTLP endpoint is configured).
    pub traces: crate::telemetry::Traces,
    /// The user naming rule when broker identity is on (`TASKER_BROKER_IDENTITY`).
    pub identity: Option<Arc<crate::identity::UserFormat>>,
}

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

/// A publish awaiting its confirm.
pub struct Pending {
    pub outbox_id: i64,
    pub task_id: tasker_schemas::TaskId,
    pub step_id: tasker_schemas::StepId,
    pub attempt: i32,
    pub queue: String,
    pub confirm: PublisherConfirm,
    /// When it was published (for `tasker_publish_confirm_seconds`).
    pub sent_at: std::time::Instant,
}
