//! Dynamic workflows end to end: decision steps and joins, mapped steps (empty, one, many,
//! `max_parallel`, `tolerate`, bad arrays), and retrying a task that decided and mapped.

use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tasker_schemas::api::{StepView, TaskView};
use tasker_schemas::{StepState, TaskState};
use tasker_tests::Harness;
use tasker_tests::tasker_worker::{Decision, StepError};

fn step<'a>(task: &'a TaskView, name: &str) -> &'a StepView {
    task.steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step {name} in {task:#?}"))
}

fn states(task: &TaskView) -> HashMap<&str, StepState> {
    task.steps
        .iter()
        .map(|s| (s.name.as_str(), s.state))
        .collect()
}

const SHIPPING: &str = "namespace: t
name: shipping
version: 1
steps:
  - { name: route, handler: route, decides: [express, standard] }
  - { name: express, handler: echo, depends_on: [route] }
  - { name: standard, handler: echo, depends_on: [route] }
  - { name: label, handler: echo, depends_on: [express] }
  - { name: audit, handler: echo, depends_on: [standard, route] }
  - { name: ship, handler: echo, depends_on: [express, standard], join: any }
  - { name: notify, handler: echo, depends_on: [ship] }
";

fn shipping_worker(h: &Harness) -> tasker_tests::tasker_worker::WorkerBuilder {
    h.worker("t")
        .concurrency(16)
        .decision_fn("route", |ctx| async move {
            let choose: Vec<String> =
                serde_json::from_value(ctx.input::<Value>()?["choose"].clone())
                    .map_err(|e| StepError::permanent(e.to_string()))?;
            Ok(Decision::choose(choose).output(json!({"routed": true})))
        })
        .handler_fn("echo", |ctx| async move {
            let parents: Vec<String> = ctx.parent_outputs().keys().cloned().collect();
            Ok(json!({ "step": ctx.step(), "parents": parents }))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_runs_the_chosen_branch_and_skips_the_rest() -> anyhow::Result<()> {
    use StepState::*;
    let h = Harness::start().await?;
    h.register_yaml(SHIPPING).await?;
    h.spawn_worker(shipping_worker(&h)).await?;

    // express chosen: standard is skipped, and with it audit (join: all); ship (join: any)
    // runs on express alone.
    let task = h
        .run("t", "shipping", json!({"choose": ["express"]}))
        .await?;
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    assert_eq!(
        states(&task),
        HashMap::from([
            ("route", Succeeded),
            ("express", Succeeded),
            ("standard", Skipped),
            ("label", Succeeded),
            ("audit", Skipped),
            ("ship", Succeeded),
            ("notify", Succeeded),
        ])
    );
    assert_eq!(
        step(&task, "standard").skip_reason.as_deref(),
        Some("not chosen by route")
    );
    assert_eq!(
        step(&task, "audit").skip_reason.as_deref(),
        Some("parent standard was skipped")
    );
    assert_eq!(
        step(&task, "ship").output.as_ref().unwrap()["parents"],
        json!(["express"]),
        "a join: any step sees the parents that ran"
    );
    assert_eq!(step(&task, "route").output, Some(json!({"routed": true})));

    // Nothing chosen: both branches skipped, ship too (every parent skipped), notify after it.
    let task = h.run("t", "shipping", json!({"choose": []})).await?;
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    let s = states(&task);
    for name in ["express", "standard", "label", "audit", "ship", "notify"] {
        assert_eq!(s[name], Skipped, "{name}: {task:#?}");
    }
    assert_eq!(
        step(&task, "ship").skip_reason.as_deref(),
        Some("every parent was skipped")
    );

    // Both chosen: everything runs; ship once, after both.
    let task = h
        .run("t", "shipping", json!({"choose": ["standard", "express"]}))
        .await?;
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    assert!(task.steps.iter().all(|s| s.state == Succeeded), "{task:#?}");
    let mut parents: Vec<String> =
        serde_json::from_value(step(&task, "ship").output.as_ref().unwrap()["parents"].clone())?;
    parents.sort();
    assert_eq!(parents, vec!["express", "standard"]);

    // An unknown branch is a permanent failure with a clear error.
    let task = h
        .run("t", "shipping", json!({"choose": ["teleport"]}))
        .await?;
    assert_eq!(task.state, TaskState::Failed, "{task:#?}");
    let route = step(&task, "route");
    assert_eq!((route.state, route.attempt), (Failed, 1));
    let error = route.error.as_deref().unwrap();
    assert!(
        error.contains("chose unknown branch \"teleport\": it may choose from [express, standard]"),
        "{error}"
    );
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branches_from_a_step_that_decides_nothing_fail_it() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t\nname: nodecide\nversion: 1\nsteps:\n  - { name: a, handler: chooser }\n  - { name: b, handler: chooser, depends_on: [a] }\n",
    )
    .await?;
    h.spawn_worker(h.worker("t").decision_fn("chooser", |_ctx| async move {
        Ok(Decision::choose(["b"]).output(json!(1)))
    }))
    .await?;
    let task = h.run("t", "nodecide", json!({})).await?;
    assert_eq!(task.state, TaskState::Failed, "{task:#?}");
    let a = step(&task, "a");
    assert_eq!(a.state, StepState::Failed);
    assert!(
        a.error.as_deref().unwrap().contains("declares no decides"),
        "{a:#?}"
    );
    assert_eq!(step(&task, "b").state, StepState::Skipped);
    h.finish().await;
    Ok(())
}

fn map_template(name: &str, map: &str) -> String {
    format!(
        "namespace: t
name: {name}
version: 1
steps:
  - {{ name: list, handler: list }}
  - {{ name: resize, handler: resize, depends_on: [list], map: {map} }}
  - {{ name: collect, handler: collect, depends_on: [resize] }}
"
    )
}

fn map_worker(h: &Harness) -> tasker_tests::tasker_worker::WorkerBuilder {
    h.worker("t")
        .concurrency(64)
        .handler_fn("list", |ctx| async move {
            let input = ctx.input::<Value>()?;
            // {"count": n} makes the array here (the task's context reaches every instance).
            if let Some(n) = input["count"].as_u64() {
                return Ok(json!({ "images": (0..n).collect::<Vec<u64>>() }));
            }
            Ok(json!({ "images": input["images"].clone() }))
        })
        .handler_fn("resize", |ctx| async move {
            let item = ctx.item().cloned().unwrap_or(Value::Null);
            if item == json!("bad") {
                return Err(StepError::permanent(format!(
                    "bad image at {:?}",
                    ctx.index()
                )));
            }
            if let Some(ms) = item.get("sleep_ms").and_then(Value::as_u64) {
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            Ok(json!({ "index": ctx.index(), "item": item, "key": ctx.idempotency_key() }))
        })
        .handler_fn("collect", |ctx| async move {
            let resized: Value = ctx.parent("resize")?;
            Ok(json!({ "count": resized.as_array().map(Vec::len) }))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_runs_one_instance_per_element() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(&map_template(
        "gallery",
        "{ over: list.images, max_parallel: 3 }",
    ))
    .await?;
    h.spawn_worker(map_worker(&h)).await?;

    // Empty: the mapped step succeeds at once with [].
    let task = h.run("t", "gallery", json!({"images": []})).await?;
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    assert_eq!(step(&task, "resize").output, Some(json!([])));
    assert_eq!(task.output, Some(json!({"collect": {"count": 0}})));

    // One element.
    let task = h
        .run("t", "gallery", json!({"images": [{"id": 7}]}))
        .await?;
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    let resize = step(&task, "resize");
    let out = resize.output.as_ref().unwrap();
    assert_eq!(out[0]["item"], json!({"id": 7}));
    assert_eq!(out[0]["key"], json!(format!("{}:resize:0", task.id)));

    // Twenty elements, three at a time: outputs in element order, the bound never exceeded.
    let images: Vec<Value> = (0..20).map(|i| json!({"n": i, "sleep_ms": 20})).collect();
    let task = h.run("t", "gallery", json!({"images": images})).await?;
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    let resize = step(&task, "resize");
    let out = resize.output.as_ref().unwrap().as_array().unwrap().clone();
    assert_eq!(out.len(), 20);
    for (i, o) in out.iter().enumerate() {
        assert_eq!(o["index"], json!(i));
        assert_eq!(o["item"]["n"], json!(i));
    }
    let map = resize.map.as_ref().unwrap();
    assert_eq!((map.total, map.succeeded, map.failed), (Some(20), 20, 0));
    assert_eq!(task.output, Some(json!({"collect": {"count": 20}})));
    let peak = peak_in_flight(&h, &task).await?;
    assert!((1..=3).contains(&peak), "max_parallel 3, peak {peak}");

    // The instances, a page at a time.
    let page = h.client().instances(task.id, "resize", Some(9), 5).await?;
    let indexes: Vec<u32> = page.instances.iter().map(|i| i.index).collect();
    assert_eq!(indexes, vec![10, 11, 12, 13, 14]);
    assert!(page.more);
    assert_eq!(page.instances[0].state, StepState::Succeeded);
    h.finish().await;
    Ok(())
}

/// The most instances of the task's mapped step whose attempts overlapped in time (from the
/// attempts table: dispatched to finished).
async fn peak_in_flight(h: &Harness, task: &TaskView) -> anyhow::Result<i64> {
    let db = h.shared(0).db;
    let peak: Option<i64> = sqlx::query_scalar(
        "WITH a AS (
             SELECT a.dispatched_at AS at, 1 AS d FROM attempts a JOIN steps s ON s.id = a.step_id
             WHERE a.task_id = $1 AND s.map_of IS NOT NULL
             UNION ALL
             SELECT a.finished_at, -1 FROM attempts a JOIN steps s ON s.id = a.step_id
             WHERE a.task_id = $1 AND s.map_of IS NOT NULL
         )
         SELECT max(running) FROM (SELECT sum(d) OVER (ORDER BY at, d) AS running FROM a) r",
    )
    .bind(task.id.0)
    .fetch_one(&db)
    .await?;
    Ok(peak.unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arrays_fail_the_mapped_step_clearly() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(&map_template(
        "strict",
        "{ over: list.images, max_items: 3 }",
    ))
    .await?;
    h.spawn_worker(map_worker(&h)).await?;
    for (images, expected) in [
        (json!(5), "found number, not an array"),
        (
            json!([1, 2, 3, 4]),
            "found 4 elements; at most 3 are allowed",
        ),
        (Value::Null, "found null, not an array"),
    ] {
        let task = h.run("t", "strict", json!({"images": images})).await?;
        assert_eq!(task.state, TaskState::Failed, "{task:#?}");
        let resize = step(&task, "resize");
        assert_eq!(resize.state, StepState::Failed);
        let error = resize.error.as_deref().unwrap();
        assert!(error.contains(expected), "{error}");
        assert!(error.contains("list.images"), "{error}");
        assert_eq!(step(&task, "collect").state, StepState::Skipped);
    }
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_tolerates_failed_instances_up_to_its_limit() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(&map_template(
        "tolerant",
        "{ over: list.images, max_parallel: 2, tolerate: 1 }",
    ))
    .await?;
    h.spawn_worker(map_worker(&h)).await?;
    let task = h
        .run("t", "tolerant", json!({"images": ["a", "bad", "c"]}))
        .await?;
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    let out = step(&task, "resize").output.clone().unwrap();
    assert_eq!(out[1], Value::Null, "a tolerated failure is null: {out}");
    assert_eq!(out[2]["item"], json!("c"));
    let map = step(&task, "resize").map.clone().unwrap();
    assert_eq!((map.succeeded, map.failed), (2, 1));
    let page = h.client().instances(task.id, "resize", None, 10).await?;
    assert!(
        page.instances[1]
            .error
            .as_deref()
            .unwrap()
            .contains("bad image at Some(1)"),
        "{page:#?}"
    );

    // Two failures are one too many: the task fails.
    let task = h
        .run("t", "tolerant", json!({"images": ["bad", "bad", "c"]}))
        .await?;
    assert_eq!(task.state, TaskState::Failed, "{task:#?}");
    assert_eq!(step(&task, "collect").state, StepState::Skipped);
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_task_never_decides_or_expands_again() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t
name: again
version: 1
steps:
  - { name: route, handler: route, decides: [fast, slow] }
  - { name: fast, handler: list, depends_on: [route] }
  - { name: slow, handler: list, depends_on: [route] }
  - { name: resize, handler: resize, depends_on: [fast], map: { over: fast.images, max_parallel: 4 } }
",
    )
    .await?;
    let routed = Arc::new(AtomicUsize::new(0));
    let listed = Arc::new(AtomicUsize::new(0));
    let runs = Arc::new(std::sync::Mutex::new(HashMap::<u32, usize>::new()));
    let (r, l, n) = (routed.clone(), listed.clone(), runs.clone());
    h.spawn_worker(
        h.worker("t")
            .concurrency(8)
            .decision_fn("route", move |_ctx| {
                let r = r.clone();
                async move {
                    // Chooses "fast" the first time and "slow" afterwards: a re-decision shows.
                    let first = r.fetch_add(1, Ordering::SeqCst) == 0;
                    Ok(Decision::choose([if first { "fast" } else { "slow" }]).output(json!(null)))
                }
            })
            .handler_fn("list", move |ctx| {
                let l = l.clone();
                async move {
                    l.fetch_add(1, Ordering::SeqCst);
                    Ok(json!({ "images": ctx.input::<Value>()?["images"].clone() }))
                }
            })
            .handler_fn("resize", move |ctx| {
                let n = n.clone();
                async move {
                    let index = ctx.index().unwrap_or(u32::MAX);
                    let runs = {
                        let mut m = n.lock().unwrap();
                        let e = m.entry(index).or_default();
                        *e += 1;
                        *e
                    };
                    // Element 5 fails for good the first time only.
                    if index == 5 && runs == 1 {
                        return Err(StepError::permanent("not yet"));
                    }
                    Ok(json!(index))
                }
            }),
    )
    .await?;
    let images: Vec<u32> = (0..12).collect();
    let task = h.run("t", "again", json!({"images": images})).await?;
    assert_eq!(task.state, TaskState::Failed, "{task:#?}");
    assert_eq!(step(&task, "slow").state, StepState::Skipped);

    h.client().retry(task.id).await?;
    let task = h.wait(task.id).await?;
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    assert_eq!(
        routed.load(Ordering::SeqCst),
        1,
        "the decision is not made again"
    );
    assert_eq!(
        listed.load(Ordering::SeqCst),
        1,
        "fast ran once, slow never"
    );
    assert_eq!(step(&task, "slow").state, StepState::Skipped);
    assert_eq!(
        step(&task, "slow").skip_reason.as_deref(),
        Some("not chosen by route")
    );
    let out = step(&task, "resize").output.clone().unwrap();
    assert_eq!(out, json!((0..12).collect::<Vec<u32>>()));
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs[&5], 2, "the failed instance ran again");
    let ran_twice: Vec<u32> = runs
        .iter()
        .filter(|(i, n)| **i != 5 && **n > 1)
        .map(|(i, _)| *i)
        .collect();
    assert!(
        ran_twice.is_empty(),
        "succeeded instances ran again: {ran_twice:?}"
    );
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_over_10000_elements() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(&map_template(
        "wide",
        "{ over: list.images, max_parallel: 1000 }",
    ))
    .await?;
    h.spawn_worker(map_worker(&h).concurrency(256)).await?;
    let started = std::time::Instant::now();
    let id = h.submit("t", "wide", json!({"count": 10_000})).await?;
    let task = h.wait_for(id, std::time::Duration::from_secs(180)).await?;
    let took = started.elapsed();
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    let resize = step(&task, "resize");
    let out = resize.output.as_ref().unwrap().as_array().unwrap();
    assert_eq!(out.len(), 10_000);
    assert!(out.iter().enumerate().all(|(i, o)| o["item"] == json!(i)));
    assert_eq!(task.output, Some(json!({"collect": {"count": 10_000}})));
    let peak = peak_in_flight(&h, &task).await?;
    assert!(peak <= 1000, "peak {peak}");
    println!(
        "{}",
        json!({"config": "dynamic-map-10000-debug", "instances": 10_000, "seconds": took.as_secs_f64(), "peak_in_flight": peak})
    );
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_task_runs_its_failure_handler_once() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(
        "namespace: t
name: compensate
version: 1
steps:
  - { name: charge, handler: ok }
  - { name: ship, handler: boom, depends_on: [charge] }
  - { name: later, handler: ok, depends_on: [ship] }
on_failure: { handler: refund, retry: { max_attempts: 2, initial_delay: 10ms } }
",
    )
    .await?;
    let refunds = Arc::new(AtomicUsize::new(0));
    let r = refunds.clone();
    h.spawn_worker(
        h.worker("t")
            .handler_fn(
                "ok",
                |ctx| async move { Ok(json!({"charged": ctx.step()})) },
            )
            .handler_fn("boom", |_ctx| async move {
                Err::<Value, _>(StepError::permanent("carrier refused the parcel"))
            })
            .handler_fn("refund", move |ctx| {
                let r = r.clone();
                async move {
                    // The first attempt fails: the handler's own retry policy applies.
                    if r.fetch_add(1, Ordering::SeqCst) == 0 {
                        return Err(StepError::retryable("bank busy"));
                    }
                    let failure = ctx.failure().cloned().expect("the failure");
                    let parents: Vec<String> = ctx.parent_outputs().keys().cloned().collect();
                    Ok(json!({"failed": failure.step, "error": failure.error, "had": parents}))
                }
            }),
    )
    .await?;
    let task = h.run("t", "compensate", json!({})).await?;
    assert_eq!(task.state, TaskState::Failed, "{task:#?}");
    assert!(task.error.as_deref().unwrap().contains("carrier refused"));
    let handler = step(&task, "on_failure");
    assert_eq!(handler.state, StepState::Succeeded, "{task:#?}");
    assert_eq!(handler.attempt, 2);
    assert_eq!(
        handler.output,
        Some(json!({"failed": "ship", "error": "carrier refused the parcel", "had": ["charge"]}))
    );
    assert_eq!(step(&task, "later").state, StepState::Skipped);
    assert_eq!(refunds.load(Ordering::SeqCst), 2);
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_task_ends_its_mapped_step() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(&map_template(
        "slowmap",
        "{ over: list.images, max_parallel: 2 }",
    ))
    .await?;
    h.spawn_worker(map_worker(&h)).await?;
    let images: Vec<Value> = (0..10).map(|_| json!({"sleep_ms": 300})).collect();
    let id = h.submit("t", "slowmap", json!({"images": images})).await?;
    // Wait until instances run, then cancel.
    for _ in 0..250 {
        let running: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM steps WHERE task_id = $1 AND map_of IS NOT NULL",
        )
        .bind(id.0)
        .fetch_one(&h.db)
        .await?;
        if running > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    h.client().cancel(id, None).await?;
    let task = h.wait_for(id, std::time::Duration::from_secs(30)).await?;
    assert_eq!(task.state, TaskState::Cancelled, "{task:#?}");
    let resize = step(&task, "resize");
    assert_eq!(resize.state, StepState::Cancelled, "{resize:#?}");
    assert_eq!(step(&task, "collect").state, StepState::Cancelled);
    let created: i64 =
        sqlx::query_scalar("SELECT count(*) FROM steps WHERE task_id = $1 AND map_of IS NOT NULL")
            .bind(id.0)
            .fetch_one(&h.db)
            .await?;
    assert!(
        created < 10,
        "no instance is let in after the cancel ({created})"
    );
    let live: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM steps WHERE task_id = $1
         AND state IN ('waiting', 'queued', 'dispatched', 'retrying', 'delegated')",
    )
    .bind(id.0)
    .fetch_one(&h.db)
    .await?;
    assert_eq!(live, 0);
    h.finish().await;
    Ok(())
}
