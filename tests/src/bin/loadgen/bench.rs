//! What every workload shares: the HTTP client, the database, in-process no-op workers, the
//! templates, completion tracking through lifecycle events, measurement and verification.

use crate::deploy::{CpuSnapshot, CpuUsed, Deployment, RssSampler, ServicePids};
use crate::report::Row;
use anyhow::{Context, Result, bail};
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tasker_schemas::api::SubmitTask;
use tasker_schemas::{LifecycleEvent, Names, TaskId, Template};
use tasker_worker::{Client, Worker};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Namespace of every loadgen template and task.
pub const NAMESPACE: &str = "loadgen";
/// Queue of the task workloads (own queues, so other workers of a shared deployment never take
/// these steps).
pub const QUEUE: &str = "loadgen";
/// Queue of the submit workload: no worker consumes it while submissions are measured.
pub const SUBMIT_QUEUE: &str = "loadgen_submit";
/// Queue of the in-flight workload: no worker consumes it until every task is in flight.
pub const HOLD_QUEUE: &str = "loadgen_hold";
pub const ALL_QUEUES: &[&str] = &[QUEUE, SUBMIT_QUEUE, HOLD_QUEUE];

/// How a task finished, as its lifecycle event said.
#[derive(Debug)]
pub struct Finished {
    pub at: Instant,
    pub state: String,
}

/// Tasks waiting for their lifecycle event.
#[derive(Clone, Default)]
pub struct Tracker {
    waiting: Arc<Mutex<HashMap<TaskId, oneshot::Sender<Finished>>>>,
}

impl Tracker {
    /// Call before submitting (with a client-chosen id), so an early event is not missed.
    pub fn watch(&self, id: TaskId) -> oneshot::Receiver<Finished> {
        let (tx, rx) = oneshot::channel();
        self.waiting.lock().expect("lock").insert(id, tx);
        rx
    }

    pub fn forget(&self, id: TaskId) {
        self.waiting.lock().expect("lock").remove(&id);
    }

    fn finished(&self, id: TaskId, state: String) {
        let tx = self.waiting.lock().expect("lock").remove(&id);
        if let Some(tx) = tx {
            let _ = tx.send(Finished {
                at: Instant::now(),
                state,
            });
        }
    }
}

/// A running worker: in-process (Rust), or a Python process (`tests/python/loadgen_worker.py`).
pub enum WorkerGuard {
    InProcess {
        stop: CancellationToken,
        handle: JoinHandle<Result<(), tasker_worker::WorkerError>>,
    },
    Python(std::process::Child),
}

impl WorkerGuard {
    pub async fn stop(self) {
        match self {
            WorkerGuard::InProcess { stop, handle } => {
                stop.cancel();
                match handle.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => eprintln!("loadgen: worker failed: {e}"),
                    Err(e) => eprintln!("loadgen: worker panicked: {e}"),
                }
            }
            WorkerGuard::Python(mut child) => {
                // SIGTERM: a graceful stop; killed if it takes longer than its grace period.
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
                let waited = tokio::task::spawn_blocking(move || {
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while Instant::now() < deadline {
                        if let Ok(Some(_)) = child.try_wait() {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                });
                let _ = waited.await;
            }
        }
    }
}

/// Which SDK the workers of a workload use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkerKind {
    Rust,
    Python,
}

/// Shape of a template: how many steps a task has.
#[derive(Clone, Debug)]
pub struct Shape {
    pub name: String,
    pub steps: u64,
    pub template: Template,
}

/// Everything a workload needs.
pub struct Bench {
    pub client: Client,
    pub db: PgPool,
    pub amqp_url: String,
    pub names: Names,
    pub run_id: String,
    pub pid: Option<u32>,
    pub tracker: Tracker,
    pub worker_concurrency: usize,
    services: ServicePids,
    rss: Option<RssSampler>,
    events: JoinHandle<()>,
    events_connection: lapin::Connection,
    main_worker: Mutex<Option<WorkerGuard>>,
    /// The SDK of the workers `start_worker` starts.
    worker_kind: Mutex<WorkerKind>,
    /// The Python interpreter (with `tasker_worker` installed) for Python workers.
    python: std::path::PathBuf,
}

