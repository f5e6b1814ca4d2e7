use crate::service::{Shared, timers};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Promotes due retries, times out expired leases, relays outbox entries left behind, settles
/// child workflows, wakes timed steps (sleeps, signal waits), starts delayed tasks and cancels
/// tasks past their deadline.
pub struct Timers {
    pub shared: Shared,
}

impl Timers {
    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let shared = self.shared;
        let poll = shared.config.poll_interval();
        loop {
            let next = match tick(&shared, poll).await {
                Ok(next) => next,
                Err(e) => {
                    tracing::warn!(error = %e, "timer round failed; will retry");
                    poll
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = shared.timers.notified() => {}
                _ = tokio::time::sleep(next) => {}
            }
        }
    }
}

/// One round; returns how long to sleep before the next.
async fn tick(shared: &Shared, poll: Duration) -> crate::service::Result<Duration> {
    timers::promote_due_retries(shared).await?;
    timers::expire_leases(shared).await?;
    timers::relay(shared).await?;
    timers::settle_children(shared).await?;
    crate::service::waits::wake_due(shared).await?;
    crate::service::waits::start_due(shared).await?;
    crate::service::waits::expire_deadlines(shared).await?;
    timers::next_due(shared, poll).await
}
