//! The CLI's operator actions and dead letters: `tasker retry-step`, `tasker rerun`,
//! `tasker mark-succeeded`, `tasker bulk cancel|retry`, `tasker dead-letters ...`.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use std::io::{self, BufRead, Write};
use tasker_client::Client;
use tasker_schemas::TaskState;
use tasker_schemas::operate::{BulkAction, BulkFilterBody, DeadLetterOutcomes, DeadLetterQuery};

/// The task filter of a bulk action (the task list's filters).
#[derive(Args, Clone)]
pub struct BulkArgs {
    /// Only tasks in this state (pending, running, completed, failed, cancelled).
    #[arg(long)]
    state: Option<TaskState>,
    /// Only tasks of this namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Only tasks of this template.
    #[arg(long)]
    template: Option<String>,
    /// Only tasks created at or after this time (RFC 3339).
    #[arg(long)]
    created_after: Option<String>,
    /// Only tasks created before this time (RFC 3339).
    #[arg(long)]
    created_before: Option<String>,
    /// Do not ask: act on the counted tasks.
    #[arg(long)]
    yes: bool,
}

#[derive(Subcommand)]
pub enum BulkCommand {
    /// Cancel every task the filter matches (shows the count first, asks unless --yes).
    Cancel(BulkArgs),
    /// Retry every task the filter matches (shows the count first, asks unless --yes).
    Retry(BulkArgs),
}

#[derive(Subcommand)]
pub enum DeadLetterCommand {
    /// List dead letters, newest first.
    List {
        /// task_request, step, result or other.
        #[arg(long)]
        kind: Option<String>,
        /// Only dead letters of this namespace.
        #[arg(long)]
        namespace: Option<String>,
        /// Only those whose reason contains this text.
        #[arg(long)]
        reason: Option<String>,
        /// Received at or after (RFC 3339).
        #[arg(long)]
        after: Option<String>,
        /// Received before (RFC 3339).
        #[arg(long)]
        before_time: Option<String>,
        /// The next page: the `--before` printed under the previous one.
        #[arg(long)]
        before: Option<i64>,
        /// Rows per page (1 to 500).
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter with its headers and body (JSON).
    Show {
        /// The dead letter's id (from `tasker dead-letters list`).
        id: i64,
    },
    /// Replay dead letters by kind: a task request is submitted again, a dead step's step is
    /// retried if its task still needs it.
    Replay {
        /// Dead letter ids (from `tasker dead-letters list`).
        #[arg(required = true)]
        ids: Vec<i64>,
    },
    /// Discard dead letters.
    Discard {
        /// Dead letter ids (from `tasker dead-letters list`).
        #[arg(required = true)]
        ids: Vec<i64>,
    },
}

/// `tasker bulk cancel|retry`: the count, a confirmation (unless --yes), the action.
pub async fn bulk(client: &Client, cmd: &BulkCommand, out: &mut impl Write) -> Result<()> {
    let (retry, args) = match cmd {
        BulkCommand::Cancel(a) => (false, a),
        BulkCommand::Retry(a) => (true, a),
    };
    let filter = BulkFilterBody {
        state: args.state,
        namespace: args.namespace.clone(),
        template: args.template.clone(),
        created_after: args.created_after.clone(),
        created_before: args.created_before.clone(),
    };
    let count = client.bulk_count(&filter).await?;
    let verb = if retry { "retry" } else { "cancel" };
    if count.count > count.max {
        bail!(
            "more than {} tasks match; narrow the filter (e.g. --created-after)",
            count.max
        );
    }
    writeln!(out, "{} tasks match", count.count)?;
    out.flush()?;
    if count.count == 0 {
        return Ok(());
    }
    if !args.yes {
        eprint!("{verb} these {} tasks? [y/N] ", count.count);
        let mut answer = String::new();
        io::stdin()
            .lock()
            .read_line(&mut answer)
            .context("reading the answer")?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            bail!("not confirmed: nothing done");
        }
    }
    let done = client
        .bulk(retry, &BulkAction::new(filter, count.count))
        .await?;
    writeln!(
        out,
        "{verb}: {} matched, {} acted on, {} skipped (state did not allow it)",
        done.matched, done.acted, done.skipped
    )?;
    Ok(())
}

fn print_outcomes(out: &mut impl Write, o: &DeadLetterOutcomes) -> Result<bool> {
    let mut all = true;
    for r in &o.outcomes {
        all &= r.outcome != "refused";
        let task = r.task_id.map(|t| format!(" task {t}")).unwrap_or_default();
        let msg = r
            .message
            .as_deref()
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        writeln!(out, "{} {}{task}{msg}", r.id, r.outcome)?;
    }
    Ok(all)
}

/// `tasker dead-letters ...`; false when some dead letter was refused.
pub async fn dead_letters(
    client: &Client,
    cmd: &DeadLetterCommand,
    out: &mut impl Write,
) -> Result<bool> {
    match cmd {
        DeadLetterCommand::List {
            kind,
            namespace,
            reason,
            after,
            before_time,
            before,
            limit,
            json,
        } => {
            let q = DeadLetterQuery {
                kind: kind.clone(),
                namespace: namespace.clone(),
                reason: reason.clone(),
                after: after.clone(),
                before_time: before_time.clone(),
                before: *before,
                limit: Some(*limit),
            };
            let page = client.dead_letters(&q).await?;
            if *json {
                writeln!(out, "{}", serde_json::to_string_pretty(&page)?)?;
            } else {
                let rows: Vec<Vec<String>> = page
                    .dead_letters
                    .iter()
                    .map(|d| {
                        vec![
                            d.id.to_string(),
                            d.received_at.clone(),
                            d.kind.clone(),
                            d.namespace.clone().unwrap_or_default(),
                            d.routing_key.clone(),
                            super::one_line(&d.reason, 100),
                        ]
                    })
                    .collect();
                super::write_table(
                    out,
                    &[
                        "ID",
                        "RECEIVED",
                        "KIND",
                        "NAMESPACE",
                        "ROUTING KEY",
                        "REASON",
                    ],
                    &[0],
                    &rows,
                )?;
                if let Some(next) = page.next_before {
                    writeln!(out, "(more: --before {next})")?;
                }
            }
            Ok(true)
        }
        DeadLetterCommand::Show { id } => {
            let d = client.dead_letter(*id).await?;
            writeln!(out, "{}", serde_json::to_string_pretty(&d)?)?;
            Ok(true)
        }
        DeadLetterCommand::Replay { ids } => {
            print_outcomes(out, &client.dead_letter_action(false, ids).await?)
        }
        DeadLetterCommand::Discard { ids } => {
            print_outcomes(out, &client.dead_letter_action(true, ids).await?)
        }
    }
}
