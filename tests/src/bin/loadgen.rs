//! # loadgen: the Tasker load generator
//!
//! Drives an orchestrator with no-op steps (each returns `{"ok": true}`) and reports latency,
//! throughput, and the orchestrator's CPU time and memory, beside the raw limits of the same
//! Postgres and RabbitMQ measured in the same session. Every task a workload submits is checked
//! in the database afterwards: all completed, all steps succeeded. A run that loses a task fails
//! (exit 1); a missed target is reported, not a failure.
//!
//! ```text
//! cargo build --release -p tasker-tests -p tasker-orchestrator
//! target/release/loadgen                                  # every workload, table on stdout
//! target/release/loadgen --smoke                          # everything small (CI correctness)
//! target/release/loadgen --workloads linear,diamond --json
//! ```
//!
//! By default it creates a fresh database from `--database-url` (an admin URL, env
//! `TASKER_TEST_DATABASE_URL`), starts `tasker serve` from next to its own executable (or
//! `--tasker-bin`) as a child process on it, with a unique queue prefix and a free port, and
//! removes the database, queues and exchanges at the end (`--keep` keeps the database and log).
//! Running the orchestrator as a separate process is what lets the loadgen read its CPU time and
//! resident memory from `/proc`. Orchestrator settings are the benchmark profile in
//! `deploy::BENCH_SETTINGS`, changed with `--orch-env KEY=VALUE`; the header prints them.
//!
//! With `--api-url` it drives a deployment that is already running instead: `--database-url` is
//! then that deployment's database (used to verify tasks and count steps), `--prefix` its queue
//! prefix, and `--orchestrator-pid` (optional) the process to measure. The loadgen registers
//! templates in namespace `loadgen` with their own queues (`loadgen`, `loadgen_submit`,
//! `loadgen_hold`) and runs its own workers; it refuses `history` and `console` there (they seed
//! a million rows).
//!
//! Workers run inside the loadgen (`tasker_worker::Worker`, `--worker-concurrency`, default 256),
//! so on one machine the loadgen's own CPU competes with the orchestrator: the table shows the
//! CPU seconds of the orchestrator, of Postgres (the benchmark database's backends plus the
//! shared background processes), of RabbitMQ (the broker process, shared with anyone else using
//! it) and of the loadgen for each workload's measured period; the header shows what each burns
//! idle. `rss_mb` is the largest `VmRSS` sampled during the workload; the footer prints `VmHWM`.
//!
//! Latency is measured from just before the submit until `Client::wait` returns the finished
//! task (`linear`, `fanout`) or until the task's lifecycle event arrives (`diamond`, `map`; the
//! loadgen binds its own queue to the events exchange). Throughput (`diamond`) counts the attempts that
//! succeeded inside the steady window, from the database. Before each task workload the loadgen
//! runs `ANALYZE` on its own database (`--no-analyze` leaves statistics to autovacuum, whose
//! timing otherwise decides the plans of the orchestrator's cached statements).
//!
//! Workloads: `floor` (one confirmed persistent publish → delivery on a quorum queue, the same
//! pipelined, one small commit), `linear` (4-step chain, one task at a time), `diamond`
//! (a → (b, c) → d submitted continuously, steady window), `fanout` (1 → N → 1), `map` (a root
//! whose output is an array of N elements → a mapped step, one no-op instance per element, at
//! most `--map-parallel` at once → a final step; one task at a time, wall time and instances/s;
//! `map-1x{N}x1`), `submit` (HTTP and AMQP, one at a time and concurrently), `inflight` (10,000 tasks held in flight, memory),
//! `history` (linear and diamond again after seeding 1,000,000 finished tasks by SQL), `console`
//! (the console's pages under `/ui`, each page type 200 times, p50/p95 per page, after seeding
//! 1,000,000 finished tasks by SQL, 10,000 running ones and a task with a 10,000-instance map;
//! `--console-tasks N`; see `loadgen/console.rs`), and, only
//! when asked for and alone, `prune` (diamonds for `--prune-secs`, default 600, against an
//! orchestrator that keeps finished tasks `--prune-retention-ms`, default one minute; the rows
//! of `tasks`, `steps`, `attempts`, `task_events` and `outbox` are sampled every 30 s and must stay
//! flat once tasks are past their retention: `--workloads prune --json`).

