//! Admission: slot locks and counters, and moving queued steps to `dispatched` with a new
//! attempt, a lease and an outbox entry, in one statement.

use super::outbox::{Admitted, MessageData};
use super::{Result, StoreError};
use crate::slots::{SlotKey, SlotScope, lock_order};
use crate::transition::{ADMIT, Admission};
use sqlx::{PgConnection, Row};
use std::collections::HashMap;
use tasker_schemas::StepId;

/// Locks `slots` (in lock order, so two transactions never wait on each other's slots), first
/// releasing `released` dispatched steps per slot. Creates missing slot rows from a count.
/// Returns what each slot holds afterwards.
pub async fn lock_slots(
    tx: &mut PgConnection,
    slots: &[SlotKey],
    released: &HashMap<SlotKey, i64>,
) -> Result<HashMap<SlotKey, i64>> {
    let order = lock_order(slots.iter().chain(released.keys()).cloned().collect());
    if order.is_empty() {
        return Ok(HashMap::new());
    }
    let minus: Vec<i64> = order
        .iter()
        .map(|s| released.get(s).copied().unwrap_or(0))
        .collect();
    let mut held = lock_and_release(tx, &order, &minus).await?;
    if held.len() == order.len() {
        return Ok(held);
    }
    // Slots without a row yet (first admission on a queue): create them from a count, which
    // sees this transaction's own releases. A concurrent creator of the same row wins the
    // conflict (this one waits for it); its count did not see this transaction's releases, so
    // they are applied to its row.
    let (missing, missing_minus): (Vec<SlotKey>, Vec<i64>) = order
        .iter()
        .zip(&minus)
        .filter(|(s, _)| !held.contains_key(*s))
        .map(|(s, n)| (s.clone(), *n))
        .unzip();
    let queues: Vec<&str> = missing
        .iter()
        .filter(|s| s.scope == SlotScope::Queue)
        .map(|s| s.key.as_str())
        .collect();
    let created = sqlx::query(
        "INSERT INTO slots (scope, key, in_flight)
         SELECT 'queue', q.queue,
                (SELECT count(*) FROM steps s
                 WHERE s.namespace = split_part(q.queue, '.', 1)
                   AND s.queue = split_part(q.queue, '.', 2) AND s.state = 'dispatched')
         FROM unnest($1::text[]) AS q(queue)
         ON CONFLICT (scope, key) DO NOTHING
         RETURNING key, in_flight",
    )
    .bind(&queues)
    .fetch_all(&mut *tx)
    .await?;
    held.extend(created.iter().map(|r| {
        (
            SlotKey::queue(r.get::<String, _>("key")),
            r.get("in_flight"),
        )
    }));
    let (others, others_minus): (Vec<SlotKey>, Vec<i64>) = missing
        .into_iter()
        .zip(missing_minus)
        .filter(|(s, _)| !held.contains_key(s))
        .unzip();
    if !others.is_empty() {
        held.extend(lock_and_release(tx, &others, &others_minus).await?);
    }
    if held.len() != order.len() {
        return Err(StoreError::Corrupt(format!(
            "could not create the slots {order:?}"
        )));
    }
    Ok(held)
}

/// Locks the existing rows of `slots` (in lock order) and subtracts `minus` (same order) from
/// them; returns what they hold afterwards. Slots without a row are missing from the answer.
async fn lock_and_release(
    tx: &mut PgConnection,
    slots: &[SlotKey],
    minus: &[i64],
) -> Result<HashMap<SlotKey, i64>> {
    let scopes: Vec<&str> = slots.iter().map(|s| s.scope.as_str()).collect();
    let keys: Vec<&str> = slots.iter().map(|s| s.key.as_str()).collect();
    let releasing = minus.iter().any(|n| *n != 0);
    let mut held: HashMap<SlotKey, i64> = HashMap::new();
    let read = |r: &sqlx::postgres::PgRow| -> Result<(SlotKey, i64)> {
        let scope: &str = r.get("scope");
        let scope = match scope {
            "queue" => SlotScope::Queue,
            other => return Err(StoreError::Corrupt(format!("unknown slot scope {other:?}"))),
        };
        Ok((
            SlotKey {
                scope,
                key: r.get("key"),
            },
            r.get("in_flight"),
        ))
    };
    if slots.len() > 1 || !releasing {
        // An UPDATE locks its rows in no particular order: lock them in order first.
        let rows = sqlx::query(
            "SELECT s.scope, s.key, s.in_flight
             FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS w(scope, key, n)
             JOIN slots s ON s.scope = w.scope AND s.key = w.key
             ORDER BY w.n FOR UPDATE OF s",
        )
        .bind(&scopes)
        .bind(&keys)
        .fetch_all(&mut *tx)
        .await?;
        for r in &rows {
            let (k, n) = read(r)?;
            held.insert(k, n);
        }
    }
    if releasing {
        let rows = sqlx::query(
            "UPDATE slots s SET in_flight = s.in_flight - d.n
             FROM unnest($1::text[], $2::text[], $3::bigint[]) AS d(scope, key, n)
             WHERE s.scope = d.scope AND s.key = d.key AND d.n <> 0
             RETURNING s.scope, s.key, s.in_flight",
        )
        .bind(&scopes)
        .bind(&keys)
        .bind(minus)
        .fetch_all(&mut *tx)
        .await?;
        for r in &rows {
            let (k, n) = read(r)?;
            held.insert(k, n);
        }
    }
    Ok(held)
}

