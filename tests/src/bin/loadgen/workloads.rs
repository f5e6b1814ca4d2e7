//! The workloads. Each returns result rows and fails if any of its tasks did not complete.

use crate::bench::{self, Bench, HOLD_QUEUE, NAMESPACE, SUBMIT_QUEUE, Shape};
use crate::report::Row;
use anyhow::{Context, Result, bail};
use futures_util::{StreamExt, TryStreamExt, stream};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Confirmation};
use serde_json::json;
use sqlx::Connection;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tasker_schemas::TaskId;
use tasker_schemas::TaskState;
use tasker_worker::amqp_submit;
use tokio::sync::Semaphore;

/// How big each workload is.
#[derive(Clone, Debug)]
pub struct Sizes {
    pub floor_hops: usize,
    pub floor_pipelined: usize,
    pub floor_commits: usize,
    pub linear_runs: usize,
    pub linear_warmup: usize,
    pub diamond_secs: u64,
    pub warmup_secs: u64,
    pub diamond_in_flight: usize,
    pub fanout_width: usize,
    pub fanout_runs: usize,
    pub map_items: usize,
    pub map_parallel: u32,
    pub map_runs: usize,
    pub map_warmup: usize,
    pub submit_count: usize,
    pub submit_concurrency: usize,
    pub inflight_tasks: usize,
    pub history_tasks: u64,
    pub prune_secs: u64,
    pub prune_sample_secs: u64,
}

/// Targets of issue 4.
pub const LINEAR_P50_MS: f64 = 5.0;
pub const LINEAR_P99_MS: f64 = 15.0;
pub const DIAMOND_STEPS_PER_S: f64 = 5_000.0;
pub const FANOUT_WALL_S: f64 = 0.3;
/// 10,000 no-op map instances, submit to completion.
pub const MAP_WALL_S: f64 = 3.0;
/// The item count the map target is set for.
pub const MAP_TARGET_ITEMS: usize = 10_000;
pub const SUBMIT_HTTP_P50_MS: f64 = 2.0;
pub const HISTORY_RATIO: f64 = 1.10;
pub const INFLIGHT_RSS_MB: f64 = 100.0;

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

// ---------------------------------------------------------------------------------------------
// floor

/// The raw limits of the services, measured now: one confirmed persistent publish to a quorum
/// queue and its delivery (one message in flight), the same pipelined, and one small commit.
pub async fn floor(b: &Bench, s: &Sizes) -> Result<Vec<Row>> {
    let conn =
        lapin::Connection::connect(&b.amqp_url, lapin::ConnectionProperties::default()).await?;
    let publisher = conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let consumer_ch = conn.create_channel().await?;
    consumer_ch
        .basic_qos(512, BasicQosOptions::default())
        .await?;
    let queue = format!("{}.loadgen.floor.{}", b.names.prefix(), b.run_id);
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    publisher
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
    let result = floor_amqp(b, s, &publisher, &consumer_ch, &queue).await;
    let ch = conn.create_channel().await?;
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(200, "done".into()).await;
    let mut rows = result?;
    rows.push(floor_commit(b, s).await?);
    Ok(rows)
}

async fn floor_amqp(
    b: &Bench,
    s: &Sizes,
    publisher: &lapin::Channel,
    consumer_ch: &lapin::Channel,
    queue: &str,
) -> Result<Vec<Row>> {
    let mut consumer = consumer_ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let payload = &[b'x'; 100];
    let props = &BasicProperties::default().with_delivery_mode(2);
    let publish = move || async move {
        let confirm = publisher
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                payload,
                props.clone(),
            )
            .await?;
        Ok::<_, lapin::Error>(confirm)
    };
    let check = |c: Confirmation| match c {
        Confirmation::Ack(None) => Ok(()),
        other => Err(anyhow::anyhow!("floor publish not confirmed: {other:?}")),
    };

    // One message in flight: publish, then wait for both its confirm and its delivery.
    let warmup = (s.floor_hops / 10).max(10);
    let mut hops = Vec::with_capacity(s.floor_hops);
    let mut meter = b.meter();
    let mut start = Instant::now();
    for i in 0..warmup + s.floor_hops {
        if i == warmup {
            meter.restart();
            start = Instant::now();
        }
        let t0 = Instant::now();
        let confirm = publish().await?;
        let (confirmed, delivery) = tokio::join!(confirm, consumer.next());
        let took = t0.elapsed();
        check(confirmed?)?;
        let delivery = delivery.context("the floor consumer ended")??;
        delivery.ack(BasicAckOptions::default()).await?;
        if i >= warmup {
            hops.push(took);
        }
    }
    let wall = start.elapsed();
    let mut hop = Row::new("floor-amqp-hop", "msgs/s").latencies(&hops);
    hop.tasks = 0;
    hop.wall_s = secs(wall);
    hop.steps_per_s = Some(hops.len() as f64 / secs(wall));
    hop.note("quorum queue, persistent, confirmed publish + delivery, one in flight");
    meter.fill(&mut hop, 0);

    // Pipelined: many confirms outstanding, every delivery acked on its own.
    let n = s.floor_pipelined;
    let meter = b.meter();
    let start = Instant::now();
    let consume = async {
        for _ in 0..n {
            let d = consumer
                .next()
                .await
                .context("the floor consumer ended")??;
            d.ack(BasicAckOptions::default()).await?;
        }
        Ok::<_, anyhow::Error>(())
    };
    let produce = async {
        let mut window = VecDeque::new();
        for _ in 0..n {
            if window.len() >= 256 {
                let c: lapin::PublisherConfirm = window.pop_front().expect("window");
                check(c.await?)?;
            }
            window.push_back(publish().await?);
        }
        for c in window {
            check(c.await?)?;
        }
        Ok::<_, anyhow::Error>(())
    };
    let (consumed, produced) = tokio::join!(consume, produce);
    consumed?;
    produced?;
    let wall = start.elapsed();
    let mut piped = Row::new("floor-amqp-pipelined", "msgs/s");
    piped.wall_s = secs(wall);
    piped.steps_per_s = Some(n as f64 / secs(wall));
    piped.note("256 confirms outstanding, one ack per delivery");
    meter.fill(&mut piped, 0);
    Ok(vec![hop, piped])
}

