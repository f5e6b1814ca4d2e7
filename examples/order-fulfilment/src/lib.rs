//! # Order fulfilment: an example Tasker workflow
//!
//! The template ([`TEMPLATE_YAML`], `templates/order_fulfilment.yaml`, namespace `shop`,
//! version [`TEMPLATE_VERSION`]) runs:
//!
//! ```text
//!                 ┌─▶ charge_payment ──────────┐                 ┌─▶ ship_express  ─┐
//! validate_order ─┤                            ├─▶ choose_shipping                  ├─▶ notify_customer
//!                 └─▶ reserve_items (per line) ┘                 └─▶ ship_standard ─┘
//! ```
//!
//! - `reserve_items` is a **mapped step** (`map: { over: validate_order.items }`): one instance
//!   per line item of the order, at most 10 at once, each reserving its line
//!   ([`reserve_items`], reading its element with `ctx.item_as::<Item>()`). Its output is the
//!   array of the [`Reservation`]s in line order.
//! - `choose_shipping` is a **decision step** (`decides: [ship_express, ship_standard]`):
//!   [`ChooseShipping`], a typed `StepHandler<Decision>`, picks express when the order asks for
//!   it (`"express": true`) or its total reaches [`EXPRESS_FROM_CENTS`], standard otherwise. The
//!   other branch is skipped (`not chosen by choose_shipping`).
//! - `notify_customer` has `join: any`: it runs after whichever shipping branch ran.
//!
//! The other handlers are plain `async fn(StepContext) -> StepOutput`s; every handler is a thin
//! wrapper over a pure function (unit-tested below), and [`worker`] registers them all. The
//! payment, stock and shipping "services" are simulated: ids are derived from the step's
//! idempotency key (per line for `reserve_items`), so a retried step returns the same charge,
//! reservation or tracking number instead of doing the work twice.
//!
//! The task context is an [`Order`] (`express` is optional, default `false`):
//!
//! ```json
//! {"order_id": "o-1001", "customer_email": "ada@example.com", "amount_cents": 4999,
//!  "express": false, "items": [{"sku": "BOOK-42", "quantity": 1}]}
//! ```

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tasker_worker::{Decision, StepContext, StepError, StepHandler, StepOutput, WorkerBuilder};

/// The template this crate's handlers implement.
pub const TEMPLATE_YAML: &str = include_str!("../templates/order_fulfilment.yaml");

/// The version in [`TEMPLATE_YAML`]. Version 1 was a fixed DAG (`reserve_stock`, `ship_order`);
/// a registered version is immutable, so the dynamic workflow is version 2.
pub const TEMPLATE_VERSION: u32 = 2;

/// Orders of more line items than this are refused by `validate_order` (and `reserve_items`
/// allows no more instances: `map.max_items` in the template).
pub const MAX_LINE_ITEMS: usize = 100;

/// Orders whose total reaches this many cents ship express (free), whatever they asked for.
pub const EXPRESS_FROM_CENTS: i64 = 10_000;

/// Step (and handler) names, as in the template.
pub mod steps {
    pub const VALIDATE_ORDER: &str = "validate_order";
    pub const CHARGE_PAYMENT: &str = "charge_payment";
    /// A mapped step: one instance per line item.
    pub const RESERVE_ITEMS: &str = "reserve_items";
    /// A decision step: chooses [`SHIP_EXPRESS`] or [`SHIP_STANDARD`].
    pub const CHOOSE_SHIPPING: &str = "choose_shipping";
    pub const SHIP_EXPRESS: &str = "ship_express";
    pub const SHIP_STANDARD: &str = "ship_standard";
    /// `join: any` over the two shipping branches.
    pub const NOTIFY_CUSTOMER: &str = "notify_customer";
}

/// The task context.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub order_id: String,
    #[serde(default)]
    pub customer_email: Option<String>,
    pub amount_cents: i64,
    /// The customer asked for express shipping.
    #[serde(default)]
    pub express: bool,
    pub items: Vec<Item>,
}

