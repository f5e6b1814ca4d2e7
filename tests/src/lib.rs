//! # tasker-tests: a harness for system tests with real PostgreSQL and RabbitMQ
//!
//! [`Harness::start`] gives each test its own database (created from an admin URL) and its own
//! exchange/queue prefix on a shared broker, and starts an in-process orchestrator; add workers
//! with [`Harness::worker`] and more orchestrator replicas with [`Harness::start_orchestrator`].
//! Tests can therefore run in parallel against one Postgres and one RabbitMQ.
//!
//! Services come from `TASKER_TEST_DATABASE_URL` (an admin URL: the harness creates databases
//! from it) and `TASKER_TEST_AMQP_URL`. Without them, and with the `docker` feature, the harness
//! starts PostgreSQL and RabbitMQ with testcontainers (once per test process).
//!
//! ```no_run
//! use serde_json::json;
//! use tasker_tests::Harness;
//!
//! # async fn t() -> anyhow::Result<()> {
//! let h = Harness::start().await?;
//! h.register_yaml(r#"
//! namespace: demo
//! name: hello
//! version: 1
//! steps:
//!   - { name: greet, handler: greet }
//! "#).await?;
//! h.spawn_worker(h.worker("demo").handler_fn("greet", |ctx| async move {
//!     Ok(json!({ "hello": ctx.input::<serde_json::Value>()?["name"] }))
//! })).await?;
//! let task = h.run("demo", "hello", json!({"name": "Ada"})).await?;
//! assert_eq!(task.state, tasker_schemas::TaskState::Completed);
//! h.finish().await;
//! # Ok(()) }
//! ```
//!
//! ## When something goes wrong
//!
//! - **A task that does not finish in time** fails [`Harness::wait`] (and `run`, `wait_for`,
//!   `wait_submitted`) with [`TaskNotFinished`], which lists every unfinished step: its state,
//!   attempt, why it waits (`StepView::waiting_reason`) and its last error, plus hints from what the
//!   harness knows (no running worker of the harness consumes the step's queue, or none there has
//!   its handler).
//! - **A worker that cannot start** fails [`Harness::spawn_worker`]: it returns once the worker
//!   consumes its queues, or with the worker's error (`queue … does not exist; register a template
//!   that uses it first` when no registered template uses the queue yet).
//! - **A worker that lacks a handler** a template registered through the harness needs on its
//!   queues fails `spawn_worker` with [`WorkerLacksHandlers`] (`template media/thumbnails needs
//!   handlers [publish] that this worker lacks`). To run one on purpose (testing
//!   `handler_missing`), use [`Harness::spawn_worker_unchecked`].
//! - **A test that fails or panics** drops its harness without [`Harness::finish`]: the drop
//!   stops the orchestrators and workers and deletes the database, queues and exchanges anyway
//!   (set `TASKER_TEST_KEEP=1` to keep them for a look).

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tasker_orchestrator::{App, Config, Shared};
use tasker_schemas::api::{StepView, SubmitTask, TaskView};
use tasker_schemas::{Names, StepState, TaskId, Template};
use tasker_worker::{Client, MissingHandlers, Worker, WorkerBuilder};
use tokio::sync::OnceCell;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use tasker_worker;

/// Where the test services are.
#[derive(Debug, Clone)]
pub struct Services {
    /// A URL with the right to create databases.
    pub admin_database_url: String,
    pub amqp_url: String,
}

static SERVICES: OnceCell<Services> = OnceCell::const_new();

/// The test services: from the environment, or (feature `docker`) from testcontainers.
pub async fn services() -> Result<Services> {
    SERVICES.get_or_try_init(discover).await.cloned()
}

async fn discover() -> Result<Services> {
    let db = std::env::var("TASKER_TEST_DATABASE_URL").ok();
    let amqp = std::env::var("TASKER_TEST_AMQP_URL").ok();
    if let (Some(admin_database_url), Some(amqp_url)) = (db, amqp) {
        return Ok(Services {
            admin_database_url,
            amqp_url,
        });
    }
    #[cfg(feature = "docker")]
    {
        return containers::start().await;
    }
    #[allow(unreachable_code)]
    {
        bail!(
            "set TASKER_TEST_DATABASE_URL and TASKER_TEST_AMQP_URL (run deploy/local/services.sh up and \
             source .tasker/env), or build with --features tasker-tests/docker where Docker runs"
        )
    }
}

#[cfg(feature = "docker")]
mod containers {
    use super::Services;
    use anyhow::Result;
    use testcontainers_modules::postgres::Postgres;
    use testcontainers_modules::rabbitmq::RabbitMq;
    use testcontainers_modules::testcontainers::runners::AsyncRunner;
    use testcontainers_modules::testcontainers::{ContainerAsync, ImageExt};

    /// Containers live as long as the test process.
    static KEEP: std::sync::OnceLock<(ContainerAsync<Postgres>, ContainerAsync<RabbitMq>)> =
        std::sync::OnceLock::new();