async fn floor_commit(b: &Bench, s: &Sizes) -> Result<Row> {
    // A regular table: commits of a temporary table skip the WAL flush and would flatter Postgres.
    let table = format!("loadgen_floor_{}", b.run_id);
    let mut conn = b.db.acquire().await?.detach();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE \"{table}\" (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text NOT NULL)"
    )))
    .execute(&mut conn)
    .await?;
    let insert = format!("INSERT INTO \"{table}\" (v) VALUES ($1)");
    let value = "x".repeat(64);
    let warmup = (s.floor_commits / 10).max(10);
    let mut commits = Vec::with_capacity(s.floor_commits);
    let mut meter = b.meter();
    let mut start = Instant::now();
    let mut outcome = Ok(());
    for i in 0..warmup + s.floor_commits {
        if i == warmup {
            meter.restart();
            start = Instant::now();
        }
        let t0 = Instant::now();
        // One statement outside a transaction block: one commit each.
        if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(insert.as_str()))
            .bind(&value)
            .execute(&mut conn)
            .await
        {
            outcome = Err(e);
            break;
        }
        if i >= warmup {
            commits.push(t0.elapsed());
        }
    }
    let wall = start.elapsed();
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS \"{table}\""
    )))
    .execute(&mut conn)
    .await;
    let _ = conn.close().await;
    outcome?;
    let mut row = Row::new("floor-pg-commit", "commits/s").latencies(&commits);
    row.wall_s = secs(wall);
    row.steps_per_s = Some(commits.len() as f64 / secs(wall));
    row.note("one-row INSERT + COMMIT on one connection");
    meter.fill(&mut row, 0);
    Ok(row)
}

// ---------------------------------------------------------------------------------------------
// linear

/// A 4-step chain, one task at a time: end-to-end latency from submit until `Client::wait`
/// returns the completed task.
pub async fn linear(b: &Bench, workload: &str, runs: usize, warmup: usize) -> Result<Row> {
    let shape = bench::linear_shape();
    let mut latencies = Vec::with_capacity(runs);
    let mut event_latencies = Vec::with_capacity(runs);
    let mut ids = Vec::with_capacity(warmup + runs);
    let mut meter = b.meter();
    let mut start = Instant::now();
    for i in 0..warmup + runs {
        if i == warmup {
            meter.restart();
            start = Instant::now();
        }
        let id = TaskId::new();
        ids.push(id);
        let event = b.tracker.watch(id);
        let t0 = Instant::now();
        b.submit(&shape, id).await?;
        let task = b
            .client
            .wait(id, Duration::from_secs(60))
            .await
            .with_context(|| format!("waiting for {id}"))?;
        let took = t0.elapsed();
        if task.state != TaskState::Completed {
            bail!(
                "{workload}: task {id} ended {}: {:?}",
                task.state,
                task.error
            );
        }
        let event = match tokio::time::timeout(Duration::from_millis(200), event).await {
            Ok(Ok(e)) => Some(e.at.saturating_duration_since(t0)),
            _ => {
                b.tracker.forget(id);
                None
            }
        };
        if i >= warmup {
            latencies.push(took);
            event_latencies.extend(event);
        }
    }
    let wall = start.elapsed();
    meter.stop();
    let redispatched = b.verify(workload, &ids, shape.steps).await?;
    let mut row = Row::new(workload, "steps/s").latencies(&latencies);
    row.tasks = ids.len() as u64;
    row.steps = row.tasks * shape.steps;
    row.wall_s = secs(wall);
    row.steps_per_s = Some((runs as u64 * shape.steps) as f64 / secs(wall));
    if let Some(p) = crate::report::Percentiles::of(&event_latencies) {
        row.note(format!(
            "completion event p50 {:.2} p99 {:.2} ms",
            p.p50, p.p99
        ));
    }
    if event_latencies.len() < runs {
        row.note(format!("{} events missing", runs - event_latencies.len()));
    }
    if redispatched > 0 {
        row.note(format!("{redispatched} steps redispatched"));
    }
    row.note(format!("{warmup} warm-up runs not counted"));
    let met = row.p50_ms.is_some_and(|p| p <= LINEAR_P50_MS)
        && row.p99_ms.is_some_and(|p| p <= LINEAR_P99_MS);
    row.target(
        format!("p50<={LINEAR_P50_MS}ms p99<={LINEAR_P99_MS}ms"),
        met,
    );
    meter.fill(&mut row, runs as u64 * shape.steps);
    Ok(row)
}

// ---------------------------------------------------------------------------------------------
// diamond

struct Sample {
    submitted: Instant,
    latency: Option<Duration>,
}

