//! The end-of-run checks: every accepted submit against the database, the attempts table, and
//! the workers' execution records.

use anyhow::Result;
use sqlx::{PgPool, Row};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;
use uuid::Uuid;

/// A submit the orchestrator accepted (answered 200 or 201 with a task id).
#[derive(Clone, Debug)]
pub struct Accepted {
    pub key: String,
    pub kind: &'static str,
    pub task_id: Uuid,
    /// HTTP requests it took (more than 1 when an orchestrator failed mid-request).
    pub requests: u32,
}

#[derive(Debug, Default)]
pub struct Verdict {
    pub tasks_in_db: usize,
    pub completed: usize,
    pub failed: usize,
    pub cancelled: usize,
    /// Accepted, but no task holds the key.
    pub missing: usize,
    /// The key is held by another task id than the one accepted.
    pub id_mismatch: usize,
    /// Terminal tasks whose steps do not add up (missing steps, a non-terminal step, a completed
    /// task with an unsucceeded step, a succeeded step without its succeeded attempt row).
    pub bad_steps: usize,
    pub lost: usize,
    pub stuck: usize,
    /// (step, attempt) pairs with more than one attempts row (the primary key forbids it).
    pub sql_duplicate_attempts: i64,
    /// Succeeded steps with more than one succeeded attempt row.
    pub sql_multiple_successes: usize,
    /// Succeeded steps with no succeeded attempt row.
    pub sql_success_without_row: usize,
    /// Steps not succeeded although a succeeded attempt row exists.
    pub sql_row_without_success: usize,
    /// Tasks in the database whose key was never accepted (a submit the harness gave up on).
    pub unaccepted_in_db: usize,
    pub problem_tasks: Vec<(Uuid, String)>,
}

const TERMINAL_STEP: &[&str] = &["succeeded", "failed", "skipped", "cancelled"];

pub async fn check(
    db: &PgPool,
    accepted: &[Accepted],
    expected_steps: &HashMap<&str, usize>,
) -> Result<Verdict> {
    let mut v = Verdict::default();
    let tasks = sqlx::query("SELECT id, idempotency_key, state, template_name FROM tasks")
        .fetch_all(db)
        .await?;
    v.tasks_in_db = tasks.len();
    let mut by_key: HashMap<String, (Uuid, String, String)> = HashMap::new();
    for r in tasks {
        if let Some(k) = r.get::<Option<String>, _>("idempotency_key") {
            by_key.insert(k, (r.get("id"), r.get("state"), r.get("template_name")));
        }
    }
    struct StepRow {
        name: String,
        state: String,
        attempt: i32,
        ok_rows: i64,
        ok_attempt: Option<i32>,
    }
    let mut steps: HashMap<Uuid, Vec<StepRow>> = HashMap::new();
    let rows = sqlx::query(
        "SELECT s.task_id, s.name, s.state, s.attempt,
                count(a.attempt) FILTER (WHERE a.outcome = 'succeeded') AS ok_rows,
                max(a.attempt) FILTER (WHERE a.outcome = 'succeeded') AS ok_attempt
         FROM steps s LEFT JOIN attempts a ON a.step_id = s.id
         GROUP BY s.id",
    )
    .fetch_all(db)
    .await?;
    for r in rows {
        let row = StepRow {
            name: r.get("name"),
            state: r.get("state"),
            attempt: r.get("attempt"),
            ok_rows: r.get("ok_rows"),
            ok_attempt: r.get("ok_attempt"),
        };
        if row.state == "succeeded" {
            match row.ok_rows {
                0 => v.sql_success_without_row += 1,
                1 => {}
                _ => v.sql_multiple_successes += 1,
            }
        } else if row.ok_rows > 0 {
            v.sql_row_without_success += 1;
        }
        steps.entry(r.get("task_id")).or_default().push(row);
    }
    v.sql_duplicate_attempts = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT step_id, attempt FROM attempts GROUP BY 1, 2 HAVING count(*) > 1) d",
    )
    .fetch_one(db)
    .await?;

    let accepted_keys: HashSet<&str> = accepted.iter().map(|a| a.key.as_str()).collect();
    v.unaccepted_in_db = by_key
        .keys()
        .filter(|k| !accepted_keys.contains(k.as_str()))
        .count();

    for a in accepted {
        let Some((id, state, _)) = by_key.get(&a.key) else {
            v.missing += 1;
            v.problem_tasks
                .push((a.task_id, format!("lost: no task holds key {}", a.key)));
            continue;
        };
        if *id != a.task_id {
            v.id_mismatch += 1;
            v.problem_tasks.push((
                a.task_id,
                format!("lost: key {} is held by task {id}", a.key),
            ));
            continue;
        }
        match state.as_str() {
            "pending" | "running" => {
                v.stuck += 1;
                v.problem_tasks.push((*id, format!("stuck: {state}")));
                continue;
            }
            "completed" => v.completed += 1,
            "failed" => v.failed += 1,
            _ => v.cancelled += 1,
        }
        let empty = Vec::new();
        let st = steps.get(id).unwrap_or(&empty);
        let mut problems = Vec::new();
        let want = expected_steps.get(a.kind).copied().unwrap_or(0);
        if st.len() != want {
            problems.push(format!("{} steps, expected {want}", st.len()));
        }
        if state == "cancelled" {
            problems.push("cancelled, though nobody cancelled it".into());
        }
        for s in st {
            if !TERMINAL_STEP.contains(&s.state.as_str()) {
                problems.push(format!("step {} is {} in a {state} task", s.name, s.state));
            }
            if state == "completed" && s.state != "succeeded" {
                problems.push(format!(
                    "step {} is {} in a completed task",
                    s.name, s.state
                ));
            }
            if s.state == "succeeded" && (s.ok_rows != 1 || s.ok_attempt != Some(s.attempt)) {
                problems.push(format!(
                    "step {} succeeded at attempt {} but has {} succeeded attempt rows (attempt {:?})",
                    s.name, s.attempt, s.ok_rows, s.ok_attempt
                ));
            }
        }
        if state == "failed" && !st.iter().any(|s| s.state == "failed") {
            problems.push("failed task without a failed step".into());
        }
        if !problems.is_empty() {
            v.bad_steps += 1;
            v.problem_tasks
                .push((*id, format!("lost: {}", problems.join("; "))));
        }
    }
    v.lost = v.missing + v.id_mismatch + v.bad_steps;
    Ok(v)
}

