//! Broker identity (issue 11): per-namespace step queues and broker users. Users are created on
//! the real test broker with the permissions of `tasker broker-permissions`
//! (`TASKER_TEST_RABBITMQCTL`, from `deploy/local/services.sh up`; required when `CI` is set),
//! and the orchestrator runs with `broker_identity` on.

use anyhow::{Context, Result, bail};
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;
use std::time::{Duration, Instant};
use tasker_schemas::message::{HEADER_DEAD_LETTER_REASON, HEADER_ORIGINAL_USER_ID};
use tasker_schemas::{
    Envelope, Kind, MessageId, Names, ResultBatch, StepResult, StepState, TaskId, TaskState,
    encode, encode_payload,
};
use tasker_tests::{BrokerUser, Harness, create_broker_user, rabbitmqctl_command};
use tasker_worker::WorkerError;
use tasker_worker::client::amqp_submit;

const USER_FORMAT: &str = "tasker-{namespace}";

fn identity_on(c: &mut tasker_orchestrator::Config) {
    c.broker_identity = true;
    c.broker_user_format = USER_FORMAT.into();
}

/// Two fresh namespaces (unique per run: broker users are per broker, not per prefix).
fn namespaces() -> (String, String) {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let tail = &id[id.len() - 10..];
    (format!("ida{tail}"), format!("idb{tail}"))
}

fn template(namespace: &str) -> String {
    format!(
        "namespace: {namespace}\nname: one\nversion: 1\nsteps:\n  - {{ name: s, handler: h }}\n"
    )
}

/// Users of namespaces `a` and `b` on the test broker, or `None` to skip (not in CI).
fn users(h: &Harness, a: &str, b: &str) -> Result<Option<(BrokerUser, BrokerUser)>> {
    let Some(ctl) = rabbitmqctl_command()? else {
        return Ok(None);
    };
    let url = h.config().amqp_url;
    Ok(Some((
        create_broker_user(&ctl, &url, &h.names(), a, USER_FORMAT)?,
        create_broker_user(&ctl, &url, &h.names(), b, USER_FORMAT)?,
    )))
}

async fn confirm_channel(url: &str) -> Result<(Connection, lapin::Channel)> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok((conn, ch))
}

/// Publishes as the channel's user (with `user_id` = `user`), mandatory, and waits for the
/// confirm; an error when the broker refuses it (closing the channel).
async fn publish_as(
    ch: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    kind: Kind,
    user: &str,
) -> Result<()> {
    let props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(tasker_schemas::message::CONTENT_TYPE.into())
        .with_message_id(MessageId::new().to_string().into())
        .with_type(kind.as_str().into())
        .with_user_id(user.into());
    let confirm = ch
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            props,
        )
        .await?
        .await?;
    if !confirm.is_ack() || confirm.take_message().is_some() {
        bail!("publish to {exchange} with key {routing_key} not confirmed or unroutable");
    }
    Ok(())
}