/// a → (b, c) → d, submitted continuously with at most `in_flight` tasks unfinished. Steps per
/// second come from the database (attempts that succeeded inside the window); latency from
/// submit until the task's completion event.
pub async fn diamond(b: &Bench, workload: &str, s: &Sizes) -> Result<Row> {
    let shape = bench::diamond_shape("diamond", bench::QUEUE);
    b.register(&shape).await?;
    let in_flight = s.diamond_in_flight;
    let slots = Arc::new(Semaphore::new(in_flight));
    // Submissions at once; the rest of the slots wait for completions.
    let submit_slots = Arc::new(Semaphore::new(64));
    let samples = Arc::new(Mutex::new(Vec::<Sample>::new()));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let submitter = b.submitter();
    let mut ids = Vec::new();
    let begin = Instant::now();
    let window_start = begin + Duration::from_secs(s.warmup_secs);
    let window_end = window_start + Duration::from_secs(s.diamond_secs);
    let mut meter = b.meter();
    let mut db_start = None;
    let mut started = begin;
    loop {
        let now = Instant::now();
        if db_start.is_none() && now >= window_start {
            db_start = Some(b.db_now().await?);
            meter.restart();
            started = Instant::now();
        }
        if now >= window_end {
            break;
        }
        let boundary = if db_start.is_none() {
            window_start
        } else {
            window_end
        };
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p?,
            _ = tokio::time::sleep_until(boundary.into()) => continue,
        };
        if !errors.lock().expect("lock").is_empty() {
            break;
        }
        let id = TaskId::new();
        ids.push(id);
        let event = b.tracker.watch(id);
        let (submitter, submit_slots, samples, errors, tracker) = (
            submitter.clone(),
            submit_slots.clone(),
            samples.clone(),
            errors.clone(),
            b.tracker.clone(),
        );
        let name = shape.name.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let t0;
            {
                let _slot = submit_slots.acquire().await;
                t0 = Instant::now();
                if let Err(e) = submitter.submit(&name, id).await {
                    tracker.forget(id);
                    errors.lock().expect("lock").push(format!("{e:#}"));
                    return;
                }
            }
            let latency = match tokio::time::timeout(Duration::from_secs(120), event).await {
                Ok(Ok(f)) if f.state == TaskState::Completed.as_str() => {
                    Some(f.at.saturating_duration_since(t0))
                }
                Ok(Ok(f)) => {
                    errors
                        .lock()
                        .expect("lock")
                        .push(format!("task {id} ended {}", f.state));
                    None
                }
                _ => {
                    tracker.forget(id);
                    None
                }
            };
            samples.lock().expect("lock").push(Sample {
                submitted: t0,
                latency,
            });
        });
    }
    let ended = Instant::now();
    let db_end = b.db_now().await?;
    meter.stop();
    let Some(db_start) = db_start else {
        bail!("{workload}: the window never started")
    };
    // Drain: every slot back means every task finished (or timed out waiting for its event).
    let drained = tokio::time::timeout(
        Duration::from_secs(180),
        slots.acquire_many(in_flight as u32),
    )
    .await;
    if drained.is_err() {
        bail!("{workload}: tasks still unfinished 180 s after the window");
    }
    if let Some(e) = errors.lock().expect("lock").first() {
        bail!("{workload}: {e}");
    }
    let window_steps: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM attempts
         WHERE namespace = $1 AND outcome = 'succeeded' AND finished_at >= $2 AND finished_at < $3",
    )
    .bind(NAMESPACE)
    .bind(db_start)
    .bind(db_end)
    .fetch_one(&b.db)
    .await?;
    let window_s = (db_end - db_start).as_seconds_f64();
    // Tasks whose event never came: wait for them in the database before verifying.
    b.wait_finished_in_db(&ids, Duration::from_secs(60)).await?;
    let redispatched = b.verify(workload, &ids, shape.steps).await?;

    let samples = std::mem::take(&mut *samples.lock().expect("lock"));
    let in_window: Vec<&Sample> = samples
        .iter()
        .filter(|x| x.submitted >= started && x.submitted < ended)
        .collect();
    let latencies: Vec<Duration> = in_window.iter().filter_map(|x| x.latency).collect();
    let missing = samples.iter().filter(|x| x.latency.is_none()).count();
    let mut row = Row::new(workload, "steps/s").latencies(&latencies);
    row.tasks = ids.len() as u64;
    row.steps = row.tasks * shape.steps;
    row.wall_s = window_s;
    let rate = window_steps as f64 / window_s;
    row.steps_per_s = Some(rate);
    row.note(format!(
        "window {:.1} s after {} s warm-up, {} in flight, {:.0} tasks/s, latency of {} tasks submitted in the window",
        window_s,
        s.warmup_secs,
        in_flight,
        rate / shape.steps as f64,
        in_window.len()
    ));
    if missing > 0 {
        row.note(format!("{missing} completion events missing"));
    }
    if redispatched > 0 {
        row.note(format!("{redispatched} steps redispatched"));
    }
    row.target(
        format!(">={DIAMOND_STEPS_PER_S} steps/s"),
        rate >= DIAMOND_STEPS_PER_S,
    );
    meter.fill(&mut row, window_steps as u64);
    Ok(row)
}

// ---------------------------------------------------------------------------------------------
// fanout