impl Bench {
    /// Connects, starts the lifecycle-event listener and the main worker (queue [`QUEUE`]).
    pub async fn start(
        d: &Deployment,
        run_id: &str,
        worker_concurrency: usize,
        worker_kind: WorkerKind,
        python: std::path::PathBuf,
    ) -> Result<Self> {
        let db = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .connect(&d.database_url)
            .await
            .context("cannot connect to the deployment's database")?;
        let names = Names::new(d.prefix.clone());
        let tracker = Tracker::default();
        let (events, events_connection) =
            start_event_listener(&d.amqp_url, &names, run_id, tracker.clone()).await?;
        let services = ServicePids::find(&d.database_url, &d.amqp_url);
        let show = |p: Option<u32>| {
            p.map_or(
                "not found: counting every process of that name".to_owned(),
                |p| format!("pid {p} and its children"),
            )
        };
        eprintln!(
            "{:<22} postgres {}, rabbitmq {}",
            "service processes",
            show(services.postgres),
            show(services.rabbitmq)
        );
        let bench = Self {
            client: Client::new(&d.api_url),
            db,
            amqp_url: d.amqp_url.clone(),
            names,
            run_id: run_id.to_owned(),
            pid: d.pid,
            tracker,
            worker_concurrency,
            services,
            rss: d.pid.map(RssSampler::start),
            events,
            events_connection,
            main_worker: Mutex::new(None),
            worker_kind: Mutex::new(worker_kind),
            python,
        };
        // Registering a template declares its queue; a worker needs the queue to exist.
        bench.register(&linear_shape()).await?;
        let w = bench.start_worker(QUEUE).await?;
        *bench.main_worker.lock().expect("lock") = Some(w);
        // What the orchestrator, Postgres and RabbitMQ burn with nothing to do (their poll loops,
        // and other users of the shared services): the background of every CPU column.
        let mut idle = bench.meter();
        tokio::time::sleep(Duration::from_secs(2)).await;
        idle.stop();
        let used = idle.used.unwrap_or_default();
        let per_s =
            |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{:.0} ms/s", v * 1e3 / 2.0));
        eprintln!(
            "{:<22} orchestrator {}, postgres {}, rabbitmq {}, loadgen {}",
            "idle cpu (2 s)",
            per_s(used.orchestrator),
            per_s(used.postgres),
            per_s(used.rabbitmq),
            per_s(used.loadgen)
        );
        Ok(bench)
    }

    pub async fn stop(self) {
        let w = self.main_worker.lock().expect("lock").take();
        if let Some(w) = w {
            w.stop().await;
        }
        let _ = self.events_connection.close(200, "done".into()).await;
        self.events.abort();
        self.db.close().await;
    }

    /// The SDK the workers use from now on; the main worker is replaced by one of that kind.
    pub async fn use_workers(&self, kind: WorkerKind) -> Result<()> {
        *self.worker_kind.lock().expect("lock") = kind;
        let old = self.main_worker.lock().expect("lock").take();
        if let Some(w) = old {
            w.stop().await;
        }
        let w = self.start_worker(QUEUE).await?;
        *self.main_worker.lock().expect("lock") = Some(w);
        Ok(())
    }

    /// Runs a worker with the no-op handlers on `queue`, of the current [`WorkerKind`]; returns
    /// once it consumes.
    pub async fn start_worker(&self, queue: &str) -> Result<WorkerGuard> {
        let kind = *self.worker_kind.lock().expect("lock");
        if kind == WorkerKind::Python {
            return self.start_python_worker(queue).await;
        }
        let worker = Worker::builder(self.amqp_url.clone())
            .prefix(self.names.prefix())
            .namespace(NAMESPACE)
            .queue(queue)
            .concurrency(self.worker_concurrency)
            .grace_period(Duration::from_secs(5))
            .name(format!("loadgen-{}-{queue}", self.run_id))
            .handler_fn("noop", |_ctx| async move { Ok(json!({"ok": true})) })
            // The root of the map workload: an array of `items` (from the task's context) small
            // integers, nothing else.
            .handler_fn("items", |ctx| async move {
                let n = ctx.context()["items"].as_u64().unwrap_or(0);
                Ok(json!({ "items": (0..n).collect::<Vec<u64>>() }))
            })
            .build();
        let stop = CancellationToken::new();
        let handle = tokio::spawn(worker.run(stop.clone()));
        Ok(WorkerGuard::InProcess { stop, handle })
    }

