//! Traces (docs/observability.md, "Traces"): one trace per task, a span for the task and one
//! per attempt, exported over OTLP/HTTP (protobuf) when an endpoint is configured
//! (`TASKER_OTLP_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT`). Off by default: then
//! [`Traces`] holds nothing, no exporter or thread exists and every recording call returns at
//! once.
//!
//! A task's life spans transactions and replicas, so no span is kept open in memory: each span
//! is built whole when it ends, with ids derived from the database rows (the same on every
//! replica) and the start time the database recorded:
//!
//! - trace id: the trace id of the submit request's `traceparent` when it had a valid one
//!   (stored as `tasks.trace_parent`), else the task id's 32 hex digits;
//! - task span: id [`task_span_id`] (from the task id), parent the submit request's span (none
//!   without a `traceparent`), from `created_at` to the finish; exported when the task finishes;
//! - attempt span: id [`attempt_span_id`] (from the step id and the attempt: the span of the
//!   step message's `traceparent`), parent the task span, from the dispatch to the outcome
//!   applied (a result, a timeout, a dead letter); exported after the outcome's commit.
//!
//! A worker's handler span is a child of its attempt's span (the step message's `traceparent`).

use crate::broker::traceparent;
use crate::config::Config;
use crate::store::apply::FinishedTask;
use chrono::{DateTime, Utc};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SpanData, SpanEvents, SpanLinks, SpanProcessor,
};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tasker_schemas::{StepId, TaskId, TaskState};
use uuid::Uuid;

/// The standard variable naming the OTLP endpoint (the base URL; `/v1/traces` is appended).
pub const OTLP_ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

/// A parsed W3C `traceparent` (version `00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
}

impl TraceParent {
    /// Parses `00-{32 hex}-{16 hex}-{2 hex}` (lowercase hex, W3C trace context level 1); an
    /// all-zero trace or span id is invalid. Anything else is `None`: the trace starts over.
    pub fn parse(header: &str) -> Option<Self> {
        let header = header.trim();
        let mut parts = header.split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some()
            || version != "00"
            || trace.len() != 32
            || span.len() != 16
            || flags.len() != 2
            || ![trace, span, flags].iter().all(|p| {
                p.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            })
        {
            return None;
        }
        let mut t = TraceParent {
            trace_id: [0; 16],
            span_id: [0; 8],
            flags: 0,
        };
        hex::decode_to_slice(trace, &mut t.trace_id).ok()?;
        hex::decode_to_slice(span, &mut t.span_id).ok()?;
        let mut f = [0u8; 1];
        hex::decode_to_slice(flags, &mut f).ok()?;
        t.flags = f[0];
        if t.trace_id == [0; 16] || t.span_id == [0; 8] {
            return None;
        }
        Some(t)
    }

    /// The canonical text, as stored in `tasks.trace_parent`.
    pub fn to_header(self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.span_id),
            self.flags
        )
    }
}

/// The trace id of a task: the one of its submit request's `traceparent` (`stored`), or else
/// the task id's bytes.
pub fn trace_id_of(task_id: TaskId, stored: Option<&str>) -> [u8; 16] {
    stored
        .and_then(TraceParent::parse)
        .map(|t| t.trace_id)
        .unwrap_or(*task_id.0.as_bytes())
}

/// The span id of a task's span: derived from the task id, the same on every replica.
pub fn task_span_id(task_id: TaskId) -> [u8; 8] {
    let mut digest = Sha256::new();
    digest.update(b"task");
    digest.update(task_id.0.as_bytes());
    nonzero_span(&digest.finalize()[..8])
}

/// The span id of one attempt of a step: the span of its step message's `traceparent`
/// ([`traceparent`]).
pub fn attempt_span_id(step_id: StepId, attempt: u32) -> [u8; 8] {
    let header = traceparent(TaskId(Uuid::nil()), step_id, attempt);
    let mut span = [0u8; 8];
    // `00-{32}-{16}-01`: the span is at 36..52, always valid hex.
    let _ = hex::decode_to_slice(&header[36..52], &mut span);
    span
}

