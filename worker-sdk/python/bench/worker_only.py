"""Worker throughput alone (no orchestrator): N step messages are published to a private step
queue, a worker drains it, and the time until N results are in the results queue is measured.

    . .tasker/env && .tasker/venv/bin/python worker-sdk/python/bench/worker_only.py [--n 5000]
      [--worker python|rust] [--concurrency 256]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time

import aio_pika

from tasker_worker import wire
from tasker_worker.testing import find_binary

PY_WORKER = """
import sys
from tasker_worker import Worker
w = Worker(sys.argv[1], ["default"], namespaces="bench", prefix=sys.argv[2],
           concurrency=int(sys.argv[3]))
@w.handler("chaos")
async def chaos(ctx):
    return {"ok": True}
w.run_forever()
"""


def step(i: int) -> bytes:
    task_id = wire.uuid7()
    return wire.encode(
        "step",
        {
            "task_id": task_id,
            "step_id": wire.uuid7(),
            "namespace": "bench",
            "template": "bench",
            "step": "s",
            "handler": "chaos",
            "queue": "default",
            "attempt": 1,
            "idempotency_key": f"{task_id}:s",
            "context": {"i": i},
            "parent_outputs": {"a": {"ok": True}},
            "timeout_ms": 30000,
            "result_routing_key": "bench.0",
        },
    )


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--worker", choices=["python", "rust"], default="python")
    ap.add_argument("--concurrency", type=int, default=256)
    args = ap.parse_args()
    url = os.environ["TASKER_TEST_AMQP_URL"]
    prefix = "wb" + wire.uuid7()[-8:]
    n = wire.Names(prefix)
    conn = await aio_pika.connect(url)
    try:
        ch = await conn.channel()
        quorum = {"x-queue-type": "quorum"}
        steps_x = await ch.declare_exchange(n.steps_exchange, "direct", durable=True)
        results_x = await ch.declare_exchange(n.results_exchange, "topic", durable=True)
        await ch.declare_exchange(n.dead_letter_exchange, "fanout", durable=True)
        await ch.declare_exchange(n.cancel_exchange, "fanout", durable=True)
        sq = await ch.declare_queue(
            n.step_queue("bench", "default"), durable=True, arguments=quorum
        )
        await sq.bind(steps_x, "bench.default")
        rq = await ch.declare_queue(n.results_queue(0), durable=True, arguments=quorum)
        await rq.bind(results_x, "*.0")
        for i in range(args.n):
            await steps_x.publish(aio_pika.Message(step(i), delivery_mode=2), "bench.default")
        env = dict(os.environ, TASKER_AMQP_URL=url, TASKER_PREFIX=prefix, TASKER_NAMESPACE="bench")
        if args.worker == "python":
            script = ["-c", PY_WORKER]
            if os.environ.get("BENCH_PY_WORKER"):  # e.g. a profiling variant of PY_WORKER
                script = [os.environ["BENCH_PY_WORKER"]]
            cmd = [sys.executable, *script, url, prefix, str(args.concurrency)]
        else:
            cmd = [
                find_binary("chaos-worker"),
                "--record-dir",
                tempfile.mkdtemp(),
                "--sleep-ms-max",
                "0",
                "--concurrency",
                str(args.concurrency),
            ]
        got = 0
        done = asyncio.Event()

        async def count(m: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal got
            env_ = wire.decode(m.body, ("result", "result_batch"))
            got += len(env_.payload["results"]) if env_.kind == "result_batch" else 1
            if got >= args.n:
                done.set()

        await rq.consume(count, no_ack=True)
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
        try:
            await asyncio.wait_for(done.wait(), 300)
        finally:
            if proc.poll() is None:
                dt = time.monotonic() - t0
                with open(f"/proc/{proc.pid}/stat") as f:
                    fields = f.read().split(")")[1].split()
                cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
                proc.send_signal(signal.SIGTERM)
                proc.wait(15)
        print(
            f"{args.worker}: {args.n} steps in {dt:.2f}s = {args.n / dt:.0f} steps/s "
            f"(incl. startup), worker cpu {cpu:.2f}s = {cpu / args.n * 1e6:.0f} us/step"
        )
    finally:  # the private queues and exchanges go, whatever happened
        cleanup = await conn.channel()
        for q in (n.step_queue("bench", "default"), n.results_queue(0)):
            await cleanup.queue_delete(q)
        for x in (n.steps_exchange, n.results_exchange, n.dead_letter_exchange, n.cancel_exchange):
            await cleanup.exchange_delete(x)
        await conn.close()


asyncio.run(main())