/// What the workers' execution records say.
#[derive(Debug, Default)]
pub struct Executions {
    pub executions: usize,
    /// (task, step) pairs run at least once.
    pub steps_executed: usize,
    /// executions − steps_executed: runs beyond the first of a step (retries included).
    pub duplicate_executions: usize,
    /// executions − distinct (task, step, attempt): the same attempt run more than once
    /// (redelivery after a worker or broker failure).
    pub redelivered_executions: usize,
    /// Succeeded steps whose succeeded attempt no worker recorded running successfully.
    pub succeeded_without_execution: usize,
    pub malformed_lines: usize,
    /// (task, step) -> attempts run, with their outcome.
    pub runs: HashMap<(Uuid, String), Vec<(i32, bool)>>,
}

pub fn read_executions(dir: &Path) -> Result<Executions> {
    let mut e = Executions::default();
    let mut attempts: HashSet<(Uuid, String, i32)> = HashSet::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_log = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("exec-") && n.ends_with(".log"));
        if !is_log {
            continue;
        }
        for line in std::fs::read_to_string(&path)?.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            let parsed = (f.len() >= 4)
                .then(|| {
                    Some((
                        f[0].parse::<Uuid>().ok()?,
                        f[1].to_owned(),
                        f[2].parse::<i32>().ok()?,
                    ))
                })
                .flatten();
            let Some((task, step, attempt)) = parsed else {
                e.malformed_lines += 1;
                continue;
            };
            let ok = f.get(4).is_none_or(|o| *o == "ok");
            e.executions += 1;
            attempts.insert((task, step.clone(), attempt));
            e.runs.entry((task, step)).or_default().push((attempt, ok));
        }
    }
    e.steps_executed = e.runs.len();
    e.duplicate_executions = e.executions - e.steps_executed;
    e.redelivered_executions = e.executions - attempts.len();
    Ok(e)
}

/// Counts succeeded steps whose succeeded attempt has no successful execution record.
pub async fn check_executions(db: &PgPool, e: &mut Executions) -> Result<()> {
    let rows = sqlx::query("SELECT task_id, name, attempt FROM steps WHERE state = 'succeeded'")
        .fetch_all(db)
        .await?;
    e.succeeded_without_execution = rows
        .iter()
        .filter(|r| {
            let key = (r.get::<Uuid, _>("task_id"), r.get::<String, _>("name"));
            let attempt: i32 = r.get("attempt");
            !e.runs
                .get(&key)
                .is_some_and(|runs| runs.iter().any(|&(a, ok)| a == attempt && ok))
        })
        .count();
    Ok(())
}

