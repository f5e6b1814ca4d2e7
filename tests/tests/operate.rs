//! Operator actions against a real orchestrator, broker and workers: retry one failed step,
//! rerun from a step, mark a failed step succeeded, bulk cancel / retry with the confirmed count,
//! and the `operate` role they need.

use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tasker_schemas::api::{CreateKey, SubmitTask};
use tasker_schemas::operate::{BulkAction, BulkFilterBody};
use tasker_schemas::{StepState, TaskId, TaskState};
use tasker_tests::Harness;
use tasker_tests::tasker_worker::StepError;
use tasker_tests::tasker_worker::client::{Client, ClientError};

const CHAIN: &str = "namespace: ops
name: chain
version: 1
steps:
  - { name: a, handler: count_a }
  - { name: b, handler: maybe_fail, depends_on: [a] }
  - { name: c, handler: count_c, depends_on: [b] }
";

/// A template whose step no worker runs: its tasks stay running.
const STUCK: &str = "namespace: bulk
name: stuck
version: 1
steps:
  - { name: wait, handler: nobody_runs_this, queue: nobody }
";

struct Counters {
    a: Arc<AtomicUsize>,
    c: Arc<AtomicUsize>,
    broken: Arc<AtomicBool>,
}

async fn chain_worker(h: &Harness) -> anyhow::Result<Counters> {
    let k = Counters {
        a: Arc::default(),
        c: Arc::default(),
        broken: Arc::new(AtomicBool::new(true)),
    };
    let (a, c, broken) = (k.a.clone(), k.c.clone(), k.broken.clone());
    h.spawn_worker(
        h.worker("ops")
            .handler_fn("count_a", move |_| {
                let a = a.clone();
                async move { Ok(json!(a.fetch_add(1, Ordering::SeqCst) + 1)) }
            })
            .handler_fn("maybe_fail", move |ctx| {
                let broken = broken.clone();
                async move {
                    if broken.load(Ordering::SeqCst) {
                        Err(StepError::permanent("broken"))
                    } else {
                        Ok(json!({"b_attempt": ctx.attempt()}))
                    }
                }
            })
            .handler_fn("count_c", move |_| {
                let c = c.clone();
                async move { Ok(json!(c.fetch_add(1, Ordering::SeqCst) + 1)) }
            }),
    )
    .await?;
    Ok(k)
}

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

fn step<'a>(t: &'a tasker_schemas::api::TaskView, name: &str) -> &'a tasker_schemas::api::StepView {
    t.steps.iter().find(|s| s.name == name).expect("step")
}