    pub async fn start() -> Result<Services> {
        let pg = Postgres::default().with_tag("16-alpine").start().await?;
        let mq = RabbitMq::default()
            .with_tag("3.13-management-alpine")
            .start()
            .await?;
        let pg_port = pg.get_host_port_ipv4(5432).await?;
        let mq_port = mq.get_host_port_ipv4(5672).await?;
        let services = Services {
            admin_database_url: format!(
                "postgres://postgres:postgres@127.0.0.1:{pg_port}/postgres"
            ),
            amqp_url: format!("amqp://guest:guest@127.0.0.1:{mq_port}/%2f"),
        };
        let _ = KEEP.set((pg, mq));
        Ok(services)
    }
}

/// Logs for tests: `RUST_LOG` decides (default: warnings).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A running in-process orchestrator.
pub struct Orchestrator {
    pub shared: Shared,
    pub client: Client,
    pub http_url: String,
    shutdown: CancellationToken,
    handle: JoinHandle<tasker_orchestrator::Result<()>>,
}

impl Orchestrator {
    /// Stops it gracefully and waits.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = self.handle.await;
    }

    /// Stops it abruptly (no drain), as close to a crash as a task can get: its main task is
    /// aborted, and its loops (spawned tasks that an abort alone would leave running) are told
    /// to stop without being waited for.
    pub fn kill(self) {
        self.handle.abort();
        self.shutdown.cancel();
    }
}

/// A running in-process worker.
pub struct WorkerHandle {
    shutdown: CancellationToken,
    handle: JoinHandle<Result<(), tasker_worker::WorkerError>>,
}

impl WorkerHandle {
    /// Starts a graceful shutdown and waits for it.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        Ok(self.handle.await??)
    }

    /// Starts a graceful shutdown without waiting.
    pub fn begin_stop(&self) {
        self.shutdown.cancel();
    }

    pub async fn join(self) -> Result<()> {
        Ok(self.handle.await??)
    }
}

/// How long a worker started by the harness may take to consume its queues.
pub const WORKER_START_TIMEOUT: Duration = Duration::from_secs(30);
/// The most a dropped harness spends deleting its database and queues.
pub const DROP_CLEANUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Set (to anything but `0`) to keep the database and queues of a harness dropped without
/// [`Harness::finish`] (a failed test), for a look at them; their names are printed.
pub const KEEP_ENV: &str = "TASKER_TEST_KEEP";

/// What the harness knows about a worker it started, for the hints of [`TaskNotFinished`].
struct WorkerInfo {
    name: String,
    namespaces: Vec<String>,
    queues: Vec<String>,
    handlers: Vec<String>,
    /// `None` while it runs; how it ended otherwise.
    ended: Arc<Mutex<Option<String>>>,
}

impl WorkerInfo {
    fn ended(&self) -> Option<String> {
        lock(&self.ended).clone()
    }
}

/// A worker the harness was asked to start lacks handlers that templates registered through the
/// harness need on its queues. Displays as the [`MissingHandlers`] messages (`template
/// media/thumbnails needs handlers [publish] that this worker lacks`), then how to run it anyway.
#[derive(Debug)]
pub struct WorkerLacksHandlers {
    pub worker: String,
    /// One entry per template with steps the worker cannot run.
    pub missing: Vec<MissingHandlers>,
}

impl fmt::Display for WorkerLacksHandlers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let messages: Vec<String> = self.missing.iter().map(ToString::to_string).collect();
        write!(
            f,
            "{} (worker {}; to run it anyway, e.g. to test handler_missing, use \
             spawn_worker_unchecked or start_worker_unchecked)",
            messages.join("; "),
            self.worker
        )
    }
}

impl std::error::Error for WorkerLacksHandlers {}

/// A task that did not finish in time: the error of [`Harness::wait`], [`Harness::wait_for`],
/// [`Harness::run`] and [`Harness::wait_submitted`]. Its text lists every unfinished step with its
/// state, attempt, why it waits and its last error, and hints about the harness's workers.
#[derive(Debug)]
pub struct TaskNotFinished {
    pub timeout: Duration,
    /// The task as read once more at the timeout.
    pub task: TaskView,
    /// What the harness knows that the task view does not (no worker on a queue, a handler no
    /// worker has, a worker that stopped).
    pub hints: Vec<String>,
}

impl TaskNotFinished {
    /// The steps that are not finished yet.
    pub fn blocked_steps(&self) -> impl Iterator<Item = &StepView> {
        self.task.steps.iter().filter(|s| !s.state.is_terminal())
    }
}

