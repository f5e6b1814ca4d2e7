//! Names of exchanges and queues. Every name starts with a configurable prefix so several
//! deployments (or test runs) can share one broker.

/// Default name prefix.
pub const DEFAULT_PREFIX: &str = "tasker";

/// Exchange and queue names under one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    prefix: String,
}

impl Default for Names {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX)
    }
}

impl Names {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Topic exchange for task requests (routing key: the namespace; all bound to one queue).
    pub fn tasks_exchange(&self) -> String {
        format!("{}.tasks", self.prefix)
    }

    /// Queue the orchestrator consumes task requests from.
    pub fn task_requests_queue(&self) -> String {
        format!("{}.task_requests", self.prefix)
    }

    /// Direct exchange for step messages (routing key: [`step_routing_key`],
    /// `{namespace}.{queue}`).
    pub fn steps_exchange(&self) -> String {
        format!("{}.steps", self.prefix)
    }

    /// The AMQP queue behind a template queue name of a namespace:
    /// `{prefix}.step.{namespace}.{queue}`. Each namespace has its own step queues, so a worker
    /// (and its broker user) of one namespace never receives another namespace's steps.
    pub fn step_queue(&self, namespace: &str, queue: &str) -> String {
        format!("{}.step.{}.{}", self.prefix, namespace, queue)
    }

    /// The name pattern of every step queue of a namespace, as a regular expression (RabbitMQ
    /// permissions): `^{prefix}\.step\.{namespace}\.`.
    pub fn step_queue_pattern(&self, namespace: &str) -> String {
        format!(
            "^{}\\.step\\.{}\\.",
            regex_escape(&self.prefix),
            regex_escape(namespace)
        )
    }

    /// Topic exchange for results, started and heartbeat messages (routing key: `namespace.shard`).
    pub fn results_exchange(&self) -> String {
        format!("{}.results", self.prefix)
    }

    /// The queue of one result shard.
    pub fn results_queue(&self, shard: u16) -> String {
        format!("{}.results.{}", self.prefix, shard)
    }

    /// Topic exchange for lifecycle events (routing key: `namespace.task.state`).
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.prefix)
    }

    /// Fanout exchange for cancel messages.
    pub fn cancel_exchange(&self) -> String {
        format!("{}.cancel", self.prefix)
    }

    /// Exchange every queue dead-letters to.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.prefix)
    }

    /// Exchange step queues dead-letter to (delivery limit reached, rejected).
    pub fn step_dead_letter_exchange(&self) -> String {
        format!("{}.dlx.steps", self.prefix)
    }

    /// Queue the orchestrator consumes dead step messages from, turning each into a failed attempt
    /// before passing it on to the dead-letter queue.
    pub fn step_dead_letter_queue(&self) -> String {
        format!("{}.dead_steps", self.prefix)
    }

    /// Queue holding dead letters.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dead_letters", self.prefix)
    }
}

/// Escapes the characters a regular expression gives a meaning to (for RabbitMQ permission
/// patterns built from names).
pub fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.^$|?*+()[]{}".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Routing key of a step message on the steps exchange, and the orchestrator's key of a step
/// queue (its slot, its dispatch): `"{namespace}.{queue}"`. Neither name holds a dot.
pub fn step_routing_key(namespace: &str, queue: &str) -> String {
    format!("{namespace}.{queue}")
}

/// The namespace and queue of a [`step_routing_key`] (split at the first dot).
pub fn split_step_routing_key(key: &str) -> Option<(&str, &str)> {
    key.split_once('.')
}

/// Routing key of a `worker_heartbeat` on the results exchange: bound to results queue 0 only
/// (no namespace has a dot, and no shard is a word, so it collides with no result's key).
pub const WORKER_HEARTBEAT_ROUTING_KEY: &str = "workers.heartbeat";

/// Routing key of a result: `"{namespace}.{shard}"`.
pub fn result_routing_key(namespace: &str, shard: u16) -> String {
    format!("{namespace}.{shard}")
}

/// Routing key of a lifecycle event on the events exchange: `"{namespace}.task.{state}"`, so
/// consumers can bind `shop.task.*` or `*.task.failed`.
pub fn event_routing_key(namespace: &str, state: &str) -> String {
    format!("{namespace}.task.{state}")
}

/// The result shard of a task: stable, so all results of one task land on one queue.
pub fn shard_of(task: &crate::TaskId, shards: u16) -> u16 {
    if shards <= 1 {
        return 0;
    }
    let b = task.0.as_bytes();
    // The low bytes of a v7 id are random.
    (u16::from_be_bytes([b[14], b[15]])) % shards
}
