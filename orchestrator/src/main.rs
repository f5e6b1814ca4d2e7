//! `tasker`: run the orchestrator, migrate, and talk to a running one over HTTP.

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tasker_client::{Client, ListTasks};
use tasker_orchestrator::{App, Config, startup};
use tasker_schemas::api::{MAX_TASK_PAGE, SubmitTask, TaskView};
use tasker_schemas::{StepState, TaskId, TaskState};
use tokio_util::sync::CancellationToken;

mod cli_ops;

#[derive(Parser)]
#[command(
    name = "tasker",
    version,
    about = "Tasker: DAG workflows on PostgreSQL and RabbitMQ"
)]
struct Cli {
    /// Orchestrator HTTP API, for the client commands (http:// or https://).
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
    /// PEM file of CA certificates to trust for an https:// API URL, on top of the system's (for
    /// a private CA).
    #[arg(long, global = true, env = "TASKER_CA_CERT", value_name = "PEM_FILE")]
    ca_cert: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the orchestrator (config: --config file, then TASKER_* variables).
    #[command(after_long_help = tasker_orchestrator::config::settings_help())]
    Serve {
        /// YAML config file; its keys are the settings below in lower case (TASKER_* variables
        /// override it).
        #[arg(long, env = "TASKER_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Apply database migrations and exit (creates the database when it is missing and the user
    /// may).
    Migrate {
        /// YAML config file (only database_url is used; TASKER_DATABASE_URL overrides it).
        #[arg(long, env = "TASKER_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Templates: register template files, list the registered ones.
    #[command(subcommand)]
    Template(TemplateCommand),
    /// Schedules: a task of a template at each tick of a cron expression in a time zone.
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// Print (or with --apply run) the rabbitmqctl lines that create the broker user of a
    /// namespace: it may consume only that namespace's step queues and publish only its results
    /// and task requests (broker identity; docs/operations.md).
    BrokerPermissions {
        /// The namespace (e.g. shop).
        #[arg(long)]
        namespace: String,
        /// Exchange and queue name prefix of the deployment.
        #[arg(long, env = "TASKER_PREFIX", default_value = "tasker")]
        prefix: String,
        /// The user naming rule ({namespace} is replaced), as the orchestrator's setting.
        #[arg(
            long,
            env = "TASKER_BROKER_USER_FORMAT",
            default_value = "tasker-{namespace}"
        )]
        user_format: String,
        /// RabbitMQ virtual host.
        #[arg(long, default_value = "/")]
        vhost: String,
        /// Environment variable holding the new user's password (never printed); with --apply
        /// and the variable unset, the password is asked for on the terminal.
        #[arg(long, default_value = "TASKER_BROKER_PASSWORD")]
        password_env: String,
        /// Run the lines with rabbitmqctl instead of printing them.
        #[arg(long)]
        apply: bool,
        /// The rabbitmqctl command (split on spaces), for --apply.
        #[arg(long, env = "TASKER_RABBITMQCTL", default_value = "rabbitmqctl")]
        rabbitmqctl: String,
    },
    /// List the live workers (the worker registry): queues, handlers, load, last seen.
    Workers {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Submit a task; prints its id (and, with --wait, the finished task).
    Submit {
        /// Namespace of the template (e.g. shop).
        namespace: String,
        /// Template name (e.g. order_fulfilment).
        template: String,
        /// Task context as JSON.
        #[arg(long, default_value = "{}")]
        context: String,
        /// Template version (default: the newest registered).
        #[arg(long)]
        version: Option<u32>,
        /// Submitting the same body again with this key returns the existing task.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Higher runs first when a queue is at its in-flight limit.
        #[arg(long, default_value_t = 0)]
        priority: i16,
        /// Delayed start at an RFC 3339 time (the task is `pending` until then).
        #[arg(long, conflicts_with = "delay")]
        run_at: Option<String>,
        /// Delayed start after a duration (e.g. 10m, 30s, 1h).
        #[arg(long)]
        delay: Option<String>,
        /// Cancel the task if still live this long after it started (e.g. 1h).
        #[arg(long)]
        deadline: Option<String>,
        /// Wait for the task to finish and print it (exit status 1 unless it completed).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// Send a signal to a task (what its `wait_for` steps wait for).
    Signal {
        /// Task id.
        #[arg(value_name = "TASK_ID")]
        task: TaskId,
        /// The signal's name (e.g. approval).
        name: String,
        /// The signal id: sending the same id again is a no-op (default: a fresh one).
        #[arg(long = "id", value_name = "ID")]
        signal_id: Option<String>,
        /// The payload as JSON (the output of the step that takes it).
        #[arg(long, default_value = "null")]
        payload: String,
    },
    /// Show a task with its steps and their failed attempts.
    Show {
        /// Task id (as printed by submit or list).
        id: TaskId,
        /// Wait for the task to finish first (exit status 1 unless it completed).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Print JSON instead of a table (every attempt, untruncated).
        #[arg(long)]
        json: bool,
    },
    /// List the instances of a mapped step, in index order (state, attempt, output or error).
    Instances {
        /// Task id.
        id: TaskId,
        /// The mapped step's name.
        step: String,
        /// Start after this index (as printed on the last row of the previous page).
        #[arg(long)]
        after: Option<u32>,
        /// Most instances to print (at most 500).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a running task: nothing new is dispatched; running steps may still report.
    Cancel {
        /// Task id.
        id: TaskId,
        /// Why, recorded in the task's history.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Retry a failed or cancelled task: its failed, skipped and cancelled steps run again.
    Retry {
        /// Task id.
        id: TaskId,
        /// Wait for the task to finish and print it (exit status 1 unless it completed).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
    /// List tasks, newest first.
    List {
        /// Only tasks of this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Only tasks in this state (pending, running, completed, failed, cancelled).
        #[arg(long)]
        state: Option<TaskState>,
        /// Only tasks of this template (name).
        #[arg(long)]
        template: Option<String>,
        /// Most tasks to print (1 to 500).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_TASK_PAGE)))]
        limit: u32,
        /// Start after this task (the id the previous page printed as `--after`).
        #[arg(long, value_name = "TASK_ID")]
        after: Option<TaskId>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// API keys: create (the key is printed once), list, revoke (role admin).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The audit log: who cancelled, retried, purged, registered templates, changed keys.
    Audit {
        /// Only entries about this task.
        #[arg(long, value_name = "TASK_ID")]
        task: Option<TaskId>,
        /// Only entries of this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Only this action (e.g. task.cancel, key.create).
        #[arg(long)]
        action: Option<String>,
        /// Most entries to print (1 to 500).
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Erase a finished task's context and outputs, keeping its states and history (role admin).
    Purge {
        /// Task id.
        id: TaskId,
    },
    /// Per-namespace settings: list them, or set a namespace's retention.
    #[command(subcommand)]
    Namespaces(NamespacesCommand),
    /// Retry one failed step of a task (role operate); the task runs again if it had failed.
    RetryStep {
        /// Task id.
        id: TaskId,
        /// Step name.
        step: String,
    },
    /// Rerun a task from a step: it and every step that depends on it run again from scratch.
    Rerun {
        /// Task id.
        id: TaskId,
        /// Step name.
        step: String,
    },
    /// Mark a failed step succeeded with an output; the steps after it proceed.
    MarkSucceeded {
        /// Task id.
        id: TaskId,
        /// Step name.
        step: String,
        /// The step's output (JSON).
        #[arg(long, default_value = "null")]
        output: String,
    },
    /// Cancel or retry every task a filter matches (the count is shown first).
    #[command(subcommand)]
    Bulk(cli_ops::BulkCommand),
    /// Dead letters: list, show, replay, discard.
    #[command(subcommand)]
    DeadLetters(cli_ops::DeadLetterCommand),
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key; prints it once (it is stored hashed and cannot be shown again).
    Create {
        /// A namespace the key may act in (repeat for several); `*` for every namespace.
        #[arg(long = "namespace", required = true, value_name = "NAMESPACE")]
        namespaces: Vec<String>,
        /// read, submit, operate or admin (each includes the ones before).
        #[arg(long)]
        role: String,
        /// A label, shown in listings and the audit log.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List the keys (ids, names, roles, namespaces; never the keys themselves).
    List {
        /// Include revoked keys.
        #[arg(long)]
        revoked: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key: it is refused from then on.
    Revoke {
        /// The key's id (from `tasker keys list`).
        id: uuid::Uuid,
    },
}

#[derive(Subcommand)]
enum NamespacesCommand {
    /// List the namespaces that have settings.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Set how long a namespace's finished tasks are kept (overrides TASKER_RETENTION_MS).
    SetRetention {
        /// Namespace.
        namespace: String,
        /// A duration: 500ms, 30s, 10m, 12h, 30d; `default` clears the override.
        retention: String,
    },
}

#[derive(Subcommand)]
enum TemplateCommand {
    /// Register template files (YAML or JSON).
    Register {
        /// Template files (YAML or JSON), registered in the order given.
        files: Vec<PathBuf>,
    },
    /// List the registered templates, every version (namespace, name, version, steps).
    List {
        /// Only templates of this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ScheduleCommand {
    /// Create a schedule; prints it with its next five runs.
    Create {
        /// NAMESPACE/TEMPLATE (e.g. shop/nightly_report).
        template: String,
        /// Cron expression: 5 fields (minute hour day-of-month month day-of-week), or 6 with
        /// seconds first.
        #[arg(long)]
        cron: String,
        /// IANA time zone the expression is read in (e.g. Europe/Paris).
        #[arg(long, default_value = "UTC")]
        timezone: String,
        /// Context of every task it creates, as JSON.
        #[arg(long, default_value = "{}")]
        context: String,
        /// Ticks missed while no orchestrator ran: skip (none), latest (the newest), all (up to
        /// 100, the newest).
        #[arg(long, default_value = "skip")]
        catch_up: tasker_schemas::api::CatchUp,
        /// Unique within the namespace (default: the template's name).
        #[arg(long)]
        name: Option<String>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List schedules (namespace, name, cron, time zone, next tick, paused).
    List {
        /// Only schedules of this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show a schedule with its next five runs.
    Show {
        /// Schedule id (as printed by create or list).
        id: uuid::Uuid,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Pause a schedule: no tick fires until it is resumed.
    Pause {
        /// Schedule id.
        id: uuid::Uuid,
    },
    /// Resume a paused schedule from its next tick (the ticks of the pause do not fire).
    Resume {
        /// Schedule id.
        id: uuid::Uuid,
    },
    /// Delete a schedule (the tasks it created stay).
    Delete {
        /// Schedule id.
        id: uuid::Uuid,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| "info,sqlx=warn".into())
    };
    // TASKER_LOG_FORMAT=json: one JSON object per line (time, level, target, message, the
    // event's fields — task_id, step_id, ... — and those of its spans).
    match std::env::var("TASKER_LOG_FORMAT").as_deref() {
        Ok("json") => tracing_subscriber::fmt()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .init(),
        Ok("text") | Err(_) => tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .init(),
        Ok(other) => {
            let _ = writeln!(
                io::stderr(),
                "Error: TASKER_LOG_FORMAT={other:?} is not a log format: text (the default) or json"
            );
            return ExitCode::FAILURE;
        }
    }
    let cli = Cli::parse();
    match run(&cli, &mut io::stdout()).await {
        Ok(code) => code,
        // The reader went away (`tasker list | head`): nothing more to say to anyone.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // The causes on one line, and no backtrace even with RUST_BACKTRACE set: these are
            // the user's errors, not the program's.
            let _ = writeln!(io::stderr(), "Error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// True when the error is a write to a closed pipe (stdout's reader exited).
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|io| io.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// Runs one command, writing what it prints to `out`. A failed write ends it with that error.
async fn run(cli: &Cli, out: &mut impl Write) -> Result<ExitCode> {
    let client = || -> Result<Client> {
        let mut builder = Client::builder(cli.api_url.trim_end_matches('/'));
        if let Some(key) = &cli.api_key {
            builder = builder.api_key(key.clone());
        }
        if let Some(ca) = &cli.ca_cert {
            builder = builder.ca_cert(ca.clone());
        }
        builder.build().context("--ca-cert (TASKER_CA_CERT)")
    };
    // Exit status of the commands that wait: 1 unless the task completed.
    let finished = |task: &TaskView| {
        if task.state == TaskState::Completed {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    };
    match &cli.command {
        Command::Serve { config } => {
            let config = Config::load(config.as_deref())?;
            let database_url = config.database_url.clone();
            let app = App::build(config)
                .await
                .map_err(|e| explain_startup(e, &database_url))?;
            tracing::info!(url = %app.http_url(), "HTTP API listening");
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
            let db = startup::connect_db(&config.database_url, 2)
                .await
                .map_err(|e| explain_startup(e, &config.database_url))?;
            startup::migrate(&db).await?;
            writeln!(out, "migrations applied")?;
        }
        Command::Template(TemplateCommand::Register { files }) => {
            if files.is_empty() {
                bail!("give at least one template file");
            }
            let client = client()?;
            for path in files {
                let template = tasker_orchestrator::service::templates::read_template_file(path)
                    .map_err(anyhow::Error::msg)?;
                template
                    .validate()
                    .with_context(|| format!("{} is not a valid template", path.display()))?;
                let r = client
                    .register_template(&template)
                    .await
                    .with_context(|| format!("cannot register {}", path.display()))?;
                writeln!(
                    out,
                    "{}/{} version {}: {}",
                    r.namespace,
                    r.name,
                    r.version,
                    if r.created {
                        "registered"
                    } else {
                        "already registered (unchanged)"
                    }
                )?;
            }
        }
        Command::Schedule(cmd) => return schedule_command(&client()?, cmd, out).await,
        Command::Keys(KeysCommand::Create {
            namespaces,
            role,
            name,
        }) => {
            let created = client()?
                .create_key(&tasker_schemas::api::CreateKey {
                    name: name.clone(),
                    role: role.clone(),
                    namespaces: namespaces.clone(),
                })
                .await?;
            writeln!(out, "{}", created.token)?;
            writeln!(
                io::stderr(),
                "key {} ({} in {}): shown once, store it now",
                created.key.id,
                created.key.role,
                created.key.namespaces.join(",")
            )?;
        }
        Command::Keys(KeysCommand::List { revoked, json }) => {
            let list = client()?.keys(*revoked).await?;
            if *json {
                writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .keys
                    .iter()
                    .map(|k| {
                        vec![
                            k.id.to_string(),
                            k.name.clone(),
                            k.role.clone(),
                            k.namespaces.join(","),
                            k.created_by.clone(),
                            k.created_at.clone(),
                            k.revoked_at.clone().unwrap_or_default(),
                        ]
                    })
                    .collect();
                write_table(
                    out,
                    &[
                        "ID",
                        "NAME",
                        "ROLE",
                        "NAMESPACES",
                        "CREATED BY",
                        "CREATED",
                        "REVOKED",
                    ],
                    &[],
                    &rows,
                )?;
            }
        }
        Command::Keys(KeysCommand::Revoke { id }) => {
            let k = client()?.revoke_key(*id).await?;
            writeln!(out, "revoked key {} ({})", k.id, k.role)?;
        }
        Command::Audit {
            task,
            namespace,
            action,
            limit,
            json,
        } => {
            let list = client()?
                .audit(&tasker_client::AuditQuery {
                    task_id: *task,
                    namespace: namespace.clone(),
                    action: action.clone(),
                    before: None,
                    limit: Some(*limit),
                })
                .await?;
            if *json {
                writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .entries
                    .iter()
                    .map(|e| {
                        vec![
                            e.at.clone(),
                            e.actor.clone(),
                            e.action.clone(),
                            e.namespace.clone().unwrap_or_default(),
                            e.task_id.map(|t| t.to_string()).unwrap_or_default(),
                            one_line(&e.detail.to_string(), 60),
                        ]
                    })
                    .collect();
                write_table(
                    out,
                    &["AT", "ACTOR", "ACTION", "NAMESPACE", "TASK", "DETAIL"],
                    &[],
                    &rows,
                )?;
            }
        }
        Command::Purge { id } => {
            let task = client()?.purge(*id).await?;
            writeln!(
                out,
                "purged task {} ({}): context and outputs erased at {}",
                task.id,
                task.state,
                task.purged_at.as_deref().unwrap_or("?")
            )?;
        }
        Command::Namespaces(NamespacesCommand::List { json }) => {
            let list = client()?.namespaces().await?;
            if *json {
                writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .namespaces
                    .iter()
                    .map(|n| {
                        vec![
                            n.namespace.clone(),
                            n.retention_ms
                                .map_or("default".into(), |ms| format!("{ms} ms")),
                            n.updated_at.clone(),
                        ]
                    })
                    .collect();
                write_table(out, &["NAMESPACE", "RETENTION", "UPDATED"], &[], &rows)?;
            }
        }
        Command::Namespaces(NamespacesCommand::SetRetention {
            namespace,
            retention,
        }) => {
            let ms = if retention == "default" {
                None
            } else if let Some(days) = retention.strip_suffix('d') {
                let days: u64 = days
                    .parse()
                    .with_context(|| format!("retention {retention:?}: expected e.g. 30d"))?;
                Some(days.saturating_mul(24 * 3600 * 1000))
            } else {
                Some(
                    tasker_schemas::template::parse_duration(retention)
                        .map_err(|e| anyhow::anyhow!("retention: {e}"))?
                        .0,
                )
            };
            let n = client()?.set_retention(namespace, ms).await?;
            writeln!(
                out,
                "{}: retention {}",
                n.namespace,
                n.retention_ms
                    .map_or("default".into(), |ms| format!("{ms} ms"))
            )?;
        }
        Command::BrokerPermissions {
            namespace,
            prefix,
            user_format,
            vhost,
            password_env,
            apply,
            rabbitmqctl,
        } => {
            broker_permissions(
                out,
                &BrokerPermissions {
                    namespace,
                    prefix,
                    user_format,
                    vhost,
                    password_env,
                    apply: *apply,
                    rabbitmqctl,
                },
            )?;
        }
        Command::Workers { json } => {
            let list = client()?.workers().await?;
            if *json {
                writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .workers
                    .iter()
                    .map(|w| {
                        vec![
                            w.name.clone(),
                            w.host.clone(),
                            format!("{} {}", w.sdk, w.sdk_version),
                            w.queues.join(","),
                            one_line(&w.handlers.join(","), 60),
                            format!("{}/{}", w.in_flight, w.concurrency),
                            w.last_seen.clone(),
                        ]
                    })
                    .collect();
                write_table(
                    out,
                    &[
                        "WORKER",
                        "HOST",
                        "SDK",
                        "QUEUES",
                        "HANDLERS",
                        "BUSY",
                        "LAST SEEN",
                    ],
                    &[],
                    &rows,
                )?;
            }
        }
        Command::Template(TemplateCommand::List { namespace, json }) => {
            let templates = client()?.templates(namespace.as_deref()).await?;
            if *json {
                writeln!(out, "{}", serde_json::to_string_pretty(&templates)?)?;
            } else {
                let rows: Vec<Vec<String>> = templates
                    .iter()
                    .map(|t| {
                        vec![
                            t.namespace.clone(),
                            t.name.clone(),
                            t.version.to_string(),
                            t.steps.to_string(),
                            t.created_at.clone(),
                            one_line(t.description.as_deref().unwrap_or(""), 80),
                        ]
                    })
                    .collect();
                write_table(
                    out,
                    &[
                        "NAMESPACE",
                        "NAME",
                        "VERSION",
                        "STEPS",
                        "CREATED",
                        "DESCRIPTION",
                    ],
                    &[2, 3],
                    &rows,
                )?;
            }
        }
        Command::Submit {
            namespace,
            template,
            context,
            version,
            idempotency_key,
            priority,
            run_at,
            delay,
            deadline,
            wait,
            timeout,
        } => {
            let context: serde_json::Value =
                serde_json::from_str(context).context("--context must be valid JSON")?;
            let duration = |what: &str, v: &Option<String>| {
                v.as_deref()
                    .map(tasker_schemas::template::parse_duration)
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("--{what}: {e}"))
            };
            let client = client()?;
            let r = client
                .submit(&SubmitTask {
                    namespace: namespace.clone(),
                    template: template.clone(),
                    version: *version,
                    context,
                    idempotency_key: idempotency_key.clone(),
                    priority: *priority,
                    task_id: None,
                    run_at: run_at.clone(),
                    delay: duration("delay", delay)?,
                    deadline: duration("deadline", deadline)?,
                })
                .await?;
            writeln!(out, "{}", r.task_id)?;
            if *wait {
                let task = client
                    .wait(r.task_id, Duration::from_secs(*timeout))
                    .await?;
                print_task(out, &task)?;
                return Ok(finished(&task));
            }
        }
        Command::Show {
            id,
            wait,
            timeout,
            json,
        } => {
            let client = client()?;
            let task = if *wait {
                client.wait(*id, Duration::from_secs(*timeout)).await?
            } else {
                client.task(*id).await?
            };
            if *json {
                writeln!(out, "{}", serde_json::to_string_pretty(&task)?)?;
            } else {
                print_task(out, &task)?;
            }
            if *wait {
                return Ok(finished(&task));
            }
        }
        Command::Instances {
            id,
            step,
            after,
            limit,
            json,
        } => {
            let page = client()?.instances(*id, step, *after, *limit).await?;
            if *json {
                writeln!(out, "{}", serde_json::to_string_pretty(&page)?)?;
            } else {
                let rows: Vec<Vec<String>> = page
                    .instances
                    .iter()
                    .map(|i| {
                        let detail = match (&i.output, &i.error) {
                            (Some(o), _) if i.state == StepState::Succeeded => o.to_string(),
                            (_, Some(e)) => one_line(e, usize::MAX),
                            _ => String::new(),
                        };
                        vec![
                            i.index.to_string(),
                            i.state.to_string(),
                            i.attempt.to_string(),
                            detail,
                        ]
                    })
                    .collect();
                write_table(
                    out,
                    &["INDEX", "STATE", "ATTEMPT", "OUTPUT / ERROR"],
                    &[0, 2],
                    &rows,
                )?;
                if let (true, Some(last)) = (page.more, page.instances.last()) {
                    writeln!(out, "more: --after {}", last.index)?;
                }
            }
        }
        Command::Signal {
            task,
            name,
            signal_id,
            payload,
        } => {
            let payload: serde_json::Value =
                serde_json::from_str(payload).context("--payload must be valid JSON")?;
            let signal_id = signal_id
                .clone()
                .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
            let r = client()?.signal(*task, name, &signal_id, payload).await?;
            writeln!(
                out,
                "signal {} {} ({}){}",
                r.name,
                r.signal_id,
                if r.created {
                    "recorded"
                } else {
                    "repeat: already recorded"
                },
                r.consumed_by
                    .map(|s| format!(", taken by step {s}"))
                    .unwrap_or_else(|| ", kept until a step waits for it".into())
            )?;
        }
        Command::Cancel { id, reason } => {
            let task = client()?.cancel(*id, reason.as_deref()).await?;
            print_task(out, &task)?;
        }
        Command::Retry { id, wait, timeout } => {
            let client = client()?;
            let mut task = client.retry(*id).await?;
            if *wait {
                task = client.wait(*id, Duration::from_secs(*timeout)).await?;
            }
            print_task(out, &task)?;
            if *wait {
                return Ok(finished(&task));
            }
        }
        Command::List {
            namespace,
            state,
            template,
            limit,
            after,
            json,
        } => {
            let filter = ListTasks {
                namespace: namespace.clone(),
                state: *state,
                template: template.clone(),
                limit: Some(*limit),
                after: *after,
            };
            let page = client()?.list(&filter).await?;
            if *json {
                writeln!(out, "{}", serde_json::to_string_pretty(&page)?)?;
            } else {
                let rows: Vec<Vec<String>> = page
                    .tasks
                    .iter()
                    .map(|t| {
                        vec![
                            t.id.to_string(),
                            t.namespace.clone(),
                            format!("{} v{}", t.template, t.template_version),
                            t.state.to_string(),
                            t.created_at.clone(),
                        ]
                    })
                    .collect();
                write_table(
                    out,
                    &["TASK", "NAMESPACE", "TEMPLATE", "STATE", "CREATED"],
                    &[],
                    &rows,
                )?;
                if let Some(next) = page.next {
                    writeln!(out, "(more: --after {next})")?;
                }
            }
        }
        Command::RetryStep { id, step } => {
            print_task(out, &client()?.retry_step(*id, step).await?)?;
        }
        Command::Rerun { id, step } => {
            print_task(out, &client()?.rerun(*id, step).await?)?;
        }
        Command::MarkSucceeded { id, step, output } => {
            let output: serde_json::Value =
                serde_json::from_str(output).context("--output must be JSON")?;
            print_task(out, &client()?.mark_succeeded(*id, step, output).await?)?;
        }
        Command::Bulk(cmd) => cli_ops::bulk(&client()?, cmd, out).await?,
        Command::DeadLetters(cmd) => {
            if !cli_ops::dead_letters(&client()?, cmd, out).await? {
                out.flush()?;
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// Says what to do about a database that does not exist (and was not created: its name is not
/// a plain identifier, or the user may not create databases).
fn explain_startup(e: tasker_orchestrator::Error, database_url: &str) -> anyhow::Error {
    use tasker_orchestrator::Error;
    use tasker_orchestrator::store::StoreError;
    let missing =
        matches!(&e, Error::Store(StoreError::Database(db)) if startup::is_missing_database(db));
    match startup::database_name(database_url) {
        Some(name) if missing => anyhow::Error::new(e).context(format!(
            "database {name} does not exist and could not be created (see the log); create it \
             with `createdb {name}`"
        )),
        _ => e.into(),
    }
}

async fn schedule_command(
    client: &Client,
    cmd: &ScheduleCommand,
    out: &mut impl Write,
) -> Result<ExitCode> {
    match cmd {
        ScheduleCommand::Create {
            template,
            cron,
            timezone,
            context,
            catch_up,
            name,
            json,
        } => {
            let Some((namespace, template)) = template.split_once('/') else {
                bail!("expected NAMESPACE/TEMPLATE (e.g. shop/nightly_report), got {template:?}");
            };
            let context: serde_json::Value =
                serde_json::from_str(context).context("--context must be valid JSON")?;
            let s = client
                .create_schedule(&tasker_schemas::api::CreateSchedule {
                    namespace: namespace.to_owned(),
                    template: template.to_owned(),
                    name: name.clone(),
                    cron: cron.clone(),
                    timezone: timezone.clone(),
                    context,
                    catch_up: *catch_up,
                })
                .await?;
            print_schedule(out, &s, *json)?;
        }
        ScheduleCommand::List { namespace, json } => {
            let list = client.schedules(namespace.as_deref()).await?;
            if *json {
                writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                let rows: Vec<Vec<String>> = list
                    .schedules
                    .iter()
                    .map(|s| {
                        vec![
                            s.id.to_string(),
                            s.namespace.clone(),
                            s.name.clone(),
                            s.template.clone(),
                            s.cron.clone(),
                            s.timezone.clone(),
                            s.catch_up.to_string(),
                            if s.paused { "paused" } else { "active" }.to_owned(),
                            s.next_tick.clone().unwrap_or_else(|| "-".into()),
                        ]
                    })
                    .collect();
                write_table(
                    out,
                    &[
                        "ID",
                        "NAMESPACE",
                        "NAME",
                        "TEMPLATE",
                        "CRON",
                        "TIMEZONE",
                        "CATCH-UP",
                        "STATE",
                        "NEXT TICK",
                    ],
                    &[],
                    &rows,
                )?;
            }
        }
        ScheduleCommand::Show { id, json } => {
            print_schedule(out, &client.schedule(*id).await?, *json)?;
        }
        ScheduleCommand::Pause { id } => {
            let s = client.pause_schedule(*id).await?;
            writeln!(out, "schedule {} paused", s.id)?;
        }
        ScheduleCommand::Resume { id } => {
            let s = client.resume_schedule(*id).await?;
            writeln!(
                out,
                "schedule {} resumed; next tick {}",
                s.id,
                s.next_tick.as_deref().unwrap_or("-")
            )?;
        }
        ScheduleCommand::Delete { id } => {
            let s = client.delete_schedule(*id).await?;
            writeln!(out, "schedule {} deleted", s.id)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_schedule(
    out: &mut impl Write,
    s: &tasker_schemas::api::ScheduleView,
    json: bool,
) -> Result<()> {
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(s)?)?;
        return Ok(());
    }
    writeln!(out, "schedule  {}", s.id)?;
    writeln!(out, "name      {}/{}", s.namespace, s.name)?;
    writeln!(out, "template  {}", s.template)?;
    writeln!(out, "cron      {}  ({})", s.cron, s.timezone)?;
    writeln!(out, "catch-up  {}", s.catch_up)?;
    writeln!(
        out,
        "state     {}",
        if s.paused { "paused" } else { "active" }
    )?;
    writeln!(out, "last tick {}", s.last_tick.as_deref().unwrap_or("-"))?;
    if let Some(e) = &s.last_error {
        writeln!(out, "error     {}", one_line(e, 200))?;
    }
    if !s.next_runs.is_empty() {
        writeln!(out, "next runs")?;
        for r in &s.next_runs {
            writeln!(out, "  {}  ({})", r.at, r.local)?;
        }
    }
    Ok(())
}

/// Writes `rows` under `header`, each column as wide as its widest cell (the last one is not
/// padded). Columns whose index is in `right` are aligned right.
fn write_table(
    out: &mut impl Write,
    header: &[&str],
    right: &[usize],
    rows: &[Vec<String>],
) -> io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut line = |cells: &mut dyn Iterator<Item = &str>| -> io::Result<()> {
        let mut text = String::new();
        for (i, (cell, width)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            let last = i + 1 == widths.len();
            match (right.contains(&i), last) {
                (true, _) => text.push_str(&format!("{cell:>width$}")),
                (false, true) => text.push_str(cell),
                (false, false) => text.push_str(&format!("{cell:<width$}")),
            }
        }
        writeln!(out, "{}", text.trim_end())
    };
    line(&mut header.iter().copied())?;
    for row in rows {
        line(&mut row.iter().map(String::as_str))?;
    }
    Ok(())
}

/// Longest error text of an attempt in the table (the rest: `show --json`).
const ATTEMPT_ERROR_CHARS: usize = 160;
/// Failed attempts listed per step (the most recent ones).
const ATTEMPTS_SHOWN: usize = 5;

/// `text` on one line (newlines and runs of white space become one space), cut to `max`
/// characters with an ellipsis.
fn one_line(text: &str, max: usize) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        return flat;
    }
    let mut cut: String = flat.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

fn print_task(out: &mut impl Write, t: &TaskView) -> io::Result<()> {
    writeln!(out, "task      {}", t.id)?;
    writeln!(
        out,
        "template  {}/{} v{}",
        t.namespace, t.template, t.template_version
    )?;
    writeln!(out, "state     {}", t.state)?;
    if let Some(p) = &t.parent {
        writeln!(out, "parent    {} (step {})", p.task_id, p.step)?;
    }
    writeln!(out, "created   {}", t.created_at)?;
    if let Some(f) = &t.finished_at {
        writeln!(out, "finished  {f}")?;
    }
    writeln!(out)?;
    // One row per step, then one per failed attempt of that step (its outcome and error).
    let mut rows = Vec::new();
    for s in &t.steps {
        let detail = match (&s.output, &s.error, &s.waiting_reason, &s.skip_reason) {
            (Some(o), _, _, _) if s.state == StepState::Succeeded => o.to_string(),
            (_, Some(e), _, _) => one_line(e, usize::MAX),
            (_, _, Some(w), _) => w.clone(),
            (_, _, _, Some(r)) => r.clone(),
            _ => String::new(),
        };
        rows.push(vec![
            s.name.clone(),
            s.state.to_string(),
            s.attempt.to_string(),
            detail,
        ]);
        if let Some(child) = &s.child_task_id {
            rows.push(vec![
                "  child".into(),
                String::new(),
                String::new(),
                format!("task {child} (tasker show {child})"),
            ]);
        }
        if let Some(m) = &s.map {
            rows.push(vec![
                "  instances".into(),
                String::new(),
                String::new(),
                format!(
                    "{} elements: {} succeeded, {} running, {} failed, {} waiting{} (tasker instances {} {})",
                    m.total.map(|t| t.to_string()).unwrap_or_else(|| "?".into()),
                    m.succeeded,
                    m.running,
                    m.failed,
                    m.waiting,
                    if m.halted > 0 { format!(", {} halted", m.halted) } else { String::new() },
                    t.id,
                    s.name
                ),
            ]);
        }
        let failed: Vec<_> = s
            .attempts
            .iter()
            .filter(|a| a.outcome != "succeeded")
            .collect();
        let skipped = failed.len().saturating_sub(ATTEMPTS_SHOWN);
        if skipped > 0 {
            rows.push(vec![
                "  attempts".into(),
                String::new(),
                String::new(),
                format!("({skipped} earlier failed attempts; --json shows them)"),
            ]);
        }
        for a in &failed[skipped..] {
            rows.push(vec![
                "  attempt".into(),
                a.outcome.clone(),
                a.attempt.to_string(),
                one_line(a.error.as_deref().unwrap_or(""), ATTEMPT_ERROR_CHARS),
            ]);
        }
    }
    write_table(
        out,
        &["STEP", "STATE", "ATTEMPT", "OUTPUT / ERROR / WHY WAITING"],
        &[2],
        &rows,
    )?;
    if !t.events.is_empty() {
        writeln!(out)?;
        for e in &t.events {
            writeln!(out, "event {:>3}  {}  {}", e.seq, e.at, e.kind)?;
        }
    }
    writeln!(out)?;
    match (&t.output, &t.error) {
        (Some(o), _) => writeln!(
            out,
            "result    {}",
            serde_json::to_string_pretty(o).unwrap_or_default()
        )?,
        (_, Some(e)) => writeln!(out, "error     {e}")?,
        _ => {}
    }
    Ok(())
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

/// The arguments of `tasker broker-permissions`.
struct BrokerPermissions<'a> {
    namespace: &'a str,
    prefix: &'a str,
    user_format: &'a str,
    vhost: &'a str,
    password_env: &'a str,
    apply: bool,
    rabbitmqctl: &'a str,
}

/// `tasker broker-permissions`: prints the rabbitmqctl lines of a namespace's broker user, or
/// runs them. The password never reaches the output.
fn broker_permissions(out: &mut impl Write, a: &BrokerPermissions<'_>) -> Result<()> {
    use tasker_orchestrator::identity::{self, UserFormat};
    tasker_schemas::template::validate_namespace(a.namespace)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let user = UserFormat::parse(a.user_format)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .user_of(a.namespace);
    let names = tasker_schemas::Names::new(a.prefix);
    let commands = identity::permission_commands(&names, a.namespace, &user, a.vhost);
    if !a.apply {
        writeln!(
            out,
            "# Broker user of namespace {} (prefix {}); the password comes from ${}.",
            a.namespace, a.prefix, a.password_env
        )?;
        writeln!(out, "{}", identity::add_user_line(&user, a.password_env))?;
        for c in &commands {
            let words: Vec<String> = c.iter().map(|w| identity::shell_quote(w)).collect();
            writeln!(out, "rabbitmqctl {}", words.join(" "))?;
        }
        return Ok(());
    }
    let password = match std::env::var(a.password_env) {
        Ok(p) if !p.is_empty() => p,
        _ => {
            eprint!("password for broker user {user}: ");
            io::stderr().flush()?;
            let mut line = String::new();
            io::stdin().read_line(&mut line)?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    if password.is_empty() {
        bail!("no password: set {} or type one", a.password_env);
    }
    let ctl: Vec<&str> = a.rabbitmqctl.split_whitespace().collect();
    let Some((program, base)) = ctl.split_first() else {
        bail!("--rabbitmqctl is empty");
    };
    let run = |args: &[&str], shown: &str| -> Result<std::process::Output> {
        let output = std::process::Command::new(program)
            .args(base)
            .args(args)
            .output()
            .with_context(|| format!("cannot run {}", a.rabbitmqctl))?;
        writeln!(
            io::stderr(),
            "rabbitmqctl {shown}: {}",
            if output.status.success() {
                "ok"
            } else {
                "failed"
            }
        )?;
        Ok(output)
    };
    let added = run(
        &["add_user", &user, &password],
        &format!("add_user {user} ***"),
    )?;
    if !added.status.success() {
        let text = String::from_utf8_lossy(&added.stderr).to_string()
            + &String::from_utf8_lossy(&added.stdout);
        if !text.contains("already exists") && !text.contains("user_already_exists") {
            bail!(
                "rabbitmqctl add_user {user} failed: {}",
                text.replace(&password, "***")
            );
        }
        let changed = run(
            &["change_password", &user, &password],
            &format!("change_password {user} ***"),
        )?;
        if !changed.status.success() {
            bail!("rabbitmqctl change_password {user} failed");
        }
    }
    for c in &commands {
        let args: Vec<&str> = c.iter().map(String::as_str).collect();
        let output = run(&args, &c.join(" "))?;
        if !output.status.success() {
            bail!(
                "rabbitmqctl {} failed: {}{}",
                c.join(" "),
                String::from_utf8_lossy(&output.stderr),
                String::from_utf8_lossy(&output.stdout)
            );
        }
    }
    writeln!(
        out,
        "broker user {user} of namespace {} is ready",
        a.namespace
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every argument of every (sub)command, with the path of commands leading to it.
    fn all_args(cmd: &clap::Command, path: &str, out: &mut Vec<(String, clap::Arg)>) {
        for arg in cmd.get_arguments() {
            out.push((path.to_owned(), arg.clone()));
        }
        for sub in cmd.get_subcommands() {
            all_args(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_flag_and_argument_has_help() {
        let mut cmd = Cli::command();
        cmd.build();
        cmd.clone().debug_assert();
        let mut args = Vec::new();
        all_args(&cmd, "tasker", &mut args);
        let subcommands: Vec<_> = cmd.get_subcommands().map(|s| s.get_name()).collect();
        assert!(subcommands.len() >= 8, "{subcommands:?}");
        let missing: Vec<String> = args
            .iter()
            .filter(|(_, a)| !matches!(a.get_id().as_str(), "help" | "version"))
            .filter(|(_, a)| a.get_help().is_none())
            .map(|(path, a)| format!("{path}: {}", a.get_id()))
            .collect();
        assert!(missing.is_empty(), "arguments without help: {missing:?}");
        for sub in cmd.get_subcommands() {
            assert!(sub.get_about().is_some(), "{} has no about", sub.get_name());
        }
    }

    #[test]
    fn tables_are_as_wide_as_their_widest_cell() {
        let mut out = Vec::new();
        write_table(
            &mut out,
            &["A", "NUMBER", "LAST"],
            &[1],
            &[
                vec!["a-rather-long-value".into(), "7".into(), "x".into()],
                vec!["b".into(), "1234567".into(), "y y".into()],
            ],
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "A                     NUMBER  LAST\n\
             a-rather-long-value        7  x\n\
             b                    1234567  y y\n"
        );
    }

    #[test]
    fn errors_are_shown_on_one_line_and_cut() {
        assert_eq!(one_line("short", 10), "short");
        assert_eq!(
            one_line("line one\n  line two\r\n", 100),
            "line one line two"
        );
        assert_eq!(one_line("abcdefghijkl", 6), "abcde…");
        assert_eq!(one_line("ééééé", 5), "ééééé");
        assert_eq!(one_line(&"x".repeat(1000), 160).chars().count(), 160);
    }

    #[test]
    fn a_closed_stdout_is_recognised() {
        let e = anyhow::Error::new(io::Error::from(io::ErrorKind::BrokenPipe)).context("writing");
        assert!(is_broken_pipe(&e));
        assert!(!is_broken_pipe(&anyhow::anyhow!("other")));
    }
}
