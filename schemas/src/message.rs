//! Wire messages: MessagePack maps with named fields, each wrapped in an [`Envelope`].
//!
//! Decoding is two-phase: the envelope header (`kind`, `schema_version`, `message_id`) is read
//! first, an unknown major version or a wrong kind is rejected with a typed error, and only then is
//! the payload decoded. Unknown fields are ignored everywhere so minor versions can add fields.

use crate::ids::{MessageId, RequestId, StepId, TaskId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The schema major version this crate reads and writes.
pub const SCHEMA_MAJOR: u32 = 1;
/// The schema minor version this crate writes.
pub const SCHEMA_MINOR: u32 = 1;
/// `"major.minor"` as written in every envelope.
pub const SCHEMA_VERSION: &str = "1.1";

/// AMQP header naming why a message was dead-lettered.
pub const HEADER_DEAD_LETTER_REASON: &str = "x-tasker-reason";
/// AMQP header of a dead letter the orchestrator forwards: the original message's `user_id`
/// (the broker refuses a publish whose `user_id` is not the publisher's own user).
pub const HEADER_ORIGINAL_USER_ID: &str = "x-tasker-user-id";
/// AMQP header with the time the orchestrator published a message (Unix milliseconds): a
/// worker refuses a cancelled task's steps published before its cancel, and runs those
/// published after it (a retry of the task).
pub const HEADER_PUBLISHED_MS: &str = "x-tasker-published-ms";
/// AMQP header carrying the W3C trace context.
pub const HEADER_TRACEPARENT: &str = "traceparent";
/// AMQP `content_type` of every message.
pub const CONTENT_TYPE: &str = "application/msgpack";

/// The kind of a message. Kinds are strings on the wire so other languages can switch on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Kind {
    TaskRequest,
    Step,
    Result,
    ResultBatch,
    Started,
    Heartbeat,
    Cancel,
    LifecycleEvent,
    WorkerHeartbeat,
    Signal,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::TaskRequest => "task_request",
            Kind::Step => "step",
            Kind::Result => "result",
            Kind::ResultBatch => "result_batch",
            Kind::Started => "started",
            Kind::Heartbeat => "heartbeat",
            Kind::Cancel => "cancel",
            Kind::LifecycleEvent => "lifecycle_event",
            Kind::WorkerHeartbeat => "worker_heartbeat",
            Kind::Signal => "signal",
        }
    }
}

/// A payload type and the kind it travels under.
pub trait Payload: Serialize + DeserializeOwned {
    const KIND: Kind;
}

/// Every message on the wire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub kind: Kind,
    /// `"major.minor"`.
    pub schema_version: String,
    pub message_id: MessageId,
    pub payload: T,
}

impl<T: Payload> Envelope<T> {
    pub fn new(payload: T) -> Self {
        Self {
            kind: T::KIND,
            schema_version: SCHEMA_VERSION.to_owned(),
            message_id: MessageId::new(),
            payload,
        }
    }
}

#[derive(Deserialize)]
struct Header {
    kind: String,
    schema_version: String,
}

/// Why bytes could not be decoded into a message. Never a panic.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    #[error("not a MessagePack envelope: {0}")]
    Malformed(String),
    #[error("invalid schema_version {0:?}: expected \"major.minor\"")]
    InvalidVersion(String),
    #[error("unsupported schema major version {major} (this reader supports {SCHEMA_MAJOR})")]
    UnknownMajor { major: u32 },
    #[error("unexpected message kind {found:?}, expected {expected}")]
    WrongKind { found: String, expected: String },
    #[error("invalid {kind} payload: {error}")]
    InvalidPayload { kind: String, error: String },
}

/// Why a message could not be encoded.
#[derive(Clone, Debug, thiserror::Error)]
#[error("cannot encode message: {0}")]
pub struct EncodeError(String);

/// Encodes a message as MessagePack with named fields.
pub fn encode<T: Serialize>(msg: &Envelope<T>) -> Result<Vec<u8>, EncodeError> {
    rmp_serde::to_vec_named(msg).map_err(|e| EncodeError(e.to_string()))
}

/// Wraps a payload in a fresh envelope and encodes it.
pub fn encode_payload<T: Payload>(payload: T) -> Result<Vec<u8>, EncodeError> {
    encode(&Envelope::new(payload))
}

