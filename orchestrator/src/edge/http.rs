//! The HTTP API (`/v1/...`), health, readiness and metrics. Handlers decode, call a service and
//! encode; errors map to status codes here, and an internal fault never reaches the caller as
//! database or broker text.
//!
//! Every error answer is JSON (`{"error": {"code", "message"}}`): the API's own, the framework's
//! rejections (bad query strings, bodies, content types), unknown paths, wrong methods and
//! timeouts alike.
//!
//! [`serve`] bounds the server: at most `http_max_connections` open connections (more wait in
//! the listen backlog), `http_idle_timeout_ms` for a connection without a request being
//! handled (idle keep-alive, slowly sent headers, an answer not read), `http_request_timeout_ms`
//! per request (body read included; a long-poll gets its wait on top) and
//! `http_max_long_polls` long-polls waiting at once.
//!
//! With a TLS acceptor ([`crate::tls::http_acceptor`]) it serves HTTPS only. The TLS handshake
//! runs inside the connection's own I/O (its first read), never in the accept loop: a slow or
//! silent client holds up nobody else, is bounded by the idle timeout like any idle connection,
//! and a failed handshake is logged at debug level and the connection dropped.

use super::views;
use crate::auth::{Principal, Role};
use crate::service::{self, ServiceError, Shared};
use crate::store::{self, templates::Registered, views::ListFilter};
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, OptionalFromRequest, Path, Query, Request,
    State,
};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::{IncomingStream, Listener};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tasker_schemas::api::{
    ErrorBody, ErrorDetail, MAX_TASK_PAGE, RegisterResponse, SubmitResponse, SubmitTask,
    TemplateView,
};
use tasker_schemas::{TaskId, TaskState, Template};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

/// The router, with body limits, (when keys are configured) bearer authentication on `/v1`,
/// request timeouts, the long-poll cap, and JSON answers for unknown paths and wrong methods.
pub fn router(shared: Shared) -> Router {
    let long_polls = LongPolls(Arc::new(Semaphore::new(shared.config.http_max_long_polls)));
    let v1 = Router::new()
        .route("/templates", post(register_template).get(list_templates))
        .route("/templates/{namespace}/{name}", get(show_template))
        .route("/tasks", post(submit_task).get(list_tasks))
        .route("/tasks/{id}", get(show_task))
        .route("/tasks/{id}/cancel", post(cancel_task))
        .route("/tasks/{id}/retry", post(retry_task))
        .route("/tasks/{id}/signals/{name}", post(send_signal))
        .route("/tasks/{id}/steps/{step}/instances", get(list_instances))
        .route("/workers", get(list_workers))
        .route("/schedules", post(create_schedule).get(list_schedules))
        .route(
            "/schedules/{id}",
            get(show_schedule).delete(delete_schedule),
        )
        .route("/schedules/{id}/pause", post(pause_schedule))
        .route("/schedules/{id}/resume", post(resume_schedule))
        .route("/tasks/{id}/steps/{step}/retry", post(retry_step))
        .route("/tasks/{id}/steps/{step}/rerun", post(rerun_step))
        .route("/tasks/{id}/steps/{step}/succeed", post(succeed_step))
        .route("/tasks/bulk/count", post(bulk_count))
        .route("/tasks/bulk/cancel", post(bulk_cancel))
        .route("/tasks/bulk/retry", post(bulk_retry))
        .route("/dead-letters", get(list_dead_letters))
        .route("/dead-letters/replay", post(replay_dead_letters))
        .route("/dead-letters/discard", post(discard_dead_letters))
        .route("/dead-letters/{id}", get(show_dead_letter))
        .route("/tasks/{id}/purge", post(purge_task))
        .route("/keys", post(create_key).get(list_keys))
        .route("/keys/{id}/revoke", post(revoke_key))
        .route("/audit", get(list_audit))
        .route("/namespaces", get(list_namespaces))
        .route("/namespaces/{namespace}", axum::routing::put(set_namespace))
        .route_layer(middleware::from_fn_with_state(shared.clone(), authenticate))
        .method_not_allowed_fallback(method_not_allowed);
    Router::new()
        .nest("/v1", v1)
        .nest("/ui", crate::console::router())
        .route("/health", get(|| async { "ok" }))
        .merge(
            Router::new()
                .route("/ready", get(ready))
                .route("/metrics", get(metrics))
                .route_layer(middleware::from_fn_with_state(
                    shared.clone(),
                    protect_metrics,
                )),
        )
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(Extension(long_polls))
        .layer(DefaultBodyLimit::max(shared.config.max_request_bytes))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            bound_request,
        ))
        .with_state(shared)
}

