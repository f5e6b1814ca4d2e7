//! Building and running an orchestrator: `App::build(config)` then `run_until_stopped()`.
//! Tests build the same app with a fresh database, a unique prefix and port 0.

use crate::broker::Publisher;
use crate::config::{Config, redact_url};
use crate::error::{Error, Result};
use crate::loops::{Confirmer, Dispatcher, FinishListener, Gauges, Reconciler, Schedules, Timers};
use crate::metrics::Metrics;
use crate::service::DispatchHandle;
use crate::service::{Shared, templates};
use crate::store::templates::TemplateCache;
use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tasker_schemas::Names;
use tokio::net::TcpListener;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Embedded migrations (`migrations/` at the workspace root).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// A built orchestrator, ready to run.
pub struct App {
    shared: Shared,
    listener: TcpListener,
    /// HTTPS when set.
    tls: Option<tokio_rustls::TlsAcceptor>,
    confirm_rx: tokio::sync::mpsc::Receiver<crate::service::Pending>,
}

/// Connects to Postgres, retrying for a while (the database may still be starting). A
/// database that does not exist is not waited for: it is created when its name is a plain
/// identifier and the user may (`CREATE DATABASE`, logged), otherwise the error comes back at
/// once ([`is_missing_database`] tells it apart).
pub async fn connect_db(url: &str, pool_size: u32) -> Result<sqlx::PgPool> {
    match connect_with_retry(url, pool_size).await {
        Err(e) if is_missing_database(&e) => {
            if let Err(why) = create_database(url).await {
                tracing::warn!(error = %why, "the database does not exist and could not be created");
                return Err(crate::store::StoreError::from(e).into());
            }
            Ok(connect_with_retry(url, pool_size)
                .await
                .map_err(crate::store::StoreError::from)?)
        }
        other => Ok(other.map_err(crate::store::StoreError::from)?),
    }
}

async fn connect_with_retry(url: &str, pool_size: u32) -> sqlx::Result<sqlx::PgPool> {
    let connect = || async {
        PgPoolOptions::new()
            .max_connections(pool_size)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
    };
    connect
        .retry(
            ExponentialBuilder::default()
                .with_max_delay(Duration::from_secs(2))
                .with_max_times(10),
        )
        .when(|e| !is_missing_database(e))
        .notify(|e, d| tracing::warn!(error = %e, retry_in = ?d, "database not reachable yet"))
        .await
}

/// True for PostgreSQL's `3D000` (invalid_catalog_name): the database named in the URL does not
/// exist. Waiting does not help.
pub fn is_missing_database(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("3D000"))
}

/// The database a Postgres URL names (`None` when the URL cannot be read).
pub fn database_name(url: &str) -> Option<String> {
    let options: PgConnectOptions = url.parse().ok()?;
    options.get_database().map(str::to_owned)
}

/// Creates the database of `url` through the `postgres` maintenance database (or `template1`, as
/// `createdb` does), with the same credentials. Only a name of 1-63 characters from
/// `A-Za-z0-9_` is created, written as a quoted identifier; another replica creating it at the
/// same time is fine.
async fn create_database(url: &str) -> std::result::Result<(), String> {
    let options: PgConnectOptions = url.parse().map_err(|e| format!("invalid URL: {e}"))?;
    let name = options
        .get_database()
        .ok_or("the URL names no database")?
        .to_owned();
    if name.is_empty()
        || name.len() > 63
        || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(format!(
            "only names of 1-63 characters from A-Za-z0-9_ are created automatically, not {name:?}"
        ));
    }
    let mut last_error = String::new();
    for maintenance in ["postgres", "template1"] {
        let mut conn = match options.clone().database(maintenance).connect().await {
            Ok(conn) => conn,
            Err(e) => {
                last_error = format!("cannot connect to database {maintenance:?}: {e}");
                continue;
            }
        };
        // The name is checked above: a quoted identifier of letters, digits and underscores.
        let created = sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await;
        let _ = conn.close().await;
        return match created {
            Ok(_) => {
                tracing::info!(database = %name, "the database did not exist: created it");
                Ok(())
            }
            // duplicate_database, or the unique index of pg_database when two create at once.
            Err(sqlx::Error::Database(db))
                if matches!(db.code().as_deref(), Some("42P04" | "23505")) =>
            {
                Ok(())
            }
            Err(e) => Err(format!("CREATE DATABASE {name} failed: {e}")),
        };
    }
    Err(last_error)
}

