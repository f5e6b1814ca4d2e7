//! The HTTP client against a small fake orchestrator API (axum on a random port).

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tasker_client::{Client, ClientError, ListTasks};
use tasker_schemas::TaskState;
use tasker_schemas::api::{
    ErrorBody, ErrorDetail, RegisterResponse, SubmitResponse, SubmitTask, TaskList, TaskSummary,
    TaskView, TemplateView,
};
use tasker_schemas::{TaskId, Template};

#[derive(Default)]
struct Fake {
    /// Polls left before each task is finished; absent = never finishes.
    polls_left: HashMap<TaskId, u32>,
    /// `wait_ms` of every GET of a task.
    waits: Vec<u64>,
    list_queries: Vec<HashMap<String, String>>,
    conflict_task: Option<TaskId>,
}

type Shared = Arc<Mutex<Fake>>;

fn error(
    status: StatusCode,
    code: &str,
    message: &str,
    task_id: Option<TaskId>,
) -> (StatusCode, Json<Value>) {
    let body = ErrorBody {
        error: ErrorDetail {
            code: code.into(),
            message: message.into(),
            task_id,
        },
    };
    (status, Json(serde_json::to_value(body).unwrap()))
}

fn authorized(headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer secret")
}

fn view(id: TaskId, state: &str) -> TaskView {
    // From JSON, so fields the API adds later (with defaults) do not break this fake.
    serde_json::from_value(json!({
        "id": id,
        "namespace": "shop",
        "template": "order_fulfilment",
        "template_version": 1,
        "state": state,
        "priority": 0,
        "context": {},
        "output": (state == "completed").then(|| json!({"ok": true})),
        "error": null,
        "idempotency_key": null,
        "created_at": "2026-01-01T00:00:00Z",
        "finished_at": null,
    }))
    .unwrap()
}

/// A task as lists show it: no context, output, steps or events.
fn summary(id: TaskId, state: &str) -> TaskSummary {
    serde_json::from_value(json!({
        "id": id,
        "namespace": "shop",
        "template": "order_fulfilment",
        "template_version": 1,
        "state": state,
        "priority": 0,
        "error": null,
        "idempotency_key": null,
        "created_at": "2026-01-01T00:00:00Z",
        "finished_at": null,
    }))
    .unwrap()
}

async fn register(headers: HeaderMap, Json(t): Json<Template>) -> (StatusCode, Json<Value>) {
    if !authorized(&headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong API key",
            None,
        );
    }
    let body = RegisterResponse {
        namespace: t.namespace,
        name: t.name,
        version: t.version,
        created: true,
    };
    (
        StatusCode::CREATED,
        Json(serde_json::to_value(body).unwrap()),
    )
}

async fn submit(
    State(fake): State<Shared>,
    Json(task): Json<SubmitTask>,
) -> (StatusCode, Json<Value>) {
    if task.idempotency_key.as_deref() == Some("taken") {
        let holder = fake.lock().unwrap().conflict_task;
        return error(
            StatusCode::CONFLICT,
            "idempotency_conflict",
            "key used with another body",
            holder,
        );
    }
    let id = task.task_id.unwrap_or_default();
    fake.lock().unwrap().polls_left.insert(id, 2);
    (
        StatusCode::CREATED,
        Json(
            serde_json::to_value(SubmitResponse {
                task_id: id,
                created: true,
            })
            .unwrap(),
        ),
    )
}

async fn task(
    State(fake): State<Shared>,
    Path(id): Path<TaskId>,
    Query(q): Query<HashMap<String, String>>,
) -> (StatusCode, Json<Value>) {
    let wait_ms: Option<u64> = q.get("wait_ms").and_then(|w| w.parse().ok());
    let state = {
        let mut fake = fake.lock().unwrap();
        if let Some(w) = wait_ms {
            fake.waits.push(w);
        }
        match fake.polls_left.get_mut(&id) {
            None if id.as_uuid().is_nil() => {
                return error(
                    StatusCode::NOT_FOUND,
                    "task_not_found",
                    "no such task",
                    None,
                );
            }
            None => "running",
            Some(0) => "completed",
            Some(n) => {
                *n -= 1;
                "running"
            }
        }
    };
    if state == "running"
        && let Some(w) = wait_ms
    {
        // Long-poll: hold the request (shortened so the test stays fast).
        tokio::time::sleep(Duration::from_millis(w.min(50))).await;
    }
    (
        StatusCode::OK,
        Json(serde_json::to_value(view(id, state)).unwrap()),
    )
}

async fn list(
    State(fake): State<Shared>,
    Query(q): Query<HashMap<String, String>>,
) -> Json<TaskList> {
    fake.lock().unwrap().list_queries.push(q);
    Json(TaskList {
        tasks: vec![summary(TaskId::new(), "running")],
        next: None,
    })
}