#[path = "loadgen/bench.rs"]
mod bench;
#[path = "loadgen/console.rs"]
mod console;
#[path = "loadgen/deploy.rs"]
mod deploy;
#[path = "loadgen/report.rs"]
mod report;
#[path = "loadgen/workloads.rs"]
mod workloads;

use anyhow::{Result, bail};
use bench::Bench;
use clap::{Parser, ValueEnum};
use deploy::{Deployment, StartOptions};
use report::Row;
use std::path::PathBuf;
use std::process::ExitCode;
use workloads::Sizes;

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    about = "Tasker load generator: latency, throughput and resource use against real services"
)]
struct Args {
    /// Workloads to run (always in this order).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "floor,linear,diamond,fanout,map,submit,inflight,history,console"
    )]
    workloads: Vec<Workload>,
    /// Print one JSON object per workload on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// Postgres admin URL (creates the benchmark database); with --api-url, the deployment's database.
    #[arg(
        long,
        env = "TASKER_TEST_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    database_url: String,
    #[arg(
        long,
        env = "TASKER_TEST_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    amqp_url: String,
    /// Drive this running orchestrator instead of starting one.
    #[arg(long)]
    api_url: Option<String>,
    /// Queue prefix of the running deployment (with --api-url).
    #[arg(long, default_value = "tasker", requires = "api_url")]
    prefix: String,
    /// Process id of the running orchestrator, to measure its CPU and memory (with --api-url).
    #[arg(long, requires = "api_url")]
    orchestrator_pid: Option<u32>,
    /// The `tasker` binary to start (default: next to this executable).
    #[arg(long)]
    tasker_bin: Option<PathBuf>,
    /// Extra or changed environment of the orchestrator child, e.g. TASKER_RESULT_BATCH_SIZE=512.
    #[arg(long = "orch-env", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    orch_env: Vec<(String, String)>,
    /// Measured runs of the linear workload.
    #[arg(long)]
    linear_runs: Option<usize>,
    /// Length of the diamond workload's steady window, in seconds.
    #[arg(long)]
    diamond_secs: Option<u64>,
    /// Warm-up of the diamond workload before its window, in seconds.
    #[arg(long)]
    warmup_secs: Option<u64>,
    /// Most diamond tasks unfinished at once.
    #[arg(long)]
    diamond_in_flight: Option<usize>,
    /// Parallel steps of the fanout workload.
    #[arg(long)]
    fanout_width: Option<usize>,
    /// Elements of the map workload's array (instances of its mapped step).
    #[arg(long)]
    map_items: Option<usize>,
    /// `map.max_parallel` of the map workload's mapped step (1 to 1000).
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    map_parallel: u32,
    /// Measured runs of the map workload (after one warm-up run).
    #[arg(long)]
    map_runs: Option<usize>,
    /// Submissions per submit variant.
    #[arg(long)]
    submit_count: Option<usize>,
    /// Tasks held in flight by the inflight workload.
    #[arg(long)]
    inflight_tasks: Option<usize>,
    /// Finished tasks seeded before the history workload.
    #[arg(long)]
    history_tasks: Option<u64>,
    /// Finished tasks seeded by SQL before the console workload (smoke: 2,000).
    #[arg(long)]
    console_tasks: Option<u64>,
    /// Running tasks (held on a queue without a worker) during the console workload (smoke: 200).
    #[arg(long)]
    console_running: Option<usize>,
    /// Instances of the console workload's mapped step (smoke: 1,000).
    #[arg(long)]
    console_map_items: Option<usize>,
    /// Requests per page type of the console workload (smoke: 20).
    #[arg(long)]
    console_requests: Option<usize>,
    /// Most seconds the console workload spends on one page type (fewer requests when slow).
    #[arg(long, default_value_t = 120)]
    console_page_secs: u64,
    /// Length of the prune workload (diamonds against a short retention), in seconds.
    #[arg(long)]
    prune_secs: Option<u64>,
    /// The retention the prune workload gives the orchestrator it starts (TASKER_RETENTION_MS).
    #[arg(long, default_value_t = 60_000)]
    prune_retention_ms: u64,
    /// The Python interpreter for the `python` workload, with `tasker_worker` installed (default:
    /// the project's venv, `.tasker/venv/bin/python`, as deploy/local/python-env.sh makes it).
    #[arg(long, env = "TASKER_LOADGEN_PYTHON")]
    python: Option<PathBuf>,
    /// Steps each in-process worker runs at once.
    #[arg(long, default_value_t = 256)]
    worker_concurrency: usize,
    /// Everything small: a correctness check that runs in well under a minute.
    #[arg(long)]
    smoke: bool,
    /// Keep the benchmark database and the orchestrator log.
    #[arg(long)]
    keep: bool,
    /// Do not ANALYZE the database before each task workload. By default the loadgen does, so
    /// that every workload starts with current planner statistics instead of depending on when
    /// autovacuum last visited the (fast-growing) tables; only on a database it created.
    #[arg(long)]
    no_analyze: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Workload {
    Floor,
    Linear,
    Diamond,
    /// Not in the default list: `linear` and `diamond` again with a Python worker (the
    /// `tasker_worker` package, `tests/python/loadgen_worker.py`), compared with the Rust
    /// worker's figures of the same run (`python-linear`, `python-diamond`).
    Python,
    Fanout,
    Map,
    Submit,
    Inflight,
    History,
    /// The console's pages (`/ui`) after seeding `--console-tasks` finished tasks by SQL, with
    /// running tasks and a large mapped step: p50/p95 per page type (`console-<page>`).
    Console,
    /// Not in the default list: runs alone, for `--prune-secs` (default 600), against an
    /// orchestrator keeping finished tasks `--prune-retention-ms` (default one minute).
    Prune,
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    Ok((k.trim().to_owned(), v.to_owned()))
}