/// Serves the router on `listener` until `shutdown` completes, with the connection cap and the
/// idle timeout of the config (see the module's documentation); over TLS when `tls` is given.
pub async fn serve(
    listener: TcpListener,
    shared: Shared,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let listener = BoundedListener {
        inner: listener,
        permits: Arc::new(Semaphore::new(shared.config.http_max_connections.max(1))),
        idle: shared.config.http_idle_timeout(),
        tls,
    };
    let app = router(shared).into_make_service_with_connect_info::<Activity>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
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
            ServiceError::ScheduleNotFound(_) => (StatusCode::NOT_FOUND, "schedule_not_found"),
            ServiceError::ScheduleConflict { .. } => (StatusCode::CONFLICT, "schedule_conflict"),
            ServiceError::SignalRefused(_) => (StatusCode::CONFLICT, "signal_refused"),
            ServiceError::InvalidState { .. } | ServiceError::ActionRefused { .. } => {
                (StatusCode::CONFLICT, "invalid_state")
            }
            ServiceError::BulkRefused { .. } => (StatusCode::CONFLICT, "bulk_refused"),
            ServiceError::DeadLetterNotFound(_) => (StatusCode::NOT_FOUND, "dead_letter_not_found"),
            ServiceError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ServiceError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
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
        match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::new(r.status(), "payload_too_large", r.body_text())
            }
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(
                r.status(),
                "unsupported_media_type",
                "the body must be JSON, sent with Content-Type: application/json",
            ),
            _ => ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", r.body_text()),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", r.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        // A path that matched a route but whose parameters cannot be read (bad percent-encoding).
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", r.body_text())
    }
}

/// `Json`, refusing with an [`ApiError`]. `Option<ApiJson<T>>`: `None` without a
/// `Content-Type` header (the body is then ignored).
struct ApiJson<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let Json(value) = <Json<T> as FromRequest<S>>::from_request(req, state).await?;
        Ok(ApiJson(value))
    }
}

impl<T: DeserializeOwned, S: Send + Sync> OptionalFromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Option<Self>, ApiError> {
        let value = <Json<T> as OptionalFromRequest<S>>::from_request(req, state).await?;
        Ok(value.map(|Json(v)| ApiJson(v)))
    }
}

/// `Query`, refusing with an [`ApiError`] (`?limit=abc`).
struct ApiQuery<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Query(value) = Query::<T>::from_request_parts(parts, state).await?;
        Ok(ApiQuery(value))
    }
}

/// `Path`, refusing with an [`ApiError`].
struct ApiPath<T>(T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(value) = Path::<T>::from_request_parts(parts, state).await?;
        Ok(ApiPath(value))
    }
}

/// Any path without a route.
async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no such path: {method} {}", uri.path()),
    )
}

/// A path with a route, but not for this method (the `Allow` header lists those it has).
async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("method {method} is not allowed on this path"),
    )
}

/// Bounds every request: marks its connection busy (see [`Activity`]) and answers
/// `503 timeout` when it takes longer than `http_request_timeout_ms`, plus its wait for a
/// long-poll.
async fn bound_request(State(shared): State<Shared>, req: Request, next: Next) -> Response {
    let _busy = req
        .extensions()
        .get::<ConnectInfo<Activity>>()
        .map(|ConnectInfo(activity)| activity.busy());
    let Some(limit) = shared.config.http_request_timeout() else {
        return next.run(req).await;
    };
    let limit = limit + long_poll_wait(&req);
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!(
                "the request did not finish within {} ms; retry later",
                limit.as_millis()
            ),
        )
        .into_response(),
    }
}

/// The wait of a long-poll (`GET /v1/tasks/{id}?wait_ms=N`, capped at [`MAX_WAIT`]); zero for
/// any other request.
fn long_poll_wait(req: &Request) -> Duration {
    let segments: Vec<&str> = req.uri().path().split('/').collect();
    if req.method() != Method::GET
        || !matches!(segments[..], ["", "v1", "tasks", id] if !id.is_empty())
    {
        return Duration::ZERO;
    }
    Query::<ShowQuery>::try_from_uri(req.uri())
        .ok()
        .and_then(|Query(q)| q.wait_ms)
        .map_or(Duration::ZERO, |ms| Duration::from_millis(ms).min(MAX_WAIT))
}

