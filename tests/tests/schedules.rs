//! Schedules (docs/schedules.md): create, show (with the next five runs), list, pause, resume
//! and delete over the HTTP API (the CLI: `orchestrator/tests/cli.rs`), with clear errors for bad input; catch-up after
//! downtime (simulated by moving a schedule's stored next tick into the past) for `skip`,
//! `latest` and `all`; and two orchestrators racing on the same schedules creating exactly one
//! task per tick. The DST rules are unit-tested with a fixed clock in
//! `orchestrator/src/transition/schedule.rs`.

use anyhow::{Context, Result};
use chrono::{DateTime, Duration as TimeDelta, Timelike, Utc};
use serde_json::{Value, json};
use std::time::Duration;
use tasker_schemas::api::{CatchUp, CreateSchedule};
use tasker_schemas::{StepState, TaskState};
use tasker_tests::Harness;
use tasker_tests::tasker_worker::client::ClientError;
use uuid::Uuid;

const TEMPLATE: &str = "namespace: cron
name: report
version: 1
steps:
  - { name: build, handler: build_report }
";

fn create(cron: &str) -> CreateSchedule {
    CreateSchedule {
        namespace: "cron".into(),
        template: "report".into(),
        name: None,
        cron: cron.into(),
        timezone: "UTC".into(),
        context: json!({}),
        catch_up: CatchUp::Skip,
    }
}

fn parse(t: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(t)
        .expect("an RFC 3339 time")
        .with_timezone(&Utc)
}

