//! The [`Worker`]: configuration ([`WorkerBuilder`]), the supervision loop that reconnects with
//! backoff, and shutdown on a token or a signal.

use crate::handler::{Decision, DynHandler, StepHandler, StepOutput, StepReturn, erase};
use crate::session::{Session, SessionEnd, SessionError, Shared};
use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::tcp::OwnedTLSConfig;
use lapin::types::ShortString;
use lapin::uri::AMQPUri;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tasker_schemas::template::DEFAULT_QUEUE;
use tasker_schemas::topology::DEFAULT_PREFIX;
use tasker_schemas::{DataLimits, Names, Template};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Default number of steps run at once.
pub const DEFAULT_CONCURRENCY: usize = 16;
/// Default time running steps get to finish after shutdown is requested.
pub const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(30);
/// Steps whose execution timeout is longer than this use a lease instead of holding their
/// delivery (RabbitMQ closes a channel whose delivery stays unacked for 30 minutes).
pub const DEFAULT_LONG_STEP_AFTER: Duration = Duration::from_secs(10 * 60);
/// How often a long step's lease is renewed; each renewal asks for three intervals.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(20);

/// A session that lasted this long was healthy: the next reconnect starts from the shortest delay.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);

/// Why a worker could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    #[error("invalid AMQP URL: {0}")]
    InvalidUrl(String),
    #[error("queue {queue} does not exist; register a template that uses it first")]
    QueueMissing { queue: String },
    /// The broker refused the worker's user access to a step queue (broker identity: the user
    /// of another namespace).
    #[error("the broker refused access to queue {queue}: {reason}")]
    AccessRefused { queue: String, reason: String },
    #[error("invalid worker configuration: {0}")]
    Config(String),
}

/// A template needs handlers that a worker lacks; see [`check_handlers`].
///
/// Displays as `template media/thumbnails needs handlers [publish] that this worker lacks`
/// (handlers sorted, each once).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("template {namespace}/{name} needs handlers [{}] that this worker lacks", .handlers.join(", "))]
pub struct MissingHandlers {
    pub namespace: String,
    pub name: String,
    pub version: u32,
    /// The missing handler names, sorted, without duplicates.
    pub handlers: Vec<String>,
}

/// Checks that a worker consuming `queues` with handlers `handler_names` can run every step of
/// `template` that is routed to one of those queues. Steps on other queues do not count (another
/// worker serves them), so a template with no step on `queues` always passes.
///
/// A step naming a handler no worker has is not lost, it is re-offered forever as
/// `handler_missing`: call this at start-up (or in a test) to hear about it at once.
///
/// ```
/// use tasker_worker::{Worker, check_handlers, schemas::Template};
///
/// let template: Template = serde_json::from_value(serde_json::json!({
///     "namespace": "media", "name": "thumbnails", "version": 1,
///     "steps": [
///         { "name": "resize", "handler": "resize" },
///         { "name": "publish", "handler": "publish", "depends_on": ["resize"] },
///     ],
/// })).unwrap();
/// let worker = Worker::builder("amqp://localhost")
///     .namespace("media")
///     .handler_fn("resize", |_| async { Ok(serde_json::json!(null)) });
/// let err = check_handlers(&template, worker.queue_names(), worker.handler_names()).unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "template media/thumbnails needs handlers [publish] that this worker lacks"
/// );
/// // The same, as a method of the builder:
/// assert_eq!(worker.check_template(&template), Err(err));
/// ```
pub fn check_handlers<Q, H>(
    template: &Template,
    queues: impl IntoIterator<Item = Q>,
    handler_names: impl IntoIterator<Item = H>,
) -> Result<(), MissingHandlers>
where
    Q: AsRef<str>,
    H: AsRef<str>,
{
    let queues: Vec<Q> = queues.into_iter().collect();
    let handlers: Vec<H> = handler_names.into_iter().collect();
    let consumed = |queue: &str| queues.iter().any(|q| q.as_ref() == queue);
    let has = |handler: &str| handlers.iter().any(|h| h.as_ref() == handler);
    // A child-workflow or timed (sleep, wait_for) step runs no handler; a template's on_failure handler is a step too.
    let failure_handler = template.on_failure.as_ref().map(|h| h.as_step());
    let mut missing: Vec<String> = template
        .steps
        .iter()
        .chain(failure_handler.as_ref())
        .filter(|s| !s.has_no_handler() && consumed(s.queue()) && !has(&s.handler))
        .map(|s| s.handler.clone())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    missing.sort_unstable();
    missing.dedup();
    Err(MissingHandlers {
        namespace: template.namespace.clone(),
        name: template.name.clone(),
        version: template.version,
        handlers: missing,
    })
}

