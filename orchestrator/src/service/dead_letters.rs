//! Dead letters: recorded from `{prefix}.dead_letters` into a bounded table
//! ([`crate::edge::dead_letters`] reads the queue), browsed, shown, replayed by kind, discarded.
//!
//! Replay by kind:
//! - `task_request`: resubmitted through the normal submit path (same `request_id`, same
//!   idempotency key and task id: a request that created its task meanwhile is not created
//!   twice); a request refused again stays, with the new refusal in the outcome;
//! - `step`: the old message would be stale, so its step is retried if its task still needs it
//!   ([`transition::dead_step_replay`], then [`super::operate::retry_step`]'s rules); if not, the
//!   dead letter is only removed (`not_needed`);
//! - `result` and `other`: cannot be replayed (a result's attempt has long ended; the message
//!   is kept for inspection until discarded).
//!
//! Replay and discard need the `operate` role in the dead letter's namespace (one without a
//! namespace: an every-namespace key) and are recorded in the audit log. A replayed dead letter
//! is removed in the same transaction as its audit entry.

use super::{Result, ServiceError, Shared};
use crate::auth::{Principal, Role};
use crate::store::dead_letters::{
    self as store, DeadLetterFilter, DeadLetterFull, DeadLetterRow, NewDeadLetter,
};
use crate::transition::{self, DeadStepReplay};
use serde::Serialize;
use serde_json::json;
use tasker_schemas::api::SubmitTask;
use tasker_schemas::{StepMessage, TaskId, TaskRequest, decode};

/// Most dead letters in one page, and in one bulk replay or discard.
pub const MAX_DEAD_LETTER_PAGE: i64 = 500;

/// The kinds of dead letter.
pub const KINDS: [&str; 4] = ["task_request", "step", "result", "other"];

/// Records a dead letter (a repeat is ignored) within the table's bound.
pub async fn record(shared: &Shared, d: &NewDeadLetter) -> Result<bool> {
    let mut tx = shared.db.begin().await?;
    let max = i64::try_from(shared.config.dead_letter_max_rows).unwrap_or(i64::MAX);
    let new = store::insert(&mut tx, d, max).await?;
    tx.commit().await?;
    Ok(new)
}

fn may_see(who: &Principal, ns: Option<&str>) -> bool {
    match ns {
        Some(n) => who.sees(n),
        None => who.is_global(),
    }
}

fn may_operate(who: &Principal, ns: Option<&str>) -> bool {
    match ns {
        Some(n) => who.allows(Role::Operate, n),
        None => who.is_global() && who.has_role(Role::Operate),
    }
}

/// A page of dead letters, newest first (in the caller's scope), and whether more follow.
pub async fn list(
    shared: &Shared,
    who: &Principal,
    mut filter: DeadLetterFilter,
) -> Result<(Vec<DeadLetterRow>, bool)> {
    if let Some(k) = &filter.kind
        && !KINDS.contains(&k.as_str())
    {
        return Err(ServiceError::InvalidRequest(format!(
            "kind {k:?} is not one of {}",
            KINDS.join(", ")
        )));
    }
    if let Some(n) = &filter.namespace {
        super::name_arg("namespace", n)?;
        if !who.sees(n) {
            return Err(ServiceError::Forbidden(format!(
                "{} may not see namespace {n:?}",
                who.actor
            )));
        }
    }
    if let Some(r) = &filter.reason
        && (r.is_empty() || r.len() > 256 || r.contains('\0'))
    {
        return Err(ServiceError::InvalidRequest(
            "reason must be 1-256 bytes without NUL".into(),
        ));
    }
    if !(1..=MAX_DEAD_LETTER_PAGE).contains(&filter.limit) {
        return Err(ServiceError::InvalidRequest(format!(
            "limit={} is out of range: 1 to {MAX_DEAD_LETTER_PAGE}",
            filter.limit
        )));
    }
    filter.scope = who.scope().map(|s| s.to_vec());
    Ok(store::list(&shared.db, &filter).await?)
}

/// One dead letter with its body.
pub async fn show(shared: &Shared, who: &Principal, id: i64) -> Result<DeadLetterFull> {
    match store::get(&shared.db, id).await? {
        Some(d) if may_see(who, d.row.namespace.as_deref()) => Ok(d),
        _ => Err(ServiceError::DeadLetterNotFound(id)),
    }
}

/// What happened to one dead letter of a replay or discard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetterOutcome {
    pub id: i64,
    /// `resubmitted` (a task request: `task_id` names the task), `step_retried`, `not_needed`
    /// (a dead step whose task no longer needs it: removed), `discarded`, or `refused` (kept;
    /// `message` says why).
    pub outcome: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<TaskId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl DeadLetterOutcome {
    fn refused(id: i64, message: impl Into<String>) -> Self {
        Self {
            id,
            outcome: "refused",
            task_id: None,
            message: Some(message.into()),
        }
    }
}

fn check_ids(ids: &[i64]) -> Result<()> {
    if ids.is_empty() || ids.len() as i64 > MAX_DEAD_LETTER_PAGE {
        return Err(ServiceError::InvalidRequest(format!(
            "ids must list 1 to {MAX_DEAD_LETTER_PAGE} dead letters"
        )));
    }
    Ok(())
}

