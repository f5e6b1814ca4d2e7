use crate::service::{Shared, schedules};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Longest sleep: a schedule created or resumed on another replica (or one whose tick moved)
/// is seen within this.
const CAP: Duration = Duration::from_secs(1);

/// How often old tick records are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Sleeps until the earliest next tick of any schedule (by the database's clock, at most
/// [`CAP`]), then fires every due schedule: claimed with `FOR UPDATE SKIP LOCKED`, so the
/// replicas share them and each tick creates one task.
pub struct Schedules {
    pub shared: Shared,
}

impl Schedules {
    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let shared = self.shared;
        let mut pruned = Instant::now();
        loop {
            let next = match round(&shared).await {
                Ok(next) => next,
                Err(e) => {
                    tracing::warn!(error = %e, "schedules round failed; will retry");
                    CAP
                }
            };
            if pruned.elapsed() >= PRUNE_EVERY {
                pruned = Instant::now();
                if let Err(e) = schedules::prune_ticks(&shared, 10).await {
                    tracing::warn!(error = %e, "pruning schedule ticks failed; will retry");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = shared.schedules.notified() => {}
                _ = tokio::time::sleep(next) => {}
            }
        }
    }
}

/// One round; returns how long to sleep before the next.
async fn round(shared: &Shared) -> crate::service::Result<Duration> {
    schedules::run_due(shared).await?;
    schedules::next_due(shared, CAP).await
}