/// Longest worker name (bytes), as the orchestrator accepts it.
pub const MAX_WORKER_NAME_LEN: usize = 256;

/// Configures a [`Worker`]; start with [`Worker::builder`].
#[must_use]
pub struct WorkerBuilder {
    amqp_url: String,
    prefix: String,
    namespaces: Vec<String>,
    queues: Vec<String>,
    handlers: HashMap<String, DynHandler>,
    concurrency: usize,
    prefetch: Option<u16>,
    grace_period: Duration,
    name: Option<String>,
    limits: DataLimits,
    long_steps: crate::session::LongSteps,
    amqp_ca: Option<AmqpCa>,
    registry_interval: Duration,
}

/// CA certificates trusted for `amqps://` on top of the platform's roots.
#[derive(Clone, Debug)]
enum AmqpCa {
    File(PathBuf),
    Pem(String),
}

impl AmqpCa {
    /// The TLS settings of the worker's connections.
    fn tls_config(&self) -> Result<OwnedTLSConfig, WorkerError> {
        let pem = match self {
            AmqpCa::File(path) => tasker_client::tls::read_ca_pem(path)
                .map_err(|e| WorkerError::Config(e.to_string()))?,
            AmqpCa::Pem(pem) => {
                tasker_client::tls::check_ca_pem(pem)
                    .map_err(|e| WorkerError::Config(format!("invalid CA certificate: {e}")))?;
                pem.clone()
            }
        };
        Ok(tasker_client::tls::amqp_tls_config(Some(pem)))
    }
}

