//! Sets the gauges of `/metrics` every `metrics_interval_ms` ([`crate::service::gauges`]).

use crate::service::{Shared, gauges};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub struct Gauges {
    pub shared: Shared,
}

impl Gauges {
    /// Runs until `shutdown`: at once, then every interval.
    pub async fn run(self, shutdown: CancellationToken) {
        let every = Duration::from_millis(self.shared.config.metrics_interval_ms.max(100));
        loop {
            if let Err(e) = gauges::refresh(&self.shared).await {
                tracing::debug!(error = %e, "gauges not refreshed; will retry");
                gauges::set_ready(&self.shared, false);
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}