/// Waits for a dead letter on the harness's dead-letter queue whose reason contains `needle`;
/// returns (reason, original user id header).
async fn dead_letter_with(h: &Harness, needle: &str) -> Result<(String, Option<String>)> {
    let conn = Connection::connect(&h.config().amqp_url, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        match ch
            .basic_get(
                h.names().dead_letter_queue().into(),
                BasicGetOptions { no_ack: true },
            )
            .await?
        {
            Some(m) => {
                let headers = m.properties.headers().clone().unwrap_or_default();
                let text = |k: &str| match headers.inner().get(k) {
                    Some(AMQPValue::LongString(s)) => Some(s.to_string()),
                    _ => None,
                };
                let reason = text(HEADER_DEAD_LETTER_REASON).unwrap_or_default();
                if reason.contains(needle) {
                    let _ = conn.close(200, "done".into()).await;
                    return Ok((reason, text(HEADER_ORIGINAL_USER_ID)));
                }
                seen.push(reason);
            }
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    bail!("no dead letter with {needle:?} within 20 s (saw {seen:?})")
}

async fn step_of(h: &Harness, task: TaskId) -> Result<tasker_schemas::api::StepView> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let view = h.client().task(task).await?;
        let s = view.steps.first().context("a step")?.clone();
        if s.state == StepState::Dispatched || Instant::now() >= deadline {
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_of_another_namespace_cannot_consume_its_step_queue() -> Result<()> {
    let h = Harness::start_with(identity_on).await?;
    let (a, b) = namespaces();
    h.register_yaml(&template(&a)).await?;
    h.register_yaml(&template(&b)).await?;
    let Some((_ua, ub)) = users(&h, &a, &b)? else {
        return Ok(());
    };
    // B's user on A's queue: the broker refuses the consume (ACCESS_REFUSED).
    let intruder = tasker_worker::Worker::builder(ub.url.clone())
        .prefix(h.prefix.clone())
        .namespace(&a)
        .handler_fn("h", |_| async { Ok(json!("stolen")) })
        .build();
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        intruder.run(tasker_worker::CancellationToken::new()),
    )
    .await
    .context("the intruder neither failed nor stopped")?
    .expect_err("the broker must refuse B's user A's queue");
    match &err {
        WorkerError::AccessRefused { queue, reason } => {
            assert_eq!(queue, &h.names().step_queue(&a, "default"));
            assert!(
                reason.contains("ACCESS_REFUSED") || reason.contains("access"),
                "{reason}"
            );
        }
        other => bail!("expected AccessRefused, got {other}"),
    }
    // B's user on B's own queue works, and runs B's steps.
    h.spawn_worker(
        tasker_worker::Worker::builder(ub.url.clone())
            .prefix(h.prefix.clone())
            .namespace(&b)
            .handler_fn("h", |_| async { Ok(json!("b")) }),
    )
    .await?;
    let task = h.run(&b, "one", json!({})).await?;
    assert_eq!(task.state, TaskState::Completed);
    assert_eq!(task.steps[0].output, Some(json!("b")));
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_from_another_namespaces_user_is_dead_lettered_and_the_step_waits_for_its_own()
-> Result<()> {
    let h = Harness::start_with(identity_on).await?;
    let (a, b) = namespaces();
    h.register_yaml(&template(&a)).await?;
    h.register_yaml(&template(&b)).await?;
    let Some((ua, ub)) = users(&h, &a, &b)? else {
        return Ok(());
    };
    let names: Names = h.names();
    let task_a = h.submit(&a, "one", json!({})).await?;
    let task_b = h.submit(&b, "one", json!({})).await?;
    let step_a = step_of(&h, task_a).await?;
    let step_b = step_of(&h, task_b).await?;
    assert_eq!(step_a.state, StepState::Dispatched);
    let forged = |task, step: &tasker_schemas::api::StepView, out: &str| StepResult {
        task_id: task,
        step_id: step.id,
        attempt: step.attempt,
        worker: "intruder".into(),
        duration_ms: 1,
        outcome: tasker_schemas::Outcome::Succeeded {
            output: json!(out),
            branches: None,
        },
        traceparent: None,
    };
    let (conn_b, ch_b) = confirm_channel(&ub.url).await?;
    // B's user may publish only `B.<shard>` on the results exchange, and the broker checks
    // its `user_id`: a valid result message of B's for A's step.
    let single = encode_payload(forged(task_a, &step_a, "forged"))?;
    publish_as(
        &ch_b,
        &names.results_exchange(),
        &format!("{b}.0"),
        &single,
        Kind::Result,
        &ub.user,
    )
    .await?;
    let (reason, original) = dead_letter_with(&h, "is not the user of namespace").await?;
    assert!(reason.contains(&format!("{:?}", ub.user)), "{reason}");
    assert!(reason.contains(&format!("{a:?}")), "{reason}");
    assert_eq!(original.as_deref(), Some(ub.user.as_str()));
    // A batch of B's: its own step's result is applied, A's is refused (the whole message is
    // dead-lettered as a copy, naming the refused step).
    let batch = encode(&Envelope::new(ResultBatch {
        results: vec![
            forged(task_b, &step_b, "b's own"),
            forged(task_a, &step_a, "forged again"),
        ],
    }))?;
    publish_as(
        &ch_b,
        &names.results_exchange(),
        &format!("{b}.0"),
        &batch,
        Kind::ResultBatch,
        &ub.user,
    )
    .await?;
    let (reason, _) = dead_letter_with(&h, "refused the results of steps").await?;
    assert!(reason.contains(&step_a.id.to_string()), "{reason}");
    assert!(!reason.contains(&step_b.id.to_string()), "{reason}");
    let b_done = h.wait(task_b).await?;
    assert_eq!(b_done.state, TaskState::Completed);
    assert_eq!(b_done.steps[0].output, Some(json!("b's own")));
    // A's step is still waiting for a worker of A's.
    let view = h.client().task(task_a).await?;
    assert_eq!(view.state, TaskState::Running);
    assert_eq!(view.steps[0].state, StepState::Dispatched);
    assert_eq!(view.steps[0].output, None);
    // B's user cannot even name A in the routing key: the broker refuses (topic permission).
    let refused = publish_as(
        &ch_b,
        &names.results_exchange(),
        &format!("{a}.0"),
        &single,
        Kind::Result,
        &ub.user,
    )
    .await;
    assert!(
        refused.is_err(),
        "the broker must refuse routing key {a}.0 to B's user"
    );
    let _ = conn_b.close(200, "done".into()).await;
    // A's own worker completes it.
    h.spawn_worker(
        tasker_worker::Worker::builder(ua.url.clone())
            .prefix(h.prefix.clone())
            .namespace(&a)
            .handler_fn("h", |_| async { Ok(json!("a's own")) }),
    )
    .await?;
    let done = h.wait(task_a).await?;
    assert_eq!(done.state, TaskState::Completed);
    assert_eq!(done.steps[0].output, Some(json!("a's own")));
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_request_from_another_namespaces_user_is_dead_lettered() -> Result<()> {
    let h = Harness::start_with(identity_on).await?;
    let (a, b) = namespaces();
    h.register_yaml(&template(&a)).await?;
    let Some((ua, ub)) = users(&h, &a, &b)? else {
        return Ok(());
    };
    let names = h.names();
    // B's user may publish to the tasks exchange only with routing key B; a request for
    // namespace A sent that way reaches the orchestrator, which refuses it.
    let (conn_b, ch_b) = confirm_channel(&ub.url).await?;
    let mut req = amqp_submit::task_request(&a, "one", json!({}));
    let task_id = TaskId::new();
    req.task_id = Some(task_id);
    let body = encode_payload(req.clone())?;
    publish_as(
        &ch_b,
        &names.tasks_exchange(),
        &b,
        &body,
        Kind::TaskRequest,
        &ub.user,
    )
    .await?;
    let (reason, _) = dead_letter_with(&h, "is not the user of namespace").await?;
    assert!(reason.contains(&format!("{a:?}")), "{reason}");
    assert!(
        h.client().task(task_id).await.is_err(),
        "no task may be created"
    );
    // With routing key A the broker itself refuses B's user.
    let refused = amqp_submit::publish_task_request_as(&ch_b, &names, &req, Some(&ub.user)).await;
    assert!(
        refused.is_err(),
        "the broker must refuse routing key {a} to B's user"
    );
    let _ = conn_b.close(200, "done".into()).await;
    // A's user submits to A.
    let (conn_a, ch_a) = confirm_channel(&ua.url).await?;
    amqp_submit::publish_task_request_as(&ch_a, &names, &req, Some(&ua.user)).await?;
    let _ = conn_a.close(200, "done".into()).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while h.client().task(task_id).await.is_err() {
        if Instant::now() >= deadline {
            bail!("A's task request was not accepted within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.finish().await;
    Ok(())
}
