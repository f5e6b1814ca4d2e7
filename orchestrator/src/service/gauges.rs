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
        // The registry: live workers per queue; rows of workers gone for 10 minutes go.
        let mut per_queue: std::collections::BTreeMap<String, i64> = Default::default();
        for w in crate::store::workers::live(&shared.db).await? {
            for q in w.queues {
                *per_queue.entry(q).or_default() += 1;
            }
        }
        crate::store::workers::forget_gone(&shared.db, FORGET_AFTER_MS).await?;
        let snapshot = Snapshot {
            queues,
            tasks,
            dead_letters,
            workers: per_queue.into_iter().collect(),
        };
        gauges::save(&shared.db, &snapshot).await?;
    }
    let s = gauges::load(&shared.db).await?;
    set(shared, &s);
    set_ready(shared, shared.publisher.is_connected());
    shared.metrics.upkeep();
    Ok(())
}

/// Rows of workers gone this long (after their 3 intervals) are deleted.
const FORGET_AFTER_MS: i64 = 10 * 60 * 1000;

/// `tasker_ready`: 1 while this replica reaches its database (it just read the snapshot) and
/// its broker link is up; 0 otherwise.
pub fn set_ready(shared: &Shared, ready: bool) {
    shared.metrics.set_gauges(
        "tasker_ready",
        &[],
        &[(Vec::new(), if ready { 1.0 } else { 0.0 })],
    );
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
        "tasker_workers_live",
        &["queue"],
        &s.workers
            .iter()
            .map(|(q, n)| (vec![q.clone()], *n as f64))
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