/// A line item of an [`Order`]; also the element each instance of `reserve_items` gets.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Item {
    pub sku: String,
    #[serde(alias = "qty")]
    pub quantity: u32,
}

/// Output of `validate_order`: the checked order, with the line items `reserve_items` maps over.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ValidatedOrder {
    pub order_id: String,
    /// Units over all lines.
    pub item_count: u64,
    pub amount_cents: i64,
    pub items: Vec<Item>,
}

/// Output of `charge_payment`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Charge {
    pub charge_id: String,
    pub amount_cents: i64,
}

/// Output of one instance of `reserve_items`: the reservation of one line item. The mapped step's
/// output is an array of these, in line order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reservation {
    /// The line's position in the order, from 0 (the instance's `map_index`).
    pub line: u32,
    pub sku: String,
    pub quantity: u32,
    pub reservation_id: String,
}

/// A shipping service: each is a branch of `choose_shipping`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Service {
    Express,
    Standard,
}

impl Service {
    /// The step that ships by this service.
    pub fn step(self) -> &'static str {
        match self {
            Service::Express => steps::SHIP_EXPRESS,
            Service::Standard => steps::SHIP_STANDARD,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Service::Express => "express",
            Service::Standard => "standard",
        }
    }

    fn carrier(self) -> &'static str {
        match self {
            Service::Express => "Parcel Express",
            Service::Standard => "Parcel Post",
        }
    }

    fn estimated_days(self) -> u32 {
        match self {
            Service::Express => 1,
            Service::Standard => 4,
        }
    }
}

/// Output of `choose_shipping` (the decision step): what to ship and how. Its chosen branch
/// reads it as its parent's output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShippingPlan {
    pub service: Service,
    /// Why this service, in words.
    pub reason: String,
    pub charge_id: String,
    /// One per line item, in line order.
    pub reservation_ids: Vec<String>,
}

/// Output of `ship_express` or `ship_standard`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Shipment {
    pub tracking_number: String,
    pub service: Service,
    pub carrier: String,
    pub estimated_days: u32,
}

/// A worker for the `default` queue with every handler of the workflow registered. Add
/// `.concurrency(..)`, `.name(..)` and so on, then `.build()`.
pub fn worker(amqp_url: &str, prefix: &str) -> WorkerBuilder {
    tasker_worker::Worker::builder(amqp_url)
        .prefix(prefix)
        .namespace("shop")
        .queue("default")
        .handler(steps::VALIDATE_ORDER, validate_order)
        .handler(steps::CHARGE_PAYMENT, charge_payment)
        .handler(steps::RESERVE_ITEMS, reserve_items)
        .handler(steps::CHOOSE_SHIPPING, ChooseShipping::default())
        .handler(steps::SHIP_EXPRESS, ship_express)
        .handler(steps::SHIP_STANDARD, ship_standard)
        .handler(steps::NOTIFY_CUSTOMER, notify_customer)
}

// ---- handlers -------------------------------------------------------------------------------

pub async fn validate_order(ctx: StepContext) -> StepOutput {
    to_output(validate(&ctx.input()?)?)
}

pub async fn charge_payment(ctx: StepContext) -> StepOutput {
    to_output(charge(&ctx.input()?, ctx.idempotency_key()))
}

/// An instance of the mapped step `reserve_items`: reserves the one line item it was given. Its
/// `parent_outputs` is empty; the element (an [`Item`]) is all it needs.
pub async fn reserve_items(ctx: StepContext) -> StepOutput {
    let item: Item = ctx.item_as()?;
    let line = ctx.index().ok_or_else(|| {
        StepError::permanent("reserve_items runs per line item (map), but has no map_index")
    })?;
    to_output(reserve(&item, line, ctx.idempotency_key()))
}

/// The handler of the decision step `choose_shipping`: chooses `ship_express` or
/// `ship_standard`, with the [`ShippingPlan`] as its output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChooseShipping {
    /// Orders whose total reaches this ship express even when they did not ask for it.
    pub express_from_cents: i64,
}