/// Reads and checks the envelope header: the kind as written and whether the version is readable.
pub fn peek_kind(bytes: &[u8]) -> Result<String, DecodeError> {
    // fixmap, map 16, map 32. rmp-serde would also read a struct from an array by position.
    if !matches!(bytes.first(), Some(0x80..=0x8f | 0xde | 0xdf)) {
        return Err(DecodeError::Malformed(
            "the envelope must be a MessagePack map".into(),
        ));
    }
    let header: Header = from_slice(bytes).map_err(DecodeError::Malformed)?;
    let major = parse_major(&header.schema_version)?;
    if major != SCHEMA_MAJOR {
        return Err(DecodeError::UnknownMajor { major });
    }
    Ok(header.kind)
}

fn parse_major(v: &str) -> Result<u32, DecodeError> {
    let invalid = || DecodeError::InvalidVersion(v.to_owned());
    // Plain ASCII digits only: `u32::from_str` alone would also take "+1".
    let number = |s: &str| -> Result<u32, DecodeError> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid());
        }
        s.parse::<u32>().map_err(|_| invalid())
    };
    let (major, minor) = v.split_once('.').ok_or_else(invalid)?;
    number(minor)?;
    number(major)
}

/// Largest message a worker may send to the results exchange (bytes): a `result_batch` of many
/// outputs fits; anything larger is dead-lettered before it is decoded.
pub const MAX_WORKER_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Refuses bytes over `limit` before they are decoded, with the size and the limit in the
/// reason.
pub fn check_size(what: &str, bytes: &[u8], limit: usize) -> Result<(), String> {
    if bytes.len() > limit {
        return Err(format!(
            "{what} is {} bytes, over the limit of {limit} bytes",
            bytes.len()
        ));
    }
    Ok(())
}

/// Deepest nesting of MessagePack maps and arrays a message may have: task data may nest
/// [`crate::data::MAX_DEPTH`] levels, and the envelope around it adds a few more.
pub const MAX_MESSAGE_DEPTH: usize = crate::data::MAX_DEPTH + 8;

/// Reads exactly one MessagePack value: nesting is capped at [`MAX_MESSAGE_DEPTH`] (a deeply
/// nested message must be an error, not a stack overflow), and trailing bytes are an error.
fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let mut de = rmp_serde::Deserializer::new(std::io::Cursor::new(bytes));
    // rmp-serde fails when its counter reaches zero, so it allows one level less than it is given.
    de.set_max_depth(MAX_MESSAGE_DEPTH + 1);
    let value = T::deserialize(&mut de).map_err(|e| e.to_string())?;
    let used = de.position();
    if used != bytes.len() as u64 {
        return Err(format!(
            "{} trailing bytes after the message",
            bytes.len() as u64 - used
        ));
    }
    Ok(value)
}

/// Refuses a message with a map key that is not a string. Every map of the contract is keyed
/// by field names or JSON object keys; serde would otherwise read an integer key as a field's
/// position. One pass over the bytes, no allocation but the stack of open containers (nesting
/// is bounded by the decoder that runs next; a truncated message is left to it too).
fn string_keys_only(bytes: &[u8]) -> Result<(), String> {
    /// An open array or map: items left, and for a map whether the next item is a key.
    struct Open {
        left: u64,
        map: bool,
        key_next: bool,
    }
    let mut stack: Vec<Open> = Vec::new();
    let mut pos = 0usize;
    let take = |pos: &mut usize, n: usize| -> Option<u64> {
        let b = bytes.get(*pos..pos.checked_add(n)?)?;
        *pos += n;
        Some(b.iter().fold(0u64, |acc, x| (acc << 8) | u64::from(*x)))
    };
    loop {
        // Close finished containers; the message is done when nothing is open.
        while stack.last().is_some_and(|o| o.left == 0) {
            stack.pop();
        }
        let expecting_key = match stack.last_mut() {
            Some(o) => {
                let key = o.map && o.key_next;
                if o.map {
                    o.key_next = !o.key_next;
                }
                o.left -= 1;
                key
            }
            None if pos > 0 => return Ok(()),
            None => false,
        };
        let Some(&marker) = bytes.get(pos) else {
            return Ok(()); // truncated: the decoder says so
        };
        pos += 1;
        let is_str = matches!(marker, 0xa0..=0xbf | 0xd9..=0xdb);
        if expecting_key && !is_str {
            return Err(format!(
                "a map key is not a string (MessagePack marker 0x{marker:02x}): maps are keyed by field names"
            ));
        }
        // (payload bytes to skip, children: Some((count, is_map)))
        let (skip, children): (Option<u64>, Option<(u64, bool)>) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (Some(0), None),
            0x80..=0x8f => (Some(0), Some((u64::from(marker & 0x0f), true))),
            0x90..=0x9f => (Some(0), Some((u64::from(marker & 0x0f), false))),
            0xa0..=0xbf => (Some(u64::from(marker & 0x1f)), None),
            0xc4 | 0xd9 => (take(&mut pos, 1), None),
            0xc5 | 0xda => (take(&mut pos, 2), None),
            0xc6 | 0xdb => (take(&mut pos, 4), None),
            0xc7 => (take(&mut pos, 1).map(|n| n + 1), None),
            0xc8 => (take(&mut pos, 2).map(|n| n + 1), None),
            0xc9 => (take(&mut pos, 4).map(|n| n + 1), None),
            0xca | 0xce | 0xd2 => (Some(4), None),
            0xcb | 0xcf | 0xd3 => (Some(8), None),
            0xcc | 0xd0 => (Some(1), None),
            0xcd | 0xd1 => (Some(2), None),
            0xd4 => (Some(2), None),
            0xd5 => (Some(3), None),
            0xd6 => (Some(5), None),
            0xd7 => (Some(9), None),
            0xd8 => (Some(17), None),
            0xdc => (Some(0), take(&mut pos, 2).map(|n| (n, false))),
            0xdd => (Some(0), take(&mut pos, 4).map(|n| (n, false))),
            0xde => (Some(0), take(&mut pos, 2).map(|n| (n, true))),
            0xdf => (Some(0), take(&mut pos, 4).map(|n| (n, true))),
            0xc1 => return Ok(()), // never used: the decoder refuses it
        };
        let Some(skip) = skip else {
            return Ok(()); // truncated
        };
        pos = match usize::try_from(skip).ok().and_then(|s| pos.checked_add(s)) {
            Some(p) if p <= bytes.len() => p,
            _ => return Ok(()), // truncated
        };
        match children {
            Some((n, map)) => {
                if stack.len() > MAX_MESSAGE_DEPTH {
                    return Ok(()); // too deep: the decoder says so
                }
                let left = if map { n.saturating_mul(2) } else { n };
                stack.push(Open {
                    left,
                    map,
                    key_next: true,
                });
            }
            None if (0xdc..=0xdf).contains(&marker) => return Ok(()), // truncated length
            None => {}
        }
    }
}

