"""[`StepContext`]: everything a handler knows about the attempt it runs."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from .errors import Permanent
from .wire import uuid7


class Cancellation:
    """Fires when the attempt should stop: its timeout passed, the task was cancelled, the
    worker lost its broker session, or a shutdown's grace period ran out.

    Async handlers `await ctx.cancellation.wait()` (or poll `ctx.cancelled`); plain handlers
    (run in a thread) use `ctx.cancellation.wait_sync(timeout)` or poll `ctx.cancelled`."""

    __slots__ = ("_is_set", "_loop_event", "_thread_event", "reason")

    def __init__(self) -> None:
        self._is_set = False
        self._loop_event: asyncio.Event | None = None
        self._thread_event: threading.Event | None = None
        self.reason: str | None = None

    def cancel(self, reason: str = "cancelled") -> None:
        """Fires the signal (from the worker's event loop thread)."""
        if self._is_set:
            return
        self.reason = reason
        with _LOCK:
            self._is_set = True
            if self._thread_event is not None:
                self._thread_event.set()
        if self._loop_event is not None:
            self._loop_event.set()

    @property
    def is_set(self) -> bool:
        return self._is_set

    async def wait(self) -> None:
        """Returns once the signal fires."""
        if self._is_set:
            return
        if self._loop_event is None:
            self._loop_event = asyncio.Event()
        await self._loop_event.wait()

    def wait_sync(self, timeout: float | None = None) -> bool:
        """Blocks (a plain handler's thread) until the signal fires or `timeout` seconds pass;
        True if it fired."""
        with _LOCK:
            if self._is_set:
                return True
            if self._thread_event is None:
                self._thread_event = threading.Event()
            event = self._thread_event
        return event.wait(timeout)


# Guards the creation of a Cancellation's thread event (created only for plain handlers).
_LOCK = threading.Lock()


class StepContext:
    """One attempt of one step, as a handler sees it."""

    __slots__ = ("_message", "_started", "cancellation", "worker")

    def __init__(
        self, message: dict[str, Any], worker: str, cancellation: Cancellation | None = None
    ) -> None:
        self._message = message
        self.worker = worker
        self.cancellation = cancellation or Cancellation()
        self._started = time.monotonic()

    @classmethod
    def for_test(
        cls,
        step: str = "test",
        context: Any = None,
        *,
        parent_outputs: dict[str, Any] | None = None,
        attempt: int = 1,
        map_index: int | None = None,
        map_item: Any = None,
        timeout_ms: int = 30_000,
    ) -> StepContext:
        """A context for unit-testing a handler (step `step`, handler of the same name, task in
        namespace `test`)."""
        task_id = uuid7()
        message: dict[str, Any] = {
            "task_id": task_id,
            "step_id": uuid7(),
            "namespace": "test",
            "template": "test",
            "step": step,
            "handler": step,
            "queue": "default",
            "attempt": attempt,
            "idempotency_key": f"{task_id}:{step}" + ("" if map_index is None else f":{map_index}"),
            "context": {} if context is None else context,
            "parent_outputs": parent_outputs or {},
            "timeout_ms": timeout_ms,
            "result_routing_key": "test.0",
        }
        if map_index is not None:
            message["map_index"] = map_index
            message["map_item"] = map_item
        return cls(message, "test-worker")

    # --- the step message -------------------------------------------------------------------

    @property
    def message(self) -> dict[str, Any]:
        """The decoded step message payload (CONTRACT §5)."""
        return self._message

    @property
    def task_id(self) -> str:
        return str(self._message["task_id"])

    @property
    def step_id(self) -> str:
        return str(self._message["step_id"])

    @property
    def namespace(self) -> str:
        return str(self._message["namespace"])

    @property
    def template(self) -> str:
        return str(self._message["template"])

    @property
    def step(self) -> str:
        """The step's name within its template."""
        return str(self._message["step"])

    @property
    def handler(self) -> str:
        return str(self._message["handler"])

    @property
    def queue(self) -> str:
        return str(self._message["queue"])

    @property
    def attempt(self) -> int:
        """1 for the first run, growing with every retry."""
        return int(self._message["attempt"])

    @property
    def idempotency_key(self) -> str:
        """Stable across attempts (`{task_id}:{step}`, `{task_id}:{step}:{index}` for a map
        instance): key the handler's side effects on it, since a step may run more than once."""
        return str(self._message["idempotency_key"])

    @property
    def timeout_ms(self) -> int:
        return int(self._message["timeout_ms"])

    @property
    def deadline(self) -> float:
        """When this attempt times out, as a `time.monotonic()` value."""
        return self._started + self.timeout_ms / 1000

    @property
    def remaining(self) -> float:
        """Seconds left before the timeout (may be negative)."""
        return self.deadline - time.monotonic()

    @property
    def context(self) -> Any:
        """The task's context (its input), as submitted."""
        return self._message["context"]

    @property
    def input(self) -> Any:
        """Same as [`context`]."""
        return self._message["context"]

    @property
    def parent_outputs(self) -> dict[str, Any]:
        """Outputs of the step's parents, by step name."""
        outputs: dict[str, Any] = self._message.get("parent_outputs") or {}
        return outputs

    def parent(self, step: str) -> Any:
        """The output of parent `step`; a missing parent is a permanent error."""
        outputs = self.parent_outputs
        if step not in outputs:
            raise Permanent(
                f"step {self.step!r} has no parent output {step!r} "
                f"(parents: {', '.join(sorted(outputs)) or 'none'})"
            )
        return outputs[step]

    @property
    def index(self) -> int | None:
        """For an instance of a mapped step: its position in the mapped array; else None."""
        index = self._message.get("map_index")
        return None if index is None else int(index)

    @property
    def item(self) -> Any:
        """For an instance of a mapped step: its element (None for a null element or when the
        step is not a map instance; tell them apart with [`index`])."""
        return self._message.get("map_item")

    @property
    def failure(self) -> dict[str, str] | None:
        """For the `on_failure` step of a failed task: `{"step": ..., "error": ...}`."""
        failure: dict[str, str] | None = self._message.get("failure")
        return failure

    # --- cancellation -----------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """True once the attempt should stop (timeout, task cancelled, shutdown)."""
        return self.cancellation.is_set

    async def wait_cancelled(self) -> None:
        await self.cancellation.wait()

    def __repr__(self) -> str:
        return (
            f"StepContext(task_id={self.task_id!r}, step={self.step!r}, "
            f"attempt={self.attempt}, index={self.index!r})"
        )