    async fn start_python_worker(&self, queue: &str) -> Result<WorkerGuard> {
        use std::io::BufRead;
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/loadgen_worker.py");
        let mut child = std::process::Command::new(&self.python)
            .arg(&script)
            .args(["--queue", queue, "--prefix", self.names.prefix()])
            .args(["--concurrency", &self.worker_concurrency.to_string()])
            .args(["--name", &format!("loadgen-py-{}-{queue}", self.run_id)])
            .env("TASKER_AMQP_URL", &self.amqp_url)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| {
                format!(
                    "cannot start {} (create the venv with deploy/local/python-env.sh, or pass --python)",
                    self.python.display()
                )
            })?;
        let stdout = child.stdout.take().context("no stdout")?;
        // Reads until `ready` (or the end: the process exited), on a blocking thread.
        let (tx, rx) = oneshot::channel();
        std::thread::spawn(move || {
            let mut ready = false;
            for line in std::io::BufReader::new(stdout).lines() {
                match line {
                    Ok(l) if l.trim() == "ready" => {
                        ready = true;
                        break;
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            let _ = tx.send(ready);
        });
        match tokio::time::timeout(Duration::from_secs(30), rx).await {
            Ok(Ok(true)) => Ok(WorkerGuard::Python(child)),
            other => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the Python worker on {queue} did not start (ready: {other:?})")
            }
        }
    }

    pub async fn register(&self, shape: &Shape) -> Result<()> {
        self.client
            .register_template(&shape.template)
            .await
            .with_context(|| format!("cannot register template {}", shape.name))?;
        Ok(())
    }

    pub fn submitter(&self) -> Submitter {
        Submitter {
            client: self.client.clone(),
            run_id: self.run_id.as_str().into(),
        }
    }

    /// Submits a task of `shape` over HTTP with a client-chosen id.
    pub async fn submit(&self, shape: &Shape, id: TaskId) -> Result<()> {
        self.submitter().submit(&shape.name, id).await
    }

    /// Starts measuring the orchestrator's CPU time and memory (and Postgres', RabbitMQ's and
    /// the loadgen's CPU time).
    pub fn meter(&self) -> Meter<'_> {
        let mut m = Meter {
            bench: self,
            before: CpuSnapshot::default(),
            used: None,
            rss_mb: None,
        };
        m.restart();
        m
    }

    /// The orchestrator's counters from `/metrics` (`None` if it does not answer).
    pub async fn counters(&self) -> Option<HashMap<String, f64>> {
        let url = format!("{}/metrics", self.client.base_url());
        let text = reqwest::get(url)
            .await
            .ok()?
            .error_for_status()
            .ok()?
            .text()
            .await
            .ok()?;
        Some(tasker_tests::counter_totals(&text).into_iter().collect())
    }

    /// Refreshes the planner statistics of the whole database (invalidating cached plans).
    pub async fn analyze(&self) -> Result<()> {
        sqlx::query("ANALYZE")
            .execute(&self.db)
            .await
            .context("ANALYZE failed")?;
        Ok(())
    }

    /// The database clock (the orchestrator stamps attempts with it).
    pub async fn db_now(&self) -> Result<chrono::DateTime<chrono::Utc>> {
        Ok(sqlx::query_scalar("SELECT now()")
            .fetch_one(&self.db)
            .await?)
    }

    /// Checks that every task is `completed` with all its steps `succeeded`. Returns how many
    /// steps needed more than one attempt.
    pub async fn verify(&self, what: &str, ids: &[TaskId], steps_per_task: u64) -> Result<u64> {
        let mut redispatched = 0;
        let mut problems = Vec::new();
        for chunk in ids.chunks(10_000) {
            let uuids: Vec<Uuid> = chunk.iter().map(|i| i.0).collect();
            let (tasks, completed): (i64, i64) = sqlx::query_as(
                "SELECT count(*), count(*) FILTER (WHERE state = 'completed') FROM tasks WHERE id = ANY($1)",
            )
            .bind(&uuids)
            .fetch_one(&self.db)
            .await?;
            let (steps, succeeded, redo): (i64, i64, i64) = sqlx::query_as(
                "SELECT count(*), count(*) FILTER (WHERE state = 'succeeded'), count(*) FILTER (WHERE attempt > 1)
                 FROM steps WHERE task_id = ANY($1)",
            )
            .bind(&uuids)
            .fetch_one(&self.db)
            .await?;
            redispatched += redo as u64;
            let n = chunk.len() as i64;
            if tasks != n {
                problems.push(format!("{} of {n} tasks do not exist", n - tasks));
            }
            if completed != tasks {
                let states: Vec<(String, i64)> = sqlx::query_as(
                    "SELECT state, count(*) FROM tasks WHERE id = ANY($1) AND state <> 'completed' GROUP BY state",
                )
                .bind(&uuids)
                .fetch_all(&self.db)
                .await?;
                problems.push(format!(
                    "{} tasks not completed: {states:?}",
                    tasks - completed
                ));
            }
            let expected = tasks * steps_per_task as i64;
            if steps != expected || succeeded != steps {
                problems.push(format!(
                    "{steps} steps ({expected} expected), {succeeded} succeeded"
                ));
            }
        }
        if !problems.is_empty() {
            bail!(
                "{what}: verification FAILED ({} tasks checked): {}",
                ids.len(),
                problems.join("; ")
            );
        }
        Ok(redispatched)
    }

