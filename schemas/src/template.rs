//! The workflow template: a DAG of steps with per-step retry and timeout policy.
//!
//! Templates are written in YAML (or sent as JSON over HTTP). Durations accept either an integer
//! number of milliseconds or a string with a unit (`"250ms"`, `"30s"`, `"5m"`, `"1h"`); they are
//! always written back as milliseconds.
//!
//! ```yaml
//! namespace: shop
//! name: order_fulfilment
//! version: 1
//! steps:
//!   - name: validate
//!     handler: validate_order
//!   - name: charge
//!     handler: charge_card
//!     depends_on: [validate]
//!     retry: { max_attempts: 5, initial_delay: 200ms, multiplier: 2.0, max_delay: 10s, jitter: 0.2 }
//! ```

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// Largest number of steps in one template.
pub const MAX_STEPS: usize = 10_000;
/// Longest name (namespace, template, step, handler, queue).
pub const MAX_NAME_LEN: usize = 128;
/// Longest description.
pub const MAX_DESCRIPTION_LEN: usize = 4_096;
/// Upper bound for any timeout or delay: 7 days.
pub const MAX_DURATION_MS: u64 = 7 * 24 * 3_600_000;
/// Upper bound for `max_attempts`.
pub const MAX_ATTEMPTS: u32 = 1_000;

/// Largest `map.max_parallel`: at most this many instances of one mapped step are created and
/// admitted in one transaction.
pub const MAX_MAP_PARALLEL: u32 = 1_000;
/// Default `map.max_parallel`.
pub const DEFAULT_MAP_PARALLEL: u32 = 100;
/// Largest `map.max_items`.
pub const MAX_MAP_ITEMS: u32 = 100_000;
/// Default `map.max_items`.
pub const DEFAULT_MAP_ITEMS: u32 = 10_000;
/// Most path segments in a `map.over`.
pub const MAX_PATH_SEGMENTS: usize = 32;

/// The queue a step goes to when its template names none.
pub const DEFAULT_QUEUE: &str = "default";

/// A duration in milliseconds. Deserializes from an integer (ms) or a string with a unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Millis(pub u64);

impl Millis {
    pub fn as_std(self) -> std::time::Duration {
        std::time::Duration::from_millis(self.0)
    }
}

impl Serialize for Millis {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Millis;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-negative number of milliseconds or a duration such as \"30s\"")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Millis, E> {
                Ok(Millis(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Millis, E> {
                u64::try_from(v)
                    .map(Millis)
                    .map_err(|_| E::custom(format!("duration must not be negative, got {v}")))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Millis, E> {
                if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v <= u64::MAX as f64 {
                    Ok(Millis(v as u64))
                } else {
                    Err(E::custom(format!(
                        "duration must be a whole non-negative number of milliseconds, got {v}"
                    )))
                }
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Millis, E> {
                parse_duration(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses `"250ms"`, `"30s"`, `"5m"`, `"1h"` or a bare number of milliseconds.
pub fn parse_duration(s: &str) -> Result<Millis, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. \"500ms\", \"30s\", \"5m\""))?;
    let factor = match unit.trim() {
        "" | "ms" => 1.0,
        "s" => 1_000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        other => {
            return Err(format!(
                "invalid duration unit {other:?} in {s:?}: use ms, s, m or h"
            ));
        }
    };
    let ms = value * factor;
    if !ms.is_finite() || ms < 0.0 || ms > u64::MAX as f64 {
        return Err(format!("duration {s:?} is out of range"));
    }
    Ok(Millis(ms.round() as u64))
}

/// Retry policy of a step: exponential backoff with a cap and jitter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included. 1 means no retry.
    pub max_attempts: u32,
    /// Delay before the second attempt.
    pub initial_delay: Millis,
    /// Each further delay is the previous one times this (≥ 1).
    pub multiplier: f64,
    /// No delay is longer than this.
    pub max_delay: Millis,
    /// Fraction in [0, 1]: a delay d becomes a uniform pick in [d·(1−jitter), d].
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_delay: Millis(1_000),
            multiplier: 2.0,
            max_delay: Millis(60_000),
            jitter: 0.1,
        }
    }
}

impl RetryPolicy {
    /// The delay after the `failures`-th failure (1-based), before jitter, in milliseconds.
    pub fn base_delay_ms(&self, failures: u32) -> u64 {
        let exp = failures.saturating_sub(1).min(64) as i32;
        let d = self.initial_delay.0 as f64 * self.multiplier.powi(exp);
        d.min(self.max_delay.0 as f64).max(0.0) as u64
    }

