//! `bad-inputs`: the bad-input suite. It starts a real orchestrator (`tasker serve`, a child
//! process on a database and queue prefix of its own) and an in-process worker, submits a few
//! normal tasks, then sends bad inputs to every edge of the orchestrator:
//!
//! - **generated cases** (proptest strategies sampled with a `TestRunner` from a fixed seed):
//!   arbitrary and mutated bytes and structurally wrong MessagePack (wrong types, missing fields,
//!   huge and negative numbers, bad UUIDs, oversize strings, wrong schema versions and kinds,
//!   bin/ext values, non-string keys, deep nesting, truncated, bit-flipped and padded valid
//!   messages) to the three AMQP consumers (results: `result`, `result_batch`, `started`,
//!   `heartbeat`; task requests; dead steps), and mutated JSON bodies, query strings, paths,
//!   methods and content types to every HTTP route (templates are mutated valid templates);
//! - **hand-written cases** for every HTTP route (404, 405, bad queries, malformed, oversize and
//!   out-of-range bodies, bad UUIDs, unknown fields, conflicts, invalid states) and every AMQP
//!   consumer.
//!
//! A case is a **clear error** when the answer is a documented error code (HTTP: a 4xx status
//! with a JSON body `{"error": {"code", "message"}}` whose code and status are listed in
//! `schemas/CONTRACT.md` §11, read from that file at build time) or a dead letter with a
//! non-empty `x-tasker-reason` (AMQP, correlated by the AMQP `message_id` each case carries),
//! with no database text in the answer, and the orchestrator keeps serving. A **hang** is a case
//! without an answer (HTTP: within `--timeout-ms`; AMQP: no dead letter while others stop
//! arriving for that long); a **crash** is the orchestrator process exiting, `/health` not
//! answering, or a panic in its log. Generated inputs that turn out valid (a 2xx answer, a
//! message that decodes and would be applied: a stale result, a readable dead step) are sent
//! but excluded from the counts (reported on stderr).
//!
//! Normal tasks are submitted before the suite and during it (over HTTP and AMQP), plus those
//! that generated submits created; after the suite a normal workflow runs through the same
//! orchestrator, and every one of those tasks must complete (`lost` counts those that did not).
//!
//! It prints one JSON line on stdout: `{"config": "bad-inputs", "bad_inputs": N, "generated":
//! G, "hand_written": H, "clear_errors": C, "crashes": 0, "hangs": 0, "lost": 0,
//! "cases_by_edge": {"http:/v1/tasks": n, …}}` with `N = G + H`, and exits non-zero when a case
//! was not a clear error, something crashed, hung or was lost, `G` < 1,000, `H` < 100 or an edge
//! has fewer than 10 cases. Each case that was not a clear error is printed on stderr.
//!
//! ```text
//! . .tasker/env   # TASKER_TEST_DATABASE_URL (admin URL) and TASKER_TEST_AMQP_URL
//! cargo build -p tasker-orchestrator -p tasker-tests --bins
//! target/debug/bad-inputs                 # what CI runs (well under two minutes)
//! target/debug/bad-inputs --scale 5       # five times the generated cases
//! target/debug/bad-inputs --seed 7        # another sample of the generated cases
//! ```

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::strategy::{BoxedStrategy, ValueTree};
use proptest::test_runner::{Config as RunnerConfig, RngAlgorithm, TestRng, TestRunner};
use reqwest::Method;
use reqwest::header::CONTENT_TYPE;
use serde::Serialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tasker_schemas::api::{ErrorBody, SubmitResponse, SubmitTask};
use tasker_schemas::message::{HEADER_DEAD_LETTER_REASON, MAX_WORKER_MESSAGE_BYTES};
use tasker_schemas::{
    Names, StepMessage, TaskId, TaskRequest, TaskState, WorkerMessage, decode, encode_payload,
};
use tasker_tests::Harness;
use tasker_tests::tasker_worker::Client;
use tokio::sync::Notify;

/// The wire contract, for the documented error codes of §11.
const CONTRACT: &str = include_str!("../../../schemas/CONTRACT.md");

/// The workflow normal tasks run: two steps on the queue the suite's worker consumes.
const FLOW: &str = "namespace: badin\nname: flow\nversion: 1\nsteps:\n  - { name: a, handler: work, queue: badin }\n  - { name: b, handler: work, queue: badin, depends_on: [a] }\n";

/// A workflow whose step goes to a queue no worker consumes: its tasks stay `running` with
/// the step dispatched, targets for results naming a real attempt (probes).
const HOLD: &str = "namespace: badin\nname: hold\nversion: 1\nsteps:\n  - { name: h, handler: hold, queue: badin_hold, queue_wait_timeout: 10m, execution_timeout: 10m }\n";

/// Text that must never be in an answer: it would come from the database (or its driver).
const LEAKS: &[&str] = &[
    "sqlx",
    "sqlstate",
    "violates",
    "relation \"",
    "syntax error at",
    "postgres",
    "error returned from database",
    "duplicate key value",
    "pool timed out",
    "out of range for type",
    "invalid input syntax",
    "pg_",
];

#[derive(Parser, Debug)]
#[command(
    name = "bad-inputs",
    about = "Tasker bad-input suite: generated and hand-written bad inputs to every HTTP route and AMQP consumer of a running orchestrator"
)]
struct Args {
    /// Seed of the generated cases (the same seed sends the same cases).
    #[arg(long, default_value_t = 0x0bad_1a7a)]
    seed: u64,
    /// Multiplies the number of generated cases per edge (1: about 1,300 in all).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// How long one case may go without an answer before it counts as a hang (ms).
    #[arg(long, default_value_t = 15_000)]
    timeout_ms: u64,
    /// The orchestrator binary (default: `tasker` next to this executable).
    #[arg(long)]
    tasker_bin: Option<PathBuf>,
    /// Keep the orchestrator's log (its path is printed).
    #[arg(long)]
    keep_log: bool,
}

// ---------------------------------------------------------------------------------------------
// Edges, cases and the tally.

/// Where a case goes: an HTTP route or an AMQP consumer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Edge {
    Tasks,
    Task,
    Cancel,
    Retry,
    Signals,
    Instances,
    Templates,
    Template,
    Health,
    Ready,
    Metrics,
    Workers,
    Access,
    NoRoute,
    Schedules,
    Schedule,
    Results,
    Intake,
    DeadSteps,
}

impl Edge {
    const ALL: [Edge; 19] = [
        Edge::Tasks,
        Edge::Task,
        Edge::Cancel,
        Edge::Retry,
        Edge::Signals,
        Edge::Instances,
        Edge::Templates,
        Edge::Template,
        Edge::Health,
        Edge::Ready,
        Edge::Metrics,
        Edge::Workers,
        Edge::Schedules,
        Edge::Schedule,
        Edge::Access,
        Edge::NoRoute,
        Edge::Results,
        Edge::Intake,
        Edge::DeadSteps,
    ];

    fn key(self) -> &'static str {
        match self {
            Edge::Tasks => "http:/v1/tasks",
            Edge::Task => "http:/v1/tasks/{id}",
            Edge::Cancel => "http:/v1/tasks/{id}/cancel",
            Edge::Retry => "http:/v1/tasks/{id}/retry",
            Edge::Signals => "http:/v1/tasks/{id}/signals/{name}",
            Edge::Instances => "http:/v1/tasks/{id}/steps/{step}/instances",
            Edge::Templates => "http:/v1/templates",
            Edge::Template => "http:/v1/templates/{namespace}/{name}",
            Edge::Health => "http:/health",
            Edge::Ready => "http:/ready",
            Edge::Metrics => "http:/metrics",
            Edge::Workers => "http:/v1/workers",
            Edge::Schedules => "http:/v1/schedules",
            Edge::Schedule => "http:/v1/schedules/{id}[/pause|/resume]",
            Edge::Access => "http:/v1/keys|audit|namespaces, /v1/tasks/{id}/purge",
            Edge::NoRoute => "http:(no such path)",
            Edge::Results => "amqp:results",
            Edge::Intake => "amqp:task_requests",
            Edge::DeadSteps => "amqp:dead_steps",
        }
    }

    /// Generated cases wanted at `--scale 1`.
    fn generated_target(self) -> usize {
        match self {
            Edge::Tasks => 150,
            Edge::Task => 80,
            Edge::Cancel => 60,
            Edge::Retry => 40,
            Edge::Signals => 60,
            Edge::Instances => 60,
            Edge::Templates => 150,
            Edge::Template => 60,
            Edge::Health | Edge::Ready | Edge::Metrics | Edge::Workers => 15,
            Edge::Schedules => 80,
            Edge::Schedule => 40,
            Edge::Access => 120,
            Edge::NoRoute => 40,
            Edge::Results => 320,
            Edge::Intake => 200,
            Edge::DeadSteps => 150,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    Generated,
    HandWritten,
    /// Hand-written, but the input may be acceptable (an answer other than a refusal is not a
    /// fault): counted when refused, excluded when accepted; a refusal must still be clear.
    Probe,
}

/// What became of a case.
enum Verdict {
    Clear,
    /// The input was valid after all (generated cases only are excluded for it).
    Valid,
    Unclear(String),
    Hang(String),
}

#[derive(Default)]
struct Tally {
    generated: usize,
    hand_written: usize,
    clear: usize,
    hangs: usize,
    crashes: usize,
    by_edge: BTreeMap<&'static str, usize>,
    valid_excluded: BTreeMap<&'static str, usize>,
    unclear: Vec<String>,
}

impl Tally {
    fn record(&mut self, origin: Origin, edge: Edge, what: &str, verdict: Verdict) {
        if matches!(verdict, Verdict::Valid) && origin != Origin::HandWritten {
            *self.valid_excluded.entry(edge.key()).or_default() += 1;
            return;
        }
        match origin {
            Origin::Generated => self.generated += 1,
            Origin::HandWritten | Origin::Probe => self.hand_written += 1,
        }
        *self.by_edge.entry(edge.key()).or_default() += 1;
        let origin = match origin {
            Origin::Generated => "generated",
            Origin::HandWritten => "hand-written",
            Origin::Probe => "hand-written probe",
        };
        match verdict {
            Verdict::Clear => self.clear += 1,
            Verdict::Valid => self.unclear.push(format!(
                "[{}] {origin} {what}: accepted (expected a refusal)",
                edge.key()
            )),
            Verdict::Unclear(why) => self
                .unclear
                .push(format!("[{}] {origin} {what}: {why}", edge.key())),
            Verdict::Hang(why) => {
                self.hangs += 1;
                self.unclear
                    .push(format!("[{}] {origin} {what}: HANG: {why}", edge.key()));
            }
        }
    }
}

/// The documented error codes of §11 and the statuses each is documented with.
fn documented_codes(contract: &str) -> Result<HashMap<String, HashSet<u16>>> {
    let section = contract
        .split_once("## 11.")
        .map(|(_, s)| s)
        .context("CONTRACT.md has no section 11")?;
    let mut codes: HashMap<String, HashSet<u16>> = HashMap::new();
    for line in section.lines() {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 {
            continue;
        }
        let (Ok(status), Some(code)) = (
            cells[1].parse::<u16>(),
            cells[2].strip_prefix('`').and_then(|c| c.strip_suffix('`')),
        ) else {
            continue;
        };
        codes.entry(code.to_owned()).or_default().insert(status);
    }
    // The codes this suite expects to meet must be documented (a cross-check of the parse).
    for code in [
        "invalid_request",
        "invalid_template",
        "template_not_found",
        "task_not_found",
        "step_not_found",
        "idempotency_conflict",
        "task_id_conflict",
        "template_conflict",
        "invalid_state",
        "payload_too_large",
        "not_found",
        "method_not_allowed",
        "unsupported_media_type",
    ] {
        if !codes.contains_key(code) {
            bail!("CONTRACT.md §11 does not document the error code {code:?}");
        }
    }
    Ok(codes)
}

fn leak(text: &str) -> Option<&'static str> {
    let lower = text.to_lowercase();
    LEAKS.iter().copied().find(|l| lower.contains(l))
}

fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

/// The verdict on an HTTP answer (not 2xx).
fn judge_http(status: u16, text: &str, codes: &HashMap<String, HashSet<u16>>) -> Verdict {
    if (200..300).contains(&status) {
        return Verdict::Valid;
    }
    if let Some(l) = leak(text) {
        return Verdict::Unclear(format!(
            "{status} with database text ({l:?}): {}",
            clip(text, 300)
        ));
    }
    let body: ErrorBody = match serde_json::from_str(text) {
        Ok(b) => b,
        Err(_) => {
            return Verdict::Unclear(format!(
                "{status} without a JSON error body: {}",
                clip(text, 300)
            ));
        }
    };
    let code = body.error.code.as_str();
    match codes.get(code) {
        None => Verdict::Unclear(format!("{status} with an undocumented code {code:?}")),
        Some(statuses) if !statuses.contains(&status) => Verdict::Unclear(format!(
            "{status} with code {code:?}, documented with {statuses:?}: {}",
            body.error.message
        )),
        Some(_) if !(400..500).contains(&status) => Verdict::Unclear(format!(
            "{status} {code}: {} (not a client error)",
            body.error.message
        )),
        Some(_) if body.error.message.trim().is_empty() => {
            Verdict::Unclear(format!("{status} {code} with an empty message"))
        }
        Some(_) => Verdict::Clear,
    }
}

// ---------------------------------------------------------------------------------------------
// MessagePack values that JSON cannot express (bin, ext, non-string keys, invalid UTF-8), and
// their encoding.

#[derive(Clone, Debug)]
enum Mp {
    Nil,
    Bool(bool),
    Int(i64),
    UInt(u64),
    F64(f64),
    Str(String),
    /// A str whose bytes are not UTF-8.
    RawStr(Vec<u8>),
    Bin(Vec<u8>),
    Ext(i8, Vec<u8>),
    Arr(Vec<Mp>),
    Map(Vec<(Mp, Mp)>),
}

impl Mp {
    fn s(text: &str) -> Mp {
        Mp::Str(text.to_owned())
    }