impl Args {
    fn console_sizes(&self) -> console::ConsoleSizes {
        let smoke = self.smoke;
        console::ConsoleSizes {
            finished: self
                .console_tasks
                .unwrap_or(if smoke { 2_000 } else { 1_000_000 }),
            running: self
                .console_running
                .unwrap_or(if smoke { 200 } else { 10_000 }),
            map_items: self
                .console_map_items
                .unwrap_or(if smoke { 1_000 } else { 10_000 }),
            requests: self
                .console_requests
                .unwrap_or(if smoke { 20 } else { 200 })
                .max(1),
            page_budget: std::time::Duration::from_secs(self.console_page_secs),
        }
    }

    fn sizes(&self) -> Sizes {
        fn pick<T>(smoke: bool, full: T, small: T) -> T {
            if smoke { small } else { full }
        }
        let smoke = self.smoke;
        let linear_runs = self.linear_runs.unwrap_or(pick(smoke, 1_000, 50));
        Sizes {
            floor_hops: pick(smoke, 1_000, 200),
            floor_pipelined: pick(smoke, 20_000, 2_000),
            floor_commits: pick(smoke, 2_000, 400),
            linear_runs,
            linear_warmup: (linear_runs / 20).clamp(5, 50),
            diamond_secs: self.diamond_secs.unwrap_or(pick(smoke, 30, 3)),
            warmup_secs: self.warmup_secs.unwrap_or(pick(smoke, 5, 1)),
            diamond_in_flight: self.diamond_in_flight.unwrap_or(500),
            fanout_width: self.fanout_width.unwrap_or(pick(smoke, 1_000, 200)),
            fanout_runs: pick(smoke, 5, 2),
            map_items: self.map_items.unwrap_or(pick(smoke, 10_000, 1_000)),
            map_parallel: self.map_parallel,
            map_runs: self.map_runs.unwrap_or(pick(smoke, 3, 1)).max(1),
            map_warmup: 1,
            submit_count: self.submit_count.unwrap_or(pick(smoke, 2_000, 200)),
            submit_concurrency: 32,
            inflight_tasks: self.inflight_tasks.unwrap_or(pick(smoke, 10_000, 1_000)),
            history_tasks: self.history_tasks.unwrap_or(pick(smoke, 1_000_000, 20_000)),
            prune_secs: self.prune_secs.unwrap_or(pick(smoke, 600, 30)),
            prune_sample_secs: pick(smoke, 30, 5),
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,sqlx=error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // reqwest's rustls needs a process-wide crypto provider (ring).
    tasker_tests::tasker_worker::client::tls::install_crypto_provider();
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let mut selected = args.workloads.clone();
    selected.sort();
    selected.dedup();
    let sizes = args.sizes();
    let id = uuid::Uuid::now_v7().simple().to_string();
    let run_id = id[id.len() - 10..].to_owned();
    let mut overrides = args.orch_env.clone();
    if selected.contains(&Workload::Prune) {
        if selected.len() > 1 {
            bail!("prune runs alone: its short retention would prune the other workloads' tasks");
        }
        if args.api_url.is_some() {
            bail!(
                "prune sets the orchestrator's retention: it runs only with the orchestrator the loadgen starts"
            );
        }
        for (k, v) in [
            ("TASKER_RETENTION_MS", args.prune_retention_ms.to_string()),
            ("TASKER_RECONCILE_INTERVAL_MS", "5000".to_owned()),
        ] {
            if !overrides.iter().any(|(key, _)| key == k) {
                overrides.push((k.to_owned(), v));
            }
        }
    }
    let mut deployment = match &args.api_url {
        Some(api) => {
            if selected.contains(&Workload::Console) {
                bail!(
                    "console seeds {} tasks into the database; it runs only on a database the loadgen creates (drop --api-url or the workload)",
                    args.console_sizes().finished
                );
            }
            if selected.contains(&Workload::History) {
                bail!(
                    "history seeds {} rows into the database; it runs only on a database the loadgen creates (drop --api-url or the workload)",
                    sizes.history_tasks
                );
            }
            Deployment::external(
                api,
                &args.database_url,
                &args.amqp_url,
                &args.prefix,
                args.orchestrator_pid,
            )
        }
        None => {
            Deployment::start(StartOptions {
                admin_url: &args.database_url,
                amqp_url: &args.amqp_url,
                tasker_bin: args.tasker_bin.as_deref(),
                overrides: &overrides,
                run_id: &run_id,
            })
            .await?
        }
    };
    print_header(&args, &deployment, &sizes, &selected, &run_id);
    let python = args.python.clone().unwrap_or_else(|| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tasker/venv/bin/python")
    });
    let bench = match Bench::start(
        &deployment,
        &run_id,
        args.worker_concurrency,
        bench::WorkerKind::Rust,
        python,
    )
    .await
    {
        Ok(b) => b,
        Err(e) => {
            deployment.finish(bench::ALL_QUEUES, args.keep).await;
            return Err(e);
        }
    };
    let mut rows = Vec::new();
    let outcome = tokio::select! {
        r = run_workloads(&bench, &selected, &sizes, &args, &mut rows) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    let outcome = outcome.and_then(|()| deployment.check_alive());
    if let Some(pid) = deployment.pid
        && let Some(hwm) = deploy::status_mb(pid, "VmHWM")
    {
        eprintln!("orchestrator peak resident memory over the whole run (VmHWM): {hwm:.1} MB");
    }
    eprintln!("load average at the end: {}", load_average());
    if args.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
        eprint!("\n{}", report::table(&rows));
    } else {
        print!("\n{}", report::table(&rows));
    }
    bench.stop().await;
    deployment.finish(bench::ALL_QUEUES, args.keep).await;
    outcome
}

async fn run_workloads(
    b: &Bench,
    selected: &[Workload],
    s: &Sizes,
    args: &Args,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let push = |rows: &mut Vec<Row>, row: Row| {
        eprintln!("{}", one_line(&row));
        rows.push(row);
    };
    let mut baseline_linear = None;
    let mut baseline_diamond = None;
    let mut floor_msgs_per_s = None;
    let analyze = args.api_url.is_none() && !args.no_analyze;
    for w in selected {
        eprintln!("loadgen: running {w:?}");
        if analyze && !matches!(w, Workload::Floor | Workload::History | Workload::Console) {
            b.analyze().await?;
        }
        match w {
            Workload::Floor => {
                for r in counted(b, workloads::floor(b, s)).await? {
                    if r.workload == "floor-amqp-pipelined" {
                        floor_msgs_per_s = r.steps_per_s;
                    }
                    push(rows, r);
                }
            }
            Workload::Linear => {
                let r = one(counted(
                    b,
                    one_row(workloads::linear(
                        b,
                        "linear",
                        s.linear_runs,
                        s.linear_warmup,
                    )),
                ))
                .await?;
                baseline_linear = Some(r.clone());
                push(rows, r);
            }
            Workload::Diamond => {
                let r = one(counted(b, one_row(workloads::diamond(b, "diamond", s)))).await?;
                baseline_diamond = Some(r.clone());
                push(rows, r);
            }
            Workload::Python => {
                b.use_workers(bench::WorkerKind::Python).await?;
                let ran =
                    python_rows(b, s, baseline_linear.as_ref(), baseline_diamond.as_ref()).await;
                b.use_workers(bench::WorkerKind::Rust).await?;
                for r in ran? {
                    push(rows, r);
                }
            }
            Workload::Fanout => {
                let r = one(counted(b, one_row(workloads::fanout(b, s)))).await?;
                push(rows, r);
            }
            Workload::Map => {
                let r = one(counted(b, one_row(workloads::map(b, s, floor_msgs_per_s)))).await?;
                push(rows, r);
            }
            Workload::Submit => {
                for r in counted(b, workloads::submit(b, s)).await? {
                    push(rows, r);
                }
            }
            Workload::Inflight => {
                let r = one(counted(b, one_row(workloads::inflight(b, s)))).await?;
                push(rows, r);
            }
            Workload::Prune => {
                let r = one(counted(
                    b,
                    one_row(workloads::prune(b, s, args.prune_retention_ms)),
                ))
                .await?;
                push(rows, r);
            }
            Workload::Console => {
                for r in counted(b, console::console(b, &args.console_sizes())).await? {
                    push(rows, r);
                }
            }
            Workload::History => {
                let seed = workloads::seed_history(b, s.history_tasks).await?;
                push(rows, seed);
                let mut r = one(counted(
                    b,
                    one_row(workloads::linear(
                        b,
                        "history-linear",
                        s.linear_runs,
                        s.linear_warmup,
                    )),
                ))
                .await?;
                match &baseline_linear {
                    Some(base) => {
                        let ratio = |h: Option<f64>, e: Option<f64>| Some(h? / e?);
                        let p50 = ratio(r.p50_ms, base.p50_ms);
                        let p99 = ratio(r.p99_ms, base.p99_ms);
                        r.note(format!(
                            "x{:.2} p50, x{:.2} p99 of the empty-db linear",
                            p50.unwrap_or(f64::NAN),
                            p99.unwrap_or(f64::NAN)
                        ));
                        let ratio_target = workloads::HISTORY_RATIO;
                        r.target(
                            format!("p50<=x{ratio_target:.2} of linear"),
                            p50.is_some_and(|x| x <= ratio_target),
                        );
                    }
                    None => r.note("no empty-db linear in this run to compare with"),
                }
                push(rows, r);
                if args.api_url.is_none() {
                    if analyze {
                        b.analyze().await?;
                    }
                    let mut r = one(counted(
                        b,
                        one_row(workloads::diamond(b, "history-diamond", s)),
                    ))
                    .await?;
                    match (&baseline_diamond, r.steps_per_s) {
                        (Some(base), Some(rate)) if base.steps_per_s.is_some() => {
                            let base_rate = base.steps_per_s.unwrap_or(f64::NAN);
                            let x = rate / base_rate;
                            r.note(format!("x{x:.2} steps/s of the empty-db diamond"));
                            let floor = 1.0 / workloads::HISTORY_RATIO;
                            r.target(format!("steps/s>=x{floor:.2} of diamond"), x >= floor);
                        }
                        _ => r.note("no empty-db diamond in this run to compare with"),
                    }
                    push(rows, r);
                }
            }
        }
    }
    Ok(())
}

/// Python worker targets, against the Rust worker's figures of the same run.
const PYTHON_LINEAR_P50_RATIO: f64 = 1.5;
const PYTHON_DIAMOND_RATE_RATIO: f64 = 0.6;

/// `linear` and `diamond` with the Python worker (already started), each compared with the Rust
/// worker's row of this run when there is one.
async fn python_rows(
    b: &Bench,
    s: &Sizes,
    rust_linear: Option<&Row>,
    rust_diamond: Option<&Row>,
) -> Result<Vec<Row>> {
    let mut linear = one(counted(
        b,
        one_row(workloads::linear(
            b,
            "python-linear",
            s.linear_runs,
            s.linear_warmup,
        )),
    ))
    .await?;
    match rust_linear.and_then(|r| Some((r.p50_ms?, linear.p50_ms?))) {
        Some((rust, py)) => {
            let x = py / rust;
            linear.note(format!(
                "x{x:.2} p50 of the Rust worker's linear ({rust:.2} ms)"
            ));
            linear.target(
                format!("p50<=x{PYTHON_LINEAR_P50_RATIO} of Rust"),
                x <= PYTHON_LINEAR_P50_RATIO,
            );
        }
        None => {
            linear.note("no Rust linear in this run to compare with (add linear to --workloads)")
        }
    }
    let mut diamond = one(counted(
        b,
        one_row(workloads::diamond(b, "python-diamond", s)),
    ))
    .await?;
    match rust_diamond.and_then(|r| Some((r.steps_per_s?, diamond.steps_per_s?))) {
        Some((rust, py)) => {
            let x = py / rust;
            diamond.note(format!(
                "x{x:.2} steps/s of the Rust worker's diamond ({rust:.0})"
            ));
            diamond.target(
                format!("steps/s>=x{PYTHON_DIAMOND_RATE_RATIO} of Rust"),
                x >= PYTHON_DIAMOND_RATE_RATIO,
            );
        }
        None => {
            diamond.note("no Rust diamond in this run to compare with (add diamond to --workloads)")
        }
    }
    Ok(vec![linear, diamond])
}

/// Runs a workload and notes which orchestrator counters (`/metrics`) that signal trouble or
/// extra work moved meanwhile: relayed publishes, stale results, retries, timeouts, ...
async fn counted<F>(b: &Bench, work: F) -> Result<Vec<Row>>
where
    F: std::future::Future<Output = Result<Vec<Row>>>,
{
    const WATCHED: &[&str] = &[
        "results_stale_total",
        "results_applied_twice_total",
        "retries_scheduled_total",
        "timeouts_total",
        "dead_lettered_total",
        "outbox_relayed_total",
        "batch_splits_total",
        "db_retries_total",
    ];
    let before = b.counters().await;
    let mut rows = work.await?;
    let after = b.counters().await;
    if let (Some(before), Some(after)) = (before, after) {
        let moved: Vec<String> = WATCHED
            .iter()
            .filter_map(|name| {
                let key = format!("tasker_{name}");
                let d = after.get(&key)? - before.get(&key).copied().unwrap_or(0.0);
                (d > 0.0).then(|| format!("{name} +{d}"))
            })
            .collect();
        if !moved.is_empty() {
            for r in &mut rows {
                r.note(format!("orchestrator counters: {}", moved.join(", ")));
            }
        }
    }
    Ok(rows)
}

async fn one_row(work: impl std::future::Future<Output = Result<Row>>) -> Result<Vec<Row>> {
    Ok(vec![work.await?])
}

async fn one(rows: impl std::future::Future<Output = Result<Vec<Row>>>) -> Result<Row> {
    rows.await?
        .pop()
        .ok_or_else(|| anyhow::anyhow!("a workload produced no row"))
}

fn one_line(r: &Row) -> String {
    let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
    format!(
        "loadgen: {}: {} tasks, wall {:.2} s, {} {}, p50 {} p99 {} max {} ms, rss {} MB, cpu {} s{}{}",
        r.workload,
        r.tasks,
        r.wall_s,
        r.steps_per_s.map_or("-".to_owned(), |v| format!("{v:.0}")),
        r.rate_unit,
        f(r.p50_ms),
        f(r.p99_ms),
        f(r.max_ms),
        f(r.orchestrator_rss_mb),
        f(r.orchestrator_cpu_s),
        match r.target_met {
            Some(true) => format!(" [target {} ok]", r.target),
            Some(false) => format!(" [target {} MISSED]", r.target),
            None => String::new(),
        },
        if r.note.is_empty() {
            String::new()
        } else {
            format!(" ({})", r.note)
        },
    )
}

fn print_header(args: &Args, d: &Deployment, s: &Sizes, selected: &[Workload], run_id: &str) {
    let mut h = String::new();
    let mut line = |k: &str, v: String| h.push_str(&format!("{k:<22} {v}\n"));
    line("loadgen run", run_id.to_owned());
    line(
        "machine",
        format!(
            "{} CPUs, load average {}",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            load_average()
        ),
    );
    if cfg!(debug_assertions) {
        line(
            "build",
            "DEBUG (numbers are not representative; use --release)".into(),
        );
    } else {
        line("build", "release".into());
    }
    line(
        "workloads",
        format!(
            "{selected:?}{}",
            if args.smoke { " (smoke sizes)" } else { "" }
        ),
    );
    line("sizes", format!("{s:?}"));
    line(
        "statistics",
        if args.api_url.is_none() && !args.no_analyze {
            "ANALYZE before each task workload".to_owned()
        } else {
            "left to autovacuum".to_owned()
        },
    );
    if d.is_owned() {
        line(
            "orchestrator",
            format!(
                "child process pid {} (log {})",
                d.pid.map_or("?".into(), |p| p.to_string()),
                d.log_path().map_or("-".into(), |p| p.display().to_string())
            ),
        );
        line("database", d.database_name().unwrap_or("-").to_owned());
    } else {
        line(
            "orchestrator",
            format!(
                "external at {} (pid {})",
                d.api_url,
                d.pid.map_or("unknown".into(), |p| p.to_string())
            ),
        );
        line("database", deploy::redact(&d.database_url));
    }
    line("api", d.api_url.clone());
    line(
        "broker",
        format!("{} prefix {}", deploy::redact(&d.amqp_url), d.prefix),
    );
    for (k, v) in &d.settings {
        line("  setting", format!("{k}={v}"));
    }
    line(
        "workers",
        format!(
            "in-process, one per queue, concurrency {} (prefetch the same), no-op handler",
            args.worker_concurrency
        ),
    );
    eprint!("{h}");
}

/// `/proc/loadavg`: other work on the machine skews every figure.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}