    /// The delay after the `failures`-th failure with jitter applied; `unit` is a uniform pick in [0, 1).
    pub fn delay_ms(&self, failures: u32, unit: f64) -> u64 {
        let base = self.base_delay_ms(failures) as f64;
        let jitter = self.jitter.clamp(0.0, 1.0);
        (base * (1.0 - jitter * unit.clamp(0.0, 1.0))).round() as u64
    }
}

/// One step of a template.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepTemplate {
    pub name: String,
    /// The handler that runs it; empty (left out) for a child-workflow step.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub handler: String,
    /// The queue its messages go to; [`DEFAULT_QUEUE`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(default)]
    pub depends_on: Vec<String>,
    #[serde(default)]
    pub retry: RetryPolicy,
    /// How long a dispatched step may wait in its queue before a worker takes it.
    #[serde(default = "default_queue_wait_timeout")]
    pub queue_wait_timeout: Millis,
    /// How long one attempt may run once a worker took it.
    #[serde(default = "default_execution_timeout")]
    pub execution_timeout: Millis,
    /// A decision step: the direct children it may choose among. Its handler's result names the
    /// chosen ones (`branches`); the others are skipped (`"not chosen by <step>"`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decides: Vec<String>,
    /// When a step with several parents runs: `all` (default) needs every parent to succeed (a
    /// skipped parent skips it); `any` runs once every parent finished, none failed and at least
    /// one succeeded (skipped if all were skipped).
    #[serde(default, skip_serializing_if = "Join::is_all")]
    pub join: Join,
    /// Run one instance per element of an array in the (single) parent's output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map: Option<MapSpec>,
    /// Run another workflow as this step: a child task, whose output or error is this step's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<WorkflowRef>,
    /// A durable sleep: the step waits this long once ready, with no handler, then succeeds
    /// with `{"woke_at": "<RFC 3339>"}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleep: Option<Millis>,
    /// A durable sleep until a time: `<parent>.<path>` to an RFC 3339 time in a parent's
    /// output (the path syntax of `map.over`). A past time wakes at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sleep_until: Option<String>,
    /// Wait for a signal sent to the task (`POST /v1/tasks/{id}/signals/{name}`), with a timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_for: Option<WaitFor>,
}

/// `wait_for:` on a step: the signal it waits for and for how long.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaitFor {
    /// The signal's name (a name: 1-128 of `A-Z a-z 0-9 _ -`).
    pub signal: String,
    /// How long the step waits once it is ready (at most 7 days).
    pub timeout: Millis,
    /// The step's output when the timeout passes; absent (or `null`): the step fails instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<serde_json::Value>,
}

/// What a timed step (no handler, never queued) waits for, as stored with the step
/// (`steps.wait`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Wait {
    /// `sleep:` — wakes `ms` after the step became ready.
    Sleep { ms: u64 },
    /// `sleep_until:` — wakes at the time found at `<parent>.<path>`.
    SleepUntil { path: String },
    /// `wait_for:` — takes the oldest unconsumed signal `name`, or times out.
    Signal {
        name: String,
        timeout_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        default: Option<serde_json::Value>,
    },
}

impl Wait {
    /// The parent's name and the path into its output, for `sleep_until`.
    pub fn source(path: &str) -> (&str, Vec<&str>) {
        let mut parts = path.split('.');
        let parent = parts.next().unwrap_or_default();
        (parent, parts.collect())
    }
}

/// Deepest nesting of child workflows (a task's child is at depth 1).
pub const MAX_WORKFLOW_DEPTH: u32 = 8;

/// `workflow:` on a step: the template its child task runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkflowRef {
    /// The child's namespace; the parent task's when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    /// The newest registered version when the child is created, when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// The child's context: key → `<parent>.<path>` (or `item.<path>` / `item` in a mapped
    /// step). Absent: the parents' outputs by name (a mapped step's instance: `{"item": …,
    /// "index": …}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<BTreeMap<String, String>>,
}

/// How a step waits for its parents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Join {
    #[default]
    All,
    Any,
}

impl Join {
    pub fn is_all(&self) -> bool {
        *self == Join::All
    }
}

/// `map:` on a step: one instance per element of an array found in the parent's output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapSpec {
    /// `<parent>.<dotted path into its output>`; `<parent>` alone maps over the whole output.
    /// A segment of digits indexes an array.
    pub over: String,
    /// Instances dispatched at once, at most (1 to [`MAX_MAP_PARALLEL`]).
    #[serde(default = "default_map_parallel")]
    pub max_parallel: u32,
    /// Elements allowed (1 to [`MAX_MAP_ITEMS`]); a longer array fails the mapped step.
    #[serde(default = "default_map_items")]
    pub max_items: u32,
    /// Failed instances tolerated: their errors are recorded, `null` stands at their index in
    /// the output, and the task does not fail. Default 0: the first failed instance fails the
    /// task (fail fast).
    #[serde(default)]
    pub tolerate: u32,
}

fn default_map_parallel() -> u32 {
    DEFAULT_MAP_PARALLEL
}

fn default_map_items() -> u32 {
    DEFAULT_MAP_ITEMS
}

impl MapSpec {
    /// The parent's name and the path into its output.
    pub fn source(&self) -> (&str, Vec<&str>) {
        let mut parts = self.over.split('.');
        let parent = parts.next().unwrap_or_default();
        (parent, parts.collect())
    }
}

fn default_queue_wait_timeout() -> Millis {
    Millis(5 * 60_000)
}

fn default_execution_timeout() -> Millis {
    Millis(5 * 60_000)
}

impl StepTemplate {
    pub fn queue(&self) -> &str {
        self.queue.as_deref().unwrap_or(DEFAULT_QUEUE)
    }

    /// What the step waits for when it is a timed step (`sleep`, `sleep_until`, `wait_for`).
    pub fn wait(&self) -> Option<Wait> {
        if let Some(ms) = self.sleep {
            return Some(Wait::Sleep { ms: ms.0 });
        }
        if let Some(path) = &self.sleep_until {
            return Some(Wait::SleepUntil { path: path.clone() });
        }
        self.wait_for.as_ref().map(|w| Wait::Signal {
            name: w.signal.clone(),
            timeout_ms: w.timeout.0,
            default: w.default.clone(),
        })
    }

