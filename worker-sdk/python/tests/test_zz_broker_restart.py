"""Reconnection after a broker restart. Runs last (file order): `services.sh restart-broker`
stops and starts the shared RabbitMQ, which every user of the broker notices."""

from __future__ import annotations

import asyncio
import subprocess
import time
import urllib.parse

from _helpers import ROOT, step_named, template

from tasker_worker import StepContext
from tasker_worker.testing import TaskerTestEnv

NS = "pytest"


async def amqp_answers(host: str, port: int) -> bool:
    """The broker answers an AMQP protocol header with connection.start (as services.sh's
    probe checks)."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 0.5)
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        writer.write(b"AMQP\x00\x00\x09\x01")
        head = await asyncio.wait_for(reader.readexactly(3), 0.5)
        return head == b"\x01\x00\x00"
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()


async def test_the_worker_reconnects_after_a_broker_restart(tasker: TaskerTestEnv) -> None:
    name, queue = tasker.unique("t"), tasker.unique("q")
    tasker.register(template(name, [{"name": "echo", "handler": "echo", "queue": queue}]))
    w = tasker.worker(NS, queues=[queue])
    url = urllib.parse.urlsplit(tasker.amqp_url)
    host, port = url.hostname or "127.0.0.1", url.port or 5672

    @w.handler("echo")
    async def echo(ctx: StepContext) -> object:
        return ctx.context

    async with tasker.running(w):
        before = await tasker.run(NS, name, {"n": 1})
        assert before["state"] == "completed"
        sessions = w.stats.sessions
        restart = await asyncio.create_subprocess_exec(
            "bash",
            str(ROOT / "deploy" / "local" / "services.sh"),
            "restart-broker",
            "2",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # When does the broker answer again (after it stopped answering)?
        went_down = False
        back_at = None
        while back_at is None and restart.returncode is None:
            up = await amqp_answers(host, port)
            if not up:
                went_down = True
            elif went_down:
                back_at = time.monotonic()
            else:
                await asyncio.sleep(0.02)
        assert await restart.wait() == 0
        assert went_down and back_at is not None, "the broker did not go down and come back"
        deadline = back_at + 30
        while w.stats.sessions == sessions:
            assert time.monotonic() < deadline, "the worker did not reconnect"
            await asyncio.sleep(0.01)
        reconnected_after = time.monotonic() - back_at
        print(f"reconnected {reconnected_after:.3f}s after the broker answered again")
        assert reconnected_after < 1.0, f"reconnected {reconnected_after:.2f}s after the broker"
        after = await tasker.run(NS, name, {"n": 2}, timeout=60)
    assert after["state"] == "completed", after
    assert step_named(after, "echo")["output"] == {"n": 2}