/// Replays dead letters by kind (see the module's documentation), each on its own; the outcome
/// of each, in order. A dead letter the caller may not act on, or that is gone, is `refused`.
pub async fn replay(
    shared: &Shared,
    who: &Principal,
    ids: &[i64],
) -> Result<Vec<DeadLetterOutcome>> {
    check_ids(ids)?;
    let mut out = Vec::with_capacity(ids.len());
    for &id in ids {
        out.push(replay_one(shared, who, id).await?);
    }
    Ok(out)
}

async fn replay_one(shared: &Shared, who: &Principal, id: i64) -> Result<DeadLetterOutcome> {
    let Some(d) = store::get(&shared.db, id).await? else {
        return Ok(DeadLetterOutcome::refused(id, "no such dead letter"));
    };
    let ns = d.row.namespace.clone();
    if !may_see(who, ns.as_deref()) {
        return Ok(DeadLetterOutcome::refused(id, "no such dead letter"));
    }
    if !may_operate(who, ns.as_deref()) {
        return Ok(DeadLetterOutcome::refused(
            id,
            format!(
                "{} may not replay it: the operate role is needed",
                who.actor
            ),
        ));
    }
    if d.row.body_bytes as usize > d.body.len() {
        return Ok(DeadLetterOutcome::refused(
            id,
            "its body was cut when recorded: it cannot be replayed",
        ));
    }
    let outcome = match d.row.kind.as_str() {
        "task_request" => {
            let req = match decode::<TaskRequest>(&d.body) {
                Ok(env) => env.payload,
                Err(e) => {
                    return Ok(DeadLetterOutcome::refused(
                        id,
                        format!("unreadable task request: {e}"),
                    ));
                }
            };
            let request_id = req.request_id;
            let submit = SubmitTask::from(req);
            // The replayer's own right to submit there.
            match super::tasks::submit(shared, who, &submit, Some(request_id)).await {
                Ok(created) => DeadLetterOutcome {
                    id,
                    outcome: "resubmitted",
                    task_id: Some(created.task_id),
                    message: None,
                },
                Err(e) if e.is_internal() => return Err(e),
                Err(e) => return Ok(DeadLetterOutcome::refused(id, e.to_string())),
            }
        }
        "step" => {
            let m = match decode::<StepMessage>(&d.body) {
                Ok(env) => env.payload,
                Err(e) => {
                    return Ok(DeadLetterOutcome::refused(
                        id,
                        format!("unreadable step message: {e}"),
                    ));
                }
            };
            let (task, step) = crate::store::operate::step_state(&shared.db, m.task_id, &m.step)
                .await?
                .unzip();
            match transition::dead_step_replay(task, step.flatten()) {
                DeadStepReplay::RetryStep => {
                    match super::operate::retry_step(shared, who, m.task_id, &m.step).await {
                        Ok(()) => DeadLetterOutcome {
                            id,
                            outcome: "step_retried",
                            task_id: Some(m.task_id),
                            message: None,
                        },
                        Err(e) if e.is_internal() => return Err(e),
                        Err(e) => return Ok(DeadLetterOutcome::refused(id, e.to_string())),
                    }
                }
                DeadStepReplay::NotNeeded(why) => DeadLetterOutcome {
                    id,
                    outcome: "not_needed",
                    task_id: Some(m.task_id),
                    message: Some(why),
                },
            }
        }
        kind => {
            return Ok(DeadLetterOutcome::refused(
                id,
                format!("a {kind} dead letter cannot be replayed; discard it"),
            ));
        }
    };
    let mut tx = shared.db.begin().await?;
    store::delete(&mut tx, id).await?;
    super::audit::record(
        &mut tx,
        who,
        "dead_letter.replay",
        ns.as_deref(),
        outcome.task_id,
        json!({ "dead_letter": id, "kind": d.row.kind, "outcome": outcome.outcome,
                "message": outcome.message, "reason": d.row.reason }),
    )
    .await?;
    tx.commit().await?;
    Ok(outcome)
}

/// Discards dead letters (removed; recorded in the audit log), each on its own.
pub async fn discard(
    shared: &Shared,
    who: &Principal,
    ids: &[i64],
) -> Result<Vec<DeadLetterOutcome>> {
    check_ids(ids)?;
    let mut out = Vec::with_capacity(ids.len());
    for &id in ids {
        let mut tx = shared.db.begin().await?;
        let Some(d) = store::lock(&mut tx, id).await? else {
            out.push(DeadLetterOutcome::refused(id, "no such dead letter"));
            continue;
        };
        let ns = d.row.namespace.as_deref();
        if !may_see(who, ns) {
            out.push(DeadLetterOutcome::refused(id, "no such dead letter"));
            continue;
        }
        if !may_operate(who, ns) {
            out.push(DeadLetterOutcome::refused(
                id,
                format!(
                    "{} may not discard it: the operate role is needed",
                    who.actor
                ),
            ));
            continue;
        }
        store::delete(&mut tx, id).await?;
        super::audit::record(
            &mut tx,
            who,
            "dead_letter.discard",
            ns,
            d.row.task_id.map(TaskId),
            json!({ "dead_letter": id, "kind": d.row.kind, "reason": d.row.reason }),
        )
        .await?;
        tx.commit().await?;
        out.push(DeadLetterOutcome {
            id,
            outcome: "discarded",
            task_id: None,
            message: None,
        });
    }
    Ok(out)
}
