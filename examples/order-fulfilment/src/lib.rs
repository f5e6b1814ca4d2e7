//! # Order fulfilment: an example Tasker workflow
//!
//! The template ([`TEMPLATE_YAML`], `templates/order_fulfilment.yaml`, namespace `shop`) runs:
//!
//! ```text
//! validate_order ─┬─▶ charge_payment ─┬─▶ ship_order ─▶ notify_customer
//!                 └─▶ reserve_stock  ─┘
//! ```
//!
//! Each step's handler is a plain `async fn(StepContext) -> StepOutput` over a pure function
//! (unit-tested below); [`worker`] registers them all. The payment, stock and shipping "services"
//! are simulated: ids are derived from the step's idempotency key, so a retried step returns the
//! same charge, reservation or tracking number instead of doing the work twice.
//!
//! The task context is an [`Order`]:
//!
//! ```json
//! {"order_id": "o-1001", "customer_email": "ada@example.com", "amount_cents": 4999,
//!  "items": [{"sku": "BOOK-42", "quantity": 1}]}
//! ```

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tasker_worker::{StepContext, StepError, StepOutput, WorkerBuilder};

/// The template this crate's handlers implement.
pub const TEMPLATE_YAML: &str = include_str!("../templates/order_fulfilment.yaml");

/// Step (and handler) names, as in the template.
pub mod steps {
    pub const VALIDATE_ORDER: &str = "validate_order";
    pub const CHARGE_PAYMENT: &str = "charge_payment";
    pub const RESERVE_STOCK: &str = "reserve_stock";
    pub const SHIP_ORDER: &str = "ship_order";
    pub const NOTIFY_CUSTOMER: &str = "notify_customer";
}

/// The task context.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub order_id: String,
    #[serde(default)]
    pub customer_email: Option<String>,
    pub amount_cents: i64,
    pub items: Vec<Item>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub sku: String,
    #[serde(alias = "qty")]
    pub quantity: u32,
}

/// Output of `charge_payment`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Charge {
    pub charge_id: String,
    pub amount_cents: i64,
}

/// Output of `reserve_stock`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reservation {
    pub reservation_id: String,
    pub items: Vec<Item>,
}

/// Output of `ship_order`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Shipment {
    pub tracking_number: String,
}

/// A worker for the `default` queue with every handler of the workflow registered. Add
/// `.concurrency(..)`, `.name(..)` and so on, then `.build()`.
pub fn worker(amqp_url: &str, prefix: &str) -> WorkerBuilder {
    tasker_worker::Worker::builder(amqp_url)
        .prefix(prefix)
        .queue("default")
        .handler(steps::VALIDATE_ORDER, validate_order)
        .handler(steps::CHARGE_PAYMENT, charge_payment)
        .handler(steps::RESERVE_STOCK, reserve_stock)
        .handler(steps::SHIP_ORDER, ship_order)
        .handler(steps::NOTIFY_CUSTOMER, notify_customer)
}

// ---- handlers -------------------------------------------------------------------------------

pub async fn validate_order(ctx: StepContext) -> StepOutput {
    validate(&ctx.input()?)
}

pub async fn charge_payment(ctx: StepContext) -> StepOutput {
    to_output(charge(&ctx.input()?, ctx.idempotency_key()))
}

pub async fn reserve_stock(ctx: StepContext) -> StepOutput {
    to_output(reserve(&ctx.input()?, ctx.idempotency_key()))
}

pub async fn ship_order(ctx: StepContext) -> StepOutput {
    let charge: Charge = ctx.parent(steps::CHARGE_PAYMENT)?;
    let reservation: Reservation = ctx.parent(steps::RESERVE_STOCK)?;
    to_output(ship(&charge, &reservation, ctx.idempotency_key())?)
}

pub async fn notify_customer(ctx: StepContext) -> StepOutput {
    let order: Order = ctx.input()?;
    let shipment: Shipment = ctx.parent(steps::SHIP_ORDER)?;
    Ok(notify(&order, &shipment))
}

// ---- the logic, free of I/O -----------------------------------------------------------------