    /// Waits until every task is finished according to the database (for tasks submitted over
    /// AMQP or whose event did not come).
    pub async fn wait_finished_in_db(&self, ids: &[TaskId], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let uuids: Vec<Uuid> = ids.iter().map(|i| i.0).collect();
        loop {
            let mut unfinished = 0i64;
            for chunk in uuids.chunks(10_000) {
                let finished: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM tasks WHERE id = ANY($1) AND state IN ('completed', 'failed', 'cancelled')",
                )
                .bind(chunk)
                .fetch_one(&self.db)
                .await?;
                unfinished += chunk.len() as i64 - finished;
            }
            if unfinished == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{unfinished} of {} tasks still unfinished after {timeout:?}",
                    ids.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// How many of the tasks exist in the database.
    pub async fn count_existing(&self, ids: &[TaskId]) -> Result<i64> {
        let mut n = 0;
        for chunk in ids.chunks(10_000) {
            let uuids: Vec<Uuid> = chunk.iter().map(|i| i.0).collect();
            let c: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE id = ANY($1)")
                .bind(&uuids)
                .fetch_one(&self.db)
                .await?;
            n += c;
        }
        Ok(n)
    }
}

/// CPU and memory over a period of a workload (its measured window).
pub struct Meter<'a> {
    bench: &'a Bench,
    before: CpuSnapshot,
    used: Option<CpuUsed>,
    rss_mb: Option<f64>,
}

impl Meter<'_> {
    /// Starts the period again (for example after a warm-up).
    pub fn restart(&mut self) {
        if let Some(s) = &self.bench.rss {
            s.take_max_mb();
        }
        self.used = None;
        self.before = CpuSnapshot::take(self.bench.pid, &self.bench.services);
    }

    /// Ends the period (later calls keep the first end).
    pub fn stop(&mut self) {
        if self.used.is_none() {
            self.used =
                Some(CpuSnapshot::take(self.bench.pid, &self.bench.services).since(&self.before));
            self.rss_mb = self.bench.rss.as_ref().and_then(RssSampler::take_max_mb);
        }
    }

    /// The orchestrator's largest resident size so far in this period.
    pub fn rss_so_far_mb(&self) -> Option<f64> {
        self.rss_mb
            .or_else(|| self.bench.rss.as_ref().and_then(RssSampler::peek_max_mb))
    }

    /// Writes the period's figures into `row`; `steps` is how many steps ran in the period.
    pub fn fill(mut self, row: &mut Row, steps: u64) {
        self.stop();
        let used = self.used.unwrap_or_default();
        row.orchestrator_cpu_s = used.orchestrator;
        row.postgres_cpu_s = used.postgres;
        row.rabbitmq_cpu_s = used.rabbitmq;
        row.loadgen_cpu_s = used.loadgen;
        row.orchestrator_rss_mb = self.rss_mb;
        if let (Some(cpu), true) = (used.orchestrator, steps > 0) {
            row.note(format!("orch {:.0} us/step", cpu * 1e6 / steps as f64));
        }
    }
}

/// Submits tasks over HTTP; cheap to clone into spawned tasks.
#[derive(Clone)]
pub struct Submitter {
    client: Client,
    run_id: Arc<str>,
}

impl Submitter {
    /// Submits a task of template `template` with a client-chosen id.
    pub async fn submit(&self, template: &str, id: TaskId) -> Result<()> {
        self.submit_with(template, id, json!({})).await
    }

    /// [`submit`](Self::submit) with more fields in the task's context (an object, merged
    /// with the run id).
    pub async fn submit_with(&self, template: &str, id: TaskId, extra: Value) -> Result<()> {
        let mut context = json!({"run": &*self.run_id});
        if let (Some(c), Value::Object(extra)) = (context.as_object_mut(), extra) {
            c.extend(extra);
        }
        let r = self
            .client
            .submit(&SubmitTask {
                namespace: NAMESPACE.into(),
                template: template.to_owned(),
                version: None,
                context,
                idempotency_key: None,
                priority: 0,
                task_id: Some(id),
                run_at: None,
                delay: None,
                deadline: None,
            })
            .await
            .with_context(|| format!("submitting a {template} task failed"))?;
        if !r.created || r.task_id != id {
            bail!(
                "submit of {id} answered {} (created {})",
                r.task_id,
                r.created
            );
        }
        Ok(())
    }
}

