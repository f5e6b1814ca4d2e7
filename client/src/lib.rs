//! # tasker-client
//!
//! The client side of Tasker, for services (and the `tasker` CLI) that register templates, submit
//! tasks and wait for them. It holds no worker runtime: to run step handlers, use the worker SDK
//! (`tasker-worker`), which re-exports this crate.
//!
//! | module | what it holds |
//! |---|---|
//! | [`http`] | [`Client`], the orchestrator's HTTP API (`/v1/...`); [`ClientError`], [`ListTasks`] |
//! | [`amqp_submit`] | submitting a task request over AMQP, with a broker confirm |
//! | [`publish`] | [`PublishError`]: why a confirmed publish failed |
//! | [`tls`] | HTTPS and `amqps://` with a private CA: [`tls::read_ca_pem`], [`tls::amqp_connect`] |
//!
//! Submit a task over HTTP and wait for it to finish:
//!
//! ```no_run
//! use std::time::Duration;
//! use serde_json::json;
//! use tasker_client::Client;
//! use tasker_client::schemas::api::SubmitTask;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), tasker_client::ClientError> {
//!     let client = Client::new("http://127.0.0.1:8080").with_api_key("secret");
//!     let submitted = client
//!         .submit(&SubmitTask {
//!             namespace: "shop".into(),
//!             template: "order_fulfilment".into(),
//!             version: None,
//!             context: json!({"order_id": "o-1"}),
//!             idempotency_key: Some("order-o-1".into()),
//!             priority: 0,
//!             task_id: None,
//!             run_at: None,
//!             delay: None,
//!             deadline: None,
//!         })
//!         .await?;
//!     let task = client.wait(submitted.task_id, Duration::from_secs(60)).await?;
//!     println!("task {} is {}", task.id, task.state);
//!     Ok(())
//! }
//! ```
//!
//! ## Guarantees and duties
//! - With an idempotency key, submitting the same body again returns the existing task
//!   (`created: false`); a different body under the same key is an `idempotency_conflict`
//!   ([`ClientError::Api`], carrying the id of the task that holds the key).
//!   [`ClientError::is_retryable`] tells transient failures (no answer, 5xx, 429, a wait that
//!   timed out) from the rest.
//! - [`Client::wait`] long-polls (`GET /v1/tasks/{id}?wait_ms=N`, at most 20 s per request) and
//!   never asks more often than every 200 ms, even of a server that does not long-poll.
//! - [`amqp_submit::publish_task_request`] returns only once the broker confirmed the message and
//!   routed it to a queue; an unroutable request (no orchestrator declared the topology) or a
//!   channel without confirms is a [`PublishError`]. Publishing the same request again (same
//!   request id) never creates a second task.

pub mod amqp_submit;
pub mod http;
pub mod publish;
pub mod tls;

pub use http::{AuditQuery, Client, ClientBuilder, ClientError, ListTasks};
pub use publish::PublishError;

/// The wire contract (ids, HTTP bodies, templates), re-exported so users need not depend on it
/// separately.
pub use tasker_schemas as schemas;
