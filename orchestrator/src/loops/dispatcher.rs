use crate::service::{Shared, admission, templates};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Admits and publishes the backlog of every queue marked in the [`crate::service::DispatchHandle`].
pub struct Dispatcher {
    pub shared: Shared,
}

impl Dispatcher {
    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let shared = self.shared;
        let poll = shared.config.poll_interval();
        let mut last_refresh = Instant::now() - Duration::from_secs(3600);
        loop {
            if last_refresh.elapsed() > Duration::from_secs(5) {
                // Templates registered on other replicas may name new queues.
                if let Ok(queues) = templates::all_queues(&shared).await {
                    shared.dispatch.know(queues);
                }
                last_refresh = Instant::now();
            }
            for queue in shared.dispatch.take() {
                if let Err(e) = admission::admit_queue(&shared, &queue).await {
                    tracing::warn!(queue = %queue, error = %e, "dispatch failed; will retry");
                    // Try this queue again on the next round.
                    shared.dispatch.know([queue.clone()]);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = shared.dispatch.notified() => {}
                _ = tokio::time::sleep(poll) => shared.dispatch.wake_all_known(),
            }
        }
    }
}
