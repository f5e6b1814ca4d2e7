//! JSON bodies of the orchestrator's HTTP API (`/v1/...`), shared by the orchestrator and the
//! Rust client. Times are RFC 3339 UTC strings; ids are UUID strings.

use crate::ids::{StepId, TaskId};
use crate::state::{StepState, TaskState};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `POST /v1/tasks`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitTask {
    pub namespace: String,
    pub template: String,
    /// The newest registered version when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    #[serde(default = "empty_object")]
    pub context: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Higher runs first among queued steps. Default 0.
    #[serde(default)]
    pub priority: i16,
    /// A client-chosen task id (UUIDv7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<TaskId>,
    /// Delayed start: an RFC 3339 time; the task is created `pending` and starts then (a past
    /// time starts it at once). Not with `delay`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_at: Option<String>,
    /// Delayed start: a duration from now (`"10m"`, or milliseconds). Not with `run_at`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<crate::Millis>,
    /// Cancel the task (`deadline exceeded`) if it is still live this long after it started;
    /// overrides the template's `deadline`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<crate::Millis>,
}

/// Body of `POST /v1/tasks/{id}/signals/{name}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendSignal {
    /// Chosen by the sender: a repeat with the same id is a no-op returning the first answer.
    pub signal_id: String,
    #[serde(default)]
    pub payload: Value,
}

/// Answer to a signal: 201 when recorded, 200 for a repeat of the same `signal_id` (the first
/// signal's fields).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SignalResponse {
    pub task_id: TaskId,
    pub name: String,
    pub signal_id: String,
    /// False for a repeat.
    pub created: bool,
    /// RFC 3339 UTC: when the first copy was received.
    pub received_at: String,
    /// The step that took it, once one has (`null` while it is kept for a later step).
    pub consumed_by: Option<String>,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

/// Answer to `POST /v1/tasks`: 201 when created, 200 when an idempotent repeat.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubmitResponse {
    pub task_id: TaskId,
    /// False when the idempotency key matched an existing task with the same body.
    pub created: bool,
}

/// Every error answer: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `template_not_found`, `idempotency_conflict`.
    pub code: String,
    pub message: String,
    /// For `idempotency_conflict`: the task that holds the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<TaskId>,
}

/// Answer to `POST /v1/templates`: 201 when registered, 200 when the same content existed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RegisterResponse {
    pub namespace: String,
    pub name: String,
    pub version: u32,
    pub created: bool,
}

/// A registered template version (`GET /v1/templates`, `GET /v1/templates/{ns}/{name}?version=`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TemplateView {
    pub namespace: String,
    pub name: String,
    pub version: u32,
    pub description: Option<String>,
    pub steps: usize,
    pub created_at: String,
    /// The full template; present when one version is shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<crate::Template>,
}

/// A live worker (`GET /v1/workers`), as its latest `worker_heartbeat` described it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerView {
    pub worker_id: crate::WorkerId,
    /// Its name, as in results (`worker`).
    pub name: String,
    pub host: String,
    pub sdk: String,
    pub sdk_version: String,
    pub queues: Vec<String>,
    pub handlers: Vec<String>,
    pub concurrency: u32,
    pub in_flight: u32,
    /// How often it announces itself; it is gone after 3 intervals without a word.
    pub interval_ms: u64,
    /// RFC 3339 UTC: its first and latest heartbeat.
    pub first_seen: String,
    pub last_seen: String,
}

/// `GET /v1/workers`: the live workers, newest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerList {
    pub workers: Vec<WorkerView>,
}

/// A task with its steps (`GET /v1/tasks/{id}`); lists have [`TaskSummary`] instead.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    pub id: TaskId,
    pub namespace: String,
    pub template: String,
    pub template_version: u32,
    pub state: TaskState,
    pub priority: i16,
    pub context: Value,
    pub output: Option<Value>,
    pub error: Option<String>,
    pub idempotency_key: Option<String>,
    pub created_at: String,
    pub finished_at: Option<String>,
    #[serde(default)]
    pub steps: Vec<StepView>,
    /// The task's history (finish, cancel, retry), oldest first.
    #[serde(default)]
    pub events: Vec<TaskEventView>,
    /// A child workflow's task: the task and step it runs for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentView>,
    /// A delayed task (`run_at`, `delay`): when it starts (RFC 3339 UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_at: Option<String>,
    /// A task with a deadline: when it is cancelled if still live (RFC 3339 UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_at: Option<String>,
    /// When the task's context and outputs were erased (`tasker purge`); absent if never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purged_at: Option<String>,
}

/// The step a child workflow's task runs for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentView {
    pub task_id: TaskId,
    pub step: String,
}

/// One entry of a task's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskEventView {
    pub seq: u64,
    /// `completed`, `failed`, `cancelled`, `cancel_requested`, `retried`.
    pub kind: String,
    pub detail: Option<Value>,
    pub at: String,
}

impl TaskView {
    /// True once the task can change no more (until an operator retries it).
    pub fn is_finished(&self) -> bool {
        self.state.is_finished()
    }
}

