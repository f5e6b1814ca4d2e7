"""Handlers, errors and outcomes, without a broker."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from tasker_worker import Decision, Permanent, Retryable, StepContext, Worker, WorkerError, wire
from tasker_worker.worker import (
    MAX_BATCH,
    REMEMBERED_CANCELS,
    _Cancels,
    _HandlerEntry,
    _is_async,
    _Outgoing,
    _ResultPublisher,
)


def _worker(**kw: Any) -> Worker:
    w = Worker("amqp://guest:guest@127.0.0.1:5672/%2f", ["q"], namespaces="shop", **kw)
    w._pool = __import__("concurrent.futures").futures.ThreadPoolExecutor(4)
    return w


async def _run(w: Worker, fn: Any, ctx: StepContext) -> tuple[dict[str, Any], Any]:
    return await w._run_handler(_HandlerEntry(fn, _is_async(fn)), ctx)


def test_errors_and_decisions_map_to_outcomes() -> None:
    assert Retryable("busy", retry_after=1.5).outcome() == {
        "status": "failed",
        "message": "busy",
        "retryable": True,
        "retry_after_ms": 1500,
    }
    assert Permanent("bad card").outcome()["retryable"] is False
    d = Decision.choose(["express"], output={"carrier": "dhl"})
    assert d.branches == ["express"] and d.output == {"carrier": "dhl"}
    assert Decision.none().branches == []
    with pytest.raises(TypeError):
        Decision.choose("express")


def test_context_exposes_the_step_message() -> None:
    ctx = StepContext.for_test(
        "resize", {"album": "x"}, parent_outputs={"list": {"n": 1}}, map_index=2, map_item="c"
    )
    assert ctx.step == "resize" and ctx.context == {"album": "x"}
    assert ctx.parent("list") == {"n": 1}
    assert ctx.index == 2 and ctx.item == "c"
    assert ctx.idempotency_key.endswith(":resize:2")
    assert ctx.remaining > 29
    with pytest.raises(Permanent):
        ctx.parent("nope")


async def test_handler_outcomes_without_a_broker() -> None:
    w = _worker(max_output_bytes=100)
    ctx = StepContext.for_test

    async def ok(c: StepContext) -> Any:
        return {"a": 1}

    def plain(c: StepContext) -> Any:
        return Decision.choose(["b"], output=[1])

    async def boom(c: StepContext) -> Any:
        raise ValueError("boom 7")

    def big(c: StepContext) -> Any:
        return "x" * 200

    assert (await _run(w, ok, ctx()))[0] == {"status": "succeeded", "output": {"a": 1}}
    assert (await _run(w, plain, ctx()))[0] == {
        "status": "succeeded",
        "output": [1],
        "branches": ["b"],
    }
    failed = (await _run(w, boom, ctx()))[0]
    assert failed["message"] == "handler raised ValueError: boom 7" and failed["retryable"]
    too_big = (await _run(w, big, ctx()))[0]
    assert not too_big["retryable"] and "over the limit of 100 bytes" in too_big["message"]
    missing = await w._run_handler(None, ctx("nope"))
    assert missing[0] == {"status": "handler_missing", "handler": "nope"}


async def test_timeouts_cancel_async_handlers_and_report_plain_ones_at_the_deadline() -> None:
    w = _worker()
    seen = asyncio.Event()

    async def slow(c: StepContext) -> Any:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.set()
            raise

    started = time.monotonic()
    outcome, fut = await _run(w, slow, StepContext.for_test("s", timeout_ms=50))
    assert outcome["message"] == "timed out after 50 ms" and outcome["retryable"]
    await asyncio.wait_for(seen.wait(), 1)
    assert time.monotonic() - started < 1

    release = threading.Event()

    def blocking(c: StepContext) -> Any:
        release.wait(5)
        return c.cancelled

    outcome, fut = await _run(w, blocking, StepContext.for_test("s", timeout_ms=50))
    assert outcome["message"] == "timed out after 50 ms"
    assert fut is not None and not fut.done()  # the thread still runs: its slot stays busy
    release.set()
    assert await asyncio.wait_for(fut, 2) is True  # it saw its cancellation


def test_cancelled_tasks_refuse_only_steps_published_before_the_cancel() -> None:
    c = _Cancels()
    token = __import__("tasker_worker").Cancellation()
    c.track("t1", token)
    c.cancel("t1", 100)
    assert token.is_set and token.reason == "the task was cancelled"
    assert c.is_cancelled("t1", 99)
    # Published in the cancel's millisecond or later (a retry of the task): it runs.
    assert not c.is_cancelled("t1", 100) and not c.is_cancelled("t1", 101)
    assert c.is_cancelled("t1", None)  # without the times: refused, as before 1.1
    assert not c.is_cancelled("t2", 1)
    c.cancel("t2", None)
    assert c.is_cancelled("t2", 10**12)
    for i in range(REMEMBERED_CANCELS):
        c.cancel(f"x{i}", None)
    assert not c.is_cancelled("t1", 1) and len(c.cancelled) == REMEMBERED_CANCELS


async def test_results_group_by_routing_key_and_size() -> None:
    loop = asyncio.get_running_loop()

    def out(rk: str, size: int = 10) -> _Outgoing:
        return _Outgoing({}, rk, None, b"x" * size, "id", loop.create_future())

    groups = _ResultPublisher._group([out("a.0"), out("b.0"), out("a.0"), out("b.1")])
    assert [[o.routing_key for o in g] for g in groups] == [["a.0", "a.0"], ["b.0"], ["b.1"]]
    many = _ResultPublisher._group([out("a.0") for _ in range(MAX_BATCH + 1)])
    assert [len(g) for g in many] == [MAX_BATCH, 1]
    big = _ResultPublisher._group([out("a.0", 700_000), out("a.0", 700_000)])
    assert [len(g) for g in big] == [1, 1]  # over 1 MiB together: two messages


def test_a_single_queue_name_is_one_queue() -> None:
    w = Worker("amqp://localhost", "payments", namespaces="shop", concurrency=100_000)
    assert w.queues == ["payments"] and w.prefetch == 65535
    assert w.namespaces == ["shop"] and w.user_id == "guest"
    assert "secret" not in repr(Worker("amqp://u:secret@localhost", namespaces="shop"))


def test_namespaces_name_the_step_queues_and_the_url_names_the_user() -> None:
    w = Worker(
        "amqp://tasker-shop:pw@localhost/%2f",
        ["default", "gpu"],
        namespaces=["shop", "billing", "shop"],
        prefix="p",
    )
    assert w.namespaces == ["shop", "billing"]
    assert w._step_queues() == [
        "p.step.shop.default",
        "p.step.shop.gpu",
        "p.step.billing.default",
        "p.step.billing.gpu",
    ]
    assert w._queue_keys()[0] == "shop.default"
    assert w.user_id == "tasker-shop"
    assert wire.amqp_user("amqp://a%40b:x@h/") == "a@b"
    # A template of another namespace is not this worker's business.
    t = {"namespace": "media", "steps": [{"name": "s", "handler": "nope"}]}
    assert w.missing_handlers(t) == []
    assert w.missing_handlers({**t, "namespace": "shop"}) == ["nope"]
    with pytest.raises(WorkerError, match="namespace"):
        Worker("amqp://localhost", namespaces=[])