type ApiResult<T> = Result<T, ApiError>;

/// Puts the request's [`Principal`] on it: with authentication off, [`Principal::anonymous`];
/// otherwise the bearer key's (401 without a known, unrevoked key).
async fn authenticate(State(shared): State<Shared>, mut req: Request, next: Next) -> Response {
    match principal_of(&shared, req.headers()).await {
        Ok(who) => {
            req.extensions_mut().insert(who);
            next.run(req).await
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// `/metrics` and `/ready` need a key (any role) when `TASKER_PROTECT_METRICS` is on.
async fn protect_metrics(State(shared): State<Shared>, req: Request, next: Next) -> Response {
    if shared.config.protect_metrics
        && let Err(e) = principal_of(&shared, req.headers()).await
    {
        return ApiError::from(e).into_response();
    }
    next.run(req).await
}

/// Who sent a request, from its `Authorization: Bearer <key>` header.
pub async fn principal_of(
    shared: &Shared,
    headers: &axum::http::HeaderMap,
) -> Result<Principal, ServiceError> {
    if !shared.config.auth_enabled() {
        return Ok(Principal::anonymous());
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ServiceError::Unauthorized(
                "an API key is required: send `Authorization: Bearer <key>`".into(),
            )
        })?;
    if token.len() > MAX_TOKEN_LEN {
        return Err(ServiceError::Unauthorized("unknown API key".into()));
    }
    service::keys::authenticate(shared, token).await
}

/// Longer bearer tokens are refused without a lookup.
const MAX_TOKEN_LEN: usize = 512;

async fn register_template(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiJson(template): ApiJson<Template>,
) -> ApiResult<(StatusCode, Json<RegisterResponse>)> {
    let outcome = service::templates::register(&shared, &who, &template).await?;
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
    Extension(who): Extension<Principal>,
    ApiQuery(q): ApiQuery<TemplateQuery>,
) -> ApiResult<Json<Vec<TemplateView>>> {
    let all = service::templates::list(&shared, &who, q.namespace.as_deref()).await?;
    Ok(Json(all.iter().map(|t| template_view(t, false)).collect()))
}

async fn list_workers(
    State(shared): State<Shared>,
) -> ApiResult<Json<tasker_schemas::api::WorkerList>> {
    let workers = service::workers::live(&shared).await?;
    Ok(Json(tasker_schemas::api::WorkerList {
        workers: workers.into_iter().map(super::views::worker_view).collect(),
    }))
}

async fn show_template(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiPath((namespace, name)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<TemplateQuery>,
) -> ApiResult<Json<TemplateView>> {
    service::name_arg("namespace", &namespace)?;
    service::keys::require(&who, Role::Read, &namespace, "read templates")?;
    let t = service::templates::find(&shared, &namespace, &name, q.version).await?;
    Ok(Json(template_view(&t, true)))
}

async fn submit_task(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    headers: axum::http::HeaderMap,
    ApiJson(req): ApiJson<SubmitTask>,
) -> ApiResult<(StatusCode, Json<SubmitResponse>)> {
    // A W3C `traceparent` header: the task's trace continues the caller's.
    let traceparent = headers
        .get(tasker_schemas::message::HEADER_TRACEPARENT)
        .and_then(|v| v.to_str().ok());
    let created = service::tasks::submit_traced(&shared, &who, &req, None, traceparent).await?;
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

/// Longest long-poll: a larger `wait_ms` counts as this (it is not refused).
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// The long-polls that may wait at once (`http_max_long_polls`).
#[derive(Clone)]
struct LongPolls(Arc<Semaphore>);

async fn show_task(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    Extension(long_polls): Extension<LongPolls>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ShowQuery>,
) -> ApiResult<Json<tasker_schemas::api::TaskView>> {
    let id = parse_task_id(&id)?;
    // Refused before any wait: a key outside the task's namespace learns nothing by waiting.
    service::tasks::authorize(&shared, &who, id, Role::Read, "read tasks").await?;
    let wait = Duration::from_millis(q.wait_ms.unwrap_or(0)).min(MAX_WAIT);
    // Over the cap, a long-poll answers at once with the task as it is (which the contract
    // allows: a caller asks again until the task is finished).
    let permit = (!wait.is_zero())
        .then(|| long_polls.0.try_acquire_owned().ok())
        .flatten();
    if !wait.is_zero() && permit.is_none() {
        tracing::debug!(task_id = %id, "too many long-polls waiting: answering at once");
    }
    if let Some(_permit) = permit {
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
        service::tasks::detail(&shared, &who, id).await?,
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
    Extension(who): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
    body: Option<ApiJson<CancelBody>>,
) -> ApiResult<Json<tasker_schemas::api::TaskView>> {
    let id = parse_task_id(&id)?;
    let reason = body.and_then(|ApiJson(b)| b.reason);
    service::tasks::cancel(&shared, &who, id, reason).await?;
    Ok(Json(views::task_view(
        service::tasks::detail(&shared, &who, id).await?,
    )))
}

async fn retry_task(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<tasker_schemas::api::TaskView>> {
    let id = parse_task_id(&id)?;
    service::tasks::retry(&shared, &who, id).await?;
    Ok(Json(views::task_view(
        service::tasks::detail(&shared, &who, id).await?,
    )))
}

/// Sends a signal to a task: 201 when recorded, 200 for a repeat of the same `signal_id` (the
/// first signal's answer), 409 for a finished task or a name no step waits for.
async fn send_signal(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiPath((id, name)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<tasker_schemas::api::SendSignal>,
) -> ApiResult<(StatusCode, Json<tasker_schemas::api::SignalResponse>)> {
    let id = parse_task_id(&id)?;
    let answer = service::waits::send(&shared, &who, id, &name, &body).await?;
    let status = if answer.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(answer)))
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
    Extension(who): Extension<Principal>,
    ApiPath((id, step)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<InstancesQuery>,
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
    let (rows, more) = service::tasks::instances(&shared, &who, id, &step, after, limit).await?;
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

/// A page of task summaries (no context, output, steps or history), newest first: `limit` 1 to
/// [`MAX_TASK_PAGE`], default 50.
async fn list_tasks(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<tasker_schemas::api::TaskList>> {
    let limit = q.limit.unwrap_or(50);
    if !(1..=i64::from(MAX_TASK_PAGE)).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("limit={limit} is out of range: 1 to {MAX_TASK_PAGE}"),
        ));
    }
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
        scope: None,
        state,
        template: q.template,
        after,
        limit,
    };
    let (rows, more) = service::tasks::list(&shared, &who, &filter).await?;
    Ok(Json(views::task_list(rows, more)))
}

fn parse_schedule_id(id: &str) -> Result<uuid::Uuid, ApiError> {
    id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{id:?} is not a schedule id"),
        )
    })
}

/// Runs shown by `GET /v1/schedules/{id}`.
const NEXT_RUNS: usize = 5;

async fn create_schedule(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiJson(req): ApiJson<tasker_schemas::api::CreateSchedule>,
) -> ApiResult<(StatusCode, Json<tasker_schemas::api::ScheduleView>)> {
    let row = service::schedules::create(&shared, &who, &req).await?;
    let (runs, tz) = service::schedules::next_runs(&shared, &row, NEXT_RUNS).await?;
    Ok((
        StatusCode::CREATED,
        Json(views::schedule_view(row, &runs, tz)),
    ))
}

#[derive(Deserialize)]
struct ScheduleListQuery {
    namespace: Option<String>,
    limit: Option<u32>,
}

/// Schedules by namespace and name: `limit` 1 to [`tasker_schemas::api::MAX_SCHEDULE_PAGE`],
/// default 100.
async fn list_schedules(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiQuery(q): ApiQuery<ScheduleListQuery>,
) -> ApiResult<Json<tasker_schemas::api::ScheduleList>> {
    let rows = service::schedules::list(
        &shared,
        &who,
        q.namespace.as_deref(),
        q.limit.unwrap_or(100),
    )
    .await?;
    Ok(Json(tasker_schemas::api::ScheduleList {
        schedules: rows
            .into_iter()
            .map(|r| views::schedule_view(r, &[], None))
            .collect(),
    }))
}

async fn show_schedule(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<tasker_schemas::api::ScheduleView>> {
    let row = service::schedules::get(&shared, &who, parse_schedule_id(&id)?).await?;
    let (runs, tz) = service::schedules::next_runs(&shared, &row, NEXT_RUNS).await?;
    Ok(Json(views::schedule_view(row, &runs, tz)))
}

async fn pause_schedule(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<tasker_schemas::api::ScheduleView>> {
    let row = service::schedules::pause(&shared, &who, parse_schedule_id(&id)?).await?;
    Ok(Json(views::schedule_view(row, &[], None)))
}

async fn resume_schedule(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<tasker_schemas::api::ScheduleView>> {
    let row = service::schedules::resume(&shared, &who, parse_schedule_id(&id)?).await?;
    let (runs, tz) = service::schedules::next_runs(&shared, &row, NEXT_RUNS).await?;
    Ok(Json(views::schedule_view(row, &runs, tz)))
}

async fn delete_schedule(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<tasker_schemas::api::ScheduleView>> {
    let row = service::schedules::delete(&shared, &who, parse_schedule_id(&id)?).await?;
    Ok(Json(views::schedule_view(row, &[], None)))
}

async fn purge_task(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<tasker_schemas::api::TaskView>> {
    let id = parse_task_id(&id)?;
    service::tasks::purge(&shared, &who, id).await?;
    Ok(Json(views::task_view(
        service::tasks::detail(&shared, &who, id).await?,
    )))
}

async fn create_key(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiJson(req): ApiJson<tasker_schemas::api::CreateKey>,
) -> ApiResult<(StatusCode, Json<tasker_schemas::api::CreatedKey>)> {
    let role = Role::parse(&req.role).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "role {:?} is not one of read, submit, operate, admin",
                req.role
            ),
        )
    })?;
    let namespaces = if req
        .namespaces
        .iter()
        .any(|n| n == crate::auth::EVERY_NAMESPACE)
    {
        if req.namespaces.len() > 1 {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "namespaces is either [\"*\"] (every namespace) or a list of namespaces, not both",
            ));
        }
        None
    } else {
        Some(req.namespaces)
    };
    let created = service::keys::create(&shared, &who, &req.name, role, namespaces).await?;
    Ok((
        StatusCode::CREATED,
        Json(tasker_schemas::api::CreatedKey {
            key: views::key_view(created.key),
            token: created.token,
        }),
    ))
}

