//! Schedules: create, pause, resume, delete and read them, and fire the ticks that are due
//! (the schedules loop, on every replica). Which ticks fire and the next tick are decided by
//! [`crate::transition::schedule`]; a tick's task is created through the submit path
//! ([`super::tasks::create_in`]) in the transaction that records the tick under the unique
//! (schedule, tick) key and advances the schedule, so each tick creates exactly one task
//! whatever the number of replicas.

use super::{Result, ServiceError, Shared, audit, keys};
use crate::auth::{Principal, Role};
use crate::store::rfc3339;
use crate::store::schedules::{self as store, NewSchedule, ScheduleRow};
use crate::store::tasks::{CreateOutcome, NewTask};
use crate::transition::schedule::{Spec, plan_ticks};
use chrono::{DateTime, Utc};
use std::time::Duration;
use tasker_schemas::TaskId;
use tasker_schemas::api::{CatchUp, CreateSchedule, MAX_SCHEDULE_PAGE, SCHEDULE_LATE_AFTER_MS};
use uuid::Uuid;

/// Most schedules one round fires (the next round goes on at once).
const ROUND: usize = 100;

/// Refuses text PostgreSQL cannot hold (a NUL).
fn no_nul(what: &str, text: &str) -> Result<()> {
    if text.contains('\0') {
        return Err(ServiceError::InvalidRequest(format!(
            "{what} contains a NUL character, which is not allowed"
        )));
    }
    Ok(())
}

/// Validates and creates a schedule; its first tick is the first after now. Managing schedules
/// needs role `operate` in their namespace (each is recorded in the audit log).
pub async fn create(shared: &Shared, who: &Principal, req: &CreateSchedule) -> Result<ScheduleRow> {
    tasker_schemas::template::validate_namespace(&req.namespace)
        .map_err(|e| ServiceError::InvalidRequest(e.to_string()))?;
    keys::require(who, Role::Operate, &req.namespace, "manage schedules")?;
    super::name_arg("template", &req.template)?;
    let name = req.name.as_deref().unwrap_or(&req.template);
    super::name_arg("name", name)?;
    no_nul("cron", &req.cron)?;
    no_nul("timezone", &req.timezone)?;
    tasker_schemas::data::check_value("context", &req.context, shared.config.max_context_bytes)?;
    let now = store::now(&shared.db).await?;
    let spec = Spec::parse(&req.cron, &req.timezone, now).map_err(ServiceError::InvalidRequest)?;
    // The template must exist now (each tick takes its newest version then).
    super::templates::find(shared, &req.namespace, &req.template, None).await?;
    let next = spec.next_after(now);
    let row = store::insert(
        &shared.db,
        &NewSchedule {
            id: Uuid::now_v7(),
            namespace: &req.namespace,
            name,
            template: &req.template,
            cron: &req.cron,
            timezone: &req.timezone,
            context: &req.context,
            catch_up: req.catch_up.as_str(),
            next_tick_at: next.unwrap_or(now),
        },
    )
    .await?
    .ok_or_else(|| ServiceError::ScheduleConflict {
        namespace: req.namespace.clone(),
        name: name.to_owned(),
    })?;
    record(shared, who, "schedule.create", &row).await?;
    shared.schedules.notify_one();
    tracing::info!(schedule = %row.id, namespace = %row.namespace, name = %row.name, cron = %row.cron, timezone = %row.timezone, "schedule created");
    Ok(row)
}

/// One schedule (role `read` in its namespace).
pub async fn get(shared: &Shared, who: &Principal, id: Uuid) -> Result<ScheduleRow> {
    let row = store::get(&shared.db, id)
        .await?
        .ok_or(ServiceError::ScheduleNotFound(id))?;
    keys::require(who, Role::Read, &row.namespace, "read schedules")?;
    Ok(row)
}

/// The schedule `id` if `who` may manage it (role `operate` in its namespace).
async fn managed(shared: &Shared, who: &Principal, id: Uuid) -> Result<ScheduleRow> {
    let row = store::get(&shared.db, id)
        .await?
        .ok_or(ServiceError::ScheduleNotFound(id))?;
    keys::require(who, Role::Operate, &row.namespace, "manage schedules")?;
    Ok(row)
}

async fn record(shared: &Shared, who: &Principal, action: &str, row: &ScheduleRow) -> Result<()> {
    let mut conn = shared.db.acquire().await?;
    audit::record(
        &mut conn,
        who,
        action,
        Some(&row.namespace),
        None,
        serde_json::json!({ "schedule_id": row.id, "name": row.name, "template": row.template_name }),
    )
    .await
}

/// A schedule's next `n` ticks: from its next tick, or (paused) those it would have if it
/// were resumed now. With the time zone, to show them in local time.
pub async fn next_runs(
    shared: &Shared,
    row: &ScheduleRow,
    n: usize,
) -> Result<(Vec<DateTime<Utc>>, Option<chrono_tz::Tz>)> {
    let Ok(spec) = Spec::read(&row.cron, &row.timezone) else {
        return Ok((Vec::new(), None));
    };
    let runs = match row.next_tick_at {
        Some(next) => {
            let mut runs = vec![next];
            runs.extend(spec.upcoming(next, n.saturating_sub(1)));
            runs
        }
        None => spec.upcoming(store::now(&shared.db).await?, n),
    };
    Ok((runs, Some(spec.timezone())))
}

