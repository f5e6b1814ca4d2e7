//! The end-of-run checks: every accepted submit against the database, the attempts table, and
//! the workers' execution records.

use anyhow::Result;
use serde_json::{Value, json};
use sqlx::{PgPool, Row};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;
use uuid::Uuid;

/// One planned submit: its workflow and what its context decides.
#[derive(Clone, Copy, Debug)]
pub struct Planned {
    pub kind: &'static str,
    /// `decision`: the branch `route` must choose (`left` or `right`).
    pub route: Option<&'static str>,
    /// `map`: the elements `split` outputs (one instance of `work` each).
    pub items: Option<usize>,
}

/// A submit the orchestrator accepted (answered 200 or 201 with a task id).
#[derive(Clone, Debug)]
pub struct Accepted {
    /// The submit's index (`i` in its context, `chaos-{i}` its key).
    pub index: usize,
    pub key: String,
    pub kind: &'static str,
    pub route: Option<&'static str>,
    pub items: Option<usize>,
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
    /// Terminal tasks whose decision, map or child workflow went wrong: an unchosen branch ran
    /// or a chosen one did not, instances missing, doubled or out of order, a mapped output that
    /// does not match its elements, no child task or several for the workflow step, a child
    /// task unfinished, failed or not matching its link, context or output.
    pub wrong: usize,
    /// Decision tasks whose branches were checked (completed ones; failed ones only for the
    /// unchosen branch never running).
    pub decisions_checked: usize,
    /// Completed map tasks whose instances and output were checked.
    pub maps_checked: usize,
    /// Instances of mapped steps in the database.
    pub map_instances: usize,
    /// Skipped steps in the database (unchosen branches and what follows them).
    pub skipped_steps: usize,
    /// Completed `child` tasks whose child task, its link, context, steps and output were
    /// checked.
    pub children_checked: usize,
    /// Child tasks in the database (tasks with a parent).
    pub child_tasks: usize,
    /// `child_retried` events (a child-workflow step's retry ran its child again).
    pub child_retries: usize,
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

/// Element `i` of the array the `map` workflow maps over: the same function as in
/// `chaos-worker` (whose `chaos_items` handler outputs these and whose instances check theirs).
fn item(i: usize) -> Value {
    json!(format!("e{i}"))
}

/// How the execution records name a step: `name`, or `name[index]` for an instance.
pub fn record_name(name: &str, map_index: Option<i32>) -> String {
    match map_index {
        Some(i) => format!("{name}[{i}]"),
        None => name.to_owned(),
    }
}

/// `expected_steps`: template steps per kind (a map task's instances come on top); `ex`: the
/// workers' execution records (an unchosen branch must never have run).
pub async fn check(
    db: &PgPool,
    accepted: &[Accepted],
    expected_steps: &HashMap<&str, usize>,
    ex: &Executions,
) -> Result<Verdict> {
    let mut v = Verdict::default();
    let tasks = sqlx::query(
        "SELECT id, idempotency_key, state, template_name, template_version, namespace,
                parent_task_id, parent_step_id, depth,
                CASE WHEN parent_task_id IS NOT NULL THEN context END AS context,
                CASE WHEN parent_task_id IS NOT NULL THEN output END AS output, error
         FROM tasks",
    )
    .fetch_all(db)
    .await?;
    v.tasks_in_db = tasks.len();
    let mut by_key: HashMap<String, (Uuid, String, String)> = HashMap::new();
    // Child tasks by their parent task.
    let mut children_of: HashMap<Uuid, Vec<ChildTask>> = HashMap::new();
    for r in tasks {
        if let Some(k) = r.get::<Option<String>, _>("idempotency_key") {
            by_key.insert(k, (r.get("id"), r.get("state"), r.get("template_name")));
        }
        if let Some(parent) = r.get::<Option<Uuid>, _>("parent_task_id") {
            v.child_tasks += 1;
            children_of.entry(parent).or_default().push(ChildTask {
                id: r.get("id"),
                state: r.get("state"),
                namespace: r.get("namespace"),
                template: r.get("template_name"),
                version: r.get("template_version"),
                parent_step: r.get("parent_step_id"),
                depth: r.get("depth"),
                context: r.get("context"),
                output: r.get("output"),
                error: r.get("error"),
            });
        }
    }
    // `child_started` / `child_retried` events: (task, kind) -> the child task ids they name.
    let mut child_events: HashMap<(Uuid, String), Vec<Option<Uuid>>> = HashMap::new();
    for r in sqlx::query(
        "SELECT task_id, kind, detail->>'child_task_id' AS child FROM task_events
         WHERE kind IN ('child_started', 'child_retried')",
    )
    .fetch_all(db)
    .await?
    {
        let child: Option<String> = r.get("child");
        child_events
            .entry((r.get("task_id"), r.get("kind")))
            .or_default()
            .push(child.and_then(|c| c.parse().ok()));
    }
    v.child_retries = child_events
        .iter()
        .filter(|((_, kind), _)| kind == "child_retried")
        .map(|(_, c)| c.len())
        .sum();
    struct StepRow {
        id: Uuid,
        name: String,
        state: String,
        attempt: i32,
        ok_rows: i64,
        ok_attempt: Option<i32>,
        /// A mapped step (never run itself: its instances are; it has no attempt rows).
        mapped: bool,
        /// An instance of a mapped step: its index.
        map_index: Option<i32>,
        skip_cause: Option<String>,
        /// A child-workflow step (never run by a worker: its child task is).
        workflow: bool,
        /// A child-workflow step's child task.
        child_task: Option<Uuid>,
        /// A mapped or child-workflow step's output (read for those only).
        output: Option<Value>,
        error: Option<String>,
    }
    let mut steps: HashMap<Uuid, Vec<StepRow>> = HashMap::new();
    let rows = sqlx::query(
        "SELECT s.id, s.task_id, s.name, s.state, s.attempt, s.map_over IS NOT NULL AS mapped,
                s.map_index, s.skip_cause, s.workflow IS NOT NULL AS workflow, s.child_task_id,
                CASE WHEN s.map_over IS NOT NULL OR s.workflow IS NOT NULL THEN s.output END AS output,
                s.error,
                count(a.attempt) FILTER (WHERE a.outcome = 'succeeded') AS ok_rows,
                max(a.attempt) FILTER (WHERE a.outcome = 'succeeded') AS ok_attempt
         FROM steps s LEFT JOIN attempts a ON a.step_id = s.id
         GROUP BY s.id",
    )
    .fetch_all(db)
    .await?;
    for r in rows {
        let row = StepRow {
            id: r.get("id"),
            name: r.get("name"),
            state: r.get("state"),
            attempt: r.get("attempt"),
            ok_rows: r.get("ok_rows"),
            ok_attempt: r.get("ok_attempt"),
            mapped: r.get("mapped"),
            map_index: r.get("map_index"),
            skip_cause: r.get("skip_cause"),
            workflow: r.get("workflow"),
            child_task: r.get("child_task_id"),
            output: r.get("output"),
            error: r.get("error"),
        };
        if row.map_index.is_some() {
            v.map_instances += 1;
        }
        if row.state == "skipped" {
            v.skipped_steps += 1;
        }
        if row.mapped {
            if row.ok_rows > 0 {
                v.sql_row_without_success += 1;
            }
        } else if row.state == "succeeded" {
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
        // A map task's instances are created only as its mapped step runs: a failed task may
        // have fewer.
        let want = expected_steps.get(a.kind).copied().unwrap_or(0)
            + if state == "completed" {
                a.items.unwrap_or(0)
            } else {
                0
            };
        let count_ok = if a.kind == "map" && state != "completed" {
            st.len() >= want
        } else {
            st.len() == want
        };
        if !count_ok {
            problems.push(format!("{} steps, expected {want}", st.len()));
        }
        if state == "cancelled" {
            problems.push("cancelled, though nobody cancelled it".into());
        }
        for s in st {
            let name = record_name(&s.name, s.map_index);
            if !TERMINAL_STEP.contains(&s.state.as_str()) {
                problems.push(format!("step {name} is {} in a {state} task", s.state));
            }
            // In a completed task every step succeeded, but the branches a decision left out
            // (and what depends on them only).
            let left_out = s.state == "skipped"
                && matches!(
                    s.skip_cause.as_deref(),
                    Some("not_chosen" | "parent_skipped")
                );
            if state == "completed" && s.state != "succeeded" && !left_out {
                problems.push(format!(
                    "step {name} is {} ({:?}) in a completed task",
                    s.state, s.skip_cause
                ));
            }
            if s.state == "succeeded"
                && !s.mapped
                && (s.ok_rows != 1 || s.ok_attempt != Some(s.attempt))
            {
                problems.push(format!(
                    "step {name} succeeded at attempt {} but has {} succeeded attempt rows (attempt {:?})",
                    s.attempt, s.ok_rows, s.ok_attempt
                ));
            }
            if s.mapped && s.ok_rows > 0 {
                problems.push(format!(
                    "mapped step {name} has {} succeeded attempt rows of its own",
                    s.ok_rows
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
            continue;
        }

        // What the dynamic workflows decided.
        let find = |name: &str| st.iter().find(|s| s.name == name && s.map_index.is_none());
        let mut wrong = Vec::new();
        if let (Some(route), "decision") = (a.route, a.kind) {
            v.decisions_checked += 1;
            let (chosen, other) = if route == "left" {
                (&["left", "left_tail"][..], &["right"][..])
            } else {
                (&["right"][..], &["left", "left_tail"][..])
            };
            // Whatever became of the task, an unchosen branch never runs.
            for name in other {
                if let Some(runs) = ex.runs.get(&(*id, (*name).to_owned())) {
                    wrong.push(format!(
                        "{name} was not chosen ({route} was) but ran {} times",
                        runs.len()
                    ));
                }
            }
            if state == "completed" {
                for name in chosen.iter().chain(["route", "after"].iter()) {
                    match find(name) {
                        Some(s) if s.state == "succeeded" => {}
                        Some(s) => wrong.push(format!(
                            "{name} should have succeeded (route chose {route}) but is {} ({:?})",
                            s.state, s.skip_cause
                        )),
                        None => wrong.push(format!("no step {name}")),
                    }
                }
                for (i, name) in other.iter().enumerate() {
                    // The unchosen branch itself, then what depends on it.
                    let cause = if i == 0 {
                        "not_chosen"
                    } else {
                        "parent_skipped"
                    };
                    match find(name) {
                        Some(s) if s.state == "skipped" && s.skip_cause.as_deref() == Some(cause) => {}
                        Some(s) => wrong.push(format!(
                            "{name} should be skipped ({cause}; route chose {route}) but is {} ({:?})",
                            s.state, s.skip_cause
                        )),
                        None => wrong.push(format!("no step {name}")),
                    }
                }
            }
        }
        if let (Some(n), "map", "completed") = (a.items, a.kind, state.as_str()) {
            v.maps_checked += 1;
            let mut seen = vec![0u32; n];
            for s in st.iter().filter(|s| s.name == "work") {
                match s.map_index {
                    Some(i) if (0..n as i32).contains(&i) => seen[i as usize] += 1,
                    Some(i) => wrong.push(format!("instance work[{i}] beyond {n} elements")),
                    None => {}
                }
            }
            let missing = seen.iter().filter(|c| **c == 0).count();
            let doubled = seen.iter().filter(|c| **c > 1).count();
            if missing > 0 || doubled > 0 {
                wrong.push(format!(
                    "{n} elements: {missing} without an instance, {doubled} with more than one"
                ));
            }
            match find("work").map(|s| (s.mapped, s.output.as_ref())) {
                Some((true, Some(Value::Array(out)))) => {
                    if out.len() != n {
                        wrong.push(format!(
                            "work's output has {} entries for {n} elements",
                            out.len()
                        ));
                    }
                    if let Some(k) = (0..n.min(out.len()))
                        .find(|&k| out[k] != json!({"ok": true, "index": k, "item": item(k)}))
                    {
                        wrong.push(format!(
                            "work's output entry {k} is {}, expected index {k} and element {}",
                            out[k],
                            item(k)
                        ));
                    }
                }
                Some((mapped, output)) => wrong.push(format!(
                    "work (mapped: {mapped}) has output {:?}, not an array",
                    output.map(Value::to_string)
                )),
                None => wrong.push("no mapped step work".into()),
            }
        }
        if a.kind == "child" {
            let children = children_of.get(id).map(Vec::as_slice).unwrap_or_default();
            let started = child_events
                .get(&(*id, "child_started".to_owned()))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let sub = find("sub");
            // Whatever became of the task: the workflow step never reaches a worker, it has at
            // most one child, linked both ways, and a terminal task's child is terminal.
            if let Some(runs) = ex.runs.get(&(*id, "sub".to_owned())) {
                wrong.push(format!(
                    "sub (a workflow step) was run by a worker {} times",
                    runs.len()
                ));
            }
            if children.len() > 1 || started.len() > 1 {
                wrong.push(format!(
                    "{} child tasks ({:?}), {} child_started events ({:?}): expected one",
                    children.len(),
                    children.iter().map(|c| c.id).collect::<Vec<_>>(),
                    started.len(),
                    started
                ));
            }
            match sub {
                Some(s) if !s.workflow => wrong.push("sub is not a workflow step".into()),
                None => wrong.push("no step sub".into()),
                Some(_) => {}
            }
            for c in children {
                let why = child_link_problems(c, sub.map(|s| (s.id, s.child_task)), started);
                wrong.extend(why.into_iter().map(|w| format!("child task {}: {w}", c.id)));
                if !matches!(c.state.as_str(), "completed" | "failed" | "cancelled") {
                    wrong.push(format!(
                        "child task {} is {} in a {state} task",
                        c.id, c.state
                    ));
                }
            }
            // Without a child, sub never started: it waits (or was skipped or cancelled) with
            // its task.
            if let Some(s) = sub
                && children.is_empty()
                && (s.child_task.is_some()
                    || !matches!(s.state.as_str(), "waiting" | "skipped" | "cancelled"))
            {
                wrong.push(format!(
                    "sub is {} (child_task_id {:?}) but no child task names this task as its parent",
                    s.state, s.child_task
                ));
            }
            if let (Some(s), [c]) = (sub, children)
                && s.state == "failed"
            {
                let err = s.error.as_deref().unwrap_or_default();
                let prefix = format!("child task {}", c.id);
                if !err.starts_with(&prefix) {
                    wrong.push(format!(
                        "sub failed with {err:?}, which does not name its child {}",
                        c.id
                    ));
                }
            }
            if state == "completed" {
                v.children_checked += 1;
                match (sub, children) {
                    (Some(s), [c]) => {
                        let expected_context = json!({ "i": a.index });
                        let expected_output =
                            json!({ "c2": { "ok": true, "context": expected_context } });
                        if c.state != "completed" {
                            wrong.push(format!(
                                "the task completed but its child task {} is {} (error {:?})",
                                c.id, c.state, c.error
                            ));
                        }
                        if c.context.as_ref() != Some(&expected_context) {
                            wrong.push(format!(
                                "child task {} has context {:?}, expected {expected_context}",
                                c.id,
                                c.context.as_ref().map(Value::to_string)
                            ));
                        }
                        if c.output.as_ref() != Some(&expected_output) {
                            wrong.push(format!(
                                "child task {} has output {:?}, expected {expected_output}",
                                c.id,
                                c.output.as_ref().map(Value::to_string)
                            ));
                        }
                        if s.output != c.output {
                            wrong.push(format!(
                                "sub's output {:?} differs from its child task's {:?}",
                                s.output.as_ref().map(Value::to_string),
                                c.output.as_ref().map(Value::to_string)
                            ));
                        }
                        // The child's own steps: c1 and c2, each succeeded once.
                        let cst = steps.get(&c.id).unwrap_or(&empty);
                        let mut names: Vec<&str> = cst.iter().map(|s| s.name.as_str()).collect();
                        names.sort_unstable();
                        if names != ["c1", "c2"] {
                            wrong.push(format!("child task {} has steps {names:?}", c.id));
                        }
                        for cs in cst {
                            if cs.state != "succeeded"
                                || cs.ok_rows != 1
                                || cs.ok_attempt != Some(cs.attempt)
                            {
                                wrong.push(format!(
                                    "child task {} step {} is {} at attempt {} with {} succeeded attempt rows (attempt {:?})",
                                    c.id, cs.name, cs.state, cs.attempt, cs.ok_rows, cs.ok_attempt
                                ));
                            }
                        }
                    }
                    (_, []) => wrong.push("the task completed without a child task".into()),
                    _ => {}
                }
            }
        }
        if !wrong.is_empty() {
            v.wrong += 1;
            v.problem_tasks
                .push((*id, format!("wrong: {}", wrong.join("; "))));
        }
    }
    v.lost = v.missing + v.id_mismatch + v.bad_steps;
    Ok(v)
}

/// A task with a parent (a child workflow's), as the checks read it.
#[derive(Debug)]
pub struct ChildTask {
    id: Uuid,
    state: String,
    namespace: String,
    template: String,
    version: i32,
    parent_step: Option<Uuid>,
    depth: i32,
    context: Option<Value>,
    output: Option<Value>,
    error: Option<String>,
}

/// What is wrong with a child task's link to the `child` task's workflow step `sub` (its id and
/// `child_task_id`) and the parent's `child_started` events (the child ids they name).
fn child_link_problems(
    c: &ChildTask,
    sub: Option<(Uuid, Option<Uuid>)>,
    started: &[Option<Uuid>],
) -> Vec<String> {
    let mut out = Vec::new();
    if (c.namespace.as_str(), c.template.as_str(), c.version) != ("chaos", "child_sub", 1) {
        out.push(format!(
            "runs {}/{} version {}, expected chaos/child_sub version 1",
            c.namespace, c.template, c.version
        ));
    }
    if c.depth != 1 {
        out.push(format!("depth {}, expected 1", c.depth));
    }
    if let Some((sub_id, sub_child)) = sub {
        if c.parent_step != Some(sub_id) {
            out.push(format!(
                "parent_step_id {:?}, expected sub's id {sub_id}",
                c.parent_step
            ));
        }
        if sub_child != Some(c.id) {
            out.push(format!("sub's child_task_id is {sub_child:?}"));
        }
    }
    if started != [Some(c.id)] {
        out.push(format!(
            "the parent's child_started events name {started:?}"
        ));
    }
    out
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
/// Mapped steps are left out (their instances are what runs), and so are child-workflow steps
/// (their child tasks' steps are what runs).
pub async fn check_executions(db: &PgPool, e: &mut Executions) -> Result<()> {
    let rows = sqlx::query(
        "SELECT task_id, name, map_index, attempt FROM steps
         WHERE state = 'succeeded' AND map_over IS NULL AND workflow IS NULL",
    )
    .fetch_all(db)
    .await?;
    e.succeeded_without_execution = rows
        .iter()
        .filter(|r| {
            let name = record_name(&r.get::<String, _>("name"), r.get("map_index"));
            let key = (r.get::<Uuid, _>("task_id"), name);
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
         FROM steps
         WHERE (task_id = ANY($1) OR task_id IN (SELECT id FROM tasks WHERE parent_task_id = ANY($1)))
           AND state NOT IN ('succeeded', 'failed', 'skipped', 'cancelled')
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
        "problem tasks: {}; their (and their child tasks') unfinished steps: {}; outbox entries (all): {outbox}\n",
        problems.len(),
        summary.join(", ")
    );

    // The problem tasks, each followed by its child tasks (and theirs).
    let mut work: std::collections::VecDeque<(Uuid, String)> =
        problems.iter().take(25).cloned().collect();
    let mut shown = 0;
    while let Some((id, why)) = work.pop_front() {
        shown += 1;
        if shown > 100 {
            let _ = writeln!(out, "== ... ({} more not shown)", work.len() + 1);
            break;
        }
        let id = &id;
        let _ = writeln!(out, "== task {id}: {why}");
        if let Some(t) = sqlx::query(
            "SELECT state, template_name, unfinished_steps, failing, created_at::text, updated_at::text, error,
                    parent_task_id, parent_step_id, depth
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
            if let Some(parent) = t.get::<Option<Uuid>, _>("parent_task_id") {
                let _ = writeln!(
                    out,
                    "   parent: task {parent} step {:?} depth {}",
                    t.get::<Option<Uuid>, _>("parent_step_id"),
                    t.get::<i32, _>("depth"),
                );
            }
        }
        let steps = sqlx::query(
            "SELECT id, name, map_index, state, attempt, failures, pending_parents, dispatched_at::text, started_at::text,
                    lease_expires_at::text, next_attempt_at::text, updated_at::text, worker, error, skip_cause,
                    child_task_id
             FROM steps WHERE task_id = $1 ORDER BY position, map_index NULLS FIRST",
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
        let wrong = why.starts_with("wrong");
        for s in steps {
            let name = record_name(&s.get::<String, _>("name"), s.get("map_index"));
            let state: String = s.get("state");
            // A wrong decision or map: every step but waiting ones (not shown above).
            let boring = TERMINAL_STEP.contains(&state.as_str()) && state != "failed" && !wrong;
            if state == "waiting" || boring {
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
                 started_at={:?} lease_expires_at={:?} next_attempt_at={:?} updated_at={:?} worker={:?} error={:?} \
                 skip_cause={:?} child_task_id={:?}\n     executions (attempt, ok): {runs:?}",
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
                s.get::<Option<String>, _>("skip_cause"),
                s.get::<Option<Uuid>, _>("child_task_id"),
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
        // Its child tasks next (in creation order), with the same kind of problem.
        let children = sqlx::query(
            "SELECT c.id, s.name FROM tasks c LEFT JOIN steps s ON s.id = c.parent_step_id
             WHERE c.parent_task_id = $1 ORDER BY c.id DESC",
        )
        .bind(id)
        .fetch_all(db)
        .await?;
        let kind = why.split(':').next().unwrap_or("?");
        for c in children {
            work.push_front((
                c.get("id"),
                format!(
                    "{kind}: child task of {id} (its step {:?})",
                    c.get::<Option<String>, _>("name")
                ),
            ));
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
