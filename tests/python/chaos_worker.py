"""The Python twin of `chaos-worker` (tests/src/bin/chaos-worker.rs), for the fault-injection
harness (`chaos --python-workers N`): same arguments, same handlers, same execution records.

It consumes the `default` step queue of `TASKER_PREFIX` on `TASKER_AMQP_URL` with the
`tasker_worker` package. Every run of every handler sleeps a few random milliseconds, appends one
line `task_id step attempt worker_pid outcome` to `<record-dir>/exec-<pid>.log` (one `write` per
line on a file opened with `O_APPEND`, so a SIGKILL never leaves a half line), then returns.
Handlers: `chaos`, `chaos_items`, `chaos_route` (a decision), `chaos_echo` — see the Rust worker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
from typing import Any

from tasker_worker import Decision, Permanent, Retryable, StepContext, Worker


def item(i: int) -> str:
    """Element `i` of the array the `map` workflow maps over (the harness checks it)."""
    return f"e{i}"


class Run:
    def __init__(self, record_dir: str, sleep_max: int, fail_rate: float) -> None:
        self.pid = os.getpid()
        path = os.path.join(record_dir, f"exec-{self.pid}.log")
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.sleep_max = sleep_max
        self.fail_rate = fail_rate

    async def execute(self, ctx: StepContext) -> None:
        if self.sleep_max > 0:
            await asyncio.sleep(random.randint(0, self.sleep_max) / 1000)
        fail = self.fail_rate > 0 and random.random() < self.fail_rate
        step = ctx.step if ctx.index is None else f"{ctx.step}[{ctx.index}]"
        line = f"{ctx.task_id} {step} {ctx.attempt} {self.pid} {'err' if fail else 'ok'}\n"
        try:
            os.write(self.fd, line.encode())
        except OSError as e:
            raise Retryable(f"cannot record the execution: {e}") from e
        if fail:
            raise Retryable("failing on purpose (--fail-rate)")


def build(args: argparse.Namespace) -> Worker:
    os.makedirs(args.record_dir, exist_ok=True)
    run = Run(args.record_dir, args.sleep_ms_max, args.fail_rate)
    worker = Worker(
        args.amqp_url,
        queues=["default"],
        namespaces=args.namespace,
        concurrency=args.concurrency,
        prefix=args.prefix,
        name=args.name or f"chaos-worker-py-{run.pid}",
        grace_period=2.0,
    )

    @worker.handler("chaos")
    async def chaos(ctx: StepContext) -> Any:
        i = ctx.index
        if i is None:
            await run.execute(ctx)
            return {"ok": True}
        got = ctx.item
        if got != item(i):
            raise Permanent(f"instance {i} got element {got!r}, expected {item(i)!r}")
        await run.execute(ctx)
        return {"ok": True, "index": i, "item": got}

    @worker.handler("chaos_items")
    async def chaos_items(ctx: StepContext) -> Any:
        await run.execute(ctx)
        n = ctx.context.get("items") if isinstance(ctx.context, dict) else None
        if not isinstance(n, int):
            raise Permanent('the task\'s context has no "items" count')
        return {"items": [item(i) for i in range(n)]}

    @worker.handler("chaos_echo")
    async def chaos_echo(ctx: StepContext) -> Any:
        await run.execute(ctx)
        return {"ok": True, "context": ctx.context}

    @worker.handler("chaos_route")
    async def chaos_route(ctx: StepContext) -> Decision:
        await run.execute(ctx)
        branch = ctx.context.get("route") if isinstance(ctx.context, dict) else None
        if not isinstance(branch, str):
            raise Permanent('the task\'s context has no "route"')
        return Decision.choose([branch], output={"ok": True, "chose": branch})

    return worker


def main() -> None:
    p = argparse.ArgumentParser(description="Python worker for the Tasker fault-injection harness")
    p.add_argument("--amqp-url", default=os.environ.get("TASKER_AMQP_URL"))
    p.add_argument("--prefix", default=os.environ.get("TASKER_PREFIX"))
    p.add_argument("--namespace", default=os.environ.get("TASKER_NAMESPACE", "chaos"))
    p.add_argument("--record-dir", required=True)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--sleep-ms-max", type=int, default=10)
    p.add_argument("--fail-rate", type=float, default=0.0)
    p.add_argument("--name")
    args = p.parse_args()
    if not args.amqp_url or not args.prefix:
        p.error("--amqp-url and --prefix (or TASKER_AMQP_URL and TASKER_PREFIX) are required")
    build(args).run_forever()


if __name__ == "__main__":
    main()