/// One step of a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepView {
    pub id: StepId,
    pub name: String,
    pub handler: String,
    pub queue: String,
    pub state: StepState,
    /// The newest attempt number (0 before the first dispatch).
    pub attempt: u32,
    /// Attempts that counted against `max_attempts`.
    pub failures: u32,
    pub max_attempts: u32,
    pub depends_on: Vec<String>,
    pub output: Option<Value>,
    pub error: Option<String>,
    /// Why a non-terminal step is not running, in words.
    pub waiting_reason: Option<String>,
    pub next_attempt_at: Option<String>,
    pub lease_expires_at: Option<String>,
    #[serde(default)]
    pub attempts: Vec<AttemptView>,
    /// A skipped step: why ("not chosen by route", "parent express was skipped", "its task
    /// failed").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_reason: Option<String>,
    /// A mapped step: its instances, counted by state (list them with
    /// `GET /v1/tasks/{id}/steps/{step}/instances`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map: Option<MapView>,
    /// A child-workflow step: its child task (the newest, when it was retried).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child_task_id: Option<TaskId>,
}

/// A mapped step's instances, counted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapView {
    /// Elements of the mapped array (`None` until the parent succeeded).
    pub total: Option<u32>,
    pub succeeded: u32,
    /// Dispatched or retrying.
    pub running: u32,
    pub failed: u32,
    /// Not started yet: queued, waiting to be let in, or not yet created.
    pub waiting: u32,
    /// Skipped or cancelled (their task halted).
    pub halted: u32,
}

/// One instance of a mapped step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceView {
    pub index: u32,
    pub state: StepState,
    pub attempt: u32,
    pub output: Option<Value>,
    pub error: Option<String>,
}

/// `GET /v1/tasks/{id}/steps/{step}/instances` answer: a page in index order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceList {
    pub instances: Vec<InstanceView>,
    /// More instances follow: ask again with `after` = the last index.
    pub more: bool,
}

/// One attempt of a step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttemptView {
    pub attempt: u32,
    /// How the attempt ended (an [`crate::AttemptOutcome`]: `succeeded`, `failed`, `timed_out`,
    /// `handler_missing`, `cancelled`, `dead_lettered`), or, for the attempt in flight,
    /// `dispatched` (published, not reported started) or `started` (a worker reported it).
    pub outcome: String,
    pub dispatched_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub worker: Option<String>,
    pub error: Option<String>,
    /// How many offers this row stands for: more than 1 for a streak of `handler_missing`
    /// re-offers (attempt numbers `attempt` … `attempt + repeats - 1`, recorded once).
    #[serde(default = "one")]
    pub repeats: u32,
}

fn one() -> u32 {
    1
}

/// A task in a list (`GET /v1/tasks`): what it is and how it stands, without its `context`,
/// `output`, steps and history (`GET /v1/tasks/{id}` has them).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskSummary {
    pub id: TaskId,
    pub namespace: String,
    pub template: String,
    pub template_version: u32,
    pub state: TaskState,
    pub priority: i16,
    /// Why the task fails or was cancelled (as in [`TaskView::error`]).
    pub error: Option<String>,
    pub idempotency_key: Option<String>,
    pub created_at: String,
    pub finished_at: Option<String>,
    /// A child workflow's task: the task it runs for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_task_id: Option<TaskId>,
}

impl TaskSummary {
    /// True once the task can change no more (until an operator retries it).
    pub fn is_finished(&self) -> bool {
        self.state.is_finished()
    }
}

/// Most tasks in one page of `GET /v1/tasks` (`limit`).
pub const MAX_TASK_PAGE: u32 = 500;

/// `GET /v1/tasks` answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskList {
    pub tasks: Vec<TaskSummary>,
    /// Pass as `after` to get the next page; `null` on the last page.
    pub next: Option<TaskId>,
}

/// What a schedule does with the ticks it missed while no replica ran it (more than
/// [`SCHEDULE_LATE_AFTER_MS`] late): `skip` none of them, `latest` the newest one only, `all`
/// every one of them, at most [`MAX_CATCH_UP_TICKS`] (the newest; older ones are skipped).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    #[default]
    Skip,
    Latest,
    All,
}

impl CatchUp {
    pub fn as_str(self) -> &'static str {
        match self {
            CatchUp::Skip => "skip",
            CatchUp::Latest => "latest",
            CatchUp::All => "all",
        }
    }
}

impl std::fmt::Display for CatchUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for CatchUp {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "skip" => Ok(CatchUp::Skip),
            "latest" => Ok(CatchUp::Latest),
            "all" => Ok(CatchUp::All),
            other => Err(format!(
                "unknown catch-up policy {other:?}: expected skip, latest or all"
            )),
        }
    }
}

/// A tick later than this (ms) when its schedule is run counts as missed: the catch-up policy
/// decides whether it fires. A tick less late always fires.
pub const SCHEDULE_LATE_AFTER_MS: i64 = 10_000;

