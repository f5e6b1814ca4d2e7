//! The worker registry: the worker announces itself (`worker_heartbeat`, CONTRACT.md §5) when a
//! broker session starts, every interval while it runs, and with `stopping` on a graceful
//! shutdown, so `GET /v1/workers` and `tasker workers` list it and the orchestrator can say when
//! no live worker runs a waiting step's handler.

use crate::publish::{PublishError, message_properties, publish_confirmed, with_user_id};
use crate::session::Shared;
use lapin::Channel;
use std::time::Duration;
use tasker_schemas::topology::WORKER_HEARTBEAT_ROUTING_KEY;
use tasker_schemas::{Envelope, Kind, WorkerHeartbeat, WorkerId, encode};
use tracing::warn;

/// Default interval between heartbeats; a worker counts as gone after 3 missed ones.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// What the worker says about itself (fixed at start).
#[derive(Clone, Debug)]
pub(crate) struct Identity {
    pub(crate) worker_id: WorkerId,
    pub(crate) host: String,
    pub(crate) queues: Vec<String>,
    pub(crate) concurrency: usize,
    pub(crate) interval: Duration,
    /// The user of the worker's AMQP URL: the `user_id` property of everything it publishes.
    pub(crate) user_id: String,
}

impl Identity {
    pub(crate) fn new(queues: Vec<String>, concurrency: usize, interval: Duration) -> Self {
        Self {
            worker_id: WorkerId::new(),
            host: host_name(),
            queues,
            concurrency,
            interval,
            user_id: String::new(),
        }
    }

    /// The same, publishing as `user_id`.
    pub(crate) fn with_user_id(mut self, user_id: String) -> Self {
        self.user_id = user_id;
        self
    }
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_default()
        .chars()
        .filter(|c| *c != '\0')
        .take(200)
        .collect()
}

fn heartbeat(shared: &Shared, stopping: bool) -> WorkerHeartbeat {
    let id = &shared.identity;
    let mut handlers: Vec<String> = shared.handlers.keys().cloned().collect();
    handlers.sort_unstable();
    let free = shared.semaphore.available_permits();
    WorkerHeartbeat {
        worker_id: id.worker_id,
        worker: shared.worker.clone(),
        host: id.host.clone(),
        sdk: "rust".into(),
        sdk_version: env!("CARGO_PKG_VERSION").into(),
        queues: id.queues.clone(),
        handlers,
        concurrency: u32::try_from(id.concurrency).unwrap_or(u32::MAX),
        in_flight: u32::try_from(id.concurrency.saturating_sub(free)).unwrap_or(0),
        interval_ms: u64::try_from(id.interval.as_millis()).unwrap_or(u64::MAX),
        stopping,
    }
}

/// Publishes one heartbeat (confirmed).
pub(crate) async fn announce(
    channel: &Channel,
    shared: &Shared,
    stopping: bool,
) -> Result<(), PublishError> {
    let envelope = Envelope::new(heartbeat(shared, stopping));
    let bytes = encode(&envelope)?;
    publish_confirmed(
        channel,
        &shared.names.results_exchange(),
        WORKER_HEARTBEAT_ROUTING_KEY,
        &bytes,
        with_user_id(
            message_properties(envelope.message_id)
                .with_type(Kind::WorkerHeartbeat.as_str().into()),
            &shared.identity.user_id,
        ),
    )
    .await
}

/// Announces the worker now and every interval, until dropped (the session ends).
pub(crate) async fn announce_loop(channel: Channel, shared: std::sync::Arc<Shared>) {
    let mut warned: Option<std::time::Instant> = None;
    loop {
        if let Err(e) = announce(&channel, &shared, false).await {
            // An orchestrator older than the registry has no binding for it: say so once a
            // minute at most, and keep working.
            if warned.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                warn!(worker = %shared.worker, error = %e, "worker heartbeat not delivered");
                warned = Some(std::time::Instant::now());
            }
        }
        tokio::time::sleep(shared.identity.interval).await;
    }
}