/// root → `width` parallel steps → join, one task at a time: wall time from submit to completion.
pub async fn fanout(b: &Bench, s: &Sizes) -> Result<Row> {
    let shape = bench::fanout_shape(s.fanout_width);
    b.register(&shape).await?;
    let warmup = 1;
    let mut walls = Vec::with_capacity(s.fanout_runs);
    let mut ids = Vec::new();
    let mut meter = b.meter();
    for i in 0..warmup + s.fanout_runs {
        if i == warmup {
            meter.restart();
        }
        let id = TaskId::new();
        ids.push(id);
        let t0 = Instant::now();
        b.submit(&shape, id).await?;
        let task = b.client.wait(id, Duration::from_secs(120)).await?;
        let took = t0.elapsed();
        if task.state != TaskState::Completed {
            bail!("fanout: task {id} ended {}: {:?}", task.state, task.error);
        }
        if i >= warmup {
            walls.push(took);
        }
    }
    meter.stop();
    let redispatched = b.verify("fanout", &ids, shape.steps).await?;
    let mut row = Row::new(format!("fanout-1x{}x1", s.fanout_width), "steps/s").latencies(&walls);
    let median = row.p50_ms.unwrap_or(0.0) / 1e3;
    row.tasks = ids.len() as u64;
    row.steps = row.tasks * shape.steps;
    row.wall_s = median;
    row.steps_per_s = Some(shape.steps as f64 / median);
    row.note(format!(
        "wall_s = median of {} runs (percentiles over runs), 1 warm-up run",
        s.fanout_runs
    ));
    if redispatched > 0 {
        row.note(format!("{redispatched} steps redispatched"));
    }
    if s.fanout_width >= 1_000 {
        row.target(format!("<={FANOUT_WALL_S}s"), median <= FANOUT_WALL_S);
    } else {
        row.target = "n/a (width<1000)".into();
    }
    meter.fill(&mut row, s.fanout_runs as u64 * shape.steps);
    Ok(row)
}

// ---------------------------------------------------------------------------------------------
// map

/// root → `work` mapped over the root's array of `map_items` elements (no-op instances, at most
/// `map_parallel` at once) → done, one task at a time: wall time from submit until the task's
/// completion event (until `Client::wait` returned it if the event did not come).
/// `floor_msgs_per_s` is the pipelined broker floor measured in this run, if it was: every
/// instance costs at least two confirmed publishes (its step message and its result).
pub async fn map(b: &Bench, s: &Sizes, floor_msgs_per_s: Option<f64>) -> Result<Row> {
    let n = s.map_items;
    let shape = bench::map_shape(n, s.map_parallel);
    b.register(&shape).await?;
    let submitter = b.submitter();
    let mut walls = Vec::with_capacity(s.map_runs);
    let mut from_wait = 0;
    let mut ids = Vec::new();
    let mut meter = b.meter();
    for i in 0..s.map_warmup + s.map_runs {
        if i == s.map_warmup {
            meter.restart();
        }
        let id = TaskId::new();
        ids.push(id);
        let event = b.tracker.watch(id);
        let t0 = Instant::now();
        submitter
            .submit_with(&shape.name, id, json!({ "items": n }))
            .await?;
        let task = b
            .client
            .wait(id, Duration::from_secs(600))
            .await
            .with_context(|| format!("waiting for {id}"))?;
        let waited = t0.elapsed();
        if task.state != TaskState::Completed {
            bail!("map: task {id} ended {}: {:?}", task.state, task.error);
        }
        let took = match tokio::time::timeout(Duration::from_millis(500), event).await {
            Ok(Ok(e)) => e.at.saturating_duration_since(t0),
            _ => {
                b.tracker.forget(id);
                from_wait += 1;
                waited
            }
        };
        eprintln!(
            "loadgen: map: run {}{}: {:.3} s",
            i + 1,
            if i < s.map_warmup { " (warm-up)" } else { "" },
            secs(took)
        );
        if i >= s.map_warmup {
            walls.push(took);
        }
    }
    meter.stop();
    let redispatched = b.verify("map", &ids, shape.steps).await?;
    let mut row = Row::new(format!("map-1x{n}x1"), "instances/s").latencies(&walls);
    let median = row.p50_ms.unwrap_or(0.0) / 1e3;
    row.tasks = ids.len() as u64;
    row.steps = row.tasks * shape.steps;
    row.wall_s = median;
    row.steps_per_s = Some(n as f64 / median);
    row.note(format!(
        "wall_s = median of {} runs, submit to completion event (percentiles over runs), {} warm-up; max_parallel {}",
        s.map_runs, s.map_warmup, s.map_parallel
    ));
    if from_wait > 0 {
        row.note(format!(
            "{from_wait} runs timed by Client::wait (no completion event)"
        ));
    }
    if let Some(rate) = floor_msgs_per_s.filter(|r| *r > 0.0) {
        let floor_s = 2.0 * n as f64 / rate;
        row.note(format!(
            "x{:.1} of the broker floor ({floor_s:.2} s: 2 confirmed publishes per instance at {rate:.0} msgs/s)",
            median / floor_s
        ));
    }
    if redispatched > 0 {
        row.note(format!("{redispatched} steps redispatched"));
    }
    if n == MAP_TARGET_ITEMS {
        row.target(format!("<={MAP_WALL_S}s"), median <= MAP_WALL_S);
    } else {
        row.target = format!("n/a (set for {MAP_TARGET_ITEMS} items)");
    }
    meter.fill(&mut row, s.map_runs as u64 * shape.steps);
    Ok(row)
}

// ---------------------------------------------------------------------------------------------
// submit