/// Most missed ticks one catch-up fires (policy `all`).
pub const MAX_CATCH_UP_TICKS: usize = 100;

/// Longest cron expression (bytes).
pub const MAX_CRON_LEN: usize = 128;

/// Longest time zone name (bytes).
pub const MAX_TIMEZONE_LEN: usize = 64;

/// Most schedules in one `GET /v1/schedules` answer (`limit`).
pub const MAX_SCHEDULE_PAGE: u32 = 500;

/// `POST /v1/schedules`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSchedule {
    pub namespace: String,
    /// The template each tick submits a task of (its newest version at the tick).
    pub template: String,
    /// Unique within the namespace; the template's name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// 5 fields (`minute hour day-of-month month day-of-week`) or 6 with seconds first.
    pub cron: String,
    /// An IANA time zone (`Europe/Paris`); `UTC` when absent.
    #[serde(default = "utc")]
    pub timezone: String,
    /// The context of every task it creates.
    #[serde(default = "empty_object")]
    pub context: Value,
    #[serde(default)]
    pub catch_up: CatchUp,
}

fn utc() -> String {
    "UTC".to_owned()
}

/// A schedule (`GET /v1/schedules/{id}` and the answers of create, pause, resume, delete).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleView {
    pub id: uuid::Uuid,
    pub namespace: String,
    pub name: String,
    pub template: String,
    pub cron: String,
    pub timezone: String,
    pub context: Value,
    pub catch_up: CatchUp,
    pub paused: bool,
    /// When the next task is due (RFC 3339); `null` while paused or when the expression has
    /// no future time.
    pub next_tick: Option<String>,
    /// The newest tick that fired.
    pub last_tick: Option<String>,
    /// Why the last tick could not create its task (e.g. its template is gone); cleared by a
    /// tick that did.
    pub last_error: Option<String>,
    pub created_at: String,
    /// The next five ticks (RFC 3339, with their local time in `timezone`), only in
    /// `GET /v1/schedules/{id}`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub next_runs: Vec<ScheduleRun>,
}

/// One future tick of a schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleRun {
    /// RFC 3339 UTC.
    pub at: String,
    /// The same instant in the schedule's time zone (RFC 3339 with offset).
    pub local: String,
}

/// `GET /v1/schedules` answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleList {
    pub schedules: Vec<ScheduleView>,
}

/// `POST /v1/keys`: a new API key. `namespaces` lists the namespaces it may act in, or is
/// `["*"]` for every namespace; `role` is `read`, `submit`, `operate` or `admin`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    #[serde(default)]
    pub name: String,
    pub role: String,
    pub namespaces: Vec<String>,
}

/// An API key as listed (never the key itself).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyView {
    pub id: uuid::Uuid,
    pub name: String,
    pub role: String,
    /// `["*"]` = every namespace.
    pub namespaces: Vec<String>,
    pub created_at: String,
    pub created_by: String,
    pub revoked_at: Option<String>,
    pub revoked_by: Option<String>,
}

/// The answer to `POST /v1/keys`: the key (`token`) is shown here once and never again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedKey {
    pub key: KeyView,
    pub token: String,
}

/// `GET /v1/keys`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyList {
    pub keys: Vec<KeyView>,
}

/// One entry of the audit log: who (`actor`, `key_id`) did which `action` when, on what.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: String,
    pub actor: String,
    pub key_id: Option<uuid::Uuid>,
    /// `task.cancel`, `task.retry`, `task.purge`, `template.register`, `key.create`,
    /// `key.revoke`, `namespace.retention`, and the console's actions.
    pub action: String,
    pub namespace: Option<String>,
    pub task_id: Option<TaskId>,
    pub detail: Value,
}

/// `GET /v1/audit`: newest first; `next_before` pages on (`?before=`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditList {
    pub entries: Vec<AuditEntry>,
    pub next_before: Option<i64>,
}

/// A namespace's settings (`GET /v1/namespaces`, `PUT /v1/namespaces/{namespace}`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceView {
    pub namespace: String,
    /// Finished tasks of this namespace are kept this long (ms); `null` = the global retention.
    pub retention_ms: Option<u64>,
    pub updated_at: String,
}

/// `PUT /v1/namespaces/{namespace}`: `retention_ms` null clears the override.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetNamespace {
    pub retention_ms: Option<u64>,
}

/// `GET /v1/namespaces`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceList {
    pub namespaces: Vec<NamespaceView>,
}

/// A task request over AMQP asks for what a `POST /v1/tasks` body asks for (its `request_id`
/// aside).
impl From<crate::TaskRequest> for SubmitTask {
    fn from(req: crate::TaskRequest) -> Self {
        SubmitTask {
            namespace: req.namespace,
            template: req.template,
            version: req.version,
            context: req.context,
            idempotency_key: req.idempotency_key,
            priority: req.priority,
            task_id: req.task_id,
            run_at: req.run_at,
            delay: req.delay_ms.map(crate::Millis),
            deadline: req.deadline_ms.map(crate::Millis),
        }
    }
}
