//! The task page's live updates: `GET /ui/tasks/{id}/events`, server-sent events.
//!
//! Each stream polls its task's fingerprint ([`crate::store::console::fingerprint`]: state,
//! unfinished steps, history length and the newest step change, one index lookup) every
//! [`POLL`], and only when it changed reads the steps' states and sends them (event `nodes`,
//! JSON `{"state", "steps": [{"name", "state", "sub"}]}`); the page's script recolours the DAG
//! nodes and step headers. A finished task gets a last `nodes` and an `end` event, after which
//! the script closes the stream. Polling the database (not the finish notifications, which tell
//! only of finished tasks) sees every replica's changes.
//!
//! Bounded: at most [`MAX_STREAMS`] streams per replica (more get 503 and the page says live
//! updates are unavailable), each for at most [`MAX_STREAM_LIFE`] (the browser reconnects).

use super::pages::{attempt_sub, map_sub};
use super::{PageError, Viewer};
use crate::edge::http::Activity;
use crate::service::Shared;
use axum::Extension;
use axum::extract::ConnectInfo;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tasker_schemas::{StepState, TaskId};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Most live streams one replica serves at once.
pub const MAX_STREAMS: usize = 256;
/// How often a stream checks its task.
pub const POLL: Duration = Duration::from_millis(500);
/// Longest life of one stream (the browser's `EventSource` reconnects).
pub const MAX_STREAM_LIFE: Duration = Duration::from_secs(300);

/// The permits of live streams.
#[derive(Clone)]
pub struct Streams(Arc<Semaphore>);

impl Streams {
    pub fn new(n: usize) -> Self {
        Self(Arc::new(Semaphore::new(n)))
    }
}

#[derive(Serialize, Debug, PartialEq)]
pub struct NodeUpdate {
    pub name: String,
    pub state: &'static str,
    pub sub: String,
}

#[derive(Serialize, Debug)]
pub struct Update {
    pub state: &'static str,
    pub steps: Vec<NodeUpdate>,
}

/// A node's update from its row (the same second line as the page draws).
pub fn node_update(n: &crate::store::console::NodeRow) -> NodeUpdate {
    let sub = match &n.map_counts {
        Some(counts) => {
            let c = |s: StepState| counts.get(s.as_str()).and_then(|v| v.as_i64()).unwrap_or(0);
            map_sub(
                n.map_total.map(i64::from),
                c(StepState::Succeeded),
                c(StepState::Dispatched) + c(StepState::Retrying),
                c(StepState::Failed),
            )
        }
        None if n.child_task_id.is_some() => "child workflow ↗".into(),
        None => attempt_sub(&n.handler, i64::from(n.attempt)),
    };
    NodeUpdate {
        name: n.name.clone(),
        state: n.state.as_str(),
        sub,
    }
}

struct Live {
    shared: Shared,
    id: TaskId,
    last: Option<String>,
    started: Instant,
    first: bool,
    ended: bool,
    _permit: OwnedSemaphorePermit,
    /// Marks the connection busy while the stream lasts, so the idle timeout (which counts
    /// from the end of a handler) does not close it.
    _busy: Option<crate::edge::http::Busy>,
}

/// The next event of a stream, or `None` when it ends.
async fn next(mut s: Live) -> Option<(Result<Event, std::convert::Infallible>, Live)> {
    if s.ended || s.started.elapsed() > MAX_STREAM_LIFE {
        return None;
    }
    loop {
        if !s.first {
            tokio::time::sleep(POLL).await;
            if s.started.elapsed() > MAX_STREAM_LIFE {
                return None;
            }
        }
        s.first = false;
        let print = match crate::store::console::fingerprint(&s.shared.db, s.id.0).await {
            Ok(Some(p)) => p,
            // The task is gone (pruned): nothing more to tell.
            Ok(None) => return None,
            Err(e) => {
                tracing::debug!(error = %e, "console live stream: cannot read the task");
                continue;
            }
        };
        if s.last.as_deref() == Some(print.as_str()) {
            continue;
        }
        let (state, rows) = match crate::store::console::nodes(&s.shared.db, s.id.0).await {
            Ok(Some(x)) => x,
            Ok(None) => continue,
            Err(e) => {
                tracing::debug!(error = %e, "console live stream: cannot read the steps");
                continue;
            }
        };
        let update = Update {
            state: state.as_str(),
            steps: rows.iter().map(node_update).collect(),
        };
        s.last = Some(print);
        // A finished task: this is the last picture; `end` follows.
        s.ended = state.is_finished();
        let data = serde_json::to_string(&update).unwrap_or_default();
        return Some((Ok(Event::default().event("nodes").data(data)), s));
    }
}

/// `GET /ui/tasks/{id}/events`.
pub async fn events(
    State(shared): State<Shared>,
    viewer: Viewer,
    Extension(streams): Extension<Streams>,
    connection: Option<Extension<ConnectInfo<Activity>>>,
    Path(id): Path<String>,
) -> Response {
    let id: TaskId = match id.parse() {
        Ok(id) => id,
        Err(_) => return PageError::bad_request(format!("{id:?} is not a task id")).page(None),
    };
    match crate::store::console::task_namespace(&shared.db, id.0).await {
        Ok(Some(ns)) if viewer.who.sees(&ns) => {}
        Ok(_) => return PageError::not_found(format!("task {id} not found")).page(None),
        Err(e) => return PageError::from(e).page(None),
    }
    let Ok(permit) = streams.0.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many live streams on this replica; reload later",
        )
            .into_response();
    };
    let live = Live {
        shared,
        id,
        last: None,
        started: Instant::now(),
        first: true,
        ended: false,
        _permit: permit,
        _busy: connection.map(|Extension(ConnectInfo(a))| a.busy()),
    };
    // After the last `nodes` of a finished task, one `end` event.
    let events = stream::unfold((live, false), |(live, sent_end)| async move {
        if sent_end {
            return None;
        }
        if live.ended {
            return Some((
                Ok(Event::default().event("end").data("finished")),
                (live, true),
            ));
        }
        next(live).await.map(|(ev, l)| (ev, (l, false)))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::console::NodeRow;

    #[test]
    fn a_mapped_node_shows_its_counts_and_a_plain_one_its_attempt() {
        let mapped = NodeRow {
            name: "each".into(),
            handler: "h".into(),
            child_task_id: None,
            state: StepState::Delegated,
            attempt: 0,
            map_total: Some(10),
            map_counts: Some(serde_json::json!({"succeeded": 4, "dispatched": 2, "failed": 1})),
        };
        let u = node_update(&mapped);
        assert_eq!(u.state, "delegated");
        assert_eq!(u.sub, "map 4✓ 2▶ 1✗ / 10");
        let plain = NodeRow {
            name: "a".into(),
            handler: "charge".into(),
            child_task_id: None,
            state: StepState::Succeeded,
            attempt: 2,
            map_total: None,
            map_counts: None,
        };
        assert_eq!(node_update(&plain).sub, "charge · #2");
    }
}