/// Decodes a message of one expected kind.
pub fn decode<T: Payload>(bytes: &[u8]) -> Result<Envelope<T>, DecodeError> {
    let kind = peek_kind(bytes)?;
    if kind != T::KIND.as_str() {
        return Err(DecodeError::WrongKind {
            found: kind,
            expected: T::KIND.as_str().to_owned(),
        });
    }
    string_keys_only(bytes)
        .and_then(|()| from_slice(bytes))
        .map_err(|error| DecodeError::InvalidPayload { kind, error })
}

/// A request to start a task, sent over AMQP to the task-request exchange.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskRequest {
    /// Chosen by the client; a redelivered request with the same id never creates a second task.
    pub request_id: RequestId,
    pub namespace: String,
    pub template: String,
    /// The newest registered version when absent.
    #[serde(default)]
    pub version: Option<u32>,
    #[serde(default = "empty_object")]
    pub context: Value,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub priority: i16,
    /// A client-chosen task id (UUIDv7).
    #[serde(default)]
    pub task_id: Option<TaskId>,
    /// Delayed start at an RFC 3339 time (not with `delay_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_at: Option<String>,
    /// Delayed start this many milliseconds from now (not with `run_at`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<u64>,
    /// Cancel the task if still live this many milliseconds after it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

impl Payload for TaskRequest {
    const KIND: Kind = Kind::TaskRequest;
}

/// A signal to a task, sent over AMQP to the task-request exchange (routing key: the task's
/// namespace), handled like `POST /v1/tasks/{id}/signals/{name}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Signal {
    pub task_id: TaskId,
    /// The signal's name (what a `wait_for` step waits for).
    pub name: String,
    /// Chosen by the sender: unique per (task, name); a repeat is a no-op.
    pub signal_id: String,
    #[serde(default)]
    pub payload: Value,
}

impl Payload for Signal {
    const KIND: Kind = Kind::Signal;
}

/// One attempt of one step, published to the steps exchange with the step's queue as routing key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepMessage {
    pub task_id: TaskId,
    pub step_id: StepId,
    pub namespace: String,
    pub template: String,
    pub step: String,
    pub handler: String,
    pub queue: String,
    /// Starts at 1 and only grows.
    pub attempt: u32,
    /// Stable across attempts: `"{task_id}:{step}"`, and `"{task_id}:{step}:{map_index}"` for an
    /// instance of a mapped step. Use it for the handler's own side effects.
    pub idempotency_key: String,
    pub context: Value,
    /// Outputs of the step's parents, by step name.
    #[serde(default)]
    pub parent_outputs: Map<String, Value>,
    /// How long the handler may run, counted from when the worker takes the step.
    pub timeout_ms: u64,
    /// Routing key for the result on the results exchange.
    pub result_routing_key: String,
    /// Since 1.1: for an instance of a mapped step, its position in the mapped array (from 0);
    /// absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_index: Option<u32>,
    /// Since 1.1: for an instance of a mapped step, its element of the mapped array (absent
    /// otherwise; a JSON `null` element is sent as nil).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_item: Option<Value>,
    /// Since 1.1: for the `on_failure` step of a failed task, the step that failed and its
    /// error; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
}

