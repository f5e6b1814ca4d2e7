//! [`Client`]: the orchestrator's HTTP API (`/v1/...`) for services that register templates,
//! submit tasks and wait for them.
//!
//! ```no_run
//! use std::time::Duration;
//! use serde_json::json;
//! use tasker_schemas::api::SubmitTask;
//! use tasker_client::Client;
//!
//! # async fn example() -> Result<(), tasker_client::ClientError> {
//! let client = Client::new("http://127.0.0.1:8080").with_api_key("secret");
//! let submitted = client
//!     .submit(&SubmitTask {
//!         namespace: "shop".into(),
//!         template: "order_fulfilment".into(),
//!         version: None,
//!         context: json!({"order_id": "o-1"}),
//!         idempotency_key: Some("order-o-1".into()),
//!         priority: 0,
//!         task_id: None,
//!         run_at: None,
//!         delay: None,
//!         deadline: None,
//!     })
//!     .await?;
//! let task = client.wait(submitted.task_id, Duration::from_secs(60)).await?;
//! println!("task {} is {}", task.id, task.state);
//! # Ok(())
//! # }
//! ```

use crate::tls::{TlsError, install_crypto_provider, read_ca_pem};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tasker_schemas::api::{
    ErrorBody, InstanceList, RegisterResponse, SubmitResponse, SubmitTask, TaskList, TaskView,
    TemplateView,
};
use tasker_schemas::{TaskId, TaskState, Template};

/// The longest single long-poll request [`Client::wait`] makes.
const MAX_POLL: Duration = Duration::from_secs(20);
/// Extra time a long-poll request may take beyond what it asks the server to wait.
const POLL_SLACK: Duration = Duration::from_secs(10);
/// If the server answers faster than this without the task finished, wait before asking again.
const MIN_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// What went wrong talking to the orchestrator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The request did not get an answer (connection refused, timeout, bad URL, a server
    /// certificate that is not trusted, ...). Its [`source`](std::error::Error::source) chain
    /// says why (e.g. `invalid peer certificate: UnknownIssuer`).
    #[error("HTTP request failed: {0}")]
    Http(#[from] reqwest::Error),
    /// A CA certificate given to [`ClientBuilder::ca_cert`] cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// [`ClientBuilder::build`] could not set up the HTTP client.
    #[error("cannot set up the HTTP client: {0}")]
    Setup(String),
    /// The server answered with an error body.
    #[error("the orchestrator answered {status} {code}: {message}")]
    Api {
        status: u16,
        /// Stable machine-readable code, e.g. `template_not_found`, `idempotency_conflict`.
        code: String,
        message: String,
        /// For `idempotency_conflict`: the task that holds the key.
        task_id: Option<TaskId>,
    },
    /// The server answered something this client cannot read.
    #[error("unexpected answer {status} from the orchestrator: {body}")]
    UnexpectedResponse { status: u16, body: String },
    /// [`Client::wait`] gave up; the task was still running.
    #[error("task {task_id} did not finish within {timeout:?} (last state: {state})")]
    Timeout {
        task_id: TaskId,
        timeout: Duration,
        state: TaskState,
    },
}

impl ClientError {
    /// True when the same request may succeed later: no answer, a 5xx, 429, or a wait that
    /// timed out.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Http(_) | Self::Timeout { .. } => true,
            Self::Api { status, .. } | Self::UnexpectedResponse { status, .. } => {
                *status >= 500 || *status == 429
            }
            Self::Tls(_) | Self::Setup(_) => false,
        }
    }

    /// The HTTP status of an error answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } | Self::UnexpectedResponse { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Configures a [`Client`]; start with [`Client::builder`].
#[must_use]
pub struct ClientBuilder {
    base_url: String,
    api_key: Option<String>,
    ca_certs: Vec<PathBuf>,
    ca_pems: Vec<String>,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("ca_certs", &self.ca_certs)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// Sends `Authorization: Bearer {api_key}` with every request.
    pub fn api_key(mut self, api_key: impl Into<String>) -> Self {
        self.api_key = Some(api_key.into());
        self
    }

