"""Clients of the orchestrator: the HTTP API (CONTRACT §11), synchronous ([`Client`]) and
asynchronous ([`AsyncClient`]), and task submission over AMQP ([`submit_amqp`], §5)."""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import Mapping
from typing import Any, TypedDict, cast

import aio_pika
import httpx

from . import wire

FINISHED_STATES = frozenset({"completed", "failed", "cancelled"})
#: The longest single long-poll the orchestrator honours (ms).
MAX_WAIT_MS = 60_000
#: Quick answers of a long-poll are repeated at least this far apart (seconds).
MIN_POLL_INTERVAL = 0.2


class AttemptView(TypedDict, total=False):
    attempt: int
    outcome: str
    dispatched_at: str | None
    started_at: str | None
    finished_at: str | None
    worker: str | None
    error: str | None
    repeats: int


class StepView(TypedDict, total=False):
    id: str
    name: str
    handler: str
    queue: str
    state: str
    attempt: int
    failures: int
    max_attempts: int
    depends_on: list[str]
    output: Any
    error: str | None
    waiting_reason: str | None
    next_attempt_at: str | None
    lease_expires_at: str | None
    attempts: list[AttemptView]
    skip_reason: str
    map: dict[str, Any]
    child_task_id: str


class TaskView(TypedDict, total=False):
    id: str
    namespace: str
    template: str
    template_version: int
    state: str
    priority: int
    context: Any
    output: Any
    error: str | None
    idempotency_key: str | None
    created_at: str
    finished_at: str | None
    steps: list[StepView]
    events: list[dict[str, Any]]
    parent: dict[str, Any]


class Submitted(TypedDict):
    task_id: str
    created: bool


class TaskList(TypedDict):
    tasks: list[dict[str, Any]]
    next: str | None


