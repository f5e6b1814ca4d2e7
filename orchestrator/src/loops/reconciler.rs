use crate::service::{Shared, reconcile};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Tasks deleted per pruning statement.
const PRUNE_BATCH: i64 = 1_000;

/// Every `reconcile_interval_ms`: proves that every live task has a live owner and repairs
/// those that do not (counted in `tasker_reconciler_repairs_total`), then prunes in batches until
/// caught up.
pub struct Reconciler {
    pub shared: Shared,
}

impl Reconciler {
    /// Runs until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let shared = self.shared;
        let every = Duration::from_millis(shared.config.reconcile_interval_ms);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = reconcile::reconcile(&shared).await {
                tracing::warn!(error = %e, "reconciler round failed; will retry");
            }
            // Batches until caught up, within a budget well below the round interval.
            let budget = (every / 2).min(Duration::from_secs(10));
            if let Err(e) = reconcile::prune(&shared, PRUNE_BATCH, budget, &shutdown).await {
                tracing::warn!(error = %e, "pruning failed; will retry");
            }
        }
    }
}