impl std::fmt::Debug for WorkerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: never print it.
        let mut handlers: Vec<&String> = self.handlers.keys().collect();
        handlers.sort();
        f.debug_struct("WorkerBuilder")
            .field("prefix", &self.prefix)
            .field("namespaces", &self.namespaces)
            .field("queues", &self.queues)
            .field("handlers", &handlers)
            .field("concurrency", &self.concurrency)
            .field("prefetch", &self.prefetch)
            .field("grace_period", &self.grace_period)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl WorkerBuilder {
    fn new(amqp_url: String) -> Self {
        Self {
            amqp_url,
            prefix: DEFAULT_PREFIX.to_owned(),
            namespaces: Vec::new(),
            queues: Vec::new(),
            handlers: HashMap::new(),
            concurrency: DEFAULT_CONCURRENCY,
            prefetch: None,
            grace_period: DEFAULT_GRACE_PERIOD,
            name: None,
            limits: DataLimits::default(),
            long_steps: crate::session::LongSteps {
                after: DEFAULT_LONG_STEP_AFTER,
                heartbeat: DEFAULT_HEARTBEAT_INTERVAL,
            },
            amqp_ca: None,
            registry_interval: crate::registry::DEFAULT_INTERVAL,
        }
    }

    /// Steps whose execution timeout exceeds `after` are run under a lease: the worker sends
    /// `started`, acks the step message, renews the lease every `heartbeat` while the handler
    /// runs, then sends the result. Defaults: 10 minutes and 20 seconds.
    pub fn long_steps(mut self, after: Duration, heartbeat: Duration) -> Self {
        self.long_steps = crate::session::LongSteps {
            after,
            heartbeat: heartbeat.max(Duration::from_millis(10)),
        };
        self
    }

    /// The prefix of every exchange and queue name (default `tasker`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Serve the namespace `namespace` (the templates' `namespace`). Required: call it once per
    /// namespace. Step queues belong to a namespace (`{prefix}.step.{namespace}.{queue}`), and
    /// the worker consumes every [`queue`](Self::queue) of every namespace given (each must
    /// exist). With broker identity on, the worker's AMQP user must be the user of each of
    /// its namespaces (so in practice a worker serves one namespace).
    ///
    /// ```
    /// use tasker_worker::Worker;
    ///
    /// let worker = Worker::builder("amqp://tasker-shop:secret@localhost")
    ///     .namespace("shop")
    ///     .queue("payments");
    /// assert_eq!(worker.namespace_names(), ["shop"]);
    /// assert_eq!(worker.queue_names(), ["payments"]);
    /// ```
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        let namespace = namespace.into();
        if !self.namespaces.contains(&namespace) {
            self.namespaces.push(namespace);
        }
        self
    }

    /// Consume the template queue `queue` (the name used in templates, e.g. `default`) in each
    /// of the worker's [namespaces](Self::namespace). Call it once per queue; without any call
    /// the worker consumes `default`.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        let queue = queue.into();
        if !self.queues.contains(&queue) {
            self.queues.push(queue);
        }
        self
    }

    /// Run `handler` for steps whose template names handler `name`. A later call with the same
    /// name replaces the earlier handler. The handler returns an output (`StepHandler<Value>`)
    /// or, for a decision step, a [`Decision`] (`StepHandler<Decision>`). A closure needs its
    /// argument typed (`|ctx: StepContext| async move { .. }`);
    /// [`handler_fn`](Self::handler_fn) and [`decision_fn`](Self::decision_fn) do not.
    pub fn handler<R>(mut self, name: impl Into<String>, handler: impl StepHandler<R>) -> Self
    where
        R: Into<StepReturn> + Send + 'static,
    {
        self.handlers.insert(name.into(), erase(handler));
        self
    }

    /// [`handler`](Self::handler) for a closure that returns an output
    /// (`Ok(json!(..))`), with its argument and result types inferred.
    pub fn handler_fn<F, Fut>(self, name: impl Into<String>, handler: F) -> Self
    where
        F: Fn(crate::StepContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = StepOutput> + Send + 'static,
    {
        self.handler(name, handler)
    }

    /// [`handler`](Self::handler) for a closure that returns a [`Decision`] (the handler of a
    /// decision step: `decides` in the template), with its argument and result types inferred.
    ///
    /// ```
    /// use serde_json::json;
    /// use tasker_worker::{Decision, Worker};
    ///
    /// let worker = Worker::builder("amqp://localhost").decision_fn("pick_shipping", |ctx| async move {
    ///     let order: serde_json::Value = ctx.input()?;
    ///     Ok(if order["express"] == true {
    ///         Decision::choose(["express"]).output(json!({ "carrier": "dhl" }))
    ///     } else {
    ///         Decision::choose(["standard"])
    ///     })
    /// });
    /// assert_eq!(worker.handler_names(), ["pick_shipping"]);
    /// ```
    pub fn decision_fn<F, Fut>(self, name: impl Into<String>, handler: F) -> Self
    where
        F: Fn(crate::StepContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Decision, crate::StepError>> + Send + 'static,
    {
        self.handler(name, handler)
    }

    /// How many steps run at once, over all queues (default 16, at least 1). Also the prefetch
    /// of each queue unless [`prefetch`](Self::prefetch) is set.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// How many unacknowledged step messages the broker may hand this worker per queue (at
    /// least 1). Defaults to the concurrency.
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = Some(prefetch.max(1));
        self
    }

    /// How long running steps may take to finish after shutdown is requested (default 30 s).
    /// Steps still running afterwards are cancelled and left unacknowledged, so their messages
    /// return to the queue.
    pub fn grace_period(mut self, grace_period: Duration) -> Self {
        self.grace_period = grace_period;
        self
    }

    /// How often the worker announces itself to the worker registry (`worker_heartbeat`;
    /// default 10 s, at least 100 ms). It counts as gone after 3 intervals without one.
    pub fn registry_interval(mut self, every: Duration) -> Self {
        self.registry_interval = every.max(Duration::from_millis(100));
        self
    }

    /// The worker's name, reported with every result (default `hostname-pid`; at most 256 bytes:
    /// the orchestrator refuses messages with a longer one, so `run` does too).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The largest step output accepted, as JSON bytes (default 256 KiB). A larger output fails
    /// the attempt permanently.
    pub fn max_output_bytes(mut self, max_output_bytes: usize) -> Self {
        self.limits.max_output_bytes = max_output_bytes;
        self
    }

    /// For an `amqps://` URL: also trust the CA certificates of this PEM file (a private CA), on
    /// top of the platform's roots. The file is read when the worker starts; one that cannot be
    /// read or holds no certificate fails [`Worker::run`] with [`WorkerError::Config`].
    pub fn amqp_ca_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.amqp_ca = Some(AmqpCa::File(path.into()));
        self
    }

    /// [`amqp_ca_cert`](Self::amqp_ca_cert) with the PEM text itself.
    pub fn amqp_ca_cert_pem(mut self, pem: impl Into<String>) -> Self {
        self.amqp_ca = Some(AmqpCa::Pem(pem.into()));
        self
    }

    /// The names of the registered handlers, sorted.
    pub fn handler_names(&self) -> Vec<&str> {
        sorted_names(&self.handlers)
    }

    /// The template queues the worker will consume (`default` when [`queue`](Self::queue) was
    /// never called), in the order given.
    pub fn queue_names(&self) -> Vec<&str> {
        if self.queues.is_empty() {
            vec![DEFAULT_QUEUE]
        } else {
            self.queues.iter().map(String::as_str).collect()
        }
    }

    /// The namespaces the worker serves, in the order given.
    pub fn namespace_names(&self) -> Vec<&str> {
        self.namespaces.iter().map(String::as_str).collect()
    }

    /// [`check_handlers`] for this worker: fails if a step of `template`, in one of its
    /// namespaces and on one of its queues, names a handler it does not have.
    pub fn check_template(&self, template: &Template) -> Result<(), MissingHandlers> {
        if !self.namespaces.contains(&template.namespace) {
            return Ok(());
        }
        check_handlers(template, self.queue_names(), self.handler_names())
    }

    pub fn build(mut self) -> Worker {
        if self.queues.is_empty() {
            self.queues.push(DEFAULT_QUEUE.to_owned());
        }
        let prefetch = self
            .prefetch
            .unwrap_or_else(|| u16::try_from(self.concurrency).unwrap_or(u16::MAX));
        Worker {
            amqp_url: self.amqp_url,
            names: Names::new(self.prefix),
            namespaces: self.namespaces,
            queues: self.queues,
            handlers: self.handlers,
            concurrency: self.concurrency,
            prefetch,
            grace_period: self.grace_period,
            name: self.name.unwrap_or_else(default_name),
            limits: self.limits,
            long_steps: self.long_steps,
            amqp_ca: self.amqp_ca,
            registry_interval: self.registry_interval,
        }
    }
}

