//! The HTTP API (`/v1/...`), health, readiness and metrics. Handlers decode, call a service and
//! encode; errors map to status codes here, and an internal fault never reaches the caller as
//! database or broker text.

use super::views;
use crate::service::{self, ServiceError, Shared};
use crate::store::{self, templates::Registered, views::ListFilter};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use std::time::Duration;
use tasker_schemas::api::{
    ErrorBody, ErrorDetail, RegisterResponse, SubmitResponse, SubmitTask, TemplateView,
};
use tasker_schemas::{TaskId, TaskState, Template};

/// The router, with body limits and (when keys are configured) bearer authentication on `/v1`.
pub fn router(shared: Shared) -> Router {
    let v1 = Router::new()
        .route("/templates", post(register_template).get(list_templates))
        .route("/templates/{namespace}/{name}", get(show_template))
        .route("/tasks", post(submit_task).get(list_tasks))
        .route("/tasks/{id}", get(show_task))
        .route("/tasks/{id}/cancel", post(cancel_task))
        .route("/tasks/{id}/retry", post(retry_task))
        .route("/tasks/{id}/steps/{step}/instances", get(list_instances))
        .route_layer(middleware::from_fn_with_state(shared.clone(), authenticate));
    Router::new()
        .nest("/v1", v1)
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(shared.config.max_request_bytes))
        .with_state(shared)
}

/// An error answer: status plus `{"error": {"code", "message"}}`.
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                error: ErrorDetail {
                    code: code.into(),
                    message: message.into(),
                    task_id: None,
                },
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        use tasker_schemas::DataError;
        let (status, code) = match &e {
            ServiceError::InvalidTemplate(_) => (StatusCode::BAD_REQUEST, "invalid_template"),
            ServiceError::TemplateConflict { .. } => (StatusCode::CONFLICT, "template_conflict"),
            ServiceError::TemplateNotFound { .. } => (StatusCode::NOT_FOUND, "template_not_found"),
            ServiceError::TaskNotFound(_) => (StatusCode::NOT_FOUND, "task_not_found"),
            ServiceError::StepNotFound { .. } => (StatusCode::NOT_FOUND, "step_not_found"),
            ServiceError::IdempotencyConflict { .. } => {
                (StatusCode::CONFLICT, "idempotency_conflict")
            }
            ServiceError::TaskIdConflict(_) => (StatusCode::CONFLICT, "task_id_conflict"),
            ServiceError::Data(DataError::TooLarge { .. }) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            }
            ServiceError::Data(_) | ServiceError::InvalidRequest(_) => {
                (StatusCode::BAD_REQUEST, "invalid_request")
            }
            ServiceError::InvalidState { .. } => (StatusCode::CONFLICT, "invalid_state"),
            e if e.is_retryable() => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        // The caller's mistakes are explained; internal faults are logged here and answered
        // without their text (it may name tables, hosts or queries).
        let message = if e.is_internal() {
            tracing::warn!(error = %e, "request failed");
            if status == StatusCode::SERVICE_UNAVAILABLE {
                "the database or the broker is unavailable; retry later".to_owned()
            } else {
                "internal error; see the orchestrator's log".to_owned()
            }
        } else {
            e.to_string()
        };
        let mut err = ApiError::new(status, code, message);
        if let ServiceError::IdempotencyConflict { task_id, .. }
        | ServiceError::TaskIdConflict(task_id) = e
        {
            err.body.error.task_id = Some(task_id);
        }
        err
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let status = if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            r.status()
        } else {
            StatusCode::BAD_REQUEST
        };
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "payload_too_large"
        } else {
            "invalid_request"
        };
        ApiError::new(status, code, r.body_text())
    }
}

type ApiResult<T> = Result<T, ApiError>;

async fn authenticate(State(shared): State<Shared>, req: Request, next: Next) -> Response {
    if shared.config.api_keys.is_empty() {
        return next.run(req).await;
    }
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match token {
        Some(t)
            if shared
                .config
                .api_keys
                .iter()
                .any(|k| constant_time_eq(k.as_bytes(), t.as_bytes())) =>
        {
            next.run(req).await
        }
        _ => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required",
        )
        .into_response(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn register_template(
    State(shared): State<Shared>,
    body: Result<Json<Template>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<RegisterResponse>)> {
    let Json(template) = body?;
    let outcome = service::templates::register(&shared, &template).await?;
    let status = if outcome == Registered::Created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(RegisterResponse {
            namespace: template.namespace,
            name: template.name,
            version: template.version,
            created: outcome == Registered::Created,
        }),
    ))
}

#[derive(Deserialize)]
struct TemplateQuery {
    namespace: Option<String>,
    version: Option<u32>,
}

fn template_view(t: &store::templates::StoredTemplate, full: bool) -> TemplateView {
    TemplateView {
        namespace: t.template.namespace.clone(),
        name: t.template.name.clone(),
        version: t.template.version,
        description: t.template.description.clone(),
        steps: t.template.steps.len(),
        created_at: store::rfc3339(t.created_at),
        template: full.then(|| (*t.template).clone()),
    }
}

async fn list_templates(
    State(shared): State<Shared>,
    Query(q): Query<TemplateQuery>,
) -> ApiResult<Json<Vec<TemplateView>>> {
    let all = service::templates::list(&shared, q.namespace.as_deref()).await?;
    Ok(Json(all.iter().map(|t| template_view(t, false)).collect()))
}