impl fmt::Display for TaskNotFinished {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.task;
        let blocked: Vec<&StepView> = self.blocked_steps().collect();
        write!(
            f,
            "task {} ({}/{} v{}) did not finish within {:?} (state: {}); {} of {} steps unfinished",
            t.id,
            t.namespace,
            t.template,
            t.template_version,
            self.timeout,
            t.state,
            blocked.len(),
            t.steps.len()
        )?;
        if let Some(error) = &t.error {
            write!(f, "; task error: {error}")?;
        }
        for s in &blocked {
            write!(
                f,
                "\n  - step {}: {}, attempt {} (failures {}/{}), handler {:?} on queue {:?}",
                s.name, s.state, s.attempt, s.failures, s.max_attempts, s.handler, s.queue
            )?;
            write!(
                f,
                "\n      waiting: {}",
                s.waiting_reason.as_deref().unwrap_or("(no reason given)")
            )?;
            if let Some(last) = last_error(s) {
                write!(f, "\n      last error: {last}")?;
            }
        }
        if blocked.is_empty() {
            write!(
                f,
                "\n  (no unfinished step: the task's bookkeeping is off; the reconciler repairs it)"
            )?;
        }
        for hint in &self.hints {
            write!(f, "\n  hint: {hint}")?;
        }
        Ok(())
    }
}

impl std::error::Error for TaskNotFinished {}