/// Task submissions over HTTP and AMQP, one at a time (latency) and `submit_concurrency` at a
/// time (rate). No worker takes these tasks until every submission was measured; then they run
/// and are verified like the others.
pub async fn submit(b: &Bench, s: &Sizes) -> Result<Vec<Row>> {
    let shape = bench::single_shape();
    b.register(&shape).await?;
    let n = s.submit_count;
    let c = s.submit_concurrency;
    let mut rows = Vec::new();
    let mut all_ids = Vec::new();

    // HTTP, one at a time.
    let warmup: Vec<TaskId> = (0..(n / 10).max(10)).map(|_| TaskId::new()).collect();
    for id in &warmup {
        b.submit(&shape, *id).await?;
    }
    all_ids.extend(&warmup);
    let ids: Vec<TaskId> = (0..n).map(|_| TaskId::new()).collect();
    let meter = b.meter();
    let start = Instant::now();
    let mut latencies = Vec::with_capacity(n);
    for id in &ids {
        let t0 = Instant::now();
        b.submit(&shape, *id).await?;
        latencies.push(t0.elapsed());
    }
    let wall = start.elapsed();
    all_ids.extend(&ids);
    let mut row = Row::new("submit-http", "req/s").latencies(&latencies);
    row.tasks = n as u64;
    row.wall_s = secs(wall);
    row.steps_per_s = Some(n as f64 / secs(wall));
    row.note("POST /v1/tasks one at a time (1-step template, no worker while measuring)");
    let met = row.p50_ms.is_some_and(|p| p <= SUBMIT_HTTP_P50_MS);
    row.target(format!("p50<={SUBMIT_HTTP_P50_MS}ms"), met);
    meter.fill(&mut row, 0);
    rows.push(row);

    // HTTP, `c` at a time.
    let ids: Vec<TaskId> = (0..n).map(|_| TaskId::new()).collect();
    let submitter = b.submitter();
    let meter = b.meter();
    let start = Instant::now();
    let latencies: Vec<Duration> = stream::iter(ids.iter().copied())
        .map(|id| {
            let submitter = submitter.clone();
            let name = shape.name.clone();
            async move {
                let t0 = Instant::now();
                submitter.submit(&name, id).await?;
                Ok::<_, anyhow::Error>(t0.elapsed())
            }
        })
        .buffer_unordered(c)
        .try_collect()
        .await?;
    let wall = start.elapsed();
    all_ids.extend(&ids);
    let mut row = Row::new(format!("submit-http-c{c}"), "req/s").latencies(&latencies);
    row.tasks = n as u64;
    row.wall_s = secs(wall);
    row.steps_per_s = Some(n as f64 / secs(wall));
    row.note(format!("{c} requests in flight"));
    meter.fill(&mut row, 0);
    rows.push(row);

    // AMQP, one at a time: latency until the broker's confirm; the task is created afterwards.
    let conn =
        lapin::Connection::connect(&b.amqp_url, lapin::ConnectionProperties::default()).await?;
    let channel = amqp_submit::confirm_channel(&conn).await?;
    let request = |id: TaskId| {
        let mut r =
            amqp_submit::task_request(NAMESPACE, shape.name.clone(), json!({"run": b.run_id}));
        r.task_id = Some(id);
        r
    };
    let ids: Vec<TaskId> = (0..n).map(|_| TaskId::new()).collect();
    let meter = b.meter();
    let start = Instant::now();
    let mut latencies = Vec::with_capacity(n);
    for id in &ids {
        let t0 = Instant::now();
        amqp_submit::publish_task_request(&channel, &b.names, &request(*id)).await?;
        latencies.push(t0.elapsed());
    }
    let published = start.elapsed();
    wait_created(b, &ids, Duration::from_secs(120)).await?;
    let wall = start.elapsed();
    all_ids.extend(&ids);
    let mut row = Row::new("submit-amqp", "req/s").latencies(&latencies);
    row.tasks = n as u64;
    row.wall_s = secs(wall);
    row.steps_per_s = Some(n as f64 / secs(published));
    row.note(format!(
        "one at a time; latency = publish until confirm; all {n} tasks existed {:.2} s after the first publish",
        secs(wall)
    ));
    meter.fill(&mut row, 0);
    rows.push(row);

    // AMQP, `c` publishes outstanding: rate until every task exists in the database.
    let ids: Vec<TaskId> = (0..n).map(|_| TaskId::new()).collect();
    let meter = b.meter();
    let start = Instant::now();
    let latencies: Vec<Duration> = stream::iter(ids.iter().copied())
        .map(|id| {
            let (channel, names, req) = (&channel, &b.names, request(id));
            async move {
                let t0 = Instant::now();
                amqp_submit::publish_task_request(channel, names, &req).await?;
                Ok::<_, anyhow::Error>(t0.elapsed())
            }
        })
        .buffer_unordered(c)
        .try_collect()
        .await?;
    wait_created(b, &ids, Duration::from_secs(120)).await?;
    let wall = start.elapsed();
    all_ids.extend(&ids);
    let _ = conn.close(200, "done".into()).await;
    let mut row = Row::new(format!("submit-amqp-c{c}"), "req/s").latencies(&latencies);
    row.tasks = n as u64;
    row.wall_s = secs(wall);
    row.steps_per_s = Some(n as f64 / secs(wall));
    row.note(format!(
        "{c} publishes outstanding; rate = until every task exists; latency = until confirm"
    ));
    meter.fill(&mut row, 0);
    rows.push(row);

    // Now run them all and check.
    let worker = b.start_worker(SUBMIT_QUEUE).await?;
    let finished = b
        .wait_finished_in_db(&all_ids, Duration::from_secs(300))
        .await;
    worker.stop().await;
    finished?;
    b.verify("submit", &all_ids, shape.steps).await?;
    Ok(rows)
}

