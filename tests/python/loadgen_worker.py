"""The Python worker of the load generator (`loadgen --worker python`): the same no-op handlers as
its in-process Rust workers (`noop` returns {"ok": true}; `items` returns {"items": [0..n)} with
`n` from the task's context), on one step queue. Prints `ready` on stdout once it consumes, and
stops gracefully on SIGTERM. The URL comes from TASKER_AMQP_URL (never the command line).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from tasker_worker import StepContext, Worker


async def serve(args: argparse.Namespace) -> None:
    url = os.environ.get("TASKER_AMQP_URL")
    if not url:
        raise SystemExit("TASKER_AMQP_URL is not set")
    worker = Worker(
        url,
        queues=[args.queue],
        namespaces=args.namespace,
        concurrency=args.concurrency,
        prefix=args.prefix,
        name=args.name,
        grace_period=5.0,
    )

    @worker.handler("noop")
    async def noop(ctx: StepContext) -> Any:
        return {"ok": True}

    @worker.handler("items")
    async def items(ctx: StepContext) -> Any:
        n = ctx.context.get("items", 0) if isinstance(ctx.context, dict) else 0
        return {"items": list(range(int(n)))}

    run = asyncio.create_task(worker.run_until_signal())
    ready = asyncio.create_task(worker.wait_ready())
    done, _ = await asyncio.wait({run, ready}, return_when=asyncio.FIRST_COMPLETED)
    if ready in done and ready.exception() is None:
        print("ready", flush=True)
    await run


def main() -> None:
    p = argparse.ArgumentParser(description="Python no-op worker for the Tasker load generator")
    p.add_argument("--queue", required=True)
    p.add_argument("--namespace", default="loadgen")
    p.add_argument("--prefix", required=True)
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--name", default=None)
    asyncio.run(serve(p.parse_args()))


if __name__ == "__main__":
    main()