    fn from_json(v: &Value) -> Mp {
        match v {
            Value::Null => Mp::Nil,
            Value::Bool(b) => Mp::Bool(*b),
            Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => Mp::UInt(u),
                (None, Some(i)) => Mp::Int(i),
                _ => Mp::F64(n.as_f64().unwrap_or(0.0)),
            },
            Value::String(s) => Mp::Str(s.clone()),
            Value::Array(a) => Mp::Arr(a.iter().map(Mp::from_json).collect()),
            Value::Object(m) => Mp::Map(
                m.iter()
                    .map(|(k, v)| (Mp::s(k), Mp::from_json(v)))
                    .collect(),
            ),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut Vec<u8>) {
        fn uint(n: u64, out: &mut Vec<u8>) {
            if n < 128 {
                out.push(n as u8);
            } else if n < 256 {
                out.extend([0xcc, n as u8]);
            } else if n < 65_536 {
                out.push(0xcd);
                out.extend((n as u16).to_be_bytes());
            } else if n < 1 << 32 {
                out.push(0xce);
                out.extend((n as u32).to_be_bytes());
            } else {
                out.push(0xcf);
                out.extend(n.to_be_bytes());
            }
        }
        fn len(n: usize, small: Option<(u8, usize)>, codes: [u8; 3], out: &mut Vec<u8>) {
            match small {
                Some((base, limit)) if n < limit => out.push(base | n as u8),
                _ if n < 256 && codes[0] != 0 => out.extend([codes[0], n as u8]),
                _ if n < 65_536 => {
                    out.push(codes[1]);
                    out.extend((n as u16).to_be_bytes());
                }
                _ => {
                    out.push(codes[2]);
                    out.extend((n as u32).to_be_bytes());
                }
            }
        }
        match self {
            Mp::Nil => out.push(0xc0),
            Mp::Bool(b) => out.push(if *b { 0xc3 } else { 0xc2 }),
            Mp::UInt(n) => uint(*n, out),
            Mp::Int(n) if *n >= 0 => uint(*n as u64, out),
            Mp::Int(n) if *n >= -32 => out.push(*n as i8 as u8),
            Mp::Int(n) if *n >= i64::from(i8::MIN) => out.extend([0xd0, *n as i8 as u8]),
            Mp::Int(n) if *n >= i64::from(i16::MIN) => {
                out.push(0xd1);
                out.extend((*n as i16).to_be_bytes());
            }
            Mp::Int(n) if *n >= i64::from(i32::MIN) => {
                out.push(0xd2);
                out.extend((*n as i32).to_be_bytes());
            }
            Mp::Int(n) => {
                out.push(0xd3);
                out.extend(n.to_be_bytes());
            }
            Mp::F64(f) => {
                out.push(0xcb);
                out.extend(f.to_be_bytes());
            }
            Mp::Str(s) => {
                len(s.len(), Some((0xa0, 32)), [0xd9, 0xda, 0xdb], out);
                out.extend(s.as_bytes());
            }
            Mp::RawStr(b) => {
                len(b.len(), Some((0xa0, 32)), [0xd9, 0xda, 0xdb], out);
                out.extend(b);
            }
            Mp::Bin(b) => {
                len(b.len(), None, [0xc4, 0xc5, 0xc6], out);
                out.extend(b);
            }
            Mp::Ext(t, d) => {
                match d.len() {
                    1 => out.push(0xd4),
                    2 => out.push(0xd5),
                    4 => out.push(0xd6),
                    8 => out.push(0xd7),
                    16 => out.push(0xd8),
                    n => len(n, None, [0xc7, 0xc8, 0xc9], out),
                }
                out.push(*t as u8);
                out.extend(d);
            }
            Mp::Arr(items) => {
                len(items.len(), Some((0x90, 16)), [0, 0xdc, 0xdd], out);
                for i in items {
                    i.write(out);
                }
            }
            Mp::Map(entries) => {
                len(entries.len(), Some((0x80, 16)), [0, 0xde, 0xdf], out);
                for (k, v) in entries {
                    k.write(out);
                    v.write(out);
                }
            }
        }
    }

    /// The value of `key` in a map.
    fn get_mut(&mut self, key: &str) -> Option<&mut Mp> {
        match self {
            Mp::Map(entries) => entries
                .iter_mut()
                .find(|(k, _)| matches!(k, Mp::Str(s) if s == key))
                .map(|(_, v)| v),
            _ => None,
        }
    }

    /// Sets `key` of a map (added when absent).
    fn set(&mut self, key: &str, value: Mp) {
        if let Some(v) = self.get_mut(key) {
            *v = value;
        } else if let Mp::Map(entries) = self {
            entries.push((Mp::s(key), value));
        }
    }

    /// Removes `key` of a map.
    fn remove(&mut self, key: &str) {
        if let Mp::Map(entries) = self {
            entries.retain(|(k, _)| !matches!(k, Mp::Str(s) if s == key));
        }
    }

    /// Paths to every value in the tree (the root is `[]`).
    fn paths(&self) -> Vec<Vec<usize>> {
        let mut out = vec![Vec::new()];
        let children: Vec<&Mp> = match self {
            Mp::Arr(items) => items.iter().collect(),
            Mp::Map(entries) => entries.iter().map(|(_, v)| v).collect(),
            _ => Vec::new(),
        };
        for (i, c) in children.into_iter().enumerate() {
            for mut p in c.paths() {
                p.insert(0, i);
                out.push(p);
            }
        }
        out
    }

    fn at_mut(&mut self, path: &[usize]) -> Option<&mut Mp> {
        let Some((first, rest)) = path.split_first() else {
            return Some(self);
        };
        match self {
            Mp::Arr(items) => items.get_mut(*first)?.at_mut(rest),
            Mp::Map(entries) => entries.get_mut(*first)?.1.at_mut(rest),
            _ => None,
        }
    }

    /// Removes the map entry or array element at `path` (not the root).
    fn remove_at(&mut self, path: &[usize]) {
        let Some((last, parent)) = path.split_last() else {
            return;
        };
        match self.at_mut(parent) {
            Some(Mp::Arr(items)) if *last < items.len() => {
                items.remove(*last);
            }
            Some(Mp::Map(entries)) if *last < entries.len() => {
                entries.remove(*last);
            }
            _ => {}
        }
    }

    fn nested(depth: usize) -> Mp {
        let mut v = Mp::Arr(Vec::new());
        for _ in 1..depth {
            v = Mp::Arr(vec![v]);
        }
        v
    }
}

/// An envelope around `payload`.
fn envelope(kind: &str, payload: Mp, message_id: u128) -> Mp {
    Mp::Map(vec![
        (Mp::s("kind"), Mp::s(kind)),
        (Mp::s("schema_version"), Mp::s("1.1")),
        (Mp::s("message_id"), Mp::Str(uuid(message_id))),
        (Mp::s("payload"), payload),
    ])
}

fn uuid(n: u128) -> String {
    uuid::Uuid::from_u128(n).to_string()
}

// ---------------------------------------------------------------------------------------------
// Strategies.

/// Any MessagePack value, a few levels deep, including what JSON has not.
fn any_mp() -> BoxedStrategy<Mp> {
    let leaf = prop_oneof![
        Just(Mp::Nil),
        any::<bool>().prop_map(Mp::Bool),
        any::<i64>().prop_map(Mp::Int),
        any::<u64>().prop_map(Mp::UInt),
        any::<f64>().prop_map(Mp::F64),
        ".{0,24}".prop_map(Mp::Str),
        prop::collection::vec(any::<u8>(), 0..24).prop_map(Mp::RawStr),
        prop::collection::vec(any::<u8>(), 0..24).prop_map(Mp::Bin),
        (any::<i8>(), prop::collection::vec(any::<u8>(), 1..17)).prop_map(|(t, d)| Mp::Ext(t, d)),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Mp::Arr),
            prop::collection::vec((inner.clone(), inner), 0..5).prop_map(Mp::Map),
        ]
    })
    .boxed()
}

/// Values at the edges of what a field holds: huge, negative, fractional, empty, oversize.
fn special_mp() -> BoxedStrategy<Mp> {
    prop_oneof![
        Just(Mp::UInt(u64::MAX)),
        Just(Mp::UInt(1 << 32)),
        Just(Mp::UInt(1 << 31)),
        Just(Mp::UInt(i64::MAX as u64 + 1)),
        Just(Mp::Int(-1)),
        Just(Mp::Int(i64::MIN)),
        Just(Mp::F64(1.5)),
        Just(Mp::F64(f64::NAN)),
        Just(Mp::F64(1e300)),
        Just(Mp::s("")),
        Just(Mp::s("a\u{0}b")),
        Just(Mp::Nil),
        Just(Mp::Bool(true)),
        Just(Mp::Arr(Vec::new())),
        Just(Mp::Map(Vec::new())),
        (257usize..3_000).prop_map(|n| Mp::Str("w".repeat(n))),
        bad_uuid().prop_map(Mp::Str),
        prop::collection::vec(any::<u8>(), 16..17).prop_map(Mp::Bin),
    ]
    .boxed()
}

/// Strings that are not canonical UUIDs (some are UUIDs in another spelling).
fn bad_uuid() -> BoxedStrategy<String> {
    prop_oneof![
        Just(String::new()),
        Just("not-a-uuid".to_owned()),
        "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{11}",
        "[0-9a-g]{36}",
        "[0-9A-Z-]{0,40}",
        any::<u128>().prop_map(|n| format!("{{{}}}", uuid(n))),
        any::<u128>().prop_map(|n| format!("{} ", uuid(n))),
        ".{0,40}",
    ]
    .boxed()
}

fn version_text() -> BoxedStrategy<String> {
    prop_oneof![
        Just("1".to_owned()),
        Just("+1.0".to_owned()),
        Just("1.0.0".to_owned()),
        Just("2.0".to_owned()),
        Just("0.9".to_owned()),
        Just("1.".to_owned()),
        Just(".1".to_owned()),
        Just("١.١".to_owned()),
        "[2-9]\\.[0-9]{1,2}",
        "[0-9]{5,12}\\.[0-9]{1,12}",
        ".{0,8}",
    ]
    .boxed()
}

fn kind_value() -> BoxedStrategy<Mp> {
    prop_oneof![
        Just(Mp::s("bogus")),
        Just(Mp::s("")),
        Just(Mp::s("RESULT")),
        Just(Mp::s("step")),
        Just(Mp::s("cancel")),
        Just(Mp::s("lifecycle_event")),
        Just(Mp::s("task_request")),
        Just(Mp::s("result")),
        Just(Mp::UInt(1)),
        Just(Mp::Nil),
        any_mp(),
    ]
    .boxed()
}

/// Valid messages of the kinds a results queue takes, with random ids (stale if applied).
fn results_base() -> BoxedStrategy<Mp> {
    let ids = (any::<u128>(), any::<u128>(), any::<u128>());
    let outcome = prop_oneof![
        Just(json!({"status": "succeeded", "output": {"ok": true}})),
        Just(
            json!({"status": "failed", "message": "no", "retryable": true, "retry_after_ms": 100})
        ),
        Just(json!({"status": "handler_missing", "handler": "h"})),
        Just(json!({"status": "succeeded", "output": null, "branches": ["x"]})),
    ];
    (ids, outcome, 0usize..4)
        .prop_map(|((task, step, msg), outcome, kind)| {
            let result = json!({
                "task_id": uuid(task), "step_id": uuid(step), "attempt": 1, "worker": "bad-inputs",
                "duration_ms": 5, "outcome": outcome,
            });
            let lease = json!({
                "task_id": uuid(task), "step_id": uuid(step), "attempt": 1, "worker": "bad-inputs",
                "lease_ms": 60_000,
            });
            match kind {
                0 => envelope("result", Mp::from_json(&result), msg),
                1 => envelope(
                    "result_batch",
                    Mp::from_json(&json!({"results": [result.clone(), result]})),
                    msg,
                ),
                2 => envelope("started", Mp::from_json(&lease), msg),
                _ => envelope("heartbeat", Mp::from_json(&lease), msg),
            }
        })
        .boxed()
}

/// Valid task requests for a template that does not exist (every one must be refused).
fn intake_base() -> BoxedStrategy<Mp> {
    (any::<u128>(), any::<u128>(), any::<u128>())
        .prop_map(|(request, task, msg)| {
            let mut task_id = uuid::Uuid::from_u128(task).into_bytes();
            // A UUIDv7 (version 7, RFC variant), so that only the template is wrong.
            task_id[6] = 0x70 | (task_id[6] & 0x0f);
            task_id[8] = 0x80 | (task_id[8] & 0x3f);
            envelope(
                "task_request",
                Mp::from_json(&json!({
                    "request_id": uuid(request), "namespace": "nosuch", "template": "nope",
                    "version": null, "context": {"order": 7, "items": [1, 2]},
                    "idempotency_key": "k", "priority": 0,
                    "task_id": uuid::Uuid::from_bytes(task_id).to_string(),
                })),
                msg,
            )
        })
        .boxed()
}

/// Valid step messages with random ids (a dead step of no task).
fn step_base() -> BoxedStrategy<Mp> {
    (any::<u128>(), any::<u128>(), any::<u128>())
        .prop_map(|(task, step, msg)| {
            envelope(
                "step",
                Mp::from_json(&json!({
                    "task_id": uuid(task), "step_id": uuid(step), "namespace": "badin",
                    "template": "flow", "step": "a", "handler": "work", "queue": "badin",
                    "attempt": 1, "idempotency_key": format!("{}:a", uuid(task)),
                    "context": {}, "parent_outputs": {}, "timeout_ms": 1000,
                    "result_routing_key": "badin.0",
                })),
                msg,
            )
        })
        .boxed()
}

/// A body for an AMQP consumer, made from a valid message of `base` (or from nothing), and
/// what was done to it.
fn amqp_body(
    base: BoxedStrategy<Mp>,
    fields: &'static [&'static str],
) -> BoxedStrategy<(Vec<u8>, String)> {
    let field = move |i: &Index| fields[i.index(fields.len())];
    prop_oneof![
        3 => (base.clone(), any::<Index>(), any_mp()).prop_map(|(mut m, at, v)| {
            let paths = m.paths();
            let path = paths[at.index(paths.len())].clone();
            let what = format!("value at {path:?} replaced by {}", clip(&format!("{v:?}"), 80));
            if let Some(slot) = m.at_mut(&path) { *slot = v; }
            (m.encode(), what)
        }),
        2 => (base.clone(), any::<Index>(), special_mp()).prop_map(move |(mut m, i, v)| {
            let f = field(&i);
            let what = format!("payload.{f} = {}", clip(&format!("{v:?}"), 80));
            if let Some(p) = m.get_mut("payload") { p.set(f, v); }
            (m.encode(), what)
        }),
        2 => (base.clone(), any::<Index>()).prop_map(|(mut m, at)| {
            let paths: Vec<Vec<usize>> = m.paths().into_iter().filter(|p| !p.is_empty()).collect();
            let path = paths[at.index(paths.len())].clone();
            m.remove_at(&path);
            (m.encode(), format!("entry at {path:?} removed"))
        }),
        1 => (base.clone(), any::<Index>()).prop_map(move |(mut m, i)| {
            let f = field(&i);
            if let Some(p) = m.get_mut("payload") { p.remove(f); }
            (m.encode(), format!("payload.{f} removed"))
        }),
        1 => (base.clone(), version_text()).prop_map(|(mut m, v)| {
            let what = format!("schema_version {v:?}");
            m.set("schema_version", Mp::Str(v));
            (m.encode(), what)
        }),
        1 => (base.clone(), kind_value()).prop_map(|(mut m, k)| {
            let what = format!("kind {}", clip(&format!("{k:?}"), 80));
            m.set("kind", k);
            (m.encode(), what)
        }),
        1 => (base.clone(), bad_uuid()).prop_map(|(mut m, id)| {
            let what = format!("message_id {id:?}");
            m.set("message_id", Mp::Str(id));
            (m.encode(), what)
        }),
        1 => (base.clone(), 100usize..400).prop_map(|(mut m, depth)| {
            if let Some(p) = m.get_mut("payload") { p.set("deep", Mp::nested(depth)); }
            (m.encode(), format!("payload.deep nests {depth} arrays"))
        }),
        1 => (base.clone(), any::<Index>()).prop_map(|(m, at)| {
            let bytes = m.encode();
            let cut = at.index(bytes.len());
            (bytes[..cut].to_vec(), format!("truncated to {cut} bytes"))
        }),
        1 => (base.clone(), prop::collection::vec(any::<u8>(), 1..8)).prop_map(|(m, extra)| {
            let mut bytes = m.encode();
            bytes.extend(&extra);
            (bytes, format!("{} trailing bytes", extra.len()))
        }),
        3 => (base.clone(), prop::collection::vec((any::<Index>(), any::<u8>(), any::<bool>()), 1..6)).prop_map(|(m, edits)| {
            let mut bytes = m.encode();
            for (at, value, flip) in &edits {
                let i = at.index(bytes.len());
                if *flip { bytes[i] ^= 1 << (value % 8) } else { bytes[i] = *value }
            }
            (bytes, format!("{} bytes flipped or replaced", edits.len()))
        }),
        1 => (base, prop::collection::vec(any_mp(), 0..4)).prop_map(|(m, items)| {
            // The same fields, as an array (a positional envelope).
            let values = match m { Mp::Map(e) => e.into_iter().map(|(_, v)| v).chain(items).collect(), other => vec![other] };
            (Mp::Arr(values).encode(), "an array instead of a map".to_owned())
        }),
        1 => prop::collection::vec(any::<u8>(), 0..200).prop_map(|b| (b, "random bytes".to_owned())),
        1 => any_mp().prop_map(|v| (v.encode(), "a random MessagePack value".to_owned())),
    ]
    .boxed()
}

