//! The example workflow end to end, through the public test harness: a real orchestrator, a real
//! worker with the example's handlers, real PostgreSQL and RabbitMQ.

use serde_json::json;
use tasker_example_orders::{TEMPLATE_YAML, worker};
use tasker_tests::Harness;
use tasker_worker::schemas::{StepState, TaskState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_validated_charged_reserved_shipped_and_notified() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(TEMPLATE_YAML).await?;
    h.spawn_worker(worker(&h.services.amqp_url, &h.prefix))
        .await?;
    let order = json!({"order_id": "A-1001", "amount_cents": 4999, "items": [{"sku": "BOOK-1", "quantity": 2}]});
    let task = h.run("shop", "order_fulfilment", order).await?;
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    let names: Vec<&str> = task.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "validate_order",
            "charge_payment",
            "reserve_stock",
            "ship_order",
            "notify_customer"
        ]
    );
    assert!(task.steps.iter().all(|s| s.state == StepState::Succeeded));
    // Shipping saw both parallel parents; the task's result is the notification.
    let ship = &task.steps[3];
    assert!(
        ship.output
            .as_ref()
            .unwrap()
            .get("tracking_number")
            .is_some(),
        "{:?}",
        ship.output
    );
    assert!(
        task.output
            .as_ref()
            .unwrap()
            .get("notify_customer")
            .is_some(),
        "{:?}",
        task.output
    );
    h.finish().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_order_fails_without_charging() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(TEMPLATE_YAML).await?;
    h.spawn_worker(worker(&h.services.amqp_url, &h.prefix))
        .await?;
    let task = h
        .run(
            "shop",
            "order_fulfilment",
            json!({"order_id": "A-1002", "amount_cents": 0, "items": []}),
        )
        .await?;
    assert_eq!(task.state, TaskState::Failed);
    assert_eq!(task.steps[0].state, StepState::Failed);
    assert_eq!(task.steps[0].attempt, 1, "validation errors are permanent");
    assert!(
        task.steps[1..]
            .iter()
            .all(|s| s.state == StepState::Skipped),
        "nothing is charged or shipped"
    );
    h.finish().await;
    Ok(())
}