/// Checks the order. Every problem is permanent: the same order fails the same way again.
pub fn validate(order: &Order) -> StepOutput {
    if order.order_id.trim().is_empty() {
        return Err(StepError::permanent("order_id must not be empty"));
    }
    if order.items.is_empty() {
        return Err(StepError::permanent(format!(
            "order {} has no items",
            order.order_id
        )));
    }
    if let Some(item) = order.items.iter().find(|i| i.quantity == 0) {
        return Err(StepError::permanent(format!(
            "order {}: item {} has quantity 0",
            order.order_id, item.sku
        )));
    }
    if order.amount_cents <= 0 {
        return Err(StepError::permanent(format!(
            "order {}: amount_cents must be greater than 0, got {}",
            order.order_id, order.amount_cents
        )));
    }
    Ok(json!({
        "order_id": order.order_id,
        "item_count": order.items.iter().map(|i| u64::from(i.quantity)).sum::<u64>(),
        "amount_cents": order.amount_cents,
    }))
}

/// Charges the order. The charge id comes from the idempotency key, so every attempt of this
/// step names the same charge (a real provider would be sent the key to de-duplicate).
pub fn charge(order: &Order, idempotency_key: &str) -> Charge {
    Charge {
        charge_id: format!("ch_{}", short_id(idempotency_key)),
        amount_cents: order.amount_cents,
    }
}

/// Reserves the order's items, idempotently like [`charge`].
pub fn reserve(order: &Order, idempotency_key: &str) -> Reservation {
    Reservation {
        reservation_id: format!("res_{}", short_id(idempotency_key)),
        items: order.items.clone(),
    }
}

/// Ships what was paid for and reserved.
pub fn ship(
    charge: &Charge,
    reservation: &Reservation,
    idempotency_key: &str,
) -> Result<Shipment, StepError> {
    if charge.charge_id.is_empty() || reservation.reservation_id.is_empty() {
        return Err(StepError::permanent(
            "cannot ship without a charge and a reservation",
        ));
    }
    if reservation.items.is_empty() {
        return Err(StepError::permanent(format!(
            "reservation {} holds no items",
            reservation.reservation_id
        )));
    }
    Ok(Shipment {
        tracking_number: format!("TRK-{}", short_id(idempotency_key).to_uppercase()),
    })
}

/// The notification sent to the customer.
pub fn notify(order: &Order, shipment: &Shipment) -> Value {
    let to = order.customer_email.as_deref().unwrap_or("the customer");
    json!({
        "notified": true,
        "message": format!(
            "Told {to}: order {} has shipped, tracking number {}.",
            order.order_id, shipment.tracking_number
        ),
    })
}

fn to_output<T: Serialize>(value: T) -> StepOutput {
    serde_json::to_value(value)
        .map_err(|e| StepError::permanent(format!("cannot serialize the output: {e}")))
}