#[derive(Deserialize)]
struct KeysQuery {
    #[serde(default)]
    revoked: bool,
}

async fn list_keys(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiQuery(q): ApiQuery<KeysQuery>,
) -> ApiResult<Json<tasker_schemas::api::KeyList>> {
    let keys = service::keys::list(&shared, &who, q.revoked).await?;
    Ok(Json(tasker_schemas::api::KeyList {
        keys: keys.into_iter().map(views::key_view).collect(),
    }))
}

async fn revoke_key(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<tasker_schemas::api::KeyView>> {
    let id: uuid::Uuid = id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{id:?} is not a key id"),
        )
    })?;
    let key = service::keys::revoke(&shared, &who, id).await?;
    Ok(Json(views::key_view(key)))
}

#[derive(Deserialize)]
struct AuditQuery {
    task_id: Option<String>,
    namespace: Option<String>,
    action: Option<String>,
    before: Option<i64>,
    limit: Option<i64>,
}

async fn list_audit(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<Json<tasker_schemas::api::AuditList>> {
    let limit = q.limit.unwrap_or(100);
    if !(1..=service::audit::MAX_AUDIT_PAGE).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "limit={limit} is out of range: 1 to {}",
                service::audit::MAX_AUDIT_PAGE
            ),
        ));
    }
    let task_id = q.task_id.as_deref().map(parse_task_id).transpose()?;
    if let Some(n) = &q.namespace {
        service::name_arg("namespace", n)?;
    }
    if let Some(a) = &q.action
        && (a.len() > 64 || a.contains('\0'))
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "action is at most 64 bytes, without NUL",
        ));
    }
    let filter = store::audit::AuditFilter {
        task_id: task_id.map(|t| t.0),
        namespace: q.namespace,
        scope: None,
        action: q.action,
        before: q.before,
        limit,
    };
    let rows = service::audit::list(&shared, &who, filter).await?;
    let next_before = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| r.id))
        .flatten();
    Ok(Json(tasker_schemas::api::AuditList {
        entries: rows.into_iter().map(views::audit_entry).collect(),
        next_before,
    }))
}