/// Consumes step queues and runs the registered handlers; see the [crate docs](crate).
pub struct Worker {
    amqp_url: String,
    names: Names,
    namespaces: Vec<String>,
    queues: Vec<String>,
    handlers: HashMap<String, DynHandler>,
    concurrency: usize,
    prefetch: u16,
    grace_period: Duration,
    name: String,
    limits: DataLimits,
    long_steps: crate::session::LongSteps,
    amqp_ca: Option<AmqpCa>,
    registry_interval: Duration,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("name", &self.name)
            .field("prefix", &self.names.prefix())
            .field("namespaces", &self.namespaces)
            .field("queues", &self.queues)
            .field("concurrency", &self.concurrency)
            .field("prefetch", &self.prefetch)
            .finish_non_exhaustive()
    }
}

impl Worker {
    /// Starts configuring a worker that connects to `amqp_url`
    /// (`amqp://user:password@host:5672/%2f`).
    pub fn builder(amqp_url: impl Into<String>) -> WorkerBuilder {
        WorkerBuilder::new(amqp_url.into())
    }

    /// The name reported with every result.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The names of the registered handlers, sorted.
    pub fn handler_names(&self) -> Vec<&str> {
        sorted_names(&self.handlers)
    }

    /// The template queues this worker consumes.
    pub fn queue_names(&self) -> Vec<&str> {
        self.queues.iter().map(String::as_str).collect()
    }

    /// The namespaces this worker serves.
    pub fn namespace_names(&self) -> Vec<&str> {
        self.namespaces.iter().map(String::as_str).collect()
    }

    /// [`check_handlers`] for this worker (templates of its namespaces only).
    pub fn check_template(&self, template: &Template) -> Result<(), MissingHandlers> {
        if !self.namespaces.contains(&template.namespace) {
            return Ok(());
        }
        check_handlers(template, self.queue_names(), self.handler_names())
    }

