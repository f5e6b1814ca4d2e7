//! The example workflow end to end, through the public test harness: a real orchestrator, a real
//! worker with the example's handlers, real PostgreSQL and RabbitMQ.

use serde_json::{Value, json};
use tasker_example_orders::{EXPRESS_FROM_CENTS, TEMPLATE_VERSION, TEMPLATE_YAML, steps, worker};
use tasker_tests::Harness;
use tasker_worker::schemas::api::{StepView, TaskView};
use tasker_worker::schemas::{StepState, TaskState};

fn step<'a>(task: &'a TaskView, name: &str) -> &'a StepView {
    task.steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step {name} in {task:#?}"))
}

/// Runs one valid order and checks what every order goes through: validated, charged, one
/// reservation per line item in line order, one shipping branch chosen and run, the other
/// skipped, the customer notified. Returns the task for the caller's own checks.
async fn fulfil(
    h: &Harness,
    order: Value,
    chosen: &str,
    not_chosen: &str,
) -> anyhow::Result<TaskView> {
    let task = h.run("shop", "order_fulfilment", order.clone()).await?;
    assert_eq!(task.state, TaskState::Completed, "{task:#?}");
    let names: Vec<&str> = task.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            steps::VALIDATE_ORDER,
            steps::CHARGE_PAYMENT,
            steps::RESERVE_ITEMS,
            steps::CHOOSE_SHIPPING,
            steps::SHIP_EXPRESS,
            steps::SHIP_STANDARD,
            steps::NOTIFY_CUSTOMER,
        ]
    );
    for s in &task.steps {
        let expected = if s.name == not_chosen {
            StepState::Skipped
        } else {
            StepState::Succeeded
        };
        assert_eq!(s.state, expected, "{}: {task:#?}", s.name);
    }

    // The mapped step: one reservation per line item, in line order, each its own.
    let items = order["items"].as_array().unwrap();
    let reserve = step(&task, steps::RESERVE_ITEMS);
    let reservations = reserve.output.as_ref().unwrap().as_array().unwrap();
    assert_eq!(reservations.len(), items.len(), "{reservations:?}");
    for (line, (r, item)) in reservations.iter().zip(items).enumerate() {
        assert_eq!(r["line"], json!(line), "{r}");
        assert_eq!(r["sku"], item["sku"], "{r}");
        assert_eq!(r["quantity"], item["quantity"], "{r}");
    }
    let mut ids: Vec<&str> = reservations
        .iter()
        .map(|r| r["reservation_id"].as_str().unwrap())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(
        ids.len(),
        items.len(),
        "one reservation per line: {reservations:?}"
    );
    let map = reserve
        .map
        .as_ref()
        .expect("a mapped step counts its instances");
    let lines = u32::try_from(items.len())?;
    assert_eq!(
        (map.total, map.succeeded, map.failed),
        (Some(lines), lines, 0)
    );

    // The decision: its output is the plan, the chosen branch ran, the other was skipped.
    let plan = step(&task, steps::CHOOSE_SHIPPING).output.clone().unwrap();
    assert_eq!(
        plan["reservation_ids"],
        json!(
            reservations
                .iter()
                .map(|r| r["reservation_id"].clone())
                .collect::<Vec<_>>()
        )
    );
    let shipped = step(&task, chosen).output.clone().unwrap();
    assert!(
        shipped["tracking_number"]
            .as_str()
            .unwrap()
            .starts_with("TRK-"),
        "{shipped}"
    );
    let skipped = step(&task, not_chosen);
    assert_eq!(
        skipped.skip_reason.as_deref(),
        Some("not chosen by choose_shipping"),
        "{skipped:#?}"
    );
    assert_eq!(skipped.output, None);

    // The join ran on the branch that ran; the task's result is the notification.
    let told = step(&task, steps::NOTIFY_CUSTOMER).output.clone().unwrap();
    assert_eq!(told["tracking_number"], shipped["tracking_number"]);
    assert_eq!(task.output, Some(json!({ "notify_customer": told })));
    Ok(task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_reserved_per_line_and_shipped_by_the_chosen_service() -> anyhow::Result<()> {
    let h = Harness::start().await?;
    h.register_yaml(TEMPLATE_YAML).await?;
    h.spawn_worker(worker(&h.services.amqp_url, &h.prefix))
        .await?;

    // A small order: standard shipping.
    let task = fulfil(
        &h,
        json!({"order_id": "A-1001", "customer_email": "ada@example.com", "amount_cents": 4999,
               "items": [{"sku": "BOOK-1", "quantity": 2}, {"sku": "PEN-7", "quantity": 1},
                         {"sku": "MUG-3", "quantity": 4}]}),
        steps::SHIP_STANDARD,
        steps::SHIP_EXPRESS,
    )
    .await?;
    let plan = step(&task, steps::CHOOSE_SHIPPING).output.clone().unwrap();
    assert_eq!(plan["service"], "standard", "{plan}");
    let told = task.output.unwrap()["notify_customer"]["message"].clone();
    assert!(
        told.as_str()
            .unwrap()
            .starts_with("Told ada@example.com: order A-1001 has shipped standard"),
        "{told}"
    );

    // The customer asked for express.
    let task = fulfil(
        &h,
        json!({"order_id": "A-1002", "amount_cents": 2500, "express": true,
               "items": [{"sku": "CABLE-9", "quantity": 1}]}),
        steps::SHIP_EXPRESS,
        steps::SHIP_STANDARD,
    )
    .await?;
    let plan = step(&task, steps::CHOOSE_SHIPPING).output.clone().unwrap();
    assert_eq!(plan["service"], "express", "{plan}");
    assert_eq!(plan["reason"], "the customer asked for express");
    assert_eq!(
        task.output.unwrap()["notify_customer"]["service"],
        "express"
    );

    // A large order ships express without asking; twelve lines, ten reserved at a time.
    let items: Vec<Value> = (0..12)
        .map(|i| json!({"sku": format!("SKU-{i:02}"), "quantity": i + 1}))
        .collect();
    let task = fulfil(
        &h,
        json!({"order_id": "A-1003", "amount_cents": EXPRESS_FROM_CENTS, "items": items}),
        steps::SHIP_EXPRESS,
        steps::SHIP_STANDARD,
    )
    .await?;
    let plan = step(&task, steps::CHOOSE_SHIPPING).output.clone().unwrap();
    assert!(
        plan["reason"]
            .as_str()
            .unwrap()
            .contains("express ships free"),
        "{plan}"
    );

    // Tasks that name no version run the newest registered: this crate's.
    assert_eq!(task.template_version, TEMPLATE_VERSION);
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
            json!({"order_id": "A-1004", "amount_cents": 0, "items": []}),
        )
        .await?;
    assert_eq!(task.state, TaskState::Failed);
    assert_eq!(task.steps[0].state, StepState::Failed);
    assert_eq!(task.steps[0].attempt, 1, "validation errors are permanent");
    assert!(
        task.steps[1..]
            .iter()
            .all(|s| s.state == StepState::Skipped),
        "nothing is charged, reserved or shipped: {task:#?}"
    );
    h.finish().await;
    Ok(())
}