/// Schedules by namespace and name, of one namespace or of all (at most `limit`, up to
/// [`MAX_SCHEDULE_PAGE`]).
pub async fn list(
    shared: &Shared,
    who: &Principal,
    namespace: Option<&str>,
    limit: u32,
) -> Result<Vec<ScheduleRow>> {
    if let Some(n) = namespace {
        super::name_arg("namespace", n)?;
        keys::require(who, Role::Read, n, "list schedules")?;
    }
    if limit == 0 || limit > MAX_SCHEDULE_PAGE {
        return Err(ServiceError::InvalidRequest(format!(
            "limit must be 1-{MAX_SCHEDULE_PAGE}"
        )));
    }
    let mut rows = store::list(&shared.db, namespace, i64::from(limit)).await?;
    rows.retain(|r| who.sees(&r.namespace));
    Ok(rows)
}

/// Pauses a schedule: no tick fires until it is resumed. Pausing a paused one changes nothing.
pub async fn pause(shared: &Shared, who: &Principal, id: Uuid) -> Result<ScheduleRow> {
    managed(shared, who, id).await?;
    let row = store::pause(&shared.db, id)
        .await?
        .ok_or(ServiceError::ScheduleNotFound(id))?;
    record(shared, who, "schedule.pause", &row).await?;
    tracing::info!(schedule = %id, "schedule paused");
    Ok(row)
}

/// Resumes a paused schedule at its first tick after now: the ticks of the pause do not fire.
/// Resuming a running one changes nothing.
pub async fn resume(shared: &Shared, who: &Principal, id: Uuid) -> Result<ScheduleRow> {
    let row = managed(shared, who, id).await?;
    if !row.paused {
        return Ok(row);
    }
    let now = store::now(&shared.db).await?;
    let next = Spec::read(&row.cron, &row.timezone)
        .ok()
        .and_then(|s| s.next_after(now));
    let row = store::resume(&shared.db, id, next)
        .await?
        .ok_or(ServiceError::ScheduleNotFound(id))?;
    record(shared, who, "schedule.resume", &row).await?;
    shared.schedules.notify_one();
    tracing::info!(schedule = %id, "schedule resumed");
    Ok(row)
}

/// Deletes a schedule (the tasks it created stay). Returns it as it was.
pub async fn delete(shared: &Shared, who: &Principal, id: Uuid) -> Result<ScheduleRow> {
    managed(shared, who, id).await?;
    let row = store::delete(&shared.db, id)
        .await?
        .ok_or(ServiceError::ScheduleNotFound(id))?;
    record(shared, who, "schedule.delete", &row).await?;
    tracing::info!(schedule = %id, "schedule deleted");
    Ok(row)
}

/// Fires every due schedule (up to [`ROUND`] of them), one transaction each; returns the tasks
/// created.
pub async fn run_due(shared: &Shared) -> Result<usize> {
    let mut created = 0;
    for _ in 0..ROUND {
        match run_one(shared).await? {
            Some(n) => created += n,
            None => break,
        }
    }
    Ok(created)
}

/// The idempotency key of a tick's task: where it came from, readable in its summary.
pub fn tick_key(schedule: Uuid, tick: DateTime<Utc>) -> String {
    format!("schedule:{schedule}:{}", rfc3339(tick))
}

