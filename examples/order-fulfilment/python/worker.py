"""order-worker in Python: the handlers of the `shop/order_fulfilment` workflow
(templates/order_fulfilment.yaml), the same as the Rust worker (src/lib.rs), output for output.

    pip install -e worker-sdk/python
    . .tasker/env   # TASKER_AMQP_URL
    python examples/order-fulfilment/python/worker.py

Settings (environment): TASKER_AMQP_URL, TASKER_PREFIX (default tasker), TASKER_CONCURRENCY
(default 16), TASKER_GRACE_PERIOD_SECS (default 30), TASKER_WORKER_NAME, TASKER_AMQP_CA_CERT (a
private CA for amqps://), ORDER_EXPRESS_FROM_CENTS (default 10000). Runs until SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from tasker_worker import Decision, Permanent, StepContext, Worker

MAX_LINE_ITEMS = 100
EXPRESS_FROM_CENTS = int(os.environ.get("ORDER_EXPRESS_FROM_CENTS", "10000"))
SERVICES = {
    "express": {"step": "ship_express", "carrier": "Parcel Express", "days": 1},
    "standard": {"step": "ship_standard", "carrier": "Parcel Post", "days": 4},
}


def short_id(key: str) -> str:
    """A short, stable id derived from a key (FNV-1a, 64 bits, hex), as in the Rust worker."""
    h = 0xCBF29CE484222325
    for byte in key.encode():
        h ^= byte
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def order_of(ctx: StepContext) -> dict[str, Any]:
    order = ctx.context
    try:
        items = [
            {"sku": str(i["sku"]), "quantity": int(i.get("quantity", i.get("qty")))}
            for i in order["items"]
        ]
        return {
            "order_id": str(order["order_id"]),
            "customer_email": order.get("customer_email"),
            "amount_cents": int(order["amount_cents"]),
            "express": bool(order.get("express", False)),
            "items": items,
        }
    except (KeyError, TypeError, ValueError) as e:
        raise Permanent(f"invalid task context for step {ctx.step!r}: {e!r}") from None


# ---- handlers ----------------------------------------------------------------------------------


def validate_order(ctx: StepContext) -> dict[str, Any]:
    """Checks the order; every problem is permanent (the same order fails the same way)."""
    order = order_of(ctx)
    oid, items = order["order_id"], order["items"]
    if not oid.strip():
        raise Permanent("order_id must not be empty")
    if not items:
        raise Permanent(f"order {oid} has no items")
    if len(items) > MAX_LINE_ITEMS:
        raise Permanent(
            f"order {oid} has {len(items)} line items; at most {MAX_LINE_ITEMS} are allowed"
        )
    for item in items:
        if item["quantity"] == 0:
            raise Permanent(f"order {oid}: item {item['sku']} has quantity 0")
    if order["amount_cents"] <= 0:
        raise Permanent(
            f"order {oid}: amount_cents must be greater than 0, got {order['amount_cents']}"
        )
    return {
        "order_id": oid,
        "item_count": sum(i["quantity"] for i in items),
        "amount_cents": order["amount_cents"],
        "items": items,
    }


def charge_payment(ctx: StepContext) -> dict[str, Any]:
    """The charge id comes from the idempotency key: every attempt names the same charge."""
    order = order_of(ctx)
    return {
        "charge_id": f"ch_{short_id(ctx.idempotency_key)}",
        "amount_cents": order["amount_cents"],
    }


def reserve_items(ctx: StepContext) -> dict[str, Any]:
    """One instance per line item (a mapped step): reserves the line it was given."""
    if ctx.index is None:
        raise Permanent("reserve_items runs per line item (map), but has no map_index")
    item = ctx.item
    if not isinstance(item, dict) or "sku" not in item:
        raise Permanent(f"invalid item {ctx.index} for step {ctx.step!r}: {item!r}")
    return {
        "line": ctx.index,
        "sku": item["sku"],
        "quantity": int(item.get("quantity", item.get("qty", 0))),
        "reservation_id": f"res_{short_id(ctx.idempotency_key)}",
    }


def choose_shipping(ctx: StepContext) -> Decision:
    """The decision step: express when asked for or when the total reaches the threshold."""
    order = order_of(ctx)
    oid = order["order_id"]
    charge = ctx.parent("charge_payment")
    reservations = ctx.parent("reserve_items")
    if not charge.get("charge_id"):
        raise Permanent(f"order {oid}: cannot ship without a charge")
    if len(reservations) != len(order["items"]):
        raise Permanent(
            f"order {oid} has {len(order['items'])} line items but {len(reservations)} reservations"
        )
    for line, (item, r) in enumerate(zip(order["items"], reservations, strict=True)):
        if r["line"] != line or r["sku"] != item["sku"] or r["quantity"] != item["quantity"]:
            raise Permanent(
                f"order {oid}: reservation {r['reservation_id']} ({r['sku']} x{r['quantity']}, "
                f"line {r['line']}) does not match line {line} ({item['sku']} x{item['quantity']})"
            )
    amount = order["amount_cents"]
    if order["express"]:
        service, reason = "express", "the customer asked for express"
    elif amount >= EXPRESS_FROM_CENTS:
        service = "express"
        reason = f"the total, {amount} cents, reaches {EXPRESS_FROM_CENTS}: express ships free"
    else:
        service = "standard"
        reason = (
            f"the total, {amount} cents, is below {EXPRESS_FROM_CENTS} "
            "and express was not asked for"
        )
    plan = {
        "service": service,
        "reason": reason,
        "charge_id": charge["charge_id"],
        "reservation_ids": [r["reservation_id"] for r in reservations],
    }
    return Decision.choose([SERVICES[service]["step"]], output=plan)


def _ship(ctx: StepContext, service: str) -> dict[str, Any]:
    plan = ctx.parent("choose_shipping")
    if plan["service"] != service:
        raise Permanent(
            f"step {SERVICES[service]['step']} ships {service} orders, "
            f"but {plan['service']} was chosen"
        )
    if not plan.get("charge_id") or not plan.get("reservation_ids"):
        raise Permanent("cannot ship without a charge and reservations")
    return {
        "tracking_number": f"TRK-{short_id(ctx.idempotency_key).upper()}",
        "service": service,
        "carrier": SERVICES[service]["carrier"],
        "estimated_days": SERVICES[service]["days"],
    }


def ship_express(ctx: StepContext) -> dict[str, Any]:
    return _ship(ctx, "express")


def ship_standard(ctx: StepContext) -> dict[str, Any]:
    return _ship(ctx, "standard")


def notify_customer(ctx: StepContext) -> dict[str, Any]:
    """Runs after whichever shipping branch ran (`join: any`)."""
    order = order_of(ctx)
    branch = next((s for s in ("ship_express", "ship_standard") if s in ctx.parent_outputs), None)
    if branch is None:
        raise Permanent(f"step {ctx.step!r} has no output from ship_express or ship_standard")
    shipment = ctx.parent(branch)
    to = order["customer_email"] or "the customer"
    days = "1 day" if shipment["estimated_days"] == 1 else f"{shipment['estimated_days']} days"
    return {
        "notified": True,
        "service": shipment["service"],
        "tracking_number": shipment["tracking_number"],
        "message": (
            f"Told {to}: order {order['order_id']} has shipped {shipment['service']} with "
            f"{shipment['carrier']} (about {days}), tracking number "
            f"{shipment['tracking_number']}."
        ),
    }


HANDLERS = {
    "validate_order": validate_order,
    "charge_payment": charge_payment,
    "reserve_items": reserve_items,
    "choose_shipping": choose_shipping,
    "ship_express": ship_express,
    "ship_standard": ship_standard,
    "notify_customer": notify_customer,
}


def build_worker(amqp_url: str, prefix: str = "tasker", **kwargs: Any) -> Worker:
    """A worker on queue `default` of namespace `shop` with every handler of the workflow
    registered. The handlers are plain functions (quick, CPU only): they run in the worker's
    thread pool."""
    worker = Worker(amqp_url, ["default"], namespaces="shop", prefix=prefix, **kwargs)
    for name, fn in HANDLERS.items():
        worker.add_handler(name, fn)
    return worker


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    worker = build_worker(
        os.environ.get("TASKER_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
        os.environ.get("TASKER_PREFIX", "tasker"),
        concurrency=int(os.environ.get("TASKER_CONCURRENCY", "16")),
        grace_period=float(os.environ.get("TASKER_GRACE_PERIOD_SECS", "30")),
        name=os.environ.get("TASKER_WORKER_NAME") or None,
        ca_cert=os.environ.get("TASKER_AMQP_CA_CERT") or None,
    )
    worker.run_forever()


if __name__ == "__main__":
    main()
