//! [`StepContext`]: everything a handler knows about the attempt it runs.

use crate::handler::StepError;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::sync::Arc;
use tasker_schemas::{Failure, StepId, StepMessage, TaskId};
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// One attempt of one step, as handed to a [`StepHandler`](crate::StepHandler).
///
/// Cheap to clone. The task's context and the parents' outputs are read with
/// [`input`](Self::input) and [`parent`](Self::parent), or raw with [`context`](Self::context) and
/// [`parent_outputs`](Self::parent_outputs).
#[derive(Clone, Debug)]
pub struct StepContext {
    message: Arc<StepMessage>,
    worker: Arc<str>,
    cancel: CancellationToken,
}

impl StepContext {
    /// A context for a step message. The worker builds these; handler unit tests can too.
    pub fn new(message: StepMessage, worker: impl Into<String>, cancel: CancellationToken) -> Self {
        Self {
            message: Arc::new(message),
            worker: Arc::from(worker.into()),
            cancel,
        }
    }

    /// A context for unit-testing a handler: step `step` (handler of the same name) of a fresh
    /// task in namespace `test`, attempt 1, with `context` as the task's context and no parents.
    pub fn for_test(step: &str, context: Value) -> Self {
        let task_id = TaskId::new();
        let message = StepMessage {
            task_id,
            step_id: StepId::new(),
            namespace: "test".into(),
            template: "test".into(),
            step: step.into(),
            handler: step.into(),
            queue: "default".into(),
            attempt: 1,
            idempotency_key: format!("{task_id}:{step}"),
            context,
            parent_outputs: Map::new(),
            timeout_ms: 30_000,
            result_routing_key: "test.0".into(),
            map_index: None,
            map_item: None,
            failure: None,
        };
        Self::new(message, "test-worker", CancellationToken::new())
    }

    /// The same context with a parent's output added (for tests).
    pub fn with_parent(mut self, step: &str, output: Value) -> Self {
        Arc::make_mut(&mut self.message)
            .parent_outputs
            .insert(step.into(), output);
        self
    }

