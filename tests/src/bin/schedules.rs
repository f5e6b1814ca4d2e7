//! `schedules`: the schedules harness. Two real orchestrator processes (`tasker serve`, same
//! database and prefix) run one schedule that fires every second (`* * * * * *`, 6 fields with
//! seconds) for `--duration-s` seconds; midway one of them is killed with SIGKILL (and, unless
//! `--no-restart`, started again after `--restart-after-ms`). Then the schedule is paused and
//! every whole second from its first tick to the pause is checked against the database:
//!
//! - `ticks`: the seconds that should have fired (first tick up to the pause minus 1.5 s, the
//!   allowed lateness plus a margin);
//! - `tasks_created`: tasks carrying the schedule's tick keys (`schedule:{id}:{tick}`);
//! - `duplicates`: tasks beyond one per tick (by key, and by tick record);
//! - `missed`: seconds that should have fired but have no task;
//! - `p99_lateness_ms`: the 99th percentile of a task's `created_at` (database clock) minus its
//!   tick.
//!
//! It prints one JSON line (`{"config": "schedules", ...}`) and exits non-zero unless
//! `duplicates == 0`, `missed == 0`, `tasks_created == ticks` and `p99_lateness_ms <= 1000`.
//!
//! ```text
//! . .tasker/env   # TASKER_TEST_DATABASE_URL (admin URL) and TASKER_TEST_AMQP_URL
//! cargo build -p tasker-orchestrator -p tasker-tests
//! target/debug/schedules                    # what CI runs (about 65 s)
//! target/debug/schedules --duration-s 20 --no-restart
//! ```

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use clap::Parser;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tasker_schemas::api::{CatchUp, CreateSchedule};
use tasker_tests::Harness;
use tasker_tests::tasker_worker::client::Client;

#[derive(Parser, Debug)]
#[command(
    name = "schedules",
    about = "Tasker schedules harness: an every-second schedule across two orchestrator processes, one killed midway"
)]
struct Args {
    /// How long the schedule runs (seconds).
    #[arg(long, default_value_t = 60)]
    duration_s: u64,
    /// When the first orchestrator is killed (seconds after the schedule starts; default: half
    /// the duration).
    #[arg(long)]
    kill_at_s: Option<u64>,
    /// Do not start the killed orchestrator again.
    #[arg(long)]
    no_restart: bool,
    /// How long after the kill it is started again (ms).
    #[arg(long, default_value_t = 2_000)]
    restart_after_ms: u64,
    /// Largest allowed p99 lateness (ms).
    #[arg(long, default_value_t = 1_000)]
    max_lateness_ms: i64,
    /// The `tasker` binary (default: next to this one).
    #[arg(long)]
    tasker_bin: Option<PathBuf>,
}

const TEMPLATE: &str = "namespace: sched
name: tick
version: 1
steps:
  - { name: noop, handler: noop }
";

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("[schedules] error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: &Args) -> Result<bool> {
    let bin = tasker_tests::find_tasker(args.tasker_bin.as_deref())?;
    let h = Harness::start().await?;
    let outcome = harness(args, &h, &bin).await;
    h.finish().await;
    let (report, pass) = outcome?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(pass)
}