    /// Runs until `shutdown` is cancelled, then shuts down gracefully: stops taking steps, lets
    /// running steps finish within the grace period, cancels and abandons the rest (their
    /// messages return to the queue), waits for outstanding confirms and closes the connection.
    ///
    /// A lost connection is re-established with backoff, forever. Fails at once on an invalid URL
    /// or, on the first connection, when a step queue does not exist.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), WorkerError> {
        self.run_with_ready(shutdown, || {}).await
    }

    /// [`run`](Self::run), calling `on_ready` once, as soon as the first session consumes every
    /// queue of the worker. If the worker fails (or is shut down) before that, `on_ready` is
    /// dropped without being called: a caller waiting on a channel it holds hears either way.
    pub async fn run_with_ready(
        self,
        shutdown: CancellationToken,
        on_ready: impl FnOnce() + Send,
    ) -> Result<(), WorkerError> {
        let mut on_ready = Some(on_ready);
        self.amqp_url
            .parse::<AMQPUri>()
            .map_err(WorkerError::InvalidUrl)?;
        if self.name.len() > MAX_WORKER_NAME_LEN {
            return Err(WorkerError::Config(format!(
                "worker name is {} bytes; at most {MAX_WORKER_NAME_LEN} are allowed",
                self.name.len()
            )));
        }
        if self.namespaces.is_empty() {
            return Err(WorkerError::Config(
                "no namespace: name the namespace(s) the worker serves with .namespace(..)".into(),
            ));
        }
        let user_id = tasker_client::publish::amqp_user(&self.amqp_url).unwrap_or_default();
        // Every (namespace, queue): its `{namespace}.{queue}` key and its AMQP queue.
        let queues = self
            .namespaces
            .iter()
            .flat_map(|ns| self.queues.iter().map(move |q| (ns, q)))
            .map(|(ns, q)| {
                let amqp = self.names.step_queue(ns, q);
                ShortString::try_new(amqp.clone())
                    .map(|_| {
                        (
                            tasker_schemas::topology::step_routing_key(ns, q),
                            amqp.clone(),
                        )
                    })
                    .map_err(|_| {
                        WorkerError::Config(format!("queue name {amqp:?} is longer than 255 bytes"))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let tls = match &self.amqp_ca {
            Some(ca) => ca.tls_config()?,
            None => OwnedTLSConfig::default(),
        };
        let handler_names = sorted_names(&self.handlers);
        info!(
            worker = %self.name,
            prefix = self.names.prefix(),
            namespaces = ?self.namespaces,
            queues = ?self.queues,
            handlers = ?handler_names,
            concurrency = self.concurrency,
            prefetch = self.prefetch,
            "worker starting"
        );
        if self.handlers.is_empty() {
            warn!(worker = %self.name, "no handlers registered: every step will be reported as handler_missing");
        }
        let shared = Arc::new(Shared::new(
            self.names,
            self.name,
            self.handlers,
            self.limits,
            self.grace_period,
            self.long_steps,
            crate::registry::Identity::new(
                self.queues.clone(),
                self.concurrency,
                self.registry_interval,
            )
            .with_user_id(user_id),
        ));

        let mut backoff = reconnect_backoff();
        let mut connected_once = false;
        loop {
            let opened = tokio::select! {
                _ = shutdown.cancelled() => break,
                opened = Session::open(&shared, &self.amqp_url, &tls, &queues, self.prefetch) => opened,
            };
            match opened {
                Ok(session) => {
                    connected_once = true;
                    if let Some(ready) = on_ready.take() {
                        ready();
                    }
                    let since = Instant::now();
                    match session.run(&shared, &shutdown).await {
                        SessionEnd::Shutdown => return Ok(()),
                        SessionEnd::Lost(reason) => {
                            warn!(worker = %shared.worker, %reason, "lost the broker session; reconnecting");
                        }
                    }
                    if since.elapsed() >= HEALTHY_SESSION {
                        backoff = reconnect_backoff();
                    }
                }
                Err(SessionError::QueueMissing(queue)) if !connected_once => {
                    return Err(WorkerError::QueueMissing { queue });
                }
                Err(SessionError::AccessRefused { queue, reason }) if !connected_once => {
                    return Err(WorkerError::AccessRefused { queue, reason });
                }
                Err(e) => {
                    warn!(worker = %shared.worker, error = %e, "cannot open a broker session; retrying")
                }
            }
            let delay = backoff.next().unwrap_or(Duration::from_secs(5));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        drop(on_ready);
        // Shutdown while disconnected: steps still running cannot report; let them end.
        shared.drain().await;
        info!(worker = %shared.worker, "worker stopped");
        Ok(())
    }

    /// [`run`](Self::run) until SIGTERM or Ctrl-C.
    pub async fn run_until_signal(self) -> Result<(), WorkerError> {
        let shutdown = CancellationToken::new();
        let trigger = shutdown.clone();
        let signals = tokio::spawn(async move {
            wait_for_signal().await;
            info!("shutdown signal received");
            trigger.cancel();
        });
        let result = self.run(shutdown).await;
        signals.abort();
        result
    }
}

fn sorted_names(handlers: &HashMap<String, DynHandler>) -> Vec<&str> {
    let mut names: Vec<&str> = handlers.keys().map(String::as_str).collect();
    names.sort_unstable();
    names
}

fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        // Jitter adds up to the delay again: at most 5 s between attempts.
        .with_max_delay(Duration::from_millis(2_500))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Completes on SIGTERM or Ctrl-C. If no handler can be installed it never completes.
pub async fn wait_for_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}

fn default_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_owned());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_defaults_and_limits() {
        let w = Worker::builder("amqp://localhost").build();
        assert_eq!(w.queues, vec!["default".to_owned()]);
        assert_eq!(w.concurrency, DEFAULT_CONCURRENCY);
        assert_eq!(w.prefetch, 16);
        assert_eq!(w.names.prefix(), "tasker");
        assert!(
            w.name.ends_with(&format!("-{}", std::process::id())),
            "{}",
            w.name
        );

        let w = Worker::builder("amqp://localhost")
            .queue("a")
            .queue("b")
            .queue("a")
            .concurrency(0)
            .name("w1")
            .prefix("p")
            .build();
        assert_eq!(w.queues, vec!["a".to_owned(), "b".to_owned()]);
        assert_eq!((w.concurrency, w.prefetch), (1, 1));
        assert_eq!(w.name(), "w1");
        let w = Worker::builder("amqp://localhost")
            .concurrency(100_000)
            .build();
        assert_eq!(w.prefetch, u16::MAX);
        let w = Worker::builder("amqp://localhost")
            .concurrency(8)
            .prefetch(2)
            .build();
        assert_eq!((w.concurrency, w.prefetch), (8, 2));
    }

    #[test]
    fn debug_output_hides_the_url() {
        let b = Worker::builder("amqp://user:secret@localhost");
        assert!(!format!("{b:?}").contains("secret"));
        assert!(!format!("{:?}", b.build()).contains("secret"));
    }

    #[tokio::test]
    async fn invalid_url_fails_fast() {
        let err = Worker::builder("http://nope")
            .build()
            .run(CancellationToken::new())
            .await
            .unwrap_err();
        assert!(matches!(err, WorkerError::InvalidUrl(_)), "{err}");
    }

    fn template(steps: &[(&str, &str, Option<&str>)]) -> Template {
        serde_json::from_value(serde_json::json!({
            "namespace": "media",
            "name": "thumbnails",
            "version": 2,
            "steps": steps
                .iter()
                .map(|(name, handler, queue)| serde_json::json!({
                    "name": name, "handler": handler, "queue": queue,
                }))
                .collect::<Vec<_>>(),
        }))
        .expect("template")
    }

    #[test]
    fn check_handlers_names_the_missing_handlers_sorted_and_once() {
        let t = template(&[
            ("resize", "resize", None),
            ("publish", "publish", None),
            ("publish_again", "publish", None),
            ("archive", "archive", Some("default")),
        ]);
        let err = check_handlers(&t, ["default"], ["resize"]).unwrap_err();
        assert_eq!(
            err,
            MissingHandlers {
                namespace: "media".into(),
                name: "thumbnails".into(),
                version: 2,
                handlers: vec!["archive".into(), "publish".into()],
            }
        );
        assert_eq!(
            err.to_string(),
            "template media/thumbnails needs handlers [archive, publish] that this worker lacks"
        );
        let one = check_handlers(&t, ["default"], ["resize", "archive"]).unwrap_err();
        assert_eq!(
            one.to_string(),
            "template media/thumbnails needs handlers [publish] that this worker lacks"
        );
        assert_eq!(
            check_handlers(
                &t,
                vec!["default".to_owned()],
                ["archive", "publish", "resize", "x"]
            ),
            Ok(())
        );
    }

    #[test]
    fn check_handlers_counts_only_the_queues_the_worker_consumes() {
        let t = template(&[
            ("resize", "resize", Some("gpu")),
            ("publish", "publish", None),
            ("notify", "notify", Some("mail")),
        ]);
        // A gpu worker needs only resize.
        assert_eq!(check_handlers(&t, ["gpu"], ["resize"]), Ok(()));
        assert_eq!(
            check_handlers(&t, ["gpu"], ["publish"])
                .unwrap_err()
                .handlers,
            ["resize"]
        );
        // No step on its queues: nothing to check.
        assert_eq!(check_handlers(&t, ["other"], Vec::<String>::new()), Ok(()));
        assert_eq!(check_handlers(&t, Vec::<&str>::new(), ["x"]), Ok(()));
        // Two queues: the steps of both count.
        assert_eq!(
            check_handlers(&t, ["gpu", "mail"], ["resize"])
                .unwrap_err()
                .to_string(),
            "template media/thumbnails needs handlers [notify] that this worker lacks"
        );
    }

    #[test]
    fn builder_and_worker_report_their_handlers_and_queues() {
        let noop = |_| async { Ok(serde_json::json!(null)) };
        let b = Worker::builder("amqp://localhost")
            .namespace("media")
            .handler_fn("resize", noop)
            .handler_fn("archive", noop)
            .handler_fn("resize", noop);
        assert_eq!(b.handler_names(), ["archive", "resize"]);
        assert_eq!(b.queue_names(), ["default"]);
        let t = template(&[("resize", "resize", None), ("publish", "publish", None)]);
        assert_eq!(
            b.check_template(&t).unwrap_err().to_string(),
            "template media/thumbnails needs handlers [publish] that this worker lacks"
        );
        let b = b.queue("gpu").queue("mail");
        assert_eq!(b.queue_names(), ["gpu", "mail"]);
        // Its steps are on `default`, which this worker no longer consumes.
        assert_eq!(b.check_template(&t), Ok(()));
        let w = b.build();
        assert_eq!(w.handler_names(), ["archive", "resize"]);
        assert_eq!(w.queue_names(), ["gpu", "mail"]);
        assert_eq!(w.check_template(&t), Ok(()));
        let w = Worker::builder("amqp://localhost")
            .namespace("media")
            .build();
        assert!(w.handler_names().is_empty());
        assert_eq!(w.queue_names(), ["default"]);
        assert_eq!(w.namespace_names(), ["media"]);
        assert_eq!(
            w.check_template(&t).unwrap_err().handlers,
            ["publish", "resize"]
        );
        // A template of a namespace the worker does not serve is not its business.
        let other = Worker::builder("amqp://localhost")
            .namespace("shop")
            .build();
        assert_eq!(other.check_template(&t), Ok(()));
    }

    #[tokio::test]
    async fn a_worker_without_a_namespace_is_refused_before_connecting() {
        let err = Worker::builder("amqp://127.0.0.1:1")
            .build()
            .run(CancellationToken::new())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, WorkerError::Config(m) if m.contains("namespace")),
            "{err}"
        );
        let b = Worker::builder("amqp://localhost")
            .namespace("shop")
            .namespace("billing")
            .namespace("shop");
        assert_eq!(b.namespace_names(), ["shop", "billing"]);
    }

    #[tokio::test]
    async fn on_ready_is_dropped_uncalled_when_the_worker_fails_to_start() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let err = Worker::builder("http://nope")
            .build()
            .run_with_ready(CancellationToken::new(), move || {
                let _ = tx.send(());
            })
            .await
            .unwrap_err();
        assert!(matches!(err, WorkerError::InvalidUrl(_)), "{err}");
        assert!(rx.await.is_err(), "on_ready must not be called");
    }

    #[tokio::test]
    async fn an_overlong_name_is_refused_before_connecting() {
        let err = Worker::builder("amqp://127.0.0.1:1")
            .namespace("shop")
            .name("w".repeat(MAX_WORKER_NAME_LEN + 1))
            .build()
            .run_with_ready(CancellationToken::new(), || {})
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid worker configuration: worker name is 257 bytes; at most 256 are allowed"
        );
    }

    #[test]
    fn backoff_is_capped() {
        let delays: Vec<Duration> = reconnect_backoff().take(20).collect();
        assert_eq!(delays.len(), 20);
        assert!(
            delays.iter().all(|d| *d <= Duration::from_secs(5)),
            "{delays:?}"
        );
        assert!(delays[0] < Duration::from_millis(250), "{delays:?}");
    }
}