fn nonzero_span(bytes: &[u8]) -> [u8; 8] {
    let mut span = [0u8; 8];
    span.copy_from_slice(bytes);
    if span == [0; 8] {
        span[7] = 1;
    }
    span
}

/// The `traceparent` of a step message: [`traceparent`], in the task's trace (`stored`: the
/// submit request's `traceparent`, when the task has one).
pub fn step_traceparent(
    task_id: TaskId,
    stored: Option<&str>,
    step_id: StepId,
    attempt: u32,
) -> String {
    let own = traceparent(task_id, step_id, attempt);
    match stored.and_then(TraceParent::parse) {
        Some(t) => format!("00-{}{}", hex::encode(t.trace_id), &own[35..]),
        None => own,
    }
}

/// One finished attempt, as its span shows it.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub task_id: Uuid,
    pub step_id: Uuid,
    pub step: String,
    pub namespace: String,
    pub attempt: i32,
    pub outcome: &'static str,
    /// When it was dispatched (the span's start); `None`: no span.
    pub dispatched_at: Option<DateTime<Utc>>,
    /// When its outcome was applied (the span's end).
    pub ended_at: DateTime<Utc>,
}

/// The trace exporter of one orchestrator: cheap to clone, nothing inside when off.
#[derive(Clone, Default)]
pub struct Traces {
    inner: Option<Arc<Exporter>>,
}

struct Exporter {
    processor: BatchSpanProcessor,
    scope: InstrumentationScope,
}

impl std::fmt::Debug for Traces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Traces").field("on", &self.is_on()).finish()
    }
}

/// The endpoint configured: `otlp_endpoint`, else `OTEL_EXPORTER_OTLP_ENDPOINT` (`env`);
/// empty counts as unset.
pub fn endpoint(config: &Config, env: impl Fn(&str) -> Option<String>) -> Option<String> {
    config
        .otlp_endpoint
        .clone()
        .or_else(|| env(OTLP_ENDPOINT_VAR))
        .map(|e| e.trim().to_owned())
        .filter(|e| !e.is_empty())
}

/// `{base}/v1/traces`, as the OTLP/HTTP specification derives it from the base endpoint.
pub fn traces_url(base: &str) -> String {
    format!("{}/v1/traces", base.trim_end_matches('/'))
}

impl Traces {
    /// No exporter: every recording call does nothing.
    pub fn off() -> Self {
        Self::default()
    }

    /// The exporter for `config` ([`endpoint`], reading the process environment): off when no
    /// endpoint is set. Batches are sent every `OTEL_BSP_SCHEDULE_DELAY` (default 5 s) from a
    /// thread of their own.
    pub fn from_config(config: &Config) -> Result<Self, String> {
        match endpoint(config, |k| std::env::var(k).ok()) {
            None => Ok(Self::off()),
            Some(base) => Self::otlp(&base, None),
        }
    }

    /// An OTLP/HTTP (protobuf) exporter to `base` (`/v1/traces` appended); `delay` overrides
    /// the batch interval.
    pub fn otlp(base: &str, delay: Option<Duration>) -> Result<Self, String> {
        // reqwest is built without a default rustls provider: ring, as everywhere here.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(traces_url(base))
            .build()
            .map_err(|e| format!("OTLP trace exporter: {e}"))?;
        let mut batch = BatchConfigBuilder::default();
        if let Some(d) = delay {
            batch = batch.with_scheduled_delay(d);
        }
        let mut processor = BatchSpanProcessor::new(exporter, batch.build());
        processor.set_resource(
            &Resource::builder()
                .with_service_name("tasker-orchestrator")
                .build(),
        );
        let scope = InstrumentationScope::builder("tasker-orchestrator")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        tracing::info!(endpoint = %crate::config::redact_url(base), "exporting traces over OTLP");
        Ok(Self {
            inner: Some(Arc::new(Exporter { processor, scope })),
        })
    }

    pub fn is_on(&self) -> bool {
        self.inner.is_some()
    }