async fn show_template(
    State(shared): State<Shared>,
    Path((namespace, name)): Path<(String, String)>,
    Query(q): Query<TemplateQuery>,
) -> ApiResult<Json<TemplateView>> {
    let t = service::templates::find(&shared, &namespace, &name, q.version).await?;
    Ok(Json(template_view(&t, true)))
}

async fn submit_task(
    State(shared): State<Shared>,
    body: Result<Json<SubmitTask>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<SubmitResponse>)> {
    let Json(req) = body?;
    let created = service::tasks::submit(&shared, &req, None).await?;
    let status = if created.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(SubmitResponse {
            task_id: created.task_id,
            created: created.created,
        }),
    ))
}

#[derive(Deserialize)]
struct ShowQuery {
    /// Long-poll: answer as soon as the task is finished, or after this many milliseconds.
    wait_ms: Option<u64>,
}

/// Longest accepted long-poll.
const MAX_WAIT: Duration = Duration::from_secs(60);

async fn show_task(
    State(shared): State<Shared>,
    Path(id): Path<String>,
    Query(q): Query<ShowQuery>,
) -> ApiResult<Json<tasker_schemas::api::TaskView>> {
    let id = parse_task_id(&id)?;
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0)).min(MAX_WAIT);
    if !wait.is_zero() {
        // Subscribe before reading, so a finish between the read and the wait is not missed.
        let mut finished = shared.finished.subscribe();
        let state = service::tasks::state(&shared, id).await?;
        if state.is_live() {
            let _ = tokio::time::timeout(wait, async {
                loop {
                    match finished.recv().await {
                        Ok(done) if done == id => return,
                        Ok(_) => {}
                        // Missed some: the caller re-reads the state below either way.
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                }
            })
            .await;
        }
    }
    Ok(Json(views::task_view(
        service::tasks::detail(&shared, id).await?,
    )))
}

fn parse_task_id(id: &str) -> Result<TaskId, ApiError> {
    id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{id:?} is not a task id"),
        )
    })
}

#[derive(Deserialize, Default)]
struct CancelBody {
    reason: Option<String>,
}

async fn cancel_task(
    State(shared): State<Shared>,
    Path(id): Path<String>,
    body: Option<Json<CancelBody>>,
) -> ApiResult<Json<tasker_schemas::api::TaskView>> {
    let id = parse_task_id(&id)?;
    let reason = body.and_then(|Json(b)| b.reason);
    service::tasks::cancel(&shared, id, reason).await?;
    Ok(Json(views::task_view(
        service::tasks::detail(&shared, id).await?,
    )))
}

async fn retry_task(
    State(shared): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Json<tasker_schemas::api::TaskView>> {
    let id = parse_task_id(&id)?;
    service::tasks::retry(&shared, id).await?;
    Ok(Json(views::task_view(
        service::tasks::detail(&shared, id).await?,
    )))
}

#[derive(Deserialize)]
struct InstancesQuery {
    after: Option<u32>,
    limit: Option<i64>,
}

/// Largest page of instances.
const MAX_INSTANCES_PAGE: i64 = 500;

/// A mapped step's instances in index order, a page at a time (`after` = the last index seen;
/// `limit` at most 500, default 100): how a handler reads a mapped output too large for a step
/// message.
async fn list_instances(
    State(shared): State<Shared>,
    Path((id, step)): Path<(String, String)>,
    Query(q): Query<InstancesQuery>,
) -> ApiResult<Json<tasker_schemas::api::InstanceList>> {
    let id = parse_task_id(&id)?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=MAX_INSTANCES_PAGE).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("limit={limit} is out of range: 1 to {MAX_INSTANCES_PAGE}"),
        ));
    }
    let after = q.after.map(|a| a.min(i32::MAX as u32) as i32);
    let (rows, more) = service::tasks::instances(&shared, id, &step, after, limit).await?;
    Ok(Json(views::instance_list(rows, more)))
}

#[derive(Deserialize)]
struct ListQuery {
    namespace: Option<String>,
    state: Option<String>,
    template: Option<String>,
    after: Option<String>,
    limit: Option<i64>,
}

async fn list_tasks(
    State(shared): State<Shared>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<tasker_schemas::api::TaskList>> {
    let after = match q.after {
        Some(a) => Some(a.parse::<TaskId>().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("after={a:?} is not a task id"),
            )
        })?),
        None => None,
    };
    let state = match &q.state {
        Some(s) => Some(s.parse::<TaskState>().map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", e.to_string())
        })?),
        None => None,
    };
    let filter = ListFilter {
        namespace: q.namespace,
        state,
        template: q.template,
        after,
        limit: q.limit.unwrap_or(50),
    };
    let (rows, more) = service::tasks::list(&shared, &filter).await?;
    Ok(Json(views::task_list(rows, more)))
}

async fn ready(State(shared): State<Shared>) -> Response {
    let db = service::database_reachable(&shared, Duration::from_secs(2)).await;
    let broker = shared.publisher.is_connected();
    let body = serde_json::json!({ "database": db, "broker": broker });
    let status = if db && broker {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(shared): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        shared.metrics.render(),
    )
        .into_response()
}
