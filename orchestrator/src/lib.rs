//! # tasker-orchestrator
//!
//! The orchestrator service of Tasker: it keeps every task and step transition in PostgreSQL
//! (the source of truth), publishes ready steps to RabbitMQ, applies the results workers send
//! back, retries with backoff, times out lost work and finalizes tasks. Any number of replicas
//! may run against the same database and broker.
//!
//! Modules:
//! - [`config`]: settings from a file and `TASKER_*` variables;
//! - [`startup`]: [`App::build`] and [`App::run_until_stopped`];
//! - [`api`]: the HTTP API; [`intake`]: task creation (HTTP and AMQP);
//! - [`dispatch`]: admission and publishing; [`results`]: applying outcomes;
//!   [`timers`]: retries, leases and the outbox relay;
//! - [`store`]: SQL, one module per aggregate; [`broker`]: topology and confirmed publishing.
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

pub mod api;
pub mod broker;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod intake;
pub mod metrics;
pub mod results;
pub mod startup;
pub mod state;
pub mod store;
pub mod timers;

pub use config::Config;
pub use error::{Error, Result};
pub use startup::App;
pub use state::Shared;