async fn harness(args: &Args, h: &Harness, bin: &Path) -> Result<(serde_json::Value, bool)> {
    h.register_yaml(TEMPLATE).await?;
    // Only the two processes run schedules.
    h.take_orchestrator(0).stop().await;
    let env: Vec<(String, String)> = [
        ("TASKER_DATABASE_URL", h.database_url.as_str()),
        ("TASKER_AMQP_URL", h.services.amqp_url.as_str()),
        ("TASKER_PREFIX", h.prefix.as_str()),
        ("TASKER_SHUTDOWN_GRACE_MS", "3000"),
        ("TASKER_DB_POOL_SIZE", "4"),
        ("NO_COLOR", "1"),
        ("RUST_LOG", "warn,sqlx=error"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();
    let logs: Vec<PathBuf> = (0..2)
        .map(|i| std::env::temp_dir().join(format!("schedules-{}-orchestrator-{i}.log", h.prefix)))
        .collect();
    let mut procs = Vec::new();
    for log in &logs {
        procs.push(tasker_tests::spawn_serve(bin, &env, log).await?);
    }
    eprintln!(
        "[schedules] two orchestrators at {} and {} (logs {}, {}), prefix {}",
        procs[0].1,
        procs[1].1,
        logs[0].display(),
        logs[1].display(),
        h.prefix
    );
    let survivor = Client::new(&procs[1].1);
    let schedule = survivor
        .create_schedule(&CreateSchedule {
            namespace: "sched".into(),
            template: "tick".into(),
            name: Some("every_second".into()),
            cron: "* * * * * *".into(),
            timezone: "UTC".into(),
            context: json!({}),
            catch_up: CatchUp::All,
        })
        .await?;
    let first: DateTime<Utc> = schedule
        .next_tick
        .as_deref()
        .context("the schedule has no next tick")?
        .parse()?;
    let started = Instant::now();
    let duration = Duration::from_secs(args.duration_s);
    let kill_at = Duration::from_secs(args.kill_at_s.unwrap_or(args.duration_s / 2));

    // The kill lands 3 ms after a tick: the victim may be in the middle of firing it.
    let kill_instant =
        first + chrono::Duration::from_std(kill_at)? + chrono::Duration::milliseconds(3);
    if let Ok(wait) = (kill_instant - Utc::now()).to_std() {
        tokio::time::sleep(wait).await;
    }
    let (mut victim, _) = procs.remove(0);
    victim.kill().await?;
    let killed_at = started.elapsed();
    eprintln!("[schedules] killed orchestrator 0 (SIGKILL) at {killed_at:?}");
    let mut restarted = None;
    if !args.no_restart {
        tokio::time::sleep(Duration::from_millis(args.restart_after_ms)).await;
        restarted = Some(tasker_tests::spawn_serve(bin, &env, &logs[0]).await?);
        eprintln!(
            "[schedules] restarted orchestrator 0 at {:?}",
            started.elapsed()
        );
    }
    tokio::time::sleep(duration.saturating_sub(started.elapsed())).await;
    let paused = survivor.pause_schedule(schedule.id).await?;
    let paused_at: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(&h.db).await?;
    // Let a round that claimed before the pause commit.
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Every whole second from the first tick to the pause, less 1.5 s.
    let until = paused_at - chrono::Duration::milliseconds(1_500);
    let mut expected = Vec::new();
    let mut t = first;
    while t <= until {
        expected.push(t);
        t += chrono::Duration::seconds(1);
    }
    let rows: Vec<(DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT k.tick_at, t.created_at FROM schedule_ticks k JOIN tasks t ON t.id = k.task_id
         WHERE k.schedule_id = $1 ORDER BY k.tick_at",
    )
    .bind(schedule.id)
    .fetch_all(&h.db)
    .await?;
    let key_prefix = format!("schedule:{}:", schedule.id);
    let (tasks_created, distinct_keys): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT idempotency_key) FROM tasks
         WHERE starts_with(idempotency_key, $1)",
    )
    .bind(&key_prefix)
    .fetch_one(&h.db)
    .await?;
    let fired: std::collections::BTreeMap<DateTime<Utc>, DateTime<Utc>> =
        rows.iter().copied().collect();
    let missed = expected.iter().filter(|t| !fired.contains_key(t)).count();
    // Tasks beyond one per tick: by key, and tasks without a tick record of their own.
    let duplicates = (tasks_created - distinct_keys) + (distinct_keys - rows.len() as i64).max(0);
    let mut lateness: Vec<i64> = rows
        .iter()
        .filter(|(tick, _)| *tick <= until)
        .map(|(tick, created)| (*created - *tick).num_milliseconds())
        .collect();
    lateness.sort_unstable();
    let pct = |p: f64| -> i64 {
        if lateness.is_empty() {
            return i64::MAX;
        }
        let i = ((p * lateness.len() as f64).ceil() as usize).clamp(1, lateness.len()) - 1;
        lateness[i]
    };
    let p99 = pct(0.99);
    // The tasks created for ticks in the expected window (later ones fired before the pause).
    let in_window = rows.iter().filter(|(tick, _)| *tick <= until).count();
    let pass = duplicates == 0
        && missed == 0
        && in_window == expected.len()
        && !expected.is_empty()
        && p99 <= args.max_lateness_ms;
    let report = json!({
        "config": "schedules",
        "ticks": expected.len(),
        "tasks_created": in_window,
        "duplicates": duplicates,
        "missed": missed,
        "p99_lateness_ms": p99,
        "p50_lateness_ms": pct(0.5),
        "max_lateness_ms": lateness.last().copied().unwrap_or(i64::MAX),
        "tasks_total": tasks_created,
        "replicas": 2,
        "duration_s": args.duration_s,
        "killed_at_s": killed_at.as_secs_f64(),
        "restarted": restarted.is_some(),
        "paused": paused.paused,
        "pass": pass,
    });
    if let Some((mut child, _)) = restarted {
        tasker_tests::stop_child(&mut child, Duration::from_secs(10)).await;
    }
    for (mut child, _) in procs {
        tasker_tests::stop_child(&mut child, Duration::from_secs(10)).await;
    }
    if !pass {
        eprintln!(
            "[schedules] FAIL: {missed} missed, {duplicates} duplicates, {in_window}/{} ticks with a task, p99 lateness {p99} ms",
            expected.len()
        );
    }
    Ok((report, pass))
}