/// Runs the embedded migrations (safe to run from several replicas at once).
pub async fn migrate(db: &sqlx::PgPool) -> Result<()> {
    MIGRATOR
        .run(db)
        .await
        .map_err(crate::store::StoreError::from)?;
    Ok(())
}

impl App {
    /// Reads the TLS files, connects, migrates, declares the broker topology, registers
    /// templates from `templates_dir` and binds the HTTP listener.
    pub async fn build(config: Config) -> Result<Self> {
        // Certificates first: a bad file fails at once, before any connection is attempted.
        let tls = crate::tls::http_acceptor(&config)?;
        let amqp_tls = crate::tls::amqp_tls(&config)?;
        tracing::info!(
            database = %redact_url(&config.database_url),
            broker = %redact_url(&config.amqp_url),
            prefix = %config.prefix,
            https = tls.is_some(),
            "starting orchestrator"
        );
        let db = connect_db(&config.database_url, config.db_pool_size).await?;
        migrate(&db).await?;
        let names = Names::new(config.prefix.clone());
        let (url, shards, limit) = (
            config.amqp_url.clone(),
            config.result_shards,
            config.delivery_limit,
        );
        let publisher = (|| Publisher::connect(&url, &amqp_tls, &names, shards, limit))
            .retry(
                ExponentialBuilder::default()
                    .with_max_delay(Duration::from_secs(2))
                    .with_max_times(10),
            )
            .notify(|e, d| tracing::warn!(error = %e, retry_in = ?d, "broker not reachable yet"))
            .await?;
        let listener = TcpListener::bind(config.http_addr)
            .await
            .map_err(|source| Error::Listen {
                addr: config.http_addr,
                source,
            })?;
        if !config.auth_enabled() && !config.http_addr.ip().is_loopback() {
            tracing::warn!(
                addr = %config.http_addr,
                "the HTTP API listens beyond loopback without API keys: anyone who can reach it \
                 can submit, cancel and register templates; set TASKER_API_KEYS (a bootstrap \
                 admin key) and create scoped keys with `tasker keys create`"
            );
        }
        let traces = crate::telemetry::Traces::from_config(&config).map_err(Error::Telemetry)?;
        let (finished, _) = broadcast::channel(4096);
        let (confirms, confirm_rx) = tokio::sync::mpsc::channel(16 * 1024);
        let identity = config.broker_identity()?.map(Arc::new);
        if identity.is_some() {
            tracing::info!(
                user_format = %config.broker_user_format,
                "broker identity on: worker messages and task requests are checked against their namespace's broker user"
            );
        }
        let shared = Shared {
            identity,
            db,
            config: Arc::new(config),
            names,
            publisher,
            amqp_tls,
            templates: TemplateCache::default(),
            metrics: Arc::new(Metrics::default()),
            dispatch: DispatchHandle::new(),
            confirms,
            timers: Arc::new(Notify::new()),
            schedules: Arc::new(Notify::new()),
            finished,
            traces,
        };
        let queues = templates::all_queues(&shared).await?;
        for q in &queues {
            shared.publisher.declare_step_queue(q).await?;
        }
        shared.dispatch.know(queues);
        if let Some(dir) = shared.config.templates_dir.clone() {
            load_templates_dir(&shared, &dir).await?;
        }
        Ok(Self {
            shared,
            listener,
            tls,
            confirm_rx,
        })
    }

