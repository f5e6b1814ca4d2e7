//! HTTP bodies of operator actions (retry a step, rerun from a step, mark a step succeeded,
//! bulk cancel / retry) and of dead letters. Times are RFC 3339 text.

use crate::{TaskId, TaskState};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `POST /v1/tasks/{id}/steps/{step}/succeed`: the output the step succeeds with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SucceedStep {
    pub output: Value,
}

/// The task filter of a bulk action (the task list's filters; all optional).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkFilterBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<TaskState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Tasks created at or after (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_after: Option<String>,
    /// Tasks created before (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_before: Option<String>,
}

/// `POST /v1/tasks/bulk/cancel` and `/retry`: the filter ([`BulkFilterBody`]'s fields) and the
/// count the operator confirmed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkAction {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<TaskState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_before: Option<String>,
    pub expected_count: u64,
}

impl BulkAction {
    pub fn new(filter: BulkFilterBody, expected_count: u64) -> Self {
        Self {
            state: filter.state,
            namespace: filter.namespace,
            template: filter.template,
            created_after: filter.created_after,
            created_before: filter.created_before,
            expected_count,
        }
    }

    pub fn filter(&self) -> BulkFilterBody {
        BulkFilterBody {
            state: self.state,
            namespace: self.namespace.clone(),
            template: self.template.clone(),
            created_after: self.created_after.clone(),
            created_before: self.created_before.clone(),
        }
    }
}

/// `POST /v1/tasks/bulk/count`: how many tasks match (counted up to `max` + 1).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkCount {
    pub count: u64,
    /// Most tasks one bulk action acts on.
    pub max: u64,
}

/// What a bulk action did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkOutcomeView {
    pub matched: u64,
    pub acted: u64,
    pub skipped: u64,
}

/// A recorded dead letter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterView {
    pub id: i64,
    pub received_at: String,
    /// `task_request`, `step`, `result` or `other`.
    pub kind: String,
    pub reason: String,
    pub exchange: String,
    pub routing_key: String,
    pub message_id: Option<String>,
    pub headers: Value,
    /// The original body's size (bytes).
    pub body_bytes: i64,
    pub namespace: Option<String>,
    pub task_id: Option<TaskId>,
    pub step: Option<String>,
    /// Shown alone (`GET /v1/dead-letters/{id}`): the body as JSON when it is a readable
    /// MessagePack envelope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    /// Shown alone, when the body is not readable: its first 64 KiB in hex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_hex: Option<String>,
}

/// A page of dead letters, newest first; `next_before` is the `before` of the next page.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetterList {
    pub dead_letters: Vec<DeadLetterView>,
    pub next_before: Option<i64>,
}

/// `POST /v1/dead-letters/replay` and `/discard`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterIds {
    pub ids: Vec<i64>,
}

/// What happened to one dead letter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterOutcomeView {
    pub id: i64,
    /// `resubmitted`, `step_retried`, `not_needed`, `discarded` or `refused`.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<TaskId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The outcomes of a replay or discard, in the order asked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterOutcomes {
    pub outcomes: Vec<DeadLetterOutcomeView>,
}

/// A MessagePack envelope as JSON (for showing a dead letter), `None` when the bytes are not a
/// readable envelope.
pub fn envelope_json(bytes: &[u8]) -> Option<Value> {
    crate::message::peek_kind(bytes).ok()?;
    rmp_serde::from_slice(bytes).ok()
}

/// `GET /v1/dead-letters` query: filters (all optional) and the page.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Dead letters whose reason contains this text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Received at or after (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Received before (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before_time: Option<String>,
    /// Keyset: the previous page's `next_before`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<i64>,
    /// 1 to 500, default 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
}