    /// A step that runs no handler: a child workflow or a timed step.
    pub fn has_no_handler(&self) -> bool {
        self.workflow.is_some() || self.wait().is_some()
    }
}

/// A workflow template: immutable once registered under (namespace, name, version).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    pub namespace: String,
    pub name: String,
    pub version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub steps: Vec<StepTemplate>,
    /// A step that runs once when a task of this template fails (compensation): its message
    /// carries the failed step's name and error (`failure`) and the outputs of the steps that
    /// succeeded (`parent_outputs`); its result is recorded and the task stays failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<FailureHandler>,
    /// A task of this template still live this long after it started is cancelled
    /// (`deadline exceeded`); a submit's `deadline` takes precedence. At most 7 days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Millis>,
}

/// The name of the step an `on_failure` handler runs as (no template step may use it).
pub const ON_FAILURE_STEP: &str = "on_failure";

/// `on_failure:` on a template.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureHandler {
    pub handler: String,
    /// The queue its message goes to; [`DEFAULT_QUEUE`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(default)]
    pub retry: RetryPolicy,
    #[serde(default = "default_queue_wait_timeout")]
    pub queue_wait_timeout: Millis,
    #[serde(default = "default_execution_timeout")]
    pub execution_timeout: Millis,
}

impl FailureHandler {
    /// The handler as a step of its own (named [`ON_FAILURE_STEP`]), for the checks and the
    /// queues every step gets.
    pub fn as_step(&self) -> StepTemplate {
        StepTemplate {
            name: ON_FAILURE_STEP.to_owned(),
            handler: self.handler.clone(),
            queue: self.queue.clone(),
            depends_on: Vec::new(),
            retry: self.retry.clone(),
            queue_wait_timeout: self.queue_wait_timeout,
            execution_timeout: self.execution_timeout,
            decides: Vec::new(),
            join: Join::All,
            map: None,
            workflow: None,
            sleep: None,
            sleep_until: None,
            wait_for: None,
        }
    }
}

