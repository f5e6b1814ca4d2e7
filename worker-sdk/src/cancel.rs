//! Cancelled tasks, as announced on the cancel exchange: steps of a cancelled task published
//! before the cancel are refused before they run, and running handlers of it see their
//! context's token cancelled. A step published after the cancel (the task was retried) runs.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use tasker_schemas::TaskId;
use tokio_util::sync::CancellationToken;

/// How many cancelled task ids are remembered (oldest forgotten first).
const REMEMBERED: usize = 10_000;

/// Cancelled tasks with when their cancel was published (Unix ms), and the order they came in.
type Cancelled = (HashMap<TaskId, Option<u64>>, VecDeque<TaskId>);

#[derive(Default)]
pub(crate) struct Cancellations {
    cancelled: Mutex<Cancelled>,
    running: Mutex<HashMap<TaskId, Vec<(u64, CancellationToken)>>>,
    next: AtomicU64,
}

impl Cancellations {
    /// Records a cancelled task (`at`: when the cancel was published) and cancels its running
    /// handlers.
    pub(crate) fn cancel(&self, task: TaskId, at: Option<u64>) {
        {
            let mut guard = self.cancelled.lock().unwrap_or_else(|p| p.into_inner());
            let (set, order) = &mut *guard;
            if set.insert(task, at).is_none() {
                order.push_back(task);
                if order.len() > REMEMBERED
                    && let Some(old) = order.pop_front()
                {
                    set.remove(&old);
                }
            }
        }
        let running = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&task);
        for (_, token) in running.into_iter().flatten() {
            token.cancel();
        }
    }

    /// Whether a step of `task` published at `published` (Unix ms) is refused: the task was
    /// cancelled after it was published. Without both times (an older orchestrator), every step
    /// of a cancelled task is refused.
    pub(crate) fn is_cancelled(&self, task: TaskId, published: Option<u64>) -> bool {
        match self
            .cancelled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .get(&task)
        {
            None => false,
            Some(&cancelled_at) => match (cancelled_at, published) {
                (Some(cancelled_at), Some(published)) => published < cancelled_at,
                _ => true,
            },
        }
    }

    /// Tracks a running handler's token until the guard is dropped.
    pub(crate) fn track(&self, task: TaskId, token: CancellationToken) -> Tracked<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(task)
            .or_default()
            .push((id, token));
        Tracked {
            owner: self,
            task,
            id,
        }
    }
}

pub(crate) struct Tracked<'a> {
    owner: &'a Cancellations,
    task: TaskId,
    id: u64,
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        let mut running = self.owner.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tokens) = running.get_mut(&self.task) {
            tokens.retain(|(id, _)| *id != self.id);
            if tokens.is_empty() {
                running.remove(&self.task);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancelling_a_task_cancels_its_running_handlers_and_is_remembered() {
        let c = Cancellations::default();
        let (t1, t2) = (TaskId::new(), TaskId::new());
        let a = CancellationToken::new();
        let b = CancellationToken::new();
        let _ga = c.track(t1, a.clone());
        let _gb = c.track(t2, b.clone());
        c.cancel(t1, Some(100));
        assert!(a.is_cancelled());
        assert!(!b.is_cancelled());
        assert!(c.is_cancelled(t1, Some(99)) && !c.is_cancelled(t2, Some(99)));
        // Published in the cancel's second or later (a retry of the task): it runs.
        assert!(!c.is_cancelled(t1, Some(100)) && !c.is_cancelled(t1, Some(101)));
        // Without the times, a cancelled task's steps are refused.
        assert!(c.is_cancelled(t1, None));
        c.cancel(t2, None);
        assert!(c.is_cancelled(t2, Some(1_000)));
    }

    #[test]
    fn memory_is_bounded() {
        let c = Cancellations::default();
        let first = TaskId::new();
        c.cancel(first, None);
        for _ in 0..REMEMBERED {
            c.cancel(TaskId::new(), None);
        }
        assert!(!c.is_cancelled(first, None));
        assert_eq!(c.cancelled.lock().unwrap().0.len(), REMEMBERED);
    }
}
