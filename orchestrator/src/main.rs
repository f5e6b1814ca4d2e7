//! `tasker`: run the orchestrator, migrate, and talk to a running one over HTTP.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;
use tasker_client::{Client, ListTasks};
use tasker_orchestrator::{App, Config, startup};
use tasker_schemas::api::{SubmitTask, TaskView};
use tasker_schemas::{StepState, TaskId, TaskState};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "tasker",
    version,
    about = "Tasker: DAG workflows on PostgreSQL and RabbitMQ"
)]
struct Cli {
    /// Orchestrator HTTP API, for the client commands.
    #[arg(
        long,
        global = true,
        env = "TASKER_API_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    api_url: String,
    /// Bearer token for the HTTP API.
    #[arg(long, global = true, env = "TASKER_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the orchestrator (config: --config file, then TASKER_* variables).
    Serve {
        #[arg(long, env = "TASKER_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Apply database migrations and exit.
    Migrate {
        #[arg(long, env = "TASKER_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Templates: register or list.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Submit a task; prints its id (and, with --wait, the finished task).
    Submit {
        namespace: String,
        template: String,
        /// Task context as JSON.
        #[arg(long, default_value = "{}")]
        context: String,
        #[arg(long)]
        version: Option<u32>,
        #[arg(long)]
        idempotency_key: Option<String>,
        #[arg(long, default_value_t = 0)]
        priority: i16,
        /// Wait for the task to finish and print it.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Show a task with its steps and attempts.
    Show {
        id: TaskId,
        /// Wait for the task to finish first.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a running task: nothing new is dispatched; running steps may still report.
    Cancel {
        id: TaskId,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Retry a failed or cancelled task: its failed, skipped and cancelled steps run again.
    Retry {
        id: TaskId,
        /// Wait for the task to finish and print it.
        #[arg(long)]
        wait: bool,
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// List tasks, newest first.
    List {
        #[arg(long)]
        namespace: Option<String>,
        /// Only tasks in this state (pending, running, completed, failed, cancelled).
        #[arg(long)]
        state: Option<TaskState>,
        #[arg(long)]
        template: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TemplateCommand {
    /// Register template files (YAML or JSON).
    Register { files: Vec<PathBuf> },
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let client = || {
        let c = Client::new(cli.api_url.trim_end_matches('/'));
        match &cli.api_key {
            Some(k) => c.with_api_key(k.clone()),
            None => c,
        }
    };
    match &cli.command {
        Command::Serve { config } => {
            let config = Config::load(config.as_deref())?;
            let app = App::build(config).await?;
            tracing::info!(addr = %app.http_addr(), "HTTP API listening");
            let shutdown = CancellationToken::new();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                stop.cancel();
            });
            app.run_until_stopped(shutdown).await?;
        }
        Command::Migrate { config } => {
            let config = Config::load(config.as_deref())?;
            let db = startup::connect_db(&config.database_url, 2).await?;
            startup::migrate(&db).await?;
            println!("migrations applied");
        }
        Command::Template(TemplateCommand::Register { files }) => {
            if files.is_empty() {
                bail!("give at least one template file");
            }
            let client = client();
            for path in files {
                let template = tasker_orchestrator::service::templates::read_template_file(path)
                    .map_err(anyhow::Error::msg)?;
                template
                    .validate()
                    .with_context(|| format!("{} is not a valid template", path.display()))?;
                let r = client.register_template(&template).await?;
                println!(
                    "{}/{} version {}: {}",
                    r.namespace,
                    r.name,
                    r.version,
                    if r.created {
                        "registered"
                    } else {
                        "already registered (unchanged)"
                    }
                );
            }
        }
        Command::Submit {
            namespace,
            template,
            context,
            version,
            idempotency_key,
            priority,
            wait,
            timeout,
        } => {
            let context: serde_json::Value =
                serde_json::from_str(context).context("--context must be valid JSON")?;
            let client = client();
            let r = client
                .submit(&SubmitTask {
                    namespace: namespace.clone(),
                    template: template.clone(),
                    version: *version,
                    context,
                    idempotency_key: idempotency_key.clone(),
                    priority: *priority,
                    task_id: None,
                })
                .await?;
            println!("{}", r.task_id);
            if *wait {
                let task = client
                    .wait(r.task_id, Duration::from_secs(*timeout))
                    .await?;
                print_task(&task);
                if task.state != TaskState::Completed {
                    std::process::exit(1);
                }
            }
        }
        Command::Show {
            id,
            wait,
            timeout,
            json,
        } => {
            let client = client();
            let task = if *wait {
                client.wait(*id, Duration::from_secs(*timeout)).await?
            } else {
                client.task(*id).await?
            };
            if *json {
                println!("{}", serde_json::to_string_pretty(&task)?);
            } else {
                print_task(&task);
            }
            if *wait && task.state != TaskState::Completed {
                std::process::exit(1);
            }
        }
        Command::Cancel { id, reason } => {
            let task = client().cancel(*id, reason.as_deref()).await?;
            print_task(&task);
        }
        Command::Retry { id, wait, timeout } => {
            let client = client();
            let mut task = client.retry(*id).await?;
            if *wait {
                task = client.wait(*id, Duration::from_secs(*timeout)).await?;
            }
            print_task(&task);
            if *wait && task.state != TaskState::Completed {
                std::process::exit(1);
            }
        }
        Command::List {
            namespace,
            state,
            template,
            limit,
            json,
        } => {
            let filter = ListTasks {
                namespace: namespace.clone(),
                state: *state,
                template: template.clone(),
                limit: Some(*limit),
                ..Default::default()
            };
            let page = client().list(&filter).await?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&page)?);
            } else {
                println!(
                    "{:<38} {:<12} {:<28} {:<10} CREATED",
                    "TASK", "NAMESPACE", "TEMPLATE", "STATE"
                );
                for t in &page.tasks {
                    println!(
                        "{:<38} {:<12} {:<28} {:<10} {}",
                        t.id,
                        t.namespace,
                        format!("{} v{}", t.template, t.template_version),
                        t.state,
                        t.created_at
                    );
                }
                if let Some(next) = page.next {
                    println!("(more: --after {next})");
                }
            }
        }
    }
    Ok(())
}

fn print_task(t: &TaskView) {
    println!("task      {}", t.id);
    println!(
        "template  {}/{} v{}",
        t.namespace, t.template, t.template_version
    );
    println!("state     {}", t.state);
    println!("created   {}", t.created_at);
    if let Some(f) = &t.finished_at {
        println!("finished  {f}");
    }
    println!();
    println!(
        "{:<20} {:<11} {:>7}  {:<40}",
        "STEP", "STATE", "ATTEMPT", "OUTPUT / ERROR / WHY WAITING"
    );
    for s in &t.steps {
        let detail = match (&s.output, &s.error, &s.waiting_reason) {
            (Some(o), _, _) if s.state == StepState::Succeeded => o.to_string(),
            (_, Some(e), _) => e.clone(),
            (_, _, Some(w)) => w.clone(),
            _ => String::new(),
        };
        println!(
            "{:<20} {:<11} {:>7}  {}",
            s.name, s.state, s.attempt, detail
        );
    }
    if !t.events.is_empty() {
        println!();
        for e in &t.events {
            println!("event {:>3}  {}  {}", e.seq, e.at, e.kind);
        }
    }
    println!();
    match (&t.output, &t.error) {
        (Some(o), _) => println!(
            "result    {}",
            serde_json::to_string_pretty(o).unwrap_or_default()
        ),
        (_, Some(e)) => println!("error     {e}"),
        _ => {}
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await.unwrap_or(());
}