async fn list_namespaces(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
) -> ApiResult<Json<tasker_schemas::api::NamespaceList>> {
    let rows = service::namespaces::list(&shared, &who).await?;
    Ok(Json(tasker_schemas::api::NamespaceList {
        namespaces: rows.into_iter().map(views::namespace_view).collect(),
    }))
}

async fn set_namespace(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiPath(namespace): ApiPath<String>,
    ApiJson(req): ApiJson<tasker_schemas::api::SetNamespace>,
) -> ApiResult<Json<tasker_schemas::api::NamespaceView>> {
    let row =
        service::namespaces::set_retention(&shared, &who, &namespace, req.retention_ms).await?;
    Ok(Json(views::namespace_view(row)))
}

// --- Operator actions and dead letters (service::operate, service::dead_letters) -------------

fn parse_time(
    what: &str,
    t: Option<&str>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, ApiError> {
    t.map(|t| {
        chrono::DateTime::parse_from_rfc3339(t)
            .map(|t| t.with_timezone(&chrono::Utc))
            .map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    format!("{what}={t:?} is not an RFC 3339 time"),
                )
            })
    })
    .transpose()
}

fn bulk_filter(
    b: &tasker_schemas::operate::BulkFilterBody,
) -> Result<service::operate::BulkFilter, ApiError> {
    Ok(service::operate::BulkFilter {
        state: b.state,
        namespace: b.namespace.clone(),
        template: b.template.clone(),
        created_after: parse_time("created_after", b.created_after.as_deref())?,
        created_before: parse_time("created_before", b.created_before.as_deref())?,
    })
}

