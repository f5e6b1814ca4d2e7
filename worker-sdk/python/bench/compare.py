"""Python worker vs Rust worker on the same orchestrator, in one run.

    . .tasker/env
    cargo build -p tasker-orchestrator --bin tasker -p tasker-tests --bin chaos-worker
    .tasker/venv/bin/python worker-sdk/python/bench/compare.py [--rounds 3] [--linear-runs 100]

Starts `tasker serve` (its own database and prefix, as the pytest plugin does), registers a
4-step chain (`linear`) and a diamond a → (b, c) → d, all no-op steps (handler `chaos`, queue
`default`), then for each worker in turn (the Rust `chaos-worker` with no sleep, then a Python
`Worker` in a child process) measures:

- linear-4: latency from submit to the finished task (long poll), one task at a time; p50/p95;
- diamond: steps/s over a steady window with `--in-flight` tasks unfinished at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from tasker_worker import AsyncClient
from tasker_worker.testing import TaskerTestEnv, find_binary

NS = "bench"

PY_WORKER = """
import sys
from tasker_worker import Worker
w = Worker(sys.argv[1], ["default"], namespaces="bench", prefix=sys.argv[2],
           concurrency=int(sys.argv[3]),
           name="py-bench")
@w.handler("chaos")
async def chaos(ctx):
    return {"ok": True}
w.run_forever()
"""


def template(name: str, edges: dict[str, list[str]]) -> dict[str, Any]:
    return {
        "namespace": NS,
        "name": name,
        "version": 1,
        "steps": [
            {"name": s, "handler": "chaos", "queue": "default", "depends_on": deps}
            for s, deps in edges.items()
        ],
    }


async def linear(client: AsyncClient, runs: int, warmup: int) -> list[float]:
    out = []
    for i in range(runs + warmup):
        t0 = time.perf_counter()
        task_id = await client.submit(NS, "linear")
        task = await client.wait(task_id, timeout=30)
        dt = time.perf_counter() - t0
        assert task["state"] == "completed", task
        if i >= warmup:
            out.append(dt)
    return out


async def diamond(client: AsyncClient, secs: float, warmup: float, in_flight: int) -> float:
    done_steps = 0
    stop_at = time.monotonic() + warmup + secs
    window_start = time.monotonic() + warmup
    counted = 0

    async def one() -> None:
        nonlocal done_steps, counted
        while time.monotonic() < stop_at:
            task_id = await client.submit(NS, "diamond")
            task = await client.wait(task_id, timeout=60)
            assert task["state"] == "completed", task
            if time.monotonic() >= window_start and time.monotonic() < stop_at:
                counted += 4

    await asyncio.gather(*(one() for _ in range(in_flight)))
    del done_steps
    return counted / secs


async def measure(env: TaskerTestEnv, args: argparse.Namespace) -> dict[str, float]:
    async with AsyncClient(env.http_url, timeout=90) as client:
        lat = await linear(client, args.linear_runs, args.warmup_runs)
        rate = await diamond(client, args.diamond_secs, args.warmup_secs, args.in_flight)
    lat.sort()
    return {
        "linear_p50_ms": statistics.median(lat) * 1000,
        "linear_p95_ms": lat[int(len(lat) * 0.95) - 1] * 1000,
        "diamond_steps_per_s": rate,
    }


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.5)  # connect and consume
    assert p.poll() is None, f"{cmd[0]} exited with {p.returncode}"
    return p


def stop(p: subprocess.Popen[bytes]) -> None:
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(15)
    except subprocess.TimeoutExpired:
        p.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--linear-runs", type=int, default=200)
    ap.add_argument("--warmup-runs", type=int, default=20)
    ap.add_argument("--diamond-secs", type=float, default=10)
    ap.add_argument("--warmup-secs", type=float, default=2)
    ap.add_argument("--in-flight", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--only", choices=["rust", "python"], default=None)
    ap.add_argument("--rounds", type=int, default=2, help="rounds per worker, alternating")
    args = ap.parse_args()

    # The loadgen's benchmark profile (tests/src/bin/loadgen/deploy.rs, BENCH_SETTINGS).
    env = TaskerTestEnv.start(
        settings={
            "TASKER_DB_POOL_SIZE": "16",
            "TASKER_RESULT_SHARDS": "1",
            "TASKER_RESULT_PREFETCH": "256",
            "TASKER_RESULT_BATCH_SIZE": "256",
            "TASKER_DISPATCH_BATCH_SIZE": "256",
            "TASKER_MAX_IN_FLIGHT_PER_QUEUE": "10000",
            "TASKER_POLL_INTERVAL_MS": "250",
        }
    )
    try:
        env.register(template("linear", {"a": [], "b": ["a"], "c": ["b"], "d": ["c"]}))
        env.register(template("diamond", {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}))
        child_env = dict(
            os.environ, TASKER_AMQP_URL=env.amqp_url, TASKER_PREFIX=env.prefix, TASKER_NAMESPACE=NS
        )
        rounds: dict[str, list[dict[str, float]]] = {"rust": [], "python": []}
        workers = {
            "rust": [
                find_binary("chaos-worker"),
                "--record-dir",
                tempfile.mkdtemp(prefix="bench-chaos-"),
                "--sleep-ms-max",
                "0",
                "--concurrency",
                str(args.concurrency),
            ],
            "python": [
                sys.executable,
                *(
                    ["-c", PY_WORKER]
                    if not os.environ.get("BENCH_PY_WORKER")
                    else [os.environ["BENCH_PY_WORKER"]]
                ),
                env.amqp_url,
                env.prefix,
                str(args.concurrency),
            ],
        }
        # Rounds alternate the workers: the machine's other load hits both alike.
        order = [k for _ in range(args.rounds) for k in workers if not args.only or k == args.only]
        for kind in order:
            p = start(workers[kind], child_env)
            try:
                r = asyncio.run(measure(env, args))
            finally:
                stop(p)
            rounds[kind].append(r)
            print(
                f"{kind:<7} linear-4 p50 {r['linear_p50_ms']:.1f} ms  p95 "
                f"{r['linear_p95_ms']:.1f} ms   diamond {r['diamond_steps_per_s']:.0f} steps/s",
                flush=True,
            )
        results = {
            k: {m: statistics.median(r[m] for r in rs) for m in rs[0]}
            for k, rs in rounds.items()
            if rs
        }
        for kind, r in results.items():
            print(
                f"median of {len(rounds[kind])}: {kind:<7} linear-4 p50 {r['linear_p50_ms']:.1f} ms"
                f"   diamond {r['diamond_steps_per_s']:.0f} steps/s"
            )
        if "rust" in results and "python" in results:
            rs, py = results["rust"], results["python"]
            print(
                f"python/rust: linear-4 p50 {py['linear_p50_ms'] / rs['linear_p50_ms']:.2f}x "
                "(target <= 1.5x), diamond "
                f"{py['diamond_steps_per_s'] / rs['diamond_steps_per_s']:.0%} (target >= 60%)"
            )
    finally:
        env.stop()


if __name__ == "__main__":
    main()
