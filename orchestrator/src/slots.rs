//! The one slot mechanism: an in-flight counter per scope and key, kept in the `slots` table.
//! Admission adds to it under the slot's row lock, applied outcomes take from it, and the
//! reconciler recounts it. Today every step takes one slot of its queue (`scope = 'queue'`,
//! `key` = the queue name, bound `max_in_flight_per_queue`); narrower limits (a mapped step's
//! `max_parallel`, per-key concurrency) are further scopes of the same counter.
//!
//! Lock order: slots are locked in [`SlotKey`] order, narrower scopes before the queue scope and
//! by key within a scope, always after the task rows of the same transaction.

use std::collections::HashMap;
use std::fmt;

/// What a slot counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SlotScope {
    /// Dispatched steps of one queue. The widest scope: locked last.
    Queue,
}

impl SlotScope {
    /// The name stored in `slots.scope`.
    pub const fn as_str(self) -> &'static str {
        match self {
            SlotScope::Queue => "queue",
        }
    }
}

/// One counter: a scope and a key within it. Ordered as slots must be locked.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub scope: SlotScope,
    pub key: String,
}

impl SlotKey {
    /// The slot of a queue.
    pub fn queue(name: impl Into<String>) -> Self {
        Self {
            scope: SlotScope::Queue,
            key: name.into(),
        }
    }
}

impl fmt::Display for SlotKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.scope.as_str(), self.key)
    }
}

/// The queue slots of counts per queue name (e.g. the dispatched steps released per queue).
pub fn per_queue(counts: &HashMap<String, i64>) -> HashMap<SlotKey, i64> {
    counts
        .iter()
        .map(|(queue, n)| (SlotKey::queue(queue), *n))
        .collect()
}

/// Sorts and deduplicates slots into lock order.
pub fn lock_order(mut slots: Vec<SlotKey>) -> Vec<SlotKey> {
    slots.sort_unstable();
    slots.dedup();
    slots
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_locked_in_one_order_without_repeats() {
        let order = lock_order(vec![
            SlotKey::queue("b"),
            SlotKey::queue("a"),
            SlotKey::queue("b"),
        ]);
        assert_eq!(order, [SlotKey::queue("a"), SlotKey::queue("b")]);
        assert_eq!(SlotKey::queue("a").to_string(), "queue:a");
    }
}