    /// Also trusts the CA certificates of this PEM file (read by [`build`](Self::build)) for
    /// `https://`, on top of the platform's roots.
    pub fn ca_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_certs.push(path.into());
        self
    }

    /// [`ca_cert`](Self::ca_cert) with the PEM text itself.
    pub fn ca_cert_pem(mut self, pem: impl Into<String>) -> Self {
        self.ca_pems.push(pem.into());
        self
    }

    /// Reads the CA files and builds the client. Fails with [`ClientError::Tls`] when a CA file
    /// cannot be read or holds no certificate.
    pub fn build(self) -> Result<Client, ClientError> {
        install_crypto_provider();
        let mut pems = self.ca_pems;
        for path in &self.ca_certs {
            pems.push(read_ca_pem(path)?);
        }
        let mut certs = Vec::new();
        for pem in &pems {
            crate::tls::parse_certificates(pem)
                .map_err(|e| ClientError::Setup(format!("invalid CA certificate: {e}")))?;
            certs.extend(
                reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                    .map_err(|e| ClientError::Setup(format!("invalid CA certificate: {e}")))?,
            );
        }
        let http = reqwest::Client::builder()
            .tls_certs_merge(certs)
            .build()
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        let client = Client::with_http_client(self.base_url, http);
        Ok(match self.api_key {
            Some(key) => client.with_api_key(key),
            None => client,
        })
    }
}

/// Filters for [`Client::list`]; every field is optional.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ListTasks {
    /// `pending`, `running`, `completed`, `failed` or `cancelled`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<TaskState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Most tasks in the page: 1 to 500 ([`tasker_schemas::api::MAX_TASK_PAGE`]; more is refused
    /// with `invalid_request`); 50 when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// The `next` of the previous page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<TaskId>,
}

