//! # tasker-worker
//!
//! The Rust SDK for Tasker workers and the services that use Tasker.
//!
//! A **worker** consumes step queues on RabbitMQ, runs the handler each step names, publishes
//! the result (with a broker confirm) and only then acknowledges the step message. It runs steps
//! with bounded concurrency, enforces each step's execution timeout, catches panics, dead-letters
//! messages it cannot read, reconnects after broker failures and shuts down gracefully. The
//! orchestrator owns the broker topology: a worker only checks that its queues exist.
//!
//! A **service** submits tasks with the HTTP [`Client`] (or over AMQP with [`amqp_submit`]) and
//! waits for them. Those live in the `tasker-client` crate, re-exported here; a service that runs
//! no worker can depend on `tasker-client` alone.
//!
//! | module | what it holds |
//! |---|---|
//! | [`handler`] | [`StepHandler`] (your code), [`Decision`] (what a decision step returns), [`StepError`] (retry or not) |
//! | [`context`] | [`StepContext`]: the task's input, parent outputs, attempt, a map instance's index and item, cancellation |
//! | [`worker`] | [`Worker`], [`WorkerBuilder`], [`WorkerError`]; [`check_handlers`] and [`MissingHandlers`]: does a worker have every handler a template needs on its queues? |
//! | [`publish`] | [`PublishError`]: why a confirmed publish failed |
//! | [`client`] | the `tasker-client` crate, re-exported: [`Client`] (the orchestrator's HTTP API), [`ClientError`], [`ListTasks`] |
//! | [`amqp_submit`] | from `tasker-client`: submitting a task request over AMQP |
//!
//! ```no_run
//! use serde::Deserialize;
//! use serde_json::json;
//! use tasker_worker::{StepError, Worker};
//!
//! #[derive(Deserialize)]
//! struct Order {
//!     order_id: String,
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     Worker::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
//!         .namespace("shop")
//!         .queue("default")
//!         .concurrency(32)
//!         .handler_fn("validate_order", |ctx| async move {
//!             let order: Order = ctx.input()?;
//!             if order.order_id.is_empty() {
//!                 return Err(StepError::permanent("order_id is empty"));
//!             }
//!             Ok(json!({ "order_id": order.order_id }))
//!         })
//!         .build()
//!         .run_until_signal()
//!         .await?;
//!     Ok(())
//! }
//! ```
//!
//! ## Decisions and mapped steps
//!
//! - A **decision step** (`decides: [express, standard]` in its template) returns a [`Decision`]
//!   instead of an output: `Ok(Decision::choose(["express"]).output(json!({..})))`, or
//!   [`Decision::none`]. Register it with [`WorkerBuilder::decision_fn`] (a closure),
//!   [`WorkerBuilder::handler`] (a type implementing `StepHandler<Decision>`, an
//!   `async fn(StepContext) -> Result<Decision, StepError>`, or a closure with a typed
//!   argument). The branches it does not choose are skipped. Any other step returns an output;
//!   the orchestrator fails a decision step that returns a plain output, and any other step that
//!   returns a decision.
//! - An **instance of a mapped step** (`map: { over: list_images.images }`) runs once per element
//!   of the mapped array: [`StepContext::index`] is its position, [`StepContext::item`] (or
//!   [`StepContext::item_as`]) its element, and its idempotency key ends with `:{index}`. The
//!   children of a mapped step see its output as an array of the instances' outputs in index
//!   order (`null` for a tolerated failure). A large array can exceed the step-message cap and
//!   fail the child without running it: a handler that needs it then reads it in pages with
//!   [`Client::instances`] instead.
//!
//! ```
//! use serde::Deserialize;
//! use serde_json::json;
//! use tasker_worker::{Decision, StepError, Worker};
//!
//! #[derive(Deserialize)]
//! struct Image {
//!     key: String,
//! }
//!
//! let worker = Worker::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
//!     .namespace("shop")
//!     .decision_fn("pick_shipping", |ctx| async move {
//!         let order: serde_json::Value = ctx.input()?;
//!         Ok(if order["express"] == true {
//!             Decision::choose(["express"]).output(json!({ "carrier": "dhl" }))
//!         } else {
//!             Decision::choose(["standard"])
//!         })
//!     })
//!     .handler_fn("resize_image", |ctx| async move {
//!         let image: Image = ctx.item_as()?;
//!         Ok(json!({ "index": ctx.index(), "thumbnail": format!("thumbs/{}", image.key) }))
//!     });
//! # let _ = worker;
//! ```
//!
//! ## Guarantees and duties
//! - A step message is acknowledged only after its result was confirmed by the broker; a result
//!   that is refused or unroutable sends the message back to its queue instead. So a step may run
//!   more than once: use [`StepContext::idempotency_key`] for side effects.
//! - A handler error says whether to retry ([`StepError::retryable`], [`StepError::permanent`],
//!   [`StepError::retry_after`]); a panic or a timeout counts as retryable; an output over the
//!   size cap (256 KiB by default) as permanent. A step naming an unknown handler is reported as
//!   `handler_missing` and rescheduled by the orchestrator without spending an attempt, forever:
//!   [`WorkerBuilder::check_template`] (or [`check_handlers`]) tells at start-up which handlers a
//!   template needs that the worker lacks.
//! - Long handlers should watch [`StepContext::cancelled`]: it fires on timeout and when a
//!   shutdown's grace period runs out.

mod batch;
mod cancel;
pub mod context;
mod delivery;
mod execute;
pub mod handler;
mod registry;
mod session;
pub mod telemetry;
pub mod worker;

pub use context::StepContext;
pub use handler::{Decision, StepError, StepHandler, StepOutput, StepReturn};
// The client side lives in `tasker-client`; these keep the paths it had here
// (`tasker_worker::client::Client`, `tasker_worker::amqp_submit::...`, `tasker_worker::publish`).
// `publish` also holds the confirmed-publish helpers the worker's result publishing uses.
pub use tasker_client as client;
pub use tasker_client::{Client, ClientError, ListTasks, PublishError, amqp_submit, publish};
pub use tokio_util::sync::CancellationToken;
pub use worker::{MissingHandlers, Worker, WorkerBuilder, WorkerError, check_handlers};

/// The wire contract, re-exported so users need not depend on it separately.
pub use tasker_schemas as schemas;