/// `POST /v1/tasks/{id}/steps/{step}/retry`: retry one failed step.
async fn retry_step(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiPath((id, step)): ApiPath<(String, String)>,
) -> ApiResult<Json<tasker_schemas::api::TaskView>> {
    let id = parse_task_id(&id)?;
    service::operate::retry_step(&shared, &who, id, &step).await?;
    Ok(Json(views::task_view(
        service::tasks::detail(&shared, &who, id).await?,
    )))
}

/// `POST /v1/tasks/{id}/steps/{step}/rerun`: rerun from a step.
async fn rerun_step(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiPath((id, step)): ApiPath<(String, String)>,
) -> ApiResult<Json<tasker_schemas::api::TaskView>> {
    let id = parse_task_id(&id)?;
    service::operate::rerun_from(&shared, &who, id, &step).await?;
    Ok(Json(views::task_view(
        service::tasks::detail(&shared, &who, id).await?,
    )))
}

/// `POST /v1/tasks/{id}/steps/{step}/succeed` with `{"output": …}`: mark a failed step
/// succeeded.
async fn succeed_step(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiPath((id, step)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<tasker_schemas::operate::SucceedStep>,
) -> ApiResult<Json<tasker_schemas::api::TaskView>> {
    let id = parse_task_id(&id)?;
    service::operate::mark_succeeded(&shared, &who, id, &step, body.output).await?;
    Ok(Json(views::task_view(
        service::tasks::detail(&shared, &who, id).await?,
    )))
}

/// `POST /v1/tasks/bulk/count`: how many tasks a filter matches (up to the cap + 1).
async fn bulk_count(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiJson(body): ApiJson<tasker_schemas::operate::BulkFilterBody>,
) -> ApiResult<Json<tasker_schemas::operate::BulkCount>> {
    let count = service::operate::bulk_count(&shared, &who, &bulk_filter(&body)?).await?;
    Ok(Json(tasker_schemas::operate::BulkCount {
        count,
        max: service::operate::MAX_BULK_TASKS,
    }))
}

async fn bulk_act(
    shared: &Shared,
    who: &Principal,
    body: &tasker_schemas::operate::BulkAction,
    retry: bool,
) -> ApiResult<Json<tasker_schemas::operate::BulkOutcomeView>> {
    let filter = bulk_filter(&body.filter())?;
    let out = if retry {
        service::operate::bulk_retry(shared, who, &filter, body.expected_count).await?
    } else {
        service::operate::bulk_cancel(shared, who, &filter, body.expected_count).await?
    };
    Ok(Json(tasker_schemas::operate::BulkOutcomeView {
        matched: out.matched,
        acted: out.acted,
        skipped: out.skipped,
    }))
}

/// `POST /v1/tasks/bulk/cancel` with the filter and `expected_count`.
async fn bulk_cancel(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiJson(body): ApiJson<tasker_schemas::operate::BulkAction>,
) -> ApiResult<Json<tasker_schemas::operate::BulkOutcomeView>> {
    bulk_act(&shared, &who, &body, false).await
}

/// `POST /v1/tasks/bulk/retry` with the filter and `expected_count`.
async fn bulk_retry(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiJson(body): ApiJson<tasker_schemas::operate::BulkAction>,
) -> ApiResult<Json<tasker_schemas::operate::BulkOutcomeView>> {
    bulk_act(&shared, &who, &body, true).await
}

/// `GET /v1/dead-letters`: newest first, filtered, a page at a time.
async fn list_dead_letters(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiQuery(q): ApiQuery<tasker_schemas::operate::DeadLetterQuery>,
) -> ApiResult<Json<tasker_schemas::operate::DeadLetterList>> {
    let filter = store::dead_letters::DeadLetterFilter {
        kind: q.kind,
        namespace: q.namespace,
        reason: q.reason,
        received_after: parse_time("after", q.after.as_deref())?,
        received_before: parse_time("before_time", q.before_time.as_deref())?,
        before_id: q.before,
        scope: None,
        limit: q.limit.unwrap_or(50),
    };
    let (rows, more) = service::dead_letters::list(&shared, &who, filter).await?;
    Ok(Json(super::dead_letters::list_view(rows, more)))
}

/// `GET /v1/dead-letters/{id}`: one dead letter with its body.
async fn show_dead_letter(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiPath(id): ApiPath<i64>,
) -> ApiResult<Json<tasker_schemas::operate::DeadLetterView>> {
    let d = service::dead_letters::show(&shared, &who, id).await?;
    Ok(Json(super::dead_letters::full_view(d)))
}

/// `POST /v1/dead-letters/replay` with `{"ids": [...]}`.
async fn replay_dead_letters(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiJson(body): ApiJson<tasker_schemas::operate::DeadLetterIds>,
) -> ApiResult<Json<tasker_schemas::operate::DeadLetterOutcomes>> {
    let out = service::dead_letters::replay(&shared, &who, &body.ids).await?;
    Ok(Json(super::dead_letters::outcomes_view(out)))
}

/// `POST /v1/dead-letters/discard` with `{"ids": [...]}`.
async fn discard_dead_letters(
    State(shared): State<Shared>,
    Extension(who): Extension<Principal>,
    ApiJson(body): ApiJson<tasker_schemas::operate::DeadLetterIds>,
) -> ApiResult<Json<tasker_schemas::operate::DeadLetterOutcomes>> {
    let out = service::dead_letters::discard(&shared, &who, &body.ids).await?;
    Ok(Json(super::dead_letters::outcomes_view(out)))
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

/// What a connection is doing, shared by its [`Connection`] (which enforces the idle timeout)
/// and the requests it carries (which mark it busy): the requests being handled, and since when
/// none is.
#[derive(Clone)]
pub struct Activity(Arc<Mutex<ActivityState>>);

struct ActivityState {
    in_flight: usize,
    idle_since: Instant,
}

impl Activity {
    fn new() -> Self {
        Self(Arc::new(Mutex::new(ActivityState {
            in_flight: 0,
            idle_since: Instant::now(),
        })))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks a request in flight until the guard drops.
    pub(crate) fn busy(&self) -> Busy {
        self.state().in_flight += 1;
        Busy(self.clone())
    }

    /// Since when no request has been handled; `None` while one is.
    fn idle_since(&self) -> Option<Instant> {
        let state = self.state();
        (state.in_flight == 0).then_some(state.idle_since)
    }
}

pub(crate) struct Busy(Activity);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.in_flight -= 1;
        if state.in_flight == 0 {
            state.idle_since = Instant::now();
        }
    }
}

impl Connected<IncomingStream<'_, BoundedListener>> for Activity {
    fn connect_info(stream: IncomingStream<'_, BoundedListener>) -> Self {
        stream.io().activity.clone()
    }
}