/// Binds an exclusive queue to the events exchange (`loadgen.task.*`) and forwards finished
/// tasks to the tracker. Completion is pushed, so watching thousands of tasks costs nothing.
async fn start_event_listener(
    amqp_url: &str,
    names: &Names,
    run_id: &str,
    tracker: Tracker,
) -> Result<(JoinHandle<()>, lapin::Connection)> {
    let conn = lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default())
        .await
        .context("cannot connect to RabbitMQ")?;
    let ch = conn.create_channel().await?;
    let queue = format!("{}.loadgen.events.{run_id}", names.prefix());
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        queue.as_str().into(),
        names.events_exchange().into(),
        format!("{NAMESPACE}.task.*").into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .context("cannot bind to the events exchange (is the orchestrator's topology declared?)")?;
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let task = tokio::spawn(async move {
        while let Some(delivery) = consumer.next().await {
            let Ok(delivery) = delivery else { break };
            match tasker_schemas::decode::<LifecycleEvent>(&delivery.data) {
                Ok(e)
                    if matches!(
                        e.payload.state.as_str(),
                        "completed" | "failed" | "cancelled"
                    ) =>
                {
                    tracker.finished(e.payload.task_id, e.payload.state);
                }
                Ok(_) => {}
                Err(e) => eprintln!("loadgen: unreadable lifecycle event: {e}"),
            }
        }
    });
    Ok((task, conn))
}

fn step(name: &str, queue: &str, parents: &[&str]) -> Value {
    json!({"name": name, "handler": "noop", "queue": queue, "depends_on": parents})
}

fn shape(name: String, steps: Vec<Value>) -> Shape {
    let n = steps.len() as u64;
    let template: Template = serde_json::from_value(
        json!({"namespace": NAMESPACE, "name": name, "version": 1, "steps": steps}),
    )
    .expect("a valid template");
    Shape {
        name,
        steps: n,
        template,
    }
}

/// s1 → s2 → s3 → s4.
pub fn linear_shape() -> Shape {
    shape(
        "linear4".into(),
        vec![
            step("s1", QUEUE, &[]),
            step("s2", QUEUE, &["s1"]),
            step("s3", QUEUE, &["s2"]),
            step("s4", QUEUE, &["s3"]),
        ],
    )
}

/// a → (b, c) → d, on `queue`.
pub fn diamond_shape(name: &str, queue: &str) -> Shape {
    shape(
        name.into(),
        vec![
            step("a", queue, &[]),
            step("b", queue, &["a"]),
            step("c", queue, &["a"]),
            step("d", queue, &["b", "c"]),
        ],
    )
}

/// root → `width` parallel steps → join.
pub fn fanout_shape(width: usize) -> Shape {
    let mut steps = vec![step("root", QUEUE, &[])];
    let names: Vec<String> = (0..width).map(|i| format!("w{i:05}")).collect();
    steps.extend(names.iter().map(|n| step(n, QUEUE, &["root"])));
    let all: Vec<&str> = names.iter().map(String::as_str).collect();
    steps.push(step("join", QUEUE, &all));
    shape(format!("fanout_{width}"), steps)
}

/// root → `work` mapped over the root's `items` (one no-op instance per element, at most
/// `max_parallel` at once) → done. A task's step rows: the three template steps and `items`
/// instances.
pub fn map_shape(items: usize, max_parallel: u32) -> Shape {
    let steps = vec![
        json!({"name": "root", "handler": "items", "queue": QUEUE}),
        json!({
            "name": "work", "handler": "noop", "queue": QUEUE, "depends_on": ["root"],
            "map": {"over": "root.items", "max_parallel": max_parallel, "max_items": items.max(1)},
        }),
        step("done", QUEUE, &["work"]),
    ];
    let mut s = shape(format!("map_{items}_p{max_parallel}"), steps);
    s.steps = 3 + items as u64;
    s
}

/// One step, on the submit queue.
pub fn single_shape() -> Shape {
    shape("single".into(), vec![step("s", SUBMIT_QUEUE, &[])])
}