/// What failed a task, as its `on_failure` step is told.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The name of the step that failed the task.
    pub step: String,
    /// That step's error.
    pub error: String,
}

impl Payload for StepMessage {
    const KIND: Kind = Kind::Step;
}

/// What an attempt came to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    Succeeded {
        #[serde(default)]
        output: Value,
        /// Since 1.1: the branches a decision step chose (step names from its `decides`; empty
        /// chooses none). Required from a decision step, refused from any other step.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        branches: Option<Vec<String>>,
    },
    Failed {
        message: String,
        /// False: fail the step now whatever attempts are left.
        retryable: bool,
        /// Overrides the template's backoff for the next attempt.
        #[serde(default)]
        retry_after_ms: Option<u64>,
    },
    /// The worker has no handler of that name. The step is rescheduled without spending an attempt.
    HandlerMissing { handler: String },
}

/// The result of one attempt, sent by a worker to the results exchange.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    pub task_id: TaskId,
    pub step_id: StepId,
    pub attempt: u32,
    /// Which worker ran it (free text: host, pid, name).
    pub worker: String,
    /// Time the handler ran, for information only (the orchestrator's clock is the truth).
    #[serde(default)]
    pub duration_ms: u64,
    pub outcome: Outcome,
    /// Since 1.1, in a `result_batch` entry: the W3C `traceparent` of the step message this
    /// result answers (a batch mixes several attempts, so one AMQP header cannot carry them).
    /// Left out when absent; a single `result` carries it in the AMQP header instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl Outcome {
    /// A success with this output (not a decision).
    pub fn succeeded(output: Value) -> Self {
        Outcome::Succeeded {
            output,
            branches: None,
        }
    }
}

impl Payload for StepResult {
    const KIND: Kind = Kind::Result;
}

/// Several results in one message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultBatch {
    pub results: Vec<StepResult>,
}

impl Payload for ResultBatch {
    const KIND: Kind = Kind::ResultBatch;
}

/// A worker took a long step and acked its message; the orchestrator keeps a lease instead.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Started {
    pub task_id: TaskId,
    pub step_id: StepId,
    pub attempt: u32,
    pub worker: String,
    /// Requested lease length.
    pub lease_ms: u64,
}

impl Payload for Started {
    const KIND: Kind = Kind::Started;
}

/// Extends the lease of a started attempt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub task_id: TaskId,
    pub step_id: StepId,
    pub attempt: u32,
    pub worker: String,
    pub lease_ms: u64,
}

impl Payload for Heartbeat {
    const KIND: Kind = Kind::Heartbeat;
}

/// Tells workers a task was cancelled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cancel {
    pub task_id: TaskId,
    #[serde(default)]
    pub reason: Option<String>,
}

impl Payload for Cancel {
    const KIND: Kind = Kind::Cancel;
}

/// Published on the events exchange (topic `"{namespace}.task.{state}"`) when a task changes state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LifecycleEvent {
    pub task_id: TaskId,
    pub namespace: String,
    pub template: String,
    /// Per-task sequence number, starting at 1.
    pub seq: u64,
    /// `running` (a task was created, seq 0), or the task's final state: `completed`, `failed`
    /// or `cancelled`.
    pub state: String,
    /// RFC 3339 UTC with microseconds, from the database clock.
    pub at: String,
    #[serde(default)]
    pub output: Option<Value>,
    #[serde(default)]
    pub error: Option<String>,
}

impl Payload for LifecycleEvent {
    const KIND: Kind = Kind::LifecycleEvent;
}