/// Claims one due schedule and fires its ticks ([`plan_ticks`]); `None` when none is due (or
/// every due one is held by another replica).
async fn run_one(shared: &Shared) -> Result<Option<usize>> {
    let mut tx = shared.db.begin().await?;
    let Some((row, now)) = store::claim_due(&mut tx).await? else {
        tx.commit().await?;
        return Ok(None);
    };
    let Some(due) = row.next_tick_at else {
        tx.commit().await?;
        return Ok(Some(0));
    };
    let spec = match Spec::read(&row.cron, &row.timezone) {
        Ok(spec) => spec,
        Err(e) => {
            // Only a manual edit gets here: stop it, with the reason.
            store::advance(&mut tx, row.id, None, None, Some(&e)).await?;
            tx.commit().await?;
            return Ok(Some(0));
        }
    };
    let catch_up: CatchUp = row.catch_up.parse().unwrap_or_default();
    let plan = plan_ticks(
        &spec,
        due,
        now,
        catch_up,
        chrono::Duration::milliseconds(SCHEDULE_LATE_AFTER_MS),
    );
    if plan.skipped > 0 {
        tracing::warn!(
            schedule = %row.id,
            skipped = plan.skipped,
            more = plan.skipped_more,
            catch_up = %catch_up,
            "missed ticks skipped"
        );
        shared
            .metrics
            .counter(
                "tasker_schedule_ticks_skipped_total",
                &[("namespace", &row.namespace)],
            )
            .increment(plan.skipped);
    }
    let template =
        match super::templates::find(shared, &row.namespace, &row.template_name, None).await {
            Ok(t) => t,
            Err(e) if !e.is_internal() => {
                // The template is gone: these ticks are lost, said on the schedule.
                let why = format!("{} tick(s) created no task: {e}", plan.fire.len());
                tracing::warn!(schedule = %row.id, error = %why, "schedule tick failed");
                store::advance(&mut tx, row.id, plan.next_tick, None, Some(&why)).await?;
                tx.commit().await?;
                return Ok(Some(0));
            }
            Err(e) => return Err(e),
        };
    let fired = fire(shared, &mut tx, &row, &template, &plan.fire).await;
    let (made, last, error) = match fired {
        Ok(done) => done,
        Err(e) if e.is_retryable() => return Err(e),
        Err(e) => {
            // Not the database being down: this schedule's ticks cannot be created (and would
            // not be next round). Give them up, say why, and go on with the other schedules.
            tx.rollback().await?;
            let why = format!("{} tick(s) created no task: {e}", plan.fire.len());
            tracing::warn!(schedule = %row.id, error = %why, "schedule tick failed");
            store::give_up_tick(&shared.db, row.id, due, plan.next_tick, &why).await?;
            return Ok(Some(0));
        }
    };
    store::advance(&mut tx, row.id, plan.next_tick, last, error.as_deref()).await?;
    tx.commit().await?;
    let n = made
        .iter()
        .filter(|m| matches!(&m.outcome, CreateOutcome::Created(c) if c.created))
        .count();
    for m in made {
        super::tasks::after_create(shared, &row.namespace, &template.template.name, m).await;
    }
    if n > 0 {
        shared
            .metrics
            .counter(
                "tasker_schedule_ticks_total",
                &[("namespace", &row.namespace)],
            )
            .increment(n as u64);
        tracing::debug!(schedule = %row.id, tasks = n, "schedule ticks fired");
    }
    Ok(Some(n))
}

/// What [`fire`] did: the tasks to announce, the newest tick that fired, and an error to record.
type Fired = (
    Vec<super::tasks::Made>,
    Option<DateTime<Utc>>,
    Option<String>,
);

/// In the claiming transaction: per tick, its row under the unique (schedule, tick) key, then
/// its task through the submit path.
async fn fire(
    shared: &Shared,
    tx: &mut sqlx::PgConnection,
    row: &ScheduleRow,
    template: &crate::store::templates::StoredTemplate,
    ticks: &[DateTime<Utc>],
) -> Result<Fired> {
    let mut made = Vec::with_capacity(ticks.len());
    let mut last = None;
    let mut error = None;
    for &tick in ticks {
        let task_id = TaskId::new();
        if !store::insert_tick(&mut *tx, row.id, tick, task_id.0).await? {
            continue; // fired before (the unique key)
        }
        let key = tick_key(row.id, tick);
        let new = NewTask {
            namespace: &row.namespace,
            template_id: template.id,
            template: &template.template,
            requested_version: None,
            context: &row.context,
            idempotency_key: Some(&key),
            request_id: None,
            priority: 0,
            task_id: Some(task_id),
            parent: None,
            trace_parent: None,
            start_at: None,
            // The template's deadline, if it has one.
            deadline_ms: crate::transition::deadline_ms(
                None,
                template.template.deadline.map(|d| d.0),
            )
            .map_err(ServiceError::InvalidRequest)?,
            start_request: None,
        };
        let m = super::tasks::create_in(shared, &mut *tx, &new).await?;
        let holder = match &m.outcome {
            CreateOutcome::Created(c) => c.task_id,
            CreateOutcome::Conflict { task_id } => {
                error = Some(format!(
                    "the tick at {} created no task: its idempotency key {key:?} is held by task {task_id}",
                    rfc3339(tick)
                ));
                *task_id
            }
        };
        if holder != task_id {
            store::set_tick_task(&mut *tx, row.id, tick, holder.0).await?;
        }
        last = Some(tick);
        made.push(m);
    }
    Ok((made, last, error))
}

/// How long until the next tick of any unpaused schedule, at most `cap` (a schedule created or
/// resumed on another replica is seen within `cap`); a little when one is overdue (another
/// replica holds it).
pub async fn next_due(shared: &Shared, cap: Duration) -> Result<Duration> {
    Ok(match store::ms_until_next(&shared.db).await? {
        None => cap,
        Some(ms) => Duration::from_millis(ms.clamp(20, i64::MAX) as u64 + 1).min(cap),
    })
}

/// Deletes tick records older than the task retention, in batches (up to `batches`).
pub async fn prune_ticks(shared: &Shared, batches: usize) -> Result<u64> {
    let mut n = 0;
    for _ in 0..batches {
        let gone = store::prune_ticks(&shared.db, shared.config.retention_ms as i64, 1_000).await?;
        n += gone;
        if gone < 1_000 {
            break;
        }
    }
    Ok(n)
}