    /// The address the HTTP API listens on (useful with port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or(self.shared.config.http_addr)
    }

    /// The base URL of the HTTP API: `https://` when it serves TLS, else `http://`, then
    /// [`App::http_addr`].
    pub fn http_url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.http_addr())
    }

    /// The shared handles (database pool, metrics, ...), for tests and embedding.
    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Runs every loop until `shutdown` is cancelled, then drains and closes.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<()> {
        let App {
            shared,
            listener,
            tls,
            confirm_rx,
        } = self;
        let tracker = TaskTracker::new();

        // The confirmer outlives the producers: it drains what they published once they stopped.
        let producers_done = CancellationToken::new();
        let confirmer = tokio::spawn(
            Confirmer {
                shared: shared.clone(),
                rx: confirm_rx,
            }
            .run(producers_done.clone()),
        );
        tracker.spawn(
            Dispatcher {
                shared: shared.clone(),
            }
            .run(shutdown.clone()),
        );
        tracker.spawn(
            Timers {
                shared: shared.clone(),
            }
            .run(shutdown.clone()),
        );
        tracker.spawn(
            Schedules {
                shared: shared.clone(),
            }
            .run(shutdown.clone()),
        );
        tracker.spawn(
            Reconciler {
                shared: shared.clone(),
            }
            .run(shutdown.clone()),
        );
        tracker.spawn(
            Gauges {
                shared: shared.clone(),
            }
            .run(shutdown.clone()),
        );
        for shard in 0..shared.config.result_shards.max(1) {
            let s = shared.clone();
            tracker.spawn(supervise(
                "results consumer",
                shutdown.clone(),
                move |stop| crate::edge::results::run_consumer(s.clone(), shard, stop),
            ));
        }
        let s = shared.clone();
        tracker.spawn(supervise(
            "task request consumer",
            shutdown.clone(),
            move |stop| crate::edge::intake::run_consumer(s.clone(), stop),
        ));
        let s = shared.clone();
        tracker.spawn(supervise(
            "dead step consumer",
            shutdown.clone(),
            move |stop| crate::edge::dead_steps::run_consumer(s.clone(), stop),
        ));
        if shared.config.dead_letter_reader {
            let s = shared.clone();
            tracker.spawn(supervise(
                "dead-letter reader",
                shutdown.clone(),
                move |stop| crate::edge::dead_letters::run_consumer(s.clone(), stop),
            ));
        }
        let s = shared.clone();
        tracker.spawn(supervise(
            "finish listener",
            shutdown.clone(),
            move |stop| FinishListener { shared: s.clone() }.run(stop),
        ));
        let (s, stop) = (shared.clone(), shutdown.clone());
        tracker.spawn(async move {
            if let Err(e) = crate::edge::http::serve(listener, s, tls, stop.cancelled_owned()).await
            {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
        tracker.close();
        tracing::info!("orchestrator running");
        shutdown.cancelled().await;
        tracing::info!("shutting down");
        let grace = Duration::from_millis(shared.config.shutdown_grace_ms);
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            tracing::warn!("some loops did not stop within the grace period");
        }
        // Let outstanding confirms settle so their outbox entries are cleared.
        producers_done.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), confirmer).await;
        shared.publisher.close().await;
        shared.db.close().await;
        shared.traces.shutdown().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Restarts a loop with backoff (100 ms doubling to 2 s, started over after a loop that ran
/// for 30 s) when it fails or ends, until shutdown.
async fn supervise<F, Fut>(name: &'static str, shutdown: CancellationToken, mut run: F)
where
    F: FnMut(CancellationToken) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let schedule = || {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(2))
            .without_max_times()
            .build()
    };
    let mut backoff = schedule();
    while !shutdown.is_cancelled() {
        let started = std::time::Instant::now();
        match run(shutdown.clone()).await {
            Ok(()) if shutdown.is_cancelled() => break,
            Ok(()) => tracing::warn!(name, "loop ended; restarting"),
            Err(e) => tracing::warn!(name, error = %e, "loop failed; restarting"),
        }
        // A loop that ran for a while was healthy: start its backoff over.
        if started.elapsed() > Duration::from_secs(30) {
            backoff = schedule();
        }
        let delay = backoff.next().unwrap_or(Duration::from_secs(2));
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Registers every `*.yaml`, `*.yml` and `*.json` template in `dir`, in name order.
async fn load_templates_dir(shared: &Shared, dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        Error::Templates(format!("cannot read templates dir {}: {e}", dir.display()))
    })?;
    let mut paths: Vec<_> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            )
        })
        .collect();
    paths.sort();
    for path in paths {
        let template = templates::read_template_file(&path).map_err(Error::Templates)?;
        let outcome = templates::register(
            shared,
            &crate::auth::Principal::system("templates_dir"),
            &template,
        )
        .await?;
        tracing::info!(path = %path.display(), name = %template.name, version = template.version, ?outcome, "template loaded");
    }
    Ok(())
}