/// A valid `SubmitTask` body for the suite's workflow.
fn submit_body(n: u64) -> Value {
    json!({"namespace": "badin", "template": "flow", "context": {"n": n, "tags": ["x"]}, "priority": 1})
}

/// A valid schedule of the suite's template (yearly: it never fires during the suite), to mutate.
fn schedule_body() -> Value {
    json!({"namespace": "badin", "template": "flow", "name": "badsched", "cron": "0 3 1 1 *",
           "timezone": "Europe/Paris", "context": {"n": 1}, "catch_up": "latest"})
}

/// A valid template of a namespace of its own, to mutate.
fn template_body() -> Value {
    json!({
        "namespace": "badtpl", "name": "t", "version": 1, "description": "mutated by bad-inputs",
        "steps": [
            {"name": "a", "handler": "h", "queue": "badtpl_q"},
            {"name": "b", "handler": "h", "queue": "badtpl_q", "depends_on": ["a"],
             "retry": {"max_attempts": 3, "initial_delay": "100ms", "multiplier": 2.0},
             "execution_timeout": "30s"},
            {"name": "c", "handler": "h", "queue": "badtpl_q", "depends_on": ["a", "b"], "join": "any"}
        ]
    })
}

/// Any JSON value, a few levels deep.
fn any_json() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        (-1e15f64..1e15).prop_map(|f| json!(f)),
        ".{0,30}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 20, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{0,10}", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
    .boxed()
}

/// JSON paths to every value (object keys and array indexes).
fn json_paths(v: &Value) -> Vec<Vec<String>> {
    let mut out = vec![Vec::new()];
    let children: Vec<(String, &Value)> = match v {
        Value::Object(m) => m.iter().map(|(k, v)| (k.clone(), v)).collect(),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| (i.to_string(), v))
            .collect(),
        _ => Vec::new(),
    };
    for (k, c) in children {
        for mut p in json_paths(c) {
            p.insert(0, k.clone());
            out.push(p);
        }
    }
    out
}

fn json_at_mut<'a>(v: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    let Some((first, rest)) = path.split_first() else {
        return Some(v);
    };
    let child = match v {
        Value::Object(m) => m.get_mut(first)?,
        Value::Array(a) => a.get_mut(first.parse::<usize>().ok()?)?,
        _ => return None,
    };
    json_at_mut(child, rest)
}

/// Text that is not quite a number JSON readers take: out of every range, or not a number.
fn number_text() -> BoxedStrategy<String> {
    prop_oneof![
        Just("1e400".to_owned()),
        Just("-1e400".to_owned()),
        Just("99999999999999999999999".to_owned()),
        Just("-99999999999999999999999".to_owned()),
        Just("0.5".to_owned()),
        Just("-1".to_owned()),
        Just("4294967296".to_owned()),
        Just("32768".to_owned()),
        Just("-32769".to_owned()),
        Just("NaN".to_owned()),
        Just("Infinity".to_owned()),
        Just("0x10".to_owned()),
        Just("1_000".to_owned()),
        Just("\"7\"".to_owned()),
    ]
    .boxed()
}

/// A JSON body made from the valid `base` (or from nothing), and what was done to it.
fn json_body(base: Value, fields: &'static [&'static str]) -> BoxedStrategy<(Vec<u8>, String)> {
    let b = base.clone();
    let replaced = (any::<Index>(), any_json()).prop_map(move |(at, v)| {
        let mut body = b.clone();
        let paths = json_paths(&body);
        let path = paths[at.index(paths.len())].clone();
        let what = format!("{} := {}", path.join("."), clip(&v.to_string(), 80));
        if let Some(slot) = json_at_mut(&mut body, &path) {
            *slot = v;
        }
        (body.to_string().into_bytes(), what)
    });
    let b = base.clone();
    let removed = any::<Index>().prop_map(move |at| {
        let mut body = b.clone();
        let paths: Vec<Vec<String>> = json_paths(&body)
            .into_iter()
            .filter(|p| !p.is_empty())
            .collect();
        let path = paths[at.index(paths.len())].clone();
        let (last, parent) = path.split_last().expect("not the root");
        match json_at_mut(&mut body, parent) {
            Some(Value::Object(m)) => {
                m.remove(last);
            }
            Some(Value::Array(a)) => {
                if let Ok(i) = last.parse::<usize>()
                    && i < a.len()
                {
                    a.remove(i);
                }
            }
            _ => {}
        }
        (
            body.to_string().into_bytes(),
            format!("{} removed", path.join(".")),
        )
    });
    let b = base.clone();
    let unknown = ("[a-z_]{1,12}", any_json()).prop_map(move |(k, v)| {
        let mut body = b.clone();
        body[&k] = v;
        (body.to_string().into_bytes(), format!("field {k:?} added"))
    });
    let b = base.clone();
    let number = (any::<Index>(), number_text()).prop_map(move |(i, n)| {
        let f = fields[i.index(fields.len())];
        let mut body = b.clone();
        body[f] = json!("@@NUMBER@@");
        let text = body.to_string().replace("\"@@NUMBER@@\"", &n);
        (text.into_bytes(), format!("{f} = {n}"))
    });
    let b = base.clone();
    let truncated = any::<Index>().prop_map(move |at| {
        let text = b.to_string().into_bytes();
        let cut = at.index(text.len());
        (text[..cut].to_vec(), format!("truncated to {cut} bytes"))
    });
    let b = base.clone();
    let flipped =
        prop::collection::vec((any::<Index>(), any::<u8>()), 1..4).prop_map(move |edits| {
            let mut text = b.to_string().into_bytes();
            for (at, value) in &edits {
                let i = at.index(text.len());
                text[i] = *value;
            }
            (text, format!("{} bytes replaced", edits.len()))
        });
    let b = base;
    let deep = (101usize..300).prop_map(move |depth| {
        let text = b.to_string();
        let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        let text = format!("{},\"context\":{nested}}}", &text[..text.len() - 1]);
        (text.into_bytes(), format!("context nests {depth} arrays"))
    });
    prop_oneof![
        4 => replaced,
        2 => removed,
        1 => unknown,
        2 => number,
        1 => truncated,
        2 => flipped,
        1 => deep,
        1 => any_json().prop_map(|v| (v.to_string().into_bytes(), "a random JSON value".to_owned())),
        1 => prop::collection::vec(any::<u8>(), 0..100).prop_map(|b| (b, "random bytes".to_owned())),
    ]
    .boxed()
}

fn content_type() -> BoxedStrategy<Option<String>> {
    prop_oneof![
        12 => Just(Some("application/json".to_owned())),
        1 => Just(Some("application/json; charset=utf-8".to_owned())),
        1 => Just(None),
        1 => Just(Some("text/plain".to_owned())),
        1 => Just(Some("application/msgpack".to_owned())),
        1 => "[a-z/+;= -]{0,30}".prop_map(Some),
    ]
    .boxed()
}

/// Text for a path segment: ids of every wrong sort, percent-encoding that is not UTF-8, long.
fn segment(known: Vec<String>) -> BoxedStrategy<String> {
    let known = prop::sample::select(known);
    prop_oneof![
        3 => known,
        2 => any::<u128>().prop_map(uuid),
        2 => bad_uuid().prop_map(|s| percent(&s)),
        1 => Just("%FF".to_owned()),
        1 => Just("%C0%AF".to_owned()),
        1 => Just("%".to_owned()),
        1 => Just("%00".to_owned()),
        1 => (100usize..3_000).prop_map(|n| "x".repeat(n)),
        1 => "[a-zA-Z0-9_.~-]{1,12}",
    ]
    .boxed()
}