/// HTTP client of the orchestrator API. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base_url: String,
    api_key: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Client {
    /// A client of the orchestrator at `base_url` (`http://127.0.0.1:8080`, or an `https://` URL
    /// whose certificate a CA of the platform vouches for; for a private CA, see
    /// [`Client::builder`]).
    pub fn new(base_url: impl Into<String>) -> Self {
        install_crypto_provider();
        Self::with_http_client(base_url, reqwest::Client::new())
    }

    /// Configures a client: an API key, and CA certificates to trust for `https://` on top of
    /// the platform's.
    ///
    /// ```no_run
    /// # fn example() -> Result<(), tasker_client::ClientError> {
    /// let client = tasker_client::Client::builder("https://tasker.internal:8443")
    ///     .ca_cert("/etc/tasker/ca.pem")
    ///     .api_key("secret")
    ///     .build()?;
    /// # Ok(()) }
    /// ```
    pub fn builder(base_url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            base_url: base_url.into(),
            api_key: None,
            ca_certs: Vec::new(),
            ca_pems: Vec::new(),
        }
    }

    /// A client using a `reqwest::Client` you configured (timeouts, proxies, ...). Call
    /// [`install_crypto_provider`](crate::tls::install_crypto_provider) before building it.
    pub fn with_http_client(base_url: impl Into<String>, http: reqwest::Client) -> Self {
        let base_url = base_url.into().trim_end_matches('/').to_owned();
        Self {
            http,
            base_url,
            api_key: None,
        }
    }

    /// Sends `Authorization: Bearer {api_key}` with every request.
    #[must_use]
    pub fn with_api_key(mut self, api_key: impl Into<String>) -> Self {
        self.api_key = Some(api_key.into());
        self
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `POST /v1/templates`. `created` is false when the same content was registered before.
    pub async fn register_template(
        &self,
        template: &Template,
    ) -> Result<RegisterResponse, ClientError> {
        self.send(self.request(Method::POST, "/v1/templates").json(template))
            .await
    }

    /// `POST /v1/tasks`. `created` is false when the idempotency key matched an existing task
    /// with the same body; a different body under the same key is an `idempotency_conflict`.
    pub async fn submit(&self, task: &SubmitTask) -> Result<SubmitResponse, ClientError> {
        self.send(self.request(Method::POST, "/v1/tasks").json(task))
            .await
    }

    /// `GET /v1/tasks/{id}`: the task with its steps.
    pub async fn task(&self, id: TaskId) -> Result<TaskView, ClientError> {
        self.send(self.request(Method::GET, &format!("/v1/tasks/{id}")))
            .await
    }

    /// `POST /v1/tasks/{id}/cancel`: stops admission at once and cancels unstarted steps; steps
    /// already running may still report. Returns the task as it is after the request.
    pub async fn cancel(&self, id: TaskId, reason: Option<&str>) -> Result<TaskView, ClientError> {
        let body = serde_json::json!({ "reason": reason });
        self.send(
            self.request(Method::POST, &format!("/v1/tasks/{id}/cancel"))
                .json(&body),
        )
        .await
    }

    /// `POST /v1/tasks/{id}/signals/{name}`: sends a signal with a payload. `created` is false
    /// for a repeat of the same `signal_id` (the answer is the first signal's); a finished task
    /// or a name no step of the task waits for is a 409 `signal_refused`.
    pub async fn signal(
        &self,
        id: TaskId,
        name: &str,
        signal_id: &str,
        payload: serde_json::Value,
    ) -> Result<tasker_schemas::api::SignalResponse, ClientError> {
        let body = tasker_schemas::api::SendSignal {
            signal_id: signal_id.to_owned(),
            payload,
        };
        self.send(
            self.request(Method::POST, &format!("/v1/tasks/{id}/signals/{name}"))
                .json(&body),
        )
        .await
    }

    /// `POST /v1/tasks/{id}/retry`: runs the failed, skipped and cancelled steps of a failed or
    /// cancelled task again, with new attempt numbers.
    pub async fn retry(&self, id: TaskId) -> Result<TaskView, ClientError> {
        self.send(self.request(Method::POST, &format!("/v1/tasks/{id}/retry")))
            .await
    }

    /// Waits until the task is finished (completed, failed or cancelled) and returns it, long-
    /// polling `GET /v1/tasks/{id}?wait_ms=N`. Fails with [`ClientError::Timeout`] after `timeout`.
    pub async fn wait(&self, id: TaskId, timeout: Duration) -> Result<TaskView, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let wait = remaining.min(MAX_POLL);
            let asked = Instant::now();
            let wait_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
            let task: TaskView = self
                .send(
                    self.request(Method::GET, &format!("/v1/tasks/{id}"))
                        .query(&[("wait_ms", wait_ms)])
                        .timeout(wait + POLL_SLACK),
                )
                .await?;
            if task.is_finished() {
                return Ok(task);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(ClientError::Timeout {
                    task_id: id,
                    timeout,
                    state: task.state,
                });
            }
            // A server that does not long-poll answers at once: do not spin.
            let took = asked.elapsed();
            if took < MIN_POLL_INTERVAL {
                tokio::time::sleep((MIN_POLL_INTERVAL - took).min(remaining)).await;
            }
        }
    }

    /// `GET /v1/tasks/{id}/steps/{step}/instances`: a page of a mapped step's instances in index
    /// order, after index `after` (`None`: from the first), at most `limit` (1 to 500).
    pub async fn instances(
        &self,
        id: TaskId,
        step: &str,
        after: Option<u32>,
        limit: u32,
    ) -> Result<InstanceList, ClientError> {
        let mut request = self
            .request(
                Method::GET,
                &format!("/v1/tasks/{id}/steps/{step}/instances"),
            )
            .query(&[("limit", limit)]);
        if let Some(after) = after {
            request = request.query(&[("after", after)]);
        }
        self.send(request).await
    }

    /// `GET /v1/tasks`: one page of tasks, newest first, filters applied. The tasks are
    /// summaries (no context, output, steps or history): [`Client::task`] has the rest.
    pub async fn list(&self, filter: &ListTasks) -> Result<TaskList, ClientError> {
        self.send(self.request(Method::GET, "/v1/tasks").query(filter))
            .await
    }

    /// `GET /v1/templates[?namespace=]`: every registered template version (without the
    /// template itself), of one namespace or of all.
    pub async fn templates(
        &self,
        namespace: Option<&str>,
    ) -> Result<Vec<TemplateView>, ClientError> {
        let mut request = self.request(Method::GET, "/v1/templates");
        if let Some(namespace) = namespace {
            request = request.query(&[("namespace", namespace)]);
        }
        self.send(request).await
    }

    /// `GET /v1/workers`: the live workers (the worker registry), newest first.
    pub async fn workers(&self) -> Result<tasker_schemas::api::WorkerList, ClientError> {
        self.send(self.request(Method::GET, "/v1/workers")).await
    }

    /// `POST /v1/schedules`: a schedule that submits a task of a template at each tick of a
    /// cron expression in a time zone. Answers with it and its next five runs.
    pub async fn create_schedule(
        &self,
        schedule: &tasker_schemas::api::CreateSchedule,
    ) -> Result<tasker_schemas::api::ScheduleView, ClientError> {
        self.send(self.request(Method::POST, "/v1/schedules").json(schedule))
            .await
    }

    /// `GET /v1/schedules[?namespace=]`: the schedules by namespace and name.
    pub async fn schedules(
        &self,
        namespace: Option<&str>,
    ) -> Result<tasker_schemas::api::ScheduleList, ClientError> {
        let mut request = self.request(Method::GET, "/v1/schedules");
        if let Some(namespace) = namespace {
            request = request.query(&[("namespace", namespace)]);
        }
        self.send(request).await
    }

    /// `GET /v1/schedules/{id}`: a schedule with its next five runs.
    pub async fn schedule(
        &self,
        id: uuid::Uuid,
    ) -> Result<tasker_schemas::api::ScheduleView, ClientError> {
        self.send(self.request(Method::GET, &format!("/v1/schedules/{id}")))
            .await
    }

    /// `POST /v1/schedules/{id}/pause`: no tick fires until it is resumed.
    pub async fn pause_schedule(
        &self,
        id: uuid::Uuid,
    ) -> Result<tasker_schemas::api::ScheduleView, ClientError> {
        self.send(self.request(Method::POST, &format!("/v1/schedules/{id}/pause")))
            .await
    }

    /// `POST /v1/schedules/{id}/resume`: from its first tick after now (the ticks of the pause
    /// do not fire).
    pub async fn resume_schedule(
        &self,
        id: uuid::Uuid,
    ) -> Result<tasker_schemas::api::ScheduleView, ClientError> {
        self.send(self.request(Method::POST, &format!("/v1/schedules/{id}/resume")))
            .await
    }

    /// `DELETE /v1/schedules/{id}`: deletes it (the tasks it created stay); answers with it as
    /// it was.
    pub async fn delete_schedule(
        &self,
        id: uuid::Uuid,
    ) -> Result<tasker_schemas::api::ScheduleView, ClientError> {
        self.send(self.request(Method::DELETE, &format!("/v1/schedules/{id}")))
            .await
    }

    /// `POST /v1/tasks/{id}/purge`: erases a finished task's context and outputs, keeping its
    /// states and history (role `admin`).
    pub async fn purge(&self, id: TaskId) -> Result<TaskView, ClientError> {
        self.send(self.request(Method::POST, &format!("/v1/tasks/{id}/purge")))
            .await
    }

    /// `POST /v1/keys`: a new API key with `role` over `namespaces` (`["*"]` = every
    /// namespace). The answer holds the key itself, shown this once.
    pub async fn create_key(
        &self,
        key: &tasker_schemas::api::CreateKey,
    ) -> Result<tasker_schemas::api::CreatedKey, ClientError> {
        self.send(self.request(Method::POST, "/v1/keys").json(key))
            .await
    }

    /// `GET /v1/keys[?revoked=true]`: the keys (never the keys themselves), newest first.
    pub async fn keys(&self, revoked: bool) -> Result<tasker_schemas::api::KeyList, ClientError> {
        self.send(
            self.request(Method::GET, "/v1/keys")
                .query(&[("revoked", revoked)]),
        )
        .await
    }

    /// `POST /v1/keys/{id}/revoke`: the key is refused from then on.
    pub async fn revoke_key(
        &self,
        id: uuid::Uuid,
    ) -> Result<tasker_schemas::api::KeyView, ClientError> {
        self.send(self.request(Method::POST, &format!("/v1/keys/{id}/revoke")))
            .await
    }

    /// `GET /v1/audit`: the audit log, newest first, filtered.
    pub async fn audit(
        &self,
        filter: &AuditQuery,
    ) -> Result<tasker_schemas::api::AuditList, ClientError> {
        self.send(self.request(Method::GET, "/v1/audit").query(filter))
            .await
    }

    /// `GET /v1/namespaces`: the namespaces with settings.
    pub async fn namespaces(&self) -> Result<tasker_schemas::api::NamespaceList, ClientError> {
        self.send(self.request(Method::GET, "/v1/namespaces")).await
    }

    /// `PUT /v1/namespaces/{namespace}`: sets (or with `None` clears) its retention.
    pub async fn set_retention(
        &self,
        namespace: &str,
        retention_ms: Option<u64>,
    ) -> Result<tasker_schemas::api::NamespaceView, ClientError> {
        let body = tasker_schemas::api::SetNamespace { retention_ms };
        self.send(
            self.request(Method::PUT, &format!("/v1/namespaces/{namespace}"))
                .json(&body),
        )
        .await
    }

    /// `POST /v1/tasks/{id}/steps/{step}/retry`: retries one failed step (role `operate`).
    pub async fn retry_step(&self, id: TaskId, step: &str) -> Result<TaskView, ClientError> {
        self.send(self.request(Method::POST, &format!("/v1/tasks/{id}/steps/{step}/retry")))
            .await
    }

    /// `POST /v1/tasks/{id}/steps/{step}/rerun`: reruns from a step (it and everything that
    /// depends on it).
    pub async fn rerun(&self, id: TaskId, step: &str) -> Result<TaskView, ClientError> {
        self.send(self.request(Method::POST, &format!("/v1/tasks/{id}/steps/{step}/rerun")))
            .await
    }

    /// `POST /v1/tasks/{id}/steps/{step}/succeed`: marks a failed step succeeded with `output`.
    pub async fn mark_succeeded(
        &self,
        id: TaskId,
        step: &str,
        output: serde_json::Value,
    ) -> Result<TaskView, ClientError> {
        let body = tasker_schemas::operate::SucceedStep { output };
        self.send(
            self.request(
                Method::POST,
                &format!("/v1/tasks/{id}/steps/{step}/succeed"),
            )
            .json(&body),
        )
        .await
    }

    /// `POST /v1/tasks/bulk/count`: how many tasks a filter matches.
    pub async fn bulk_count(
        &self,
        filter: &tasker_schemas::operate::BulkFilterBody,
    ) -> Result<tasker_schemas::operate::BulkCount, ClientError> {
        self.send(
            self.request(Method::POST, "/v1/tasks/bulk/count")
                .json(filter),
        )
        .await
    }

    /// `POST /v1/tasks/bulk/cancel` (`retry: false`) or `/retry`: acts on the tasks a filter
    /// matches, refused when more match than `expected_count`.
    pub async fn bulk(
        &self,
        retry: bool,
        action: &tasker_schemas::operate::BulkAction,
    ) -> Result<tasker_schemas::operate::BulkOutcomeView, ClientError> {
        let path = if retry {
            "/v1/tasks/bulk/retry"
        } else {
            "/v1/tasks/bulk/cancel"
        };
        self.send(self.request(Method::POST, path).json(action))
            .await
    }

    /// `GET /v1/dead-letters`: a page of dead letters, newest first.
    pub async fn dead_letters(
        &self,
        query: &tasker_schemas::operate::DeadLetterQuery,
    ) -> Result<tasker_schemas::operate::DeadLetterList, ClientError> {
        self.send(self.request(Method::GET, "/v1/dead-letters").query(query))
            .await
    }

    /// `GET /v1/dead-letters/{id}`: one dead letter with its body.
    pub async fn dead_letter(
        &self,
        id: i64,
    ) -> Result<tasker_schemas::operate::DeadLetterView, ClientError> {
        self.send(self.request(Method::GET, &format!("/v1/dead-letters/{id}")))
            .await
    }

    /// `POST /v1/dead-letters/replay` (`discard: false`) or `/discard`.
    pub async fn dead_letter_action(
        &self,
        discard: bool,
        ids: &[i64],
    ) -> Result<tasker_schemas::operate::DeadLetterOutcomes, ClientError> {
        let path = if discard {
            "/v1/dead-letters/discard"
        } else {
            "/v1/dead-letters/replay"
        };
        let body = tasker_schemas::operate::DeadLetterIds { ids: ids.to_vec() };
        self.send(self.request(Method::POST, path).json(&body))
            .await
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let request = self
            .http
            .request(method, format!("{}{path}", self.base_url));
        match &self.api_key {
            Some(key) => request.bearer_auth(key),
            None => request,
        }
    }

    async fn send<T: DeserializeOwned>(&self, request: RequestBuilder) -> Result<T, ClientError> {
        let response = request.send().await?;
        read(response).await
    }
}