/// The error of a step's newest finished attempt that has one (else the step's own error).
fn last_error(s: &StepView) -> Option<String> {
    let finished = s
        .attempts
        .iter()
        .rev()
        .find(|a| a.finished_at.is_some() && a.error.is_some());
    match finished {
        Some(a) => Some(format!(
            "attempt {} {}: {}",
            a.attempt,
            a.outcome,
            a.error.as_deref().unwrap_or_default()
        )),
        None => s.error.clone(),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding a lock must not stop the cleanup.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One test's world: its own database, its own broker prefix, orchestrators and workers.
///
/// Call [`finish`](Self::finish) at the end of a test. A harness dropped without it (the test
/// failed with `?` or panicked) still stops what it started and deletes its database and queues,
/// on a thread of its own, within [`DROP_CLEANUP_TIMEOUT`] (unless [`KEEP_ENV`] is set).
pub struct Harness {
    pub services: Services,
    pub database_url: String,
    pub database_name: String,
    pub prefix: String,
    pub db: PgPool,
    orchestrators: Mutex<Vec<Orchestrator>>,
    workers: Mutex<Vec<WorkerHandle>>,
    worker_info: Mutex<Vec<WorkerInfo>>,
    /// Templates registered through the harness; workers are checked against them.
    templates: Mutex<Vec<Template>>,
    configure: fn(&mut Config),
    /// Set by `finish`: nothing left for `Drop` to do.
    cleaned_up: bool,
}

impl Harness {
    /// A fresh database and prefix, and one orchestrator running.
    pub async fn start() -> Result<Self> {
        Self::start_with(|_| {}).await
    }

    /// Like [`Harness::start`], with a hook to change the orchestrator config (applied to every
    /// orchestrator this harness starts).
    pub async fn start_with(configure: fn(&mut Config)) -> Result<Self> {
        init_tracing();
        // For tests that build reqwest clients of their own (reqwest's rustls has no provider).
        tasker_worker::client::tls::install_crypto_provider();
        let services = services().await?;
        let id = Uuid::now_v7().simple().to_string();
        let database_name = format!("tasker_test_{}", &id[id.len() - 16..]);
        let admin = PgPool::connect(&services.admin_database_url)
            .await
            .context("cannot connect to the test Postgres (TASKER_TEST_DATABASE_URL)")?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE \"{database_name}\""
        )))
        .execute(&admin)
        .await?;
        admin.close().await;
        let database_url = replace_database(&services.admin_database_url, &database_name)?;
        let prefix = format!("t{}", &id[id.len() - 12..]);
        // From here on, a failure drops `h`, which deletes the database.
        let db = match PgPool::connect(&database_url).await {
            Ok(db) => db,
            Err(e) => {
                drop_database(&services.admin_database_url, &database_name).await;
                return Err(e.into());
            }
        };
        let h = Self {
            db,
            services,
            database_url,
            database_name,
            prefix,
            orchestrators: Default::default(),
            workers: Default::default(),
            worker_info: Default::default(),
            templates: Default::default(),
            configure,
            cleaned_up: false,
        };
        h.start_orchestrator().await?;
        Ok(h)
    }

    /// The config the harness gives its orchestrators.
    pub fn config(&self) -> Config {
        let mut c = Config {
            database_url: self.database_url.clone(),
            amqp_url: self.services.amqp_url.clone(),
            http_addr: "127.0.0.1:0".parse().expect("address"),
            prefix: self.prefix.clone(),
            db_pool_size: 8,
            poll_interval_ms: 100,
            relay_after_ms: 1_000,
            handler_missing_delay_ms: 200,
            shutdown_grace_ms: 3_000,
            // Tests read the dead-letter queue itself; tests of the dead_letters table turn the
            // reader on.
            dead_letter_reader: false,
            ..Config::default()
        };
        (self.configure)(&mut c);
        c
    }

    /// Starts one more orchestrator replica on the same database and prefix.
    pub async fn start_orchestrator(&self) -> Result<String> {
        self.start_orchestrator_with(self.config()).await
    }

    /// Starts an orchestrator with a given config; returns its HTTP URL (`https://` when the
    /// config has a certificate: the harness's [`Orchestrator::client`] then trusts only the
    /// platform's CAs, so build a client with [`Client::builder`] and the test's CA).
    pub async fn start_orchestrator_with(&self, config: Config) -> Result<String> {
        let config_keys = config.api_keys.clone();
        let app = App::build(config).await?;
        let http_url = app.http_url();
        let shared = app.shared().clone();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        // With keys configured, the harness's client uses the first (a bootstrap admin key).
        let client = match config_keys.first() {
            Some(key) => Client::builder(&http_url).api_key(key.clone()).build()?,
            None => Client::new(&http_url),
        };
        let o = Orchestrator {
            shared,
            client,
            http_url: http_url.clone(),
            shutdown,
            handle,
        };
        lock(&self.orchestrators).push(o);
        Ok(http_url)
    }

    /// Removes the orchestrator `index` from the harness (to stop or kill it).
    pub fn take_orchestrator(&self, index: usize) -> Orchestrator {
        lock(&self.orchestrators).remove(index)
    }

    /// The HTTP URL of orchestrator `index`.
    pub fn http_url(&self, index: usize) -> String {
        lock(&self.orchestrators)[index].http_url.clone()
    }

    /// A client for the first orchestrator.
    pub fn client(&self) -> Client {
        lock(&self.orchestrators)[0].client.clone()
    }

    /// The shared handles of orchestrator `index` (metrics, pool).
    pub fn shared(&self, index: usize) -> Shared {
        lock(&self.orchestrators)[index].shared.clone()
    }

    /// Exchange and queue names of this harness.
    pub fn names(&self) -> Names {
        Names::new(self.prefix.clone())
    }

    /// A worker builder pointed at this harness's broker and prefix, serving `namespace` (queue
    /// `default`, no handlers; add namespaces with `.namespace(..)`).
    pub fn worker(&self, namespace: &str) -> WorkerBuilder {
        tasker_worker::Worker::builder(self.services.amqp_url.clone())
            .prefix(self.prefix.clone())
            .namespace(namespace)
            .grace_period(Duration::from_secs(5))
    }

    /// Runs a worker in the background until the harness finishes.
    ///
    /// Returns once the worker consumes all its queues, and fails if it cannot start (a queue
    /// that no registered template uses does not exist yet: [`tasker_worker::WorkerError`]) or if
    /// it lacks a handler that a template registered through this harness needs on one of its
    /// queues ([`WorkerLacksHandlers`]). To run such a worker on purpose, use
    /// [`spawn_worker_unchecked`](Self::spawn_worker_unchecked).
    pub async fn spawn_worker(&self, builder: WorkerBuilder) -> Result<()> {
        let w = self.start_worker(builder).await?;
        lock(&self.workers).push(w);
        Ok(())
    }

    /// [`spawn_worker`](Self::spawn_worker) without the handler check, for tests of a worker that
    /// lacks a handler. Start-up errors still fail it.
    pub async fn spawn_worker_unchecked(&self, builder: WorkerBuilder) -> Result<()> {
        let w = self.start_worker_unchecked(builder).await?;
        lock(&self.workers).push(w);
        Ok(())
    }

    /// Like [`spawn_worker`](Self::spawn_worker) (the same checks), but hands back the worker's
    /// handle, to stop it in the test.
    pub async fn start_worker(&self, builder: WorkerBuilder) -> Result<WorkerHandle> {
        self.launch(builder, true).await
    }

    /// [`start_worker`](Self::start_worker) without the handler check.
    pub async fn start_worker_unchecked(&self, builder: WorkerBuilder) -> Result<WorkerHandle> {
        self.launch(builder, false).await
    }

    /// Fails if `worker` lacks a handler that a template registered through this harness needs
    /// on one of the worker's queues. [`spawn_worker`](Self::spawn_worker) calls it.
    pub fn check_worker(&self, worker: &Worker) -> Result<(), WorkerLacksHandlers> {
        let missing: Vec<MissingHandlers> = lock(&self.templates)
            .iter()
            .filter_map(|t| worker.check_template(t).err())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(WorkerLacksHandlers {
            worker: worker.name().to_owned(),
            missing,
        })
    }

    async fn launch(&self, builder: WorkerBuilder, check: bool) -> Result<WorkerHandle> {
        let worker = builder.build();
        if check {
            self.check_worker(&worker)?;
        }
        let name = worker.name().to_owned();
        let queues: Vec<String> = worker.queue_names().into_iter().map(Into::into).collect();
        let namespaces: Vec<String> = worker
            .namespace_names()
            .into_iter()
            .map(Into::into)
            .collect();
        let handlers: Vec<String> = worker.handler_names().into_iter().map(Into::into).collect();
        let ended = Arc::new(Mutex::new(None));
        let shutdown = CancellationToken::new();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        let run = worker.run_with_ready(shutdown.clone(), move || {
            let _ = ready_tx.send(());
        });
        let record = ended.clone();
        let handle = tokio::spawn(async move {
            let result = run.await;
            *lock(&record) = Some(match &result {
                Ok(()) => "stopped".to_owned(),
                Err(e) => format!("failed: {e}"),
            });
            result
        });
        match tokio::time::timeout(WORKER_START_TIMEOUT, ready_rx).await {
            Ok(Ok(())) => {}
            // It ended before consuming: its own error says why.
            Ok(Err(_)) => {
                return Err(match handle.await {
                    Ok(Err(e)) => anyhow::Error::new(e),
                    Ok(Ok(())) => anyhow!("it stopped before consuming its queues"),
                    Err(e) => anyhow!("it panicked: {e}"),
                })
                .with_context(|| format!("worker {name} (queues {queues:?}) could not start"));
            }
            Err(_) => {
                shutdown.cancel();
                handle.abort();
                bail!(
                    "worker {name} did not consume its queues {queues:?} within \
                     {WORKER_START_TIMEOUT:?}: is the broker at TASKER_TEST_AMQP_URL reachable?"
                );
            }
        }
        lock(&self.worker_info).push(WorkerInfo {
            name,
            namespaces,
            queues,
            handlers,
            ended,
        });
        Ok(WorkerHandle { shutdown, handle })
    }

    /// Registers a template (and declares its queues). The harness remembers it, to check the
    /// handlers of workers started afterwards.
    pub async fn register(&self, template: &Template) -> Result<()> {
        self.client().register_template(template).await?;
        let mut templates = lock(&self.templates);
        templates.retain(|t| {
            (&t.namespace, &t.name, t.version)
                != (&template.namespace, &template.name, template.version)
        });
        templates.push(template.clone());
        Ok(())
    }

    /// Registers a template written in YAML.
    pub async fn register_yaml(&self, yaml: &str) -> Result<Template> {
        let t: Template = serde_saphyr_from_str(yaml)?;
        self.register(&t).await?;
        Ok(t)
    }

    /// Submits a task; returns its id.
    pub async fn submit(&self, namespace: &str, template: &str, context: Value) -> Result<TaskId> {
        let r = self
            .client()
            .submit(&SubmitTask {
                namespace: namespace.into(),
                template: template.into(),
                version: None,
                context,
                idempotency_key: None,
                priority: 0,
                task_id: None,
                run_at: None,
                delay: None,
                deadline: None,
            })
            .await?;
        Ok(r.task_id)
    }

    /// Waits (up to 60 s) for a task to finish; see [`wait_for`](Self::wait_for).
    pub async fn wait(&self, id: TaskId) -> Result<TaskView> {
        self.wait_for(id, Duration::from_secs(60)).await
    }

    /// Waits up to `timeout` for a task to finish. If it does not, fails with
    /// [`TaskNotFinished`]: every unfinished step with its state, attempt, why it waits and its
    /// last error.
    pub async fn wait_for(&self, id: TaskId, timeout: Duration) -> Result<TaskView> {
        match self.client().wait(id, timeout).await {
            Ok(task) => Ok(task),
            Err(tasker_worker::ClientError::Timeout { .. }) => {
                let task = self
                    .client()
                    .task(id)
                    .await
                    .with_context(|| format!("task {id} did not finish within {timeout:?}"))?;
                if task.is_finished() {
                    return Ok(task);
                }
                let hints = self.hints(&task);
                Err(TaskNotFinished {
                    timeout,
                    task,
                    hints,
                }
                .into())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// What the harness knows about the unfinished steps of `task` that its view does not say.
    fn hints(&self, task: &TaskView) -> Vec<String> {
        let infos = lock(&self.worker_info);
        let mut hints = Vec::new();
        let mut seen = Vec::new();
        for s in task.steps.iter().filter(|s| {
            matches!(
                s.state,
                StepState::Queued | StepState::Dispatched | StepState::Retrying
            )
        }) {
            if seen.contains(&(&s.queue, &s.handler)) {
                continue;
            }
            seen.push((&s.queue, &s.handler));
            let on_queue: Vec<&WorkerInfo> = infos
                .iter()
                .filter(|w| w.namespaces.contains(&task.namespace) && w.queues.contains(&s.queue))
                .collect();
            let running: Vec<&&WorkerInfo> =
                on_queue.iter().filter(|w| w.ended().is_none()).collect();
            if running.is_empty() {
                let stopped: Vec<String> = on_queue
                    .iter()
                    .map(|w| format!("{} {}", w.name, w.ended().unwrap_or_default()))
                    .collect();
                hints.push(format!(
                    "no running worker started by this harness consumes queue {:?}{}",
                    s.queue,
                    if stopped.is_empty() {
                        String::new()
                    } else {
                        format!(" (stopped: {})", stopped.join(", "))
                    }
                ));
            } else if !running.iter().any(|w| w.handlers.contains(&s.handler)) {
                let there: Vec<String> = running
                    .iter()
                    .map(|w| format!("{} [{}]", w.name, w.handlers.join(", ")))
                    .collect();
                hints.push(format!(
                    "no running worker on queue {:?} has handler {:?} (workers there: {})",
                    s.queue,
                    s.handler,
                    there.join("; ")
                ));
            }
        }
        hints
    }

    /// Waits for a task that was submitted asynchronously (over AMQP) to exist, then to finish.
    pub async fn wait_submitted(&self, id: TaskId, timeout: Duration) -> Result<TaskView> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match self.client().task(id).await {
                Ok(_) => break,
                Err(tasker_worker::ClientError::Api { status: 404, .. })
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.wait_for(
            id,
            deadline.saturating_duration_since(tokio::time::Instant::now()),
        )
        .await
    }

    /// Submits a task and waits (up to 60 s) for it to finish; see [`wait_for`](Self::wait_for).
    pub async fn run(&self, namespace: &str, template: &str, context: Value) -> Result<TaskView> {
        let id = self.submit(namespace, template, context).await?;
        self.wait(id).await
    }

    /// Takes the next message from this harness's dead-letter queue: its bytes and the reason
    /// header. Fails if none arrives within `timeout`.
    pub async fn next_dead_letter(&self, timeout: Duration) -> Result<(Vec<u8>, String)> {
        use lapin::options::BasicGetOptions;
        let conn = lapin::Connection::connect(&self.services.amqp_url, Default::default()).await?;
        let ch = conn.create_channel().await?;
        let deadline = tokio::time::Instant::now() + timeout;
        let queue = self.names().dead_letter_queue();
        loop {
            let got = ch
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
                .await?;
            if let Some(m) = got {
                let reason = m
                    .delivery
                    .properties
                    .headers()
                    .as_ref()
                    .and_then(|h| {
                        h.inner()
                            .get(tasker_schemas::message::HEADER_DEAD_LETTER_REASON)
                            .cloned()
                    })
                    .map(|v| match v {
                        lapin::types::AMQPValue::LongString(s) => s.to_string(),
                        other => format!("{other:?}"),
                    })
                    .unwrap_or_default();
                let _ = conn.close(200, "done".into()).await;
                return Ok((m.delivery.data, reason));
            }
            if tokio::time::Instant::now() > deadline {
                bail!("no dead letter within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops workers and orchestrators gracefully, deletes this test's queues and exchanges and
    /// drops its database. Call at the end of a test; a harness dropped without it (a failed
    /// test) cleans up too, without the graceful stops.
    pub async fn finish(mut self) {
        let workers: Vec<_> = lock(&self.workers).drain(..).collect();
        for w in workers {
            let _ = w.stop().await;
        }
        let orchestrators: Vec<_> = lock(&self.orchestrators).drain(..).collect();
        for o in orchestrators {
            o.stop().await;
        }
        clean_up(
            &self.services,
            &self.names(),
            &self.database_name,
            Some(&self.db),
            self.known_queues(),
        )
        .await;
        self.cleaned_up = true;
    }

    /// The step queues of the templates registered through the harness.
    fn known_queues(&self) -> Vec<String> {
        lock(&self.templates)
            .iter()
            .flat_map(|t| {
                t.steps
                    .iter()
                    .map(|s| tasker_schemas::topology::step_routing_key(&t.namespace, s.queue()))
            })
            .collect()
    }
}

impl Drop for Harness {
    /// A harness dropped without [`Harness::finish`]: stops what it started at once and deletes
    /// the database and queues on a thread with its own runtime (Drop cannot await, and the
    /// test's runtime may be unwinding), waiting at most about [`DROP_CLEANUP_TIMEOUT`].
    fn drop(&mut self) {
        if self.cleaned_up {
            return;
        }
        for w in lock(&self.workers).drain(..) {
            w.shutdown.cancel();
            w.handle.abort();
        }
        for o in lock(&self.orchestrators).drain(..) {
            o.shutdown.cancel();
            o.handle.abort();
        }
        let names = self.names();
        if std::env::var(KEEP_ENV).is_ok_and(|v| !v.is_empty() && v != "0") {
            eprintln!(
                "tasker-tests: {KEEP_ENV} is set: keeping database {} and the queues and \
                 exchanges of prefix {}",
                self.database_name,
                names.prefix()
            );
            return;
        }
        let services = self.services.clone();
        let database_url = self.database_url.clone();
        let database_name = self.database_name.clone();
        let queues = self.known_queues();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let job = move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(runtime) = runtime {
                runtime.block_on(async {
                    let work = async {
                        let db = PgPoolOptions::new()
                            .max_connections(1)
                            .acquire_timeout(Duration::from_secs(5))
                            .connect(&database_url)
                            .await
                            .ok();
                        clean_up(&services, &names, &database_name, db.as_ref(), queues).await;
                    };
                    if tokio::time::timeout(DROP_CLEANUP_TIMEOUT, work)
                        .await
                        .is_err()
                    {
                        eprintln!(
                            "tasker-tests: cleaning up database {database_name} took over \
                             {DROP_CLEANUP_TIMEOUT:?}; leaving the rest"
                        );
                    }
                });
            }
            let _ = done_tx.send(());
        };
        if std::thread::Builder::new()
            .name("tasker-harness-cleanup".into())
            .spawn(job)
            .is_ok()
        {
            let _ = done_rx.recv_timeout(DROP_CLEANUP_TIMEOUT + Duration::from_secs(5));
        }
    }
}

/// Deletes the queues and exchanges of `names` (the step queues named in `queues`, in the
/// templates table of `db` and `default`), closes `db` and drops the database. Best effort.
async fn clean_up(
    services: &Services,
    names: &Names,
    database_name: &str,
    db: Option<&PgPool>,
    mut queues: Vec<String>,
) {
    if let Some(db) = db {
        let in_db: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT coalesce(s->>'queue', 'default') FROM templates, jsonb_array_elements(content->'steps') s",
        )
        .fetch_all(db)
        .await
        .unwrap_or_default();
        queues.extend(in_db);
    }
    queues.sort_unstable();
    queues.dedup();
    let _ = delete_topology(&services.amqp_url, names, &queues).await;
    if let Some(db) = db {
        db.close().await;
    }
    drop_database(&services.admin_database_url, database_name).await;
}

/// `DROP DATABASE … WITH (FORCE)`, best effort.
async fn drop_database(admin_database_url: &str, database_name: &str) {
    if let Ok(admin) = PgPool::connect(admin_database_url).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{database_name}\" WITH (FORCE)"
        )))
        .execute(&admin)
        .await;
        admin.close().await;
    }
}

