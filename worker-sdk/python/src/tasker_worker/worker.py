"""The [`Worker`]: consumes step queues, runs handlers, publishes results with broker confirms
and only then acknowledges the step messages (CONTRACT §6). It mirrors the Rust SDK
(`worker-sdk/src`): bounded concurrency with a matching prefetch, execution timeouts, exceptions
as failed attempts, unreadable messages dead-lettered with a reason, long steps under a
`started` + `heartbeat` lease, cancel listening, graceful shutdown, reconnection, and results
batched while a confirm is outstanding.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import inspect
import logging
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from aiormq.abc import AbstractChannel as RawChannel
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from . import wire
from .context import Cancellation, StepContext
from .errors import Decision, StepError

log = logging.getLogger("tasker_worker")

#: Steps run at once, by default.
DEFAULT_CONCURRENCY = 16
#: Seconds running steps get to finish after a shutdown is requested.
DEFAULT_GRACE_PERIOD = 30.0
#: Steps whose execution timeout exceeds this many seconds run under a lease (§7).
DEFAULT_LONG_STEP_AFTER = 600.0
#: Seconds between a long step's heartbeats; each asks for a lease of three intervals.
DEFAULT_HEARTBEAT_INTERVAL = 20.0

CONNECT_TIMEOUT = 15.0
#: After the grace period: how long cancelled handlers get before their steps are abandoned.
ABANDON_WAIT = 1.0
#: How long shutdown waits for outstanding result confirms.
CONFIRM_WAIT = 5.0
#: A session that lasted this long was healthy: the next reconnect starts from the shortest delay.
HEALTHY_SESSION = 10.0
REQUEUE_DELAY = 0.25
MAX_REQUEUE_DELAY = 5.0
#: Most results in one `result_batch`, and most encoded bytes.
MAX_BATCH = 128
MAX_BATCH_BYTES = 1024 * 1024
#: Cancelled task ids remembered.
REMEMBERED_CANCELS = 10_000

Output = Any
HandlerResult = Any
AsyncHandler = Callable[[StepContext], Awaitable[HandlerResult]]
SyncHandler = Callable[[StepContext], HandlerResult]
Handler = Callable[[StepContext], Any]
H = TypeVar("H", bound=Callable[..., Any])


class WorkerError(Exception):
    """The worker cannot run: an invalid configuration, or (on its first connection) a step
    queue that does not exist."""


class PublishFailed(Exception):
    """A publish that was not confirmed (nack, return, closed channel)."""


@dataclass
class WorkerStats:
    """Counters, for tests and metrics."""

    steps: int = 0
    results: int = 0
    result_messages: int = 0
    result_batches: int = 0
    dead_lettered: int = 0
    sessions: int = 0
    refused_cancelled: int = 0
    leases: int = 0
    heartbeats: int = 0


@dataclass
class _HandlerEntry:
    fn: Handler
    is_async: bool


def _is_async(fn: Callable[..., Any]) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004
    return call is not None and inspect.iscoroutinefunction(call)


class _Cancels:
    """Tasks cancelled by an operator (from the cancel exchange): steps published before the
    cancel are refused, running handlers of the task see their cancellation fire."""

    def __init__(self) -> None:
        self.cancelled: collections.OrderedDict[str, int | None] = collections.OrderedDict()
        self.running: dict[str, set[Cancellation]] = {}

    def cancel(self, task_id: str, at: int | None) -> None:
        if task_id not in self.cancelled:
            self.cancelled[task_id] = at
            if len(self.cancelled) > REMEMBERED_CANCELS:
                self.cancelled.popitem(last=False)
        for c in self.running.pop(task_id, ()):
            c.cancel("the task was cancelled")

    def is_cancelled(self, task_id: str, published: int | None) -> bool:
        if task_id not in self.cancelled:
            return False
        at = self.cancelled[task_id]
        if at is not None and published is not None:
            return published < at
        return True

    def track(self, task_id: str, c: Cancellation) -> None:
        self.running.setdefault(task_id, set()).add(c)

    def untrack(self, task_id: str, c: Cancellation) -> None:
        s = self.running.get(task_id)
        if s is not None:
            s.discard(c)
            if not s:
                del self.running[task_id]


def _published_ms(headers: dict[str, Any] | None) -> int | None:
    if not headers:
        return None
    v = headers.get(wire.HEADER_PUBLISHED_MS)
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v if v >= 0 else None
    return None


#: Default interval between `worker_heartbeat`s; a worker counts as gone after 3 missed ones.
DEFAULT_REGISTRY_INTERVAL = 10.0
_SDK_VERSION = "0.1.0"


@functools.lru_cache(maxsize=1)
def _host_name() -> str:
    return socket.gethostname().replace("\0", "")[:200]


def _failed(message: str, retryable: bool) -> dict[str, Any]:
    return {"status": "failed", "message": message, "retryable": retryable, "retry_after_ms": None}


def _text(header: Any) -> str | None:
    """A header value as text (AMQP long strings may arrive as bytes)."""
    if isinstance(header, bytes):
        return header.decode("utf-8", "replace")
    return header if isinstance(header, str) else None


def _properties(
    kind: str, message_id: str, traceparent: Any = None, user_id: str | None = None
) -> Basic.Properties:
    """AMQP properties of what a worker publishes (CONTRACT §2); `user_id` is the connection's
    user (broker identity: the broker refuses any other)."""
    return Basic.Properties(
        content_type=wire.CONTENT_TYPE,
        delivery_mode=2,
        message_id=message_id,
        message_type=kind,
        user_id=user_id,
        headers={wire.HEADER_TRACEPARENT: traceparent} if traceparent is not None else None,
    )


async def _publish(
    channel: RawChannel,
    exchange: str,
    routing_key: str,
    body: bytes,
    properties: Basic.Properties,
) -> None:
    """A mandatory publish on a channel in confirm mode; returns once the broker confirmed it,
    raises [`PublishFailed`] on a nack, a return (unroutable) or a channel error."""
    try:
        confirm = await channel.basic_publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            properties=properties,
            mandatory=True,
        )
    except aiormq.exceptions.PublishError:
        raise PublishFailed(
            f"publish to {exchange} key {routing_key} was returned (unroutable)"
        ) from None
    except aiormq.exceptions.DeliveryError:
        raise PublishFailed(f"publish to {exchange} key {routing_key} was not confirmed") from None
    except asyncio.CancelledError:
        raise
    except Exception as e:
        raise PublishFailed(f"publish to {exchange} failed: {e!r}") from None
    if not isinstance(confirm, Basic.Ack):
        raise PublishFailed(f"publish to {exchange} key {routing_key} was not confirmed")


@dataclass
class _Outgoing:
    payload: dict[str, Any]
    routing_key: str
    traceparent: Any
    body: bytes
    message_id: str
    done: asyncio.Future[None]


class _ResultPublisher:
    """Publishes results: a result that finds the publisher idle goes out alone (a `result` with
    its trace context); results that finish while confirms are outstanding go out together, one
    `result_batch` per routing key, under one confirm (worker-sdk/src/batch.rs)."""

    def __init__(
        self, channel: RawChannel, exchange: str, stats: WorkerStats, user_id: str
    ) -> None:
        self._channel = channel
        self._user_id = user_id
        self._exchange = exchange
        self._stats = stats
        self._pending: list[_Outgoing] = []
        self._wakeup = asyncio.Event()
        self._closed = False
        self._task = asyncio.ensure_future(self._run())

    async def send(self, payload: dict[str, Any], routing_key: str, traceparent: Any) -> None:
        if self._closed:
            raise PublishFailed("the session is gone")
        message_id = wire.uuid7()
        try:
            body = wire.encode("result", payload, message_id)
        except Exception as e:  # an output msgpack cannot write: a permanent failure
            payload = {
                **payload,
                "outcome": _failed(f"cannot encode the step result: {e}", False),
            }
            body = wire.encode("result", payload, message_id)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(_Outgoing(payload, routing_key, traceparent, body, message_id, done))
        self._wakeup.set()
        await done

    async def close(self, wait: float) -> None:
        """Waits (at most `wait` seconds) for results handed over already, then stops."""
        deadline = time.monotonic() + wait
        while (self._pending or self._busy) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        self._closed = True
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        for o in self._pending:
            if not o.done.done():
                o.done.set_exception(PublishFailed("the session is gone"))
        self._pending = []

    _busy = False

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            taken, self._pending = self._pending, []
            if not taken:
                continue
            self._busy = True
            try:
                groups = self._group(taken)
                await asyncio.gather(*(self._send_group(g) for g in groups))
            finally:
                self._busy = False

    @staticmethod
    def _group(taken: list[_Outgoing]) -> list[list[_Outgoing]]:
        groups: list[list[_Outgoing]] = []
        sizes: list[int] = []
        for o in taken:
            for i, g in enumerate(groups):
                if (
                    g[0].routing_key == o.routing_key
                    and len(g) < MAX_BATCH
                    and sizes[i] + len(o.body) <= MAX_BATCH_BYTES
                ):
                    g.append(o)
                    sizes[i] += len(o.body)
                    break
            else:
                groups.append([o])
                sizes.append(len(o.body))
        return groups

    async def _send_group(self, group: list[_Outgoing]) -> None:
        if len(group) == 1:
            o = group[0]
            body = o.body
            properties = _properties("result", o.message_id, o.traceparent, self._user_id)
        else:
            message_id = wire.uuid7()
            # One AMQP header cannot carry several traces: each entry carries its own (§5).
            entries = [
                {**o.payload, "traceparent": _text(o.traceparent)}
                if _text(o.traceparent) is not None
                else o.payload
                for o in group
            ]
            body = wire.encode("result_batch", {"results": entries}, message_id)
            properties = _properties("result_batch", message_id, user_id=self._user_id)
        try:
            await _publish(self._channel, self._exchange, group[0].routing_key, body, properties)
        except PublishFailed as e:
            for o in group:
                if not o.done.done():
                    o.done.set_exception(e)
            return
        except asyncio.CancelledError:
            for o in group:
                if not o.done.done():
                    o.done.set_exception(PublishFailed("the session is gone"))
            raise
        self._stats.result_messages += 1
        self._stats.results += len(group)
        if len(group) > 1:
            self._stats.result_batches += 1
        for o in group:
            if not o.done.done():
                o.done.set_result(None)


@dataclass
class _Session:
    connection: AbstractConnection
    publisher: AbstractChannel
    raw_publisher: RawChannel
    results: _ResultPublisher
    #: (channel, its underlying channel, AMQP queue name, consumer tag)
    consumers: list[tuple[AbstractChannel, RawChannel, str, str]] = field(default_factory=list)
    cancel_channel: AbstractChannel | None = None
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    lost_reason: str = ""
    stopping: bool = False
    #: Cancellations of the short steps running in this session (their deliveries die with it).
    running: set[Cancellation] = field(default_factory=set)

    def lose(self, reason: str) -> None:
        if self.stopping or self.lost.is_set():
            return
        self.lost_reason = reason
        self.lost.set()


class _QueueMissing(Exception):
    pass


class _AccessRefused(Exception):
    """The broker refused the worker's user a step queue (another namespace's, with broker
    identity on)."""


class Worker:
    """Runs step handlers for Tasker.

    ```python
    worker = Worker(
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        queues=["default"],
        namespaces="shop",
        concurrency=32,
    )

    @worker.handler("charge_payment")
    async def charge(ctx: StepContext) -> dict:
        return {"charge_id": f"ch_{ctx.idempotency_key}"}

    worker.run_forever()  # until SIGTERM / Ctrl-C
    ```

    Handlers are `async def` functions (run on the event loop; cancelled at their timeout) or
    plain functions (run in a thread pool of `concurrency` threads; a thread cannot be stopped,
    so at the timeout the attempt is reported failed and the thread's slot stays busy until the
    function returns).

    `namespaces` (required: a name or a list) are the namespaces whose steps the worker runs: it
    consumes each of `queues` in each of them (`{prefix}.step.{namespace}.{queue}`).
    """

    def __init__(
        self,
        amqp_url: str,
        queues: Iterable[str] = ("default",),
        *,
        namespaces: str | Iterable[str],
        concurrency: int = DEFAULT_CONCURRENCY,
        prefetch: int | None = None,
        prefix: str = "tasker",
        name: str | None = None,
        grace_period: float = DEFAULT_GRACE_PERIOD,
        long_step_after: float = DEFAULT_LONG_STEP_AFTER,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        max_output_bytes: int = wire.DEFAULT_MAX_OUTPUT_BYTES,
        reconnect_delay: tuple[float, float] = (0.1, 0.5),
        ca_cert: str | None = None,
        registry_interval: float = DEFAULT_REGISTRY_INTERVAL,
    ) -> None:
        if isinstance(queues, str):  # a single queue name, not its characters
            queues = [queues]
        if isinstance(namespaces, str):
            namespaces = [namespaces]
        #: The namespaces served, in the order given.
        self.namespaces: list[str] = []
        for ns in namespaces:
            if ns not in self.namespaces:
                self.namespaces.append(ns)
        if not self.namespaces:
            raise WorkerError("no namespace: name the namespace(s) the worker serves")
        self.amqp_url = amqp_url
        #: The `user_id` of everything the worker publishes: the user of its AMQP URL.
        self.user_id = wire.amqp_user(amqp_url)
        #: PEM file of CA certificates trusted for `amqps://` on top of the system's.
        self.ca_cert = ca_cert
        self.queues: list[str] = []
        for q in queues:
            if q not in self.queues:
                self.queues.append(q)
        if not self.queues:
            self.queues = ["default"]
        self.concurrency = max(1, concurrency)
        self.prefetch = min(65535, max(1, prefetch if prefetch is not None else self.concurrency))
        self.names = wire.Names(prefix)
        self.name = name or wire.worker_name()
        self.grace_period = grace_period
        self.long_step_after = long_step_after
        self.heartbeat_interval = max(0.01, heartbeat_interval)
        self.max_output_bytes = max_output_bytes
        self.reconnect_delay = reconnect_delay
        #: How often the worker announces itself to the worker registry (`worker_heartbeat`).
        self.registry_interval = max(0.1, registry_interval)
        #: This process in the worker registry.
        self.worker_id = wire.uuid7()
        self.stats = WorkerStats()
        self._handlers: dict[str, _HandlerEntry] = {}
        self._cancels = _Cancels()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._stop: asyncio.Event | None = None
        self._ready: asyncio.Event | None = None
        self._abort = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._running_ctx: set[Cancellation] = set()
        self._publish_failures = 0
        self._sem: asyncio.Semaphore | None = None
        self._stop_requested = False

    def __repr__(self) -> str:  # never shows the URL (it may hold a password)
        return (
            f"Worker(name={self.name!r}, prefix={self.names.prefix!r}, "
            f"namespaces={self.namespaces!r}, queues={self.queues!r}, "
            f"handlers={self.handler_names()!r}, concurrency={self.concurrency})"
        )

    # --- handlers ---------------------------------------------------------------------------

    def handler(self, name: str | None = None) -> Callable[[H], H]:
        """Registers the decorated function as handler `name` (default: the function's name)."""

        def register(fn: H) -> H:
            self.add_handler(name or fn.__name__, fn)
            return fn

        return register

    def add_handler(self, name: str, fn: Handler) -> None:
        """Registers `fn` as handler `name` (a later call with the same name replaces it)."""
        self._handlers[name] = _HandlerEntry(fn, _is_async(fn))

    def handler_names(self) -> list[str]:
        return sorted(self._handlers)

    def missing_handlers(self, template: dict[str, Any]) -> list[str]:
        """Handlers that `template` (as JSON) needs on this worker's queues and it lacks (none
        for a template of a namespace the worker does not serve)."""
        if template.get("namespace") not in self.namespaces:
            return []
        steps = list(template.get("steps", []))
        if template.get("on_failure"):
            steps.append(template["on_failure"])
        missing = {
            s["handler"]
            for s in steps
            if not s.get("workflow")
            and s.get("handler")
            and s.get("queue", "default") in self.queues
            and s["handler"] not in self._handlers
        }
        return sorted(missing)

    # --- running ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Requests a graceful shutdown: stop taking steps, let running ones finish within the
        grace period, then cancel and abandon the rest (their messages return to the queue)."""
        self._stop_requested = True
        if self._stop is not None:
            self._stop.set()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Returns once the worker consumes every queue (call while `run` runs)."""
        deadline = time.monotonic() + timeout
        while self._ready is None:
            if time.monotonic() > deadline:
                raise TimeoutError("the worker did not start")
            await asyncio.sleep(0.01)
        await asyncio.wait_for(self._ready.wait(), max(0.0, deadline - time.monotonic()))

    def run_forever(self) -> None:
        """Runs until SIGTERM or Ctrl-C (blocking)."""
        asyncio.run(self.run_until_signal())

    async def run_until_signal(self) -> None:
        """[`run`] until SIGTERM or SIGINT."""
        loop = asyncio.get_running_loop()
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._on_signal)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        try:
            await self.run()
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    def _on_signal(self) -> None:
        log.info("shutdown signal received")
        self.stop()

    async def run(self) -> None:
        """Runs until [`stop`], reconnecting (with a short backoff) whenever the broker session
        is lost. Fails at once on a bad configuration or, on the first connection, when a step
        queue does not exist."""
        if len(self.name.encode()) > wire.MAX_WORKER_NAME_LEN:
            raise WorkerError(
                f"worker name is {len(self.name.encode())} bytes; "
                f"at most {wire.MAX_WORKER_NAME_LEN} are allowed"
            )
        for q in self._step_queues():
            if len(q.encode()) > 255:
                raise WorkerError(f"queue name {q!r} is longer than 255 bytes")
        if not self.amqp_url.startswith(("amqp://", "amqps://")):
            raise WorkerError("invalid AMQP URL: it must start with amqp:// or amqps://")
        self._stop = asyncio.Event()
        if self._stop_requested:  # stop() came before run()
            self._stop.set()
        self._ready = asyncio.Event()
        self._abort = False
        self._sem = asyncio.Semaphore(self.concurrency)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.concurrency, thread_name_prefix="tasker-handler"
        )
        if not self._handlers:
            log.warning("no handlers registered: every step will be reported as handler_missing")
        log.info(
            "worker %s starting: prefix %s, namespaces %s, queues %s, handlers %s, concurrency %d",
            self.name,
            self.names.prefix,
            self.namespaces,
            self.queues,
            self.handler_names(),
            self.concurrency,
        )
        lo, hi = self.reconnect_delay
        delay = lo
        connected_once = False
        try:
            while not self._stop.is_set():
                try:
                    session = await self._open()
                except _AccessRefused as e:
                    if not connected_once:
                        raise WorkerError(f"the broker refused access to queue {e}") from None
                    log.warning("cannot open a broker session: access refused to %s; retrying", e)
                except _QueueMissing as e:
                    if not connected_once:
                        raise WorkerError(
                            f"queue {e} does not exist; register a template that uses it first"
                        ) from None
                    log.warning("cannot open a broker session: queue %s is missing; retrying", e)
                except OSError as e:  # refused, reset, TLS (SSLError is a ValueError too)
                    log.warning("cannot open a broker session (%r); retrying", e)
                except (ValueError, TypeError) as e:
                    # A URL or option the client cannot use: no retry will fix it.
                    if not connected_once:
                        raise WorkerError(f"invalid AMQP settings: {e}") from None
                    log.warning("cannot open a broker session (%r); retrying", e)
                except Exception as e:  # connection refused, TLS, auth, timeouts: retried
                    log.warning("cannot open a broker session (%r); retrying", e)
                else:
                    connected_once = True
                    self._current_session = session
                    self._ready.set()
                    since = time.monotonic()
                    if await self._run_session(session):
                        return
                    log.warning("lost the broker session (%s); reconnecting", session.lost_reason)
                    if time.monotonic() - since >= HEALTHY_SESSION:
                        delay = lo
                    # Reconnect at once the first time: the broker may be back already.
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), lo * random.random())
                    continue
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay * (0.5 + random.random() / 2))
                delay = min(hi, delay * 2)
            # Shutdown while disconnected: steps still running cannot report; let them end.
            await self._drain()
        finally:
            self._stop_requested = False
            self._pool.shutdown(wait=False, cancel_futures=True)
            log.info("worker %s stopped", self.name)

    def _step_queues(self) -> list[str]:
        """The AMQP queue of every (namespace, queue) the worker consumes."""
        return [self.names.step_queue(ns, q) for ns in self.namespaces for q in self.queues]

    def _queue_keys(self) -> list[str]:
        """`{namespace}.{queue}` of every queue the worker consumes (its registry entry)."""
        return [wire.step_routing_key(ns, q) for ns in self.namespaces for q in self.queues]

    async def _open(self) -> _Session:
        connection = await asyncio.wait_for(
            aio_pika.connect(
                self.amqp_url,
                client_properties={"connection_name": self.name},
                ssl_context=wire.tls_context(self.ca_cert),
            ),
            CONNECT_TIMEOUT,
        )
        try:
            # The orchestrator owns the topology: only check that the queues exist (a failed
            # passive declare closes its channel, hence a channel of its own).
            check = await connection.channel(publisher_confirms=False)
            for q in self._step_queues():
                try:
                    await check.declare_queue(q, passive=True)
                except aiormq.exceptions.ChannelNotFoundEntity:
                    raise _QueueMissing(q) from None
                except aiormq.exceptions.ChannelAccessRefused as e:
                    raise _AccessRefused(f"{q}: {e}") from None
            with contextlib.suppress(Exception):
                await check.close()
            publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
            # The hot path (consume, ack, publish) uses the underlying aiormq channels directly:
            # aio-pika's message objects cost more than everything else a step does.
            raw_publisher = await publisher.get_underlay_channel()
            session = _Session(
                connection=connection,
                publisher=publisher,
                raw_publisher=raw_publisher,
                results=_ResultPublisher(
                    raw_publisher, self.names.results_exchange, self.stats, self.user_id
                ),
            )
            connection.close_callbacks.add(
                lambda _c, exc=None: session.lose(f"the connection closed ({exc!r})")
            )
            publisher.close_callbacks.add(
                lambda _c, exc=None: session.lose(f"the publisher channel closed ({exc!r})")
            )
            for q, queue_name in zip(self._queue_keys(), self._step_queues(), strict=True):
                channel = await connection.channel(publisher_confirms=False)
                await channel.set_qos(prefetch_count=self.prefetch)
                channel.close_callbacks.add(
                    lambda _c, exc=None, q=q: session.lose(
                        f"the consumer channel of queue {q} closed ({exc!r})"
                    )
                )
                raw = await channel.get_underlay_channel()
                try:
                    consume_ok = await raw.basic_consume(
                        queue_name,
                        functools.partial(self._on_delivery, session),
                        no_ack=False,
                        consumer_tag=f"{self.name}.{q}"[:255],
                    )
                except aiormq.exceptions.ChannelAccessRefused as e:
                    raise _AccessRefused(f"{queue_name}: {e}") from None
                tag = str(consume_ok.consumer_tag)
                session.consumers.append((channel, raw, queue_name, tag))
            try:
                session.cancel_channel = await self._listen_to_cancels(connection)
            except Exception as e:  # best effort, as in the Rust SDK
                log.warning("not listening for cancel messages: %r", e)
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        self.stats.sessions += 1
        log.info("worker %s connected; consuming %s", self.name, self.queues)
        return session

    async def _listen_to_cancels(self, connection: AbstractConnection) -> AbstractChannel:
        channel: AbstractChannel = await connection.channel(publisher_confirms=False)
        queue = await channel.declare_queue("", exclusive=True, auto_delete=True)
        await queue.bind(self.names.cancel_exchange, routing_key="")

        async def on_cancel(message: AbstractIncomingMessage) -> None:
            try:
                env = wire.decode(message.body, "cancel")
            except wire.DecodeError as e:
                log.warning("ignoring an unreadable cancel message: %s", e)
                return
            task_id = env.payload["task_id"]
            log.info("task %s cancelled: refusing its steps", task_id)
            self._cancels.cancel(task_id, _published_ms(message.headers))

        await queue.consume(on_cancel, no_ack=True)
        return channel

    async def _run_session(self, session: _Session) -> bool:
        """Runs a session; True when it ended by shutdown (drained and closed)."""
        assert self._stop is not None
        stop_wait = asyncio.ensure_future(self._stop.wait())
        lost_wait = asyncio.ensure_future(session.lost.wait())
        announce = asyncio.ensure_future(self._announce_loop(session))
        try:
            await asyncio.wait({stop_wait, lost_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
            lost_wait.cancel()
            announce.cancel()
        if session.lost.is_set() and not self._stop.is_set():
            # Closing the connection returns every unacknowledged message to its queue, so the
            # short steps still running here will run again: ask them to stop.
            for c in list(session.running):
                c.cancel("the broker session was lost")
            await session.results.close(0)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(session.connection.close(), 2)
            return False
        await self._shutdown(session)
        return True

    def _heartbeat(self, stopping: bool) -> dict[str, Any]:
        free = self._sem._value if self._sem is not None else self.concurrency
        return {
            "worker_id": self.worker_id,
            "worker": self.name,
            "host": _host_name(),
            "sdk": "python",
            "sdk_version": _SDK_VERSION,
            "queues": list(self.queues),
            "handlers": sorted(self._handlers),
            "concurrency": self.concurrency,
            "in_flight": max(0, self.concurrency - free),
            "interval_ms": int(self.registry_interval * 1000),
            "stopping": stopping,
        }

    async def _announce(self, session: _Session, stopping: bool = False) -> None:
        """Publishes one `worker_heartbeat` (the worker registry, CONTRACT §5), confirmed."""
        message_id = wire.uuid7()
        body = wire.encode("worker_heartbeat", self._heartbeat(stopping), message_id)
        await _publish(
            session.raw_publisher,
            self.names.results_exchange,
            wire.WORKER_HEARTBEAT_ROUTING_KEY,
            body,
            _properties("worker_heartbeat", message_id, user_id=self.user_id),
        )

    async def _announce_loop(self, session: _Session) -> None:
        """Announces the worker now and every `registry_interval` while the session runs."""
        warned = -60.0
        while True:
            try:
                await self._announce(session)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # An orchestrator older than the registry has no binding for it: once a minute.
                if time.monotonic() - warned >= 60:
                    log.warning("worker heartbeat not delivered: %r", e)
                    warned = time.monotonic()
            await asyncio.sleep(self.registry_interval)

    async def _shutdown(self, session: _Session) -> None:
        session.stopping = True
        for _channel, raw, queue_name, tag in session.consumers:
            try:
                await raw.basic_cancel(tag)
            except Exception as e:
                log.warning("cannot cancel the consumer of %s: %r", queue_name, e)
        log.info("worker %s shutting down: stopped taking new steps", self.name)
        await self._drain()
        # Leave the worker registry at once (best effort: it forgets us after 3 intervals).
        try:
            await asyncio.wait_for(self._announce(session, stopping=True), CONFIRM_WAIT)
        except Exception as e:
            log.warning("could not leave the worker registry: %r", e)
        await session.results.close(CONFIRM_WAIT)
        for channel, _raw, _queue, _tag in session.consumers:
            with contextlib.suppress(Exception):
                await channel.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.connection.close(), 5)

    async def _drain(self) -> None:
        """Waits for running steps: up to the grace period, then cancels them, then abandons
        them (their messages are not acknowledged and return to the queue)."""
        running = [t for t in self._tasks if not t.done()]
        if not running:
            return
        log.info(
            "waiting for %d running steps (grace period %.1fs)", len(running), self.grace_period
        )
        _done, pending = await asyncio.wait(running, timeout=self.grace_period)
        if not pending:
            return
        log.warning("grace period over: cancelling %d running steps", len(pending))
        self._abort = True
        for c in list(self._running_ctx):
            c.cancel("the worker is shutting down")
        _done, pending = await asyncio.wait(pending, timeout=ABANDON_WAIT)
        if not pending:
            return
        log.warning("abandoning %d steps that are still running", len(pending))
        for t in pending:
            t.cancel()
        await asyncio.wait(pending, timeout=ABANDON_WAIT)

    # --- one delivery -----------------------------------------------------------------------

    async def _on_delivery(self, session: _Session, message: DeliveredMessage) -> None:
        # The step runs in a task of its own, not in the channel's consumer task: closing the
        # channel (a lost session) cancels those, and a long step, acked already, must go on.
        task = asyncio.ensure_future(self._process(session, message))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a step delivery failed unexpectedly", exc_info=task.exception())

    async def _process(self, session: _Session, message: DeliveredMessage) -> None:
        assert self._sem is not None
        await self._sem.acquire()
        release: Callable[[], None] = self._sem.release
        try:
            if session.stopping or session.lost.is_set():
                # Taken but not started: its channel closes and it returns to the queue.
                return
            try:
                env = wire.decode(message.body, "step")
                step = env.payload
                rk_len = len(step["result_routing_key"].encode())
                if rk_len > 255:
                    raise wire.DecodeError(
                        "invalid_payload",
                        f"result_routing_key is {rk_len} bytes long; at most 255 are allowed",
                    )
            except wire.DecodeError as e:
                await self._dead_letter(session, message, e.reason)
                return
            release = await self._run_step(session, message, step, release)
        finally:
            release()

    async def _run_step(
        self,
        session: _Session,
        message: DeliveredMessage,
        step: dict[str, Any],
        release: Callable[[], None],
    ) -> Callable[[], None]:
        """Runs one step and reports it; returns how to release its concurrency slot (later, if
        a plain handler's thread outlives its timeout)."""
        self.stats.steps += 1
        headers = message.header.properties.headers or {}
        traceparent = headers.get(wire.HEADER_TRACEPARENT)
        routing_key: str = step["result_routing_key"]
        task_id: str = step["task_id"]
        entry = self._handlers.get(step["handler"])
        if entry is None:
            log.warning(
                "no handler %r on this worker (queue %s); reporting handler_missing",
                step["handler"],
                step["queue"],
            )
        long = step["timeout_ms"] > self.long_step_after * 1000
        cancellation = Cancellation()
        heartbeats: asyncio.Task[None] | None = None
        acked = False
        if long:
            try:
                await self._publish_lease(session, "started", step, traceparent)
            except PublishFailed as e:
                await self._requeue_later(session, message, e)
                return release
            await self._ack(message)
            acked = True
            heartbeats = asyncio.ensure_future(self._heartbeats(session, step, traceparent))
        else:
            session.running.add(cancellation)
        self._running_ctx.add(cancellation)
        ctx = StepContext(step, self.name, cancellation)
        started = time.monotonic()
        try:
            if self._cancels.is_cancelled(task_id, _published_ms(headers)):
                log.info(
                    "task %s cancelled: refusing step %s without running it", task_id, step["step"]
                )
                self.stats.refused_cancelled += 1
                outcome = _failed("the task was cancelled", False)
            else:
                self._cancels.track(task_id, cancellation)
                try:
                    outcome, still_running = await self._run_handler(entry, ctx)
                finally:
                    self._cancels.untrack(task_id, cancellation)
                if still_running is not None:
                    # The slot stays busy until the handler really ends.
                    slot = release
                    still_running.add_done_callback(lambda _f: slot())
                    release = _noop
        finally:
            if heartbeats is not None:
                heartbeats.cancel()
            session.running.discard(cancellation)
            self._running_ctx.discard(cancellation)
        duration_ms = int((time.monotonic() - started) * 1000)
        if self._abort and outcome["status"] != "succeeded":
            # Most likely it stopped because we cancelled it: reporting that would spend an
            # attempt. Leave the message unacknowledged; it runs again elsewhere.
            log.warning(
                "grace period over: not reporting step %s; its message returns", step["step"]
            )
            return release
        if outcome["status"] == "failed":
            log.info(
                "step %s of task %s failed (retryable %s): %s",
                step["step"],
                task_id,
                outcome["retryable"],
                outcome["message"],
            )
        result = {
            "task_id": task_id,
            "step_id": step["step_id"],
            "attempt": step["attempt"],
            "worker": self.name,
            "duration_ms": duration_ms,
            "outcome": outcome,
        }
        if acked:
            await self._report_leased(session, result, routing_key, traceparent)
            return release
        try:
            await session.results.send(result, routing_key, traceparent)
        except PublishFailed as e:
            await self._requeue_later(session, message, e)
            return release
        self._publish_failures = 0
        await self._ack(message)
        return release

    async def _run_handler(
        self, entry: _HandlerEntry | None, ctx: StepContext
    ) -> tuple[dict[str, Any], asyncio.Future[Any] | None]:
        """The attempt's outcome, and the handler's future when it still runs (timed out)."""
        if entry is None:
            return {"status": "handler_missing", "handler": ctx.handler}, None
        timeout = ctx.timeout_ms / 1000
        fut: asyncio.Future[Any]
        if entry.is_async:
            fut = asyncio.ensure_future(entry.fn(ctx))
        else:
            assert self._pool is not None
            loop = asyncio.get_running_loop()
            fut = loop.run_in_executor(self._pool, entry.fn, ctx)
        try:
            done, _ = await asyncio.wait({fut}, timeout=timeout)
        except asyncio.CancelledError:
            ctx.cancellation.cancel("abandoned")
            fut.cancel()
            raise
        if not done:
            ctx.cancellation.cancel("timed out")
            if entry.is_async:
                fut.cancel()
            return _failed(f"timed out after {ctx.timeout_ms} ms", True), fut
        try:
            returned = fut.result()
        except StepError as e:
            return e.outcome(), None
        except asyncio.CancelledError:
            return _failed("the handler was cancelled", True), None
        except BaseException as e:  # SystemExit from a plain handler's thread too
            return _failed(f"handler raised {type(e).__name__}: {e}", True), None
        if inspect.isawaitable(returned):
            return _failed(
                "a plain handler returned an awaitable; make it `async def`", False
            ), None
        return self._succeeded(ctx, returned), None

    def _succeeded(self, ctx: StepContext, returned: Any) -> dict[str, Any]:
        if isinstance(returned, Decision):
            output, branches = returned.output, returned.branches
        else:
            output, branches = returned, None
        why = wire.json_problem(output)
        if why is None:
            why = wire.check_output(f'output of step "{ctx.step}"', output, self.max_output_bytes)
        else:
            why = f'output of step "{ctx.step}" is not JSON data: {why}'
        if why is not None:
            return _failed(why, False)
        outcome: dict[str, Any] = {"status": "succeeded", "output": output}
        if branches is not None:
            outcome["branches"] = branches
        return outcome

    async def _publish_lease(
        self, session: _Session, kind: str, step: dict[str, Any], traceparent: Any
    ) -> None:
        payload = {
            "task_id": step["task_id"],
            "step_id": step["step_id"],
            "attempt": step["attempt"],
            "worker": self.name,
            "lease_ms": int(self.heartbeat_interval * 3 * 1000),
        }
        message_id = wire.uuid7()
        body = wire.encode(kind, payload, message_id)
        await _publish(
            session.raw_publisher,
            self.names.results_exchange,
            step["result_routing_key"],
            body,
            _properties(kind, message_id, traceparent, self.user_id),
        )
        if kind == "started":
            self.stats.leases += 1
        else:
            self.stats.heartbeats += 1

    async def _heartbeats(self, session: _Session, step: dict[str, Any], traceparent: Any) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            # After a reconnect, through the new session (the step's message is acked already).
            current = self._current_session or session
            try:
                await self._publish_lease(current, "heartbeat", step, traceparent)
            except PublishFailed as e:
                log.warning("heartbeat not sent; the lease may run out: %s", e)

    async def _report_leased(
        self, session: _Session, result: dict[str, Any], routing_key: str, traceparent: Any
    ) -> None:
        """A leased step's result (its message is acked already): retried a few times, across
        sessions; if it never goes through the lease runs out and the step is retried."""
        delay = REQUEUE_DELAY
        for _ in range(8):
            try:
                await session.results.send(result, routing_key, traceparent)
                return
            except PublishFailed as e:
                log.warning("could not publish a leased step's result (%s); retrying", e)
            await asyncio.sleep(delay)
            delay = min(MAX_REQUEUE_DELAY, delay * 2)
            session = self._current_session or session
        log.error("gave up publishing a leased step's result; its lease will expire")

    _current_session: _Session | None = None

    async def _dead_letter(self, session: _Session, message: DeliveredMessage, reason: str) -> None:
        routing_key = message.routing_key or ""
        log.warning(
            "dead-lettering a step message that cannot be read (routing key %s): %s",
            routing_key,
            reason,
        )
        p = message.header.properties
        headers = dict(p.headers or {})
        headers[wire.HEADER_REASON] = reason
        # The original's properties, persistent, with the reason added.
        copy = Basic.Properties(
            content_type=p.content_type,
            content_encoding=p.content_encoding,
            headers=headers,
            delivery_mode=2,
            priority=p.priority,
            correlation_id=p.correlation_id,
            reply_to=p.reply_to,
            expiration=p.expiration,
            message_id=p.message_id,
            timestamp=p.timestamp,
            message_type=p.message_type,
            user_id=self.user_id,
            app_id=p.app_id,
            cluster_id=p.cluster_id,
        )
        try:
            await _publish(
                session.raw_publisher,
                self.names.dead_letter_exchange,
                routing_key,
                message.body,
                copy,
            )
        except PublishFailed as e:
            log.error("could not publish the dead letter (%s); rejecting the message", e)
            self._note_publish_failure(session)
            with contextlib.suppress(Exception):
                await message.channel.basic_reject(_tag(message), requeue=False)
            return
        self.stats.dead_lettered += 1
        await self._ack(message)

    async def _ack(self, message: DeliveredMessage) -> None:
        try:
            await message.channel.basic_ack(_tag(message))
        except Exception as e:
            log.warning("acknowledging the step message failed (%r); it will be redelivered", e)

    def _note_publish_failure(self, session: _Session) -> int:
        if session.publisher.is_closed:
            session.lose("the publisher channel is closed")
        self._publish_failures += 1
        return self._publish_failures

    async def _requeue_later(
        self, session: _Session, message: DeliveredMessage, error: Exception
    ) -> None:
        failures = self._note_publish_failure(session)
        delay = min(MAX_REQUEUE_DELAY, REQUEUE_DELAY * (2 ** min(16, failures - 1)))
        log.error("could not publish the result (%s); requeueing the step in %.2fs", error, delay)
        await asyncio.sleep(delay)
        try:
            await message.channel.basic_nack(_tag(message), requeue=True)
        except Exception as e:
            log.warning("requeueing failed (%r); it returns when its channel closes", e)


def _noop() -> None:
    pass


def _tag(message: DeliveredMessage) -> int:
    tag = message.delivery_tag
    if tag is None:  # only a basic.get-empty has none
        raise ValueError("a delivery without a delivery tag")
    return int(tag)