/// What one admission did.
#[derive(Debug, Default)]
pub struct Dispatched {
    pub admitted: Vec<Admitted>,
    pub messages: Vec<MessageData>,
    /// The in-flight bound, not the batch size, stopped the admission (more may be queued).
    pub bounded: bool,
    /// The batch size stopped the admission (more may be queued).
    pub full: bool,
}

/// Admits queued steps of `queue` (a `{namespace}.{queue}` key) as [`Admission`] allows (the queue's slot already locked by
/// [`lock_slots`]), highest priority first. In the caller's transaction: the [`ADMIT`]
/// transition (a new attempt number, the lease), an outbox entry per step, and the slot's count.
/// Returns the admitted attempts with everything their step messages need — but not the data
/// of a step whose context, parent outputs and element together are over `max_data_bytes` (as
/// JSON): it is not assembled ([`MessageData::data_bytes`]).
pub async fn admit_locked(
    tx: &mut PgConnection,
    queue: &str,
    admission: Admission,
    max_data_bytes: i64,
) -> Result<Dispatched> {
    if admission.take <= 0 {
        return Ok(Dispatched {
            bounded: admission.bound_limits,
            ..Dispatched::default()
        });
    }
    // The guard `state = 'queued'` is a literal so that it matches the partial index of queued
    // steps; parents are read by the final SELECT: never rows this statement changes. An
    // instance of a mapped step gets its element instead of its parent's outputs (which hold
    // the whole array: sending it with every instance would cost O(n²)).
    let rows = sqlx::query(
        "WITH picked AS (
             SELECT id FROM steps
             WHERE namespace = split_part($1, '.', 1) AND queue = split_part($1, '.', 2)
               AND state = 'queued'
             ORDER BY priority DESC, queued_at, id
             LIMIT $2
             FOR UPDATE SKIP LOCKED
         ), admitted AS (
             UPDATE steps s
             SET state = $3,
                 attempt = s.attempt + 1,
                 dispatched_at = now(),
                 started_at = NULL,
                 worker = NULL,
                 lease_expires_at = now()
                     + (s.queue_wait_timeout_ms + s.execution_timeout_ms) * interval '1 millisecond',
                 updated_at = now()
             FROM picked WHERE s.id = picked.id
             RETURNING s.id, s.task_id, s.namespace, s.name, s.handler, s.queue, s.attempt,
                       s.state, s.execution_timeout_ms, s.parent_ids, s.map_of, s.map_index,
                       s.map_item, s.failure
         ), entries AS (
             INSERT INTO outbox (step_id, attempt, namespace)
             SELECT id, attempt, namespace FROM admitted
             RETURNING id AS outbox_id, step_id
         ), taken AS (
             UPDATE slots SET in_flight = in_flight + (SELECT count(*) FROM admitted)
             WHERE scope = 'queue' AND key = $1 AND EXISTS (SELECT 1 FROM admitted)
         )
         SELECT e.outbox_id, a.id, a.task_id, a.namespace, t.template_name, a.name, a.handler,
                a.queue, a.attempt, a.state, a.execution_timeout_ms, a.map_index, a.map_item, a.failure,
                t.trace_parent, z.bytes AS data_bytes,
                CASE WHEN z.bytes <= $4 THEN t.context END AS context,
                CASE WHEN z.bytes > $4 THEN NULL WHEN a.map_of IS NULL THEN
                    (SELECT coalesce(jsonb_object_agg(p.name, coalesce(p.output, 'null'::jsonb)), '{}'::jsonb)
                     FROM unnest(a.parent_ids) AS pid(id) JOIN steps p ON p.id = pid.id
                     WHERE p.state <> 'skipped')
                ELSE '{}'::jsonb END AS parent_outputs
         FROM entries e
         JOIN admitted a ON a.id = e.step_id
         JOIN tasks t ON t.id = a.task_id
         CROSS JOIN LATERAL (
             SELECT (octet_length(t.context::text) + coalesce(octet_length(a.map_item::text), 0)
                     + CASE WHEN a.map_of IS NULL THEN coalesce(
                           (SELECT sum(octet_length(p.output::text))
                            FROM unnest(a.parent_ids) AS pid(id) JOIN steps p ON p.id = pid.id
                            WHERE p.state <> 'skipped'), 0)
                       ELSE 0 END)::bigint AS bytes
         ) z",
    )
    .bind(queue)
    .bind(admission.take)
    .bind(ADMIT.to)
    .bind(max_data_bytes)
    .fetch_all(&mut *tx)
    .await?;
    let admitted: Vec<Admitted> = rows
        .iter()
        .map(|r| Admitted {
            outbox_id: r.get("outbox_id"),
            step_id: StepId(r.get("id")),
            attempt: r.get("attempt"),
        })
        .collect();
    let stopped = admitted.len() as i64 >= admission.take;
    Ok(Dispatched {
        bounded: stopped && admission.bound_limits,
        full: stopped && !admission.bound_limits,
        admitted,
        messages: rows.iter().map(MessageData::from_row).collect(),
    })
}
