//! Admission outside the apply path: admitting a queue's backlog in batches (one transaction
//! each, published after the commit), for the dispatcher.

use super::apply::publish_and_settle;
use super::{Result, Shared};
use crate::metrics::Metrics;
use crate::slots::SlotKey;
use crate::store::admission;
use crate::transition;
use std::collections::HashMap;

/// Admits and publishes batches for one queue until it has no more room or work.
pub async fn admit_queue(shared: &Shared, queue: &str) -> Result<()> {
    let batch = shared.config.dispatch_batch_size.max(1);
    let slot = SlotKey::queue(queue);
    loop {
        let mut tx = shared.db.begin().await?;
        let slots =
            admission::lock_slots(&mut tx, std::slice::from_ref(&slot), &HashMap::new()).await?;
        let in_flight = slots.get(&slot).copied().unwrap_or(0);
        let a = transition::admission(shared.config.max_in_flight_per_queue, in_flight, batch);
        let d = admission::admit_locked(&mut tx, queue, a, shared.config.step_data_limit()).await?;
        tx.commit().await?;
        shared.dispatch.note_room(queue, d.bounded);
        if d.admitted.is_empty() {
            return Ok(());
        }
        Metrics::add(
            &shared.metrics.counters.steps_dispatched_total,
            d.admitted.len(),
        );
        publish_and_settle(shared, &d.admitted, d.messages).await;
        if !d.full {
            return Ok(());
        }
    }
}