/// A worker announcing itself to the registry: when it starts, every `interval_ms` while it
/// runs, and with `stopping: true` when it shuts down gracefully. Sent to the results exchange
/// with routing key [`crate::topology::WORKER_HEARTBEAT_ROUTING_KEY`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerHeartbeat {
    /// Chosen by the worker at start (a UUID); the same for every heartbeat of that process.
    pub worker_id: crate::ids::WorkerId,
    /// The worker's name (as in `result.worker`; at most 256 bytes).
    pub worker: String,
    /// Host name (at most 256 bytes).
    #[serde(default)]
    pub host: String,
    /// Which SDK: `"rust"`, `"python"`, or another name (at most 64 bytes).
    #[serde(default)]
    pub sdk: String,
    #[serde(default)]
    pub sdk_version: String,
    /// The step queues it consumes (template queue names, not AMQP queue names).
    #[serde(default)]
    pub queues: Vec<String>,
    /// The handlers it runs.
    #[serde(default)]
    pub handlers: Vec<String>,
    /// Steps it runs at once.
    #[serde(default)]
    pub concurrency: u32,
    /// Steps running now.
    #[serde(default)]
    pub in_flight: u32,
    /// How often it announces itself: it counts as gone after 3 intervals without a word.
    pub interval_ms: u64,
    /// A graceful shutdown: forget the worker now.
    #[serde(default)]
    pub stopping: bool,
}

impl Payload for WorkerHeartbeat {
    const KIND: Kind = Kind::WorkerHeartbeat;
}

/// Anything a worker sends to the results exchange.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum WorkerMessage {
    Results(Vec<StepResult>),
    Started(Started),
    Heartbeat(Heartbeat),
    WorkerHeartbeat(WorkerHeartbeat),
}

impl WorkerMessage {
    /// Decodes any message a worker may send on the results exchange.
    pub fn decode(bytes: &[u8]) -> Result<(MessageId, Self), DecodeError> {
        let kind = peek_kind(bytes)?;
        let bad = |error: String| DecodeError::InvalidPayload {
            kind: kind.clone(),
            error,
        };
        string_keys_only(bytes).map_err(bad)?;
        match kind.as_str() {
            "result" => {
                let e: Envelope<StepResult> = from_slice(bytes).map_err(bad)?;
                Ok((e.message_id, WorkerMessage::Results(vec![e.payload])))
            }
            "result_batch" => {
                let e: Envelope<ResultBatch> = from_slice(bytes).map_err(bad)?;
                Ok((e.message_id, WorkerMessage::Results(e.payload.results)))
            }
            "started" => {
                let e: Envelope<Started> = from_slice(bytes).map_err(bad)?;
                Ok((e.message_id, WorkerMessage::Started(e.payload)))
            }
            "heartbeat" => {
                let e: Envelope<Heartbeat> = from_slice(bytes).map_err(bad)?;
                Ok((e.message_id, WorkerMessage::Heartbeat(e.payload)))
            }
            "worker_heartbeat" => {
                let e: Envelope<WorkerHeartbeat> = from_slice(bytes).map_err(bad)?;
                Ok((e.message_id, WorkerMessage::WorkerHeartbeat(e.payload)))
            }
            _ => Err(DecodeError::WrongKind {
                found: kind.clone(),
                expected: "result, result_batch, started, heartbeat or worker_heartbeat".into(),
            }),
        }
    }
}

#[cfg(test)]
mod key_tests {
    use super::*;

    #[test]
    fn maps_must_be_keyed_by_strings_at_any_depth() {
        // {"a": [1, nil, -3], "b": {"c": bin [1, 2]}}
        let ok = [
            0x82, 0xa1, b'a', 0x93, 0x01, 0xc0, 0xfd, 0xa1, b'b', 0x81, 0xa1, b'c', 0xc4, 0x02,
            0x01, 0x02,
        ];
        assert_eq!(string_keys_only(&ok), Ok(()));
        // {0: "x"}
        let e = string_keys_only(&[0x81, 0x00, 0xa1, b'x']).expect_err("an integer key");
        assert!(e.contains("not a string"), "{e}");
        // {"a": [{true: nil}]}
        assert!(string_keys_only(&[0x81, 0xa1, b'a', 0x91, 0x81, 0xc3, 0xc0]).is_err());
        // Values may be anything; only keys are checked: {"k": 1.5, "e": fixext1}
        let mut values = vec![0x82, 0xa1, b'k', 0xcb];
        values.extend(1.5f64.to_be_bytes());
        values.extend([0xa1, b'e', 0xd4, 0x03, 0x09]);
        assert_eq!(string_keys_only(&values), Ok(()));
        // A real message passes.
        let bytes = encode(&Envelope::new(Cancel {
            task_id: TaskId::new(),
            reason: None,
        }))
        .expect("encode");
        assert_eq!(string_keys_only(&bytes), Ok(()));
        // Truncated or empty input is left to the decoder.
        assert_eq!(string_keys_only(&[0xde, 0x00]), Ok(()));
        assert_eq!(string_keys_only(&[]), Ok(()));
    }
}
