//! The orchestrator's error type.

use tasker_schemas::{DataError, TaskId, TemplateError};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    #[error("broker unavailable: {0}")]
    BrokerUnavailable(String),
    #[error("invalid template: {0}")]
    InvalidTemplate(#[from] TemplateError),
    #[error(
        "template {namespace}/{name} version {version} is already registered with different content"
    )]
    TemplateConflict {
        namespace: String,
        name: String,
        version: u32,
    },
    #[error("template {namespace}/{name}{} not found", .version.map(|v| format!(" version {v}")).unwrap_or_default())]
    TemplateNotFound {
        namespace: String,
        name: String,
        version: Option<u32>,
    },
    #[error("task {0} not found")]
    TaskNotFound(TaskId),
    #[error("idempotency key {key:?} already used by task {task_id} with a different request")]
    IdempotencyConflict { key: String, task_id: TaskId },
    #[error("task id {0} is already used by a different request")]
    TaskIdConflict(TaskId),
    #[error("{0}")]
    Data(#[from] DataError),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("task {task_id} is {state}: {action} is not possible")]
    InvalidState {
        task_id: TaskId,
        state: String,
        action: &'static str,
    },
    #[error("cannot encode message: {0}")]
    Encode(#[from] tasker_schemas::EncodeError),
}

impl Error {
    /// True when the same operation may succeed later (a dependency is down or busy).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Database(e) => is_transient_db(e),
            Error::Broker(_) | Error::BrokerUnavailable(_) => true,
            _ => false,
        }
    }
}

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
