//! Dead letters: the orchestrator moves `{prefix}.dead_letters` into the bounded `dead_letters`
//! table (kind, reason, routing key, headers); replay by kind (a task request is submitted
//! again, a dead step becomes a retry of its step), discard, filters and pages, the bound.

use lapin::options::{BasicGetOptions, BasicPublishOptions, BasicRejectOptions};
use serde_json::json;
use std::time::Duration;
use tasker_schemas::TaskState;
use tasker_schemas::operate::{DeadLetterList, DeadLetterQuery};
use tasker_tests::Harness;
use tasker_tests::tasker_worker::amqp_submit;
use tasker_tests::tasker_worker::client::Client;

fn reader_on(c: &mut tasker_orchestrator::Config) {
    c.dead_letter_reader = true;
}

/// Lists until `done` holds for the page (10 s at most).
async fn wait_list(
    c: &Client,
    q: &DeadLetterQuery,
    what: &str,
    done: impl Fn(&DeadLetterList) -> bool,
) -> anyhow::Result<DeadLetterList> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let page = c.dead_letters(q).await?;
        if done(&page) {
            return Ok(page);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within 10 s; last page {page:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn kind(k: &str) -> DeadLetterQuery {
    DeadLetterQuery {
        kind: Some(k.into()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_task_request_is_recorded_and_replayed_through_submit() -> anyhow::Result<()> {
    let h = Harness::start_with(reader_on).await?;
    // Another template of the namespace, so that the worker's queue exists.
    h.register_yaml(
        "namespace: dl\nname: other\nversion: 1\nsteps:\n  - { name: s, handler: echo }\n",
    )
    .await?;
    h.spawn_worker(
        h.worker("dl")
            .handler_fn("echo", |ctx| async move { Ok(ctx.context().clone()) }),
    )
    .await?;
    let c = h.client();
    let conn = lapin::Connection::connect(&h.services.amqp_url, Default::default()).await?;
    let ch = amqp_submit::confirm_channel(&conn).await?;
    let mut req = amqp_submit::task_request("dl", "later", json!({"n": 1}));
    let task_id = tasker_schemas::TaskId::new();
    req.task_id = Some(task_id);
    req.idempotency_key = Some("order-7".into());
    amqp_submit::publish_task_request(&ch, &h.names(), &req).await?;
    let page = wait_list(&c, &kind("task_request"), "the request recorded", |p| {
        p.dead_letters.len() == 1
    })
    .await?;
    let d = &page.dead_letters[0];
    assert!(d.reason.contains("dl/later not found"), "{}", d.reason);
    assert_eq!(d.routing_key, "dl");
    assert_eq!(d.exchange, h.names().tasks_exchange());
    assert_eq!(d.namespace.as_deref(), Some("dl"));
    assert_eq!(d.task_id, Some(task_id));
    assert!(
        d.headers.get("x-tasker-reason").is_some(),
        "{:?}",
        d.headers
    );
    // Nothing is left in the queue: the table has it.
    assert_eq!(
        h.shared(0)
            .publisher
            .message_count(&h.names().dead_letter_queue())
            .await?,
        0
    );
    let shown = c.dead_letter(d.id).await?;
    let body = shown.body.expect("a readable envelope is shown as JSON");
    assert_eq!(body["payload"]["template"], "later", "{body}");

    // Replayed while the template is still missing: refused, kept.
    let out = c.dead_letter_action(false, &[d.id]).await?;
    assert_eq!(out.outcomes[0].outcome, "refused", "{out:?}");
    assert!(
        out.outcomes[0]
            .message
            .as_deref()
            .unwrap_or("")
            .contains("not found"),
        "{out:?}"
    );
    assert_eq!(
        c.dead_letters(&kind("task_request"))
            .await?
            .dead_letters
            .len(),
        1
    );

    // Once it is registered, the replay submits it: same task id and idempotency key.
    h.register_yaml(
        "namespace: dl\nname: later\nversion: 1\nsteps:\n  - { name: s, handler: echo }\n",
    )
    .await?;
    let out = c.dead_letter_action(false, &[d.id]).await?;
    assert_eq!(out.outcomes[0].outcome, "resubmitted", "{out:?}");
    assert_eq!(out.outcomes[0].task_id, Some(task_id));
    let t = h.wait_submitted(task_id, Duration::from_secs(20)).await?;
    assert_eq!(t.state, TaskState::Completed);
    assert_eq!(t.idempotency_key.as_deref(), Some("order-7"));
    assert!(
        c.dead_letters(&kind("task_request"))
            .await?
            .dead_letters
            .is_empty()
    );
    let audit: Vec<String> = sqlx::query_scalar(
        "SELECT action FROM audit_log WHERE action LIKE 'dead_letter.%' ORDER BY id",
    )
    .fetch_all(&h.db)
    .await?;
    assert_eq!(audit, ["dead_letter.replay"]);
    conn.close(200, "bye".into()).await?;
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_step_is_recorded_and_replayed_as_a_retry_of_its_step() -> anyhow::Result<()> {
    let h = Harness::start_with(reader_on).await?;
    h.register_yaml(
        "namespace: dl\nname: rej\nversion: 1\nsteps:\n  - { name: s, handler: h, queue: dq, retry: { max_attempts: 1 } }\n",
    )
    .await?;
    let c = h.client();
    let id = h.submit("dl", "rej", json!({})).await?;
    // A consumer rejects the step message: the broker dead-letters it.
    let conn = lapin::Connection::connect(&h.services.amqp_url, Default::default()).await?;
    let ch = conn.create_channel().await?;
    let queue = h.names().step_queue("dl", "dq");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(m) = ch
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await?
        {
            m.delivery
                .acker
                .reject(BasicRejectOptions { requeue: false })
                .await?;
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no step message");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let failed = h.wait_for(id, Duration::from_secs(20)).await?;
    assert_eq!(failed.state, TaskState::Failed, "{failed:#?}");
    let page = wait_list(&c, &kind("step"), "the dead step recorded", |p| {
        p.dead_letters.len() == 1
    })
    .await?;
    let d = &page.dead_letters[0];
    assert_eq!(d.routing_key, "dl.dq");
    assert!(d.reason.contains("step attempt failed"), "{}", d.reason);
    assert_eq!((d.task_id, d.step.as_deref()), (Some(id), Some("s")));
    assert_eq!(d.headers["x-first-death-queue"], json!(queue));
    assert_eq!(d.exchange, h.names().steps_exchange());

    // Replay: the step is retried (the old message is not republished); a worker runs it.
    h.spawn_worker(
        h.worker("dl")
            .queue("dq")
            .handler_fn("h", |_| async { Ok(json!("second time")) }),
    )
    .await?;
    let out = c.dead_letter_action(false, &[d.id]).await?;
    assert_eq!(out.outcomes[0].outcome, "step_retried", "{out:?}");
    let t = h.wait_for(id, Duration::from_secs(20)).await?;
    assert_eq!(t.state, TaskState::Completed, "{t:#?}");
    assert_eq!(t.steps[0].output, Some(json!("second time")));
    assert!(c.dead_letters(&kind("step")).await?.dead_letters.is_empty());
    conn.close(200, "bye".into()).await?;
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_dead_letters_are_bounded_filtered_paged_and_discarded() -> anyhow::Result<()> {
    let h = Harness::start_with(|c| {
        c.dead_letter_reader = true;
        c.dead_letter_max_rows = 3;
    })
    .await?;
    let c = h.client();
    let conn = lapin::Connection::connect(&h.services.amqp_url, Default::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(Default::default()).await?;
    // Five unreadable results, one after the other.
    for i in 1..=5 {
        ch.basic_publish(
            h.names().results_exchange().as_str().into(),
            "dl.0".into(),
            BasicPublishOptions::default(),
            format!("not msgpack {i}").as_bytes(),
            lapin::BasicProperties::default()
                .with_message_id(format!("m{i}").into())
                .with_delivery_mode(2),
        )
        .await?
        .await?;
    }
    let all = DeadLetterQuery::default();
    let page = wait_list(&c, &all, "the fifth recorded", |p| {
        p.dead_letters
            .first()
            .is_some_and(|d| d.message_id.as_deref() == Some("m5"))
    })
    .await?;
    let ids: Vec<&str> = page
        .dead_letters
        .iter()
        .filter_map(|d| d.message_id.as_deref())
        .collect();
    assert_eq!(ids, ["m5", "m4", "m3"], "at most 3 rows, the newest");
    let d = &page.dead_letters[0];
    assert_eq!(
        (d.kind.as_str(), d.namespace.as_deref()),
        ("result", Some("dl"))
    );
    assert_eq!(d.routing_key, "dl.0");
    assert_eq!(d.body_bytes, "not msgpack 5".len() as i64);
    let shown = c.dead_letter(d.id).await?;
    assert_eq!(shown.body, None);
    let hex: String = "not msgpack 5"
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(shown.body_hex.as_deref(), Some(hex.as_str()));

    // Filters and keyset pages.
    assert!(
        c.dead_letters(&kind("task_request"))
            .await?
            .dead_letters
            .is_empty()
    );
    let by_reason = DeadLetterQuery {
        reason: Some(d.reason[..d.reason.len().min(12)].to_owned()),
        ..Default::default()
    };
    assert_eq!(c.dead_letters(&by_reason).await?.dead_letters.len(), 3);
    let first = c
        .dead_letters(&DeadLetterQuery {
            limit: Some(2),
            ..Default::default()
        })
        .await?;
    assert_eq!(first.dead_letters.len(), 2);
    let second = c
        .dead_letters(&DeadLetterQuery {
            limit: Some(2),
            before: first.next_before,
            ..Default::default()
        })
        .await?;
    assert_eq!(second.dead_letters.len(), 1);
    assert_eq!(second.dead_letters[0].message_id.as_deref(), Some("m3"));
    assert_eq!(second.next_before, None);
    let bad = DeadLetterQuery {
        kind: Some("poison".into()),
        ..Default::default()
    };
    match c.dead_letters(&bad).await {
        Err(tasker_tests::tasker_worker::client::ClientError::Api { status, .. }) => {
            assert_eq!(status, 400)
        }
        other => panic!("expected a 400, got {other:?}"),
    }

    // A result cannot be replayed; discarding removes it.
    let (m5, m4) = (page.dead_letters[0].id, page.dead_letters[1].id);
    let out = c.dead_letter_action(false, &[m4]).await?;
    assert_eq!(out.outcomes[0].outcome, "refused");
    let out = c.dead_letter_action(true, &[m5, m4, 999_999]).await?;
    let outcomes: Vec<&str> = out.outcomes.iter().map(|o| o.outcome.as_str()).collect();
    assert_eq!(outcomes, ["discarded", "discarded", "refused"]);
    let left = c.dead_letters(&all).await?;
    assert_eq!(left.dead_letters.len(), 1);
    assert_eq!(left.dead_letters[0].message_id.as_deref(), Some("m3"));
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE action = 'dead_letter.discard'")
            .fetch_one(&h.db)
            .await?;
    assert_eq!(n, 2);
    conn.close(200, "bye".into()).await?;
    h.finish().await;
    Ok(())
}
