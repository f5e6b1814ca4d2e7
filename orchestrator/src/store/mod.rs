//! SQL, split by concern. Functions take an executor or connection so the caller (a service)
//! owns the transaction. Every statement uses bind parameters; none is built from strings. The
//! store holds guards only ("still dispatched with this attempt", "task still live"): what a
//! transition is, is decided in [`crate::transition`].
//!
//! | module | what |
//! |---|---|
//! | [`admission`] | slot locks and counters, admitting queued steps |
//! | [`apply`] | the locking read of a batch, its set-wise write, halting, finishing tasks |
//! | [`outbox`] | step message data, confirmed and stale outbox entries |
//! | [`timers`] | due retries, expired leases, started/heartbeat leases |
//! | [`waits`] | timed steps (start, wake), signals, delayed starts, deadlines |
//! | [`reconcile`] | finding and repairing inconsistent tasks, slot recounts, pruning |
//! | [`schedules`] | schedules, the claim of a due one, the unique (schedule, tick) key |
//! | [`tasks`] | creating tasks (idempotent), cancel and retry writes, task history |
//! | [`views`] | rows read for the API |
//! | [`console`] | the console's reads: task search, live counts, node states, sessions |
//! | [`workers`] | the worker registry |
//! | [`gauges`] | the counts behind the gauges of `/metrics`, and their shared snapshot |
//! | [`templates`] | template versions |
//! | [`keys`] | API keys (hashed), [`audit`] the audit log, [`namespaces`] per-namespace settings |
//!
//! **Lock order.** Every transaction that changes a task's progress (results, timeouts,
//! fail-fast, cancel, retry, repair) locks task rows first, in id order, then slot rows in
//! [`crate::slots::SlotKey`] order (narrower scopes first, the queue scope last; by key within a
//! scope). Admission and retry promotion only move single step rows between `queued`,
//! `retrying` and `dispatched`, guarded by the step's state, skip step rows locked by others and
//! never wait on a task lock, so no lock cycle can form.

pub mod admission;
pub mod apply;
pub mod audit;
pub mod console;
pub mod dead_letters;
pub mod dynamic;
pub mod gauges;
pub mod keys;
pub mod namespaces;
pub mod operate;
pub mod outbox;
pub mod reconcile;
pub mod schedules;
pub mod tasks;
pub mod templates;
pub mod timers;
pub mod views;
pub mod waits;
pub mod workers;

use chrono::{DateTime, SecondsFormat, Utc};

/// What the store can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The database holds something this code cannot read (a bug or a manual edit).
    #[error("unexpected data in the database: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// True when the same operation may succeed later (the database is down, busy, or a
    /// transaction lost a conflict).
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Database(e) => is_transient_db(e),
            _ => false,
        }
    }

    /// A deadlock or serialization failure: retry the transaction at once.
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Database(sqlx::Error::Database(db))
            if matches!(db.code().as_deref(), Some("40001" | "40P01")))
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Deadlocks, serialization failures and lost connections: retry the transaction.
pub fn is_transient_db(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            matches!(
                db.code().as_deref(),
                Some("40001" | "40P01" | "55P03" | "57P01" | "57P02" | "57P03")
            ) || db.code().is_some_and(|c| c.starts_with("08"))
        }
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Tls(_) | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

/// One round trip to the database.
pub async fn ping(db: &sqlx::PgPool) -> Result<()> {
    sqlx::query("SELECT 1").execute(db).await?;
    Ok(())
}

/// RFC 3339 UTC with microseconds: the one time format of the API and events.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}
