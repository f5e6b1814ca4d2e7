//! # tasker-schemas
//!
//! The wire contract of Tasker, shared by the orchestrator, the Rust worker SDK and any worker in
//! another language (see `CONTRACT.md` beside this crate):
//!
//! - [`ids`]: newtype ids, strings on the wire;
//! - [`message`]: the MessagePack envelope and every message kind, with [`encode`]/[`decode`];
//! - [`template`]: the workflow template model and its validation;
//! - [`data`]: size caps and checks for task data;
//! - [`state`]: task and step states and attempt outcomes, one name each from SQL to the CLI;
//! - [`topology`]: exchange and queue names.
//!
//! ```
//! use tasker_schemas::{decode, encode_payload, Cancel, TaskId};
//!
//! let bytes = encode_payload(Cancel { task_id: TaskId::new(), reason: None })?;
//! let msg = decode::<Cancel>(&bytes)?;
//! assert_eq!(msg.schema_version, "1.1");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod api;
pub mod data;
pub mod ids;
pub mod message;
pub mod operate;
pub mod state;
pub mod template;
pub mod topology;

pub use data::{DataError, DataLimits};
pub use ids::{MessageId, RequestId, StepId, TaskId, WorkerId};
pub use message::{
    Cancel, DecodeError, EncodeError, Envelope, Failure, Heartbeat, Kind, LifecycleEvent, Outcome,
    Payload, ResultBatch, Signal, Started, StepMessage, StepResult, TaskRequest, WorkerHeartbeat,
    WorkerMessage, decode, encode, encode_payload,
};
pub use state::{AttemptOutcome, StepState, TaskState};
pub use template::{
    FailureHandler, Join, MapSpec, Millis, RetryPolicy, StepTemplate, Template, TemplateError,
    Wait, WaitFor, WorkflowRef,
};
pub use topology::Names;

#[cfg(test)]
mod vectors;