    /// Records the spans of applied attempts (their tasks' trace read in one query).
    pub async fn record_attempts(&self, db: &PgPool, attempts: &[Attempt]) {
        let Some(x) = &self.inner else { return };
        let attempts: Vec<&Attempt> = attempts
            .iter()
            .filter(|a| a.dispatched_at.is_some())
            .collect();
        if attempts.is_empty() {
            return;
        }
        let ids: Vec<Uuid> = attempts.iter().map(|a| a.task_id).collect();
        let stored = stored_trace_parents(db, &ids).await;
        for a in attempts {
            let task = TaskId(a.task_id);
            let trace = trace_id_of(task, stored.get(&a.task_id).and_then(|s| s.as_deref()));
            let span = attempt_span_id(StepId(a.step_id), a.attempt as u32);
            let status = match a.outcome {
                "succeeded" => Status::Ok,
                other => Status::error(other.to_owned()),
            };
            x.emit(
                format!("attempt {}", a.step),
                trace,
                span,
                task_span_id(task),
                SpanKind::Producer,
                a.dispatched_at.unwrap_or(a.ended_at),
                a.ended_at,
                vec![
                    KeyValue::new("tasker.task_id", a.task_id.to_string()),
                    KeyValue::new("tasker.namespace", a.namespace.clone()),
                    KeyValue::new("tasker.step", a.step.clone()),
                    KeyValue::new("tasker.step_id", a.step_id.to_string()),
                    KeyValue::new("tasker.attempt", i64::from(a.attempt)),
                    KeyValue::new("tasker.outcome", a.outcome),
                ],
                status,
            );
        }
    }

    /// Records the spans of finished tasks.
    pub async fn record_tasks(&self, db: &PgPool, finished: &[FinishedTask]) {
        let Some(x) = &self.inner else { return };
        if finished.is_empty() {
            return;
        }
        let ids: Vec<Uuid> = finished.iter().map(|f| f.task_id.0).collect();
        let stored = stored_trace_parents(db, &ids).await;
        for f in finished {
            let parent = stored
                .get(&f.task_id.0)
                .and_then(|s| s.as_deref())
                .and_then(TraceParent::parse);
            let trace = parent
                .map(|p| p.trace_id)
                .unwrap_or(*f.task_id.0.as_bytes());
            let status = match f.state {
                TaskState::Completed => Status::Ok,
                _ => Status::error(f.error.clone().unwrap_or_else(|| f.state.to_string())),
            };
            x.emit(
                format!("task {}", f.template),
                trace,
                task_span_id(f.task_id),
                parent.map(|p| p.span_id).unwrap_or([0; 8]),
                SpanKind::Server,
                f.created_at,
                f.at,
                vec![
                    KeyValue::new("tasker.task_id", f.task_id.to_string()),
                    KeyValue::new("tasker.namespace", f.namespace.clone()),
                    KeyValue::new("tasker.template", f.template.clone()),
                    KeyValue::new("tasker.state", f.state.as_str()),
                ],
                status,
            );
        }
    }

    /// Sends what is buffered and stops the export thread (blocking work, off the runtime).
    pub async fn shutdown(&self) {
        let Some(x) = self.inner.clone() else { return };
        let done = tokio::task::spawn_blocking(move || x.processor.shutdown()).await;
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "trace exporter shutdown");
        }
    }

    /// Sends what is buffered now (blocking work, off the runtime).
    pub async fn flush(&self) {
        let Some(x) = self.inner.clone() else { return };
        let _ = tokio::task::spawn_blocking(move || x.processor.force_flush()).await;
    }
}

impl Exporter {
    #[allow(clippy::too_many_arguments)]
    fn emit(
        &self,
        name: String,
        trace: [u8; 16],
        span: [u8; 8],
        parent: [u8; 8],
        kind: SpanKind,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        attributes: Vec<KeyValue>,
        status: Status,
    ) {
        let parent = SpanId::from_bytes(parent);
        let start = SystemTime::from(start);
        self.processor.on_end(SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes(trace),
                SpanId::from_bytes(span),
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: parent,
            parent_span_is_remote: parent != SpanId::INVALID,
            span_kind: kind,
            name: name.into(),
            start_time: start,
            end_time: SystemTime::from(end).max(start),
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        });
    }
}