fn serde_saphyr_from_str(yaml: &str) -> Result<Template> {
    tasker_orchestrator::service::templates::parse_template(yaml).map_err(anyhow::Error::msg)
}

/// Points a Postgres URL at another database (the query string is kept).
pub fn replace_database(url: &str, database: &str) -> Result<String> {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let Some(scheme_end) = base.find("://") else {
        bail!(
            "not a URL: {}",
            tasker_orchestrator::config::redact_url(url)
        )
    };
    let after = &base[scheme_end + 3..];
    let host_end = after.find('/').map_or(base.len(), |i| scheme_end + 3 + i);
    let mut out = format!("{}/{database}", &base[..host_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    Ok(out)
}

/// Deletes every queue and exchange of a prefix (best effort): the orchestrator's own, and the step
/// queues named in `step_queues` plus `default`. Used by the harness, `chaos` and `loadgen`.
pub async fn delete_topology(amqp_url: &str, names: &Names, step_queues: &[String]) -> Result<()> {
    tasker_orchestrator::broker::delete_topology(amqp_url, names, step_queues)
        .await
        .context("deleting the broker topology")
}

/// The counters (`*_total`) of a Prometheus text exposition, each summed over its label sets:
/// `tasker_tasks_completed_total{namespace="a"} 2` and `{namespace="b"} 3` give 5.
pub fn counter_totals(text: &str) -> std::collections::BTreeMap<String, f64> {
    let mut totals = std::collections::BTreeMap::new();
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = match l.rsplit_once('}') {
            Some((series, rest)) => (series, rest),
            None => match l.split_once(' ') {
                Some(p) => p,
                None => continue,
            },
        };
        let name = series.split('{').next().unwrap_or(series).trim();
        if !name.ends_with("_total") {
            continue;
        }
        if let Some(v) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        {
            *totals.entry(name.to_owned()).or_insert(0.0) += v;
        }
    }
    totals
}

/// Stops a child process gracefully: SIGTERM, then a kill if it has not exited within `grace`.
/// Returns false when it had to be killed.
pub async fn stop_child(child: &mut tokio::process::Child, grace: Duration) -> bool {
    if let Some(pid) = child.id() {
        let _ = tokio::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .await;
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.kill().await;
        return false;
    }
    true
}

/// The `tasker` binary for a harness that starts `tasker serve` itself: `explicit` (its
/// `--tasker-bin`), else next to the running executable (`cargo run` puts bins in
/// `target/<profile>/`, tests and examples one level deeper).
pub fn find_tasker(explicit: Option<&std::path::Path>) -> Result<std::path::PathBuf> {
    let path = match explicit {
        Some(p) => p.to_owned(),
        None => {
            let exe = std::env::current_exe()?;
            let dir = exe.parent().context("the executable has no directory")?;
            let name = format!("tasker{}", std::env::consts::EXE_SUFFIX);
            [dir.join(&name), dir.join("..").join(&name)]
                .into_iter()
                .find(|p| p.is_file())
                .unwrap_or_else(|| dir.join(&name))
        }
    };
    if !path.is_file() {
        bail!(
            "{} does not exist: cargo build -p tasker-orchestrator (or pass --tasker-bin)",
            path.display()
        );
    }
    Ok(path)
}

/// Starts `tasker serve` from `bin` as a child process on a free port, with only the `TASKER_*`
/// settings in `env` (none from this shell: no config file or API keys leak in), its output
/// appended to `log`. Returns once `/ready` answers (at most 60 s), with the API URL; the child
/// is killed when dropped. A start that fails says why with the end of the log.
pub async fn spawn_serve(
    bin: &std::path::Path,
    env: &[(String, String)],
    log: &std::path::Path,
) -> Result<(tokio::process::Child, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("serve");
    for (k, _) in std::env::vars() {
        if k.starts_with("TASKER_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)))
        .env("TASKER_HTTP_ADDR", format!("127.0.0.1:{port}"))
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let tail = || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    };
    let http = reqwest::Client::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the orchestrator exited at start ({status}); the end of its log ({}):\n{}",
                log.display(),
                tail()
            );
        }
        if let Ok(r) = http
            .get(format!("{url}/ready"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            && r.status().is_success()
        {
            return Ok((child, url));
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill().await;
            bail!(
                "the orchestrator was not ready within 60 s; the end of its log ({}):\n{}",
                log.display(),
                tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where the test broker's `rabbitmqctl` is: `TASKER_TEST_RABBITMQCTL` (written to
/// `.tasker/env` by `deploy/local/services.sh up`: its `rabbitmqctl` passthrough), split on
/// spaces. `Ok(None)` when it is not set (the caller skips), an error when it is not set and
/// `CI` is: tests that create broker users must not skip there.
pub fn rabbitmqctl_command() -> Result<Option<Vec<String>>> {
    match std::env::var("TASKER_TEST_RABBITMQCTL") {
        Ok(v) if !v.trim().is_empty() => Ok(Some(v.split_whitespace().map(String::from).collect())),
        _ => {
            let why = "TASKER_TEST_RABBITMQCTL not set: run deploy/local/services.sh up, then . .tasker/env";
            if std::env::var_os("CI").is_some() {
                bail!("{why} (required when CI is set)");
            }
            eprintln!("SKIPPED (broker users): {why}");
            Ok(None)
        }
    }
}

/// Runs `rabbitmqctl args` with the command of [`rabbitmqctl_command`]; fails with its output
/// when it fails.
pub fn rabbitmqctl(ctl: &[String], args: &[&str]) -> Result<String> {
    let (program, base) = ctl.split_first().context("empty rabbitmqctl command")?;
    let output = std::process::Command::new(program)
        .args(base)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}", ctl.join(" ")))?;
    let text = String::from_utf8_lossy(&output.stdout).to_string()
        + &String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!("rabbitmqctl {} failed: {text}", args.first().unwrap_or(&""));
    }
    Ok(text)
}

/// A broker user of one namespace, created by [`create_broker_user`]; deleted when dropped.
pub struct BrokerUser {
    pub user: String,
    /// `amqp_url` with this user's name and password.
    pub url: String,
    ctl: Vec<String>,
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = rabbitmqctl(&self.ctl, &["delete_user", &self.user]);
    }
}

/// Creates the broker user of `namespace` (named by `user_format`, as the orchestrator's
/// `broker_user_format`) with a random password and exactly the permissions `tasker
/// broker-permissions` gives it ([`tasker_orchestrator::identity::permission_commands`]), on
/// the virtual host of `amqp_url`.
pub fn create_broker_user(
    ctl: &[String],
    amqp_url: &str,
    names: &Names,
    namespace: &str,
    user_format: &str,
) -> Result<BrokerUser> {
    use tasker_orchestrator::identity::{UserFormat, permission_commands};
    let user = UserFormat::parse(user_format)
        .map_err(|e| anyhow!(e))?
        .user_of(namespace);
    let password = Uuid::now_v7().simple().to_string();
    let uri: lapin::uri::AMQPUri = amqp_url.parse().map_err(|e: String| anyhow!(e))?;
    let vhost = uri.vhost.clone();
    let (scheme, rest) = amqp_url.split_once("://").context("AMQP URL without ://")?;
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let url = format!("{scheme}://{user}:{password}@{host}");
    // Delete a leftover of an earlier run first; created, it is deleted on drop.
    let _ = rabbitmqctl(ctl, &["delete_user", &user]);
    rabbitmqctl(ctl, &["add_user", &user, &password])?;
    let created = BrokerUser {
        user: user.clone(),
        url,
        ctl: ctl.to_vec(),
    };
    for c in permission_commands(names, namespace, &user, &vhost) {
        let args: Vec<&str> = c.iter().map(String::as_str).collect();
        rabbitmqctl(ctl, &args)?;
    }
    Ok(created)
}

#[cfg(test)]
mod tests {
    use super::replace_database;

    #[test]
    fn replaces_the_database_of_a_url() {
        assert_eq!(
            replace_database("postgres://u:p@h:5432/postgres", "x").unwrap(),
            "postgres://u:p@h:5432/x"
        );
        assert_eq!(
            replace_database("postgres://h/db?sslmode=disable", "x").unwrap(),
            "postgres://h/x?sslmode=disable"
        );
        assert_eq!(
            replace_database("postgres://h", "x").unwrap(),
            "postgres://h/x"
        );
    }
}