/// Why a template is invalid. Every variant names what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TemplateError {
    #[error("{what} must not be empty")]
    EmptyName { what: String },
    #[error("{what} {name:?} is invalid: use 1-{MAX_NAME_LEN} characters from A-Z a-z 0-9 _ -")]
    InvalidName { what: String, name: String },
    #[error("version must be at least 1")]
    ZeroVersion,
    #[error("version {version} is too large: at most {max}", max = i32::MAX)]
    VersionTooLarge { version: u32 },
    #[error("the template has no steps")]
    NoSteps,
    #[error("the template has {count} steps; at most {MAX_STEPS} are allowed")]
    TooManySteps { count: usize },
    #[error("description is {len} bytes; at most {MAX_DESCRIPTION_LEN} are allowed")]
    DescriptionTooLong { len: usize },
    #[error("step name {name:?} is used more than once")]
    DuplicateStep { name: String },
    #[error("step {step:?} depends on unknown step {dependency:?}")]
    UnknownDependency { step: String, dependency: String },
    #[error("step {step:?} depends on itself")]
    SelfDependency { step: String },
    #[error("step {step:?} lists dependency {dependency:?} more than once")]
    DuplicateDependency { step: String, dependency: String },
    #[error("the steps form a cycle: {}", .cycle.join(" -> "))]
    Cycle { cycle: Vec<String> },
    #[error("no root step: every step depends on another")]
    NoRoot,
    #[error("step {step:?}: {problem}")]
    InvalidPolicy { step: String, problem: String },
    /// A problem with `decides`, `join` or `map`.
    #[error("step {step:?}: {problem}")]
    InvalidFlow { step: String, problem: String },
    #[error("deadline must be between 1 ms and 7 days, got {ms} ms")]
    InvalidDeadline { ms: u64 },
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn check_name(what: &str, name: &str) -> Result<(), TemplateError> {
    if name.is_empty() {
        return Err(TemplateError::EmptyName {
            what: what.to_owned(),
        });
    }
    if !valid_name(name) {
        return Err(TemplateError::InvalidName {
            what: what.to_owned(),
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Checks a namespace name (the same rule as every other name).
pub fn validate_namespace(namespace: &str) -> Result<(), TemplateError> {
    check_name("namespace", namespace)
}

/// Checks a name of any kind (`what`: "template", "step", ...): 1–128 of `A-Z a-z 0-9 _ -`.
pub fn validate_name(what: &str, name: &str) -> Result<(), TemplateError> {
    check_name(what, name)
}

impl Template {
    /// Parses JSON (for YAML, use a YAML deserializer such as serde-saphyr). Does not validate:
    /// call [`Template::validate`].
    pub fn from_json(json: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(json)
    }

    /// Checks everything that makes a template unusable; the error names the problem.
    pub fn validate(&self) -> Result<(), TemplateError> {
        check_name("namespace", &self.namespace)?;
        check_name("template name", &self.name)?;
        if self.version == 0 {
            return Err(TemplateError::ZeroVersion);
        }
        // Stored as a PostgreSQL integer: refused here, not wrapped or failed later.
        if i32::try_from(self.version).is_err() {
            return Err(TemplateError::VersionTooLarge {
                version: self.version,
            });
        }
        if let Some(d) = &self.description
            && d.len() > MAX_DESCRIPTION_LEN
        {
            return Err(TemplateError::DescriptionTooLong { len: d.len() });
        }
        if self.steps.is_empty() {
            return Err(TemplateError::NoSteps);
        }
        if self.steps.len() > MAX_STEPS {
            return Err(TemplateError::TooManySteps {
                count: self.steps.len(),
            });
        }
        let mut index: HashMap<&str, usize> = HashMap::with_capacity(self.steps.len());
        for (i, step) in self.steps.iter().enumerate() {
            check_name("step name", &step.name)?;
            if index.insert(step.name.as_str(), i).is_some() {
                return Err(TemplateError::DuplicateStep {
                    name: step.name.clone(),
                });
            }
        }
        if let Some(h) = &self.on_failure {
            if index.contains_key(ON_FAILURE_STEP) {
                return Err(TemplateError::InvalidFlow {
                    step: ON_FAILURE_STEP.to_owned(),
                    problem: format!(
                        "the name {ON_FAILURE_STEP:?} is the template's on_failure handler's: rename the step"
                    ),
                });
            }
            let step = h.as_step();
            check_name("handler of on_failure", &step.handler)?;
            if let Some(q) = &step.queue {
                check_name("queue of on_failure", q)?;
            }
            validate_policy(&step)?;
        }
        for step in &self.steps {
            if !step.has_no_handler() || !step.handler.is_empty() {
                check_name(&format!("handler of step {:?}", step.name), &step.handler)?;
            }
            if let Some(q) = &step.queue {
                check_name(&format!("queue of step {:?}", step.name), q)?;
            }
            let mut seen = std::collections::HashSet::new();
            for dep in &step.depends_on {
                if dep == &step.name {
                    return Err(TemplateError::SelfDependency {
                        step: step.name.clone(),
                    });
                }
                if !index.contains_key(dep.as_str()) {
                    return Err(TemplateError::UnknownDependency {
                        step: step.name.clone(),
                        dependency: dep.clone(),
                    });
                }
                if !seen.insert(dep.as_str()) {
                    return Err(TemplateError::DuplicateDependency {
                        step: step.name.clone(),
                        dependency: dep.clone(),
                    });
                }
            }
            validate_policy(step)?;
            self.validate_flow(step)?;
        }
        if !self.steps.iter().any(|s| s.depends_on.is_empty()) {
            // Every step has a parent, so there is a cycle; name it.
            if let Some(cycle) = self.find_cycle(&index) {
                return Err(TemplateError::Cycle { cycle });
            }
            return Err(TemplateError::NoRoot);
        }
        if let Some(cycle) = self.find_cycle(&index) {
            return Err(TemplateError::Cycle { cycle });
        }
        if let Some(d) = self.deadline
            && (d.0 == 0 || d.0 > MAX_DURATION_MS)
        {
            return Err(TemplateError::InvalidDeadline { ms: d.0 });
        }
        Ok(())
    }

    /// Finds one cycle (iterative DFS, safe for deep chains) and returns its step names, the first
    /// repeated at the end (`a -> b -> a`).
    fn find_cycle(&self, index: &HashMap<&str, usize>) -> Option<Vec<String>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            Open,
            Done,
        }
        let n = self.steps.len();
        let mut mark = vec![Mark::New; n];
        for start in 0..n {
            if mark[start] != Mark::New {
                continue;
            }
            // (node, next dependency to look at)
            let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
            mark[start] = Mark::Open;
            while let Some(&mut (node, ref mut next)) = stack.last_mut() {
                let deps = &self.steps[node].depends_on;
                if *next < deps.len() {
                    let dep = index[deps[*next].as_str()];
                    *next += 1;
                    match mark[dep] {
                        Mark::New => {
                            mark[dep] = Mark::Open;
                            stack.push((dep, 0));
                        }
                        Mark::Open => {
                            let pos = stack.iter().position(|&(s, _)| s == dep).unwrap_or(0);
                            // The stack walks child -> parent; print it parent -> child.
                            let mut cycle: Vec<String> = stack[pos..]
                                .iter()
                                .map(|&(s, _)| self.steps[s].name.clone())
                                .collect();
                            cycle.reverse();
                            cycle.push(cycle[0].clone());
                            return Some(cycle);
                        }
                        Mark::Done => {}
                    }
                } else {
                    mark[node] = Mark::Done;
                    stack.pop();
                }
            }
        }
        None
    }

    /// A stable digest of the template's meaning, used to tell "same content" from "different
    /// content" on re-registration. Defaults are filled in, so omitting a default changes nothing.
    pub fn content_hash(&self) -> String {
        // serde_json writes struct fields in declaration order: canonical for our own types.
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        hex::encode(Sha256::digest(bytes))
    }

    /// Step names mapped to the names of their children.
    pub fn children(&self) -> BTreeMap<&str, Vec<&str>> {
        let mut out: BTreeMap<&str, Vec<&str>> = self
            .steps
            .iter()
            .map(|s| (s.name.as_str(), Vec::new()))
            .collect();
        for s in &self.steps {
            for d in &s.depends_on {
                if let Some(c) = out.get_mut(d.as_str()) {
                    c.push(s.name.as_str());
                }
            }
        }
        out
    }
}

impl Template {
    /// `decides`, `join` and `map` of one step (names already known to exist).
    fn validate_flow(&self, step: &StepTemplate) -> Result<(), TemplateError> {
        let bad = |problem: String| TemplateError::InvalidFlow {
            step: step.name.clone(),
            problem,
        };
        let mut seen = std::collections::HashSet::new();
        for branch in &step.decides {
            if !seen.insert(branch.as_str()) {
                return Err(bad(format!("decides lists {branch:?} more than once")));
            }
            let is_child = self
                .steps
                .iter()
                .any(|s| s.name == *branch && s.depends_on.contains(&step.name));
            if !is_child {
                return Err(bad(format!(
                    "decides names {branch:?}, which is not a direct child (a step that depends_on {:?})",
                    step.name
                )));
            }
        }
        if step.join == Join::Any && step.depends_on.is_empty() {
            return Err(bad("join: any needs at least one parent".into()));
        }
        self.validate_wait(step)?;
        if let Some(w) = &step.workflow {
            if !step.handler.is_empty() {
                return Err(bad(
                    "a workflow step runs a child workflow, not a handler: leave out handler"
                        .into(),
                ));
            }
            if !step.decides.is_empty() {
                return Err(bad("a workflow step may not have decides".into()));
            }
            if let Some(ns) = &w.namespace {
                check_name("workflow.namespace", ns)?;
            }
            check_name("workflow.name", &w.name)?;
            if let Some(v) = w.version
                && (v == 0 || i32::try_from(v).is_err())
            {
                return Err(bad(format!(
                    "workflow.version must be between 1 and {}, got {v}",
                    i32::MAX
                )));
            }
            for (key, path) in w.context.iter().flatten() {
                let mut parts = path.split('.');
                let root = parts.next().unwrap_or_default();
                // An instance of a mapped step has its element, not its parent's outputs.
                let known = if step.map.is_some() {
                    root == "item"
                } else {
                    step.depends_on.iter().any(|d| d == root)
                };
                if key.is_empty() || !known || parts.any(str::is_empty) {
                    return Err(bad(format!(
                        "workflow.context.{key}: {path:?} must be <parent>.<path> with a parent in depends_on{}",
                        if step.map.is_some() {
                            ", or item.<path>"
                        } else {
                            ""
                        }
                    )));
                }
            }
        }
        let Some(map) = &step.map else {
            return Ok(());
        };
        if !step.decides.is_empty() {
            return Err(bad("a mapped step may not have decides".into()));
        }
        if step.depends_on.len() != 1 {
            return Err(bad(format!(
                "a mapped step needs exactly one parent (depends_on), it has {}",
                step.depends_on.len()
            )));
        }
        let (parent, path) = map.source();
        if parent != step.depends_on[0] {
            return Err(bad(format!(
                "map.over {:?} must start with the parent's name, {:?}",
                map.over, step.depends_on[0]
            )));
        }
        if path.len() > MAX_PATH_SEGMENTS
            || path.iter().any(|p| p.is_empty() || p.len() > MAX_NAME_LEN)
        {
            return Err(bad(format!(
                "map.over {:?} is not a path: use <parent>.<key>.<key> (at most {MAX_PATH_SEGMENTS} non-empty keys of at most {MAX_NAME_LEN} bytes)",
                map.over
            )));
        }
        if !(1..=MAX_MAP_PARALLEL).contains(&map.max_parallel) {
            return Err(bad(format!(
                "map.max_parallel must be between 1 and {MAX_MAP_PARALLEL}, got {}",
                map.max_parallel
            )));
        }
        if !(1..=MAX_MAP_ITEMS).contains(&map.max_items) {
            return Err(bad(format!(
                "map.max_items must be between 1 and {MAX_MAP_ITEMS}, got {}",
                map.max_items
            )));
        }
        if map.tolerate > map.max_items {
            return Err(bad(format!(
                "map.tolerate ({}) must not exceed map.max_items ({})",
                map.tolerate, map.max_items
            )));
        }
        Ok(())
    }
}

impl Template {
    /// `sleep`, `sleep_until` and `wait_for` of one step: at most one, no handler, no map,
    /// decides or workflow; a path into a parent; durations within 7 days.
    fn validate_wait(&self, step: &StepTemplate) -> Result<(), TemplateError> {
        let bad = |problem: String| TemplateError::InvalidFlow {
            step: step.name.clone(),
            problem,
        };
        let kinds = [
            step.sleep.is_some(),
            step.sleep_until.is_some(),
            step.wait_for.is_some(),
        ]
        .iter()
        .filter(|k| **k)
        .count();
        if kinds == 0 {
            return Ok(());
        }
        if kinds > 1 {
            return Err(bad(
                "a step has at most one of sleep, sleep_until and wait_for".into(),
            ));
        }
        if !step.handler.is_empty() {
            return Err(bad(
                "a sleep or wait_for step runs no handler: leave out handler".into(),
            ));
        }
        if step.map.is_some() || step.workflow.is_some() || !step.decides.is_empty() {
            return Err(bad(
                "a sleep or wait_for step may not have map, workflow or decides".into(),
            ));
        }
        if let Some(ms) = step.sleep
            && ms.0 > MAX_DURATION_MS
        {
            return Err(bad("sleep must be at most 7 days".into()));
        }
        if let Some(path) = &step.sleep_until {
            let (parent, rest) = Wait::source(path);
            if !step.depends_on.iter().any(|d| d == parent)
                || rest.len() > MAX_PATH_SEGMENTS
                || rest.iter().any(|p| p.is_empty() || p.len() > MAX_NAME_LEN)
            {
                return Err(bad(format!(
                    "sleep_until {path:?} must be <parent>.<path> with a parent in depends_on (at most {MAX_PATH_SEGMENTS} non-empty keys)"
                )));
            }
        }
        if let Some(w) = &step.wait_for {
            check_name("wait_for.signal", &w.signal)?;
            if w.timeout.0 == 0 || w.timeout.0 > MAX_DURATION_MS {
                return Err(bad(
                    "wait_for.timeout must be between 1 ms and 7 days".into()
                ));
            }
        }
        Ok(())
    }
}

fn validate_policy(step: &StepTemplate) -> Result<(), TemplateError> {
    let bad = |problem: String| TemplateError::InvalidPolicy {
        step: step.name.clone(),
        problem,
    };
    let r = &step.retry;
    if r.max_attempts == 0 {
        return Err(bad("retry.max_attempts must be at least 1".into()));
    }
    if r.max_attempts > MAX_ATTEMPTS {
        return Err(bad(format!(
            "retry.max_attempts must be at most {MAX_ATTEMPTS}"
        )));
    }
    if !(r.multiplier.is_finite() && r.multiplier >= 1.0 && r.multiplier <= 100.0) {
        return Err(bad(format!(
            "retry.multiplier must be between 1 and 100, got {}",
            r.multiplier
        )));
    }
    if !(r.jitter.is_finite() && (0.0..=1.0).contains(&r.jitter)) {
        return Err(bad(format!(
            "retry.jitter must be between 0 and 1, got {}",
            r.jitter
        )));
    }
    if r.initial_delay > r.max_delay {
        return Err(bad(
            "retry.initial_delay must not exceed retry.max_delay".into()
        ));
    }
    for (what, v) in [
        ("retry.max_delay", r.max_delay),
        ("queue_wait_timeout", step.queue_wait_timeout),
        ("execution_timeout", step.execution_timeout),
    ] {
        if v.0 > MAX_DURATION_MS {
            return Err(bad(format!("{what} must be at most 7 days")));
        }
    }
    if step.queue_wait_timeout.0 == 0 {
        return Err(bad("queue_wait_timeout must be greater than zero".into()));
    }
    if step.execution_timeout.0 == 0 {
        return Err(bad("execution_timeout must be greater than zero".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str, deps: &[&str]) -> StepTemplate {
        StepTemplate {
            name: name.into(),
            handler: "h".into(),
            queue: None,
            depends_on: deps.iter().map(|d| d.to_string()).collect(),
            retry: RetryPolicy::default(),
            queue_wait_timeout: Millis(1000),
            execution_timeout: Millis(1000),
            decides: Vec::new(),
            join: Join::All,
            map: None,
            workflow: None,
            sleep: None,
            sleep_until: None,
            wait_for: None,
        }
    }

    #[test]
    fn workflow_steps_are_checked() {
        let yaml = "namespace: n\nname: t\nversion: 1\nsteps:\n  - { name: a, handler: h }\n  - { name: child, depends_on: [a], workflow: { name: sub, version: 2, context: { order: a.order } } }\n";
        let t: Template = serde_saphyr::from_str(yaml).unwrap();
        assert_eq!(t.validate(), Ok(()));
        let mut bad = t.clone();
        bad.steps[1].workflow.as_mut().unwrap().context =
            Some(BTreeMap::from([("x".into(), "nope.y".into())]));
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("workflow.context.x")
        );
        let mut bad = t.clone();
        bad.steps[1].handler = "h".into();
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("leave out handler")
        );
        let mut bad = t.clone();
        bad.steps[0].handler = String::new();
        assert!(bad.validate().is_err(), "a plain step needs a handler");
    }

    #[test]
    fn decisions_joins_and_maps_are_checked() {
        let mut route = step("route", &[]);
        route.decides = vec!["express".into(), "standard".into()];
        let mut ship = step("ship", &["express", "standard"]);
        ship.join = Join::Any;
        let ok = template(vec![
            route.clone(),
            step("express", &["route"]),
            step("standard", &["route"]),
            ship,
        ]);
        assert_eq!(ok.validate(), Ok(()));

        let mut bad = ok.clone();
        bad.steps[0].decides.push("ship".into());
        let err = bad.validate().unwrap_err().to_string();
        assert!(
            err.contains("\"ship\", which is not a direct child"),
            "{err}"
        );
        let mut bad = ok.clone();
        bad.steps[0].join = Join::Any;
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("join: any needs")
        );

        let mut resize = step("resize", &["list"]);
        resize.map = Some(MapSpec {
            over: "list.images".into(),
            max_parallel: 50,
            max_items: 100_000,
            tolerate: 0,
        });
        let ok = template(vec![step("list", &[]), resize]);
        assert_eq!(ok.validate(), Ok(()));
        for (change, expected) in [
            (
                Box::new(|m: &mut MapSpec| m.over = "other.images".into())
                    as Box<dyn Fn(&mut MapSpec)>,
                "must start with the parent's name",
            ),
            (
                Box::new(|m: &mut MapSpec| m.over = "list..x".into()),
                "is not a path",
            ),
            (
                Box::new(|m: &mut MapSpec| m.max_parallel = 0),
                "max_parallel must be between 1 and 1000",
            ),
            (
                Box::new(|m: &mut MapSpec| m.max_items = 100_001),
                "max_items must be between",
            ),
            (Box::new(|m: &mut MapSpec| m.tolerate = 200_000), "tolerate"),
        ] {
            let mut bad = ok.clone();
            change(bad.steps[1].map.as_mut().unwrap());
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }
        let mut bad = ok.clone();
        bad.steps[1].depends_on.clear();
        assert!(bad.validate().is_err());
        let yaml = "name: r\nhandler: h\ndepends_on: [list]\nmap: { over: list }\n";
        let s: StepTemplate = serde_saphyr::from_str(yaml).unwrap();
        let m = s.map.unwrap();
        assert_eq!((m.max_parallel, m.max_items, m.tolerate), (100, 10_000, 0));
        assert_eq!(m.source(), ("list", vec![]));
    }

    #[test]
    fn sleeps_and_signal_waits_are_checked() {
        let yaml = "namespace: n\nname: t\nversion: 1\ndeadline: 1h\nsteps:\n  - { name: a, handler: h }\n  - { name: nap, depends_on: [a], sleep: 10m }\n  - { name: until, depends_on: [a], sleep_until: a.resume.0.at }\n  - name: approve\n    depends_on: [nap]\n    wait_for: { signal: approval, timeout: 72h, default: { approved: false } }\n";
        let t: Template = serde_saphyr::from_str(yaml).unwrap();
        assert_eq!(t.validate(), Ok(()));
        assert_eq!(t.deadline, Some(Millis(3_600_000)));
        assert_eq!(t.steps[1].wait(), Some(Wait::Sleep { ms: 600_000 }));
        assert_eq!(
            t.steps[3].wait(),
            Some(Wait::Signal {
                name: "approval".into(),
                timeout_ms: 72 * 3_600_000,
                default: Some(serde_json::json!({"approved": false})),
            })
        );
        assert!(t.steps[2].has_no_handler() && !t.steps[0].has_no_handler());
        for (change, expected) in [
            (
                Box::new(|s: &mut StepTemplate| s.handler = "h".into())
                    as Box<dyn Fn(&mut StepTemplate)>,
                "leave out handler",
            ),
            (
                Box::new(|s: &mut StepTemplate| s.sleep = Some(Millis(1))),
                "at most one of sleep, sleep_until and wait_for",
            ),
            (
                Box::new(|s: &mut StepTemplate| s.sleep_until = Some("other.at".into())),
                "with a parent in depends_on",
            ),
            (
                Box::new(|s: &mut StepTemplate| s.sleep_until = Some("a..at".into())),
                "with a parent in depends_on",
            ),
        ] {
            let mut bad = t.clone();
            change(&mut bad.steps[2]);
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }
        let mut bad = t.clone();
        bad.steps[1].sleep = Some(Millis(MAX_DURATION_MS + 1));
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("sleep must be at most 7 days")
        );
        let mut bad = t.clone();
        bad.steps[3].wait_for.as_mut().unwrap().timeout = Millis(0);
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("wait_for.timeout")
        );
        let mut bad = t.clone();
        bad.steps[3].wait_for.as_mut().unwrap().signal = "has space".into();
        assert!(bad.validate().is_err());
        let mut bad = t.clone();
        bad.deadline = Some(Millis(0));
        assert_eq!(
            bad.validate(),
            Err(TemplateError::InvalidDeadline { ms: 0 })
        );
    }

    #[test]
    fn on_failure_is_checked_and_its_name_reserved() {
        let yaml = "namespace: n\nname: t\nversion: 1\nsteps: [{ name: a, handler: h }]\non_failure: { handler: refund, queue: q }\n";
        let t: Template = serde_saphyr::from_str(yaml).unwrap();
        assert_eq!(t.validate(), Ok(()));
        assert_eq!(t.on_failure.as_ref().unwrap().as_step().queue(), "q");
        let mut bad = t.clone();
        bad.steps[0].name = ON_FAILURE_STEP.into();
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("rename the step")
        );
        let mut bad = t.clone();
        bad.on_failure.as_mut().unwrap().handler = "has space".into();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn new_fields_left_out_do_not_change_the_content_hash() {
        // Registered before decisions and maps existed: the same hash today.
        let t = template(vec![step("a", &[])]);
        let json = serde_json::to_string(&t).unwrap();
        assert!(
            !json.contains("decides") && !json.contains("join") && !json.contains("map"),
            "{json}"
        );
    }

    fn template(steps: Vec<StepTemplate>) -> Template {
        Template {
            namespace: "ns".into(),
            name: "t".into(),
            version: 1,
            description: None,
            steps,
            on_failure: None,
            deadline: None,
        }
    }

    #[test]
    fn accepts_a_diamond() {
        let t = template(vec![
            step("a", &[]),
            step("b", &["a"]),
            step("c", &["a"]),
            step("d", &["b", "c"]),
        ]);
        assert_eq!(t.validate(), Ok(()));
        assert_eq!(t.children()["a"], vec!["b", "c"]);
    }

    #[test]
    fn names_the_steps_on_a_cycle() {
        let t = template(vec![
            step("root", &[]),
            step("a", &["root", "c"]),
            step("b", &["a"]),
            step("c", &["b"]),
        ]);
        let err = t.validate().unwrap_err();
        let TemplateError::Cycle { cycle } = &err else {
            panic!("expected a cycle, got {err}")
        };
        assert_eq!(cycle.first(), cycle.last());
        let mut on_cycle: Vec<&str> = cycle[..cycle.len() - 1]
            .iter()
            .map(String::as_str)
            .collect();
        on_cycle.sort();
        assert_eq!(on_cycle, vec!["a", "b", "c"]);
        assert!(err.to_string().contains("cycle"), "{err}");
    }

    #[test]
    fn a_cycle_without_a_root_is_named() {
        let t = template(vec![step("a", &["b"]), step("b", &["a"])]);
        assert!(matches!(t.validate(), Err(TemplateError::Cycle { .. })));
    }

    #[test]
    fn rejects_unknown_duplicate_and_self_dependencies() {
        let t = template(vec![step("a", &[]), step("b", &["nope"])]);
        assert_eq!(
            t.validate(),
            Err(TemplateError::UnknownDependency {
                step: "b".into(),
                dependency: "nope".into()
            })
        );
        let t = template(vec![step("a", &[]), step("a", &[])]);
        assert_eq!(
            t.validate(),
            Err(TemplateError::DuplicateStep { name: "a".into() })
        );
        let t = template(vec![step("a", &[]), step("b", &["b"])]);
        assert_eq!(
            t.validate(),
            Err(TemplateError::SelfDependency { step: "b".into() })
        );
        let t = template(vec![step("a", &[]), step("b", &["a", "a"])]);
        assert!(matches!(
            t.validate(),
            Err(TemplateError::DuplicateDependency { .. })
        ));
    }

    #[test]
    fn rejects_empty_and_absurd_values() {
        assert_eq!(template(vec![]).validate(), Err(TemplateError::NoSteps));
        let t = template(vec![step("", &[])]);
        assert!(matches!(t.validate(), Err(TemplateError::EmptyName { .. })));
        let t = template(vec![step("has space", &[])]);
        assert!(matches!(
            t.validate(),
            Err(TemplateError::InvalidName { .. })
        ));
        let mut s = step("a", &[]);
        s.retry.max_attempts = 0;
        let err = template(vec![s]).validate().unwrap_err();
        assert!(err.to_string().contains("max_attempts"), "{err}");
        let mut s = step("a", &[]);
        s.execution_timeout = Millis(0);
        assert!(
            template(vec![s])
                .validate()
                .unwrap_err()
                .to_string()
                .contains("execution_timeout")
        );
        let mut t = template(vec![step("a", &[])]);
        t.version = 0;
        assert_eq!(t.validate(), Err(TemplateError::ZeroVersion));
        t.version = i32::MAX as u32;
        assert_eq!(t.validate(), Ok(()));
        t.version = i32::MAX as u32 + 1;
        assert_eq!(
            t.validate().unwrap_err().to_string(),
            "version 2147483648 is too large: at most 2147483647"
        );
    }

    #[test]
    fn a_long_chain_does_not_overflow_the_stack() {
        let mut steps = vec![step("s0", &[])];
        for i in 1..MAX_STEPS {
            steps.push(step(&format!("s{i}"), &[&format!("s{}", i - 1)]));
        }
        assert_eq!(template(steps).validate(), Ok(()));
    }

    #[test]
    fn durations_accept_units_and_reject_negatives() {
        let yaml = "name: a\nhandler: h\nqueue_wait_timeout: 30s\nexecution_timeout: 1500\nretry: { initial_delay: 250ms, max_delay: 2m }\n";
        let s: StepTemplate = serde_saphyr::from_str(yaml).unwrap();
        assert_eq!(s.queue_wait_timeout, Millis(30_000));
        assert_eq!(s.execution_timeout, Millis(1_500));
        assert_eq!(s.retry.initial_delay, Millis(250));
        assert_eq!(s.retry.max_delay, Millis(120_000));
        let bad: Result<StepTemplate, _> =
            serde_saphyr::from_str("name: a\nhandler: h\nexecution_timeout: -5\n");
        assert!(bad.unwrap_err().to_string().contains("negative"));
        assert!(parse_duration("5 fortnights").is_err());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let r = RetryPolicy {
            max_attempts: 10,
            initial_delay: Millis(100),
            multiplier: 2.0,
            max_delay: Millis(1_000),
            jitter: 0.5,
        };
        assert_eq!(r.base_delay_ms(1), 100);
        assert_eq!(r.base_delay_ms(2), 200);
        assert_eq!(r.base_delay_ms(4), 800);
        assert_eq!(r.base_delay_ms(9), 1_000);
        assert_eq!(r.delay_ms(2, 0.0), 200);
        assert_eq!(r.delay_ms(2, 1.0), 100);
    }

    #[test]
    fn content_hash_ignores_spelled_out_defaults() {
        let a = template(vec![step("a", &[])]);
        let mut b = a.clone();
        b.steps[0].retry = RetryPolicy::default();
        assert_eq!(a.content_hash(), b.content_hash());
        b.steps[0].handler = "other".into();
        assert_ne!(a.content_hash(), b.content_hash());
    }
}
