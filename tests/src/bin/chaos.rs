//! `chaos`: the fault-injection harness. It starts real processes — two orchestrators (`tasker
//! serve`, same database and prefix, different ports) and two workers (`chaos-worker`) — against
//! local PostgreSQL and RabbitMQ, submits N workflows (linear 4 steps, diamond, fan-out
//! 1 → 20 → 1, a decision between two branches, a mapped step, a child workflow; see `--mix`)
//! over HTTP with an idempotency key each, and meanwhile kills orchestrators and workers with SIGKILL at random
//! moments (restarting them after 0.2–3 s), restarts RabbitMQ (`rabbitmqctl stop_app`, 2–5 s
//! pause, `start_app`) and restarts PostgreSQL (`pg_ctl restart -m fast` as the data directory's
//! owner). Then it checks every task, prints a table and one JSON line (with `config`, the run's
//! configuration, and `mix`, the accepted tasks per workflow), and exits non-zero if a pass
//! criterion fails:
//!
//! - `lost == 0`: every accepted submit has its task (by idempotency key, with the accepted id),
//!   and every terminal task has all its steps' outcomes (all steps terminal, a completed task's
//!   steps all succeeded, a succeeded step has exactly one succeeded attempt row, at its attempt);
//! - `stuck == 0`: every task is terminal within the stuck bound after the last fault and the
//!   last submit: `stuck_factor × (queue_wait + execution + max_delay) + relay_after +
//!   5 × poll + 10 s` (56 s with the defaults); `--wait-while-progressing` counts it from the
//!   last progress instead, for runs whose backlog outlasts the fault window;
//! - `results_applied_twice == 0`: `tasker_results_applied_twice_total` summed over every
//!   orchestrator process (scraped each second and just before each kill; the same events
//!   counted in the logs cover a process that died between scrapes), plus SQL: no (step_id,
//!   attempt) twice in `attempts`, no succeeded step with more than one succeeded attempt row;
//! - `completed == tasks` unless handlers fail on purpose (`--fail-rate`);
//! - every succeeded step's attempt was really run by a worker, and attempt rows agree with
//!   step states (a mapped step itself is never run: its instances are);
//! - `wrong == 0`: the dynamic workflows did what their templates say. `decision` (route →
//!   {left → left_tail, right} → after, `join: any`): `route` chooses the branch the task's
//!   context names (picked at random in the plan), so the other branch is skipped ("not chosen",
//!   its tail "parent skipped") and no worker ever ran it, while the chosen branch and `after`
//!   succeeded. `map` (split → work mapped over `split.items`, 20–50 elements, `max_parallel` 5 →
//!   join): exactly one instance per element (indexes 0..n, each once), every instance succeeded
//!   with one succeeded attempt row, and the mapped step's output holds one entry per element in
//!   order, each naming its index and element. `child` (a → sub → b, `sub` a workflow step
//!   running the 2-step template `child_sub` (c1 → c2) with the context `{i: a.context.i}`):
//!   exactly one child task links to the task and to `sub` (`tasks.parent_task_id` /
//!   `parent_step_id`, depth 1, one `child_started` event naming it, `sub.child_task_id` naming
//!   it), the child completed with both steps succeeded once, its context is `{"i": <the
//!   submit's index>}` and its output `{"c2": {"ok": true, "context": {"i": …}}}`, `sub`'s
//!   output equals the child's output, and no worker ever ran `sub` itself. Child tasks are
//!   not submitted (they have no idempotency key): the wait for all tasks to be terminal
//!   covers them, and their steps count in the attempt checks above like any other.
//!
//! Duplicate executions are allowed (at-least-once) and reported from the workers' execution
//! records (`<run dir>/exec/exec-<pid>.log`, one line per run): `duplicate_executions` =
//! executions − (task, step) pairs run at least once (retries included);
//! `redelivered_executions` = executions − distinct (task, step, attempt).
//!
//! The logs of the processes it started, the fault log, `result.json` and, on failure,
//! `problems.txt` (state, attempts and outbox entries of the problem tasks' steps, and of their
//! child tasks' steps) are in the run directory, printed at start.
//! The database and the prefix's queues are dropped at the end (`--keep` keeps them).
//!
//! ```text
//! . .tasker/env   # TASKER_TEST_DATABASE_URL (admin URL) and TASKER_TEST_AMQP_URL
//! cargo build -p tasker-orchestrator -p tasker-tests
//! # CI (about a minute): 300 tasks over 60 s, 3 orchestrator and 3 worker kills, 1 broker and
//! # 1 database restart
//! target/debug/chaos --tasks 300 --duration-s 60
//! # without touching services others use
//! target/debug/chaos --broker-restarts 0 --db-restarts 0
//! # long
//! target/debug/chaos --tasks 10000 --duration-s 600 --orchestrator-kills 20 --worker-kills 20
//! # check the setup and print the restart commands only
//! target/debug/chaos --dry-run
//! ```
//!
//! Other ways to restart the services: `--rabbitmqctl "<cmd> -n node"`, `--broker-restart-cmd`,
//! `--db-restart-cmd` (shell commands that return once the service is back), `--db-restart-mode
//! immediate` (crash-like). `--seed` repeats a run's plan (task mix, fault moments and targets).
//!
//! Last long run (2026-11-26, debug build, 2 cores, local Postgres 15 and RabbitMQ 3.10,
//! `--tasks 10000 --duration-s 600 --orchestrator-kills 20 --worker-kills 20 --submit-fraction
//! 0.75 --handler-sleep-ms 10`, seed 6437352410857091631): PASS in 542 s — 10000 tasks, 10000
//! completed, 0 failed, 0 lost, 0 stuck, 0 results applied twice (22 orchestrator processes),
//! 76021 executions for 76018 steps (3 duplicates), 20 orchestrator kills, 20 worker kills, 1
//! broker restart, 1 database restart, 217 submit retries, longest stall 1 s.

// The report is one `json!` literal with many fields.
#![recursion_limit = "256"]

#[path = "chaos/faults.rs"]
mod faults;
#[path = "chaos/procs.rs"]
mod procs;
#[path = "chaos/verify.rs"]
mod verify;

