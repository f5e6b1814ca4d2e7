//! The gauges of `/metrics`: one replica per interval counts (see [`crate::store::gauges`]) and
//! saves a snapshot; every replica sets its gauges from the latest snapshot, so all replicas
//! show the same figures.

use super::{Result, Shared};
use crate::store::gauges::{self, Snapshot};

/// Computes the snapshot when it is this replica's turn, then sets the gauges from the latest
/// one, and drains the histograms' pending samples.
pub async fn refresh(shared: &Shared) -> Result<()> {
    let every = i64::try_from(shared.config.metrics_interval_ms).unwrap_or(i64::MAX);
    if gauges::claim_turn(&shared.db, every).await? {
        let (queues, tasks) = gauges::count(&shared.db).await?;
        let dlq = shared.names.dead_letter_queue();
        let dead_letters = match shared.publisher.message_count(&dlq).await {
            Ok(n) => vec![(dlq, i64::from(n))],
            Err(e) => {
                tracing::debug!(error = %e, "cannot count the dead-letter queue");
                Vec::new()
            }
        };
        let snapshot = Snapshot {
            queues,
            tasks,
            dead_letters,
        };
        gauges::save(&shared.db, &snapshot).await?;
    }
    let s = gauges::load(&shared.db).await?;
    set(shared, &s);
    shared.metrics.upkeep();
    Ok(())
}

fn set(shared: &Shared, s: &Snapshot) {
    let m = &shared.metrics;
    let per_queue = |f: &dyn Fn(&gauges::QueueFigures) -> f64| -> Vec<(Vec<String>, f64)> {
        s.queues
            .iter()
            .map(|q| (vec![q.namespace.clone(), q.queue.clone()], f(q)))
            .collect()
    };
    let nq = ["namespace", "queue"];
    m.set_gauges(
        "tasker_queue_ready_steps",
        &nq,
        &per_queue(&|q| q.ready as f64),
    );
    m.set_gauges(
        "tasker_queue_in_flight_steps",
        &nq,
        &per_queue(&|q| q.in_flight as f64),
    );
    m.set_gauges(
        "tasker_queue_oldest_ready_age_seconds",
        &nq,
        &per_queue(&|q| q.oldest_ready_s),
    );
    m.set_gauges(
        "tasker_steps_retrying",
        &nq,
        &per_queue(&|q| q.retrying as f64),
    );
    m.set_gauges(
        "tasker_tasks_running",
        &["namespace", "template"],
        &s.tasks
            .iter()
            .map(|t| {
                (
                    vec![t.namespace.clone(), t.template.clone()],
                    t.running as f64,
                )
            })
            .collect::<Vec<_>>(),
    );
    m.set_gauges(
        "tasker_dead_letters",
        &["queue"],
        &s.dead_letters
            .iter()
            .map(|(q, n)| (vec![q.clone()], *n as f64))
            .collect::<Vec<_>>(),
    );
}
