//! `chaos-worker`: the worker process the fault-injection harness (`chaos`) starts and kills.
//!
//! It consumes the `default` step queue of `TASKER_PREFIX` on `TASKER_AMQP_URL` and runs one
//! handler, `chaos`, for every step: sleep a few random milliseconds, append one line
//! `task_id step attempt worker_pid outcome` to `<record-dir>/exec-<pid>.log` (one `write` per
//! line on a file opened with `O_APPEND`, so a SIGKILL never leaves a half line or loses a written
//! one), then return `{"ok": true}`. The harness counts these lines per (task, step) to report
//! duplicate executions, which at-least-once delivery allows.
//!
//! With `--fail-rate P` a run fails on purpose (retryable) with probability P.

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::json;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tasker_worker::{StepContext, StepError, Worker};

#[derive(Parser)]
#[command(
    name = "chaos-worker",
    about = "Worker process for the Tasker fault-injection harness"
)]
struct Args {
    /// RabbitMQ URL.
    #[arg(long, env = "TASKER_AMQP_URL")]
    amqp_url: String,
    /// Exchange and queue name prefix.
    #[arg(long, env = "TASKER_PREFIX")]
    prefix: String,
    /// Directory of the execution records (`exec-<pid>.log`).
    #[arg(long)]
    record_dir: PathBuf,
    /// Steps run at once (also the prefetch).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Each run sleeps a random time in [0, this] milliseconds.
    #[arg(long, default_value_t = 10)]
    sleep_ms_max: u64,
    /// Probability that a run fails (retryable) on purpose.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Name reported with results (default chaos-worker-<pid>).
    #[arg(long)]
    name: Option<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let pid = std::process::id();
    std::fs::create_dir_all(&args.record_dir)
        .with_context(|| format!("cannot create {}", args.record_dir.display()))?;
    let path = args.record_dir.join(format!("exec-{pid}.log"));
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let record = Arc::new(Mutex::new(file));
    let sleep_max = args.sleep_ms_max;
    let fail_rate = args.fail_rate;

    let worker = Worker::builder(args.amqp_url)
        .prefix(args.prefix)
        .queue("default")
        .concurrency(args.concurrency)
        .grace_period(Duration::from_secs(2))
        .name(args.name.unwrap_or_else(|| format!("chaos-worker-{pid}")))
        .handler_fn("chaos", move |ctx: StepContext| {
            let record = Arc::clone(&record);
            async move {
                if sleep_max > 0 {
                    let ms = rand::random_range(0..=sleep_max);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                let fail = fail_rate > 0.0 && rand::random::<f64>() < fail_rate;
                let line = format!(
                    "{} {} {} {} {}\n",
                    ctx.task_id(),
                    ctx.step(),
                    ctx.attempt(),
                    pid,
                    if fail { "err" } else { "ok" }
                );
                write_record(&record, &line).map_err(|e| {
                    StepError::retryable(format!("cannot record the execution: {e}"))
                })?;
                if fail {
                    return Err(StepError::retryable("failing on purpose (--fail-rate)"));
                }
                Ok(json!({ "ok": true }))
            }
        })
        .build();
    tracing::info!(record = %path.display(), "chaos worker starting");
    worker.run_until_signal().await?;
    Ok(())
}

/// One `write` per line: with `O_APPEND` the line lands whole, and once `write` returned it is in
/// the kernel's page cache, which a SIGKILL of this process does not lose.
fn write_record(file: &Mutex<File>, line: &str) -> std::io::Result<()> {
    let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
    f.write_all(line.as_bytes())
}