async fn audit_actions(h: &Harness, id: TaskId) -> anyhow::Result<Vec<String>> {
    Ok(
        sqlx::query_scalar("SELECT action FROM audit_log WHERE task_id = $1 ORDER BY id")
            .bind(id.0)
            .fetch_all(&h.db)
            .await?,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_step_rerun_and_mark_succeeded_move_states_and_run_the_task_again()
-> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(CHAIN).await?;
    let k = chain_worker(&h).await?;
    let c = h.client();
    let failed = h.run("ops", "chain", json!({})).await?;
    assert_eq!(failed.state, TaskState::Failed, "{failed:#?}");
    assert_eq!(step(&failed, "b").state, StepState::Failed);
    assert_eq!(step(&failed, "c").state, StepState::Skipped);
    let id = failed.id;

    // Only a failed step can be retried.
    let (status, code, message) = api_error(c.retry_step(id, "a").await);
    assert_eq!((status, code.as_str()), (409, "invalid_state"), "{message}");
    assert!(message.contains("only a failed step"), "{message}");
    let (status, code, _) = api_error(c.retry_step(id, "nope").await);
    assert_eq!((status, code.as_str()), (409, "invalid_state"));

    // Retry the failed step: the task runs again, c (skipped by the failure) runs too, a not.
    k.broken.store(false, Ordering::SeqCst);
    let t = c.retry_step(id, "b").await?;
    assert!(
        t.state.is_live() || t.state == TaskState::Completed,
        "{t:#?}"
    );
    let t = h.wait(id).await?;
    assert_eq!(t.state, TaskState::Completed, "{t:#?}");
    assert_eq!(step(&t, "b").attempt, 2, "attempt numbers only grow");
    assert_eq!(step(&t, "b").output, Some(json!({"b_attempt": 2})));
    assert_eq!(k.a.load(Ordering::SeqCst), 1);
    assert_eq!(k.c.load(Ordering::SeqCst), 1);

    // Rerun from b on the completed task: b and c run again from scratch, a keeps its output.
    c.rerun(id, "b").await?;
    let t = h.wait(id).await?;
    assert_eq!(t.state, TaskState::Completed, "{t:#?}");
    assert_eq!(step(&t, "b").attempt, 3);
    assert_eq!(step(&t, "c").output, Some(json!(2)));
    assert_eq!(
        (k.a.load(Ordering::SeqCst), k.c.load(Ordering::SeqCst)),
        (1, 2)
    );
    assert_eq!(step(&t, "a").output, Some(json!(1)));
    // Rerun from the last step only.
    c.rerun(id, "c").await?;
    let t = h.wait(id).await?;
    assert_eq!(t.state, TaskState::Completed);
    assert_eq!(step(&t, "b").attempt, 3, "b is upstream of c: not rerun");
    assert_eq!(k.c.load(Ordering::SeqCst), 3);
    let kinds: Vec<&str> = t.events.iter().map(|e| e.kind.as_str()).collect();
    assert!(
        kinds.contains(&"step_retried") && kinds.contains(&"rerun"),
        "{kinds:?}"
    );
    assert_eq!(
        audit_actions(&h, id).await?,
        ["step.retry", "step.rerun", "step.rerun"]
    );

    // Mark a failed step succeeded: its output is the operator's, the step after it runs.
    k.broken.store(true, Ordering::SeqCst);
    let failed = h.run("ops", "chain", json!({})).await?;
    assert_eq!(failed.state, TaskState::Failed);
    let (status, _, message) = api_error(c.mark_succeeded(failed.id, "a", json!({})).await);
    assert_eq!(status, 409, "{message}");
    c.mark_succeeded(failed.id, "b", json!({"manual": true}))
        .await?;
    let t = h.wait(failed.id).await?;
    assert_eq!(t.state, TaskState::Completed, "{t:#?}");
    assert_eq!(step(&t, "b").state, StepState::Succeeded);
    assert_eq!(step(&t, "b").output, Some(json!({"manual": true})));
    assert_eq!(step(&t, "c").state, StepState::Succeeded);
    assert_eq!(k.c.load(Ordering::SeqCst), 4);
    assert_eq!(audit_actions(&h, failed.id).await?, ["step.mark_succeeded"]);
    // A rerun refused while nothing is finished to rerun: a running task's waiting step.
    h.finish().await;
    Ok(())
}

fn stuck_task() -> SubmitTask {
    serde_json::from_value(json!({"namespace": "bulk", "template": "stuck", "context": {}}))
        .expect("submit body")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_cancel_and_retry_act_on_the_confirmed_count_only() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(STUCK).await?;
    let c = h.client();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(c.submit(&stuck_task()).await?.task_id);
    }
    let filter = BulkFilterBody {
        namespace: Some("bulk".into()),
        ..Default::default()
    };
    let count = c.bulk_count(&filter).await?;
    assert_eq!((count.count, count.max), (3, 10_000));
    // Another task arrives after the operator saw 3: the action is refused.
    ids.push(c.submit(&stuck_task()).await?.task_id);
    let (status, code, message) =
        api_error(c.bulk(false, &BulkAction::new(filter.clone(), 3)).await);
    assert_eq!((status, code.as_str()), (409, "bulk_refused"), "{message}");
    assert!(message.contains("4 tasks match now"), "{message}");
    for id in &ids {
        assert_eq!(c.task(*id).await?.state, TaskState::Running);
    }
    // With the new count confirmed, all four are cancelled.
    let done = c.bulk(false, &BulkAction::new(filter.clone(), 4)).await?;
    assert_eq!((done.matched, done.acted, done.skipped), (4, 4, 0));
    for id in &ids {
        assert_eq!(c.task(*id).await?.state, TaskState::Cancelled);
    }
    // A time range in the future matches nothing.
    let later = BulkFilterBody {
        created_after: Some((chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339()),
        ..filter.clone()
    };
    assert_eq!(c.bulk_count(&later).await?.count, 0);
    // Bulk retry of the cancelled ones: running again. Cancelling finished ones skips them.
    let cancelled = BulkFilterBody {
        state: Some(TaskState::Cancelled),
        ..filter.clone()
    };
    assert_eq!(c.bulk_count(&cancelled).await?.count, 4);
    let done = c.bulk(true, &BulkAction::new(cancelled, 4)).await?;
    assert_eq!((done.acted, done.skipped), (4, 0));
    for id in &ids {
        assert_eq!(c.task(*id).await?.state, TaskState::Running);
    }
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM audit_log WHERE action IN ('tasks.bulk_cancel', 'tasks.bulk_retry')",
    )
    .fetch_one(&h.db)
    .await?;
    assert_eq!(n, 2);
    // A bad time is a clear 400.
    let bad = BulkFilterBody {
        created_after: Some("yesterday".into()),
        ..Default::default()
    };
    let (status, code, _) = api_error(c.bulk_count(&bad).await);
    assert_eq!((status, code.as_str()), (400, "invalid_request"));
    h.finish().await;
    Ok(())
}

