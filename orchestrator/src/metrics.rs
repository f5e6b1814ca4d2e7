//! Counters exposed at `/metrics` in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident: $help:literal),* $(,)?) => {
        /// Process-wide counters. Cheap to bump from any task.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $(pub $name: AtomicU64,)*
        }

        impl Metrics {
            /// Prometheus text exposition of every counter.
            pub fn render(&self) -> String {
                let mut out = String::new();
                $(
                    let _ = writeln!(out, "# HELP tasker_{} {}", stringify!($name), $help);
                    let _ = writeln!(out, "# TYPE tasker_{} counter", stringify!($name));
                    let _ = writeln!(out, "tasker_{} {}", stringify!($name), self.$name.load(Ordering::Relaxed));
                )*
                out
            }
        }
    };
}

counters! {
    tasks_submitted_total: "Tasks created.",
    tasks_completed_total: "Tasks that completed.",
    tasks_failed_total: "Tasks that failed.",
    tasks_cancelled_total: "Tasks that were cancelled.",
    steps_dispatched_total: "Step attempts admitted and published.",
    results_applied_total: "Attempt outcomes applied.",
    results_stale_total: "Outcomes dropped as stale or duplicate.",
    results_applied_twice_total: "Outcomes refused by the attempts primary key (must stay 0).",
    retries_scheduled_total: "Attempts that failed and were scheduled again.",
    timeouts_total: "Attempts whose lease expired.",
    dead_lettered_total: "Messages sent to the dead-letter exchange.",
    outbox_relayed_total: "Outbox entries republished by the relay.",
    batch_splits_total: "Result batches split to isolate a bad message.",
    db_retries_total: "Transactions retried after a transient database error.",
    tasks_pruned_total: "Finished tasks deleted after their retention period.",
    reconciler_repairs_total: "Live tasks the reconciler found without a live owner and repaired.",
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters() {
        let m = Metrics::default();
        Metrics::add(&m.results_stale_total, 3);
        let text = m.render();
        assert!(text.contains("tasker_results_stale_total 3\n"), "{text}");
        assert!(text.contains("# TYPE tasker_tasks_submitted_total counter"));
    }
}