async fn wait_created(b: &Bench, ids: &[TaskId], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let n = b.count_existing(ids).await?;
        if n as usize == ids.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "only {n} of {} tasks submitted over AMQP were created within {timeout:?}",
                ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// in flight

/// `inflight_tasks` diamond tasks submitted while no worker consumes their queue (so they are
/// all in flight: root steps dispatched, the rest waiting), then drained. Reports the
/// orchestrator's peak resident memory, and the drain rate.
pub async fn inflight(b: &Bench, s: &Sizes) -> Result<Row> {
    let shape = bench::diamond_shape("hold_diamond", HOLD_QUEUE);
    b.register(&shape).await?;
    let n = s.inflight_tasks;
    let ids: Vec<TaskId> = (0..n).map(|_| TaskId::new()).collect();
    let submitter = b.submitter();
    let mut meter = b.meter();
    let start = Instant::now();
    stream::iter(ids.iter().copied())
        .map(|id| {
            let submitter = submitter.clone();
            let name = shape.name.clone();
            async move { submitter.submit(&name, id).await }
        })
        .buffer_unordered(s.submit_concurrency)
        .try_collect::<Vec<()>>()
        .await?;
    let submitted = start.elapsed();
    // Let the dispatcher publish every admissible root step, then hold a moment.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let queued: i64 =
            sqlx::query_scalar("SELECT count(*) FROM steps WHERE queue = $1 AND state = 'queued'")
                .bind(HOLD_QUEUE)
                .fetch_one(&b.db)
                .await?;
        if queued == 0 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held_rss = meter.rss_so_far_mb();
    let worker = b.start_worker(HOLD_QUEUE).await?;
    let drain_start = Instant::now();
    let finished = b.wait_finished_in_db(&ids, Duration::from_secs(600)).await;
    let drain = drain_start.elapsed();
    worker.stop().await;
    meter.stop();
    finished?;
    let redispatched = b.verify("inflight", &ids, shape.steps).await?;
    let mut row = Row::new(format!("inflight-{n}"), "steps/s");
    row.tasks = n as u64;
    row.steps = n as u64 * shape.steps;
    row.wall_s = secs(drain);
    row.steps_per_s = Some(row.steps as f64 / secs(drain));
    row.note(format!(
        "diamond tasks submitted with no worker ({:.0} submits/s, {} at a time); rss with all in flight {} MB; \
         wall/rate = draining the backlog",
        n as f64 / secs(submitted),
        s.submit_concurrency,
        held_rss.map_or("-".into(), |m| format!("{m:.1}"))
    ));
    if redispatched > 0 {
        row.note(format!("{redispatched} steps redispatched"));
    }
    meter.fill(&mut row, n as u64 * shape.steps);
    match row.orchestrator_rss_mb {
        Some(rss) if n >= 10_000 => {
            row.target(format!("rss<={INFLIGHT_RSS_MB}MB"), rss <= INFLIGHT_RSS_MB)
        }
        _ => row.target = "n/a (<10000 tasks or no pid)".into(),
    }
    Ok(row)
}

// ---------------------------------------------------------------------------------------------
// history

/// Seeds `n` finished 4-step tasks (completed, steps succeeded, one attempt each) by SQL, with
/// time-ordered ids older than anything the orchestrator will create, then VACUUM ANALYZE.
pub async fn seed_history(b: &Bench, n: u64) -> Result<Row> {
    seed_finished(
        b,
        n,
        &Seeding {
            label: "history",
            context: "jsonb_build_object('seeded', i)",
            spacing_ms: 10,
        },
    )
    .await
}

/// How [`seed_finished`] seeds: its row's label, the SQL expression of task `i`'s context (a
/// constant of the loadgen, never input), and the time between two tasks' creation.
pub struct Seeding {
    pub label: &'static str,
    pub context: &'static str,
    pub spacing_ms: u64,
}

/// Seeds `n` completed `linear4` tasks (steps and attempts included) by SQL, the newest an hour
/// ago, then VACUUM ANALYZE (and CHECKPOINT when allowed). The row is `{label}-seed`.
pub async fn seed_finished(b: &Bench, n: u64, seeding: &Seeding) -> Result<Row> {
    let label = seeding.label;
    let shape: Shape = bench::linear_shape();
    let template_id: uuid::Uuid = sqlx::query_scalar(
        "SELECT id FROM templates WHERE namespace = $1 AND name = $2 AND version = $3",
    )
    .bind(NAMESPACE)
    .bind(&shape.name)
    .bind(shape.template.version as i32)
    .fetch_one(&b.db)
    .await
    .context("the linear template is not registered")?;
    let step_names: Vec<String> = shape
        .template
        .steps
        .iter()
        .map(|s| s.name.clone())
        .collect();
    let retry = serde_json::to_value(&shape.template.steps[0].retry)?;
    let output = serde_json::Value::Object(
        step_names
            .iter()
            .map(|s| (s.clone(), json!({"ok": true})))
            .collect(),
    );
    let mut conn = b.db.acquire().await?.detach();
    // A UUIDv7 from a time and a seed: seeded ids sort before the ones the orchestrator makes.
    sqlx::query(
        "CREATE FUNCTION pg_temp.lg_uuid(ts timestamptz, seed text) RETURNS uuid LANGUAGE sql STABLE AS $$
           SELECT (lpad(to_hex((extract(epoch FROM ts) * 1000)::bigint), 12, '0') || '7' || substr(md5(seed), 1, 3)
                   || '8' || substr(md5(seed), 4, 15))::uuid
         $$",
    )
    .execute(&mut conn)
    .await?;
    let meter = b.meter();
    let start = Instant::now();
    let origin: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT now() - interval '1 hour'")
            .fetch_one(&mut conn)
            .await?;
    let chunk = 50_000u64;
    let steps = step_names.len() as i32;
    // Task i was created at origin - (n - i) * spacing.
    let series = format!(
        "WITH g AS (SELECT i, $3::timestamptz - ($4::bigint - i) * interval '{} ms' AS ts
                                      FROM generate_series($1::bigint, $2::bigint - 1) AS i)",
        seeding.spacing_ms
    );
    let series = series.as_str();
    let mut lo = 0;
    while lo < n {
        let hi = (lo + chunk).min(n);
        let mut tx = conn.begin().await?;
        let context = seeding.context;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "{series}
             INSERT INTO tasks (id, namespace, template_id, template_name, template_version, state, priority, context,
                                output, request_hash, unfinished_steps, event_seq, created_at, updated_at, finished_at)
             SELECT pg_temp.lg_uuid(ts, 't' || i), $5, $6, $7, $8, 'completed', 0, {context},
                    $9, md5(i::text), 0, 2, ts, ts + $10 * interval '1 ms', ts + $10 * interval '1 ms'
             FROM g"
        )))
        .bind(lo as i64)
        .bind(hi as i64)
        .bind(origin)
        .bind(n as i64)
        .bind(NAMESPACE)
        .bind(template_id)
        .bind(&shape.name)
        .bind(shape.template.version as i32)
        .bind(&output)
        .bind(steps)
        .execute(&mut *tx)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "{series}
             INSERT INTO steps (id, task_id, namespace, name, position, handler, queue, state, priority, attempt, failures,
                                max_attempts, retry_policy, queue_wait_timeout_ms, execution_timeout_ms, pending_parents,
                                parent_ids, child_ids, queued_at, dispatched_at, worker, output, updated_at)
             SELECT pg_temp.lg_uuid(g.ts, 's' || g.i || '.' || p), pg_temp.lg_uuid(g.ts, 't' || g.i), $5, ($6::text[])[p + 1],
                    p, 'noop', $7, 'succeeded', 0, 1, 0, 3, $8, 300000, 300000, 0,
                    CASE WHEN p = 0 THEN '{{}}'::uuid[] ELSE ARRAY[pg_temp.lg_uuid(g.ts, 's' || g.i || '.' || (p - 1))] END,
                    CASE WHEN p = $9 - 1 THEN '{{}}'::uuid[] ELSE ARRAY[pg_temp.lg_uuid(g.ts, 's' || g.i || '.' || (p + 1))] END,
                    g.ts + p * interval '1 ms', g.ts + p * interval '1 ms', 'seeded', '{{\"ok\": true}}'::jsonb,
                    g.ts + (p + 1) * interval '1 ms'
             FROM g CROSS JOIN generate_series(0, $9 - 1) AS p"
        )))
        .bind(lo as i64)
        .bind(hi as i64)
        .bind(origin)
        .bind(n as i64)
        .bind(NAMESPACE)
        .bind(&step_names)
        .bind(bench::QUEUE)
        .bind(&retry)
        .bind(steps)
        .execute(&mut *tx)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "{series}
             INSERT INTO attempts (step_id, attempt, task_id, namespace, outcome, dispatched_at, started_at, finished_at, worker)
             SELECT pg_temp.lg_uuid(g.ts, 's' || g.i || '.' || p), 1, pg_temp.lg_uuid(g.ts, 't' || g.i), $5, 'succeeded',
                    g.ts + p * interval '1 ms', g.ts + p * interval '1 ms', g.ts + (p + 1) * interval '1 ms', 'seeded'
             FROM g CROSS JOIN generate_series(0, $6 - 1) AS p"
        )))
        .bind(lo as i64)
        .bind(hi as i64)
        .bind(origin)
        .bind(n as i64)
        .bind(NAMESPACE)
        .bind(steps)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        lo = hi;
        eprintln!(
            "loadgen: {label}: {lo} of {n} finished tasks seeded ({:.0} s)",
            start.elapsed().as_secs_f64()
        );
    }
    let seeded = start.elapsed();
    for table in ["tasks", "steps", "attempts", "outbox"] {
        sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM ANALYZE {table}")))
            .execute(&mut conn)
            .await?;
    }
    // Flush the seeding's dirty pages now rather than during the measurements (needs the
    // pg_checkpoint role or superuser; skipped without).
    let checkpoint = sqlx::query("CHECKPOINT").execute(&mut conn).await.is_ok();
    let wall = start.elapsed();
    let (tasks, size): (i64, String) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM tasks), pg_size_pretty(pg_database_size(current_database()))",
    )
    .fetch_one(&mut conn)
    .await?;
    let _ = conn.close().await;
    let mut row = Row::new(format!("{label}-seed"), "steps/s");
    row.tasks = n;
    row.steps = n * shape.steps;
    row.wall_s = secs(wall);
    row.steps_per_s = Some(row.steps as f64 / secs(seeded));
    row.note(format!(
        "seeded by SQL in {:.0} s, then VACUUM ANALYZE{}; {tasks} tasks in the database, {size}",
        secs(seeded),
        if checkpoint { " + CHECKPOINT" } else { "" }
    ));
    meter.fill(&mut row, 0);
    Ok(row)
}