/// A TCP listener that holds at most as many connections as it has permits: it accepts the next
/// one only once an open one has closed (the others wait in the kernel's listen backlog). With a
/// TLS acceptor, each connection starts with its handshake, which the connection itself drives.
pub struct BoundedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    idle: Option<Duration>,
    tls: Option<TlsAcceptor>,
}

impl Listener for BoundedListener {
    type Io = Connection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Connection, SocketAddr) {
        // Never closed: this listener holds the semaphore.
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the connection semaphore is never closed");
        let (tcp, addr) = Listener::accept(&mut self.inner).await;
        // Small requests and answers: do not let Nagle's algorithm hold them back.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let stream = match &self.tls {
            // No I/O here: the handshake runs when the connection is first read or written.
            Some(acceptor) => Stream::Handshake(Box::new(acceptor.accept(tcp))),
            None => Stream::Plain(tcp),
        };
        let connection = Connection {
            stream,
            peer: addr,
            activity: Activity::new(),
            idle: self.idle,
            timer: None,
            _permit: permit,
        };
        (connection, addr)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// An accepted connection: it holds its permit of the [`BoundedListener`] until it closes, and
/// fails its reads and writes once it has gone without a request being handled for longer than
/// the idle timeout (which closes it). A request being handled is bounded by the request timeout
/// instead.
pub struct Connection {
    stream: Stream,
    peer: SocketAddr,
    activity: Activity,
    idle: Option<Duration>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    _permit: OwnedSemaphorePermit,
}