/// The (status, code) of an API error.
fn api_error<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, String, String) {
    match r {
        Err(ClientError::Api {
            status,
            code,
            message,
            ..
        }) => (status, code, message),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// The ticks that fired for a schedule, oldest first, with their tasks' ids and created_at.
async fn fired(h: &Harness, id: Uuid) -> Result<Vec<(DateTime<Utc>, Uuid, DateTime<Utc>)>> {
    Ok(sqlx::query_as(
        "SELECT k.tick_at, k.task_id, t.created_at
         FROM schedule_ticks k JOIN tasks t ON t.id = k.task_id
         WHERE k.schedule_id = $1 ORDER BY k.tick_at",
    )
    .bind(id)
    .fetch_all(&h.db)
    .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_over_the_api_create_show_pause_resume_delete_and_run_tasks() -> Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(TEMPLATE).await?;
    h.spawn_worker(
        h.worker("cron")
            .handler_fn("build_report", |ctx| async move {
                Ok(json!({ "for": ctx.context()["team"].clone() }))
            }),
    )
    .await?;
    let client = h.client();

    // Daily at 02:00 in Paris: shown with its next five runs, in UTC and local time.
    let mut req = create("0 2 * * *");
    req.timezone = "Europe/Paris".into();
    req.name = Some("nightly".into());
    req.context = json!({"team": "ops"});
    req.catch_up = CatchUp::Latest;
    let s = client.create_schedule(&req).await?;
    assert_eq!(
        (s.namespace.as_str(), s.name.as_str(), s.template.as_str()),
        ("cron", "nightly", "report")
    );
    assert_eq!((s.catch_up, s.paused), (CatchUp::Latest, false));
    assert_eq!(s.next_runs.len(), 5);
    let runs: Vec<DateTime<Utc>> = s.next_runs.iter().map(|r| parse(&r.at)).collect();
    assert!(runs.windows(2).all(|w| w[0] < w[1]), "{runs:?}");
    assert!(runs[0] > Utc::now() - TimeDelta::seconds(5));
    assert_eq!(s.next_tick.as_deref(), Some(s.next_runs[0].at.as_str()));
    for r in &s.next_runs {
        // Local 02:00 in Paris, +01:00 or +02:00.
        assert!(
            r.local.contains("T02:00:00+01:00") || r.local.contains("T02:00:00+02:00"),
            "{r:?}"
        );
        assert_eq!(parse(&r.local), parse(&r.at));
    }
    let shown = client.schedule(s.id).await?;
    assert_eq!(shown.next_runs, s.next_runs);
    assert_eq!(shown.context, json!({"team": "ops"}));

    // Listed; filtered by namespace.
    let list = client.schedules(Some("cron")).await?.schedules;
    assert_eq!(list.iter().map(|s| s.id).collect::<Vec<_>>(), [s.id]);
    assert!(client.schedules(Some("other")).await?.schedules.is_empty());

    // Pause: no next tick; the runs it would have if resumed are still shown.
    let paused = client.pause_schedule(s.id).await?;
    assert!(paused.paused);
    assert_eq!(paused.next_tick, None);
    assert!(
        client.pause_schedule(s.id).await?.paused,
        "pause is idempotent"
    );
    assert_eq!(client.schedule(s.id).await?.next_runs.len(), 5);
    let resumed = client.resume_schedule(s.id).await?;
    assert!(!resumed.paused);
    assert_eq!(resumed.next_tick, s.next_tick);

    // Every second: tasks of the template with the schedule's context, run by the worker.
    let mut every = create("* * * * * *");
    every.name = Some("every_second".into());
    every.context = json!({"team": "sec"});
    let sec = client.create_schedule(&every).await?;
    let mut ticks = Vec::new();
    for _ in 0..100 {
        ticks = fired(&h, sec.id).await?;
        if ticks.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ticks.len() >= 2, "two ticks within 10 s: {ticks:?}");
    let paused = client.pause_schedule(sec.id).await?;
    assert!(paused.last_tick.is_some());
    let (tick, task_id, created_at) = ticks[0];
    assert_eq!(tick.nanosecond(), 0, "ticks are whole seconds");
    // Not before its tick; late only by the loop's wake-up (the harness binary holds it to 1 s
    // at p99; a test sharing 2 cores with the whole suite gets more slack).
    let lateness = created_at - tick;
    assert!(
        lateness >= TimeDelta::zero() && lateness < TimeDelta::seconds(5),
        "created {lateness} after its tick"
    );
    let task = h.wait(tasker_schemas::TaskId(task_id)).await?;
    assert_eq!(task.state, TaskState::Completed);
    assert_eq!(task.context, json!({"team": "sec"}));
    assert_eq!(task.steps[0].state, StepState::Succeeded);
    assert_eq!(task.output, Some(json!({"build": {"for": "sec"}})));
    assert_eq!(
        task.idempotency_key.as_deref(),
        Some(
            format!(
                "schedule:{}:{}",
                sec.id,
                tasker_orchestrator::store::rfc3339(tick)
            )
            .as_str()
        )
    );
    // Paused: nothing more fires.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let n = fired(&h, sec.id).await?.len();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(fired(&h, sec.id).await?.len(), n, "a paused schedule fired");

    // Delete: gone (404), its tasks stay.
    let deleted = client.delete_schedule(sec.id).await?;
    assert_eq!(deleted.id, sec.id);
    let (status, code, _) = api_error(client.schedule(sec.id).await);
    assert_eq!((status, code.as_str()), (404, "schedule_not_found"));
    let (status, _, _) = api_error(client.delete_schedule(sec.id).await);
    assert_eq!(status, 404);
    assert_eq!(
        h.client().task(tasker_schemas::TaskId(task_id)).await?.id.0,
        task_id
    );
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_schedules_are_refused_with_clear_errors() -> Result<()> {
    let h = Harness::start_with(|c| c.max_context_bytes = 1_000).await?;
    h.register_yaml(TEMPLATE).await?;
    let client = h.client();
    let cases: Vec<(CreateSchedule, u16, &str, &str)> = vec![
        (
            create("61 * * * *"),
            400,
            "invalid_request",
            "invalid cron expression",
        ),
        (
            create("* * *"),
            400,
            "invalid_request",
            "invalid cron expression",
        ),
        (
            create(&"* ".repeat(100)),
            400,
            "invalid_request",
            "at most 128",
        ),
        (
            create("0 0 30 2 *"),
            400,
            "invalid_request",
            "no future time",
        ),
        (
            CreateSchedule {
                timezone: "Mars/Olympus".into(),
                ..create("0 2 * * *")
            },
            400,
            "invalid_request",
            "unknown time zone",
        ),
        (
            CreateSchedule {
                template: "missing".into(),
                ..create("0 2 * * *")
            },
            404,
            "template_not_found",
            "not found",
        ),
        (
            CreateSchedule {
                name: Some("bad name!".into()),
                ..create("0 2 * * *")
            },
            400,
            "invalid_request",
            "name",
        ),
        (
            CreateSchedule {
                context: json!({"x": "y".repeat(2_000)}),
                ..create("0 2 * * *")
            },
            413,
            "payload_too_large",
            "context",
        ),
        (
            CreateSchedule {
                cron: "0 2 * * *\u{0}".into(),
                ..create("0 2 * * *")
            },
            400,
            "invalid_request",
            "NUL",
        ),
    ];
    for (req, status, code, text) in cases {
        let (s, c, message) = api_error(client.create_schedule(&req).await);
        assert_eq!((s, c.as_str()), (status, code), "{req:?}: {message}");
        assert!(message.contains(text), "{req:?}: {message}");
    }
    // The same name twice in a namespace: 409.
    client.create_schedule(&create("0 2 * * *")).await?;
    let (s, c, message) = api_error(client.create_schedule(&create("0 3 * * *")).await);
    assert_eq!((s, c.as_str()), (409, "schedule_conflict"), "{message}");

    // Raw bodies: unknown fields, a bad catch-up, bad ids, a bad limit.
    let http = reqwest::Client::new();
    let base = format!("{}/v1/schedules", lock_url(&h));
    for (body, want) in [
        (
            json!({"namespace": "cron", "template": "report", "cron": "0 2 * * *", "every": 1}),
            "every",
        ),
        (
            json!({"namespace": "cron", "template": "report", "cron": "0 2 * * *", "catch_up": "some"}),
            "catch_up",
        ),
        (json!({"namespace": "cron", "template": "report"}), "cron"),
    ] {
        let r = http.post(&base).json(&body).send().await?;
        assert_eq!(r.status(), 400);
        let v: Value = r.json().await?;
        assert_eq!(v["error"]["code"], "invalid_request");
        assert!(
            v["error"]["message"].as_str().unwrap_or("").contains(want),
            "{v}"
        );
    }
    for path in ["/not-a-uuid", "/not-a-uuid/pause", "/not-a-uuid/resume"] {
        let r = if path == "/not-a-uuid" {
            http.get(format!("{base}{path}")).send().await?
        } else {
            http.post(format!("{base}{path}")).send().await?
        };
        assert_eq!(r.status(), 400, "{path}");
        let v: Value = r.json().await?;
        assert_eq!(v["error"]["code"], "invalid_request");
    }
    let unknown = Uuid::now_v7();
    for r in [
        http.post(format!("{base}/{unknown}/pause")).send().await?,
        http.post(format!("{base}/{unknown}/resume")).send().await?,
        http.delete(format!("{base}/{unknown}")).send().await?,
    ] {
        assert_eq!(r.status(), 404);
        let v: Value = r.json().await?;
        assert_eq!(v["error"]["code"], "schedule_not_found");
    }
    let r = http.get(format!("{base}?limit=0")).send().await?;
    assert_eq!(r.status(), 400);
    let r = http.get(format!("{base}?limit=100000")).send().await?;
    assert_eq!(r.status(), 400);
    h.finish().await;
    Ok(())
}

fn lock_url(h: &Harness) -> String {
    h.client().base_url().to_owned()
}

/// A cron minute far from now (no tick of an hourly schedule at it is near).
fn quiet_minute() -> u32 {
    (Utc::now().minute() + 30) % 60
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_after_downtime_skip_latest_all() -> Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(TEMPLATE).await?;
    let client = h.client();
    let cron = format!("{} * * * *", quiet_minute());
    let mut ids = Vec::new();
    for policy in [CatchUp::Skip, CatchUp::Latest, CatchUp::All] {
        let mut req = create(&cron);
        req.name = Some(format!("hourly_{policy}"));
        req.catch_up = policy;
        ids.push((policy, client.create_schedule(&req).await?));
    }
    // Downtime: five hourly ticks were missed (the stored next tick moved 5 h back).
    sqlx::query(
        "UPDATE schedules SET next_tick_at = next_tick_at - interval '5 hours' WHERE namespace = 'cron'",
    )
    .execute(&h.db)
    .await?;
    for (policy, s) in &ids {
        let next = parse(s.next_tick.as_deref().context("a next tick")?);
        // The loop advances it back to the original next tick.
        let mut now = client.schedule(s.id).await?;
        for _ in 0..100 {
            if now.next_tick.as_deref().map(parse) == Some(next) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            now = client.schedule(s.id).await?;
        }
        assert_eq!(now.next_tick.as_deref().map(parse), Some(next), "{policy}");
        let ticks: Vec<DateTime<Utc>> = fired(&h, s.id).await?.iter().map(|t| t.0).collect();
        let missed: Vec<DateTime<Utc>> =
            (1..=5).rev().map(|i| next - TimeDelta::hours(i)).collect();
        match policy {
            CatchUp::Skip => assert!(ticks.is_empty(), "skip fired {ticks:?}"),
            CatchUp::Latest => assert_eq!(ticks, [missed[4]], "latest"),
            CatchUp::All => assert_eq!(ticks, missed, "all"),
        }
        let tasks: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM tasks WHERE idempotency_key LIKE 'schedule:' || $1 || ':%'",
        )
        .bind(s.id.to_string())
        .fetch_one(&h.db)
        .await?;
        assert_eq!(
            tasks as usize,
            ticks.len(),
            "{policy}: one task per fired tick"
        );
        if !ticks.is_empty() {
            assert_eq!(now.last_tick.as_deref().map(parse), ticks.last().copied());
        }
    }
    // A paused schedule's ticks do not fire on resume.
    let (_, all) = &ids[2];
    client.pause_schedule(all.id).await?;
    let before = fired(&h, all.id).await?.len();
    let resumed = client.resume_schedule(all.id).await?;
    assert!(parse(resumed.next_tick.as_deref().context("next")?) > Utc::now());
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(fired(&h, all.id).await?.len(), before);
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_orchestrators_create_exactly_one_task_per_tick() -> Result<()> {
    let h = Harness::start().await?;
    h.start_orchestrator().await?;
    h.register_yaml(TEMPLATE).await?;
    let client = h.client();
    // Every second, and one that missed 60 s of ticks (catch-up all): both replicas race on
    // every round of both.
    let mut req = create("* * * * * *");
    req.name = Some("race".into());
    let race = client.create_schedule(&req).await?;
    req.name = Some("race_backlog".into());
    req.catch_up = CatchUp::All;
    let backlog = client.create_schedule(&req).await?;
    sqlx::query("UPDATE schedules SET next_tick_at = now() - interval '60 seconds' WHERE id = $1")
        .bind(backlog.id)
        .execute(&h.db)
        .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    client.pause_schedule(race.id).await?;
    client.pause_schedule(backlog.id).await?;
    for s in [&race, &backlog] {
        let ticks = fired(&h, s.id).await?;
        assert!(ticks.len() >= 4, "{}: {} ticks", s.name, ticks.len());
        // Contiguous seconds: none missed, none twice (the key forbids it; the count proves it).
        for w in ticks.windows(2) {
            assert_eq!(
                w[1].0 - w[0].0,
                TimeDelta::seconds(1),
                "{}: {:?}",
                s.name,
                w
            );
        }
        let keys: Vec<(String, i64)> = sqlx::query_as(
            "SELECT idempotency_key, count(*) FROM tasks
             WHERE idempotency_key LIKE 'schedule:' || $1 || ':%'
             GROUP BY 1 HAVING count(*) > 1",
        )
        .bind(s.id.to_string())
        .fetch_all(&h.db)
        .await?;
        assert!(keys.is_empty(), "duplicates: {keys:?}");
        let tasks: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM tasks WHERE idempotency_key LIKE 'schedule:' || $1 || ':%'",
        )
        .bind(s.id.to_string())
        .fetch_one(&h.db)
        .await?;
        assert_eq!(tasks as usize, ticks.len(), "{}", s.name);
    }
    // The backlog's 60 missed seconds all fired (oldest first), then it went on on time.
    let ticks = fired(&h, backlog.id).await?;
    assert!(ticks.len() >= 60, "{}", ticks.len());
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_that_cannot_create_its_task_says_why_and_moves_on() -> Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(TEMPLATE).await?;
    let client = h.client();
    let mut req = create("* * * * * *");
    req.name = Some("orphan".into());
    let s = client.create_schedule(&req).await?;
    // The template goes away behind the orchestrator's back (no task refers to it yet).
    client.pause_schedule(s.id).await?;
    sqlx::query("DELETE FROM tasks WHERE namespace = 'cron'")
        .execute(&h.db)
        .await?;
    sqlx::query("DELETE FROM schedule_ticks")
        .execute(&h.db)
        .await?;
    sqlx::query("DELETE FROM templates WHERE namespace = 'cron'")
        .execute(&h.db)
        .await?;
    client.resume_schedule(s.id).await?;
    let mut now = client.schedule(s.id).await?;
    for _ in 0..50 {
        if now.last_error.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        now = client.schedule(s.id).await?;
    }
    let error = now.last_error.clone().context("no last_error")?;
    assert!(
        error.contains("created no task") && error.contains("not found"),
        "{error}"
    );
    assert!(fired(&h, s.id).await?.is_empty());
    // It keeps moving on (a next tick in the future), and holds up no other schedule.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let later = client.schedule(s.id).await?;
    assert!(
        parse(later.next_tick.as_deref().context("next")?)
            > parse(now.next_tick.as_deref().context("next")?)
    );
    h.finish().await;
    Ok(())
}
