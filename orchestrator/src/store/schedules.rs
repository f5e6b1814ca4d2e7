//! Schedules and their ticks (`schedules`, `schedule_ticks`). What fires when is decided in
//! [`crate::transition::schedule`]; here: the rows, the claim of a due schedule and the
//! unique (schedule, tick) key.

use super::Result;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};
use uuid::Uuid;

/// A `schedules` row.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ScheduleRow {
    pub id: Uuid,
    pub namespace: String,
    pub name: String,
    pub template_name: String,
    pub cron: String,
    pub timezone: String,
    pub context: Value,
    pub catch_up: String,
    pub paused: bool,
    pub next_tick_at: Option<DateTime<Utc>>,
    pub last_tick_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// The columns of [`ScheduleRow`], as a literal for `concat!` (no SQL is built at run time).
macro_rules! columns {
    () => {
        "id, namespace, name, template_name, cron, timezone, context, catch_up, paused, \
         next_tick_at, last_tick_at, last_error, created_at"
    };
}

/// A schedule to create.
#[derive(Debug, Clone)]
pub struct NewSchedule<'a> {
    pub id: Uuid,
    pub namespace: &'a str,
    pub name: &'a str,
    pub template: &'a str,
    pub cron: &'a str,
    pub timezone: &'a str,
    pub context: &'a Value,
    pub catch_up: &'a str,
    pub next_tick_at: DateTime<Utc>,
}

/// The database's clock (every replica's schedules run by it).
pub async fn now(db: impl PgExecutor<'_>) -> Result<DateTime<Utc>> {
    Ok(sqlx::query_scalar("SELECT now()").fetch_one(db).await?)
}

/// Creates a schedule; `None` when its (namespace, name) is taken.
pub async fn insert(db: impl PgExecutor<'_>, new: &NewSchedule<'_>) -> Result<Option<ScheduleRow>> {
    const SQL: &str = concat!(
        "INSERT INTO schedules (id, namespace, name, template_name, cron, timezone, context,
                                catch_up, next_tick_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT (namespace, name) DO NOTHING
         RETURNING ",
        columns!(),
        ""
    );
    Ok(sqlx::query_as(SQL)
        .bind(new.id)
        .bind(new.namespace)
        .bind(new.name)
        .bind(new.template)
        .bind(new.cron)
        .bind(new.timezone)
        .bind(new.context)
        .bind(new.catch_up)
        .bind(new.next_tick_at)
        .fetch_optional(db)
        .await?)
}

/// One schedule.
pub async fn get(db: impl PgExecutor<'_>, id: Uuid) -> Result<Option<ScheduleRow>> {
    const SQL: &str = concat!("SELECT ", columns!(), " FROM schedules WHERE id = $1");
    Ok(sqlx::query_as(SQL).bind(id).fetch_optional(db).await?)
}

/// Schedules by namespace and name, of one namespace or of all, at most `limit`.
pub async fn list(
    db: impl PgExecutor<'_>,
    namespace: Option<&str>,
    limit: i64,
) -> Result<Vec<ScheduleRow>> {
    const SQL: &str = concat!(
        "SELECT ",
        columns!(),
        " FROM schedules WHERE ($1::text IS NULL OR namespace = $1)
         ORDER BY namespace, name LIMIT $2"
    );
    Ok(sqlx::query_as(SQL)
        .bind(namespace)
        .bind(limit)
        .fetch_all(db)
        .await?)
}

/// Pauses a schedule (no tick fires; its next tick is cleared). A paused one is unchanged.
pub async fn pause(db: impl PgExecutor<'_>, id: Uuid) -> Result<Option<ScheduleRow>> {
    const SQL: &str = concat!(
        "WITH paused AS (
             UPDATE schedules SET paused = true, next_tick_at = NULL, updated_at = now()
             WHERE id = $1 AND NOT paused RETURNING ",
        columns!(),
        "
         )
         SELECT ",
        columns!(),
        " FROM paused
         UNION ALL SELECT ",
        columns!(),
        " FROM schedules WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM paused)"
    );
    Ok(sqlx::query_as(SQL).bind(id).fetch_optional(db).await?)
}

/// Resumes a paused schedule at `next_tick_at` (the ticks of the pause do not fire). A running
/// one is unchanged.
pub async fn resume(
    db: impl PgExecutor<'_>,
    id: Uuid,
    next_tick_at: Option<DateTime<Utc>>,
) -> Result<Option<ScheduleRow>> {
    const SQL: &str = concat!(
        "WITH resumed AS (
             UPDATE schedules SET paused = false, next_tick_at = $2, updated_at = now()
             WHERE id = $1 AND paused RETURNING ",
        columns!(),
        "
         )
         SELECT ",
        columns!(),
        " FROM resumed
         UNION ALL SELECT ",
        columns!(),
        " FROM schedules WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM resumed)"
    );
    Ok(sqlx::query_as(SQL)
        .bind(id)
        .bind(next_tick_at)
        .fetch_optional(db)
        .await?)
}