// ---------------------------------------------------------------------------------------------
// prune

/// The row counts of the tables that grow with finished work, at one moment of a `prune` run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TableRows {
    pub at_s: f64,
    pub tasks: i64,
    pub steps: i64,
    pub attempts: i64,
    pub task_events: i64,
    pub outbox: i64,
}

async fn table_rows(b: &Bench, at_s: f64) -> Result<TableRows> {
    let (tasks, steps, attempts, task_events, outbox): (i64, i64, i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM tasks), (SELECT count(*) FROM steps),
                    (SELECT count(*) FROM attempts), (SELECT count(*) FROM task_events),
                    (SELECT count(*) FROM outbox)",
    )
    .fetch_one(&b.db)
    .await?;
    Ok(TableRows {
        at_s,
        tasks,
        steps,
        attempts,
        task_events,
        outbox,
    })
}

/// Diamonds submitted continuously for `prune_secs` against an orchestrator that keeps finished
/// tasks for `retention_ms` only, sampling the tables' row counts every `sample_secs`. Pruning
/// keeps pace when the counts stop growing once the first tasks are past their retention: the
/// target compares the largest and the smallest `steps` count of the samples taken after twice
/// the retention (plus a reconciler round). Every completion event must say `completed`; a task
/// whose event did not come must be completed in the database, or pruned.
pub async fn prune(b: &Bench, s: &Sizes, retention_ms: u64) -> Result<Row> {
    let shape = bench::diamond_shape("prune", bench::QUEUE);
    b.register(&shape).await?;
    let in_flight = s.diamond_in_flight;
    let slots = Arc::new(Semaphore::new(in_flight));
    let submit_slots = Arc::new(Semaphore::new(64));
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let completed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let no_event = Arc::new(Mutex::new(Vec::<TaskId>::new()));
    let submitter = b.submitter();
    let begin = Instant::now();
    let end = begin + Duration::from_secs(s.prune_secs);
    let sample_every = Duration::from_secs(s.prune_sample_secs.max(1));
    let mut next_sample = begin;
    let mut samples = Vec::new();
    let mut submitted = 0u64;
    let mut meter = b.meter();
    meter.restart();
    loop {
        let now = Instant::now();
        if now >= next_sample {
            let at = now.duration_since(begin).as_secs_f64();
            let rows = table_rows(b, at).await?;
            eprintln!(
                "loadgen: prune t={at:.0}s tasks {} steps {} attempts {} task_events {} outbox {}",
                rows.tasks, rows.steps, rows.attempts, rows.task_events, rows.outbox
            );
            samples.push(rows);
            next_sample += sample_every;
        }
        if now >= end {
            break;
        }
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p?,
            _ = tokio::time::sleep_until(next_sample.min(end).into()) => continue,
        };
        if !errors.lock().expect("lock").is_empty() {
            break;
        }
        let id = TaskId::new();
        submitted += 1;
        let event = b.tracker.watch(id);
        let (submitter, submit_slots, errors, tracker, completed, no_event) = (
            submitter.clone(),
            submit_slots.clone(),
            errors.clone(),
            b.tracker.clone(),
            completed.clone(),
            no_event.clone(),
        );
        let name = shape.name.clone();
        tokio::spawn(async move {
            let _permit = permit;
            {
                let _slot = submit_slots.acquire().await;
                if let Err(e) = submitter.submit(&name, id).await {
                    tracker.forget(id);
                    errors.lock().expect("lock").push(format!("{e:#}"));
                    return;
                }
            }
            match tokio::time::timeout(Duration::from_secs(120), event).await {
                Ok(Ok(f)) if f.state == TaskState::Completed.as_str() => {
                    completed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Ok(Ok(f)) => errors
                    .lock()
                    .expect("lock")
                    .push(format!("task {id} ended {}", f.state)),
                _ => {
                    tracker.forget(id);
                    no_event.lock().expect("lock").push(id);
                }
            }
        });
    }
    let wall = begin.elapsed();
    let drained = tokio::time::timeout(
        Duration::from_secs(180),
        slots.acquire_many(in_flight as u32),
    )
    .await;
    meter.stop();
    if drained.is_err() {
        bail!("prune: tasks still unfinished 180 s after the run");
    }
    if let Some(e) = errors.lock().expect("lock").first() {
        bail!("prune: {e}");
    }
    // A task without its event: completed in the database, or already pruned (only finished
    // tasks are pruned).
    let no_event = std::mem::take(&mut *no_event.lock().expect("lock"));
    let uuids: Vec<uuid::Uuid> = no_event.iter().map(|i| i.0).collect();
    let unfinished: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM tasks WHERE id = ANY($1) AND state NOT IN ('completed')",
    )
    .bind(&uuids)
    .fetch_one(&b.db)
    .await?;
    if unfinished > 0 {
        bail!("prune: {unfinished} tasks without a completion event did not complete");
    }
    let done = completed.load(std::sync::atomic::Ordering::Relaxed);
    let steady_from = 2.0 * retention_ms as f64 / 1e3 + 30.0;
    let steady: Vec<&TableRows> = samples.iter().filter(|r| r.at_s >= steady_from).collect();
    let mut row = Row::new("prune", "steps/s");
    row.tasks = submitted;
    row.steps = submitted * shape.steps;
    row.wall_s = wall.as_secs_f64();
    row.steps_per_s = Some(done as f64 * shape.steps as f64 / wall.as_secs_f64());
    row.note(format!(
        "retention {} s, {} in flight, {done} completion events, {} without an event (completed or pruned)",
        retention_ms / 1000,
        in_flight,
        no_event.len()
    ));
    match (
        steady.iter().map(|r| r.steps).min(),
        steady.iter().map(|r| r.steps).max(),
    ) {
        (Some(lo), Some(hi)) if steady.len() >= 2 => {
            let ratio = hi as f64 / lo.max(1) as f64;
            row.note(format!(
                "after {steady_from:.0} s: steps rows {lo}..{hi} (x{ratio:.2}) over {} samples",
                steady.len()
            ));
            row.target("steps rows flat: max<=x1.5 min".to_owned(), ratio <= 1.5);
        }
        _ => row.note(format!(
            "too short to judge: fewer than 2 samples after {steady_from:.0} s"
        )),
    }
    row.tables = Some(samples);
    meter.fill(&mut row, done * shape.steps);
    Ok(row)
}