const BOOT: &str = "boot-admin-key-for-operate-tests";

async fn key(h: &Harness, role: &str, namespaces: &[&str]) -> anyhow::Result<Client> {
    let created = h
        .client()
        .create_key(&CreateKey {
            name: format!("{role}-key"),
            role: role.into(),
            namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
        })
        .await?;
    Ok(Client::builder(h.http_url(0))
        .api_key(created.token)
        .build()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actions_need_the_operate_role_in_the_tasks_namespace() -> anyhow::Result<()> {
    let h = Harness::start_with(|c| c.api_keys = vec![BOOT.into()]).await?;
    h.register_yaml(CHAIN).await?;
    let k = chain_worker(&h).await?;
    let failed = h.run("ops", "chain", json!({})).await?;
    assert_eq!(failed.state, TaskState::Failed);
    let read = key(&h, "read", &["ops"]).await?;
    let elsewhere = key(&h, "operate", &["other"]).await?;
    let operator = key(&h, "operate", &["ops"]).await?;
    let filter = BulkFilterBody {
        namespace: Some("ops".into()),
        ..Default::default()
    };
    let (status, code, _) = api_error(read.retry_step(failed.id, "b").await);
    assert_eq!((status, code.as_str()), (403, "forbidden"));
    let (status, _, _) = api_error(read.rerun(failed.id, "a").await);
    assert_eq!(status, 403);
    let (status, _, _) = api_error(read.mark_succeeded(failed.id, "b", json!(1)).await);
    assert_eq!(status, 403);
    // Counting needs only read; acting needs operate.
    assert_eq!(read.bulk_count(&filter).await?.count, 1);
    let (status, _, _) = api_error(read.bulk(true, &BulkAction::new(filter.clone(), 1)).await);
    assert_eq!(status, 403);
    // Outside the key's namespaces the task is not even seen.
    let (status, _, _) = api_error(elsewhere.retry_step(failed.id, "b").await);
    assert_eq!(status, 404);
    let (status, _, _) = api_error(elsewhere.bulk_count(&filter).await);
    assert_eq!(status, 403);
    assert_eq!(h.client().task(failed.id).await?.state, TaskState::Failed);
    // The operator of the namespace may; the audit names the key.
    k.broken.store(false, Ordering::SeqCst);
    operator.retry_step(failed.id, "b").await?;
    assert_eq!(h.wait(failed.id).await?.state, TaskState::Completed);
    let actor: String =
        sqlx::query_scalar("SELECT actor FROM audit_log WHERE action = 'step.retry'")
            .fetch_one(&h.db)
            .await?;
    assert!(actor.contains("operate-key"), "{actor}");
    h.finish().await;
    Ok(())
}