impl Default for ChooseShipping {
    fn default() -> Self {
        Self {
            express_from_cents: EXPRESS_FROM_CENTS,
        }
    }
}

impl StepHandler<Decision> for ChooseShipping {
    async fn call(&self, ctx: StepContext) -> Result<Decision, StepError> {
        let order: Order = ctx.input()?;
        let charge: Charge = ctx.parent(steps::CHARGE_PAYMENT)?;
        let reservations: Vec<Reservation> = ctx.parent(steps::RESERVE_ITEMS)?;
        let plan = plan_shipping(&order, &charge, &reservations, self.express_from_cents)?;
        let branch = plan.service.step();
        Ok(Decision::choose([branch]).output(to_output(plan)?))
    }
}

pub async fn ship_express(ctx: StepContext) -> StepOutput {
    ship_by(&ctx, Service::Express)
}

pub async fn ship_standard(ctx: StepContext) -> StepOutput {
    ship_by(&ctx, Service::Standard)
}

fn ship_by(ctx: &StepContext, service: Service) -> StepOutput {
    let plan: ShippingPlan = ctx.parent(steps::CHOOSE_SHIPPING)?;
    to_output(ship(&plan, service, ctx.idempotency_key())?)
}

/// Runs after whichever shipping branch ran (`join: any`): its `parent_outputs` holds that
/// branch only.
pub async fn notify_customer(ctx: StepContext) -> StepOutput {
    let order: Order = ctx.input()?;
    let branch = [steps::SHIP_EXPRESS, steps::SHIP_STANDARD]
        .into_iter()
        .find(|step| ctx.parent_outputs().contains_key(*step))
        .ok_or_else(|| {
            StepError::permanent(format!(
                "step {:?} has no output from {} or {}",
                ctx.step(),
                steps::SHIP_EXPRESS,
                steps::SHIP_STANDARD
            ))
        })?;
    let shipment: Shipment = ctx.parent(branch)?;
    Ok(notify(&order, &shipment))
}

// ---- the logic, free of I/O -----------------------------------------------------------------

