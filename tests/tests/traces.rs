//! Traces (docs/observability.md, "Traces"): with an OTLP endpoint configured, a task submitted
//! with a `traceparent` makes one trace: the task span (parent: the submit request's span), an
//! attempt span per attempt (parent: the task span), and the Rust worker's `step` span of each
//! attempt (parent: that attempt's span). An OTLP/HTTP receiver in this test collects what the
//! orchestrator and the worker export.

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tasker_schemas::api::{SubmitResponse, SubmitTask};
use tasker_schemas::{Envelope, TaskId, TaskState, encode};
use tasker_tests::Harness;
use tasker_tests::tasker_worker::StepError;
use tasker_tests::tasker_worker::amqp_submit;
use tasker_tests::tasker_worker::client::publish::publish_confirmed;
use tasker_tests::tasker_worker::telemetry::Traces;

/// One span as the receiver got it.
#[derive(Debug, Clone)]
struct Got {
    scope: String,
    name: String,
    trace: String,
    span: String,
    parent: String,
    attributes: HashMap<String, String>,
}

type Received = Arc<Mutex<Vec<Got>>>;

async fn receive(State(got): State<Received>, body: Bytes) -> &'static [u8] {
    let req = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf trace export");
    let mut got = got.lock().unwrap();
    for rs in req.resource_spans {
        for ss in rs.scope_spans {
            let scope = ss.scope.map(|s| s.name).unwrap_or_default();
            for s in ss.spans {
                let attributes = s
                    .attributes
                    .into_iter()
                    .map(|kv| {
                        let v = match kv.value.and_then(|v| v.value) {
                            Some(AnyValue::StringValue(s)) => s,
                            Some(AnyValue::IntValue(i)) => i.to_string(),
                            other => format!("{other:?}"),
                        };
                        (kv.key, v)
                    })
                    .collect();
                got.push(Got {
                    scope: scope.clone(),
                    name: s.name,
                    trace: hex(&s.trace_id),
                    span: hex(&s.span_id),
                    parent: hex(&s.parent_span_id),
                    attributes,
                });
            }
        }
    }
    // An empty ExportTraceServiceResponse.
    b""
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The receiver's base URL, for the orchestrator's config hook (a plain `fn`).
static ENDPOINT: OnceLock<String> = OnceLock::new();

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_attempts_and_handlers_form_one_trace() -> anyhow::Result<()> {
    let got: Received = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let app = axum::Router::new()
        .route("/v1/traces", post(receive))
        .with_state(got.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    ENDPOINT.set(endpoint.clone()).expect("set once");

    // The worker's side: its `step` spans (and nothing else) exported to the receiver.
    let worker_traces = Traces::otlp(&endpoint, Some(Duration::from_millis(100)))?;
    {
        use tracing_subscriber::Layer;
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let only_sdk = tracing_subscriber::filter::Targets::new()
            .with_target("tasker_worker", tracing::Level::INFO);
        tracing_subscriber::registry()
            .with(worker_traces.layer().with_filter(only_sdk))
            .with(
                tracing_subscriber::fmt::layer()
                    .with_test_writer()
                    .with_filter(tracing_subscriber::EnvFilter::new("warn")),
            )
            .try_init()?;
    }

    let h = Harness::start_with(|c| c.otlp_endpoint = ENDPOINT.get().cloned()).await?;
    assert!(
        h.shared(0).traces.is_on(),
        "the orchestrator exports traces"
    );
    h.register_yaml(
        "namespace: tr
name: chain
version: 1
steps:
  - name: a
    handler: flaky
    retry: { max_attempts: 3, initial_delay: 10ms, max_delay: 10ms, jitter: 0.0 }
  - { name: b, handler: ok, depends_on: [a] }
",
    )
    .await?;
    h.spawn_worker(
        h.worker("tr")
            .handler_fn("flaky", |ctx| async move {
                if ctx.attempt() == 1 {
                    Err(StepError::retryable("first attempt fails"))
                } else {
                    Ok(json!({"attempt": ctx.attempt()}))
                }
            })
            .handler_fn("ok", |_| async { Ok(json!("done")) }),
    )
    .await?;

    // Submit over HTTP with the caller's trace context.
    let submitted: SubmitResponse = reqwest::Client::new()
        .post(format!("{}/v1/tasks", h.client().base_url()))
        .header("traceparent", format!("00-{TRACE}-{CALLER_SPAN}-01"))
        .json(&SubmitTask {
            namespace: "tr".into(),
            template: "chain".into(),
            version: None,
            context: json!({}),
            idempotency_key: None,
            priority: 0,
            task_id: None,
            run_at: None,
            delay: None,
            deadline: None,
        })
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = submitted.task_id;
    assert_eq!(h.wait(id).await?.state, TaskState::Completed);
    let attempts: i64 = sqlx::query_scalar("SELECT count(*) FROM attempts WHERE task_id = $1")
        .bind(id.0)
        .fetch_one(&h.db)
        .await?;
    assert_eq!(attempts, 3, "a twice, b once");

    // Flush both sides until every span arrived (the worker's last span ends after its result
    // is confirmed, maybe after the task finished).
    let attempt_count = attempts as usize;
    let mut spans = Vec::new();
    for _ in 0..100 {
        h.shared(0).traces.flush().await;
        let w = worker_traces.clone();
        tokio::task::spawn_blocking(move || w.flush()).await?;
        spans = got.lock().unwrap().clone();
        let n = |p: &str| spans.iter().filter(|s| s.name.starts_with(p)).count();
        if n("task ") >= 1 && n("attempt ") >= attempt_count && n("step") >= attempt_count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // One trace: the caller's.
    assert!(
        spans.iter().all(|s| s.trace == TRACE),
        "every span is in the submit request's trace: {spans:#?}"
    );
    let tasks: Vec<&Got> = spans
        .iter()
        .filter(|s| s.name.starts_with("task "))
        .collect();
    assert_eq!(tasks.len(), 1, "one task span: {spans:#?}");
    let task = tasks[0];
    assert_eq!(task.scope, "tasker-orchestrator");
    assert_eq!(task.attributes["tasker.task_id"], id.to_string());
    assert_eq!(task.attributes["tasker.state"], "completed");
    assert_eq!(
        task.parent, CALLER_SPAN,
        "the task span continues the caller's span"
    );

    let attempt_spans: Vec<&Got> = spans
        .iter()
        .filter(|s| s.name.starts_with("attempt "))
        .collect();
    assert_eq!(attempt_spans.len(), attempt_count, "{attempt_spans:#?}");
    let mut seen = Vec::new();
    for a in &attempt_spans {
        assert_eq!(a.parent, task.span, "an attempt's parent is the task span");
        seen.push((
            a.attributes["tasker.step"].clone(),
            a.attributes["tasker.attempt"].clone(),
            a.attributes["tasker.outcome"].clone(),
        ));
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            ("a".into(), "1".into(), "failed".into()),
            ("a".into(), "2".into(), "succeeded".into()),
            ("b".into(), "1".into(), "succeeded".into()),
        ],
    );

    // The worker's span of each attempt is a child of that attempt's span.
    let steps: Vec<&Got> = spans.iter().filter(|s| s.name == "step").collect();
    assert_eq!(steps.len(), attempt_count, "{steps:#?}");
    for s in &steps {
        let parent = attempt_spans
            .iter()
            .find(|a| a.span == s.parent)
            .unwrap_or_else(|| panic!("a worker span whose parent is no attempt: {s:#?}"));
        assert_eq!(parent.attributes["tasker.step"], s.attributes["step"]);
        assert_eq!(parent.attributes["tasker.attempt"], s.attributes["attempt"]);
    }
    let mut ids: Vec<&str> = spans.iter().map(|s| s.span.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), spans.len(), "span ids are unique");

    // A task request over AMQP with a `traceparent` header continues that trace too.
    let amqp_trace = "0af7651916cd43dd8448eb211c80319c";
    let header = format!("00-{amqp_trace}-b7ad6b7169203331-01");
    let conn = lapin::Connection::connect(&h.services.amqp_url, Default::default()).await?;
    let ch = amqp_submit::confirm_channel(&conn).await?;
    let mut req = amqp_submit::task_request("tr", "chain", json!({}));
    let amqp_task = TaskId::new();
    req.task_id = Some(amqp_task);
    let envelope = Envelope::new(req);
    let mut headers = FieldTable::default();
    headers.insert(
        "traceparent".into(),
        AMQPValue::LongString(header.as_str().into()),
    );
    publish_confirmed(
        &ch,
        &h.names().tasks_exchange(),
        "tr",
        &encode(&envelope)?,
        BasicProperties::default().with_headers(headers),
    )
    .await?;
    let task = h.wait_submitted(amqp_task, Duration::from_secs(30)).await?;
    assert_eq!(task.state, TaskState::Completed);
    let stored: Option<String> = sqlx::query_scalar("SELECT trace_parent FROM tasks WHERE id = $1")
        .bind(amqp_task.0)
        .fetch_one(&h.db)
        .await?;
    assert_eq!(stored.as_deref(), Some(header.as_str()));
    let mut traced = Vec::new();
    for _ in 0..100 {
        h.shared(0).traces.flush().await;
        traced = got
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace == amqp_trace)
            .cloned()
            .collect::<Vec<_>>();
        if traced.iter().any(|s| s.name.starts_with("task ")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let task_span = traced
        .iter()
        .find(|s| s.name.starts_with("task "))
        .expect("the AMQP task's span, in the request's trace");
    assert_eq!(task_span.parent, "b7ad6b7169203331");
    assert_eq!(
        task_span.attributes["tasker.task_id"],
        amqp_task.to_string()
    );

    h.finish().await;
    tokio::task::spawn_blocking(move || worker_traces.shutdown()).await?;
    Ok(())
}
