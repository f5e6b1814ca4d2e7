"""End-to-end: Python workers against a real orchestrator, PostgreSQL and RabbitMQ (the `tasker`
fixture of the package's pytest plugin starts `tasker serve` with its own database and prefix).
Every test registers its own template on its own queue, so tests do not see each other's steps.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from _helpers import ROOT, step_named, template

from tasker_worker import (
    AsyncClient,
    ClientError,
    Decision,
    Permanent,
    Retryable,
    StepContext,
    Worker,
    WorkerError,
    submit_amqp,
    wire,
)
from tasker_worker.testing import TaskerTestEnv, find_binary

NS = "pytest"


def setup(
    tasker: TaskerTestEnv, steps: list[dict[str, Any]], **worker: Any
) -> tuple[str, str, Worker]:
    """Registers a template whose steps (without a queue) run on a fresh queue; returns
    (template name, queue, a worker on that queue)."""
    name = tasker.unique("t")
    queue = tasker.unique("q")
    for s in steps:
        s.setdefault("queue", queue)
    tasker.register(template(name, steps))
    return name, queue, tasker.worker(NS, queues=[queue], **worker)


async def test_single_step_with_async_and_plain_handlers(tasker: TaskerTestEnv) -> None:
    name, _, w = setup(
        tasker,
        [
            {"name": "greet", "handler": "greet"},
            {"name": "shout", "handler": "shout", "depends_on": ["greet"]},
        ],
    )
    threads: list[str] = []

    @w.handler("greet")
    async def greet(ctx: StepContext) -> dict[str, Any]:
        return {"hello": ctx.context["name"], "attempt": ctx.attempt}

    @w.handler()
    def shout(ctx: StepContext) -> dict[str, Any]:  # a plain function: runs in a thread
        threads.append(threading.current_thread().name)
        return {"text": ctx.parent("greet")["hello"].upper()}

    async with tasker.running(w):
        task = await tasker.run(NS, name, {"name": "Ada"})
    assert task["state"] == "completed", task
    assert task["output"] == {"shout": {"text": "ADA"}}
    assert step_named(task, "greet")["output"] == {"hello": "Ada", "attempt": 1}
    assert threads and threads[0].startswith("tasker-handler")
    attempt = step_named(task, "greet")["attempts"][0]
    assert attempt["worker"] == w.name and attempt["outcome"] == "succeeded"


async def test_diamond_passes_parents_outputs(tasker: TaskerTestEnv) -> None:
    name, _, w = setup(
        tasker,
        [
            {"name": "a", "handler": "a"},
            {"name": "b", "handler": "b", "depends_on": ["a"]},
            {"name": "c", "handler": "c", "depends_on": ["a"]},
            {"name": "d", "handler": "d", "depends_on": ["b", "c"]},
        ],
    )

    @w.handler("a")
    async def a(ctx: StepContext) -> int:
        return int(ctx.context["n"])

    @w.handler("b")
    async def b(ctx: StepContext) -> int:
        return int(ctx.parent("a")) * 2

    @w.handler("c")
    def c(ctx: StepContext) -> int:
        return int(ctx.parent("a")) + 1

    @w.handler("d")
    async def d(ctx: StepContext) -> dict[str, Any]:
        return {"parents": ctx.parent_outputs, "key": ctx.idempotency_key}

    async with tasker.running(w):
        task = await tasker.run(NS, name, {"n": 5})
    assert task["state"] == "completed", task
    out = task["output"]["d"]
    assert out["parents"] == {"b": 10, "c": 6}
    assert out["key"] == f"{task['id']}:d"


async def test_retry_after_replaces_the_backoff(tasker: TaskerTestEnv) -> None:
    name, _, w = setup(
        tasker,
        [
            {
                "name": "flaky",
                "handler": "flaky",
                # A long template delay: only retry_after can make the retry quick.
                "retry": {"max_attempts": 3, "initial_delay": "30s", "max_delay": "1m"},
            }
        ],
    )
    seen: list[tuple[int, float]] = []

    @w.handler("flaky")
    async def flaky(ctx: StepContext) -> dict[str, Any]:
        seen.append((ctx.attempt, time.monotonic()))
        if ctx.attempt == 1:
            raise Retryable("rate limited", retry_after=0.4)
        return {"attempt": ctx.attempt}

    async with tasker.running(w):
        task = await tasker.run(NS, name, timeout=20)
    assert task["state"] == "completed", task
    assert task["output"] == {"flaky": {"attempt": 2}}
    assert [a for a, _ in seen] == [1, 2]
    assert 0.35 <= seen[1][1] - seen[0][1] < 10
    s = step_named(task, "flaky")
    assert s["failures"] == 1
    assert s["attempts"][0]["outcome"] == "failed" and s["attempts"][0]["error"] == "rate limited"


async def test_permanent_failure_fails_the_task_at_once(tasker: TaskerTestEnv) -> None:
    name, _, w = setup(tasker, [{"name": "charge", "handler": "charge"}])
    calls = 0

    @w.handler("charge")
    async def charge(ctx: StepContext) -> None:
        nonlocal calls
        calls += 1
        raise Permanent("card declined")

    async with tasker.running(w):
        task = await tasker.run(NS, name)
    assert task["state"] == "failed"
    assert task["error"] == 'step "charge" failed: card declined'
    assert calls == 1 and step_named(task, "charge")["attempt"] == 1


async def test_exceptions_are_retryable_failures(tasker: TaskerTestEnv) -> None:
    name, _, w = setup(
        tasker,
        [{"name": "boom", "handler": "boom", "retry": {"max_attempts": 2, "initial_delay": 50}}],
    )

    @w.handler("boom")
    def boom(ctx: StepContext) -> None:
        raise KeyError("missing thing")

    async with tasker.running(w):
        task = await tasker.run(NS, name)
    assert task["state"] == "failed"
    s = step_named(task, "boom")
    assert s["failures"] == 2
    assert s["error"] == "handler raised KeyError: 'missing thing' (gave up after 2 attempts)"


@pytest.mark.parametrize("kind", ["async", "plain"])
async def test_timeouts(tasker: TaskerTestEnv, kind: str) -> None:
    """An async handler is cancelled at its timeout; a plain one is reported at the deadline
    and keeps its slot (here the only one) until its thread returns."""
    name, queue, w = setup(
        tasker,
        [
            {
                "name": "slow",
                "handler": "slow",
                "execution_timeout": "300ms",
                "retry": {"max_attempts": 1},
            }
        ],
        concurrency=1,
    )
    quick = tasker.unique("quick")
    tasker.register(template(quick, [{"name": "quick", "handler": "quick", "queue": queue}]))
    ended_at: list[float] = []
    quick_at: list[float] = []
    reported_while_running: list[bool] = []

    if kind == "async":

        @w.handler("slow")
        async def slow_async(ctx: StepContext) -> None:
            try:
                await asyncio.sleep(30)
            finally:
                ended_at.append(time.monotonic())  # cancelled at the timeout

    else:

        @w.handler("slow")
        def slow_plain(ctx: StepContext) -> None:
            assert ctx.cancellation.wait_sync(5)  # sees the timeout's cancellation...
            # ...and runs on (keeping its slot) until its timeout was reported.
            deadline = time.monotonic() + 15
            while w.stats.results < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            reported_while_running.append(w.stats.results >= 1)
            time.sleep(0.2)
            ended_at.append(time.monotonic())

    @w.handler("quick")
    async def quick_handler(ctx: StepContext) -> None:
        quick_at.append(time.monotonic())

    async with tasker.running(w):
        started = time.monotonic()
        task = await tasker.run(NS, name)
        reported_at = time.monotonic()
        assert task["state"] == "failed", task
        error = step_named(task, "slow")["error"]
        assert error == "timed out after 300 ms (gave up after 1 attempts)"
        assert reported_at - started < 8, "the timeout is reported at the deadline"
        second = await tasker.run(NS, quick)
        assert second["state"] == "completed"
    assert ended_at and quick_at
    assert quick_at[0] >= ended_at[0], "the one slot was busy until the handler ended"
    if kind == "plain":
        assert reported_while_running == [True], "reported while the thread still ran"


async def test_malformed_step_messages_are_dead_lettered(tasker: TaskerTestEnv) -> None:
    name, queue, w = setup(tasker, [{"name": "ok", "handler": "ok"}])

    @w.handler("ok")
    async def ok(ctx: StepContext) -> str:
        return "fine"

    connection = await aio_pika.connect(tasker.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        steps = await channel.get_exchange(tasker.names.steps_exchange, ensure=False)
        marker = wire.uuid7()
        await steps.publish(
            aio_pika.Message(b"\x01\x02 not msgpack", message_id=marker, headers={"x-test": 1}),
            routing_key=wire.step_routing_key(NS, queue),
            mandatory=True,
        )
        async with tasker.running(w):
            task = await tasker.run(NS, name)  # the worker survives it
            assert task["state"] == "completed"
            dead = await channel.get_queue(tasker.names.dead_letters_queue, ensure=False)
            found = None
            deadline = time.monotonic() + 10
            while found is None and time.monotonic() < deadline:
                m = await dead.get(no_ack=False, fail=False)
                if m is None:
                    await asyncio.sleep(0.1)
                    continue
                if m.message_id == marker:
                    found = m
                await m.ack()
        assert found is not None, "the dead letter did not arrive"
        assert found.body == b"\x01\x02 not msgpack"
        assert found.routing_key == wire.step_routing_key(NS, queue)
        headers = found.headers or {}
        reason = headers[wire.HEADER_REASON]
        assert isinstance(reason, str) and "not a MessagePack envelope" in reason
        assert headers["x-test"] == 1
        assert w.stats.dead_lettered == 1


async def test_graceful_shutdown_finishes_the_running_step(tasker: TaskerTestEnv) -> None:
    name, _, w = setup(tasker, [{"name": "work", "handler": "work"}])
    started = asyncio.Event()

    @w.handler("work")
    async def work(ctx: StepContext) -> str:
        started.set()
        await asyncio.sleep(1.0)
        return "done"

    client = tasker.async_client()
    run = asyncio.ensure_future(w.run())
    await w.wait_ready()
    task_id = await client.submit(NS, name)
    await asyncio.wait_for(started.wait(), 10)
    w.stop()  # what SIGTERM does
    await asyncio.wait_for(run, 10)
    task = await client.wait(task_id, timeout=10)
    await client.aclose()
    assert task["state"] == "completed"
    s = step_named(task, "work")
    assert s["attempt"] == 1 and s["output"] == "done"


async def test_the_worker_registry_lists_a_live_worker_until_it_stops(
    tasker: TaskerTestEnv,
) -> None:
    _, queue, w = setup(tasker, [{"name": "s", "handler": "s"}], registry_interval=0.2)

    @w.handler("s")
    async def s(ctx: StepContext) -> None:
        return None

    client = tasker.async_client()
    run = asyncio.ensure_future(w.run())
    await w.wait_ready()
    mine: list[dict[str, Any]] = []
    for _ in range(100):
        mine = [x for x in await client.workers() if x["worker_id"] == w.worker_id]
        if mine:
            break
        await asyncio.sleep(0.05)
    assert len(mine) == 1, mine
    me = mine[0]
    assert me["sdk"] == "python" and me["name"] == w.name
    assert me["queues"] == [queue] and me["handlers"] == ["s"]
    assert me["interval_ms"] == 200 and me["concurrency"] == w.concurrency
    w.stop()  # a graceful stop leaves the registry at once
    await asyncio.wait_for(run, 10)
    gone = True
    for _ in range(50):
        gone = not [x for x in await client.workers() if x["worker_id"] == w.worker_id]
        if gone:
            break
        await asyncio.sleep(0.05)
    await client.aclose()
    assert gone, "a stopped worker is no longer listed"


async def test_grace_period_over_returns_the_step_to_its_queue(tasker: TaskerTestEnv) -> None:
    name, _, w = setup(tasker, [{"name": "stuck", "handler": "stuck"}], grace_period=0.3)
    started = asyncio.Event()

    @w.handler("stuck")
    async def stuck(ctx: StepContext) -> str:
        started.set()
        await ctx.wait_cancelled()  # until the grace period runs out
        raise Retryable("interrupted")

    client = tasker.async_client()
    run = asyncio.ensure_future(w.run())
    await w.wait_ready()
    task_id = await client.submit(NS, name)
    await asyncio.wait_for(started.wait(), 10)
    w.stop()
    await asyncio.wait_for(run, 10)
    # Not reported: a second worker runs the same attempt again.
    w2 = tasker.worker(NS, queues=w.queues)

    @w2.handler("stuck")
    async def fine(ctx: StepContext) -> int:
        return ctx.attempt

    async with tasker.running(w2):
        task = await client.wait(task_id, timeout=20)
    await client.aclose()
    assert task["state"] == "completed"
    assert task["output"] == {"stuck": 1}
    assert step_named(task, "stuck")["failures"] == 0


async def test_sigterm_stops_a_worker_process_gracefully(tasker: TaskerTestEnv) -> None:
    name, queue, _ = setup(tasker, [{"name": "nap", "handler": "nap"}])
    script = (
        "import asyncio, sys\n"
        "from tasker_worker import Worker\n"
        "w = Worker(sys.argv[1], [sys.argv[2]], namespaces=sys.argv[4], prefix=sys.argv[3],\n"
        "           name='sigterm-worker')\n"
        "@w.handler('nap')\n"
        "async def nap(ctx):\n"
        "    print('started', flush=True)\n"
        "    await asyncio.sleep(1.0)\n"
        "    return 'rested'\n"
        "w.run_forever()\n"
        "print('stopped', flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, tasker.amqp_url, queue, tasker.prefix, NS],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        client = tasker.async_client()
        task_id = await client.submit(NS, name)
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20)
        assert line.strip() == "started"
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 15) == 0
        assert proc.stdout.read().strip() == "stopped"
        task = await client.wait(task_id, timeout=10)
        await client.aclose()
        assert task["state"] == "completed" and task["output"] == {"nap": "rested"}
        assert step_named(task, "nap")["attempts"][0]["worker"] == "sigterm-worker"
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_cancel_reaches_running_handlers(tasker: TaskerTestEnv) -> None:
    name, _, w = setup(
        tasker,
        [
            {"name": "wait", "handler": "wait", "execution_timeout": "20s"},
            {"name": "after", "handler": "after", "depends_on": ["wait"]},
        ],
    )
    started = asyncio.Event()
    saw: list[str | None] = []

    @w.handler("wait")
    async def wait(ctx: StepContext) -> str:
        started.set()
        await asyncio.wait_for(ctx.wait_cancelled(), 15)
        saw.append(ctx.cancellation.reason)
        raise Permanent("stopped: the task was cancelled")

    @w.handler("after")
    async def after(ctx: StepContext) -> None:
        raise AssertionError("must not run")

    async with tasker.running(w), tasker.async_client() as client:
        task_id = await client.submit(NS, name)
        await asyncio.wait_for(started.wait(), 10)
        view = await client.cancel(task_id, reason="customer asked")
        assert view["state"] == "cancelled"
        task = await client.wait(task_id, timeout=10)
        deadline = time.monotonic() + 5
        while not saw and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    assert task["state"] == "cancelled"
    assert task["error"] == "cancelled: customer asked"
    assert saw == ["the task was cancelled"]
    assert step_named(task, "after")["state"] == "cancelled"


async def test_long_steps_run_under_a_heartbeat_lease(tasker: TaskerTestEnv) -> None:
    name, _, w = setup(
        tasker,
        [{"name": "long", "handler": "long", "execution_timeout": "20s"}],
        long_step_after=5.0,  # 20 s is "long" here
        heartbeat_interval=0.5,
    )

    @w.handler("long")
    async def long(ctx: StepContext) -> str:
        await asyncio.sleep(2.0)  # past several lease renewals (lease 1.5 s)
        return "done"

    async with tasker.running(w):
        task = await tasker.run(NS, name)
    assert task["state"] == "completed", task
    attempt = step_named(task, "long")["attempts"][0]
    assert attempt["started_at"] is not None, attempt
    assert w.stats.leases == 1 and w.stats.heartbeats >= 2


async def test_decision_and_map(tasker: TaskerTestEnv) -> None:
    name, _, w = setup(
        tasker,
        [
            {"name": "list", "handler": "list"},
            {
                "name": "resize",
                "handler": "resize",
                "depends_on": ["list"],
                "map": {"over": "list.images", "max_parallel": 3},
            },
            {
                "name": "route",
                "handler": "route",
                "depends_on": ["resize"],
                "decides": ["fast", "slow"],
            },
            {"name": "fast", "handler": "ship", "depends_on": ["route"]},
            {"name": "slow", "handler": "ship", "depends_on": ["route"]},
        ],
    )

    @w.handler("list")
    async def list_images(ctx: StepContext) -> dict[str, Any]:
        return {"images": ["a.jpg", None, {"key": "c.jpg"}, "d.jpg"]}

    @w.handler("resize")
    def resize(ctx: StepContext) -> dict[str, Any]:
        return {"index": ctx.index, "item": ctx.item, "key": ctx.idempotency_key[-9:]}

    @w.handler("route")
    async def route(ctx: StepContext) -> Decision:
        n = len(ctx.parent("resize"))
        return Decision.choose(["fast"], output={"n": n})

    @w.handler("ship")
    async def ship(ctx: StepContext) -> str:
        return ctx.step

    async with tasker.running(w):
        task = await tasker.run(NS, name)
    assert task["state"] == "completed", task
    resized = step_named(task, "resize")["output"]
    assert [r["index"] for r in resized] == [0, 1, 2, 3]
    assert [r["item"] for r in resized] == ["a.jpg", None, {"key": "c.jpg"}, "d.jpg"]
    assert resized[2]["key"].endswith(":resize:2")
    assert step_named(task, "route")["output"] == {"n": 4}
    assert step_named(task, "slow")["state"] == "skipped"
    assert step_named(task, "slow")["skip_reason"] == "not chosen by route"
    assert task["output"]["fast"] == "fast"


async def test_results_are_batched_while_a_confirm_is_outstanding(tasker: TaskerTestEnv) -> None:
    name, _, w = setup(
        tasker,
        [
            {"name": "items", "handler": "items"},
            {
                "name": "each",
                "handler": "each",
                "depends_on": ["items"],
                "map": {"over": "items.n", "max_parallel": 64},
            },
        ],
        concurrency=64,
    )

    @w.handler("items")
    async def items(ctx: StepContext) -> dict[str, Any]:
        return {"n": list(range(120))}

    @w.handler("each")
    async def each(ctx: StepContext) -> int:
        return int(ctx.item) * 2

    async with tasker.running(w):
        task = await tasker.run(NS, name)
    assert task["state"] == "completed", task
    assert step_named(task, "each")["output"] == [i * 2 for i in range(120)]
    assert w.stats.results == 121
    assert w.stats.result_batches >= 1 and w.stats.result_messages < w.stats.results


async def test_handler_missing_spends_no_attempt(tasker: TaskerTestEnv) -> None:
    name, queue, w = setup(tasker, [{"name": "x", "handler": "absent"}])
    async with tasker.running(w), tasker.async_client() as client:
        task_id = await client.submit(NS, name)
        deadline = time.monotonic() + 10
        while True:
            task = await client.get(task_id)
            s = step_named(task, "x")
            if s["attempts"] and s["attempts"][0]["outcome"] == "handler_missing":
                break
            assert time.monotonic() < deadline, task
            await asyncio.sleep(0.1)
        assert s["failures"] == 0
        w2 = tasker.worker(NS, queues=[queue])
        w2.add_handler("absent", lambda ctx: "found")
        w.stop()
        async with tasker.running(w2):
            task = await client.wait(task_id, timeout=15)
    assert task["state"] == "completed" and task["output"] == {"x": "found"}


async def test_clients_submit_idempotently_list_cancel_and_retry(tasker: TaskerTestEnv) -> None:
    name, _, w = setup(tasker, [{"name": "once", "handler": "once"}])
    fail = True

    @w.handler("once")
    async def once(ctx: StepContext) -> str:
        if fail:
            raise Permanent("not yet")
        return "ok"

    client = tasker.client  # the synchronous client
    first = client.submit_task(NS, name, {"k": 1}, idempotency_key="same-key")
    again = client.submit_task(NS, name, {"k": 1}, idempotency_key="same-key")
    assert first["created"] and not again["created"]
    assert first["task_id"] == again["task_id"]
    with pytest.raises(ClientError) as conflict:
        client.submit(NS, name, {"k": 2}, idempotency_key="same-key")
    assert conflict.value.status == 409 and conflict.value.code == "idempotency_conflict"
    assert conflict.value.task_id == first["task_id"]
    with pytest.raises(ClientError) as missing:
        client.get(wire.uuid7())
    assert missing.value.code == "task_not_found"

    async with tasker.running(w):
        task = await tasker.wait(first["task_id"])
        assert task["state"] == "failed"
        fail = False
        retried = client.retry(first["task_id"])
        assert retried["state"] in ("running", "completed")
        task = await asyncio.to_thread(client.wait, first["task_id"], timeout=15)
        assert task["state"] == "completed" and task["output"] == {"once": "ok"}
    listed = client.list(namespace=NS, template=name, limit=10)
    assert [t["id"] for t in listed["tasks"]] == [first["task_id"]]
    with pytest.raises(ClientError) as done:
        client.cancel(first["task_id"])
    assert done.value.code == "invalid_state"

    # A task with no worker on its queue: cancel it with the async client.
    async with AsyncClient(tasker.http_url) as aclient:
        task_id = await aclient.submit(NS, name, {"k": 3})
        view = await aclient.cancel(task_id)
        assert view["state"] == "cancelled" and view["error"] == "cancelled: by request"
        assert (await aclient.list(namespace=NS, state="cancelled"))["tasks"][0]["id"] == task_id


async def test_submit_over_amqp(tasker: TaskerTestEnv) -> None:
    name, _, w = setup(tasker, [{"name": "echo", "handler": "echo"}])

    @w.handler("echo")
    async def echo(ctx: StepContext) -> Any:
        return ctx.context

    task_id = wire.uuid7()
    async with tasker.running(w):
        got = await submit_amqp(
            tasker.amqp_url, NS, name, {"via": "amqp"}, prefix=tasker.prefix, task_id=task_id
        )
        assert got == task_id
        task = await tasker.wait(task_id)
    assert task["state"] == "completed" and task["output"] == {"echo": {"via": "amqp"}}


async def test_delayed_start_signals_and_deadline_through_the_clients(
    tasker: TaskerTestEnv,
) -> None:
    name, _, w = setup(
        tasker,
        [
            {"name": "approve", "wait_for": {"signal": "approval", "timeout": "20s"}},
            {"name": "done", "handler": "done", "depends_on": ["approve"]},
        ],
    )

    @w.handler("done")
    async def done(ctx: StepContext) -> Any:
        return ctx.parent_outputs["approve"]

    client = tasker.client
    task_id = client.submit(NS, name, {}, delay="1s", deadline="30s")
    task = client.get(task_id)
    assert task["state"] == "pending" and task["start_at"] and task["deadline_at"]
    # Kept until the step is reached; a repeat answers the first.
    sent = client.signal(task_id, "approval", "s-1", {"ok": True})
    assert sent["created"] and sent["consumed_by"] is None
    assert not client.signal(task_id, "approval", "s-1", {"ok": False})["created"]
    with pytest.raises(ClientError) as refused:
        client.signal(task_id, "nope", "s-2", 1)
    assert refused.value.status == 409 and refused.value.code == "signal_refused"
    async with tasker.running(w):
        task = await tasker.wait(task_id)
    assert task["state"] == "completed" and task["output"] == {"done": {"ok": True}}
    # Over AMQP: a delayed task_request.
    amqp_id = wire.uuid7()
    await submit_amqp(
        tasker.amqp_url, NS, name, prefix=tasker.prefix, task_id=amqp_id, delay_ms=60_000
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            view = client.get(amqp_id)
            break
        except ClientError:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    assert view["state"] == "pending"
    async with AsyncClient(tasker.http_url) as aclient:
        await aclient.signal(amqp_id, "approval", "a-1", "yes")
        assert (await aclient.cancel(amqp_id))["state"] == "cancelled"


async def test_tls_worker_and_amqp_submit_with_a_private_ca(tasker: TaskerTestEnv) -> None:
    """Over the broker's TLS listener (deploy/local/services.sh up writes its URL and CA to
    .tasker/env): the worker and the AMQP submit trust the test CA."""
    amqps = os.environ.get("TASKER_TEST_AMQPS_URL")
    ca = os.environ.get("TASKER_TEST_TLS_CA")
    assert amqps and ca, "TASKER_TEST_AMQPS_URL and TASKER_TEST_TLS_CA come from .tasker/env"
    name, queue, _ = setup(tasker, [{"name": "hi", "handler": "hi"}])
    w = Worker(amqps, [queue], namespaces=NS, prefix=tasker.prefix, ca_cert=ca, grace_period=5)

    @w.handler("hi")
    async def hi(ctx: StepContext) -> str:
        return "over tls"

    async with tasker.running(w):
        task_id = await submit_amqp(amqps, NS, name, prefix=tasker.prefix, ca_cert=ca)
        task = await tasker.wait(task_id)
    assert task["state"] == "completed" and task["output"] == {"hi": "over tls"}
    # Without the CA the broker's certificate is refused.
    untrusted = Worker(
        amqps, [queue], namespaces=NS, prefix=tasker.prefix, reconnect_delay=(0.05, 0.05)
    )
    run = asyncio.ensure_future(untrusted.run())
    await asyncio.sleep(1.0)
    assert untrusted.stats.sessions == 0
    untrusted.stop()
    await asyncio.wait_for(run, 10)


async def test_a_missing_queue_fails_the_first_connection(tasker: TaskerTestEnv) -> None:
    w = tasker.worker(NS, queues=[tasker.unique("nowhere")])
    with pytest.raises(WorkerError, match="does not exist"):
        await asyncio.wait_for(w.run(), 20)


async def test_a_workflow_mixing_rust_and_python_steps(
    tasker: TaskerTestEnv, tmp_path: Path
) -> None:
    """Python steps around a step of the Rust chaos-worker (queue `default`, handler `chaos`)."""
    name, queue, w = setup(
        tasker,
        [
            {"name": "py_first", "handler": "py_first"},
            {
                "name": "rust_middle",
                "handler": "chaos",
                "queue": "default",
                "depends_on": ["py_first"],
            },
            {"name": "py_last", "handler": "py_last", "depends_on": ["rust_middle"]},
        ],
    )

    @w.handler("py_first")
    async def first(ctx: StepContext) -> dict[str, Any]:
        return {"from": "python"}

    @w.handler("py_last")
    async def last(ctx: StepContext) -> dict[str, Any]:
        return {"rust_said": ctx.parent("rust_middle")}

    record_dir = tmp_path / "chaos-records"
    env = dict(
        os.environ,
        TASKER_AMQP_URL=tasker.amqp_url,
        TASKER_PREFIX=tasker.prefix,
        TASKER_NAMESPACE=NS,
    )
    rust = subprocess.Popen(
        [find_binary("chaos-worker"), "--record-dir", str(record_dir), "--sleep-ms-max", "5"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with tasker.running(w):
            task = await tasker.run(NS, name, timeout=30)
    finally:
        rust.send_signal(signal.SIGTERM)
        try:
            rust.wait(10)
        except subprocess.TimeoutExpired:
            rust.kill()
    assert task["state"] == "completed", task
    assert task["output"] == {"py_last": {"rust_said": {"ok": True}}}
    workers = {s["name"]: s["attempts"][0]["worker"] for s in task["steps"]}
    assert workers["py_first"] == w.name == workers["py_last"]
    assert workers["rust_middle"].startswith("chaos-worker-")
    del queue


def test_example_order_worker_in_python() -> None:
    """The Python example worker's handlers, as unit tests (the demo runs them end to end)."""
    sys.path.insert(0, str(ROOT / "examples" / "order-fulfilment" / "python"))
    try:
        import worker as example  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    order = {"order_id": "o-1", "amount_cents": 3000, "items": [{"sku": "A-1", "qty": 2}]}
    validated = example.validate_order(StepContext.for_test("validate_order", order))
    assert validated == {
        "order_id": "o-1",
        "item_count": 2,
        "amount_cents": 3000,
        "items": [{"sku": "A-1", "quantity": 2}],
    }
    # The same ids as the Rust worker (FNV-1a of the idempotency key).
    assert example.short_id("") == "cbf29ce484222325"
    with pytest.raises(Permanent, match="has no items"):
        example.validate_order(StepContext.for_test("v", {**order, "items": []}))
