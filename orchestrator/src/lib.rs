//! # tasker-orchestrator
//!
//! The orchestrator service of Tasker: it keeps every task and step transition in PostgreSQL
//! (the source of truth), publishes ready steps to RabbitMQ, applies the results workers send
//! back, retries with backoff, times out lost work and finalizes tasks. Any number of replicas
//! may run against the same database and broker.
//!
//! Modules (`ARCHITECTURE.md` at the repository root walks through them):
//! - [`transition`]: every rule that decides a step's or task's fate, pure and unit-tested;
//!   [`auth`]: who may do what (roles, namespace scopes), pure and unit-tested;
//!   [`slots`]: the in-flight counters and their lock order;
//! - [`store`]: SQL split by concern, guards only; [`broker`]: topology and confirmed publishing;
//! - [`service`]: apply, admission, publish, tasks, templates, timers, reconcile;
//! - [`edge`]: the HTTP API and the AMQP consumers; [`console`]: the web console under `/ui`; [`loops`]: the long-lived loops;
//! - [`config`]: settings from a file and `TASKER_*` variables; [`tls`]: certificates; [`metrics`];
//! - [`startup`]: [`App::build`] and [`App::run_until_stopped`].
//!
//! ```no_run
//! use tasker_orchestrator::{App, Config};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn run() -> Result<(), tasker_orchestrator::Error> {
//! let app = App::build(Config::load(None).expect("config")).await?;
//! println!("listening on {}", app.http_addr());
//! app.run_until_stopped(CancellationToken::new()).await?;
//! # Ok(()) }
//! ```

pub mod auth;
pub mod broker;
pub mod config;
pub mod console;
pub mod edge;
pub mod error;
pub mod identity;
pub mod loops;
pub mod metrics;
pub mod service;
pub mod slots;
pub mod startup;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod transition;

pub use config::Config;
pub use error::{Error, Result};
pub use service::Shared;
pub use startup::App;
