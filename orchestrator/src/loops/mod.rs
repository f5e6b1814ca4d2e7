//! The long-lived loops of a replica, one struct each with `run(self, shutdown)`: they decide
//! only *when* to act and call services for the rest. [`crate::startup::App`] spawns them on
//! one tracker and waits for each to stop on shutdown.
//!
//! | loop | wakes on | does |
//! |---|---|---|
//! | [`Dispatcher`] | queues marked by submits, applies and retries; a backstop poll | admits and publishes each marked queue's backlog |
//! | [`Confirmer`] | publisher confirms | clears confirmed outbox entries in batches; fails unroutable attempts |
//! | [`Timers`] | a retry scheduled; the next due time; the poll interval | promotes due retries, times out expired leases, relays stale outbox entries |
//! | [`Schedules`] | the next tick of any schedule (capped at 1 s); a schedule created or resumed here | fires due schedules' ticks (one task each), prunes old tick records |
//! | [`Reconciler`] | every `reconcile_interval_ms` | repairs tasks without a live owner, recounts slots, prunes |
//! | [`Gauges`] | every `metrics_interval_ms` | sets the gauges of `/metrics` from the snapshot one replica computes |
//! | [`FinishListener`] | PostgreSQL `NOTIFY tasker_task_finished` | tells local long-poll waiters |

mod confirmer;
mod dispatcher;
mod gauges;
mod listener;
mod reconciler;
mod schedules;
mod timers;

pub use confirmer::Confirmer;
pub use dispatcher::Dispatcher;
pub use gauges::Gauges;
pub use listener::FinishListener;
pub use reconciler::Reconciler;
pub use schedules::Schedules;
pub use timers::Timers;