/// Checks the order. Every problem is permanent: the same order fails the same way again.
pub fn validate(order: &Order) -> Result<ValidatedOrder, StepError> {
    if order.order_id.trim().is_empty() {
        return Err(StepError::permanent("order_id must not be empty"));
    }
    if order.items.is_empty() {
        return Err(StepError::permanent(format!(
            "order {} has no items",
            order.order_id
        )));
    }
    if order.items.len() > MAX_LINE_ITEMS {
        return Err(StepError::permanent(format!(
            "order {} has {} line items; at most {MAX_LINE_ITEMS} are allowed",
            order.order_id,
            order.items.len()
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
    Ok(ValidatedOrder {
        order_id: order.order_id.clone(),
        item_count: order.items.iter().map(|i| u64::from(i.quantity)).sum(),
        amount_cents: order.amount_cents,
        items: order.items.clone(),
    })
}

/// Charges the order. The charge id comes from the idempotency key, so every attempt of this
/// step names the same charge (a real provider would be sent the key to de-duplicate).
pub fn charge(order: &Order, idempotency_key: &str) -> Charge {
    Charge {
        charge_id: format!("ch_{}", short_id(idempotency_key)),
        amount_cents: order.amount_cents,
    }
}

/// Reserves one line item, idempotently like [`charge`]: an instance's idempotency key names its
/// line (`"{task_id}:reserve_items:{line}"`), so each line gets its own reservation.
pub fn reserve(item: &Item, line: u32, idempotency_key: &str) -> Reservation {
    Reservation {
        line,
        sku: item.sku.clone(),
        quantity: item.quantity,
        reservation_id: format!("res_{}", short_id(idempotency_key)),
    }
}

/// Decides how to ship a paid and reserved order: express when the customer asked for it or the
/// total reaches `express_from_cents`, standard otherwise. Fails (for good) unless there is a
/// charge and exactly one reservation per line item, in line order.
pub fn plan_shipping(
    order: &Order,
    charge: &Charge,
    reservations: &[Reservation],
    express_from_cents: i64,
) -> Result<ShippingPlan, StepError> {
    if charge.charge_id.is_empty() {
        return Err(StepError::permanent(format!(
            "order {}: cannot ship without a charge",
            order.order_id
        )));
    }
    if reservations.len() != order.items.len() {
        return Err(StepError::permanent(format!(
            "order {} has {} line items but {} reservations",
            order.order_id,
            order.items.len(),
            reservations.len()
        )));
    }
    for (line, (item, r)) in order.items.iter().zip(reservations).enumerate() {
        if usize::try_from(r.line).ok() != Some(line)
            || r.sku != item.sku
            || r.quantity != item.quantity
        {
            return Err(StepError::permanent(format!(
                "order {}: reservation {} ({} x{}, line {}) does not match line {line} ({} x{})",
                order.order_id,
                r.reservation_id,
                r.sku,
                r.quantity,
                r.line,
                item.sku,
                item.quantity
            )));
        }
    }
    let (service, reason) = if order.express {
        (
            Service::Express,
            "the customer asked for express".to_owned(),
        )
    } else if order.amount_cents >= express_from_cents {
        (
            Service::Express,
            format!(
                "the total, {} cents, reaches {express_from_cents}: express ships free",
                order.amount_cents
            ),
        )
    } else {
        (
            Service::Standard,
            format!(
                "the total, {} cents, is below {express_from_cents} and express was not asked for",
                order.amount_cents
            ),
        )
    };
    Ok(ShippingPlan {
        service,
        reason,
        charge_id: charge.charge_id.clone(),
        reservation_ids: reservations
            .iter()
            .map(|r| r.reservation_id.clone())
            .collect(),
    })
}

/// Ships what the plan says was paid for and reserved, by `service` (the branch that runs it).
pub fn ship(
    plan: &ShippingPlan,
    service: Service,
    idempotency_key: &str,
) -> Result<Shipment, StepError> {
    if plan.service != service {
        return Err(StepError::permanent(format!(
            "step {} ships {} orders, but {} was chosen",
            service.step(),
            service.name(),
            plan.service.name()
        )));
    }
    if plan.charge_id.is_empty() || plan.reservation_ids.is_empty() {
        return Err(StepError::permanent(
            "cannot ship without a charge and reservations",
        ));
    }
    Ok(Shipment {
        tracking_number: format!("TRK-{}", short_id(idempotency_key).to_uppercase()),
        service,
        carrier: service.carrier().to_owned(),
        estimated_days: service.estimated_days(),
    })
}

/// The notification sent to the customer.
pub fn notify(order: &Order, shipment: &Shipment) -> Value {
    let to = order.customer_email.as_deref().unwrap_or("the customer");
    let days = match shipment.estimated_days {
        1 => "1 day".to_owned(),
        n => format!("{n} days"),
    };
    json!({
        "notified": true,
        "service": shipment.service,
        "tracking_number": shipment.tracking_number,
        "message": format!(
            "Told {to}: order {} has shipped {} with {} (about {days}), tracking number {}.",
            order.order_id,
            shipment.service.name(),
            shipment.carrier,
            shipment.tracking_number
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
    use tasker_worker::schemas::{Join, Template};

    fn order() -> Order {
        Order {
            order_id: "o-1".into(),
            customer_email: Some("ada@example.com".into()),
            amount_cents: 4_999,
            express: false,
            items: vec![
                Item {
                    sku: "BOOK-42".into(),
                    quantity: 2,
                },
                Item {
                    sku: "PEN-7".into(),
                    quantity: 1,
                },
            ],
        }
    }

    fn reservations(order: &Order) -> Vec<Reservation> {
        (0..)
            .zip(&order.items)
            .map(|(line, item)| reserve(item, line, &format!("t:reserve_items:{line}")))
            .collect()
    }

    fn plan(order: &Order) -> ShippingPlan {
        plan_shipping(
            order,
            &charge(order, "t:charge_payment"),
            &reservations(order),
            EXPRESS_FROM_CENTS,
        )
        .unwrap()
    }

    #[test]
    fn validation_refuses_bad_orders_for_good() {
        assert_eq!(
            to_output(validate(&order()).unwrap()).unwrap(),
            json!({
                "order_id": "o-1",
                "item_count": 3,
                "amount_cents": 4_999,
                "items": [{"sku": "BOOK-42", "quantity": 2}, {"sku": "PEN-7", "quantity": 1}],
            })
        );
        let too_many = (0..=MAX_LINE_ITEMS)
            .map(|i| Item {
                sku: format!("SKU-{i}"),
                quantity: 1,
            })
            .collect();
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
                    items: too_many,
                    ..order()
                },
                "has 101 line items; at most 100 are allowed",
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
    fn the_context_reads_with_or_without_express() {
        let o: Order = serde_json::from_value(json!({
            "order_id": "o-2", "amount_cents": 1, "items": [{"sku": "A", "qty": 3}]
        }))
        .unwrap();
        assert!(!o.express);
        assert_eq!(o.customer_email, None);
        assert_eq!(o.items[0].quantity, 3);
        let o: Order = serde_json::from_value(json!({
            "order_id": "o-2", "amount_cents": 1, "express": true, "items": []
        }))
        .unwrap();
        assert!(o.express);
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

        let item = &order().items[1];
        let r = reserve(item, 1, "task-1:reserve_items:1");
        assert_eq!(r, reserve(item, 1, "task-1:reserve_items:1"));
        assert!(r.reservation_id.starts_with("res_"));
        assert_eq!((r.line, r.sku.as_str(), r.quantity), (1, "PEN-7", 1));
        // Each line has its own reservation.
        let rs = reservations(&order());
        assert_ne!(rs[0].reservation_id, rs[1].reservation_id);
    }

    #[test]
    fn shipping_is_express_when_asked_for_or_above_the_threshold() {
        let standard = plan(&order());
        assert_eq!(standard.service, Service::Standard);
        assert!(
            standard.reason.contains("below 10000"),
            "{}",
            standard.reason
        );
        assert_eq!(standard.reservation_ids.len(), 2);
        assert!(standard.charge_id.starts_with("ch_"));

        let asked = plan(&Order {
            express: true,
            ..order()
        });
        assert_eq!(asked.service, Service::Express);
        assert_eq!(asked.reason, "the customer asked for express");

        let large = plan(&Order {
            amount_cents: EXPRESS_FROM_CENTS,
            ..order()
        });
        assert_eq!(large.service, Service::Express);
        assert!(
            large.reason.contains("express ships free"),
            "{}",
            large.reason
        );
        let just_below = plan(&Order {
            amount_cents: EXPRESS_FROM_CENTS - 1,
            ..order()
        });
        assert_eq!(just_below.service, Service::Standard);
    }

    #[test]
    fn shipping_needs_a_charge_and_one_reservation_per_line() {
        let o = order();
        let c = charge(&o, "k1");
        let rs = reservations(&o);
        let no_charge = Charge {
            charge_id: String::new(),
            ..c.clone()
        };
        let missing_line = &rs[..1];
        let mut swapped = rs.clone();
        swapped.swap(0, 1);
        for (charge, reservations, expected) in [
            (&no_charge, &rs[..], "cannot ship without a charge"),
            (&c, missing_line, "has 2 line items but 1 reservations"),
            (&c, &swapped[..], "does not match line 0 (BOOK-42 x2)"),
        ] {
            let err = plan_shipping(&o, charge, reservations, EXPRESS_FROM_CENTS).unwrap_err();
            assert!(!err.is_retryable(), "{err}");
            assert!(err.message().contains(expected), "{err}");
        }
    }

    #[test]
    fn a_shipment_follows_the_plan() {
        let p = plan(&order());
        let s = ship(&p, Service::Standard, "k3").unwrap();
        assert!(
            s.tracking_number.starts_with("TRK-") && s.tracking_number.len() == 20,
            "{}",
            s.tracking_number
        );
        assert_eq!((s.service, s.estimated_days), (Service::Standard, 4));
        assert_eq!(s, ship(&p, Service::Standard, "k3").unwrap());
        let err = ship(&p, Service::Express, "k3").unwrap_err();
        assert!(
            !err.is_retryable() && err.message().contains("but standard was chosen"),
            "{err}"
        );
        let empty = ShippingPlan {
            reservation_ids: vec![],
            ..p
        };
        assert!(
            !ship(&empty, Service::Standard, "k3")
                .unwrap_err()
                .is_retryable()
        );
    }

    #[test]
    fn the_notification_names_order_service_and_tracking_number() {
        let shipment = Shipment {
            tracking_number: "TRK-1".into(),
            service: Service::Express,
            carrier: "Parcel Express".into(),
            estimated_days: 1,
        };
        let n = notify(&order(), &shipment);
        assert_eq!(n["notified"], true);
        assert_eq!(n["service"], "express");
        assert_eq!(
            n["message"],
            "Told ada@example.com: order o-1 has shipped express with Parcel Express (about 1 day), \
             tracking number TRK-1."
        );
    }

    #[tokio::test]
    async fn handlers_read_context_items_and_parents() {
        let context = serde_json::to_value(order()).unwrap();

        // validate_order outputs the items reserve_items maps over.
        let valid = validate_order(StepContext::for_test(
            steps::VALIDATE_ORDER,
            context.clone(),
        ))
        .await
        .unwrap();
        assert_eq!(valid["items"], context["items"]);
        let bad_context = StepContext::for_test(steps::VALIDATE_ORDER, json!({"order_id": "o-1"}));
        assert!(
            !validate_order(bad_context)
                .await
                .unwrap_err()
                .is_retryable()
        );

        // An instance of reserve_items gets its element, not the parent's output.
        let mut reserved = Vec::new();
        for (line, item) in (0..).zip(valid["items"].as_array().unwrap()) {
            let ctx = StepContext::for_test(steps::RESERVE_ITEMS, context.clone())
                .with_item(line, item.clone());
            let r = reserve_items(ctx.clone()).await.unwrap();
            assert_eq!(r["line"], line);
            assert_eq!(r["sku"], item["sku"]);
            // Retries reserve the same line again, not another one.
            assert_eq!(reserve_items(ctx.with_attempt(2)).await.unwrap(), r);
            reserved.push(r);
        }
        let not_an_instance = StepContext::for_test(steps::RESERVE_ITEMS, context.clone());
        let err = reserve_items(not_an_instance).await.unwrap_err();
        assert!(
            !err.is_retryable() && err.message().contains("not an instance"),
            "{err}"
        );
        let bad_item = StepContext::for_test(steps::RESERVE_ITEMS, context.clone())
            .with_item(0, json!({"sku": "X"}));
        assert!(!reserve_items(bad_item).await.unwrap_err().is_retryable());

        let charged = charge_payment(StepContext::for_test(
            steps::CHARGE_PAYMENT,
            context.clone(),
        ))
        .await
        .unwrap();
        assert_eq!(charged["amount_cents"], 4_999);

        // The decision: standard for this order, express when asked for.
        let decide = |context: Value| {
            let ctx = StepContext::for_test(steps::CHOOSE_SHIPPING, context)
                .with_parent(steps::CHARGE_PAYMENT, charged.clone())
                .with_parent(steps::RESERVE_ITEMS, json!(reserved));
            async move { ChooseShipping::default().call(ctx).await }
        };
        let decision = decide(context.clone()).await.unwrap();
        assert_eq!(decision.branches, [steps::SHIP_STANDARD]);
        assert_eq!(decision.output["service"], "standard");
        assert_eq!(decision.output["charge_id"], charged["charge_id"]);
        let mut express = context.clone();
        express["express"] = json!(true);
        let express_decision = decide(express).await.unwrap();
        assert_eq!(express_decision.branches, [steps::SHIP_EXPRESS]);
        let lower = ChooseShipping {
            express_from_cents: 4_000,
        };
        let ctx = StepContext::for_test(steps::CHOOSE_SHIPPING, context.clone())
            .with_parent(steps::CHARGE_PAYMENT, charged.clone())
            .with_parent(steps::RESERVE_ITEMS, json!(reserved));
        assert_eq!(
            lower.call(ctx).await.unwrap().branches,
            [steps::SHIP_EXPRESS]
        );

        // The chosen branch ships; retries ship the same parcel.
        let ctx = StepContext::for_test(steps::SHIP_STANDARD, context.clone())
            .with_parent(steps::CHOOSE_SHIPPING, decision.output.clone());
        let shipped = ship_standard(ctx.clone()).await.unwrap();
        let tracking = shipped["tracking_number"].as_str().unwrap().to_owned();
        assert_eq!(
            ship_standard(ctx.with_attempt(2)).await.unwrap()["tracking_number"],
            tracking
        );
        let wrong_branch = StepContext::for_test(steps::SHIP_EXPRESS, context.clone())
            .with_parent(steps::CHOOSE_SHIPPING, decision.output.clone());
        assert!(!ship_express(wrong_branch).await.unwrap_err().is_retryable());
        let missing_parent = StepContext::for_test(steps::SHIP_STANDARD, context.clone());
        let err = ship_standard(missing_parent).await.unwrap_err();
        assert!(
            !err.is_retryable() && err.message().contains("choose_shipping"),
            "{err}"
        );

        // notify_customer sees only the branch that ran (join: any).
        let ctx = StepContext::for_test(steps::NOTIFY_CUSTOMER, context.clone())
            .with_parent(steps::SHIP_STANDARD, shipped);
        let told = notify_customer(ctx).await.unwrap();
        assert!(told["message"].as_str().unwrap().contains(&tracking));
        assert_eq!(told["service"], "standard");
        let nothing_shipped = StepContext::for_test(steps::NOTIFY_CUSTOMER, context);
        let err = notify_customer(nothing_shipped).await.unwrap_err();
        assert!(
            !err.is_retryable() && err.message().contains("ship_express or ship_standard"),
            "{err}"
        );
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
            ("shop", "order_fulfilment", TEMPLATE_VERSION)
        );
        let step = |name: &str| {
            template
                .steps
                .iter()
                .find(|s| s.name == name)
                .unwrap_or_else(|| panic!("no step {name}"))
        };
        let names: Vec<&str> = template.steps.iter().map(|s| s.handler.as_str()).collect();
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
        assert!(template.steps.iter().all(|s| s.name == s.handler));
        assert!(template.steps.iter().all(|s| s.queue() == "default"));

        let map = step(steps::RESERVE_ITEMS).map.as_ref().unwrap();
        assert_eq!(map.over, "validate_order.items");
        assert_eq!(map.max_parallel, 10);
        assert_eq!(map.max_items as usize, MAX_LINE_ITEMS);
        assert_eq!(map.tolerate, 0);

        let choose = step(steps::CHOOSE_SHIPPING);
        assert_eq!(
            choose.depends_on,
            [steps::CHARGE_PAYMENT, steps::RESERVE_ITEMS]
        );
        assert_eq!(
            choose.decides,
            [Service::Express.step(), Service::Standard.step()]
        );
        let notify = step(steps::NOTIFY_CUSTOMER);
        assert_eq!(notify.join, Join::Any);
        assert_eq!(
            notify.depends_on,
            [steps::SHIP_EXPRESS, steps::SHIP_STANDARD]
        );

        assert_eq!(step(steps::CHARGE_PAYMENT).execution_timeout.0, 30_000);
        assert_eq!(step(steps::VALIDATE_ORDER).retry.max_attempts, 1);
    }

    #[test]
    fn the_worker_has_every_handler_of_the_template() {
        let template: Template = serde_saphyr::from_str(TEMPLATE_YAML).unwrap();
        worker("amqp://localhost", "tasker")
            .check_template(&template)
            .unwrap();
    }
}