/// Writes what the database knows about problem tasks to `path`; returns a short summary.
pub async fn diagnose(
    db: &PgPool,
    problems: &[(Uuid, String)],
    e: &Executions,
    path: &Path,
) -> Result<String> {
    let mut out = String::new();
    let ids: Vec<Uuid> = problems.iter().map(|p| p.0).collect();
    // Where the live steps of every problem task are.
    let by_state = sqlx::query(
        "SELECT state, count(*) AS n,
                count(*) FILTER (WHERE state = 'dispatched' AND lease_expires_at < now()) AS lease_expired,
                count(*) FILTER (WHERE state = 'retrying' AND next_attempt_at < now()) AS retry_overdue
         FROM steps WHERE task_id = ANY($1) AND state NOT IN ('succeeded', 'failed', 'skipped', 'cancelled')
         GROUP BY state ORDER BY state",
    )
    .bind(&ids)
    .fetch_all(db)
    .await?;
    let mut summary = Vec::new();
    for r in &by_state {
        let state: String = r.get("state");
        let n: i64 = r.get("n");
        let expired: i64 = r.get("lease_expired");
        let overdue: i64 = r.get("retry_overdue");
        let mut s = format!("{state}={n}");
        if expired > 0 {
            s.push_str(&format!(" (lease expired: {expired})"));
        }
        if overdue > 0 {
            s.push_str(&format!(" (retry overdue: {overdue})"));
        }
        summary.push(s);
    }
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(db)
        .await?;
    let _ = writeln!(
        out,
        "problem tasks: {}; their unfinished steps: {}; outbox entries (all): {outbox}\n",
        problems.len(),
        summary.join(", ")
    );

    for (id, why) in problems.iter().take(25) {
        let _ = writeln!(out, "== task {id}: {why}");
        if let Some(t) = sqlx::query(
            "SELECT state, template_name, unfinished_steps, failing, created_at::text, updated_at::text, error
             FROM tasks WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(db)
        .await?
        {
            let _ = writeln!(
                out,
                "   task: state={} template={} unfinished_steps={} failing={} created={} updated={} error={:?}",
                t.get::<String, _>("state"),
                t.get::<String, _>("template_name"),
                t.get::<i32, _>("unfinished_steps"),
                t.get::<bool, _>("failing"),
                t.get::<String, _>("created_at"),
                t.get::<String, _>("updated_at"),
                t.get::<Option<String>, _>("error"),
            );
        }
        let steps = sqlx::query(
            "SELECT id, name, state, attempt, failures, pending_parents, dispatched_at::text, started_at::text,
                    lease_expires_at::text, next_attempt_at::text, updated_at::text, worker, error
             FROM steps WHERE task_id = $1 ORDER BY position",
        )
        .bind(id)
        .fetch_all(db)
        .await?;
        let waiting = steps
            .iter()
            .filter(|s| s.get::<String, _>("state") == "waiting")
            .count();
        if waiting > 0 {
            let _ = writeln!(
                out,
                "   ({waiting} steps waiting on their parents, not shown)"
            );
        }
        for s in steps {
            let name: String = s.get("name");
            let state: String = s.get("state");
            if state == "waiting" || (TERMINAL_STEP.contains(&state.as_str()) && state != "failed")
            {
                continue;
            }
            let step_id: Uuid = s.get("id");
            let runs = e
                .runs
                .get(&(*id, name.clone()))
                .cloned()
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "   step {name}: state={state} attempt={} failures={} pending_parents={} dispatched_at={:?} \
                 started_at={:?} lease_expires_at={:?} next_attempt_at={:?} updated_at={:?} worker={:?} error={:?}\n     \
                 executions (attempt, ok): {runs:?}",
                s.get::<i32, _>("attempt"),
                s.get::<i32, _>("failures"),
                s.get::<i32, _>("pending_parents"),
                s.get::<Option<String>, _>("dispatched_at"),
                s.get::<Option<String>, _>("started_at"),
                s.get::<Option<String>, _>("lease_expires_at"),
                s.get::<Option<String>, _>("next_attempt_at"),
                s.get::<Option<String>, _>("updated_at"),
                s.get::<Option<String>, _>("worker"),
                s.get::<Option<String>, _>("error"),
            );
            let attempts = sqlx::query(
                "SELECT attempt, outcome, worker, finished_at::text, error FROM attempts WHERE step_id = $1 ORDER BY attempt",
            )
            .bind(step_id)
            .fetch_all(db)
            .await?;
            for a in attempts {
                let _ = writeln!(
                    out,
                    "     attempt {} {} worker={:?} finished={} error={:?}",
                    a.get::<i32, _>("attempt"),
                    a.get::<String, _>("outcome"),
                    a.get::<Option<String>, _>("worker"),
                    a.get::<String, _>("finished_at"),
                    a.get::<Option<String>, _>("error"),
                );
            }
            let outbox =
                sqlx::query("SELECT attempt, created_at::text FROM outbox WHERE step_id = $1")
                    .bind(step_id)
                    .fetch_all(db)
                    .await?;
            for o in outbox {
                let _ = writeln!(
                    out,
                    "     outbox: attempt {} created {}",
                    o.get::<i32, _>("attempt"),
                    o.get::<String, _>("created_at")
                );
            }
        }
    }
    std::fs::write(path, &out)?;
    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, why) in problems {
        *by_kind
            .entry(why.split(':').next().unwrap_or("?"))
            .or_default() += 1;
    }
    Ok(format!(
        "{:?}; unfinished steps of those tasks: [{}]; outbox entries: {outbox}",
        by_kind,
        summary.join(", ")
    ))
}