/// `tasks.trace_parent` of the given tasks (absent: pruned; `None`: no submit traceparent).
/// A failed read is logged and the spans go out in the task id's trace.
async fn stored_trace_parents(db: &PgPool, ids: &[Uuid]) -> HashMap<Uuid, Option<String>> {
    let rows = sqlx::query("SELECT id, trace_parent FROM tasks WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(db)
        .await;
    match rows {
        Ok(rows) => rows
            .iter()
            .map(|r| {
                (
                    r.get::<Uuid, _>("id"),
                    r.get::<Option<String>, _>("trace_parent"),
                )
            })
            .collect(),
        Err(e) => {
            tracing::debug!(error = %e, "could not read the tasks' traces");
            HashMap::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_w3c_traceparents() {
        let h = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = TraceParent::parse(h).unwrap();
        assert_eq!(t.to_header(), h);
        assert_eq!(t.flags, 1);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xx",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn step_traceparents_continue_the_submit_trace() {
        let task = TaskId::new();
        let step = StepId::new();
        // No submit traceparent: as before, the task id is the trace.
        assert_eq!(
            step_traceparent(task, None, step, 2),
            traceparent(task, step, 2)
        );
        let submit = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let t = step_traceparent(task, Some(submit), step, 2);
        let parsed = TraceParent::parse(&t).unwrap();
        assert_eq!(
            hex::encode(parsed.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(parsed.span_id, attempt_span_id(step, 2));
        assert_eq!(t[36..], traceparent(task, step, 2)[36..]);
        assert_ne!(attempt_span_id(step, 1), attempt_span_id(step, 2));
        assert_ne!(task_span_id(task), [0; 8]);
        assert_eq!(trace_id_of(task, Some("garbage")), *task.0.as_bytes());
    }

    #[test]
    fn off_without_an_endpoint() {
        let mut config = Config::default();
        assert_eq!(endpoint(&config, |_| None), None);
        assert_eq!(endpoint(&config, |_| Some(" ".into())), None);
        assert_eq!(
            endpoint(&config, |k| (k == OTLP_ENDPOINT_VAR)
                .then(|| "http://c:4318".into())),
            Some("http://c:4318".into())
        );
        config.otlp_endpoint = Some("http://mine:4318/".into());
        assert_eq!(
            endpoint(&config, |_| Some("http://env:4318".into())).as_deref(),
            Some("http://mine:4318/")
        );
        assert_eq!(
            traces_url("http://mine:4318/"),
            "http://mine:4318/v1/traces"
        );
        // With the variable unset in this process, no exporter is built.
        if std::env::var(OTLP_ENDPOINT_VAR).is_err() {
            assert!(!Traces::from_config(&Config::default()).unwrap().is_on());
        }
        assert!(!Traces::off().is_on());
    }

    #[tokio::test]
    async fn off_records_nothing_and_reads_nothing() {
        // A pool that can never connect: an off exporter returns before touching it.
        let db = PgPool::connect_lazy("postgres://nobody@127.0.0.1:1/none").unwrap();
        let off = Traces::off();
        let now = Utc::now();
        let attempt = Attempt {
            task_id: Uuid::now_v7(),
            step_id: Uuid::now_v7(),
            step: "a".into(),
            namespace: "n".into(),
            attempt: 1,
            outcome: "succeeded",
            dispatched_at: Some(now),
            ended_at: now,
        };
        let finished = FinishedTask {
            task_id: TaskId::new(),
            namespace: "n".into(),
            template: "t".into(),
            state: TaskState::Completed,
            seq: 1,
            at: now,
            created_at: now,
            output: None,
            error: None,
            parent_step: None,
        };
        let quick = Duration::from_millis(200);
        tokio::time::timeout(quick, off.record_attempts(&db, &[attempt]))
            .await
            .unwrap();
        tokio::time::timeout(quick, off.record_tasks(&db, &[finished]))
            .await
            .unwrap();
        off.flush().await;
        off.shutdown().await;
    }
}