/// A short, stable id derived from a key (FNV-1a, 64 bits, hex).
fn short_id(key: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tasker_worker::schemas::Template;

    fn order() -> Order {
        Order {
            order_id: "o-1".into(),
            customer_email: Some("ada@example.com".into()),
            amount_cents: 4_999,
            items: vec![Item {
                sku: "BOOK-42".into(),
                quantity: 2,
            }],
        }
    }

    #[test]
    fn validation_refuses_bad_orders_for_good() {
        assert_eq!(
            validate(&order()).unwrap(),
            json!({"order_id": "o-1", "item_count": 2, "amount_cents": 4_999})
        );
        for (broken, expected) in [
            (
                Order {
                    order_id: " ".into(),
                    ..order()
                },
                "order_id must not be empty",
            ),
            (
                Order {
                    items: vec![],
                    ..order()
                },
                "has no items",
            ),
            (
                Order {
                    amount_cents: 0,
                    ..order()
                },
                "amount_cents must be greater than 0, got 0",
            ),
            (
                Order {
                    amount_cents: -5,
                    ..order()
                },
                "got -5",
            ),
            (
                Order {
                    items: vec![Item {
                        sku: "X".into(),
                        quantity: 0,
                    }],
                    ..order()
                },
                "item X has quantity 0",
            ),
        ] {
            let err = validate(&broken).unwrap_err();
            assert!(!err.is_retryable(), "{err}");
            assert!(
                err.message().contains(expected),
                "{err} should say {expected:?}"
            );
        }
    }

    #[test]
    fn charges_and_reservations_are_idempotent() {
        let a = charge(&order(), "task-1:charge_payment");
        assert_eq!(a, charge(&order(), "task-1:charge_payment"));
        assert_ne!(
            a.charge_id,
            charge(&order(), "task-2:charge_payment").charge_id
        );
        assert_eq!(a.amount_cents, 4_999);
        assert!(a.charge_id.starts_with("ch_"));
        let r = reserve(&order(), "task-1:reserve_stock");
        assert!(r.reservation_id.starts_with("res_"));
        assert_eq!(r.items, order().items);
    }

    #[test]
    fn shipping_needs_a_charge_and_items() {
        let c = charge(&order(), "k1");
        let r = reserve(&order(), "k2");
        let s = ship(&c, &r, "k3").unwrap();
        assert!(
            s.tracking_number.starts_with("TRK-") && s.tracking_number.len() == 20,
            "{}",
            s.tracking_number
        );
        assert_eq!(s, ship(&c, &r, "k3").unwrap());
        let empty = Reservation { items: vec![], ..r };
        assert!(!ship(&c, &empty, "k3").unwrap_err().is_retryable());
    }

    #[test]
    fn the_notification_names_order_and_tracking_number() {
        let n = notify(
            &order(),
            &Shipment {
                tracking_number: "TRK-1".into(),
            },
        );
        assert_eq!(n["notified"], true);
        assert_eq!(
            n["message"],
            "Told ada@example.com: order o-1 has shipped, tracking number TRK-1."
        );
    }

    #[tokio::test]
    async fn handlers_read_context_and_parents() {
        let ctx = StepContext::for_test(steps::SHIP_ORDER, serde_json::to_value(order()).unwrap())
            .with_parent(
                steps::CHARGE_PAYMENT,
                serde_json::to_value(charge(&order(), "a")).unwrap(),
            )
            .with_parent(
                steps::RESERVE_STOCK,
                serde_json::to_value(reserve(&order(), "b")).unwrap(),
            );
        let shipped = ship_order(ctx.clone()).await.unwrap();
        let tracking = shipped["tracking_number"].as_str().unwrap().to_owned();
        // Retries ship the same parcel.
        assert_eq!(
            ship_order(ctx.with_attempt(2)).await.unwrap()["tracking_number"],
            tracking
        );

        let ctx = StepContext::for_test(
            steps::NOTIFY_CUSTOMER,
            serde_json::to_value(order()).unwrap(),
        )
        .with_parent(steps::SHIP_ORDER, shipped);
        let told = notify_customer(ctx).await.unwrap();
        assert!(told["message"].as_str().unwrap().contains(&tracking));

        let missing_parent =
            StepContext::for_test(steps::SHIP_ORDER, serde_json::to_value(order()).unwrap());
        let err = ship_order(missing_parent).await.unwrap_err();
        assert!(
            !err.is_retryable() && err.message().contains("charge_payment"),
            "{err}"
        );
        let bad_context = StepContext::for_test(steps::VALIDATE_ORDER, json!({"order_id": "o-1"}));
        assert!(
            !validate_order(bad_context)
                .await
                .unwrap_err()
                .is_retryable()
        );
        let charged = charge_payment(StepContext::for_test(
            steps::CHARGE_PAYMENT,
            serde_json::to_value(order()).unwrap(),
        ))
        .await
        .unwrap();
        assert_eq!(charged["amount_cents"], 4_999);
    }

    #[test]
    fn the_template_is_valid_and_matches_the_handlers() {
        let template: Template = serde_saphyr::from_str(TEMPLATE_YAML).unwrap();
        template.validate().unwrap();
        assert_eq!(
            (
                template.namespace.as_str(),
                template.name.as_str(),
                template.version
            ),
            ("shop", "order_fulfilment", 1)
        );
        let names: Vec<&str> = template.steps.iter().map(|s| s.handler.as_str()).collect();
        assert_eq!(
            names,
            [
                steps::VALIDATE_ORDER,
                steps::CHARGE_PAYMENT,
                steps::RESERVE_STOCK,
                steps::SHIP_ORDER,
                steps::NOTIFY_CUSTOMER
            ]
        );
        assert!(template.steps.iter().all(|s| s.queue() == "default"));
        let ship = &template.steps[3];
        assert_eq!(
            ship.depends_on,
            [steps::CHARGE_PAYMENT, steps::RESERVE_STOCK]
        );
        assert_eq!(template.steps[1].execution_timeout.0, 30_000);
        assert_eq!(template.steps[0].retry.max_attempts, 1);
    }
}