/// Percent-encodes what is not unreserved.
fn percent(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A query string over `keys`, with values of every wrong sort.
fn query(keys: &'static [&'static str]) -> BoxedStrategy<String> {
    let value = prop_oneof![
        number_text().prop_map(|n| percent(n.trim_matches('"'))),
        Just("abc".to_owned()),
        Just(String::new()),
        Just("%FF".to_owned()),
        Just("a%00b".to_owned()),
        Just("-5".to_owned()),
        Just("0".to_owned()),
        Just("501".to_owned()),
        Just("100".to_owned()),
        Just("running".to_owned()),
        Just("RUNNING".to_owned()),
        any::<u128>().prop_map(uuid),
        bad_uuid().prop_map(|s| percent(&s)),
        "[a-z0-9%&=+]{0,12}",
    ];
    let key = prop_oneof![
        6 => prop::sample::select(keys),
        1 => Just("unknown"),
    ];
    prop::collection::vec((key, value, any::<bool>()), 1..4)
        .prop_map(|pairs| {
            pairs
                .into_iter()
                .map(|(k, v, with_eq)| {
                    if with_eq {
                        format!("{k}={v}")
                    } else {
                        k.to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join("&")
        })
        .boxed()
}

fn other_method(allowed: &'static [&'static str]) -> BoxedStrategy<Method> {
    prop::sample::select(vec![
        "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "FOO", "PROPFIND",
    ])
    .prop_filter("a method the route lacks", move |m| !allowed.contains(m))
    .prop_map(|m| Method::from_bytes(m.as_bytes()).expect("a method"))
    .boxed()
}

// ---------------------------------------------------------------------------------------------
// HTTP requests and AMQP messages of the cases.

#[derive(Clone, Debug)]
struct Req {
    method: Method,
    /// Path and query, sent as given (the URL parser may normalize it).
    path: String,
    content_type: Option<String>,
    body: Option<Vec<u8>>,
    what: String,
}

impl Req {
    fn new(method: Method, path: impl Into<String>) -> Self {
        let path = path.into();
        Self {
            what: format!("{method} {}", clip(&path, 120)),
            method,
            path,
            content_type: None,
            body: None,
        }
    }

    fn get(path: impl Into<String>) -> Self {
        Self::new(Method::GET, path)
    }

    fn post(path: impl Into<String>) -> Self {
        Self::new(Method::POST, path)
    }

    fn json(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.content_type = Some("application/json".into());
        self.body = Some(body.into());
        self
    }

    fn typed(mut self, content_type: Option<&str>, body: impl Into<Vec<u8>>) -> Self {
        self.content_type = content_type.map(str::to_owned);
        self.body = Some(body.into());
        self
    }

    fn note(mut self, note: &str) -> Self {
        self.what = format!("{} ({note})", self.what);
        self
    }
}

/// One message for an AMQP consumer.
struct Msg {
    edge: Edge,
    origin: Origin,
    body: Vec<u8>,
    what: String,
}

impl Msg {
    fn probe(edge: Edge, body: Vec<u8>, what: &str) -> Self {
        Self {
            origin: Origin::Probe,
            ..Self::hand(edge, body, what)
        }
    }

    fn hand(edge: Edge, body: Vec<u8>, what: &str) -> Self {
        Self {
            edge,
            origin: Origin::HandWritten,
            body,
            what: what.to_owned(),
        }
    }
}

/// A dead letter: its reason and routing key.
#[derive(Clone, Debug)]
struct Dead {
    reason: String,
    routing_key: String,
}

/// What a consumer does with a body, told without the orchestrator: `true` when it would read
/// and apply it (or, for a dead step, forward it as a readable dead step).
fn readable(edge: Edge, body: &[u8]) -> bool {
    match edge {
        Edge::Results => {
            if body.len() > MAX_WORKER_MESSAGE_BYTES {
                return false;
            }
            let attempt_ok = |a: u32| i32::try_from(a).is_ok();
            let worker_ok = |w: &str| w.len() <= 256;
            match WorkerMessage::decode(body) {
                Ok((_, WorkerMessage::Results(rs))) => rs
                    .iter()
                    .all(|r| attempt_ok(r.attempt) && worker_ok(&r.worker)),
                Ok((_, WorkerMessage::Started(s))) => attempt_ok(s.attempt) && worker_ok(&s.worker),
                Ok((_, WorkerMessage::Heartbeat(s))) => {
                    attempt_ok(s.attempt) && worker_ok(&s.worker)
                }
                _ => false,
            }
        }
        Edge::DeadSteps => decode::<StepMessage>(body).is_ok(),
        // Every task request of the suite names a template that does not exist, or breaks a rule.
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// The orchestrator child process.

struct Orch {
    child: tokio::process::Child,
    url: String,
    log: PathBuf,
    bin: PathBuf,
    env: Vec<(String, String)>,
}

impl Orch {
    async fn spawn(bin: &Path, env: Vec<(String, String)>, log: &Path) -> Result<Self> {
        let (child, url) = tasker_tests::spawn_serve(bin, &env, log).await?;
        Ok(Self {
            child,
            url,
            log: log.to_owned(),
            bin: bin.to_owned(),
            env,
        })
    }

    /// `Some(why)` when the process has exited or does not answer `/health`.
    async fn down(&mut self, http: &reqwest::Client) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => return Some(format!("the orchestrator exited ({status})")),
            Err(e) => return Some(format!("cannot check the orchestrator process: {e}")),
            Ok(None) => {}
        }
        match http
            .get(format!("{}/health", self.url))
            .timeout(Duration::from_secs(5))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => None,
            Ok(r) => Some(format!("/health answered {}", r.status())),
            Err(e) => Some(format!("/health did not answer: {e}")),
        }
    }

    /// Stops it (SIGTERM, then kill after 15 s).
    async fn stop(&mut self) {
        tasker_tests::stop_child(&mut self.child, Duration::from_secs(15)).await;
    }

    /// Lines of its log that tell of a panic.
    fn panics(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("panicked"))
            .map(|l| clip(l, 300))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The suite.

/// A task the suite submitted (or a generated submit created) that must complete.
struct Submitted {
    id: TaskId,
    how: String,
}

struct Suite {
    args_timeout: Duration,
    http: reqwest::Client,
    client: Client,
    names: Names,
    channel: Channel,
    dead: Arc<Mutex<HashMap<String, Dead>>>,
    arrived: Arc<Notify>,
    codes: HashMap<String, HashSet<u16>>,
    orch: Orch,
    tally: Tally,
    tasks: Vec<Submitted>,
    /// Tasks generated submits created (checked at the end: those of the suite's workflow must
    /// complete).
    created: Vec<TaskId>,
    /// Tasks of `HOLD` with their dispatched step (id, attempt): they must exist at the end.
    held: Vec<(TaskId, tasker_schemas::StepId, u32)>,
    /// A task submitted with a chosen `task_id` (for conflicts).
    chosen: Option<TaskId>,
    marker: u64,
    cases: u64,
    run: String,
    runner: TestRunner,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Suite {
    fn sample<T: std::fmt::Debug>(&mut self, strategy: &BoxedStrategy<T>) -> T {
        match strategy.new_tree(&mut self.runner) {
            Ok(tree) => tree.current(),
            Err(e) => panic!("a strategy could not generate a value: {e}"),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.orch.url)
    }

    /// Sends one HTTP case and records its verdict.
    async fn http_case(&mut self, origin: Origin, edge: Edge, req: Req) -> Result<()> {
        let Ok(url) = reqwest::Url::parse(&self.url(&req.path)) else {
            eprintln!("[bad-inputs] skipped (not a URL): {}", req.what);
            return Ok(());
        };
        let mut rb = self.http.request(req.method.clone(), url);
        if let Some(ct) = &req.content_type {
            rb = rb.header(CONTENT_TYPE, ct.as_str());
        }
        if let Some(body) = &req.body {
            rb = rb.body(body.clone());
        }
        let verdict = match rb.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                match response.text().await {
                    Ok(text) => {
                        if (200..300).contains(&status)
                            && edge == Edge::Tasks
                            && req.method == Method::POST
                            && let Ok(r) = serde_json::from_str::<SubmitResponse>(&text)
                        {
                            self.created.push(r.task_id);
                        }
                        judge_http(status, &text, &self.codes)
                    }
                    Err(e) if e.is_timeout() => {
                        Verdict::Hang(format!("{status}, body not complete within the timeout"))
                    }
                    Err(e) => Verdict::Unclear(format!("{status}, body unreadable: {e}")),
                }
            }
            Err(e) if e.is_timeout() => {
                Verdict::Hang(format!("no answer within {:?}", self.args_timeout))
            }
            Err(e) => Verdict::Unclear(format!("no answer: {e:#}")),
        };
        self.tally.record(origin, edge, &req.what, verdict);
        self.after_case().await
    }

    /// Every few cases: is the orchestrator still up; now and then a normal task, submitted
    /// during the suite.
    async fn after_case(&mut self) -> Result<()> {
        self.cases += 1;
        if self.cases.is_multiple_of(25) {
            self.check_alive().await?;
        }
        if self.cases.is_multiple_of(100) {
            let via_amqp = self.cases.is_multiple_of(200);
            self.submit_normal(via_amqp, "during the suite").await?;
        }
        Ok(())
    }

    /// A crash is counted, and the orchestrator started again so the suite goes on.
    async fn check_alive(&mut self) -> Result<()> {
        if let Some(why) = self.orch.down(&self.http).await {
            self.tally.crashes += 1;
            eprintln!(
                "[bad-inputs] CRASH after case {}: {why}; restarting the orchestrator",
                self.cases
            );
            self.orch.stop().await;
            let (bin, env, log) = (
                self.orch.bin.clone(),
                self.orch.env.clone(),
                self.orch.log.clone(),
            );
            self.orch = Orch::spawn(&bin, env, &log).await?;
            self.client = Client::new(&self.orch.url);
        }
        Ok(())
    }

    /// Submits a normal task of the suite's workflow, over HTTP or AMQP; it must complete.
    async fn submit_normal(&mut self, via_amqp: bool, when: &str) -> Result<TaskId> {
        let n = self.tasks.len() as u64;
        if via_amqp {
            let id = TaskId::new();
            let body = encode_payload(TaskRequest {
                request_id: tasker_schemas::RequestId::new(),
                namespace: "badin".into(),
                template: "flow".into(),
                version: None,
                context: json!({"n": n}),
                idempotency_key: None,
                priority: 0,
                task_id: Some(id),
                run_at: None,
                delay_ms: None,
                deadline_ms: None,
            })?;
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type(ShortString::from("application/msgpack"))
                .with_message_id(ShortString::from(format!("{}-normal-{n}", self.run)));
            let confirm = self
                .channel
                .basic_publish(
                    self.names.tasks_exchange().as_str().into(),
                    "badin".into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &body,
                    props,
                )
                .await?
                .await?;
            if !matches!(confirm, Confirmation::Ack(None)) {
                bail!("a task request was not routed: {confirm:?}");
            }
            self.tasks.push(Submitted {
                id,
                how: format!("AMQP, {when}"),
            });
            Ok(id)
        } else {
            let body: SubmitTask = serde_json::from_value(submit_body(n))?;
            let id = self.client.submit(&body).await?.task_id;
            self.tasks.push(Submitted {
                id,
                how: format!("HTTP, {when}"),
            });
            Ok(id)
        }
    }

    /// Publishes AMQP cases (confirmed, each with a marker `message_id`), waits for their dead
    /// letters and records the verdicts.
    async fn amqp_cases(&mut self, msgs: Vec<Msg>) -> Result<()> {
        for chunk in msgs.chunks(100) {
            let mut pending = Vec::new();
            for m in chunk {
                self.marker += 1;
                let marker = format!("{}-{}", self.run, self.marker);
                let (exchange, key) = match m.edge {
                    Edge::Results => (self.names.results_exchange(), "badin.0"),
                    Edge::Intake => (self.names.tasks_exchange(), "nosuch"),
                    _ => (self.names.step_dead_letter_exchange(), "badin"),
                };
                let props = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type(ShortString::from("application/msgpack"))
                    .with_message_id(ShortString::from(marker.clone()));
                let confirm = self
                    .channel
                    .basic_publish(
                        exchange.as_str().into(),
                        key.into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..Default::default()
                        },
                        &m.body,
                        props,
                    )
                    .await?;
                pending.push((marker, m, confirm));
            }
            let mut sent = Vec::new();
            for (marker, m, confirm) in pending {
                match confirm.await? {
                    Confirmation::Ack(None) => sent.push((marker, m)),
                    other => eprintln!(
                        "[bad-inputs] skipped (not routed by the broker: {other:?}): {}",
                        m.what
                    ),
                }
            }
            self.await_dead_letters(sent).await?;
        }
        Ok(())
    }

    async fn await_dead_letters(&mut self, sent: Vec<(String, &Msg)>) -> Result<()> {
        let expected: Vec<&String> = sent
            .iter()
            .filter(|(_, m)| !readable(m.edge, &m.body))
            .map(|(k, _)| k)
            .collect();
        let mut last_progress = Instant::now();
        let mut seen = 0;
        loop {
            let notified = self.arrived.notified();
            let found = {
                let dead = lock(&self.dead);
                expected.iter().filter(|k| dead.contains_key(**k)).count()
            };
            if found == expected.len() {
                break;
            }
            if found > seen {
                seen = found;
                last_progress = Instant::now();
            }
            if last_progress.elapsed() > self.args_timeout {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
        // Readable messages are applied (or dropped as stale) in order with the others; give a
        // refusal of one of them a moment to show up.
        if sent.iter().any(|(_, m)| m.origin == Origin::Probe) {
            tokio::time::sleep(Duration::from_millis(1_500)).await;
        } else if sent.iter().any(|(_, m)| readable(m.edge, &m.body)) {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let dead = lock(&self.dead).clone();
        for (marker, m) in &sent {
            let what = format!("{} [{marker}]", m.what);
            let verdict = match (dead.get(marker), readable(m.edge, &m.body)) {
                // A readable dead step is forwarded as such: the dead letter is its record.
                (_, true) if m.edge == Edge::DeadSteps => Verdict::Valid,
                (None, true) => Verdict::Valid,
                (None, false) => Verdict::Hang(format!(
                    "no dead letter within {:?} of the last one",
                    self.args_timeout
                )),
                (Some(d), _) if d.reason.trim().is_empty() => {
                    Verdict::Unclear("dead-lettered without a reason".into())
                }
                (Some(d), _) => match leak(&d.reason) {
                    Some(l) => Verdict::Unclear(format!(
                        "dead letter reason has database text ({l:?}): {}",
                        clip(&d.reason, 300)
                    )),
                    None => {
                        if std::env::var_os("BAD_INPUTS_VERBOSE").is_some() {
                            eprintln!(
                                "[bad-inputs] {} -> {} ({})",
                                what,
                                clip(&d.reason, 200),
                                d.routing_key
                            );
                        }
                        Verdict::Clear
                    }
                },
            };
            self.tally.record(m.origin, m.edge, &what, verdict);
        }
        for _ in 0..sent.len() {
            self.after_case().await?;
        }
        Ok(())
    }

    /// Generated HTTP cases for `edge` until `target` were not valid (or 6 × target tries).
    async fn generated_http(
        &mut self,
        edge: Edge,
        target: usize,
        strategy: BoxedStrategy<Req>,
    ) -> Result<()> {
        let start = self.counted(edge);
        for _ in 0..target * 6 {
            if self.counted(edge) - start >= target {
                break;
            }
            let req = self.sample(&strategy);
            self.http_case(Origin::Generated, edge, req).await?;
        }
        Ok(())
    }

    /// Generated AMQP cases for `edge`: `target` that a consumer must refuse, plus the readable
    /// ones met on the way (sent too, and excluded).
    async fn generated_amqp(
        &mut self,
        edge: Edge,
        target: usize,
        strategy: BoxedStrategy<(Vec<u8>, String)>,
    ) -> Result<()> {
        let mut msgs = Vec::new();
        let mut refused = 0;
        for _ in 0..target * 6 {
            if refused >= target {
                break;
            }
            let (body, what) = self.sample(&strategy);
            if !readable(edge, &body) {
                refused += 1;
            }
            msgs.push(Msg {
                edge,
                origin: Origin::Generated,
                body,
                what,
            });
        }
        self.amqp_cases(msgs).await
    }

    fn counted(&self, edge: Edge) -> usize {
        self.tally.by_edge.get(edge.key()).copied().unwrap_or(0)
    }
}

#[derive(Serialize)]
struct Report {
    config: &'static str,
    bad_inputs: usize,
    generated: usize,
    hand_written: usize,
    clear_errors: usize,
    crashes: usize,
    hangs: usize,
    lost: usize,
    cases_by_edge: BTreeMap<&'static str, usize>,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("[bad-inputs] FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<bool> {
    let t0 = Instant::now();
    let codes = documented_codes(CONTRACT)?;
    let bin = tasker_tests::find_tasker(args.tasker_bin.as_deref())?;
    // A database and prefix of its own; the harness's in-process orchestrator migrates the
    // database and declares the topology, registers the templates, and is then stopped: the
    // suite talks to a child process only.
    let h = Harness::start().await?;
    let outcome = suite(&args, &h, codes, &bin, t0).await;
    h.finish().await;
    let (report, pass) = outcome?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(pass)
}

async fn suite(
    args: &Args,
    h: &Harness,
    codes: HashMap<String, HashSet<u16>>,
    bin: &Path,
    t0: Instant,
) -> Result<(Report, bool)> {
    h.register_yaml(FLOW).await?;
    h.register_yaml(HOLD).await?;
    let base_template: tasker_schemas::Template = serde_json::from_value(template_body())?;
    h.client().register_template(&base_template).await?;
    h.take_orchestrator(0).stop().await;

    let run = format!("bad-inputs-{}", &h.prefix);
    let log = std::env::temp_dir().join(format!("{run}-orchestrator.log"));
    let env: Vec<(String, String)> = [
        ("TASKER_DATABASE_URL", h.database_url.as_str()),
        ("TASKER_AMQP_URL", h.services.amqp_url.as_str()),
        ("TASKER_PREFIX", h.prefix.as_str()),
        ("TASKER_POLL_INTERVAL_MS", "100"),
        ("TASKER_RELAY_AFTER_MS", "1000"),
        ("TASKER_HANDLER_MISSING_DELAY_MS", "200"),
        ("TASKER_SHUTDOWN_GRACE_MS", "3000"),
        ("TASKER_DB_POOL_SIZE", "8"),
        // This suite reads the dead-letter queue itself.
        ("TASKER_DEAD_LETTER_READER", "false"),
        ("NO_COLOR", "1"),
        ("RUST_LOG", "warn,sqlx=error"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    let orch = Orch::spawn(bin, env, &log).await?;
    eprintln!(
        "[bad-inputs] orchestrator at {} (log {}), prefix {}, seed {}",
        orch.url,
        log.display(),
        h.prefix,
        args.seed
    );
    h.spawn_worker(
        h.worker("badin")
            .queue("badin")
            .concurrency(16)
            .handler_fn("work", |ctx| async move {
                Ok(json!({"ok": true, "step": ctx.step()}))
            }),
    )
    .await?;

    // The dead-letter queue, read by message id.
    let conn = lapin::Connection::connect(&h.services.amqp_url, Default::default()).await?;
    let channel = conn.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let reader = conn.create_channel().await?;
    let mut consumer = reader
        .basic_consume(
            h.names().dead_letter_queue().as_str().into(),
            "bad-inputs".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let dead: Arc<Mutex<HashMap<String, Dead>>> = Arc::default();
    let arrived = Arc::new(Notify::new());
    let (d, a) = (dead.clone(), arrived.clone());
    let listener = tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let Some(id) = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.to_string())
            else {
                continue;
            };
            let reason = delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(HEADER_DEAD_LETTER_REASON).cloned())
                .map(|v| match v {
                    AMQPValue::LongString(s) => s.to_string(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            lock(&d).insert(
                id,
                Dead {
                    reason,
                    routing_key: delivery.routing_key.to_string(),
                },
            );
            a.notify_waiters();
        }
    });

    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(args.timeout_ms))
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&args.seed.to_le_bytes());
    let runner = TestRunner::new_with_rng(
        RunnerConfig {
            failure_persistence: None,
            ..RunnerConfig::default()
        },
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed),
    );
    let mut s = Suite {
        args_timeout: Duration::from_millis(args.timeout_ms),
        client: Client::new(&orch.url),
        http,
        names: h.names(),
        channel,
        dead,
        arrived,
        codes,
        orch,
        tally: Tally::default(),
        tasks: Vec::new(),
        created: Vec::new(),
        held: Vec::new(),
        chosen: None,
        marker: 0,
        cases: 0,
        run,
        runner,
    };

    // Before the suite: normal tasks over HTTP and AMQP; one completed task for the cases that
    // need a finished task.
    for i in 0..12 {
        s.submit_normal(i % 4 == 3, "before the suite").await?;
    }
    let done = s.tasks[0].id;
    let view = s.client.wait(done, Duration::from_secs(60)).await?;
    if view.state != TaskState::Completed {
        bail!(
            "the first normal task ended {}: {:?}",
            view.state,
            view.error
        );
    }

    // Tasks that hold a dispatched step, for probes that name a real attempt.
    for i in 0..6 {
        let body: SubmitTask = serde_json::from_value(
            json!({"namespace": "badin", "template": "hold", "context": {"i": i}}),
        )?;
        let id = s.client.submit(&body).await?.task_id;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let view = s.client.task(id).await?;
            if let Some(step) = view.steps.first()
                && step.state == tasker_schemas::StepState::Dispatched
            {
                s.held.push((id, step.id, step.attempt));
                break;
            }
            if Instant::now() > deadline {
                bail!("the step of hold task {id} was not dispatched within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    hand_written_http(&mut s, done).await?;
    generated_http(&mut s, done, args.scale).await?;
    hand_written_amqp(&mut s).await?;
    let scaled = |e: Edge| ((e.generated_target() as f64) * args.scale).ceil() as usize;
    s.generated_amqp(
        Edge::Results,
        scaled(Edge::Results),
        amqp_body(
            results_base(),
            &[
                "task_id",
                "step_id",
                "attempt",
                "worker",
                "outcome",
                "lease_ms",
                "duration_ms",
                "results",
            ],
        ),
    )
    .await?;
    s.generated_amqp(
        Edge::Intake,
        scaled(Edge::Intake),
        amqp_body(
            intake_base(),
            &[
                "request_id",
                "namespace",
                "template",
                "version",
                "context",
                "idempotency_key",
                "priority",
                "task_id",
            ],
        ),
    )
    .await?;
    s.generated_amqp(
        Edge::DeadSteps,
        scaled(Edge::DeadSteps),
        amqp_body(
            step_base(),
            &[
                "task_id",
                "step_id",
                "attempt",
                "namespace",
                "queue",
                "context",
                "timeout_ms",
                "parent_outputs",
                "map_index",
                "failure",
            ],
        ),
    )
    .await?;
    s.check_alive().await?;
    let suite_done = t0.elapsed();

    // After the suite: a normal workflow through the same orchestrator, then every task.
    for _ in 0..3 {
        s.submit_normal(false, "after the suite").await?;
    }
    s.submit_normal(true, "after the suite").await?;
    let lost = verify(&mut s).await;
    s.check_alive().await?;
    let panics = s.orch.panics();
    s.tally.crashes += panics.len();
    s.orch.stop().await;
    listener.abort();
    let _ = conn.close(200, "done".into()).await;

    let t = &s.tally;
    for line in &t.unclear {
        eprintln!("[bad-inputs] NOT CLEAR: {line}");
    }
    for p in &panics {
        eprintln!("[bad-inputs] PANIC in the orchestrator's log: {p}");
    }
    let mut by_edge = t.by_edge.clone();
    for e in Edge::ALL {
        by_edge.entry(e.key()).or_insert(0);
    }
    let thin: Vec<&str> = by_edge
        .iter()
        .filter(|(_, n)| **n < 10)
        .map(|(k, _)| *k)
        .collect();
    eprintln!(
        "[bad-inputs] {} generated + {} hand-written cases, {} clear errors; valid inputs excluded: {:?}; suite {:.1} s, total {:.1} s",
        t.generated,
        t.hand_written,
        t.clear,
        t.valid_excluded,
        suite_done.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    let report = Report {
        config: "bad-inputs",
        bad_inputs: t.generated + t.hand_written,
        generated: t.generated,
        hand_written: t.hand_written,
        clear_errors: t.clear,
        crashes: t.crashes,
        hangs: t.hangs,
        lost,
        cases_by_edge: by_edge,
    };
    let mut pass = true;
    let mut fail = |why: String| {
        eprintln!("[bad-inputs] FAIL: {why}");
        pass = false;
    };
    if report.clear_errors != report.bad_inputs {
        fail(format!(
            "{} of {} cases were not clear errors (listed above)",
            report.bad_inputs - report.clear_errors,
            report.bad_inputs
        ));
    }
    if report.crashes + report.hangs + report.lost > 0 {
        fail(format!(
            "crashes {}, hangs {}, lost {}",
            report.crashes, report.hangs, report.lost
        ));
    }
    if report.generated < 1_000 || report.hand_written < 100 {
        fail(format!(
            "too few cases: {} generated (at least 1000), {} hand-written (at least 100)",
            report.generated, report.hand_written
        ));
    }
    if !thin.is_empty() {
        fail(format!("fewer than 10 cases for {thin:?}"));
    }
    if pass && !args.keep_log {
        let _ = std::fs::remove_file(&log);
    } else {
        eprintln!("[bad-inputs] orchestrator log: {}", log.display());
    }
    Ok((report, pass))
}

/// Waits for every task of the suite to complete; returns how many did not (lost).
async fn verify(s: &mut Suite) -> usize {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut lost = 0;
    let mut all: Vec<(TaskId, String, bool)> = s
        .tasks
        .iter()
        .map(|t| (t.id, t.how.clone(), true))
        .collect();
    all.extend(
        s.created
            .iter()
            .map(|id| (*id, "created by a generated submit".to_owned(), false)),
    );
    for (id, how, ours) in all {
        let left = deadline.saturating_duration_since(Instant::now());
        // A task submitted over AMQP exists once its request is applied.
        let mut view = None;
        while Instant::now() < deadline {
            match s.client.task(id).await {
                Ok(_) => {
                    view = s
                        .client
                        .wait(id, left.max(Duration::from_secs(1)))
                        .await
                        .ok();
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        match view {
            Some(v) if v.state == TaskState::Completed => {}
            // A generated submit may name another template (one a generated registration made):
            // it must exist, not complete.
            Some(v)
                if !ours && (v.namespace.as_str(), v.template.as_str()) != ("badin", "flow") => {}
            Some(v) => {
                lost += 1;
                eprintln!(
                    "[bad-inputs] LOST: task {id} ({how}) is {} ({:?})",
                    v.state, v.error
                );
            }
            None => {
                lost += 1;
                eprintln!("[bad-inputs] LOST: task {id} ({how}) not found or not finished in time");
            }
        }
    }
    for (id, _, _) in &s.held {
        if let Err(e) = s.client.task(*id).await {
            lost += 1;
            eprintln!("[bad-inputs] LOST: hold task {id}: {e}");
        }
    }
    eprintln!(
        "[bad-inputs] verified {} normal tasks and {} created by generated submits",
        s.tasks.len(),
        s.created.len()
    );
    lost
}

// ---------------------------------------------------------------------------------------------
// Generated HTTP cases.

async fn generated_http(s: &mut Suite, done: TaskId, scale: f64) -> Result<()> {
    let target = |e: Edge| ((e.generated_target() as f64) * scale).ceil() as usize;
    let ids = vec![done.to_string(), "not-a-task".to_owned()];

    // POST /v1/tasks (mutated submits) and GET /v1/tasks (queries), and other methods.
    let posts = (
        json_body(
            submit_body(1),
            &["priority", "version", "context", "namespace", "task_id"],
        ),
        content_type(),
    )
        .prop_map(|((body, what), ct)| {
            Req::post("/v1/tasks")
                .typed(ct.as_deref(), body)
                .note(&what)
        });
    let lists = query(&["limit", "after", "state", "namespace", "template"])
        .prop_map(|q| Req::get(format!("/v1/tasks?{q}")));
    let others = other_method(&["GET", "POST"]).prop_map(|m| Req::new(m, "/v1/tasks"));
    let tasks = prop_oneof![5 => posts, 4 => lists, 1 => others].boxed();
    s.generated_http(Edge::Tasks, target(Edge::Tasks), tasks)
        .await?;

    // GET /v1/tasks/{id}: bad ids, bad wait_ms, other methods.
    let shows =
        (segment(ids.clone()), prop::option::of(query(&["wait_ms"]))).prop_map(|(id, q)| {
            Req::get(match q {
                Some(q) => format!("/v1/tasks/{id}?{q}"),
                None => format!("/v1/tasks/{id}"),
            })
        });
    let others = (other_method(&["GET"]), segment(ids.clone()))
        .prop_map(|(m, id)| Req::new(m, format!("/v1/tasks/{id}")));
    let task = prop_oneof![4 => shows, 1 => others].boxed();
    s.generated_http(Edge::Task, target(Edge::Task), task)
        .await?;

    // POST /v1/tasks/{id}/cancel: bad ids (never a live task), bad bodies and content types.
    let cancels = (
        segment(ids.clone()),
        prop::option::of((
            json_body(json!({"reason": "bad inputs"}), &["reason"]),
            content_type(),
        )),
    )
        .prop_map(|(id, body)| {
            let req = Req::post(format!("/v1/tasks/{id}/cancel"));
            match body {
                Some(((b, what), ct)) => req.typed(ct.as_deref(), b).note(&what),
                None => req,
            }
        });
    let others = (other_method(&["POST"]), segment(ids.clone()))
        .prop_map(|(m, id)| Req::new(m, format!("/v1/tasks/{id}/cancel")));
    let cancel = prop_oneof![4 => cancels, 1 => others].boxed();
    s.generated_http(Edge::Cancel, target(Edge::Cancel), cancel)
        .await?;

    // POST /v1/tasks/{id}/retry.
    let retries = (segment(ids.clone()), prop::option::of(any_json())).prop_map(|(id, body)| {
        let req = Req::post(format!("/v1/tasks/{id}/retry"));
        match body {
            Some(b) => req.json(b.to_string()),
            None => req,
        }
    });
    let others = (other_method(&["POST"]), segment(ids.clone()))
        .prop_map(|(m, id)| Req::new(m, format!("/v1/tasks/{id}/retry")));
    let retry = prop_oneof![4 => retries, 1 => others].boxed();
    s.generated_http(Edge::Retry, target(Edge::Retry), retry)
        .await?;

    // POST /v1/tasks/{id}/signals/{name}: bad ids and names, bad bodies and content types
    // (never a live task: no signal is recorded).
    let names = vec![
        "approval".to_owned(),
        "has space".to_owned(),
        "x".repeat(200),
        "%00".to_owned(),
    ];
    let signals = (
        segment(ids.clone()),
        segment(names.clone()),
        prop::option::of((
            json_body(
                json!({"signal_id": "s-1", "payload": {"ok": true}}),
                &["signal_id", "payload"],
            ),
            content_type(),
        )),
    )
        .prop_map(|(id, name, body)| {
            let req = Req::post(format!("/v1/tasks/{id}/signals/{name}"));
            match body {
                Some(((b, what), ct)) => req.typed(ct.as_deref(), b).note(&what),
                None => req,
            }
        });
    let others = (
        other_method(&["POST"]),
        segment(ids.clone()),
        segment(names),
    )
        .prop_map(|(m, id, name)| Req::new(m, format!("/v1/tasks/{id}/signals/{name}")));
    let signal = prop_oneof![4 => signals, 1 => others].boxed();
    s.generated_http(Edge::Signals, target(Edge::Signals), signal)
        .await?;

    // GET /v1/tasks/{id}/steps/{step}/instances.
    let steps = vec!["a".to_owned(), "b".to_owned(), "nope".to_owned()];
    let lists = (
        segment(ids.clone()),
        segment(steps.clone()),
        prop::option::of(query(&["after", "limit"])),
    )
        .prop_map(|(id, step, q)| {
            let path = format!("/v1/tasks/{id}/steps/{step}/instances");
            Req::get(match q {
                Some(q) => format!("{path}?{q}"),
                None => path,
            })
        });
    let others = (other_method(&["GET"]), segment(ids.clone()), segment(steps))
        .prop_map(|(m, id, step)| Req::new(m, format!("/v1/tasks/{id}/steps/{step}/instances")));
    let instances = prop_oneof![4 => lists, 1 => others].boxed();
    s.generated_http(Edge::Instances, target(Edge::Instances), instances)
        .await?;

    // POST /v1/templates (mutated valid templates), GET /v1/templates?query.
    let registers = (json_body(template_body(), &["version"]), content_type()).prop_map(
        |((body, what), ct)| {
            Req::post("/v1/templates")
                .typed(ct.as_deref(), body)
                .note(&what)
        },
    );
    let lists =
        query(&["namespace", "version"]).prop_map(|q| Req::get(format!("/v1/templates?{q}")));
    let others = other_method(&["GET", "POST"]).prop_map(|m| Req::new(m, "/v1/templates"));
    let templates = prop_oneof![6 => registers, 2 => lists, 1 => others].boxed();
    s.generated_http(Edge::Templates, target(Edge::Templates), templates)
        .await?;

    // GET /v1/templates/{namespace}/{name}.
    let names = vec![
        "badin".to_owned(),
        "flow".to_owned(),
        "badtpl".to_owned(),
        "t".to_owned(),
    ];
    let shows = (
        segment(names.clone()),
        segment(names.clone()),
        prop::option::of(query(&["version"])),
    )
        .prop_map(|(ns, name, q)| {
            let path = format!("/v1/templates/{ns}/{name}");
            Req::get(match q {
                Some(q) => format!("{path}?{q}"),
                None => path,
            })
        });
    let others = (other_method(&["GET"]), segment(names))
        .prop_map(|(m, ns)| Req::new(m, format!("/v1/templates/{ns}/flow")));
    let template = prop_oneof![4 => shows, 1 => others].boxed();
    s.generated_http(Edge::Template, target(Edge::Template), template)
        .await?;

    // POST /v1/schedules (mutated valid schedules), GET /v1/schedules?query, other methods.
    let creates = (
        json_body(
            schedule_body(),
            &[
                "cron", "timezone", "catch_up", "name", "context", "template",
            ],
        ),
        content_type(),
    )
        .prop_map(|((body, what), ct)| {
            Req::post("/v1/schedules")
                .typed(ct.as_deref(), body)
                .note(&what)
        });
    let lists = query(&["namespace", "limit"]).prop_map(|q| Req::get(format!("/v1/schedules?{q}")));
    let others = other_method(&["GET", "POST"]).prop_map(|m| Req::new(m, "/v1/schedules"));
    let schedules = prop_oneof![6 => creates, 2 => lists, 1 => others].boxed();
    s.generated_http(Edge::Schedules, target(Edge::Schedules), schedules)
        .await?;

    // /v1/schedules/{id}, /pause, /resume: bad and unknown ids, bodies, other methods.
    let schedule_ids = vec![
        uuid::Uuid::now_v7().to_string(),
        "not-a-schedule".to_owned(),
    ];
    let actions = (
        segment(schedule_ids.clone()),
        prop_oneof![Just(""), Just("/pause"), Just("/resume")],
        prop::option::of(any_json()),
    )
        .prop_map(|(id, action, body)| {
            let req = if action.is_empty() {
                Req::get(format!("/v1/schedules/{id}"))
            } else {
                Req::post(format!("/v1/schedules/{id}{action}"))
            };
            match body {
                Some(b) => req.json(b.to_string()),
                None => req,
            }
        });
    let others = (
        other_method(&["GET", "DELETE"]),
        segment(schedule_ids.clone()),
    )
        .prop_map(|(m, id)| Req::new(m, format!("/v1/schedules/{id}")));
    let deletes = segment(schedule_ids)
        .prop_map(|id| Req::new(Method::DELETE, format!("/v1/schedules/{id}")));
    let schedule = prop_oneof![4 => actions, 1 => others, 1 => deletes].boxed();
    s.generated_http(Edge::Schedule, target(Edge::Schedule), schedule)
        .await?;

    // /health, /ready, /metrics, /v1/workers: every method they lack, with and without bodies.
    for (edge, path) in [
        (Edge::Health, "/health"),
        (Edge::Ready, "/ready"),
        (Edge::Metrics, "/metrics"),
        (Edge::Workers, "/v1/workers"),
    ] {
        let strategy = (
            other_method(&["GET"]),
            prop::option::of(any_json()),
            prop::option::of(query(&["x"])),
        )
            .prop_map(move |(m, body, q)| {
                let path = match q {
                    Some(q) => format!("{path}?{q}"),
                    None => path.to_owned(),
                };
                match body {
                    Some(b) => Req::new(m, path).json(b.to_string()),
                    None => Req::new(m, path),
                }
            })
            .boxed();
        s.generated_http(edge, target(edge), strategy).await?;
    }

    // Keys, audit, namespace settings, purge: arbitrary bodies, queries and ids.
    let access = prop_oneof![
        (any_json(), prop::option::of(any_json())).prop_map(|(role, ns)| {
            let body = match ns {
                Some(ns) => json!({"role": role, "namespaces": ns}),
                None => json!({"role": role}),
            };
            Req::post("/v1/keys").json(body.to_string())
        }),
        "[a-z0-9%-]{0,40}".prop_map(|id| Req::post(format!("/v1/keys/{id}/revoke"))),
        query(&["task_id", "namespace", "action", "before", "limit"])
            .prop_map(|q| Req::get(format!("/v1/audit?{q}"))),
        (segment(vec!["badin".into()]), any_json()).prop_map(|(ns, b)| {
            Req::new(Method::PUT, format!("/v1/namespaces/{ns}"))
                .json(json!({ "retention_ms": b }).to_string())
        }),
        "[a-z0-9-]{0,40}".prop_map(|id| Req::post(format!("/v1/tasks/{id}/purge"))),
        other_method(&["GET", "POST"]).prop_map(|m| Req::new(m, "/v1/keys")),
    ]
    .boxed();
    s.generated_http(Edge::Access, target(Edge::Access), access)
        .await?;

    // Paths without a route.
    let unknown = prop_oneof![
        "/[a-z]{1,10}(/[a-z0-9]{0,8}){0,3}".prop_map(|p| p.to_owned()),
        "/v1/[a-z]{1,10}(/[a-z0-9%]{0,8}){0,2}",
        (
            "/v1/tasks/[a-z0-9-]{1,36}/[a-z]{1,8}/[a-z]{1,8}",
            any::<bool>()
        )
            .prop_map(|(p, _)| p),
        "/v[2-9]/tasks(/[a-z0-9]{1,8})?",
        "/v1/templates/[a-z]{1,8}/[a-z]{1,8}/[a-z]{1,8}",
    ]
    .prop_filter("no route", |p| {
        !matches!(p.as_str(), "/health" | "/ready" | "/metrics")
    })
    .prop_map(Req::get)
    .boxed();
    s.generated_http(Edge::NoRoute, target(Edge::NoRoute), unknown)
        .await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Hand-written cases.

async fn hand_written_http(s: &mut Suite, done: TaskId) -> Result<()> {
    use Edge::*;
    let hand = Origin::HandWritten;
    let random = || {
        uuid::Builder::from_random_bytes(rand::random())
            .into_uuid()
            .to_string()
    };
    let v4 = random();
    let body = |v: Value| v.to_string().into_bytes();
    let submit = |extra: Value| {
        let mut b = submit_body(0);
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            b[&k] = v;
        }
        b.to_string().into_bytes()
    };
    let nested = |depth: usize| format!("{}{}", "[".repeat(depth), "]".repeat(depth));

    // Conflicts need a first request that is accepted: those tasks must complete too.
    let first = SubmitTask {
        idempotency_key: Some(format!("{}-key", s.run)),
        ..serde_json::from_value(submit_body(100))?
    };
    let first = s.client.submit(&first).await?.task_id;
    s.tasks.push(Submitted {
        id: first,
        how: "HTTP, idempotency base".into(),
    });
    let chosen = TaskId::new();
    let second = s
        .client
        .submit(&SubmitTask {
            task_id: Some(chosen),
            ..serde_json::from_value(submit_body(101))?
        })
        .await?
        .task_id;
    s.tasks.push(Submitted {
        id: second,
        how: "HTTP, task_id base".into(),
    });
    s.chosen = Some(chosen);

    let big_context = format!(
        "{{\"namespace\":\"badin\",\"template\":\"flow\",\"context\":{{\"x\":\"{}\"}}}}",
        "x".repeat(300 * 1024)
    );
    let over_limit = format!(
        "{{\"namespace\":\"badin\",\"template\":\"flow\",\"context\":{{\"x\":\"{}\"}}}}",
        "x".repeat(2 * 1024 * 1024 + 10)
    );
    let mut cases: Vec<(Edge, Req)> = Vec::new();
    // POST /v1/tasks
    cases.push((
        Tasks,
        Req::post("/v1/tasks").json("{").note("malformed JSON"),
    ));
    cases.push((Tasks, Req::post("/v1/tasks").json("").note("empty body")));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .typed(None, body(submit_body(0)))
            .note("no content type"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks").note("no body, no content type"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .typed(Some("text/plain"), body(submit_body(0)))
            .note("text/plain"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .typed(
                Some("application/x-www-form-urlencoded"),
                "namespace=badin&template=flow",
            )
            .note("a form"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(body(json!({"namespace": 5, "template": "flow"})))
            .note("namespace a number"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(submit(json!({"nope": 1})))
            .note("unknown field"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(body(json!({"namespace": "badin"})))
            .note("no template"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(body(json!({"template": "flow"})))
            .note("no namespace"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(body(json!({"namespace": "badin", "template": "nope"})))
            .note("unknown template"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(body(json!({"namespace": "nosuch", "template": "flow"})))
            .note("unknown namespace"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(submit(json!({"version": 99})))
            .note("unknown version"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(submit(json!({"version": -1})))
            .note("negative version"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(submit(json!({"version": 4_294_967_296u64})))
            .note("version over u32"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(submit(json!({"version": "1"})))
            .note("version a string"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(submit(json!({"priority": 40_000})))
            .note("priority over i16"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(submit(json!({"priority": -40_000})))
            .note("priority under i16"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(submit(json!({"priority": 1.5})))
            .note("priority fractional"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(submit(json!({"priority": null})))
            .note("priority null"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(submit(json!({"idempotency_key": ""})))
            .note("empty idempotency key"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(submit(json!({"idempotency_key": "k".repeat(257)})))
            .note("idempotency key of 257 bytes"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(submit(json!({"task_id": "not-a-uuid"})))
            .note("task_id not a UUID"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(submit(json!({"task_id": v4})))
            .note("task_id a UUIDv4"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(submit(
                json!({"task_id": "00000000-0000-0000-0000-000000000000"}),
            ))
            .note("task_id nil UUID"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(submit(json!({"namespace": "bad name!"})))
            .note("invalid namespace"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(submit(json!({"namespace": "n".repeat(129)})))
            .note("namespace of 129 characters"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(submit(json!({"template": ""})))
            .note("empty template"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(submit(json!({"context": {"x": "a\u{0}b"}})))
            .note("NUL in the context"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(submit(json!({"context": {"a\u{0}": 1}})))
            .note("NUL in a context key"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(format!(
                "{{\"namespace\":\"badin\",\"template\":\"flow\",\"context\":{}}}",
                nested(101)
            ))
            .note("context nested 101 levels"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(format!(
                "{{\"namespace\":\"badin\",\"template\":\"flow\",\"context\":{}}}",
                nested(5_000)
            ))
            .note("context nested 5000 levels"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(big_context.clone())
            .note("context of 300 KiB"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(over_limit.clone())
            .note("body over 2 MiB"),
    ));
    cases.push((Tasks, Req::post("/v1/tasks").json("[]").note("an array")));
    cases.push((Tasks, Req::post("/v1/tasks").json("null").note("null")));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json("{\"namespace\":\"badin\",\"template\":\"flow\",\"priority\":1e400}")
            .note("priority 1e400"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(vec![0xff, 0xfe, b'{', b'}'])
            .note("not UTF-8"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(submit(
                json!({"idempotency_key": format!("{}-key", s.run), "context": {"other": true}}),
            ))
            .note("idempotency conflict"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(submit(
                json!({"task_id": chosen.to_string(), "context": {"other": true}}),
            ))
            .note("task_id conflict"),
    ));
    cases.push((Tasks, Req::new(Method::DELETE, "/v1/tasks")));
    cases.push((
        Tasks,
        Req::new(Method::PUT, "/v1/tasks").json(body(submit_body(0))),
    ));
    cases.push((Tasks, Req::new(Method::PATCH, "/v1/tasks")));
    // GET /v1/tasks
    cases.push((Tasks, Req::get("/v1/tasks?limit=0")));
    cases.push((Tasks, Req::get("/v1/tasks?limit=501")));
    cases.push((Tasks, Req::get("/v1/tasks?limit=-1")));
    cases.push((Tasks, Req::get("/v1/tasks?limit=abc")));
    cases.push((Tasks, Req::get("/v1/tasks?limit=1e3")));
    cases.push((Tasks, Req::get("/v1/tasks?limit=99999999999999999999")));
    cases.push((Tasks, Req::get("/v1/tasks?state=bogus")));
    cases.push((Tasks, Req::get("/v1/tasks?state=")));
    cases.push((Tasks, Req::get("/v1/tasks?after=not-a-task")));
    cases.push((Tasks, Req::get("/v1/tasks?after=")));
    cases.push((Tasks, Req::get("/v1/tasks?limit=%FF")));
    cases.push((Tasks, Req::get("/v1/tasks?namespace=%00")));
    cases.push((Tasks, Req::get("/v1/tasks?template=fl%00ow")));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(submit(json!({"template": "fl\u{0}ow"})))
            .note("NUL in the template name"),
    ));
    cases.push((
        Tasks,
        Req::post("/v1/tasks")
            .json(submit(json!({"idempotency_key": "k\u{0}"})))
            .note("NUL in the idempotency key"),
    ));
    cases.push((Templates, Req::get("/v1/templates?namespace=%00")));
    cases.push((Template, Req::get("/v1/templates/badin/fl%00ow")));
    cases.push((Template, Req::get("/v1/templates/%00/flow")));
    cases.push((
        Instances,
        Req::get(format!("/v1/tasks/{done}/steps/%00/instances")),
    ));
    // GET /v1/tasks/{id}
    cases.push((Task, Req::get("/v1/tasks/not-a-task")));
    cases.push((Task, Req::get(format!("/v1/tasks/{}", random()))));
    cases.push((
        Task,
        Req::get("/v1/tasks/00000000-0000-0000-0000-000000000000"),
    ));
    cases.push((Task, Req::get(format!("/v1/tasks/{}", "7".repeat(2_000)))));
    cases.push((Task, Req::get("/v1/tasks/%FF")));
    cases.push((Task, Req::get(format!("/v1/tasks/{done}?wait_ms=soon"))));
    cases.push((Task, Req::get(format!("/v1/tasks/{done}?wait_ms=-1"))));
    cases.push((Task, Req::get(format!("/v1/tasks/{done}?wait_ms=1.5"))));
    cases.push((
        Task,
        Req::get(format!("/v1/tasks/{done}?wait_ms=18446744073709551616")),
    ));
    cases.push((
        Task,
        Req::get(format!("/v1/tasks/{}?wait_ms=100", random()))
            .note("long-poll of an unknown task"),
    ));
    cases.push((Task, Req::new(Method::PUT, format!("/v1/tasks/{done}"))));
    cases.push((Task, Req::new(Method::DELETE, format!("/v1/tasks/{done}"))));
    cases.push((Task, Req::post(format!("/v1/tasks/{done}")).json("{}")));
    // POST /v1/tasks/{id}/cancel
    cases.push((Cancel, Req::post("/v1/tasks/not-a-task/cancel")));
    cases.push((Cancel, Req::post(format!("/v1/tasks/{}/cancel", random()))));
    cases.push((
        Cancel,
        Req::post(format!("/v1/tasks/{done}/cancel")).note("a completed task"),
    ));
    cases.push((
        Cancel,
        Req::post(format!("/v1/tasks/{done}/cancel"))
            .json("{\"reason\": \"late\"}")
            .note("a completed task, with a reason"),
    ));
    cases.push((
        Cancel,
        Req::post(format!("/v1/tasks/{done}/cancel")).json("nope"),
    ));
    cases.push((
        Cancel,
        Req::post(format!("/v1/tasks/{done}/cancel")).json("{\"reason\": 5}"),
    ));
    cases.push((
        Cancel,
        Req::post(format!("/v1/tasks/{done}/cancel"))
            .json("")
            .note("empty JSON body"),
    ));
    cases.push((
        Cancel,
        Req::post(format!("/v1/tasks/{done}/cancel")).json("[\"reason\"]"),
    ));
    cases.push((
        Cancel,
        Req::post(format!("/v1/tasks/{done}/cancel")).typed(Some("text/plain"), "because"),
    ));
    cases.push((
        Cancel,
        Req::post(format!("/v1/tasks/{done}/cancel"))
            .json(over_limit.clone())
            .note("body over 2 MiB"),
    ));
    cases.push((Cancel, Req::post("/v1/tasks/%FF/cancel")));
    cases.push((Cancel, Req::get(format!("/v1/tasks/{done}/cancel"))));
    cases.push((
        Cancel,
        Req::new(Method::DELETE, format!("/v1/tasks/{done}/cancel")),
    ));
    // POST /v1/tasks/{id}/retry
    cases.push((Retry, Req::post("/v1/tasks/not-a-task/retry")));
    cases.push((Retry, Req::post(format!("/v1/tasks/{}/retry", random()))));
    cases.push((
        Retry,
        Req::post(format!("/v1/tasks/{done}/retry")).note("a completed task"),
    ));
    cases.push((
        Retry,
        Req::post(format!("/v1/tasks/{done}/retry"))
            .json("{\"x\": 1}")
            .note("a completed task, with a body"),
    ));
    cases.push((
        Retry,
        Req::post("/v1/tasks/00000000-0000-0000-0000-000000000000/retry"),
    ));
    cases.push((Retry, Req::post("/v1/tasks/%C0%AF/retry")));
    cases.push((
        Retry,
        Req::post(format!("/v1/tasks/{}/retry", "f".repeat(3_000))),
    ));
    cases.push((Retry, Req::get(format!("/v1/tasks/{done}/retry"))));
    cases.push((
        Retry,
        Req::new(Method::PUT, format!("/v1/tasks/{done}/retry")),
    ));
    cases.push((
        Retry,
        Req::new(Method::DELETE, format!("/v1/tasks/{done}/retry")),
    ));
    // POST /v1/tasks/{id}/signals/{name}
    let ok_signal = "{\"signal_id\": \"s-1\", \"payload\": {\"ok\": true}}";
    cases.push((
        Signals,
        Req::post("/v1/tasks/not-a-task/signals/approval").json(ok_signal),
    ));
    cases.push((
        Signals,
        Req::post(format!("/v1/tasks/{}/signals/approval", random())).json(ok_signal),
    ));
    cases.push((
        Signals,
        Req::post(format!("/v1/tasks/{done}/signals/approval"))
            .json(ok_signal)
            .note("a completed task"),
    ));
    cases.push((
        Signals,
        Req::post(format!("/v1/tasks/{done}/signals/approval")).note("no body"),
    ));
    cases.push((
        Signals,
        Req::post(format!("/v1/tasks/{done}/signals/approval"))
            .json("{\"payload\": 1}")
            .note("no signal_id"),
    ));
    cases.push((
        Signals,
        Req::post(format!("/v1/tasks/{done}/signals/approval"))
            .json(format!("{{\"signal_id\": \"{}\"}}", "s".repeat(300)))
            .note("a signal_id over 256 bytes"),
    ));
    cases.push((
        Signals,
        Req::post(format!("/v1/tasks/{done}/signals/approval"))
            .json("{\"signal_id\": \"a\\u0000b\"}")
            .note("a NUL in signal_id"),
    ));
    cases.push((
        Signals,
        Req::post(format!("/v1/tasks/{done}/signals/approval"))
            .json("{\"signal_id\": \"s\", \"payload\": 1, \"extra\": true}")
            .note("an unknown field"),
    ));
    cases.push((
        Signals,
        Req::post(format!("/v1/tasks/{done}/signals/has%20space")).json(ok_signal),
    ));
    cases.push((
        Signals,
        Req::post(format!("/v1/tasks/{done}/signals/{}", "n".repeat(3_000))).json(ok_signal),
    ));
    cases.push((
        Signals,
        Req::post(format!("/v1/tasks/{done}/signals/approval")).typed(Some("text/plain"), "yes"),
    ));
    cases.push((
        Signals,
        Req::get(format!("/v1/tasks/{done}/signals/approval")),
    ));
    cases.push((
        Signals,
        Req::new(Method::DELETE, format!("/v1/tasks/{done}/signals/approval")),
    ));
    // GET /v1/tasks/{id}/steps/{step}/instances
    cases.push((
        Instances,
        Req::get("/v1/tasks/not-a-task/steps/a/instances"),
    ));
    cases.push((
        Instances,
        Req::get(format!("/v1/tasks/{}/steps/a/instances", random())),
    ));
    cases.push((
        Instances,
        Req::get(format!("/v1/tasks/{done}/steps/a/instances")).note("not a mapped step"),
    ));
    cases.push((
        Instances,
        Req::get(format!("/v1/tasks/{done}/steps/nope/instances")).note("no such step"),
    ));
    cases.push((
        Instances,
        Req::get(format!("/v1/tasks/{done}/steps/a/instances?limit=0")),
    ));
    cases.push((
        Instances,
        Req::get(format!("/v1/tasks/{done}/steps/a/instances?limit=501")),
    ));
    cases.push((
        Instances,
        Req::get(format!("/v1/tasks/{done}/steps/a/instances?limit=abc")),
    ));
    cases.push((
        Instances,
        Req::get(format!("/v1/tasks/{done}/steps/a/instances?limit=-5")),
    ));
    cases.push((
        Instances,
        Req::get(format!("/v1/tasks/{done}/steps/a/instances?after=-1")),
    ));
    cases.push((
        Instances,
        Req::get(format!("/v1/tasks/{done}/steps/a/instances?after=abc")),
    ));
    cases.push((
        Instances,
        Req::get(format!(
            "/v1/tasks/{done}/steps/a/instances?after=4294967296"
        )),
    ));
    cases.push((
        Instances,
        Req::get(format!("/v1/tasks/{done}/steps/%FF/instances")),
    ));
    cases.push((
        Instances,
        Req::post(format!("/v1/tasks/{done}/steps/a/instances")).json("{}"),
    ));
    // POST /v1/templates
    cases.push((Templates, Req::post("/v1/templates").json("{")));
    cases.push((Templates, Req::post("/v1/templates").json("")));
    cases.push((
        Templates,
        Req::post("/v1/templates")
            .typed(None, body(template_body()))
            .note("no content type"),
    ));
    cases.push((
        Templates,
        Req::post("/v1/templates")
            .typed(Some("application/yaml"), FLOW)
            .note("YAML"),
    ));
    cases.push((
        Templates,
        Req::post("/v1/templates")
            .json(body(
                json!({"namespace": "badtpl", "name": "x", "version": 1, "steps": [], "nope": 1}),
            ))
            .note("unknown field"),
    ));
    cases.push((Templates, Req::post("/v1/templates").json(body(json!({"namespace": "badtpl", "name": "x", "version": 1, "steps": [{"name": "a", "handler": "h", "colour": "red"}]}))).note("unknown step field")));
    cases.push((Templates, Req::post("/v1/templates").json(body(json!({"namespace": "badtpl", "name": "x", "version": 0, "steps": [{"name": "a", "handler": "h"}]}))).note("version 0")));
    cases.push((Templates, Req::post("/v1/templates").json(body(json!({"namespace": "badtpl", "name": "x", "version": -1, "steps": [{"name": "a", "handler": "h"}]}))).note("version -1")));
    cases.push((Templates, Req::post("/v1/templates").json(body(json!({"namespace": "badtpl", "name": "x", "version": 1, "steps": [{"name": "a", "handler": "h", "depends_on": ["b"]}, {"name": "b", "handler": "h", "depends_on": ["a"]}]}))).note("a cycle")));
    cases.push((Templates, Req::post("/v1/templates").json(body(json!({"namespace": "badtpl", "name": "x", "version": 1, "steps": [{"name": "a", "handler": "h", "depends_on": ["zz"]}]}))).note("unknown dependency")));
    cases.push((Templates, Req::post("/v1/templates").json(body(json!({"namespace": "badtpl", "name": "x", "version": 1, "steps": [{"name": "a", "handler": "h"}, {"name": "a", "handler": "h"}]}))).note("duplicate step")));
    cases.push((Templates, Req::post("/v1/templates").json(body(json!({"namespace": "bad tpl", "name": "x", "version": 1, "steps": [{"name": "a", "handler": "h"}]}))).note("invalid namespace")));
    cases.push((Templates, Req::post("/v1/templates").json(body(json!({"namespace": "badtpl", "name": "x", "version": 1, "steps": [{"name": "a", "handler": "h", "retry": {"max_attempts": 5000}}]}))).note("max_attempts 5000")));
    cases.push((Templates, Req::post("/v1/templates").json(body(json!({"namespace": "badtpl", "name": "x", "version": 1, "steps": [{"name": "a", "handler": "h", "execution_timeout": "forever"}]}))).note("duration forever")));
    cases.push((Templates, Req::post("/v1/templates").json(body(json!({"namespace": "badtpl", "name": "x", "version": 1, "steps": [{"name": "a", "handler": "h", "execution_timeout": "30d"}]}))).note("duration 30 days")));
    cases.push((Templates, Req::post("/v1/templates").json(body(json!({"namespace": "badtpl", "name": "x", "version": 1, "steps": [{"name": "a", "handler": "h", "execution_timeout": -5}]}))).note("negative duration")));
    cases.push((
        Templates,
        Req::post("/v1/templates")
            .json(body(
                json!({"namespace": "badtpl", "name": "x", "version": 1, "steps": []}),
            ))
            .note("no steps"),
    ));
    cases.push((Templates, Req::post("/v1/templates").json(body(json!({"namespace": "badtpl", "name": "x", "version": 1, "steps": [{"name": "a", "handler": "h", "map": {"over": "nothing"}}]}))).note("map without a parent")));
    cases.push((Templates, Req::post("/v1/templates").json(body(json!({"namespace": "badtpl", "name": "x", "version": 1, "steps": [{"name": "a", "handler": "h", "workflow": {"name": "t"}}]}))).note("handler and workflow")));
    cases.push((
        Templates,
        Req::post("/v1/templates")
            .json({
                let mut t = template_body();
                t["description"] = json!("other content");
                body(t)
            })
            .note("same version, other content"),
    ));
    cases.push((
        Templates,
        Req::post("/v1/templates")
            .json(over_limit.clone())
            .note("body over 2 MiB"),
    ));
    cases.push((Templates, Req::get("/v1/templates?version=x")));
    cases.push((Templates, Req::get("/v1/templates?version=-1")));
    cases.push((Templates, Req::new(Method::DELETE, "/v1/templates")));
    cases.push((
        Templates,
        Req::new(Method::PUT, "/v1/templates").json(body(template_body())),
    ));
    // GET /v1/templates/{namespace}/{name}
    cases.push((Template, Req::get("/v1/templates/nosuch/nope")));
    cases.push((Template, Req::get("/v1/templates/badin/nope")));
    cases.push((Template, Req::get("/v1/templates/badin/flow?version=99")));
    cases.push((Template, Req::get("/v1/templates/badin/flow?version=x")));
    cases.push((Template, Req::get("/v1/templates/badin/flow?version=-1")));
    cases.push((
        Template,
        Req::get("/v1/templates/badin/flow?version=4294967296"),
    ));
    cases.push((Template, Req::get("/v1/templates/%FF/flow")));
    cases.push((
        Template,
        Req::get(format!("/v1/templates/{}/flow", "n".repeat(2_000))),
    ));
    cases.push((Template, Req::post("/v1/templates/badin/flow").json("{}")));
    cases.push((
        Template,
        Req::new(Method::DELETE, "/v1/templates/badin/flow"),
    ));
    // /health, /ready, /metrics
    cases.push((Health, Req::post("/health")));
    cases.push((Health, Req::new(Method::PUT, "/health").json("{}")));
    cases.push((Health, Req::new(Method::DELETE, "/health")));
    cases.push((Health, Req::new(Method::PATCH, "/health")));
    cases.push((Ready, Req::post("/ready")));
    cases.push((Ready, Req::new(Method::PUT, "/ready").json("{}")));
    cases.push((Ready, Req::new(Method::DELETE, "/ready")));
    cases.push((Ready, Req::new(Method::PATCH, "/ready")));
    cases.push((Metrics, Req::post("/metrics")));
    cases.push((Metrics, Req::new(Method::PUT, "/metrics").json("{}")));
    cases.push((Metrics, Req::new(Method::DELETE, "/metrics")));
    cases.push((Metrics, Req::new(Method::PATCH, "/metrics")));
    // /v1/workers (the worker registry) is read-only.
    cases.push((Workers, Req::post("/v1/workers")));
    cases.push((
        Workers,
        Req::post("/v1/workers").json("{\"worker\": \"w\"}"),
    ));
    cases.push((Workers, Req::new(Method::PUT, "/v1/workers").json("{}")));
    cases.push((Workers, Req::new(Method::DELETE, "/v1/workers")));
    cases.push((Workers, Req::new(Method::PATCH, "/v1/workers").json("[]")));
    // /v1/schedules: every field wrong in turn, unknown ids, out-of-range lists, other methods.
    let schedule = |extra: Value| {
        let mut b = schedule_body();
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            b[&k] = v;
        }
        b.to_string().into_bytes()
    };
    for (what, extra) in [
        ("no cron", json!({"cron": null})),
        ("cron with 4 fields", json!({"cron": "* * * *"})),
        ("cron with 8 fields", json!({"cron": "* * * * * * * *"})),
        ("minute 61", json!({"cron": "61 * * * *"})),
        (
            "cron too long",
            json!({"cron": "1,".repeat(100) + "2 * * * *"}),
        ),
        ("cron that never fires", json!({"cron": "0 0 31 2 *"})),
        ("cron with a NUL", json!({"cron": "0 3 1 1 *\u{0}"})),
        ("cron a number", json!({"cron": 5})),
        ("unknown time zone", json!({"timezone": "Mars/Olympus"})),
        (
            "time zone too long",
            json!({"timezone": "Europe/".to_owned() + &"x".repeat(100)}),
        ),
        ("time zone with a NUL", json!({"timezone": "UTC\u{0}"})),
        ("unknown catch-up", json!({"catch_up": "sometimes"})),
        ("unknown template", json!({"template": "nope"})),
        ("bad namespace", json!({"namespace": "bad ns"})),
        ("bad name", json!({"name": "a/b"})),
        ("empty name", json!({"name": ""})),
        (
            "context too large",
            json!({"context": {"x": "y".repeat(300_000)}}),
        ),
        ("unknown field", json!({"every": "1s"})),
    ] {
        cases.push((
            Schedules,
            Req::post("/v1/schedules").json(schedule(extra)).note(what),
        ));
    }
    cases.push((Schedules, Req::post("/v1/schedules")));
    cases.push((Schedules, Req::post("/v1/schedules").json("[]")));
    cases.push((Schedules, Req::get("/v1/schedules?limit=0")));
    cases.push((Schedules, Req::get("/v1/schedules?limit=501")));
    cases.push((Schedules, Req::get("/v1/schedules?limit=-1")));
    cases.push((Schedules, Req::get("/v1/schedules?namespace=a%00b")));
    cases.push((Schedules, Req::new(Method::PUT, "/v1/schedules").json("{}")));
    cases.push((Schedules, Req::new(Method::DELETE, "/v1/schedules")));
    let unknown_schedule = uuid::Uuid::now_v7();
    for path in [
        format!("/v1/schedules/{unknown_schedule}"),
        format!("/v1/schedules/{v4}"),
        "/v1/schedules/nope".to_owned(),
        format!("/v1/schedules/{}", "9".repeat(1_000)),
    ] {
        cases.push((Schedule, Req::get(path.clone())));
        cases.push((Schedule, Req::new(Method::DELETE, path.clone())));
        cases.push((Schedule, Req::post(format!("{path}/pause"))));
        cases.push((Schedule, Req::post(format!("{path}/resume"))));
        cases.push((Schedule, Req::new(Method::PUT, path.clone()).json("{}")));
        cases.push((Schedule, Req::get(format!("{path}/pause"))));
    }
    // Keys, audit, namespaces, purge.
    for body in [
        "{}",
        "{\"role\": \"root\", \"namespaces\": [\"a\"]}",
        "{\"role\": \"read\", \"namespaces\": []}",
        "{\"role\": \"read\", \"namespaces\": [\"*\", \"a\"]}",
        "{\"role\": \"read\", \"namespaces\": [\"a.b\"]}",
        "{\"role\": \"read\", \"namespaces\": [\"a\\u0000\"]}",
        "{\"role\": \"read\", \"namespaces\": [\"a\"], \"extra\": 1}",
        "{\"role\": 5, \"namespaces\": \"a\"}",
    ] {
        cases.push((Access, Req::post("/v1/keys").json(body)));
    }
    let long_name = format!(
        "{{\"role\": \"read\", \"namespaces\": [\"a\"], \"name\": \"{}\"}}",
        "n".repeat(200)
    );
    cases.push((Access, Req::post("/v1/keys").json(long_name)));
    let many = (0..101)
        .map(|i| format!("\"n{i}\""))
        .collect::<Vec<_>>()
        .join(",");
    cases.push((
        Access,
        Req::post("/v1/keys").json(format!("{{\"role\": \"read\", \"namespaces\": [{many}]}}")),
    ));
    cases.push((Access, Req::post("/v1/keys/not-a-uuid/revoke")));
    cases.push((
        Access,
        Req::post(format!("/v1/keys/{}/revoke", uuid::Uuid::now_v7())),
    ));
    cases.push((Access, Req::new(Method::DELETE, "/v1/keys")));
    cases.push((Access, Req::get("/v1/keys?revoked=maybe")));
    cases.push((Access, Req::get("/v1/audit?limit=0")));
    cases.push((Access, Req::get("/v1/audit?limit=100000")));
    cases.push((Access, Req::get("/v1/audit?task_id=nope")));
    cases.push((Access, Req::get("/v1/audit?before=x")));
    cases.push((Access, Req::get("/v1/audit?namespace=a%00b")));
    cases.push((
        Access,
        Req::get(format!("/v1/audit?action={}", "a".repeat(100))),
    ));
    cases.push((
        Access,
        Req::new(Method::PUT, "/v1/namespaces/badin").json("{\"retention_ms\": 0}"),
    ));
    cases.push((
        Access,
        Req::new(Method::PUT, "/v1/namespaces/badin").json("{\"retention_ms\": -5}"),
    ));
    cases.push((
        Access,
        Req::new(Method::PUT, "/v1/namespaces/badin").json("{\"retention_ms\": 1e30}"),
    ));
    cases.push((
        Access,
        Req::new(Method::PUT, "/v1/namespaces/badin").json("{\"retention_ms\": 99999999999999999}"),
    ));
    cases.push((
        Access,
        Req::new(Method::PUT, "/v1/namespaces/a.b").json("{\"retention_ms\": 5}"),
    ));
    cases.push((
        Access,
        Req::new(Method::PUT, "/v1/namespaces/badin").json("[]"),
    ));
    cases.push((Access, Req::post("/v1/namespaces/badin").json("{}")));
    cases.push((
        Access,
        Req::post(format!("/v1/tasks/{}/purge", TaskId::new())),
    ));
    cases.push((Access, Req::post("/v1/tasks/x/purge")));
    cases.push((Access, Req::get(format!("/v1/tasks/{done}/purge"))));
    // No route
    cases.push((NoRoute, Req::get("/nope")));
    cases.push((NoRoute, Req::get("/v1/nope")));
    cases.push((NoRoute, Req::get("/v1")));
    cases.push((NoRoute, Req::get("/v1/")));
    cases.push((NoRoute, Req::get("/v2/tasks")));
    cases.push((NoRoute, Req::get("/V1/TASKS")));
    cases.push((NoRoute, Req::get("/v1/tasks/x/y/z")));
    cases.push((NoRoute, Req::get(format!("/v1/tasks/{done}/steps"))));
    cases.push((NoRoute, Req::get("/v1/templates/a/b/c")));
    cases.push((NoRoute, Req::post("/v1/tasks/x/steps/a/instances/more")));
    cases.push((NoRoute, Req::get("/v1/templates/badin")));
    cases.push((NoRoute, Req::get(format!("/{}", "z".repeat(4_000)))));
    for (edge, req) in cases {
        s.http_case(hand, edge, req).await?;
    }
    // A cancel whose reason has a NUL, of a live task: refused or accepted, never a fault.
    let (held, _, _) = s.held[5];
    let req = Req::post(format!("/v1/tasks/{held}/cancel"))
        .json(body(json!({"reason": "a\u{0}b"})))
        .note("a live task, NUL in the reason");
    s.http_case(Origin::Probe, Cancel, req).await?;
    Ok(())
}

async fn hand_written_amqp(s: &mut Suite) -> Result<()> {
    use Edge::*;
    let id = |n: u128| uuid(n);
    let mut v7 = uuid::Uuid::now_v7().to_string();
    let result = |attempt: Mp, worker: Mp, outcome: Value| {
        let mut p = Mp::from_json(
            &json!({"task_id": id(1), "step_id": id(2), "worker": "w", "outcome": outcome}),
        );
        p.set("attempt", attempt);
        p.set("worker", worker);
        envelope("result", p, 3).encode()
    };
    let ok = json!({"status": "succeeded", "output": {"ok": true}});
    let lease = |kind: &str, lease_ms: Mp| {
        let mut p = Mp::from_json(
            &json!({"task_id": id(1), "step_id": id(2), "attempt": 1, "worker": "w"}),
        );
        p.set("lease_ms", lease_ms);
        envelope(kind, p, 4).encode()
    };
    let request = |payload: Value| envelope("task_request", Mp::from_json(&payload), 5).encode();
    let flow = |extra: Value| {
        let mut p = json!({"request_id": uuid::Uuid::now_v7().to_string(), "namespace": "badin", "template": "flow"});
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            p[&k] = v;
        }
        request(p)
    };
    let step = |payload: Value| envelope("step", Mp::from_json(&payload), 6).encode();
    let a_step = json!({
        "task_id": id(1), "step_id": id(2), "namespace": "badin", "template": "flow", "step": "a",
        "handler": "work", "queue": "badin", "attempt": 1, "idempotency_key": "k", "context": {},
        "timeout_ms": 1000, "result_routing_key": "badin.0",
    });
    let with = |base: &Value, key: &str, value: Value| {
        let mut b = base.clone();
        b[key] = value;
        b
    };
    let without = |base: &Value, key: &str| {
        let mut b = base.clone();
        b.as_object_mut().map(|m| m.remove(key));
        b
    };
    let valid_result = result(Mp::UInt(1), Mp::s("w"), ok.clone());
    let mut deep =
        Mp::from_json(&json!({"task_id": id(1), "step_id": id(2), "attempt": 1, "worker": "w"}));
    deep.set(
        "outcome",
        Mp::Map(vec![
            (Mp::s("status"), Mp::s("succeeded")),
            (Mp::s("output"), Mp::nested(120)),
        ]),
    );
    let deep = envelope("result", deep, 7).encode();
    let mut non_string_key = Mp::from_json(
        &json!({"task_id": id(1), "step_id": id(2), "attempt": 1, "worker": "w", "outcome": ok}),
    );
    if let Mp::Map(e) = &mut non_string_key {
        e.push((Mp::UInt(7), Mp::s("x")));
    }
    let non_string_key = envelope("result", non_string_key, 8).encode();
    let mut bin_id =
        Mp::from_json(&json!({"step_id": id(2), "attempt": 1, "worker": "w", "lease_ms": 10}));
    bin_id.set("task_id", Mp::Bin(vec![7; 16]));
    let bin_id = envelope("heartbeat", bin_id, 9).encode();
    let mut bad_entry = Mp::from_json(&json!({"results": [
        {"task_id": id(1), "step_id": id(2), "attempt": 1, "worker": "w", "outcome": {"status": "succeeded"}},
        {"task_id": id(1), "step_id": id(2), "worker": "w", "outcome": {"status": "succeeded"}},
    ]}));
    bad_entry.set("x", Mp::Nil);
    let bad_entry = envelope("result_batch", bad_entry, 10).encode();
    let huge = {
        let mut m = Mp::from_json(
            &json!({"task_id": id(1), "step_id": id(2), "attempt": 1, "worker": "w"}),
        );
        m.set(
            "outcome",
            Mp::Map(vec![
                (Mp::s("status"), Mp::s("succeeded")),
                (
                    Mp::s("output"),
                    Mp::Str("o".repeat(MAX_WORKER_MESSAGE_BYTES)),
                ),
            ]),
        );
        envelope("result", m, 11).encode()
    };
    let text_version = |v: &str| {
        let mut m = Mp::from_json(&json!({"kind": "result", "message_id": id(12), "payload": {}}));
        m.set("schema_version", Mp::s(v));
        m.encode()
    };
    // A UUIDv4 where a UUIDv7 is wanted.
    v7.replace_range(14..15, "4");

    // Results that name a real dispatched attempt (one hold task each), with values the
    // database cannot store as they are.
    let real = |i: usize, kind: &str, payload: Value| {
        let (task, step, attempt) = s.held[i];
        let mut p = json!({"task_id": task.to_string(), "step_id": step.to_string(), "attempt": attempt, "worker": "w"});
        for (k, v) in payload.as_object().cloned().unwrap_or_default() {
            p[&k] = v;
        }
        envelope(kind, Mp::from_json(&p), 20 + i as u128).encode()
    };
    let chosen = s.chosen.map(|c| c.to_string()).unwrap_or_default();
    let mut probes = vec![
        Msg::probe(
            Results,
            real(0, "started", json!({"worker": "w\u{0}x", "lease_ms": 1000})),
            "started of a real attempt, NUL in the worker",
        ),
        Msg::probe(
            Results,
            real(
                1,
                "result",
                json!({"outcome": {"status": "failed", "message": "a\u{0}b", "retryable": false}}),
            ),
            "failure of a real attempt, NUL in the message",
        ),
        Msg::probe(
            Results,
            real(
                2,
                "result",
                json!({"outcome": {"status": "handler_missing", "handler": "h\u{0}"}}),
            ),
            "handler_missing of a real attempt, NUL in the handler",
        ),
        Msg::probe(
            Results,
            real(3, "started", json!({"lease_ms": u64::MAX})),
            "started of a real attempt, lease_ms u64::MAX",
        ),
        Msg::probe(
            Results,
            real(
                4,
                "result",
                json!({"worker": "w\u{0}", "outcome": {"status": "succeeded", "output": {"ok": true}}}),
            ),
            "success of a real attempt, NUL in the worker",
        ),
        Msg::probe(
            Intake,
            flow(json!({"template": "fl\u{0}ow"})),
            "NUL in the template name",
        ),
        Msg::probe(
            Intake,
            flow(json!({"idempotency_key": "k\u{0}"})),
            "NUL in the idempotency key",
        ),
        Msg::probe(
            Intake,
            flow(json!({"namespace": "nosuch", "template": "fl\u{0}ow"})),
            "unknown namespace, NUL in the template name",
        ),
    ];
    let mut msgs = Vec::new();
    msgs.push(Msg::hand(
        Intake,
        flow(json!({"task_id": chosen, "context": {"other": true}})),
        "task_id conflict",
    ));
    // Results queue
    msgs.push(Msg::hand(Results, Vec::new(), "empty body"));
    msgs.push(Msg::hand(
        Results,
        b"{\"kind\":\"result\"}".to_vec(),
        "JSON text",
    ));
    msgs.push(Msg::hand(
        Results,
        Mp::Arr(vec![Mp::s("result"), Mp::s("1.1")]).encode(),
        "an array envelope",
    ));
    msgs.push(Msg::hand(
        Results,
        valid_result[..valid_result.len() / 2].to_vec(),
        "truncated result",
    ));
    msgs.push(Msg::hand(
        Results,
        [valid_result.clone(), vec![0xc0]].concat(),
        "one trailing byte",
    ));
    msgs.push(Msg::hand(
        Results,
        Mp::Map(vec![(Mp::s("schema_version"), Mp::s("1.1"))]).encode(),
        "no kind",
    ));
    msgs.push(Msg::hand(
        Results,
        Mp::Map(vec![
            (Mp::s("kind"), Mp::UInt(3)),
            (Mp::s("schema_version"), Mp::s("1.1")),
        ])
        .encode(),
        "kind a number",
    ));
    msgs.push(Msg::hand(
        Results,
        text_version("1"),
        "schema_version \"1\"",
    ));
    msgs.push(Msg::hand(
        Results,
        text_version("2.0"),
        "schema_version \"2.0\"",
    ));
    msgs.push(Msg::hand(
        Results,
        text_version("+1.0"),
        "schema_version \"+1.0\"",
    ));
    msgs.push(Msg::hand(
        Results,
        encode_payload(tasker_schemas::Cancel {
            task_id: TaskId::new(),
            reason: None,
        })?,
        "a cancel on the results queue",
    ));
    msgs.push(Msg::hand(
            Results,
            {
                let mut m = Mp::from_json(
                    &json!({"kind": "bogus", "schema_version": "1.1", "message_id": id(13), "payload": {}}),
                );
                m.set("x", Mp::Nil);
                m.encode()
            },
            "unknown kind",
        ));
    msgs.push(Msg::hand(
            Results,
            {
                let mut m = Mp::from_json(
                    &json!({"kind": "result", "schema_version": "1.1", "message_id": "nope"}),
                );
                m.set("payload", Mp::from_json(&json!({"task_id": id(1), "step_id": id(2), "attempt": 1, "worker": "w", "outcome": ok})));
                m.encode()
            },
            "message_id not a UUID",
        ));
    msgs.push(Msg::hand(
        Results,
        envelope(
            "result",
            Mp::from_json(
                &json!({"task_id": id(1), "step_id": id(2), "worker": "w", "outcome": ok}),
            ),
            14,
        )
        .encode(),
        "no attempt",
    ));
    msgs.push(Msg::hand(
        Results,
        result(Mp::UInt(3_000_000_000), Mp::s("w"), ok.clone()),
        "attempt over i32",
    ));
    msgs.push(Msg::hand(
        Results,
        result(Mp::UInt(u64::MAX), Mp::s("w"), ok.clone()),
        "attempt u64::MAX",
    ));
    msgs.push(Msg::hand(
        Results,
        result(Mp::Int(-1), Mp::s("w"), ok.clone()),
        "attempt -1",
    ));
    msgs.push(Msg::hand(
        Results,
        result(Mp::F64(1.5), Mp::s("w"), ok.clone()),
        "attempt 1.5",
    ));
    msgs.push(Msg::hand(
        Results,
        result(Mp::UInt(1), Mp::Str("w".repeat(300)), ok.clone()),
        "worker of 300 bytes",
    ));
    msgs.push(Msg::hand(
        Results,
        result(Mp::UInt(1), Mp::RawStr(vec![0xff, 0xfe]), ok.clone()),
        "worker not UTF-8",
    ));
    msgs.push(Msg::hand(
        Results,
        result(Mp::UInt(1), Mp::s("w"), json!({"status": "weird"})),
        "unknown outcome status",
    ));
    msgs.push(Msg::hand(
        Results,
        result(Mp::UInt(1), Mp::s("w"), json!({"status": "failed"})),
        "failed without message",
    ));
    msgs.push(Msg::hand(
        Results,
        result(
            Mp::UInt(1),
            Mp::s("w"),
            json!({"status": "succeeded", "branches": "x"}),
        ),
        "branches not an array",
    ));
    msgs.push(Msg::hand(
        Results,
        bad_entry,
        "result_batch with one bad entry",
    ));
    msgs.push(Msg::hand(
        Results,
        lease("started", Mp::Int(-5)),
        "started with negative lease_ms",
    ));
    msgs.push(Msg::hand(
        Results,
        lease("heartbeat", Mp::s("soon")),
        "heartbeat with lease_ms a string",
    ));
    msgs.push(Msg::hand(Results, bin_id, "heartbeat with a bin task_id"));
    msgs.push(Msg::hand(
        Results,
        non_string_key,
        "a non-string key in the payload",
    ));
    msgs.push(Msg::hand(
        Results,
        deep,
        "output nested past the message depth limit",
    ));
    msgs.push(Msg::hand(Results, huge, "over 16 MiB"));
    // Task requests
    msgs.push(Msg::hand(Intake, Vec::new(), "empty body"));
    msgs.push(Msg::hand(Intake, b"namespace=badin".to_vec(), "text"));
    msgs.push(Msg::hand(Intake, step(a_step.clone()), "a step message"));
    msgs.push(Msg::hand(
        Intake,
        {
            let mut m = Mp::from_json(
                &json!({"kind": "task_request", "message_id": id(15), "payload": {}}),
            );
            m.set("schema_version", Mp::s("2.0"));
            m.encode()
        },
        "schema_version 2.0",
    ));
    msgs.push(Msg::hand(
        Intake,
        request(json!({"namespace": "badin", "template": "flow"})),
        "no request_id",
    ));
    msgs.push(Msg::hand(
        Intake,
        flow(json!({"template": "nope"})),
        "unknown template",
    ));
    msgs.push(Msg::hand(
        Intake,
        flow(json!({"version": 99})),
        "unknown version",
    ));
    msgs.push(Msg::hand(
        Intake,
        flow(json!({"version": -1})),
        "negative version",
    ));
    msgs.push(Msg::hand(
        Intake,
        flow(json!({"context": {"x": "a\u{0}b"}})),
        "NUL in the context",
    ));
    msgs.push(Msg::hand(
            Intake,
            flow(
                json!({"context": serde_json::from_str::<Value>(&format!("{}{}", "[".repeat(101), "]".repeat(101)))?}),
            ),
            "context nested 101 levels",
        ));
    msgs.push(Msg::hand(
        Intake,
        flow(json!({"context": {"x": "x".repeat(300 * 1024)}})),
        "context of 300 KiB",
    ));
    msgs.push(Msg::hand(
        Intake,
        flow(json!({"idempotency_key": "k".repeat(300)})),
        "idempotency key of 300 bytes",
    ));
    msgs.push(Msg::hand(
        Intake,
        flow(json!({"idempotency_key": ""})),
        "empty idempotency key",
    ));
    msgs.push(Msg::hand(
        Intake,
        flow(json!({"task_id": v7})),
        "task_id a UUIDv4",
    ));
    msgs.push(Msg::hand(
        Intake,
        flow(json!({"namespace": "bad name"})),
        "invalid namespace",
    ));
    msgs.push(Msg::hand(
        Intake,
        flow(json!({"template": ""})),
        "empty template",
    ));
    msgs.push(Msg::hand(
        Intake,
        flow(json!({"priority": 40_000})),
        "priority over i16",
    ));
    msgs.push(Msg::hand(
        Intake,
        flow(json!({"context": {"x": "x".repeat(2 * 1024 * 1024 + 10)}})),
        "over 2 MiB",
    ));
    // Dead steps
    msgs.push(Msg::hand(DeadSteps, Vec::new(), "empty body"));
    msgs.push(Msg::hand(DeadSteps, b"step".to_vec(), "text"));
    msgs.push(Msg::hand(
        DeadSteps,
        Mp::Arr(vec![Mp::s("step")]).encode(),
        "an array",
    ));
    msgs.push(Msg::hand(
        DeadSteps,
        {
            let b = step(a_step.clone());
            b[..b.len() - 3].to_vec()
        },
        "truncated step",
    ));
    msgs.push(Msg::hand(
        DeadSteps,
        [step(a_step.clone()), vec![1, 2]].concat(),
        "trailing bytes",
    ));
    msgs.push(Msg::hand(DeadSteps, valid_result.clone(), "a result"));
    msgs.push(Msg::hand(
        DeadSteps,
        {
            let mut m =
                Mp::from_json(&json!({"kind": "step", "message_id": id(16), "payload": a_step}));
            m.set("schema_version", Mp::s("9.0"));
            m.encode()
        },
        "schema_version 9.0",
    ));
    msgs.push(Msg::hand(
        DeadSteps,
        step(without(&a_step, "task_id")),
        "no task_id",
    ));
    msgs.push(Msg::hand(
        DeadSteps,
        step(with(&a_step, "attempt", json!("x"))),
        "attempt a string",
    ));
    msgs.push(Msg::hand(
        DeadSteps,
        step(with(&a_step, "attempt", json!(-1))),
        "attempt -1",
    ));
    msgs.push(Msg::hand(
        DeadSteps,
        step(with(&a_step, "step_id", json!("nope"))),
        "step_id not a UUID",
    ));
    msgs.push(Msg::hand(
        DeadSteps,
        step(with(&a_step, "map_index", json!(-3))),
        "negative map_index",
    ));
    msgs.push(Msg::hand(
        DeadSteps,
        {
            let mut m = Mp::from_json(&a_step);
            m.set("context", Mp::nested(200));
            envelope("step", m, 17).encode()
        },
        "context nested 200 levels",
    ));
    msgs.append(&mut probes);
    s.amqp_cases(msgs).await
}