use anyhow::{Context, Result, bail};
use clap::Parser;
use faults::{BrokerRestart, DbRestart};
use procs::{Kind, MetricsBook, Procs, Slot, Spec};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tasker_tests::replace_database;
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use verify::{Accepted, Planned};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "chaos",
    about = "Tasker fault-injection harness: kills and restarts processes and services while workflows run"
)]
struct Args {
    /// Workflows to submit.
    #[arg(long, default_value_t = 300)]
    tasks: usize,
    /// Orchestrator SIGKILLs (each followed by a restart).
    #[arg(long, default_value_t = 3)]
    orchestrator_kills: usize,
    /// Worker SIGKILLs (each followed by a restart).
    #[arg(long, default_value_t = 3)]
    worker_kills: usize,
    /// RabbitMQ restarts (0 to leave the broker alone).
    #[arg(long, default_value_t = 1)]
    broker_restarts: usize,
    /// PostgreSQL restarts (0 to leave the database server alone).
    #[arg(long, default_value_t = 1)]
    db_restarts: usize,
    /// The fault window in seconds: submissions are spread over its first part
    /// (--submit-fraction) and faults fire at random moments within it.
    #[arg(long, default_value_t = 60)]
    duration_s: u64,
    /// Fraction of the fault window over which the submissions are spread.
    #[arg(long, default_value_t = 1.0)]
    submit_fraction: f64,
    /// Print only the JSON line on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// The `tasker` binary (default: next to this one).
    #[arg(long)]
    tasker_bin: Option<PathBuf>,
    /// The `chaos-worker` binary (default: next to this one).
    #[arg(long)]
    worker_bin: Option<PathBuf>,
    /// Admin Postgres URL: the harness creates (and drops) its own database from it.
    #[arg(long, env = "TASKER_TEST_DATABASE_URL", hide_env_values = true)]
    admin_database_url: String,
    #[arg(long, env = "TASKER_TEST_AMQP_URL", hide_env_values = true)]
    amqp_url: String,
    #[arg(long, default_value_t = 2)]
    orchestrators: usize,
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Of the workers, this many run the Python SDK (`tests/python/chaos_worker.py`, the twin of
    /// `chaos-worker`) instead of the Rust one; they are killed and restarted alike.
    #[arg(long, default_value_t = 0)]
    python_workers: usize,
    /// The Python interpreter of the Python workers, with `tasker_worker` installed (default: the
    /// project's venv, `.tasker/venv/bin/python`, as deploy/local/python-env.sh makes it).
    #[arg(long, env = "TASKER_CHAOS_PYTHON")]
    python: Option<PathBuf>,
    /// Steps each worker runs at once.
    #[arg(long, default_value_t = 16)]
    worker_concurrency: usize,
    /// Each handler run sleeps a random time up to this many milliseconds.
    #[arg(long, default_value_t = 50)]
    handler_sleep_ms: u64,
    /// Probability that a handler run fails (retryable) on purpose; then `completed == tasks` is
    /// not required.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Weights of the workflows: linear, diamond, fanout, decision, map, child — positional
    /// ("25,20,15,15,15,10"; three numbers leave decision, map and child out, five leave child
    /// out) or by name ("linear=1,map=3"; names left out weigh 0).
    #[arg(long, default_value = "25,20,15,15,15,10")]
    mix: String,
    /// Width of the fan-out workflow (1 -> width -> 1).
    #[arg(long, default_value_t = 20)]
    fanout_width: usize,
    /// Fewest elements a map workflow maps over (each task picks at random in the range).
    #[arg(long, default_value_t = 20)]
    map_min_items: usize,
    /// Most elements a map workflow maps over.
    #[arg(long, default_value_t = 50)]
    map_max_items: usize,
    /// `map.max_parallel` of the map workflow.
    #[arg(long, default_value_t = 5)]
    map_parallel: u32,
    /// Random seed (default: random; printed so a run can be repeated).
    #[arg(long)]
    seed: Option<u64>,
    /// Where logs, templates and execution records go (default: $TMPDIR/tasker-chaos/<run id>).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Step queue-wait timeout in the templates.
    #[arg(long, default_value_t = 10_000)]
    queue_wait_timeout_ms: u64,
    /// Step execution timeout in the templates.
    #[arg(long, default_value_t = 10_000)]
    execution_timeout_ms: u64,
    #[arg(long, default_value_t = 10)]
    max_attempts: u32,
    #[arg(long, default_value_t = 200)]
    initial_delay_ms: u64,
    #[arg(long, default_value_t = 2_000)]
    max_delay_ms: u64,
    /// TASKER_RELAY_AFTER_MS of the orchestrators.
    #[arg(long, default_value_t = 1_000)]
    relay_after_ms: u64,
    /// TASKER_POLL_INTERVAL_MS of the orchestrators.
    #[arg(long, default_value_t = 200)]
    poll_interval_ms: u64,
    /// TASKER_MAX_IN_FLIGHT_PER_QUEUE of the orchestrators (keeps the broker backlog, and so
    /// the queue wait, short).
    #[arg(long, default_value_t = 256)]
    max_in_flight: u64,
    /// TASKER_DB_POOL_SIZE of the orchestrators.
    #[arg(long, default_value_t = 8)]
    db_pool_size: u32,
    /// Concurrent submit requests.
    #[arg(long, default_value_t = 16)]
    submit_concurrency: usize,
    /// Multiplies the recovery time in the stuck bound.
    #[arg(long, default_value_t = 2.0)]
    stuck_factor: f64,
    /// Keep waiting past the stuck bound while tasks still finish (for runs whose backlog
    /// outlasts the fault window); the bound then counts from the last progress.
    #[arg(long)]
    wait_while_progressing: bool,
    /// Longest wait for tasks to finish after the fault window, whatever the progress.
    #[arg(long, default_value_t = 1_800)]
    max_wait_s: u64,
    /// rabbitmqctl command (with options, e.g. "rabbitmqctl -n rabbit@host") for stop_app/start_app.
    #[arg(long, default_value = "rabbitmqctl")]
    rabbitmqctl: String,
    /// Shell command that restarts RabbitMQ, instead of rabbitmqctl stop_app/start_app.
    #[arg(long)]
    broker_restart_cmd: Option<String>,
    /// Broker identity: create a broker user for the run's namespace (with the permissions of
    /// `tasker broker-permissions`), connect the workers as it, and run the orchestrators with
    /// TASKER_BROKER_IDENTITY=true.
    #[arg(long)]
    broker_identity: bool,
    /// The rabbitmqctl command (split on spaces) that creates the broker user, for
    /// --broker-identity (.tasker/env sets it to deploy/local/services.sh rabbitmqctl).
    #[arg(long, env = "TASKER_TEST_RABBITMQCTL")]
    users_rabbitmqctl: Option<String>,
    /// pg_ctl shutdown mode for the PostgreSQL restart: fast, or immediate (crash-like).
    #[arg(long, default_value = "fast", value_parser = ["fast", "immediate", "smart"])]
    db_restart_mode: String,
    /// Shell command that restarts PostgreSQL, instead of pg_ctl restart.
    #[arg(long)]
    db_restart_cmd: Option<String>,
    /// Server log file for pg_ctl restart (default: where the running server logs).
    #[arg(long)]
    pg_log: Option<PathBuf>,
    /// Keep the database (and the broker queues) at the end.
    #[arg(long)]
    keep: bool,
    /// Check the setup and print the restart commands, then exit without running anything.
    #[arg(long)]
    dry_run: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillOrchestrator,
    KillWorker,
    RestartBroker,
    RestartDb,
}

#[derive(Clone, Debug)]
struct FaultRecord {
    fault: Fault,
    what: String,
    start_s: f64,
    end_s: f64,
    ok: bool,
}

/// Counters of the submitter, for the progress line.
#[derive(Default)]
struct SubmitStats {
    accepted: AtomicUsize,
    requests: AtomicUsize,
    retried: AtomicUsize,
}

struct Ctx {
    args: Args,
    t0: Instant,
    run_dir: PathBuf,
    record_dir: PathBuf,
    db: PgPool,
    http: reqwest::Client,
    procs: Procs,
    book: MetricsBook,
    orch_urls: Vec<String>,
    broker: Option<BrokerRestart>,
    database: Option<DbRestart>,
    submit: SubmitStats,
    faults_done: AtomicUsize,
    stall: std::sync::Mutex<Stall>,
}

impl Ctx {
    fn now_s(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }
}

/// The workflows, in the order of `--mix`.
const KINDS: [&str; 6] = ["linear", "diamond", "fanout", "decision", "map", "child"];

/// The branches of the decision workflow's `route` step.
const ROUTES: [&str; 2] = ["left", "right"];

fn main() -> Result<()> {
    // reqwest's rustls needs a process-wide crypto provider (ring).
    tasker_tests::tasker_worker::client::tls::install_crypto_provider();
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let code = rt.block_on(main_async(args))?;
    rt.shutdown_timeout(Duration::from_secs(2));
    std::process::exit(code);
}

async fn main_async(args: Args) -> Result<i32> {
    let t0 = Instant::now();
    let seed = args.seed.unwrap_or_else(rand::random);
    let id = Uuid::now_v7().simple().to_string();
    let id = id[id.len() - 12..].to_owned();
    let prefix = format!("chaos{id}");
    let database_name = format!("tasker_chaos_{id}");
    let run_dir = args
        .run_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("tasker-chaos").join(&id));
    let record_dir = run_dir.join("exec");
    let templates_dir = run_dir.join("templates");
    std::fs::create_dir_all(&record_dir)?;
    std::fs::create_dir_all(&templates_dir)?;
    eprintln!(
        "[chaos] run {id}, seed {seed}, run dir {}",
        run_dir.display()
    );

