//! The handles every part of the orchestrator shares: cheap to clone.

use crate::broker::Publisher;
use crate::config::Config;
use crate::dispatch::{DispatchHandle, Pending};
use crate::metrics::Metrics;
use crate::store::templates::TemplateCache;
use sqlx::PgPool;
use std::sync::Arc;
use tasker_schemas::{Names, TaskId};
use tokio::sync::{Notify, broadcast, mpsc};

#[derive(Clone)]
pub struct Shared {
    pub db: PgPool,
    pub config: Arc<Config>,
    pub names: Names,
    pub publisher: Publisher,
    pub templates: TemplateCache,
    pub metrics: Arc<Metrics>,
    pub dispatch: DispatchHandle,
    /// Publishes awaiting their broker confirm (the confirmer clears their outbox entries).
    pub confirms: mpsc::Sender<Pending>,
    /// Wakes the timer loop (a retry was scheduled).
    pub timers: Arc<Notify>,
    /// Ids of tasks that finished, on any replica (from Postgres NOTIFY).
    pub finished: broadcast::Sender<TaskId>,
}