async fn read<T: DeserializeOwned>(response: Response) -> Result<T, ClientError> {
    let status = response.status();
    let body = response.bytes().await?;
    if status.is_success() {
        return serde_json::from_slice(&body).map_err(|e| ClientError::UnexpectedResponse {
            status: status.as_u16(),
            body: format!("{e}: {}", excerpt(&body)),
        });
    }
    Err(api_error(status, &body))
}

fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { error }) => ClientError::Api {
            status: status.as_u16(),
            code: error.code,
            message: error.message,
            task_id: error.task_id,
        },
        Err(_) => ClientError::UnexpectedResponse {
            status: status.as_u16(),
            body: excerpt(body),
        },
    }
}

/// The start of a body, for error messages.
fn excerpt(body: &[u8]) -> String {
    const MAX: usize = 512;
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX)]).into_owned();
    if body.len() > MAX {
        format!("{text}...")
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_become_api_errors() {
        let id = TaskId::new();
        let body = format!(
            r#"{{"error":{{"code":"idempotency_conflict","message":"key used","task_id":"{id}"}}}}"#
        );
        let err = api_error(StatusCode::CONFLICT, body.as_bytes());
        let ClientError::Api {
            status,
            code,
            message,
            task_id,
        } = &err
        else {
            panic!("{err:?}")
        };
        assert_eq!(
            (*status, code.as_str(), message.as_str(), *task_id),
            (409, "idempotency_conflict", "key used", Some(id))
        );
        assert!(!err.is_retryable());
        assert_eq!(err.status(), Some(409));

        let err = api_error(StatusCode::BAD_GATEWAY, b"<html>proxy error</html>");
        assert!(
            matches!(&err, ClientError::UnexpectedResponse { status: 502, body } if body.contains("proxy error"))
        );
        assert!(err.is_retryable());
    }

    #[test]
    fn base_url_and_key_are_handled() {
        let c = Client::new("http://h:1/").with_api_key("k");
        assert_eq!(c.base_url(), "http://h:1");
        assert!(!format!("{c:?}").contains("\"k\""));
        let long = vec![b'a'; 2_000];
        assert_eq!(excerpt(&long).len(), 515);
    }

    #[test]
    fn list_filters_skip_absent_fields() {
        let f = ListTasks {
            state: Some(TaskState::Running),
            limit: Some(10),
            ..ListTasks::default()
        };
        assert_eq!(
            serde_json::to_value(&f).unwrap(),
            serde_json::json!({"state": "running", "limit": 10})
        );
    }
}

/// Filters of [`Client::audit`] (all optional; `limit` 1 to 500, default 100).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct AuditQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<TaskId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
}