    let weights = parse_mix(&args.mix)?;
    if args.map_min_items > args.map_max_items || args.map_max_items > 10_000 {
        bail!("--map-min-items must not exceed --map-max-items, which is at most 10000");
    }
    let expected_steps = write_templates(&templates_dir, &args)?;
    let here = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let tasker_bin = args
        .tasker_bin
        .clone()
        .unwrap_or_else(|| here.join("tasker"));
    let worker_bin = args
        .worker_bin
        .clone()
        .unwrap_or_else(|| here.join("chaos-worker"));
    for b in [&tasker_bin, &worker_bin] {
        if !b.exists() {
            bail!(
                "{} not found: cargo build -p tasker-orchestrator -p tasker-tests (or pass --tasker-bin / --worker-bin)",
                b.display()
            );
        }
    }

    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect(&args.admin_database_url)
        .await
        .context("cannot connect to TASKER_TEST_DATABASE_URL")?;
    let broker = match (&args.broker_restart_cmd, args.broker_restarts) {
        (_, 0) => None,
        (Some(cmd), _) => Some(BrokerRestart::Command(cmd.clone())),
        (None, _) => {
            let ctl: Vec<String> = args
                .rabbitmqctl
                .split_whitespace()
                .map(String::from)
                .collect();
            if ctl.is_empty() {
                bail!("--rabbitmqctl is empty");
            }
            let b = BrokerRestart::App { ctl };
            b.check(&run_dir.join("broker-restarts.log")).await?;
            Some(b)
        }
    };
    let database = match (&args.db_restart_cmd, args.db_restarts) {
        (_, 0) => None,
        (Some(cmd), _) => Some(DbRestart::Command(cmd.clone())),
        (None, _) => {
            Some(DbRestart::discover(&admin, &args.db_restart_mode, args.pg_log.clone()).await?)
        }
    };
    if let Some(b) = &broker {
        eprintln!("[chaos] broker restart: {}", b.describe());
    }
    if let Some(d) = &database {
        eprintln!("[chaos] database restart: {}", d.describe());
    }
    if args.dry_run {
        eprintln!("[chaos] dry run: nothing started");
        return Ok(0);
    }

    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE DATABASE \"{database_name}\""
    )))
    .execute(&admin)
    .await?;
    let database_url = replace_database(&args.admin_database_url, &database_name)?;
    let db = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&database_url)
        .await?;

    // Broker identity: the run's own user naming rule (runs on one broker stay apart) and the
    // user of namespace `chaos`, deleted when the run ends.
    let user_format = format!("{prefix}-{{namespace}}");
    let broker_user = if args.broker_identity {
        let ctl: Vec<String> = args
            .users_rabbitmqctl
            .as_deref()
            .unwrap_or_default()
            .split_whitespace()
            .map(String::from)
            .collect();
        if ctl.is_empty() {
            anyhow::bail!(
                "--broker-identity needs --users-rabbitmqctl (or TASKER_TEST_RABBITMQCTL)"
            );
        }
        let names = tasker_schemas::Names::new(prefix.clone());
        let user =
            tasker_tests::create_broker_user(&ctl, &args.amqp_url, &names, "chaos", &user_format)?;
        eprintln!(
            "[chaos] broker identity on: workers connect as {}",
            user.user
        );
        Some(user)
    } else {
        None
    };
    let worker_amqp_url = broker_user
        .as_ref()
        .map_or_else(|| args.amqp_url.clone(), |u| u.url.clone());
    let mut orchestrators = Vec::new();
    let mut orch_urls = Vec::new();
    for i in 0..args.orchestrators.max(1) {
        let port = free_port()?;
        let url = format!("http://127.0.0.1:{port}");
        let spec = Spec {
            program: tasker_bin.clone(),
            args: vec!["serve".into()],
            env: vec![
                ("TASKER_DATABASE_URL".into(), database_url.clone()),
                ("TASKER_AMQP_URL".into(), args.amqp_url.clone()),
                ("TASKER_HTTP_ADDR".into(), format!("127.0.0.1:{port}")),
                ("TASKER_PREFIX".into(), prefix.clone()),
                (
                    "TASKER_TEMPLATES_DIR".into(),
                    templates_dir.display().to_string(),
                ),
                (
                    "TASKER_RELAY_AFTER_MS".into(),
                    args.relay_after_ms.to_string(),
                ),
                (
                    "TASKER_POLL_INTERVAL_MS".into(),
                    args.poll_interval_ms.to_string(),
                ),
                (
                    "TASKER_MAX_IN_FLIGHT_PER_QUEUE".into(),
                    args.max_in_flight.to_string(),
                ),
                ("TASKER_DB_POOL_SIZE".into(), args.db_pool_size.to_string()),
                (
                    "TASKER_BROKER_IDENTITY".into(),
                    args.broker_identity.to_string(),
                ),
                ("TASKER_BROKER_USER_FORMAT".into(), user_format.clone()),
                ("NO_COLOR".into(), "1".into()),
                (
                    "RUST_LOG".into(),
                    std::env::var("CHAOS_ORCHESTRATOR_LOG")
                        .unwrap_or_else(|_| "info,sqlx=warn".into()),
                ),
            ],
        };
        orch_urls.push(url.clone());
        let slot = Slot::new(
            format!("orchestrator-{i}"),
            Kind::Orchestrator,
            spec,
            &run_dir,
            Some(url),
        );
        orchestrators.push(Arc::new(Mutex::new(slot)));
    }
    let mut workers = Vec::new();
    let n_workers = args.workers.max(1);
    if args.python_workers > n_workers {
        bail!(
            "--python-workers ({}) must not exceed --workers ({n_workers})",
            args.python_workers
        );
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = args
        .python
        .clone()
        .unwrap_or_else(|| repo.join(".tasker/venv/bin/python"));
    let python_script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/chaos_worker.py");
    if args.python_workers > 0 && !python.exists() {
        bail!(
            "{} not found: create the venv with deploy/local/python-env.sh (or pass --python)",
            python.display()
        );
    }
    for i in 0..n_workers {
        // The last --python-workers slots run the Python twin of chaos-worker.
        let is_python = i >= n_workers - args.python_workers;
        // The URL and prefix go through the environment (never the command line).
        let (program, first) = if is_python {
            (python.clone(), vec![python_script.display().to_string()])
        } else {
            (worker_bin.clone(), Vec::new())
        };
        let spec = Spec {
            program,
            args: first
                .into_iter()
                .chain(vec![
                    "--record-dir".into(),
                    record_dir.display().to_string(),
                    "--concurrency".into(),
                    args.worker_concurrency.to_string(),
                    "--sleep-ms-max".into(),
                    args.handler_sleep_ms.to_string(),
                    "--fail-rate".into(),
                    args.fail_rate.to_string(),
                ])
                .collect(),
            env: vec![
                ("TASKER_AMQP_URL".into(), worker_amqp_url.clone()),
                ("TASKER_PREFIX".into(), prefix.clone()),
                ("TASKER_NAMESPACE".into(), "chaos".into()),
                ("NO_COLOR".into(), "1".into()),
                (
                    "RUST_LOG".into(),
                    std::env::var("CHAOS_WORKER_LOG").unwrap_or_else(|_| "info".into()),
                ),
            ],
        };
        workers.push(Arc::new(Mutex::new(Slot::new(
            format!("worker-{i}"),
            Kind::Worker,
            spec,
            &run_dir,
            None,
        ))));
    }
    let procs = Procs {
        orchestrators,
        workers,
        unexpected: Default::default(),
        t0,
    };
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(15))
        .build()?;
    let ctx = Arc::new(Ctx {
        args: args.clone(),
        t0,
        run_dir: run_dir.clone(),
        record_dir,
        db,
        http,
        procs,
        book: MetricsBook::default(),
        orch_urls,
        broker,
        database,
        submit: SubmitStats::default(),
        faults_done: AtomicUsize::new(0),
        stall: Default::default(),
    });

    let stop = CancellationToken::new();
    let outcome = run(
        Arc::clone(&ctx),
        seed,
        &weights,
        &expected_steps,
        stop.clone(),
    )
    .await;
    stop.cancel();
    ctx.procs.kill_all().await;
    // The run's broker user goes with it.
    drop(broker_user);

    // Clean up: the database and the broker topology of this run's prefix.
    ctx.db.close().await;
    if args.keep {
        eprintln!("[chaos] kept database {database_name} and prefix {prefix} (--keep)");
    } else {
        if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{database_name}\" WITH (FORCE)"
        )))
        .execute(&admin)
        .await
        {
            eprintln!("[chaos] could not drop database {database_name}: {e}");
        }
        let names = tasker_schemas::Names::new(prefix.clone());
        if let Err(e) =
            tasker_tests::delete_topology(&args.amqp_url, &names, &["chaos.default".to_owned()])
                .await
        {
            eprintln!("[chaos] could not delete the queues of prefix {prefix}: {e:#}");
        }
    }
    admin.close().await;

    let report = outcome?;
    let pass = report["pass"].as_bool().unwrap_or(false);
    Ok(if pass { 0 } else { 1 })
}