/// The bytes of a [`Connection`]: plain TCP, or TLS once its handshake is done.
enum Stream {
    Plain(TcpStream),
    /// The TLS handshake, driven by the connection's reads and writes.
    Handshake(Box<tokio_rustls::Accept<TcpStream>>),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// The handshake failed: every read and write fails.
    Failed,
}

/// What a [`Stream`] carries data over.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Connection {
    /// The stream to read or write, once the TLS handshake (if any) is done: drives the
    /// handshake, and fails for good if it failed.
    fn poll_io(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<&mut dyn Io>> {
        if let Stream::Handshake(accept) = &mut self.stream {
            match Pin::new(accept.as_mut()).poll(cx) {
                Poll::Ready(Ok(tls)) => self.stream = Stream::Tls(Box::new(tls)),
                Poll::Ready(Err(e)) => {
                    tracing::debug!(peer = %self.peer, error = %e, "TLS handshake failed; connection dropped");
                    self.stream = Stream::Failed;
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        match &mut self.stream {
            Stream::Plain(tcp) => Poll::Ready(Ok(tcp)),
            Stream::Tls(tls) => Poll::Ready(Ok(tls.as_mut())),
            Stream::Handshake(_) | Stream::Failed => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the TLS handshake failed",
            ))),
        }
    }

    /// Called when the socket is not ready: `Pending` (woken at the idle deadline), or the
    /// error that closes a connection idle for too long.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let (Some(idle), Some(since)) = (self.idle, self.activity.idle_since()) else {
            return Poll::Pending;
        };
        let deadline = tokio::time::Instant::from_std(since + idle);
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "HTTP connection without a request for longer than the idle timeout",
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = match this.poll_io(cx) {
            Poll::Ready(Ok(io)) => Pin::new(io).poll_read(cx, buf),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        };
        match polled {
            Poll::Pending => this.poll_idle(cx).map(Err),
            ready => ready,
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = match this.poll_io(cx) {
            Poll::Ready(Ok(io)) => Pin::new(io).poll_write(cx, buf),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        };
        match polled {
            Poll::Pending => this.poll_idle(cx).map(Err),
            ready => ready,
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = match this.poll_io(cx) {
            Poll::Ready(Ok(io)) => Pin::new(io).poll_write_vectored(cx, bufs),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        };
        match polled {
            Poll::Pending => this.poll_idle(cx).map(Err),
            ready => ready,
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(tcp) => tcp.is_write_vectored(),
            Stream::Tls(tls) => tls.is_write_vectored(),
            Stream::Handshake(_) | Stream::Failed => false,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
            // Nothing written yet, or nothing to write ever.
            Stream::Handshake(_) | Stream::Failed => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
            // Dropping the connection closes the socket.
            Stream::Handshake(_) | Stream::Failed => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, uri: &str) -> Request {
        Request::builder()
            .method(method)
            .uri(uri)
            .body(axum::body::Body::empty())
            .expect("a request")
    }

    #[test]
    fn only_a_long_poll_gets_its_wait_on_top_of_the_request_timeout() {
        let id = TaskId::new();
        let wait = |method: Method, uri: &str| long_poll_wait(&request(method, uri));
        assert_eq!(
            wait(Method::GET, &format!("/v1/tasks/{id}?wait_ms=1500")),
            Duration::from_millis(1500)
        );
        // Capped at MAX_WAIT, like the wait itself.
        assert_eq!(
            wait(Method::GET, &format!("/v1/tasks/{id}?wait_ms=999999999")),
            MAX_WAIT
        );
        for (method, uri) in [
            (Method::GET, format!("/v1/tasks/{id}")),
            (Method::GET, format!("/v1/tasks/{id}?wait_ms=soon")),
            (Method::POST, format!("/v1/tasks/{id}?wait_ms=1500")),
            (Method::GET, "/v1/tasks?wait_ms=1500".to_owned()),
            (
                Method::GET,
                format!("/v1/tasks/{id}/steps/s/instances?wait_ms=1500"),
            ),
            (Method::GET, "/v1/templates/a?wait_ms=1500".to_owned()),
        ] {
            assert_eq!(wait(method.clone(), &uri), Duration::ZERO, "{method} {uri}");
        }
    }
}
