//! SQL, one module per aggregate. Functions take an executor or connection so the caller owns
//! the transaction. Every statement uses bind parameters; none is built from strings.

pub mod steps;
pub mod tasks;
pub mod templates;

use chrono::{DateTime, SecondsFormat, Utc};

/// RFC 3339 UTC with microseconds: the one time format of the API and events.
pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}