    /// The same context as attempt `attempt` (for tests).
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        Arc::make_mut(&mut self.message).attempt = attempt;
        self
    }

    /// The same context as the instance at `index` of a mapped step, with element `item` (for
    /// tests). The idempotency key becomes `"{task_id}:{step}:{index}"`, as the orchestrator
    /// sends it.
    pub fn with_item(mut self, index: u32, item: Value) -> Self {
        let m = Arc::make_mut(&mut self.message);
        m.idempotency_key = format!("{}:{}:{index}", m.task_id, m.step);
        m.map_index = Some(index);
        m.map_item = Some(item);
        self
    }

    pub fn task_id(&self) -> TaskId {
        self.message.task_id
    }

    pub fn step_id(&self) -> StepId {
        self.message.step_id
    }

    pub fn namespace(&self) -> &str {
        &self.message.namespace
    }

    /// The template's name.
    pub fn template(&self) -> &str {
        &self.message.template
    }

    /// The step's name within the template.
    pub fn step(&self) -> &str {
        &self.message.step
    }

    /// The handler name the step was dispatched to.
    pub fn handler(&self) -> &str {
        &self.message.handler
    }

    /// The template queue name the step came from (e.g. `default`).
    pub fn queue(&self) -> &str {
        &self.message.queue
    }

    /// The attempt number: 1 for the first run, growing with every retry.
    pub fn attempt(&self) -> u32 {
        self.message.attempt
    }

    /// Stable across attempts of this step (`"{task_id}:{step}"`, and
    /// `"{task_id}:{step}:{index}"` for an instance of a mapped step): use it to make the
    /// handler's own side effects idempotent, since a step may run more than once.
    pub fn idempotency_key(&self) -> &str {
        &self.message.idempotency_key
    }

    /// How long this attempt may run, in milliseconds, counted from when the worker took it.
    pub fn timeout_ms(&self) -> u64 {
        self.message.timeout_ms
    }

    /// The task's context, as submitted.
    pub fn context(&self) -> &Value {
        &self.message.context
    }

    /// Outputs of the step's parents, by step name.
    pub fn parent_outputs(&self) -> &Map<String, Value> {
        &self.message.parent_outputs
    }

    /// For an instance of a mapped step (a step with `map:` in its template): its position in
    /// the mapped array, from 0. `None` for any other step.
    pub fn index(&self) -> Option<u32> {
        self.message.map_index
    }

    /// For an instance of a mapped step: its element of the mapped array (`Some(&Value::Null)`
    /// for a `null` element). `None` for any other step.
    pub fn item(&self) -> Option<&Value> {
        static NULL: Value = Value::Null;
        self.message.map_index?;
        // A null element travels as nil, which reads like an absent field.
        Some(self.message.map_item.as_ref().unwrap_or(&NULL))
    }

    /// For the `on_failure` step of a failed task: the step that failed it and its error
    /// (`None` for every other step). Its [`parent_outputs`](Self::parent_outputs) hold the
    /// outputs of the steps that succeeded.
    pub fn failure(&self) -> Option<&Failure> {
        self.message.failure.as_ref()
    }

    /// This instance's element deserialized as `T`. A step that is not an instance of a mapped
    /// step, or an element that does not fit, is a permanent error: retrying cannot change it.
    pub fn item_as<T: DeserializeOwned>(&self) -> Result<T, StepError> {
        let (Some(index), Some(item)) = (self.index(), self.item()) else {
            return Err(StepError::permanent(format!(
                "step {:?} is not an instance of a mapped step: it has no item (map_index)",
                self.step()
            )));
        };
        T::deserialize(item).map_err(|e| {
            StepError::permanent(format!(
                "invalid item {index} for step {:?}: {e}",
                self.step()
            ))
        })
    }

    /// The name of the worker running this attempt.
    pub fn worker(&self) -> &str {
        &self.worker
    }

    /// The task's context deserialized as `T`. A context that does not fit is a permanent error:
    /// retrying cannot change it.
    pub fn input<T: DeserializeOwned>(&self) -> Result<T, StepError> {
        T::deserialize(&self.message.context).map_err(|e| {
            StepError::permanent(format!(
                "invalid task context for step {:?}: {e}",
                self.step()
            ))
        })
    }

    /// The output of parent step `step` deserialized as `T`. A missing parent or an output that
    /// does not fit is a permanent error.
    pub fn parent<T: DeserializeOwned>(&self, step: &str) -> Result<T, StepError> {
        let output = self.message.parent_outputs.get(step).ok_or_else(|| {
            StepError::permanent(format!(
                "step {:?} has no output from parent step {step:?}",
                self.step()
            ))
        })?;
        T::deserialize(output).map_err(|e| {
            StepError::permanent(format!(
                "invalid output of parent step {step:?} for step {:?}: {e}",
                self.step()
            ))
        })
    }

    /// Completes when the worker asks the handler to stop: the attempt's timeout passed, the
    /// worker's shutdown grace period ran out, or its broker connection was lost. A handler that
    /// stops early should return an error; its message is redelivered or retried.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// The cancellation token itself, to hand to code that takes one.
    pub fn cancellation_token(&self) -> &CancellationToken {
        &self.cancel
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Order {
        order_id: String,
    }

    #[test]
    fn reads_input_and_parents() {
        let ctx = StepContext::for_test("ship", json!({"order_id": "o-1"}))
            .with_parent("charge", json!({"charge_id": "c-1"}))
            .with_attempt(3);
        assert_eq!(
            ctx.input::<Order>().unwrap(),
            Order {
                order_id: "o-1".into()
            }
        );
        assert_eq!(ctx.parent::<Value>("charge").unwrap()["charge_id"], "c-1");
        assert_eq!(ctx.attempt(), 3);
        assert_eq!(ctx.idempotency_key(), format!("{}:ship", ctx.task_id()));

        let missing = ctx.parent::<Value>("reserve").unwrap_err();
        assert!(!missing.is_retryable());
        assert!(missing.message().contains("\"reserve\""), "{missing}");
        let bad = ctx.parent::<Order>("charge").unwrap_err();
        assert!(bad.message().contains("order_id"), "{bad}");
        let bad_input = StepContext::for_test("ship", json!([1]))
            .input::<Order>()
            .unwrap_err();
        assert!(!bad_input.is_retryable());
    }

    #[test]
    fn map_instances_read_their_item() {
        let plain = StepContext::for_test("resize", json!({}));
        assert_eq!((plain.index(), plain.item()), (None, None));
        let err = plain.item_as::<Value>().unwrap_err();
        assert!(!err.is_retryable());
        assert_eq!(
            err.message(),
            "step \"resize\" is not an instance of a mapped step: it has no item (map_index)"
        );

        let ctx = StepContext::for_test("resize", json!({}))
            .with_item(3, json!({"order_id": "o-3"}))
            .with_parent("list", json!([1, 2, 3, 4]));
        assert_eq!(ctx.index(), Some(3));
        assert_eq!(ctx.item(), Some(&json!({"order_id": "o-3"})));
        assert_eq!(
            ctx.item_as::<Order>().unwrap(),
            Order {
                order_id: "o-3".into()
            }
        );
        assert_eq!(ctx.idempotency_key(), format!("{}:resize:3", ctx.task_id()));
        let bad = ctx.item_as::<u64>().unwrap_err();
        assert!(!bad.is_retryable());
        assert!(
            bad.message()
                .starts_with("invalid item 3 for step \"resize\": "),
            "{bad}"
        );

        // A null element: nil on the wire, which decodes as an absent map_item.
        let null = StepContext::for_test("resize", json!({})).with_item(0, Value::Null);
        assert_eq!(null.item(), Some(&Value::Null));
        let bytes = tasker_schemas::encode_payload((*null.message).clone()).unwrap();
        let message = tasker_schemas::decode::<StepMessage>(&bytes)
            .unwrap()
            .payload;
        assert_eq!(message.map_item, None);
        let decoded = StepContext::new(message, "w", CancellationToken::new());
        assert_eq!(
            (decoded.index(), decoded.item()),
            (Some(0), Some(&Value::Null))
        );
        assert_eq!(decoded.item_as::<Option<u64>>().unwrap(), None);
        assert!(decoded.item_as::<u64>().is_err());
    }
}
