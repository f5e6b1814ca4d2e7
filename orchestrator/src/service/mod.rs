//! Services: what the orchestrator does, apart from how it is asked (the AMQP and HTTP edges in
//! [`crate::edge`]) and when (the loops in [`crate::loops`]). Services decide nothing about a
//! step's fate themselves: they read rows through [`crate::store`], ask
//! [`crate::transition`], and write the answer back in one transaction, then do the
//! after-commit work (publish, wake, announce).
//!
//! | module | what |
//! |---|---|
//! | [`apply`] | applying reported attempts, admitting the children they make ready |
//! | [`Shared`], [`DispatchHandle`], [`Pending`] | the handles every part shares |
//! | [`admission`] | admitting a queue's backlog |
//! | [`publish`] | publishing admitted attempts, confirms to the confirmer |
//! | [`tasks`] | submit, cancel, retry, read |
//! | [`templates`] | registering and reading templates |
//! | [`events`] | lifecycle events of finished tasks |
//! | [`gauges`] | the gauges of `/metrics` |
//! | [`workers`] | the worker registry |
//! | [`keys`] | API keys: authenticating a token, creating, listing, revoking keys |
//! | [`audit`] | the audit log of operator actions |
//! | [`namespaces`] | per-namespace settings (retention) |
//! | [`timers`] | due retries, expired leases, the outbox relay |
//! | [`schedules`] | schedules: create, pause, resume, delete, read; firing due ticks |
//! | [`waits`] | timed steps waking, signals, delayed starts, task deadlines |
//! | [`reconcile`] | repairing tasks without a live owner, slot recounts, pruning |

pub mod admission;
pub mod apply;
pub mod audit;
pub mod dead_letters;
pub mod dynamic;
pub mod events;
pub mod gauges;
pub mod keys;
pub mod namespaces;
pub mod operate;
pub mod publish;
pub mod reconcile;
pub mod schedules;
pub mod tasks;
pub mod templates;
pub mod timers;
pub mod waits;
pub mod workers;

mod handles;

pub use handles::{DispatchHandle, Pending, Shared};

use crate::broker::BrokerError;
use crate::store::StoreError;
use tasker_schemas::{DataError, TaskId, TaskState, TemplateError};

/// Refuses an argument that is not a valid name (1–128 of `A-Z a-z 0-9 _ -`): nothing by that
/// name can exist, and PostgreSQL text cannot hold some of what is not (a NUL).
pub(crate) fn name_arg(what: &str, name: &str) -> Result<()> {
    tasker_schemas::template::validate_name(what, name)
        .map_err(|e| ServiceError::InvalidRequest(e.to_string()))
}

/// What a service can fail with: the caller's mistakes (each its own variant) and the
/// dependencies' faults ([`ServiceError::Store`], [`ServiceError::Broker`]), never mixed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("invalid template: {0}")]
    InvalidTemplate(#[from] TemplateError),
    #[error(
        "template {namespace}/{name} version {version} is already registered with different content; bump `version:` to {next_version} to register the change"
    )]
    TemplateConflict {
        namespace: String,
        name: String,
        version: u32,
        /// The next free version (newest registered + 1).
        next_version: u32,
    },
    #[error("template {namespace}/{name}{} not found{}", .version.map(|v| format!(" version {v}")).unwrap_or_default(), .hint.as_ref().map(|h| format!("; {h}")).unwrap_or_default())]
    TemplateNotFound {
        namespace: String,
        name: String,
        version: Option<u32>,
        /// What the caller may have meant (the closest registered name, the versions there are).
        hint: Option<String>,
    },
    #[error("task {0} not found")]
    TaskNotFound(TaskId),
    #[error("task {task_id} has no mapped step {step:?}")]
    StepNotFound { task_id: TaskId, step: String },
    #[error("idempotency key {key:?} already used by task {task_id} with a different request")]
    IdempotencyConflict { key: String, task_id: TaskId },
    #[error("task id {0} is already used by a different request")]
    TaskIdConflict(TaskId),
    #[error("{0}")]
    Data(#[from] DataError),
    /// The caller sent something invalid (the text says what).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("schedule {0} not found")]
    ScheduleNotFound(uuid::Uuid),
    #[error(
        "a schedule named {name:?} already exists in namespace {namespace:?} (pass another name)"
    )]
    ScheduleConflict { namespace: String, name: String },
    /// A signal to a finished task, or of a name no step of the task waits for.
    #[error("{0}")]
    SignalRefused(String),
    /// No key, or an unknown or revoked one (401).
    #[error("{0}")]
    Unauthorized(String),
    /// A valid key outside its role or namespaces (403).
    #[error("{0}")]
    Forbidden(String),
    /// An operator action the task's or step's state does not allow (the text says why).
    #[error("task {task_id}: {message}")]
    ActionRefused { task_id: TaskId, message: String },
    #[error("dead letter {0} not found")]
    DeadLetterNotFound(i64),
    /// A bulk action whose filter matches more tasks than were confirmed, or too many.
    #[error("{message}")]
    BulkRefused { message: String, matched: u64 },
    #[error("task {task_id} is {state}: {action} is not possible")]
    InvalidState {
        task_id: TaskId,
        state: TaskState,
        action: &'static str,
    },
}

impl ServiceError {
    /// True when the same call may succeed later (the database or the broker is down or busy).
    pub fn is_retryable(&self) -> bool {
        match self {
            ServiceError::Store(e) => e.is_transient(),
            ServiceError::Broker(_) => true,
            _ => false,
        }
    }

    /// True when the caller is not at fault: the dependencies failed.
    pub fn is_internal(&self) -> bool {
        matches!(self, ServiceError::Store(_) | ServiceError::Broker(_))
    }
}

impl From<sqlx::Error> for ServiceError {
    fn from(e: sqlx::Error) -> Self {
        ServiceError::Store(StoreError::Database(e))
    }
}

pub type Result<T, E = ServiceError> = std::result::Result<T, E>;

/// Whether the database answers within `timeout` (for readiness).
pub async fn database_reachable(shared: &Shared, timeout: std::time::Duration) -> bool {
    matches!(
        tokio::time::timeout(timeout, crate::store::ping(&shared.db)).await,
        Ok(Ok(()))
    )
}
