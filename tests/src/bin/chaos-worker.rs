//! `chaos-worker`: the worker process the fault-injection harness (`chaos`) starts and kills.
//!
//! It consumes the `default` step queue of `TASKER_PREFIX` on `TASKER_AMQP_URL`. Every run of
//! every handler sleeps a few random milliseconds, appends one line `task_id step attempt
//! worker_pid outcome` to `<record-dir>/exec-<pid>.log` (one `write` per line on a file opened
//! with `O_APPEND`, so a SIGKILL never leaves a half line or loses a written one), then returns.
//! `step` is the step's name, `name[index]` for an instance of a mapped step. The harness counts
//! these lines per (task, step) to report duplicate executions, which at-least-once delivery
//! allows. Handlers:
//!
//! - `chaos`: returns `{"ok": true}`; an instance of a mapped step returns `{"ok": true,
//!   "index": i, "item": <its element>}` and fails for good if its element is not [`item`]`(i)`
//!   (the harness checks the mapped step's output against the same function);
//! - `chaos_items` (the root of the `map` workflow): returns `{"items": [item(0) ..
//!   item(n-1)]}`, `n` from the task's context (`"items"`);
//! - `chaos_route` (the decision step of the `decision` workflow): chooses the branch the task's
//!   context names (`"route"`) and returns `{"ok": true, "chose": <branch>}`;
//! - `chaos_echo` (steps of the `child` workflow, parent and child task alike): returns `{"ok":
//!   true, "context": <the task's context>}`, so that what reaches a child task (its context,
//!   mapped from the parent's step output) comes back in its output, which the harness checks.
//!
//! With `--fail-rate P` a run fails on purpose (retryable) with probability P.

use anyhow::{Context, Result};
use clap::Parser;
use serde_json::{Value, json};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tasker_worker::{Decision, StepContext, StepError, Worker};

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
    /// The namespace whose `default` queue it consumes.
    #[arg(long, env = "TASKER_NAMESPACE", default_value = "chaos")]
    namespace: String,
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
    let run = Run {
        record: Arc::new(Mutex::new(file)),
        pid,
        sleep_max: args.sleep_ms_max,
        fail_rate: args.fail_rate,
    };
    let (chaos, items, route, echo) = (run.clone(), run.clone(), run.clone(), run);
    let worker = Worker::builder(args.amqp_url)
        .prefix(args.prefix)
        .namespace(args.namespace)
        .queue("default")
        .concurrency(args.concurrency)
        .grace_period(Duration::from_secs(2))
        .name(args.name.unwrap_or_else(|| format!("chaos-worker-{pid}")))
        .handler_fn("chaos", move |ctx: StepContext| {
            let run = chaos.clone();
            async move {
                let Some(i) = ctx.index() else {
                    run.execute(&ctx).await?;
                    return Ok(json!({ "ok": true }));
                };
                let got = ctx.item().cloned().unwrap_or(Value::Null);
                if got != item(i as usize) {
                    return Err(StepError::permanent(format!(
                        "instance {i} got element {got}, expected {}",
                        item(i as usize)
                    )));
                }
                run.execute(&ctx).await?;
                Ok(json!({ "ok": true, "index": i, "item": got }))
            }
        })
        .handler_fn("chaos_items", move |ctx: StepContext| {
            let run = items.clone();
            async move {
                run.execute(&ctx).await?;
                let n = ctx.context()["items"].as_u64().ok_or_else(|| {
                    StepError::permanent("the task's context has no \"items\" count")
                })?;
                Ok(json!({ "items": (0..n as usize).map(item).collect::<Vec<_>>() }))
            }
        })
        .handler_fn("chaos_echo", move |ctx: StepContext| {
            let run = echo.clone();
            async move {
                run.execute(&ctx).await?;
                Ok(json!({ "ok": true, "context": ctx.context() }))
            }
        })
        .decision_fn("chaos_route", move |ctx: StepContext| {
            let run = route.clone();
            async move {
                run.execute(&ctx).await?;
                let branch = ctx.context()["route"]
                    .as_str()
                    .ok_or_else(|| StepError::permanent("the task's context has no \"route\""))?
                    .to_owned();
                Ok(Decision::choose([branch.clone()])
                    .output(json!({ "ok": true, "chose": branch })))
            }
        })
        .build();
    tracing::info!(record = %path.display(), "chaos worker starting");
    worker.run_until_signal().await?;
    Ok(())
}

/// Element `i` of the array the `map` workflow maps over (the harness checks outputs against it).
fn item(i: usize) -> Value {
    json!(format!("e{i}"))
}

/// What every handler run does before its own work.
#[derive(Clone)]
struct Run {
    record: Arc<Mutex<File>>,
    pid: u32,
    sleep_max: u64,
    fail_rate: f64,
}

impl Run {
    /// Sleeps, records the execution, and fails on purpose (retryable) at `--fail-rate`.
    async fn execute(&self, ctx: &StepContext) -> Result<(), StepError> {
        if self.sleep_max > 0 {
            let ms = rand::random_range(0..=self.sleep_max);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let fail = self.fail_rate > 0.0 && rand::random::<f64>() < self.fail_rate;
        let step = match ctx.index() {
            Some(i) => format!("{}[{i}]", ctx.step()),
            None => ctx.step().to_owned(),
        };
        let line = format!(
            "{} {step} {} {} {}\n",
            ctx.task_id(),
            ctx.attempt(),
            self.pid,
            if fail { "err" } else { "ok" }
        );
        write_record(&self.record, &line)
            .map_err(|e| StepError::retryable(format!("cannot record the execution: {e}")))?;
        if fail {
            return Err(StepError::retryable("failing on purpose (--fail-rate)"));
        }
        Ok(())
    }
}

/// One `write` per line: with `O_APPEND` the line lands whole, and once `write` returned it is in
/// the kernel's page cache, which a SIGKILL of this process does not lose.
fn write_record(file: &Mutex<File>, line: &str) -> std::io::Result<()> {
    let mut f = file.lock().unwrap_or_else(|p| p.into_inner());
    f.write_all(line.as_bytes())
}