/// The run proper: start processes, submit, inject faults, wait, verify, report.
async fn run(
    ctx: Arc<Ctx>,
    seed: u64,
    weights: &[u32; 6],
    expected_steps: &HashMap<&'static str, usize>,
    stop: CancellationToken,
) -> Result<Value> {
    let args = &ctx.args;
    let mut rng = StdRng::seed_from_u64(seed);

    // Start the orchestrators one after the other (the first migrates and registers the
    // templates, which declares the queue the workers need), then the workers.
    for slot in &ctx.procs.orchestrators {
        let mut s = slot.lock().await;
        s.start(ctx.t0).await?;
        let url = s.http_url.clone().expect("orchestrator url");
        drop(s);
        if !procs::wait_ready(&ctx.http, &url, Duration::from_secs(120)).await {
            bail!(
                "{url} did not become ready within 120 s (see {})",
                ctx.run_dir.display()
            );
        }
    }
    for slot in &ctx.procs.workers {
        slot.lock().await.start(ctx.t0).await?;
    }
    tokio::spawn(ctx.procs.clone().supervise(stop.clone()));
    tokio::spawn(procs::scrape_loop(
        ctx.procs.clone(),
        ctx.http.clone(),
        ctx.book.clone(),
        stop.clone(),
    ));

    // The plan: which workflow each submit is, and when each fault fires.
    let plan: Vec<Planned> = (0..args.tasks)
        .map(|_| {
            let kind = pick_kind(&mut rng, weights);
            Planned {
                kind,
                route: (kind == "decision").then(|| ROUTES[rng.random_range(0..ROUTES.len())]),
                items: (kind == "map")
                    .then(|| rng.random_range(args.map_min_items..=args.map_max_items)),
            }
        })
        .collect();
    let window = Duration::from_secs(args.duration_s);
    let mut schedule: Vec<(Duration, Fault)> = Vec::new();
    for (n, fault) in [
        (args.orchestrator_kills, Fault::KillOrchestrator),
        (args.worker_kills, Fault::KillWorker),
        (
            if ctx.broker.is_some() {
                args.broker_restarts
            } else {
                0
            },
            Fault::RestartBroker,
        ),
        (
            if ctx.database.is_some() {
                args.db_restarts
            } else {
                0
            },
            Fault::RestartDb,
        ),
    ] {
        for _ in 0..n {
            let at = window.mul_f64(rng.random_range(0.05..0.95));
            schedule.push((at, fault));
        }
    }
    schedule.sort();
    let total_faults = schedule.len();
    let window_start = Instant::now();
    let window_start_s = ctx.now_s();
    eprintln!(
        "[chaos] fault window {}s from t={window_start_s:.1}s: {} tasks, {total_faults} faults at {:?}",
        args.duration_s,
        args.tasks,
        schedule
            .iter()
            .map(|(d, f)| format!("{:.1}s {f:?}", window_start_s + d.as_secs_f64()))
            .collect::<Vec<_>>()
    );

    let progress = tokio::spawn(progress_loop(Arc::clone(&ctx), total_faults, stop.clone()));
    let submitter = tokio::spawn(submit_all(
        Arc::clone(&ctx),
        plan,
        window.mul_f64(args.submit_fraction.clamp(0.0, 1.0)),
    ));
    let fault_rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let injector = tokio::spawn(inject(Arc::clone(&ctx), schedule, window_start, fault_rng));
    let faults = injector.await?;
    let faults_end_s = faults
        .iter()
        .map(|f| f.end_s)
        .fold(window_start_s, f64::max);
    let (accepted, not_accepted) = submitter.await?;
    let submit_end_s = ctx.now_s();
    eprintln!(
        "[chaos] submissions done at t={submit_end_s:.1}s: {} accepted, {} not accepted; faults done (last ended at t={faults_end_s:.1}s)",
        accepted.len(),
        not_accepted.len()
    );

    // Wait until every task is terminal, or the stuck bound passes.
    let recovery_ms = args.stuck_factor
        * (args.queue_wait_timeout_ms + args.execution_timeout_ms + args.max_delay_ms) as f64
        + (args.relay_after_ms + 5 * args.poll_interval_ms) as f64
        + 10_000.0;
    let bound = Duration::from_millis(recovery_ms as u64);
    let calm_s = faults_end_s.max(submit_end_s);
    let hard_deadline_s = calm_s + args.max_wait_s as f64;
    let mut last_open = i64::MAX;
    let mut last_progress_s = calm_s;
    let settled_s = loop {
        let open: Option<i64> =
            sqlx::query_scalar("SELECT count(*) FROM tasks WHERE state IN ('pending', 'running')")
                .fetch_one(&ctx.db)
                .await
                .ok();
        let now = ctx.now_s();
        if let Some(open) = open {
            if open == 0 {
                break Some(now);
            }
            if open < last_open {
                last_open = open;
                last_progress_s = now;
            }
        }
        let from = if args.wait_while_progressing {
            calm_s.max(last_progress_s)
        } else {
            calm_s
        };
        let deadline = (from + bound.as_secs_f64()).min(hard_deadline_s);
        if now > deadline {
            eprintln!(
                "[chaos] giving up at t={now:.1}s: {last_open} tasks not terminal {:.0}s after the last fault and submit (last progress {:.0}s ago)",
                now - calm_s,
                now - last_progress_s
            );
            break None;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    progress.abort();

    // Final metrics, before anything is stopped.
    for slot in &ctx.procs.orchestrators {
        let s = slot.lock().await;
        procs::scrape(&ctx.http, &ctx.book, &s).await;
    }
    let counters = ctx.book.totals();
    let metric_twice = counters
        .get("results_applied_twice_total")
        .copied()
        .unwrap_or(0);

    let mut ex = verify::read_executions(&ctx.record_dir)?;
    verify::check_executions(&ctx.db, &mut ex).await?;
    let v = verify::check(&ctx.db, &accepted, expected_steps, &ex).await?;
    let diagnosis = if v.problem_tasks.is_empty() {
        None
    } else {
        let path = ctx.run_dir.join("problems.txt");
        let summary = verify::diagnose(&ctx.db, &v.problem_tasks, &ex, &path).await?;
        Some(format!("{summary} (details: {})", path.display()))
    };
    let unexpected = ctx.procs.unexpected.lock().expect("lock").clone();
    let stall = {
        let st = ctx.stall.lock().expect("lock");
        (st.longest_s, st.longest_from_s)
    };
    // The same events as the metric, from the logs: covers a process that died between scrapes.
    let (log_lines, log_twice) =
        grep_logs(&ctx.run_dir, "outcomes refused by the attempts primary key");
    let results_applied_twice = metric_twice.max(log_twice)
        + v.sql_duplicate_attempts as u64
        + v.sql_multiple_successes as u64;
    let count = |f: Fault| faults.iter().filter(|r| r.fault == f && r.ok).count();
    let failed_faults: Vec<&FaultRecord> = faults.iter().filter(|r| !r.ok).collect();
    let tasks = accepted.len();
    let mut failures = Vec::new();
    if v.lost > 0 {
        failures.push(format!("lost = {}", v.lost));
    }
    if v.stuck > 0 {
        failures.push(format!("stuck = {}", v.stuck));
    }
    if v.wrong > 0 {
        failures.push(format!(
            "wrong = {} (decision, map or child workflow outcome)",
            v.wrong
        ));
    }
    if results_applied_twice > 0 {
        failures.push(format!("results_applied_twice = {results_applied_twice}"));
    }
    if !not_accepted.is_empty() {
        failures.push(format!("{} submits never accepted", not_accepted.len()));
    }
    if args.fail_rate == 0.0 && v.completed != tasks {
        failures.push(format!("completed {} != tasks {tasks}", v.completed));
    }
    if ex.succeeded_without_execution > 0 {
        failures.push(format!(
            "{} succeeded steps without a recorded execution",
            ex.succeeded_without_execution
        ));
    }
    if v.sql_success_without_row > 0 || v.sql_row_without_success > 0 {
        failures.push(format!(
            "attempt rows disagree with steps ({} succeeded steps without a succeeded row, {} succeeded rows on unsucceeded steps)",
            v.sql_success_without_row, v.sql_row_without_success
        ));
    }
    if !failed_faults.is_empty() {
        failures.push(format!(
            "{} faults could not be injected",
            failed_faults.len()
        ));
    }
    let pass = failures.is_empty();
    let wall_s = ctx.now_s();
    // Every kind, those with no task too: the mix of every run has the same keys.
    let mut by_kind: BTreeMap<&str, usize> = KINDS.iter().map(|k| (*k, 0)).collect();
    for a in &accepted {
        *by_kind.entry(a.kind).or_default() += 1;
    }
    let requests: u32 = accepted.iter().map(|a| a.requests).sum();

    let report = json!({
        // Names what ran, so that several runs in one log stay apart.
        "config": format!(
            "chaos tasks={} duration_s={} orchestrator_kills={} worker_kills={} broker_restarts={} db_restarts={}{}{}",
            args.tasks, args.duration_s, args.orchestrator_kills, args.worker_kills,
            args.broker_restarts, args.db_restarts,
            if args.python_workers > 0 {
                format!(" python_workers={}", args.python_workers)
            } else {
                String::new()
            },
            if args.broker_identity { " broker_identity=on" } else { "" }
        ),
        "python_workers": args.python_workers,
        "broker_identity": args.broker_identity,
        "tasks": tasks,
        "completed": v.completed,
        "failed": v.failed,
        "lost": v.lost,
        "stuck": v.stuck,
        "wrong": v.wrong,
        "results_applied_twice": results_applied_twice,
        "duplicate_executions": ex.duplicate_executions,
        "orchestrator_kills": count(Fault::KillOrchestrator),
        "worker_kills": count(Fault::KillWorker),
        "broker_restarts": count(Fault::RestartBroker),
        "db_restarts": count(Fault::RestartDb),
        "wall_s": round1(wall_s),
        "pass": pass,
        "requested": args.tasks,
        "not_accepted": not_accepted.len(),
        "mix": by_kind,
        "decisions_checked": v.decisions_checked,
        "maps_checked": v.maps_checked,
        "map_instances": v.map_instances,
        "children_checked": v.children_checked,
        "child_tasks": v.child_tasks,
        "child_retries": v.child_retries,
        "skipped_steps": v.skipped_steps,
        "executions": ex.executions,
        "steps_executed": ex.steps_executed,
        "redelivered_executions": ex.redelivered_executions,
        "succeeded_without_execution": ex.succeeded_without_execution,
        "results_applied_twice_metric": metric_twice,
        "results_applied_twice_logged": log_twice,
        "sql_duplicate_attempts": v.sql_duplicate_attempts,
        "sql_multiple_successes": v.sql_multiple_successes,
        "unexpected_exits": unexpected.len(),
        "submit_requests": requests,
        "fault_window_s": args.duration_s,
        "last_fault_s": round1(faults_end_s),
        "settled_s": settled_s.map(round1),
        "settle_after_last_fault_s": settled_s.map(|s| round1(s - calm_s)),
        "stuck_bound_s": round1(bound.as_secs_f64()),
        "longest_stall_s": round1(stall.0),
        "longest_stall_from_s": round1(stall.1),
        "orchestrator_processes": ctx.book.processes(),
        "counters": counters,
        "seed": seed,
        "run_dir": ctx.run_dir.display().to_string(),
        "failures": failures,
    });

    let mut t = String::new();
    let mut row = |k: &str, v: String| t.push_str(&format!("  {k:<28} {v}\n"));
    row(
        "tasks accepted",
        format!(
            "{tasks} of {} ({})",
            args.tasks,
            by_kind
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    row("completed", v.completed.to_string());
    row("failed", v.failed.to_string());
    row(
        "lost",
        format!(
            "{} (no task {}, other id {}, steps wrong {})",
            v.lost, v.missing, v.id_mismatch, v.bad_steps
        ),
    );
    row("stuck", v.stuck.to_string());
    row(
        "wrong",
        format!(
            "{} (decision tasks checked {}, map tasks checked {} with {} instances, child-workflow tasks checked {} ({} child tasks, {} child retries); {} steps skipped)",
            v.wrong,
            v.decisions_checked,
            v.maps_checked,
            v.map_instances,
            v.children_checked,
            v.child_tasks,
            v.child_retries,
            v.skipped_steps
        ),
    );
    row(
        "results applied twice",
        format!(
            "{results_applied_twice} (metric {metric_twice} over {} orchestrator processes, SQL duplicate (step, attempt) {}, steps with >1 success {}; logged {log_twice} in {log_lines} lines)",
            ctx.book.processes(),
            v.sql_duplicate_attempts,
            v.sql_multiple_successes
        ),
    );
    row(
        "executions",
        format!(
            "{} for {} steps: duplicate {}, same attempt again {}",
            ex.executions, ex.steps_executed, ex.duplicate_executions, ex.redelivered_executions
        ),
    );
    row(
        "succeeded w/o execution",
        ex.succeeded_without_execution.to_string(),
    );
    row(
        "orchestrator kills",
        count(Fault::KillOrchestrator).to_string(),
    );
    row("worker kills", count(Fault::KillWorker).to_string());
    row("broker restarts", count(Fault::RestartBroker).to_string());
    row("db restarts", count(Fault::RestartDb).to_string());
    row(
        "faults that failed",
        failed_faults
            .iter()
            .map(|f| f.what.clone())
            .collect::<Vec<_>>()
            .join("; "),
    );
    row(
        "unexpected exits",
        format!(
            "{} {}",
            unexpected.len(),
            unexpected
                .iter()
                .take(10)
                .map(|u| format!("[{} pid {} {} at {:.1}s]", u.slot, u.pid, u.status, u.at_s))
                .collect::<Vec<_>>()
                .join(" ")
                + if unexpected.len() > 10 { " ..." } else { "" }
        ),
    );
    row(
        "submit requests",
        format!(
            "{requests} for {tasks} tasks, {} not accepted",
            not_accepted.len()
        ),
    );
    row(
        "timeline",
        format!(
            "window {}s from {window_start_s:.1}s, last fault ended {faults_end_s:.1}s, submits done {submit_end_s:.1}s, {}",
            args.duration_s,
            match settled_s {
                Some(s) => format!(
                    "all terminal at {s:.1}s ({:.1}s after, bound {:.0}s)",
                    s - calm_s,
                    bound.as_secs_f64()
                ),
                None => format!("NOT all terminal (bound {:.0}s)", bound.as_secs_f64()),
            }
        ),
    );
    row(
        "orchestrator counters",
        [
            "timeouts_total",
            "results_stale_total",
            "outbox_relayed_total",
            "retries_scheduled_total",
            "db_retries_total",
            "dead_lettered_total",
        ]
        .iter()
        .map(|k| {
            format!(
                "{} {}",
                k.trim_end_matches("_total"),
                counters.get(*k).copied().unwrap_or(0)
            )
        })
        .collect::<Vec<_>>()
        .join(", "),
    );
    row(
        "longest stall",
        format!(
            "{:.0}s from t={:.0}s (tasks open, none finishing)",
            stall.0, stall.1
        ),
    );
    row("wall", format!("{wall_s:.1}s"));
    if let Some(d) = &diagnosis {
        row("problems", d.clone());
    }
    row("run dir", ctx.run_dir.display().to_string());
    let verdict = if pass {
        "PASS".to_owned()
    } else {
        format!("FAIL: {}", failures.join("; "))
    };
    let table = format!("Tasker chaos run (seed {seed})\n{t}RESULT: {verdict}\n");
    if args.json {
        eprint!("{table}");
    } else {
        print!("{table}");
    }
    println!("{}", serde_json::to_string(&report)?);
    std::fs::write(
        ctx.run_dir.join("result.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let faults_log: String = faults
        .iter()
        .map(|f| {
            format!(
                "{:>8.1}s {:>8.1}s {:<5} {:?}: {}\n",
                f.start_s,
                f.end_s,
                if f.ok { "ok" } else { "FAIL" },
                f.fault,
                f.what
            )
        })
        .collect();
    std::fs::write(ctx.run_dir.join("faults.log"), faults_log)?;
    Ok(report)
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn pick_kind(rng: &mut StdRng, w: &[u32; 6]) -> &'static str {
    let total: u32 = w.iter().sum();
    let mut x = rng.random_range(0..total.max(1));
    for (i, wi) in w.iter().enumerate() {
        if x < *wi {
            return KINDS[i];
        }
        x -= wi;
    }
    KINDS[0]
}

/// `--mix`: six weights in [`KINDS`] order (three: decision, map and child 0; five: child 0), or
/// `kind=weight` pairs.
fn parse_mix(s: &str) -> Result<[u32; 6]> {
    let mut w = [0u32; 6];
    if s.contains('=') {
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, n) = part
                .split_once('=')
                .with_context(|| format!("--mix: {part:?} is not kind=weight"))?;
            let i = KINDS
                .iter()
                .position(|x| *x == k.trim())
                .with_context(|| format!("--mix: unknown kind {k:?} (kinds: {KINDS:?})"))?;
            w[i] = n
                .trim()
                .parse()
                .with_context(|| format!("--mix: weight of {k} is not a whole number"))?;
        }
    } else {
        let v: Vec<u32> = s
            .split(',')
            .map(|p| p.trim().parse())
            .collect::<Result<_, _>>()
            .context("--mix: whole numbers, e.g. 25,20,15,15,15,10")?;
        if ![3, 5, 6].contains(&v.len()) {
            bail!(
                "--mix: six weights ({KINDS:?}), or five (child 0), or three (decision, map and child 0)"
            );
        }
        w[..v.len()].copy_from_slice(&v);
    }
    if w.iter().sum::<u32>() == 0 {
        bail!("--mix: the weights must have a positive sum");
    }
    Ok(w)
}

/// Writes the templates; returns the step count of each submitted kind (template steps: a map
/// task's instances come on top; `child_sub` runs only as the child task of `child`).
fn write_templates(dir: &Path, a: &Args) -> Result<HashMap<&'static str, usize>> {
    let policy = format!(
        "retry: {{ max_attempts: {}, initial_delay: {}ms, multiplier: 2.0, max_delay: {}ms, jitter: 0.2 }}, \
         queue_wait_timeout: {}ms, execution_timeout: {}ms",
        a.max_attempts,
        a.initial_delay_ms,
        a.max_delay_ms,
        a.queue_wait_timeout_ms,
        a.execution_timeout_ms
    );
    let step_with = |name: &str, handler: &str, deps: &[&str], extra: &str| {
        format!(
            "  - {{ name: {name}, handler: {handler}, depends_on: [{}], {extra}{policy} }}\n",
            deps.join(", ")
        )
    };
    let step = |name: &str, deps: &[String]| {
        let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
        step_with(name, "chaos", &deps, "")
    };
    let head = |name: &str| format!("namespace: chaos\nname: {name}\nversion: 1\nsteps:\n");
    let mut linear = head("linear");
    for i in 1..=4 {
        let deps = if i == 1 {
            vec![]
        } else {
            vec![format!("s{}", i - 1)]
        };
        linear.push_str(&step(&format!("s{i}"), &deps));
    }
    let mut diamond = head("diamond");
    diamond.push_str(&step("top", &[]));
    diamond.push_str(&step("left", &["top".into()]));
    diamond.push_str(&step("right", &["top".into()]));
    diamond.push_str(&step("bottom", &["left".into(), "right".into()]));
    let mut fanout = head("fanout");
    fanout.push_str(&step("split", &[]));
    let width = a.fanout_width.max(1);
    let branches: Vec<String> = (1..=width).map(|i| format!("b{i:03}")).collect();
    for b in &branches {
        fanout.push_str(&step(b, &["split".into()]));
    }
    fanout.push_str(&step("join", &branches));
    // route chooses left or right (from the task's context); the other branch is skipped, and
    // with it left_tail when right is chosen; after runs once its parents finished (join: any).
    let mut decision = head("decision");
    decision.push_str(&step_with(
        "route",
        "chaos_route",
        &[],
        &format!("decides: [{}], ", ROUTES.join(", ")),
    ));
    decision.push_str(&step_with("left", "chaos", &["route"], ""));
    decision.push_str(&step_with("left_tail", "chaos", &["left"], ""));
    decision.push_str(&step_with("right", "chaos", &["route"], ""));
    decision.push_str(&step_with(
        "after",
        "chaos",
        &["left_tail", "right"],
        "join: any, ",
    ));
    // split outputs {"items": [...]} (as many as the task's context says); one instance of
    // work per element; join reads work's output (the instances' outputs in order).
    let mut map = head("map");
    map.push_str(&step_with("split", "chaos_items", &[], ""));
    map.push_str(&step_with(
        "work",
        "chaos",
        &["split"],
        &format!(
            "map: {{ over: split.items, max_parallel: {}, max_items: {} }}, ",
            a.map_parallel,
            a.map_max_items.max(1)
        ),
    ));
    map.push_str(&step_with("join", "chaos", &["work"], ""));
    // a echoes the task's context; sub runs child_sub as a child task with the context
    // {i: a.context.i} (namespace and version left out: the parent's, and the newest); c2's
    // output (the child's output, under its name) echoes that context; b follows sub.
    let mut child = head("child");
    child.push_str(&step_with("a", "chaos_echo", &[], ""));
    child.push_str(&format!(
        "  - {{ name: sub, depends_on: [a], workflow: {{ name: child_sub, context: {{ i: a.context.i }} }}, \
         retry: {{ max_attempts: {}, initial_delay: {}ms, multiplier: 2.0, max_delay: {}ms, jitter: 0.2 }} }}\n",
        a.max_attempts, a.initial_delay_ms, a.max_delay_ms
    ));
    child.push_str(&step_with("b", "chaos", &["sub"], ""));
    let mut child_sub = head("child_sub");
    child_sub.push_str(&step_with("c1", "chaos_echo", &[], ""));
    child_sub.push_str(&step_with("c2", "chaos_echo", &["c1"], ""));
    for (name, text) in [
        ("linear", &linear),
        ("diamond", &diamond),
        ("fanout", &fanout),
        ("decision", &decision),
        ("map", &map),
        ("child", &child),
        ("child_sub", &child_sub),
    ] {
        let path = dir.join(format!("{name}.yaml"));
        tasker_orchestrator::service::templates::parse_template(text)
            .map_err(anyhow::Error::msg)?
            .validate()
            .with_context(|| format!("template {name}"))?;
        std::fs::write(&path, text)?;
    }
    // A map task has its instances besides (as many as its elements).
    Ok(HashMap::from([
        ("linear", 4),
        ("diamond", 4),
        ("fanout", width + 2),
        ("decision", 5),
        ("map", 3),
        ("child", 3),
    ]))
}

/// Submits every planned task, spread over `spread`, round-robin over the orchestrators with an
/// idempotency key per task; a failed request (no answer, 5xx, 429) is retried against the next
/// orchestrator with the same key until accepted. Returns the accepted submits and the indexes
/// of those never accepted (after 10 minutes of trying, or a 4xx).
async fn submit_all(
    ctx: Arc<Ctx>,
    plan: Vec<Planned>,
    spread: Duration,
) -> (Vec<Accepted>, Vec<usize>) {
    let n = plan.len();
    let start = Instant::now();
    let permits = Arc::new(Semaphore::new(ctx.args.submit_concurrency.max(1)));
    let mut handles = Vec::with_capacity(n);
    for (i, planned) in plan.into_iter().enumerate() {
        let due = start + spread.mul_f64(i as f64 / n.max(1) as f64);
        tokio::time::sleep_until(due.into()).await;
        let permit = Arc::clone(&permits)
            .acquire_owned()
            .await
            .expect("semaphore");
        let ctx = Arc::clone(&ctx);
        handles.push(tokio::spawn(async move {
            let r = submit_one(&ctx, i, planned).await;
            drop(permit);
            r
        }));
    }
    let mut accepted = Vec::with_capacity(n);
    let mut not_accepted = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        match h.await {
            Ok(Ok(a)) => accepted.push(a),
            Ok(Err(e)) => {
                eprintln!("[chaos] submit {i} not accepted: {e:#}");
                not_accepted.push(i);
            }
            Err(e) => {
                eprintln!("[chaos] submit {i} panicked: {e}");
                not_accepted.push(i);
            }
        }
    }
    (accepted, not_accepted)
}

async fn submit_one(ctx: &Ctx, i: usize, planned: Planned) -> Result<Accepted> {
    let key = format!("chaos-{i}");
    let Planned { kind, route, items } = planned;
    let mut context = json!({ "i": i, "kind": kind });
    if let Some(r) = route {
        context["route"] = json!(r);
    }
    if let Some(n) = items {
        context["items"] = json!(n);
    }
    let body = json!({
        "namespace": "chaos",
        "template": kind,
        "context": context,
        "idempotency_key": key,
    });
    let urls = &ctx.orch_urls;
    let mut target = i % urls.len();
    let mut requests = 0u32;
    let started = Instant::now();
    loop {
        requests += 1;
        ctx.submit.requests.fetch_add(1, Ordering::Relaxed);
        let res = ctx
            .http
            .post(format!("{}/v1/tasks", urls[target]))
            .json(&body)
            .send()
            .await;
        let retry_reason = match res {
            Ok(r) if r.status().is_success() => {
                let v: Value = r.json().await.context("submit answer")?;
                let task_id = v["task_id"]
                    .as_str()
                    .and_then(|s| s.parse::<Uuid>().ok())
                    .context("no task_id in the answer")?;
                ctx.submit.accepted.fetch_add(1, Ordering::Relaxed);
                return Ok(Accepted {
                    index: i,
                    key,
                    kind,
                    route,
                    items,
                    task_id,
                    requests,
                });
            }
            Ok(r) if r.status().is_server_error() || r.status().as_u16() == 429 => {
                format!("{} {}", r.status(), r.text().await.unwrap_or_default())
            }
            Ok(r) => bail!(
                "refused: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            ),
            Err(e) => e.to_string(),
        };
        if started.elapsed() > Duration::from_secs(600) {
            bail!("no orchestrator accepted it within 10 minutes (last: {retry_reason})");
        }
        if requests == 1 {
            ctx.submit.retried.fetch_add(1, Ordering::Relaxed);
        }
        target = (target + 1) % urls.len();
        tokio::time::sleep(Duration::from_millis((50 * u64::from(requests)).min(1_000))).await;
    }
}

/// Fires the faults at their moments (one after the other; a late one fires at once).
async fn inject(
    ctx: Arc<Ctx>,
    schedule: Vec<(Duration, Fault)>,
    start: Instant,
    mut rng: StdRng,
) -> Vec<FaultRecord> {
    let mut records = Vec::new();
    for (at, fault) in schedule {
        tokio::time::sleep_until((start + at).into()).await;
        let start_s = ctx.now_s();
        let result = match fault {
            Fault::KillOrchestrator => {
                kill_and_restart(&ctx, &ctx.procs.orchestrators, &mut rng).await
            }
            Fault::KillWorker => kill_and_restart(&ctx, &ctx.procs.workers, &mut rng).await,
            Fault::RestartBroker => {
                let pause = Duration::from_millis(rng.random_range(2_000..5_000));
                let b = ctx.broker.as_ref().expect("broker restart configured");
                eprintln!("[chaos] t={start_s:.1}s restarting RabbitMQ (down for {pause:?})");
                b.restart(pause, &ctx.run_dir.join("broker-restarts.log"))
                    .await
                    .map(|()| {
                        format!(
                            "RabbitMQ restarted ({}; stopped for {pause:?})",
                            b.describe()
                        )
                    })
            }
            Fault::RestartDb => {
                let d = ctx.database.as_ref().expect("db restart configured");
                eprintln!("[chaos] t={start_s:.1}s restarting PostgreSQL");
                d.restart(&ctx.run_dir.join("db-restarts.log"))
                    .await
                    .map(|()| format!("PostgreSQL restarted ({})", d.describe()))
            }
        };
        let end_s = ctx.now_s();
        let (ok, what) = match result {
            Ok(w) => (true, w),
            Err(e) => (false, format!("{e:#}")),
        };
        eprintln!(
            "[chaos] t={end_s:.1}s {fault:?} {}: {what}",
            if ok { "done" } else { "FAILED" }
        );
        records.push(FaultRecord {
            fault,
            what,
            start_s,
            end_s,
            ok,
        });
        ctx.faults_done.fetch_add(1, Ordering::Relaxed);
    }
    records
}

/// SIGKILLs a random running process of `slots` and restarts it after a short random delay.
async fn kill_and_restart(
    ctx: &Ctx,
    slots: &[procs::SharedSlot],
    rng: &mut StdRng,
) -> Result<String> {
    let first = rng.random_range(0..slots.len());
    let delay = Duration::from_millis(rng.random_range(200..3_000));
    // Take a running one (the supervisor may be restarting another).
    let deadline = Instant::now() + Duration::from_secs(30);
    let (slot, name, pid) = 'found: loop {
        for k in 0..slots.len() {
            let slot = &slots[(first + k) % slots.len()];
            let mut s = slot.lock().await;
            if s.is_running() && !s.held {
                if s.kind == Kind::Orchestrator {
                    // Its last counters, just before it dies.
                    procs::scrape(&ctx.http, &ctx.book, &s).await;
                }
                s.held = true;
                let pid = s.kill(ctx.t0, "fault").await.unwrap_or(0);
                break 'found (Arc::clone(slot), s.name.clone(), pid);
            }
        }
        if Instant::now() > deadline {
            bail!("no running process to kill");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "[chaos] t={:.1}s SIGKILL {name} (pid {pid}); restart in {delay:?}",
        ctx.now_s()
    );
    tokio::time::sleep(delay).await;
    let new_pid = {
        let mut s = slot.lock().await;
        match s.start(ctx.t0).await {
            Ok(pid) => pid,
            Err(e) => {
                // Let the supervisor keep trying.
                s.held = false;
                return Err(e);
            }
        }
    };
    Ok(format!(
        "SIGKILL {name} pid {pid}, restarted after {delay:?} as pid {new_pid}"
    ))
}

/// Samples the task states each second: prints progress every 5 s and tracks the longest
/// stall (tasks open but none finishing).
async fn progress_loop(ctx: Arc<Ctx>, total_faults: usize, stop: CancellationToken) {
    let mut tick = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        tick += 1;
        let states: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM tasks GROUP BY state ORDER BY state")
                .fetch_all(&ctx.db)
                .await
                .unwrap_or_default();
        let now = ctx.now_s();
        if !states.is_empty() {
            let open: i64 = states
                .iter()
                .filter(|(s, _)| s == "pending" || s == "running")
                .map(|(_, n)| n)
                .sum();
            let done: i64 = states.iter().map(|(_, n)| n).sum::<i64>() - open;
            let mut st = ctx.stall.lock().expect("lock");
            if done > st.done || open == 0 {
                st.done = done;
                st.since_s = now;
            } else if now - st.since_s > st.longest_s {
                st.longest_s = now - st.since_s;
                st.longest_from_s = st.since_s;
            }
        }
        if tick.is_multiple_of(5) {
            eprintln!(
                "[chaos] t={now:.0}s accepted {}/{} ({} requests, {} retried), faults {}/{total_faults}, tasks: {}",
                ctx.submit.accepted.load(Ordering::Relaxed),
                ctx.args.tasks,
                ctx.submit.requests.load(Ordering::Relaxed),
                ctx.submit.retried.load(Ordering::Relaxed),
                ctx.faults_done.load(Ordering::Relaxed),
                if states.is_empty() {
                    "(database unavailable)".into()
                } else {
                    states
                        .iter()
                        .map(|(s, n)| format!("{s} {n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            );
        }
    }
}

/// The longest time tasks were open while none finished.
#[derive(Default)]
struct Stall {
    done: i64,
    since_s: f64,
    longest_s: f64,
    longest_from_s: f64,
}

/// Lines containing `needle` in the orchestrators' logs, and the sum of their `count=` fields.
fn grep_logs(dir: &Path, needle: &str) -> (usize, u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (0, 0);
    };
    let mut lines = 0;
    let mut counted = 0;
    for e in entries.filter_map(|e| e.ok()) {
        let is_orch = e
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with("orchestrator-") && n.ends_with(".log"));
        let Some(text) = is_orch
            .then(|| std::fs::read_to_string(e.path()).ok())
            .flatten()
        else {
            continue;
        };
        for l in text.lines().filter(|l| l.contains(needle)) {
            lines += 1;
            // `count=N` of the log event, 1 if absent.
            counted += l
                .split_whitespace()
                .find_map(|w| w.strip_prefix("count=").and_then(|n| n.parse::<u64>().ok()))
                .unwrap_or(1);
        }
    }
    (lines, counted)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}