async fn templates(Query(q): Query<HashMap<String, String>>) -> Json<Vec<TemplateView>> {
    let namespace = q.get("namespace").cloned().unwrap_or_else(|| "any".into());
    Json(vec![TemplateView {
        namespace,
        name: "order_fulfilment".into(),
        version: 2,
        description: None,
        steps: 3,
        created_at: "2026-01-01T00:00:00Z".into(),
        template: None,
    }])
}

async fn serve() -> (String, Shared) {
    let fake: Shared = Arc::default();
    let app = Router::new()
        .route("/v1/templates", post(register).get(templates))
        .route("/v1/tasks", post(submit).get(list))
        .route("/v1/tasks/{id}", get(task))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/"), fake)
}

fn submission(key: Option<&str>) -> SubmitTask {
    SubmitTask {
        namespace: "shop".into(),
        template: "order_fulfilment".into(),
        version: None,
        context: json!({"order_id": "o-1"}),
        idempotency_key: key.map(Into::into),
        priority: 0,
        task_id: None,
        run_at: None,
        delay: None,
        deadline: None,
    }
}

#[tokio::test]
async fn registers_with_the_api_key() {
    let (url, _) = serve().await;
    let template: Template = serde_json::from_value(json!({
        "namespace": "shop", "name": "t", "version": 2,
        "steps": [{"name": "a", "handler": "h"}]
    }))
    .unwrap();
    let err = Client::new(&url)
        .register_template(&template)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Api { status: 401, code, .. } if code == "unauthorized"),
        "{err}"
    );
    let registered = Client::new(&url)
        .with_api_key("secret")
        .register_template(&template)
        .await
        .unwrap();
    assert_eq!(
        (
            registered.name.as_str(),
            registered.version,
            registered.created
        ),
        ("t", 2, true)
    );
}

#[tokio::test]
async fn submits_waits_and_maps_errors() {
    let (url, fake) = serve().await;
    let client = Client::new(url);
    let submitted = client.submit(&submission(None)).await.unwrap();
    assert!(submitted.created);

    let started = Instant::now();
    let done = client
        .wait(submitted.task_id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(done.state, TaskState::Completed);
    assert_eq!(done.output, Some(json!({"ok": true})));
    assert!(started.elapsed() < Duration::from_secs(5));
    let waits = fake.lock().unwrap().waits.clone();
    assert_eq!(waits.len(), 3, "{waits:?}");
    assert!(waits.iter().all(|w| *w > 0 && *w <= 20_000), "{waits:?}");

    let holder = TaskId::new();
    fake.lock().unwrap().conflict_task = Some(holder);
    let err = client.submit(&submission(Some("taken"))).await.unwrap_err();
    let ClientError::Api {
        status,
        code,
        task_id,
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(
        (*status, code.as_str(), *task_id),
        (409, "idempotency_conflict", Some(holder))
    );

    let missing = TaskId(uuid::Uuid::nil());
    let err = client.task(missing).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Api { status: 404, code, .. } if code == "task_not_found"),
        "{err}"
    );
}

#[tokio::test]
async fn waiting_gives_up_after_the_timeout() {
    let (url, _) = serve().await;
    let never = TaskId::new();
    let started = Instant::now();
    let err = Client::new(url)
        .wait(never, Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Timeout { task_id, state, .. } if *task_id == never && *state == TaskState::Running),
        "{err}"
    );
    assert!(err.is_retryable());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test]
async fn lists_with_filters() {
    let (url, fake) = serve().await;
    let after = TaskId::new();
    let filter = ListTasks {
        state: Some(TaskState::Running),
        namespace: Some("shop".into()),
        limit: Some(10),
        after: Some(after),
        ..ListTasks::default()
    };
    let page = Client::new(url).list(&filter).await.unwrap();
    assert_eq!(page.tasks.len(), 1);
    let q = fake.lock().unwrap().list_queries[0].clone();
    assert_eq!(q.get("state").map(String::as_str), Some("running"));
    assert_eq!(q.get("namespace").map(String::as_str), Some("shop"));
    assert_eq!(q.get("limit").map(String::as_str), Some("10"));
    assert_eq!(q.get("after"), Some(&after.to_string()));
    assert!(!q.contains_key("template"));
}

#[tokio::test]
async fn lists_templates_of_a_namespace_or_all() {
    let (url, _fake) = serve().await;
    let client = Client::new(url);
    let all = client.templates(None).await.unwrap();
    assert_eq!(all[0].namespace, "any");
    let shop = client.templates(Some("shop")).await.unwrap();
    assert_eq!((shop[0].namespace.as_str(), shop[0].version), ("shop", 2));
}

#[tokio::test]
async fn an_unreachable_server_is_a_retryable_http_error() {
    // Bind then drop a listener to get a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = Client::new(format!("http://127.0.0.1:{port}"))
        .task(TaskId::new())
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Http(_)), "{err}");
    assert!(err.is_retryable());
}