class ClientError(Exception):
    """An error answer of the orchestrator (`{"error": {"code", "message", "task_id"?}}`), or
    a transport failure (`status` 0, `code` `transport`)."""

    def __init__(self, status: int, code: str, message: str, task_id: str | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.task_id = task_id


class TaskTimeout(TimeoutError):
    """[`Client.wait`] ran out of time; `task` is the task as last read."""

    def __init__(self, task: TaskView, timeout: float) -> None:
        super().__init__(
            f"task {task.get('id')} did not finish within {timeout:.1f}s "
            f"(state {task.get('state')})"
        )
        self.task = task


def _error(response: httpx.Response) -> ClientError:
    try:
        body = response.json()
        err = body["error"]
        return ClientError(
            response.status_code, str(err["code"]), str(err["message"]), err.get("task_id")
        )
    except Exception:
        return ClientError(response.status_code, "http", response.text[:500])


def _submit_body(
    namespace: str,
    template: str,
    context: Any,
    version: int | None,
    idempotency_key: str | None,
    priority: int,
    task_id: str | None,
    run_at: str | None = None,
    delay: str | int | None = None,
    deadline: str | int | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "namespace": namespace,
        "template": template,
        "context": {} if context is None else context,
        "priority": priority,
    }
    if version is not None:
        body["version"] = version
    if idempotency_key is not None:
        body["idempotency_key"] = idempotency_key
    if task_id is not None:
        body["task_id"] = task_id
    # Delayed start (`run_at`: RFC 3339, or `delay`: "10m" / milliseconds) and deadline.
    if run_at is not None:
        body["run_at"] = run_at
    if delay is not None:
        body["delay"] = delay
    if deadline is not None:
        body["deadline"] = deadline
    return body


def _signal_body(signal_id: str, payload: Any) -> dict[str, Any]:
    return {"signal_id": signal_id, "payload": payload}


def _list_params(
    namespace: str | None,
    state: str | None,
    template: str | None,
    after: str | None,
    limit: int | None,
) -> dict[str, str]:
    params = {
        "namespace": namespace,
        "state": state,
        "template": template,
        "after": after,
        "limit": None if limit is None else str(limit),
    }
    return {k: v for k, v in params.items() if v is not None}


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class Client:
    """The orchestrator's HTTP API, synchronous.

    ```python
    client = Client("http://127.0.0.1:8080")
    task_id = client.submit("shop", "order_fulfilment", {"order_id": 1}, idempotency_key="o-1")
    task = client.wait(task_id, timeout=60)
    ```
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        ca_cert: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            verify=wire.tls_context(ca_cert) or True,
            base_url=self.base_url,
            headers=_headers(api_key),
            timeout=timeout,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        try:
            response = self._http.request(
                method,
                path,
                json=json,
                params=params,
                timeout=timeout if timeout is not None else self._http.timeout,
            )
        except httpx.HTTPError as e:
            raise ClientError(0, "transport", str(e) or type(e).__name__) from e
        if response.status_code >= 400:
            raise _error(response)
        return response.json()

    def submit_task(
        self,
        namespace: str,
        template: str,
        context: Any = None,
        *,
        version: int | None = None,
        idempotency_key: str | None = None,
        priority: int = 0,
        task_id: str | None = None,
        run_at: str | None = None,
        delay: str | int | None = None,
        deadline: str | int | None = None,
    ) -> Submitted:
        """Submits a task: `{"task_id", "created"}` (`created` is False for a repeat of the
        same request under the same idempotency key)."""
        body = _submit_body(
            namespace,
            template,
            context,
            version,
            idempotency_key,
            priority,
            task_id,
            run_at,
            delay,
            deadline,
        )
        return cast(Submitted, self._request("POST", "/v1/tasks", json=body))

    def submit(
        self,
        namespace: str,
        template: str,
        context: Any = None,
        *,
        version: int | None = None,
        idempotency_key: str | None = None,
        priority: int = 0,
        task_id: str | None = None,
        run_at: str | None = None,
        delay: str | int | None = None,
        deadline: str | int | None = None,
    ) -> str:
        """Submits a task and returns its id (`run_at`/`delay`: a delayed start, the task is
        `pending` until then; `deadline`: cancelled if still live that long after it started)."""
        return self.submit_task(
            namespace,
            template,
            context,
            version=version,
            idempotency_key=idempotency_key,
            priority=priority,
            task_id=task_id,
            run_at=run_at,
            delay=delay,
            deadline=deadline,
        )["task_id"]

    def get(self, task_id: str, *, wait_ms: int | None = None) -> TaskView:
        """The task (long-polls up to `wait_ms` for it to finish)."""
        params = {"wait_ms": str(wait_ms)} if wait_ms else None
        timeout = None if not wait_ms else float(self._http.timeout.read or 30) + wait_ms / 1000
        return cast(
            TaskView, self._request("GET", f"/v1/tasks/{task_id}", params=params, timeout=timeout)
        )

    def wait(self, task_id: str, *, timeout: float = 60.0) -> TaskView:
        """Long-polls until the task is `completed`, `failed` or `cancelled`; raises
        [`TaskTimeout`] after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            asked = time.monotonic()
            task = self.get(task_id, wait_ms=max(1, min(MAX_WAIT_MS, int(left * 1000))))
            if task.get("state") in FINISHED_STATES:
                return task
            if time.monotonic() >= deadline:
                raise TaskTimeout(task, timeout)
            quick = MIN_POLL_INTERVAL - (time.monotonic() - asked)
            if quick > 0:
                time.sleep(min(quick, max(0.0, deadline - time.monotonic())))

    def list(
        self,
        *,
        namespace: str | None = None,
        state: str | None = None,
        template: str | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> TaskList:
        """Tasks, newest first: `{"tasks": [...], "next": id or None}`."""
        params = _list_params(namespace, state, template, after, limit)
        return cast(TaskList, self._request("GET", "/v1/tasks", params=params))

    def cancel(self, task_id: str, reason: str | None = None) -> TaskView:
        return cast(
            TaskView,
            self._request("POST", f"/v1/tasks/{task_id}/cancel", json={"reason": reason}),
        )

    def retry(self, task_id: str) -> TaskView:
        return cast(TaskView, self._request("POST", f"/v1/tasks/{task_id}/retry"))

    def signal(
        self, task_id: str, name: str, signal_id: str, payload: Any = None
    ) -> dict[str, Any]:
        """Sends signal `name` to a task (what its `wait_for` steps wait for). A repeat of
        `signal_id` is a no-op answering the first (`created` False); a finished task or a
        name no step waits for raises `ClientError` 409 `signal_refused`."""
        return cast(
            dict[str, Any],
            self._request(
                "POST",
                f"/v1/tasks/{task_id}/signals/{name}",
                json=_signal_body(signal_id, payload),
            ),
        )

    def instances(
        self, task_id: str, step: str, *, after: int | None = None, limit: int | None = None
    ) -> dict[str, Any]:
        params = {k: str(v) for k, v in {"after": after, "limit": limit}.items() if v is not None}
        return cast(
            dict[str, Any],
            self._request("GET", f"/v1/tasks/{task_id}/steps/{step}/instances", params=params),
        )

    def register_template(self, template: Mapping[str, Any]) -> dict[str, Any]:
        """Registers a template given as JSON (docs/templates.md)."""
        return cast(dict[str, Any], self._request("POST", "/v1/templates", json=dict(template)))

    def templates(self, namespace: str | None = None) -> builtins.list[dict[str, Any]]:
        params = {"namespace": namespace} if namespace else None
        return cast(
            builtins.list[dict[str, Any]], self._request("GET", "/v1/templates", params=params)
        )

    def workers(self) -> builtins.list[dict[str, Any]]:
        """The live workers (the worker registry, `GET /v1/workers`), newest first."""
        body = cast(dict[str, Any], self._request("GET", "/v1/workers"))
        return cast(builtins.list[dict[str, Any]], body["workers"])


class AsyncClient:
    """The orchestrator's HTTP API, for asyncio (same methods as [`Client`], awaited)."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        ca_cert: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.AsyncClient(
            verify=wire.tls_context(ca_cert) or True,
            base_url=self.base_url,
            headers=_headers(api_key),
            timeout=timeout,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        try:
            response = await self._http.request(
                method,
                path,
                json=json,
                params=params,
                timeout=timeout if timeout is not None else self._http.timeout,
            )
        except httpx.HTTPError as e:
            raise ClientError(0, "transport", str(e) or type(e).__name__) from e
        if response.status_code >= 400:
            raise _error(response)
        return response.json()

    async def submit_task(
        self,
        namespace: str,
        template: str,
        context: Any = None,
        *,
        version: int | None = None,
        idempotency_key: str | None = None,
        priority: int = 0,
        task_id: str | None = None,
        run_at: str | None = None,
        delay: str | int | None = None,
        deadline: str | int | None = None,
    ) -> Submitted:
        body = _submit_body(
            namespace,
            template,
            context,
            version,
            idempotency_key,
            priority,
            task_id,
            run_at,
            delay,
            deadline,
        )
        return cast(Submitted, await self._request("POST", "/v1/tasks", json=body))

    async def submit(
        self,
        namespace: str,
        template: str,
        context: Any = None,
        *,
        version: int | None = None,
        idempotency_key: str | None = None,
        priority: int = 0,
        task_id: str | None = None,
        run_at: str | None = None,
        delay: str | int | None = None,
        deadline: str | int | None = None,
    ) -> str:
        submitted = await self.submit_task(
            namespace,
            template,
            context,
            version=version,
            idempotency_key=idempotency_key,
            priority=priority,
            task_id=task_id,
            run_at=run_at,
            delay=delay,
            deadline=deadline,
        )
        return submitted["task_id"]

    async def get(self, task_id: str, *, wait_ms: int | None = None) -> TaskView:
        params = {"wait_ms": str(wait_ms)} if wait_ms else None
        timeout = None if not wait_ms else float(self._http.timeout.read or 30) + wait_ms / 1000
        return cast(
            TaskView,
            await self._request("GET", f"/v1/tasks/{task_id}", params=params, timeout=timeout),
        )

    async def wait(self, task_id: str, *, timeout: float = 60.0) -> TaskView:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            asked = time.monotonic()
            task = await self.get(task_id, wait_ms=max(1, min(MAX_WAIT_MS, int(left * 1000))))
            if task.get("state") in FINISHED_STATES:
                return task
            if time.monotonic() >= deadline:
                raise TaskTimeout(task, timeout)
            quick = MIN_POLL_INTERVAL - (time.monotonic() - asked)
            if quick > 0:
                await asyncio.sleep(min(quick, max(0.0, deadline - time.monotonic())))

    async def list(
        self,
        *,
        namespace: str | None = None,
        state: str | None = None,
        template: str | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> TaskList:
        params = _list_params(namespace, state, template, after, limit)
        return cast(TaskList, await self._request("GET", "/v1/tasks", params=params))

    async def cancel(self, task_id: str, reason: str | None = None) -> TaskView:
        return cast(
            TaskView,
            await self._request("POST", f"/v1/tasks/{task_id}/cancel", json={"reason": reason}),
        )

    async def retry(self, task_id: str) -> TaskView:
        return cast(TaskView, await self._request("POST", f"/v1/tasks/{task_id}/retry"))

    async def signal(
        self, task_id: str, name: str, signal_id: str, payload: Any = None
    ) -> dict[str, Any]:
        """Sends signal `name` to a task (see `Client.signal`)."""
        return cast(
            dict[str, Any],
            await self._request(
                "POST",
                f"/v1/tasks/{task_id}/signals/{name}",
                json=_signal_body(signal_id, payload),
            ),
        )

    async def instances(
        self, task_id: str, step: str, *, after: int | None = None, limit: int | None = None
    ) -> dict[str, Any]:
        params = {k: str(v) for k, v in {"after": after, "limit": limit}.items() if v is not None}
        return cast(
            dict[str, Any],
            await self._request(
                "GET", f"/v1/tasks/{task_id}/steps/{step}/instances", params=params
            ),
        )

    async def register_template(self, template: Mapping[str, Any]) -> dict[str, Any]:
        return cast(
            dict[str, Any], await self._request("POST", "/v1/templates", json=dict(template))
        )

    async def workers(self) -> builtins.list[dict[str, Any]]:
        """The live workers (the worker registry, `GET /v1/workers`), newest first."""
        body = cast(dict[str, Any], await self._request("GET", "/v1/workers"))
        return cast(builtins.list[dict[str, Any]], body["workers"])


def task_request(
    namespace: str,
    template: str,
    context: Any = None,
    *,
    version: int | None = None,
    idempotency_key: str | None = None,
    priority: int = 0,
    task_id: str | None = None,
    request_id: str | None = None,
    run_at: str | None = None,
    delay_ms: int | None = None,
    deadline_ms: int | None = None,
) -> dict[str, Any]:
    """A `task_request` payload in wire order (§5)."""
    payload: dict[str, Any] = {
        "request_id": request_id or wire.uuid7(),
        "namespace": namespace,
        "template": template,
        "version": version,
        "context": {} if context is None else context,
        "idempotency_key": idempotency_key,
        "priority": priority,
        "task_id": task_id,
    }
    # Optional fields are left out when not given.
    for key, value in (("run_at", run_at), ("delay_ms", delay_ms), ("deadline_ms", deadline_ms)):
        if value is not None:
            payload[key] = value
    return payload


async def submit_amqp(
    amqp_url: str,
    namespace: str,
    template: str,
    context: Any = None,
    *,
    prefix: str = "tasker",
    version: int | None = None,
    idempotency_key: str | None = None,
    priority: int = 0,
    task_id: str | None = None,
    ca_cert: str | None = None,
    run_at: str | None = None,
    delay_ms: int | None = None,
    deadline_ms: int | None = None,
) -> str:
    """Submits a task over AMQP (a confirmed, mandatory `task_request` to `{prefix}.tasks`) and
    returns its id (chosen here when not given: there is no reply). An invalid request is
    dead-lettered by the orchestrator; follow the task over HTTP or events. Opens a connection
    per call: use [`AmqpSubmitter`] to submit many."""
    async with AmqpSubmitter(amqp_url, prefix=prefix, ca_cert=ca_cert) as submitter:
        return await submitter.submit(
            namespace,
            template,
            context,
            version=version,
            idempotency_key=idempotency_key,
            priority=priority,
            task_id=task_id,
            run_at=run_at,
            delay_ms=delay_ms,
            deadline_ms=deadline_ms,
        )


class AmqpSubmitter:
    """Submits tasks over one AMQP connection (`async with AmqpSubmitter(url) as s:`);
    `ca_cert` trusts a private CA for `amqps://`."""

    def __init__(
        self, amqp_url: str, *, prefix: str = "tasker", ca_cert: str | None = None
    ) -> None:
        self._url = amqp_url
        self._ca_cert = ca_cert
        self._names = wire.Names(prefix)
        self._connection: Any = None
        self._channel: Any = None

    async def __aenter__(self) -> AmqpSubmitter:
        self._connection = await aio_pika.connect(
            self._url, ssl_context=wire.tls_context(self._ca_cert)
        )
        channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
        self._channel = await channel.get_underlay_channel()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def submit(
        self,
        namespace: str,
        template: str,
        context: Any = None,
        *,
        version: int | None = None,
        idempotency_key: str | None = None,
        priority: int = 0,
        task_id: str | None = None,
        run_at: str | None = None,
        delay_ms: int | None = None,
        deadline_ms: int | None = None,
    ) -> str:
        from .worker import _properties, _publish

        task_id = task_id or wire.uuid7()
        payload = task_request(
            namespace,
            template,
            context,
            version=version,
            idempotency_key=idempotency_key,
            priority=priority,
            task_id=task_id,
            run_at=run_at,
            delay_ms=delay_ms,
            deadline_ms=deadline_ms,
        )
        message_id = wire.uuid7()
        body = wire.encode("task_request", payload, message_id)
        await _publish(
            self._channel,
            self._names.tasks_exchange,
            namespace,
            body,
            _properties("task_request", message_id),
        )
        return task_id
