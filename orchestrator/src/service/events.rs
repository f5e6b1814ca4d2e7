//! Lifecycle events: a task's state changes announced on the events exchange: its creation
//! (`running`) and its finish (`completed`, `failed`, `cancelled`), each finished task counted
//! too. Best effort: the database holds the truth, and waiters are told by NOTIFY.

use super::Shared;
use crate::store::apply::FinishedTask;
use crate::store::rfc3339;
use chrono::{DateTime, Utc};
use tasker_schemas::{LifecycleEvent, TaskId, TaskState, encode_payload};

/// The `seq` of the `running` event of a new task: it comes before every entry of the task's
/// history, which counts from 1.
pub const CREATED_SEQ: u64 = 0;

/// Announces a task created (state `running`), after its commit.
pub async fn announce_created(
    shared: &Shared,
    task_id: TaskId,
    namespace: &str,
    template: &str,
    at: DateTime<Utc>,
) {
    let event = LifecycleEvent {
        task_id,
        namespace: namespace.to_owned(),
        template: template.to_owned(),
        seq: CREATED_SEQ,
        state: TaskState::Running.to_string(),
        at: rfc3339(at),
        output: None,
        error: None,
    };
    publish_event(shared, event).await;
}

/// Counts finished tasks, records their spans (traces on) and publishes their lifecycle events.
pub async fn announce(shared: &Shared, finished: &[FinishedTask]) {
    shared.traces.record_tasks(&shared.db, finished).await;
    let m = &shared.metrics;
    // A child workflow's task finished: the timers apply its end to its step.
    if finished.iter().any(|f| f.parent_step.is_some()) {
        shared.timers.notify_one();
    }
    for f in finished {
        let counter = match f.state {
            TaskState::Completed => "tasker_tasks_completed_total",
            TaskState::Failed => "tasker_tasks_failed_total",
            _ => "tasker_tasks_cancelled_total",
        };
        m.counter(counter, &[("namespace", &f.namespace)])
            .increment(1);
        if let Ok(d) = (f.at - f.created_at).to_std() {
            m.observe(
                "tasker_task_duration_seconds",
                &[
                    ("namespace", &f.namespace),
                    ("template", &f.template),
                    ("state", f.state.as_str()),
                ],
                d,
            );
        }
        let event = LifecycleEvent {
            task_id: f.task_id,
            namespace: f.namespace.clone(),
            template: f.template.clone(),
            seq: f.seq as u64,
            state: f.state.to_string(),
            at: rfc3339(f.at),
            output: f.output.clone(),
            error: f.error.clone(),
        };
        publish_event(shared, event).await;
    }
}

/// Publishes a lifecycle event (best effort).
pub async fn publish_event(shared: &Shared, event: LifecycleEvent) {
    let key = format!("{}.task.{}", event.namespace, event.state);
    match encode_payload(event) {
        Ok(bytes) => {
            let props = crate::broker::properties(tasker_schemas::MessageId::new());
            if let Err(e) = shared
                .publisher
                .send_event(&shared.names.events_exchange(), &key, &bytes, props)
                .await
            {
                tracing::warn!(error = %e, "could not publish lifecycle event");
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not encode lifecycle event"),
    }
}
