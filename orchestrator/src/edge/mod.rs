//! The edges: how the orchestrator is asked. They decode, call a service, and encode the
//! answer; none decides a step's fate or opens a transaction.
//!
//! | module | what |
//! |---|---|
//! | [`http`] | the HTTP API (`/v1/...`), health, readiness, metrics |
//! | [`results`] | the results consumer (worker results, `started`, heartbeats) |
//! | [`intake`] | the task request consumer (tasks submitted over AMQP) |
//! | [`dead_steps`] | step messages the broker dead-lettered |
//! | [`dead_letters`] | the dead-letter queue, recorded into the `dead_letters` table |

pub mod dead_letters;
pub mod dead_steps;
pub mod http;
pub mod intake;
pub mod results;
pub(crate) mod views;

use backon::ExponentialBuilder;
use std::time::Duration;

/// How a consumer waits out a database outage: from 50 ms, doubling, at most 5 s apart, for as
/// long as it lasts (the message stays unacked meanwhile; shutdown ends the wait).
pub(crate) fn outage_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(5))
        .without_max_times()
}
