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
//! h.spawn_worker(h.worker().handler_fn("greet", |ctx| async move {
//!     Ok(json!({ "hello": ctx.input::<serde_json::Value>()?["name"] }))
//! }));
//! let task = h.run("demo", "hello", json!({"name": "Ada"})).await?;
//! assert_eq!(task.state, tasker_schemas::TaskState::Completed);
//! h.finish().await;
//! # Ok(()) }
//! ```

use anyhow::{Context, Result, bail};
use serde_json::Value;
use sqlx::PgPool;
use std::time::Duration;
use tasker_orchestrator::{App, Config, Shared};
use tasker_schemas::api::{SubmitTask, TaskView};
use tasker_schemas::{Names, TaskId, Template};
use tasker_worker::{Client, WorkerBuilder};
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

    /// Stops it abruptly (no drain), as close to a crash as a task can get.
    pub fn kill(self) {
        self.handle.abort();
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

/// One test's world: its own database, its own broker prefix, orchestrators and workers.
pub struct Harness {
    pub services: Services,
    pub database_url: String,
    pub database_name: String,
    pub prefix: String,
    pub db: PgPool,
    orchestrators: std::sync::Mutex<Vec<Orchestrator>>,
    workers: std::sync::Mutex<Vec<WorkerHandle>>,
    configure: fn(&mut Config),
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
        let h = Self {
            db: PgPool::connect(&database_url).await?,
            services,
            database_url,
            database_name,
            prefix,
            orchestrators: Default::default(),
            workers: Default::default(),
            configure,
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
            ..Config::default()
        };
        (self.configure)(&mut c);
        c
    }

    /// Starts one more orchestrator replica on the same database and prefix.
    pub async fn start_orchestrator(&self) -> Result<String> {
        self.start_orchestrator_with(self.config()).await
    }

    /// Starts an orchestrator with a given config; returns its HTTP URL.
    pub async fn start_orchestrator_with(&self, config: Config) -> Result<String> {
        let app = App::build(config).await?;
        let http_url = format!("http://{}", app.http_addr());
        let shared = app.shared().clone();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(app.run_until_stopped(shutdown.clone()));
        let o = Orchestrator {
            shared,
            client: Client::new(&http_url),
            http_url: http_url.clone(),
            shutdown,
            handle,
        };
        self.orchestrators.lock().expect("lock").push(o);
        Ok(http_url)
    }

    /// Removes the orchestrator `index` from the harness (to stop or kill it).
    pub fn take_orchestrator(&self, index: usize) -> Orchestrator {
        self.orchestrators.lock().expect("lock").remove(index)
    }

    /// A client for the first orchestrator.
    pub fn client(&self) -> Client {
        self.orchestrators.lock().expect("lock")[0].client.clone()
    }

    /// The shared handles of orchestrator `index` (metrics, pool).
    pub fn shared(&self, index: usize) -> Shared {
        self.orchestrators.lock().expect("lock")[index]
            .shared
            .clone()
    }

    /// Exchange and queue names of this harness.
    pub fn names(&self) -> Names {
        Names::new(self.prefix.clone())
    }

    /// A worker builder pointed at this harness's broker and prefix (queue `default`, no handlers).
    pub fn worker(&self) -> WorkerBuilder {
        tasker_worker::Worker::builder(self.services.amqp_url.clone())
            .prefix(self.prefix.clone())
            .grace_period(Duration::from_secs(5))
    }

    /// Runs a worker in the background until the harness finishes (or it is stopped).
    pub fn spawn_worker(&self, builder: WorkerBuilder) {
        let w = self.start_worker(builder);
        self.workers.lock().expect("lock").push(w);
    }

    /// Runs a worker and hands back its handle.
    pub fn start_worker(&self, builder: WorkerBuilder) -> WorkerHandle {
        let shutdown = CancellationToken::new();
        let worker = builder.build();
        let handle = tokio::spawn(worker.run(shutdown.clone()));
        WorkerHandle { shutdown, handle }
    }

    /// Registers a template (and declares its queues).
    pub async fn register(&self, template: &Template) -> Result<()> {
        self.client().register_template(template).await?;
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
            })
            .await?;
        Ok(r.task_id)
    }

    /// Waits (up to 60 s) for a task to finish.
    pub async fn wait(&self, id: TaskId) -> Result<TaskView> {
        self.wait_for(id, Duration::from_secs(60)).await
    }

    pub async fn wait_for(&self, id: TaskId, timeout: Duration) -> Result<TaskView> {
        Ok(self.client().wait(id, timeout).await?)
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

    /// Submits a task and waits for it to finish.
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

    /// Stops workers and orchestrators, deletes this test's queues and exchanges and drops its
    /// database. Call at the end of a test; on a failed test, leftovers are harmless.
    pub async fn finish(self) {
        let workers: Vec<_> = self.workers.lock().expect("lock").drain(..).collect();
        for w in workers {
            let _ = w.stop().await;
        }
        let orchestrators: Vec<_> = self.orchestrators.lock().expect("lock").drain(..).collect();
        for o in orchestrators {
            o.stop().await;
        }
        let step_queues: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT coalesce(s->>'queue', 'default') FROM templates, jsonb_array_elements(content->'steps') s",
        )
        .fetch_all(&self.db)
        .await
        .unwrap_or_default();
        let _ = delete_topology(&self.services.amqp_url, &self.names(), &step_queues).await;
        self.db.close().await;
        if let Ok(admin) = PgPool::connect(&self.services.admin_database_url).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.database_name
            )))
            .execute(&admin)
            .await;
            admin.close().await;
        }
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
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let connect = lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default());
    let conn = tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .context("broker connection timed out")??;
    let mut queues = vec![
        names.task_requests_queue(),
        names.dead_letter_queue(),
        names.step_dead_letter_queue(),
        names.step_queue("default"),
    ];
    queues.extend((0..16).map(|shard| names.results_queue(shard)));
    queues.extend(step_queues.iter().map(|q| names.step_queue(q)));
    for q in queues {
        // A failed delete closes its channel: a fresh one each time.
        let ch = conn.create_channel().await?;
        if ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
            .is_ok()
        {
            let _ = ch.close(200, "done".into()).await;
        }
    }
    for x in [
        names.tasks_exchange(),
        names.steps_exchange(),
        names.results_exchange(),
        names.events_exchange(),
        names.cancel_exchange(),
        names.dead_letter_exchange(),
        names.step_dead_letter_exchange(),
    ] {
        let ch = conn.create_channel().await?;
        if ch
            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await
            .is_ok()
        {
            let _ = ch.close(200, "done".into()).await;
        }
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(())
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
