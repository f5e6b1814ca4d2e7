"""Testing workers against a real orchestrator (the counterpart of the Rust `Harness`).

[`TaskerTestEnv.start`] runs a `tasker serve` process with its own database (created by the
orchestrator from `TASKER_TEST_DATABASE_URL`, an admin URL) and its own exchange and queue
prefix on the broker of `TASKER_TEST_AMQP_URL`, so that test runs do not collide on shared
services. [`TaskerTestEnv.external`] points at an orchestrator that is already running.

The pytest plugin (`tasker_worker.pytest_plugin`, registered as entry point `pytest11`) gives
tests the fixture `tasker`:

```python
async def test_hello(tasker):
    tasker.register({"namespace": "demo", "name": "hello", "version": 1,
                     "steps": [{"name": "greet", "handler": "greet", "queue": "hello"}]})
    worker = tasker.worker(queues=["hello"])

    @worker.handler("greet")
    async def greet(ctx):
        return {"hello": ctx.context["name"]}

    async with tasker.running(worker):
        task = await tasker.run("demo", "hello", {"name": "Ada"})
    assert task["state"] == "completed"
```
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aio_pika
import httpx

from . import wire
from .client import AsyncClient, Client, TaskView
from .worker import Worker

#: Environment variables the test environment reads.
ENV_DATABASE = "TASKER_TEST_DATABASE_URL"
ENV_AMQP = "TASKER_TEST_AMQP_URL"
ENV_BIN = "TASKER_BIN"
ENV_KEEP = "TASKER_TEST_KEEP"
#: Point at a running orchestrator instead of starting one (with TASKER_TEST_PREFIX).
ENV_HTTP_URL = "TASKER_TEST_HTTP_URL"
ENV_PREFIX = "TASKER_TEST_PREFIX"

#: Orchestrator settings for tests (fast timers), as in tests/src/lib.rs.
TEST_SETTINGS: Mapping[str, str] = {
    "TASKER_DB_POOL_SIZE": "8",
    "TASKER_POLL_INTERVAL_MS": "100",
    "TASKER_RELAY_AFTER_MS": "1000",
    "TASKER_HANDLER_MISSING_DELAY_MS": "200",
    "TASKER_SHUTDOWN_GRACE_MS": "3000",
    # Tests read the dead-letter queue itself (the orchestrator would move it into its table).
    "TASKER_DEAD_LETTER_READER": "false",
}


class TaskerTestError(RuntimeError):
    pass


def find_binary(name: str = "tasker") -> str:
    """`$TASKER_BIN` (or, for another binary, the one beside it), else `target/debug/<name>`
    (or release) in this directory or a parent of it, else `<name>` on the PATH."""
    configured = os.environ.get(ENV_BIN)
    if configured:
        if name == "tasker":
            return configured
        beside = Path(configured).parent / name
        if beside.is_file() and os.access(beside, os.X_OK):
            return str(beside)
    starts = [Path.cwd(), Path(__file__).resolve().parent]
    for start in starts:
        for d in (start, *start.parents):
            for profile in ("debug", "release"):
                p = d / "target" / profile / name
                if p.is_file() and os.access(p, os.X_OK):
                    return str(p)
    found = shutil.which(name)
    if found:
        return found
    raise TaskerTestError(
        f"cannot find the {name} binary: build it (cargo build -p tasker-orchestrator --bin "
        f"tasker), or set {ENV_BIN}"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with_database(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


def _short_id() -> str:
    return uuid.UUID(wire.uuid7()).hex[-12:]


class TaskerTestEnv:
    """An orchestrator for tests, with its broker prefix, and helpers to run workers and tasks."""

    def __init__(
        self,
        http_url: str,
        amqp_url: str,
        prefix: str,
        *,
        process: subprocess.Popen[bytes] | None = None,
        log_path: str | None = None,
        admin_database_url: str | None = None,
        database_name: str | None = None,
    ) -> None:
        self.http_url = http_url
        self.amqp_url = amqp_url
        self.prefix = prefix
        self.names = wire.Names(prefix)
        self.client = Client(http_url)
        self.log_path = log_path
        self._process = process
        self._admin_database_url = admin_database_url
        self.database_name = database_name
        #: (namespace, queue) of every template registered, deleted at the end.
        self._queues: set[tuple[str, str]] = set()

    def __repr__(self) -> str:
        return f"TaskerTestEnv(http_url={self.http_url!r}, prefix={self.prefix!r})"

    # --- lifecycle --------------------------------------------------------------------------

    @classmethod
    def external(cls, http_url: str, amqp_url: str, prefix: str = "tasker") -> TaskerTestEnv:
        """An orchestrator that is already running (nothing is started or cleaned up)."""
        return cls(http_url, amqp_url, prefix)

    @classmethod
    def start(
        cls,
        *,
        binary: str | None = None,
        admin_database_url: str | None = None,
        amqp_url: str | None = None,
        settings: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> TaskerTestEnv:
        """Starts `tasker serve` on a new database and a new prefix."""
        admin = admin_database_url or os.environ.get(ENV_DATABASE)
        amqp = amqp_url or os.environ.get(ENV_AMQP)
        if not admin or not amqp:
            raise TaskerTestError(
                f"set {ENV_DATABASE} and {ENV_AMQP} (deploy/local/services.sh up, then "
                f". .tasker/env), or {ENV_HTTP_URL} and {ENV_PREFIX} for a running orchestrator"
            )
        binary = binary or find_binary()
        suffix = _short_id()
        database_name = f"tasker_py_{suffix}"
        prefix = f"py{suffix}"
        port = _free_port()
        http_url = f"http://127.0.0.1:{port}"
        # Only these settings: a TASKER_* variable of the caller's shell (API keys, a templates
        # directory, another prefix) must not leak into the test orchestrator.
        env = {k: v for k, v in os.environ.items() if not k.startswith("TASKER_")}
        env.update(TEST_SETTINGS)
        env.update(
            {
                "TASKER_DATABASE_URL": _with_database(admin, database_name),
                "TASKER_AMQP_URL": amqp,
                "TASKER_HTTP_ADDR": f"127.0.0.1:{port}",
                "TASKER_PREFIX": prefix,
                "RUST_LOG": os.environ.get("TASKER_TEST_RUST_LOG", "warn"),
            }
        )
        env.update(settings or {})
        log_fd, log_path = tempfile.mkstemp(prefix=f"tasker-{prefix}-", suffix=".log")
        process = subprocess.Popen(
            [binary, "serve"],
            env=env,
            stdout=log_fd,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        os.close(log_fd)
        self = cls(
            http_url,
            amqp,
            prefix,
            process=process,
            log_path=log_path,
            admin_database_url=admin,
            database_name=database_name,
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._process is not None and self._process.poll() is not None:
                raise TaskerTestError(
                    f"the orchestrator exited with {self._process.returncode}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.http_url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TaskerTestError(
                    f"the orchestrator was not ready within {timeout}s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path:
            return "(no log: an external orchestrator)"
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError as e:
            return f"(cannot read {self.log_path}: {e})"

    def stop(self) -> None:
        """Stops the orchestrator and deletes its database and broker objects (unless
        `TASKER_TEST_KEEP` is set)."""
        self.client.close()
        if self._process is None:
            return
        process, self._process = self._process, None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if os.environ.get(ENV_KEEP, "0") not in ("", "0"):
            print(f"kept database {self.database_name} and prefix {self.prefix}")
            return
        self._drop_database()
        # In a thread: stop() may be called from inside a running event loop.
        cleanup = threading.Thread(target=self._delete_broker_objects_sync, daemon=True)
        cleanup.start()
        cleanup.join(30)
        if self.log_path:
            with contextlib.suppress(OSError):
                os.unlink(self.log_path)

    def _drop_database(self) -> None:
        psql = shutil.which("psql")
        if not psql or not self._admin_database_url or not self.database_name:
            return
        with contextlib.suppress(Exception):
            subprocess.run(
                [
                    psql,
                    "-q",
                    "-d",
                    self._admin_database_url,
                    "-c",
                    f'DROP DATABASE IF EXISTS "{self.database_name}" WITH (FORCE)',
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=20,
                check=False,
            )

    def _delete_broker_objects_sync(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.run(self._delete_broker_objects())

    async def _delete_broker_objects(self) -> None:
        n = self.names
        connection = await aio_pika.connect(self.amqp_url)
        async with connection:
            queues = [
                n.task_requests_queue,
                n.dead_steps_queue,
                n.dead_letters_queue,
                *(n.results_queue(i) for i in range(16)),
                *(n.step_queue(ns, q) for ns, q in self._queues),
            ]
            for q in queues:
                channel = await connection.channel()
                with contextlib.suppress(Exception):
                    await channel.queue_delete(q)
                with contextlib.suppress(Exception):
                    await channel.close()
            for x in (
                n.tasks_exchange,
                n.steps_exchange,
                n.results_exchange,
                n.events_exchange,
                n.cancel_exchange,
                n.dead_letter_exchange,
                n.step_dead_letter_exchange,
            ):
                channel = await connection.channel()
                with contextlib.suppress(Exception):
                    await channel.exchange_delete(x)
                with contextlib.suppress(Exception):
                    await channel.close()

    # --- helpers ----------------------------------------------------------------------------

    @staticmethod
    def unique(name: str) -> str:
        """`name` with a short unique suffix (for template and queue names)."""
        return f"{name}_{_short_id()}"

    def register(self, template: Mapping[str, Any]) -> dict[str, Any]:
        """Registers a template (JSON, docs/templates.md); its queues are deleted at the end."""
        ns = str(template.get("namespace", ""))
        for s in template.get("steps", []):
            self._queues.add((ns, str(s.get("queue", "default"))))
        on_failure = template.get("on_failure")
        if isinstance(on_failure, Mapping):
            self._queues.add((ns, str(on_failure.get("queue", "default"))))
        return self.client.register_template(template)

    def worker(
        self, namespaces: str | list[str], queues: list[str] | None = None, **kwargs: Any
    ) -> Worker:
        """A [`Worker`] of `namespaces` on this environment's broker and prefix (grace period
        5 s)."""
        kwargs.setdefault("grace_period", 5.0)
        return Worker(
            self.amqp_url,
            queues or ["default"],
            namespaces=namespaces,
            prefix=self.prefix,
            **kwargs,
        )

    def async_client(self) -> AsyncClient:
        return AsyncClient(self.http_url)

    @contextlib.asynccontextmanager
    async def running(self, *workers: Worker, timeout: float = 30.0) -> AsyncIterator[None]:
        """Runs `workers` for the duration of the block (each consuming its queues before the
        block starts) and stops them gracefully at its end."""
        tasks = [asyncio.ensure_future(w.run()) for w in workers]
        try:
            for w, t in zip(workers, tasks, strict=True):
                ready = asyncio.ensure_future(w.wait_ready(timeout))
                await asyncio.wait({ready, t}, return_when=asyncio.FIRST_COMPLETED)
                if t.done():
                    ready.cancel()
                    t.result()  # raises the worker's error
                    raise TaskerTestError(f"worker {w.name} stopped before it was ready")
                ready.result()
            yield
        finally:
            for w in workers:
                w.stop()
            done, pending = await asyncio.wait(tasks, timeout=timeout) if tasks else (set(), set())
            for t in pending:
                t.cancel()
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]

    async def run(
        self,
        namespace: str,
        template: str,
        context: Any = None,
        *,
        timeout: float = 30.0,
        **submit: Any,
    ) -> TaskView:
        """Submits a task and waits for it to finish."""
        async with self.async_client() as client:
            task_id = await client.submit(namespace, template, context, **submit)
            return await client.wait(task_id, timeout=timeout)

    async def wait(self, task_id: str, *, timeout: float = 30.0) -> TaskView:
        async with self.async_client() as client:
            return await client.wait(task_id, timeout=timeout)