/// Deletes a schedule and its tick records (its tasks stay).
pub async fn delete(db: impl PgExecutor<'_>, id: Uuid) -> Result<Option<ScheduleRow>> {
    const SQL: &str = concat!(
        "DELETE FROM schedules WHERE id = $1 RETURNING ",
        columns!(),
        ""
    );
    Ok(sqlx::query_as(SQL).bind(id).fetch_optional(db).await?)
}

/// Locks the due, unpaused schedule with the oldest next tick that no other transaction holds,
/// with the database's time (the transaction's start).
pub async fn claim_due(tx: &mut PgConnection) -> Result<Option<(ScheduleRow, DateTime<Utc>)>> {
    const SQL: &str = concat!(
        "SELECT ",
        columns!(),
        " FROM schedules
         WHERE NOT paused AND next_tick_at <= now()
         ORDER BY next_tick_at LIMIT 1
         FOR UPDATE SKIP LOCKED"
    );
    let row: Option<ScheduleRow> = sqlx::query_as(SQL).fetch_optional(&mut *tx).await?;
    match row {
        Some(row) => Ok(Some((row, now(&mut *tx).await?))),
        None => Ok(None),
    }
}

/// Records that a tick fired with `task_id`: false when it already had (the unique key).
pub async fn insert_tick(
    tx: &mut PgConnection,
    schedule_id: Uuid,
    tick_at: DateTime<Utc>,
    task_id: Uuid,
) -> Result<bool> {
    Ok(sqlx::query(
        "INSERT INTO schedule_ticks (schedule_id, tick_at, task_id) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
    )
    .bind(schedule_id)
    .bind(tick_at)
    .bind(task_id)
    .execute(&mut *tx)
    .await?
    .rows_affected()
        == 1)
}

/// Moves a claimed schedule on: its next tick, the newest tick that fired (kept when none
/// did) and the error of this round (`None` clears it when a tick fired, else keeps it).
pub async fn advance(
    tx: &mut PgConnection,
    id: Uuid,
    next_tick_at: Option<DateTime<Utc>>,
    last_tick_at: Option<DateTime<Utc>>,
    last_error: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "UPDATE schedules SET next_tick_at = $2, last_tick_at = coalesce($3, last_tick_at),
                              last_error = CASE WHEN $4::text IS NOT NULL OR $3::timestamptz IS NOT NULL
                                                THEN $4 ELSE last_error END,
                              updated_at = now()
         WHERE id = $1",
    )
    .bind(id)
    .bind(next_tick_at)
    .bind(last_tick_at)
    .bind(last_error)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Milliseconds until the earliest next tick of an unpaused schedule (negative: overdue), by
/// the database's clock; `None` when no schedule has one.
pub async fn ms_until_next(db: impl PgExecutor<'_>) -> Result<Option<i64>> {
    Ok(sqlx::query_scalar(
        "SELECT (extract(epoch FROM min(next_tick_at) - clock_timestamp()) * 1000)::bigint
         FROM schedules WHERE NOT paused",
    )
    .fetch_one(db)
    .await?)
}

/// Deletes up to `limit` tick records older than `older_than_ms` (a fired tick is never due
/// again once its schedule's next tick passed it; the rows are kept for a while to be read).
pub async fn prune_ticks(db: impl PgExecutor<'_>, older_than_ms: i64, limit: i64) -> Result<u64> {
    Ok(sqlx::query(
        "DELETE FROM schedule_ticks WHERE ctid IN (
             SELECT ctid FROM schedule_ticks
             WHERE tick_at < now() - make_interval(secs => $1::double precision / 1000)
             LIMIT $2)",
    )
    .bind(older_than_ms)
    .bind(limit)
    .execute(db)
    .await?
    .rows_affected())
}

/// Points a tick's record at the task that holds its idempotency key.
pub async fn set_tick_task(
    tx: &mut PgConnection,
    schedule_id: Uuid,
    tick_at: DateTime<Utc>,
    task_id: Uuid,
) -> Result<()> {
    sqlx::query("UPDATE schedule_ticks SET task_id = $3 WHERE schedule_id = $1 AND tick_at = $2")
        .bind(schedule_id)
        .bind(tick_at)
        .bind(task_id)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// Moves a schedule whose tick could not be fired on to `next_tick_at`, with the reason, unless
/// another transaction moved it already (its next tick is no longer `due`). Its due ticks are
/// lost: a schedule that fails for good must not hold up the others.
pub async fn give_up_tick(
    db: impl PgExecutor<'_>,
    id: Uuid,
    due: DateTime<Utc>,
    next_tick_at: Option<DateTime<Utc>>,
    error: &str,
) -> Result<bool> {
    Ok(sqlx::query(
        "UPDATE schedules SET next_tick_at = $3, last_error = $4, updated_at = now()
         WHERE id = $1 AND next_tick_at = $2 AND NOT paused",
    )
    .bind(id)
    .bind(due)
    .bind(next_tick_at)
    .bind(error)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}
