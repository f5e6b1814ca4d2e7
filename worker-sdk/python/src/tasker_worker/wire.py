"""The wire contract (schemas/CONTRACT.md, schema 1.1): MessagePack envelopes, their payloads,
the checks a reader makes (in the contract's order, §3) and the writer's field order.

Decoded payloads are plain dicts: unknown fields dropped, defaults filled in, the 1.1 fields
(`map_index`, `map_item`, `failure`, `branches`) left out when they do not apply, exactly as
`test-vectors.json` describes them (`decoded`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import ssl
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgpack

SCHEMA_VERSION: Final = "1.1"
SCHEMA_MAJOR: Final = 1
#: Maps and arrays a whole message may nest, envelope included (§3).
MAX_MESSAGE_DEPTH: Final = 108
#: Levels of arrays and objects task data may nest (§4).
MAX_DATA_DEPTH: Final = 100
#: Default largest step output, as JSON (§9).
DEFAULT_MAX_OUTPUT_BYTES: Final = 256 * 1024
#: Longest worker name in bytes (§5).
MAX_WORKER_NAME_LEN: Final = 256

KINDS: Final = (
    "task_request",
    "step",
    "result",
    "result_batch",
    "started",
    "heartbeat",
    "cancel",
    "lifecycle_event",
    "worker_heartbeat",
    "signal",
)

HEADER_PUBLISHED_MS: Final = "x-tasker-published-ms"
HEADER_TRACEPARENT: Final = "traceparent"
HEADER_REASON: Final = "x-tasker-reason"
CONTENT_TYPE: Final = "application/msgpack"


class DecodeError(ValueError):
    """A message that must be refused. `error_class` is the class of `test-vectors.json`
    (`malformed`, `invalid_version`, `unknown_major`, `wrong_kind`, `invalid_payload`); `str()`
    is the dead-letter reason."""

    def __init__(self, error_class: str, reason: str) -> None:
        super().__init__(reason)
        self.error_class = error_class
        self.reason = reason


class _FieldError(Exception):
    pass


# --- names ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Names:
    """Exchange and queue names under one prefix (§1)."""

    prefix: str = "tasker"

    @property
    def tasks_exchange(self) -> str:
        return f"{self.prefix}.tasks"

    @property
    def steps_exchange(self) -> str:
        return f"{self.prefix}.steps"

    @property
    def results_exchange(self) -> str:
        return f"{self.prefix}.results"

    @property
    def events_exchange(self) -> str:
        return f"{self.prefix}.events"

    @property
    def cancel_exchange(self) -> str:
        return f"{self.prefix}.cancel"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.prefix}.dlx"

    @property
    def step_dead_letter_exchange(self) -> str:
        return f"{self.prefix}.dlx.steps"

    @property
    def task_requests_queue(self) -> str:
        return f"{self.prefix}.task_requests"

    @property
    def dead_steps_queue(self) -> str:
        return f"{self.prefix}.dead_steps"

    @property
    def dead_letters_queue(self) -> str:
        return f"{self.prefix}.dead_letters"

    def step_queue(self, namespace: str, queue: str) -> str:
        """The step queue of template queue `queue` in `namespace`."""
        return f"{self.prefix}.step.{namespace}.{queue}"

    def results_queue(self, shard: int) -> str:
        return f"{self.prefix}.results.{shard}"


# --- ids ------------------------------------------------------------------------------------

_last_v7 = [0, 0]


def uuid7() -> str:
    """A new UUIDv7 (time-ordered), as canonical lowercase text."""
    ms = time.time_ns() // 1_000_000
    rand_a = secrets.randbits(11)
    # Monotonic in this process: within a millisecond the 12-bit counter grows; when it is used
    # up, the next millisecond is borrowed.
    if ms <= _last_v7[0]:
        ms = _last_v7[0]
        rand_a = _last_v7[1] + 1
        if rand_a > 0xFFF:
            ms, rand_a = ms + 1, 0
    _last_v7[0], _last_v7[1] = ms, rand_a
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= rand_a << 64
    value |= 0b10 << 62
    value |= secrets.randbits(62)
    return str(uuid.UUID(int=value))


# --- data -----------------------------------------------------------------------------------


def data_depth(value: Any) -> int:
    """Levels of arrays and objects (`{}` is 1, a scalar 0)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            deepest = max(deepest, d + 1)
            stack.extend((c, d + 1) for c in v.values())
        elif isinstance(v, (list, tuple)):
            deepest = max(deepest, d + 1)
            stack.extend((c, d + 1) for c in v)
    return deepest


def json_problem(value: Any) -> str | None:
    """Why `value` is not JSON data (§4: str keys, no bin or ext), or None. Tuples count as
    arrays (they are written as arrays)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if v is None or isinstance(v, (bool, int, float, str)):
            continue
        if isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, dict):
            for k, c in v.items():
                if not isinstance(k, str):
                    return f"map keys must be strings, found {type(k).__name__}"
                stack.append(c)
        elif isinstance(v, (bytes, bytearray)):
            return "binary data is not JSON"
        else:
            return f"{type(v).__name__} is not JSON"
    return None


def check_output(what: str, value: Any, limit: int) -> str | None:
    """The contract's data check (§4): why `value` cannot be sent as an output, or None.
    Messages follow the orchestrator's (`output of step "s" is N bytes, over the limit of L
    bytes`)."""
    if data_depth(value) > MAX_DATA_DEPTH:
        return f"{what} nests arrays and objects more than {MAX_DATA_DEPTH} levels deep"
    try:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        return f"{what} is not JSON data: {e}"
    if "\\u0000" in text:
        return f"{what} contains a NUL character, which is not allowed"
    size = len(text.encode("utf-8"))
    if size > limit:
        return f"{what} is {size} bytes, over the limit of {limit} bytes"
    return None


# --- field readers --------------------------------------------------------------------------

_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)


def _type_name(v: Any) -> str:
    if v is None:
        return "nil"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return f"integer `{v}`"
    if isinstance(v, float):
        return "a float"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, (bytes, bytearray)):
        return "binary data"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "a map"
    return type(v).__name__


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise _FieldError(f"invalid type: {_type_name(v)}, expected a string")
    return v


def _uuid(v: Any) -> str:
    if not isinstance(v, str):
        raise _FieldError(f"invalid type: {_type_name(v)}, expected a UUID string")
    if _UUID_RE.match(v):
        return v.lower()
    try:
        return str(uuid.UUID(v))
    except ValueError:
        bad = next((i for i, c in enumerate(v) if c not in "0123456789abcdefABCDEF-"), None)
        if bad is not None:
            raise _FieldError(f"invalid character: found `{v[bad]}` at {bad}") from None
        raise _FieldError(f"invalid UUID {v!r}") from None


def _int(lo: int, hi: int, name: str) -> Callable[[Any], int]:
    def read(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _FieldError(f"invalid type: {_type_name(v)}, expected {name}")
        if not lo <= v <= hi:
            raise _FieldError(f"invalid value: integer `{v}`, expected {name}")
        return v

    return read


_u32 = _int(0, 2**32 - 1, "u32")
_u64 = _int(0, 2**64 - 1, "u64")
_i16 = _int(-(2**15), 2**15 - 1, "i16")


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _FieldError(f"invalid type: {_type_name(v)}, expected a boolean")
    return v


def _json(v: Any) -> Any:
    why = json_problem(v)
    if why is not None:
        raise _FieldError(why)
    return v


def _json_map(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _FieldError(f"invalid type: {_type_name(v)}, expected a map")
    return _json(v)  # type: ignore[no-any-return]


def _str_list(v: Any) -> list[str]:
    if not isinstance(v, list):
        raise _FieldError(f"invalid type: {_type_name(v)}, expected a sequence")
    return [_str(x) for x in v]


# A field: (name, reader, required, default, omitted when absent/nil)
_Field = tuple[str, Callable[[Any], Any], bool, Any, bool]


def _f(name: str, read: Callable[[Any], Any]) -> _Field:
    return (name, read, True, None, False)


def _opt(name: str, read: Callable[[Any], Any], default: Any = None) -> _Field:
    return (name, read, False, default, False)


def _omit(name: str, read: Callable[[Any], Any]) -> _Field:
    return (name, read, False, None, True)


def _read_fields(fields: tuple[_Field, ...], raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _FieldError(f"invalid type: {_type_name(raw)}, expected a map")
    out: dict[str, Any] = {}
    for name, read, required, default, omit in fields:
        v = raw.get(name)
        if v is None:
            if name not in raw and required:
                raise _FieldError(f"missing field `{name}`")
            if required and read is not _json:
                raise _FieldError(f"{name}: invalid type: nil")
            if omit:
                continue
            out[name] = None if required else (default() if callable(default) else default)
            continue
        try:
            out[name] = read(v)
        except _FieldError as e:
            raise _FieldError(f"{name}: {e}") from None
    return out


def _failure(v: Any) -> dict[str, str]:
    return _read_fields((_f("step", _str), _f("error", _str)), v)


_SUCCEEDED = (_opt("output", _json), _omit("branches", _str_list))
_FAILED = (_f("message", _str), _f("retryable", _bool), _opt("retry_after_ms", _u64))
_MISSING = (_f("handler", _str),)


def _outcome(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise _FieldError(f"invalid type: {_type_name(v)}, expected a map")
    status = v.get("status")
    if status is None:
        raise _FieldError("missing field `status`")
    fields = {"succeeded": _SUCCEEDED, "failed": _FAILED, "handler_missing": _MISSING}.get(
        status if isinstance(status, str) else ""
    )
    if fields is None:
        raise _FieldError(
            f"unknown variant {status!r}, expected one of `succeeded`, `failed`, `handler_missing`"
        )
    return {"status": status, **_read_fields(fields, v)}


_RESULT = (
    _f("task_id", _uuid),
    _f("step_id", _uuid),
    _f("attempt", _u32),
    _f("worker", _str),
    _opt("duration_ms", _u64, 0),
    _f("outcome", _outcome),
    _omit("traceparent", _str),
)


def _result_list(v: Any) -> list[dict[str, Any]]:
    if not isinstance(v, list):
        raise _FieldError(f"invalid type: {_type_name(v)}, expected a sequence")
    out = []
    for i, entry in enumerate(v):
        try:
            out.append(_read_fields(_RESULT, entry))
        except _FieldError as e:
            raise _FieldError(f"entry {i}: {e}") from None
    return out


_LEASE = (
    _f("task_id", _uuid),
    _f("step_id", _uuid),
    _f("attempt", _u32),
    _f("worker", _str),
    _f("lease_ms", _u64),
)

PAYLOADS: Final[Mapping[str, tuple[_Field, ...]]] = {
    "task_request": (
        _f("request_id", _uuid),
        _f("namespace", _str),
        _f("template", _str),
        _opt("version", _u32),
        _opt("context", _json, dict),
        _opt("idempotency_key", _str),
        _opt("priority", _i16, 0),
        _opt("task_id", _uuid),
        _omit("run_at", _str),
        _omit("delay_ms", _u64),
        _omit("deadline_ms", _u64),
    ),
    "step": (
        _f("task_id", _uuid),
        _f("step_id", _uuid),
        _f("namespace", _str),
        _f("template", _str),
        _f("step", _str),
        _f("handler", _str),
        _f("queue", _str),
        _f("attempt", _u32),
        _f("idempotency_key", _str),
        _f("context", _json),
        _opt("parent_outputs", _json_map, dict),
        _f("timeout_ms", _u64),
        _f("result_routing_key", _str),
        _omit("map_index", _u32),
        _omit("map_item", _json),
        _omit("failure", _failure),
    ),
    "result": _RESULT,
    "result_batch": (_f("results", _result_list),),
    "started": _LEASE,
    "heartbeat": _LEASE,
    "cancel": (_f("task_id", _uuid), _opt("reason", _str)),
    "lifecycle_event": (
        _f("task_id", _uuid),
        _f("namespace", _str),
        _f("template", _str),
        _f("seq", _u64),
        _f("state", _str),
        _f("at", _str),
        _opt("output", _json),
        _opt("error", _str),
    ),
    "worker_heartbeat": (
        _f("worker_id", _uuid),
        _f("worker", _str),
        _opt("host", _str, ""),
        _opt("sdk", _str, ""),
        _opt("sdk_version", _str, ""),
        _opt("queues", _str_list, list),
        _opt("handlers", _str_list, list),
        _opt("concurrency", _u32, 0),
        _opt("in_flight", _u32, 0),
        _f("interval_ms", _u64),
        _opt("stopping", _bool, False),
    ),
    "signal": (
        _f("task_id", _uuid),
        _f("name", _str),
        _f("signal_id", _str),
        _opt("payload", _json),
    ),
}

#: Routing key of a `worker_heartbeat` on the results exchange (the worker registry, §5).
WORKER_HEARTBEAT_ROUTING_KEY: Final = "workers.heartbeat"


# --- envelopes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Envelope:
    kind: str
    schema_version: str
    message_id: str
    payload: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "schema_version": self.schema_version,
            "message_id": self.message_id,
            "payload": self.payload,
        }


_VERSION_RE = re.compile(r"^([0-9]+)\.([0-9]+)$")


def _too_deep(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            if d > limit:
                return True
            stack.extend((c, d + 1) for c in v.values())
        elif isinstance(v, list):
            if d > limit:
                return True
            stack.extend((c, d + 1) for c in v)
    return False


def decode(data: bytes, expected: str | tuple[str, ...]) -> Envelope:
    """Reads one message as one of the `expected` kinds, or raises [`DecodeError`] at the first
    fault, in the order of §3."""
    if not data or not (0x80 <= data[0] <= 0x8F or data[0] in (0xDE, 0xDF)):
        raise DecodeError(
            "malformed", "not a MessagePack envelope: the envelope must be a MessagePack map"
        )
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=False, timestamp=0)
    except msgpack.ExtraData as e:
        extra = len(e.extra) if isinstance(e.extra, (bytes, bytearray)) else 1
        raise DecodeError(
            "malformed", f"not a MessagePack envelope: {extra} trailing bytes after the message"
        ) from None
    except (ValueError, msgpack.UnpackException, RecursionError, TypeError) as e:
        text = str(e) or type(e).__name__
        if "depth" in text.lower() or "stack" in text.lower() or isinstance(e, RecursionError):
            text = "depth limit exceeded"
        raise DecodeError("malformed", f"not a MessagePack envelope: {text}") from None
    if _too_deep(raw, MAX_MESSAGE_DEPTH):
        raise DecodeError("malformed", "not a MessagePack envelope: depth limit exceeded")
    if not isinstance(raw, dict):
        raise DecodeError(
            "malformed", "not a MessagePack envelope: the envelope must be a MessagePack map"
        )
    for field in ("kind", "schema_version"):
        if field not in raw:
            raise DecodeError("malformed", f"not a MessagePack envelope: missing field `{field}`")
        if not isinstance(raw[field], str):
            raise DecodeError(
                "malformed",
                f"not a MessagePack envelope: {field}: invalid type: "
                f"{_type_name(raw[field])}, expected a string",
            )
    kind: str = raw["kind"]
    version: str = raw["schema_version"]
    m = _VERSION_RE.match(version) if version.isascii() else None
    if m is None:
        raise DecodeError(
            "invalid_version", f'invalid schema_version "{version}": expected "major.minor"'
        )
    major = int(m.group(1))
    if major != SCHEMA_MAJOR:
        raise DecodeError(
            "unknown_major",
            f"unsupported schema major version {major} (this reader supports {SCHEMA_MAJOR})",
        )
    wanted = (expected,) if isinstance(expected, str) else expected
    if kind not in wanted:
        raise DecodeError(
            "wrong_kind", f'unexpected message kind "{kind}", expected {" or ".join(wanted)}'
        )
    try:
        message_id = _uuid(raw.get("message_id")) if "message_id" in raw else None
        if message_id is None:
            raise _FieldError("missing field `message_id`")
        if "payload" not in raw:
            raise _FieldError("missing field `payload`")
        payload = _read_fields(PAYLOADS[kind], raw["payload"])
    except _FieldError as e:
        raise DecodeError("invalid_payload", f"invalid {kind} payload: {e}") from None
    return Envelope(kind, version, message_id, payload)


def encode(kind: str, payload: Mapping[str, Any], message_id: str | None = None) -> bytes:
    """Writes an envelope of `kind` at schema 1.1. Payload fields are written in the order
    given (use the builders below for the contract's order)."""
    return msgpack.packb(  # type: ignore[no-any-return]
        {
            "kind": kind,
            "schema_version": SCHEMA_VERSION,
            "message_id": message_id or uuid7(),
            "payload": payload,
        },
        use_bin_type=True,
    )


def encode_envelope(envelope: Mapping[str, Any]) -> bytes:
    """Packs an envelope as given, keeping field order (for test vectors)."""
    return msgpack.packb(envelope, use_bin_type=True)  # type: ignore[no-any-return]


def canonical_payload(kind: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """The payload with every field of its kind in wire order: absent optionals written as nil,
    except the 1.1 fields that are left out when they do not apply."""

    def fill(fields: tuple[_Field, ...], src: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, read, _required, default, omit in fields:
            v = src.get(name)
            if v is None and omit:
                continue
            if v is None and default is not None:
                v = default() if callable(default) else default
            if name == "outcome" and v is not None:
                v = canonical_outcome(v)
            elif name == "results" and v is not None:
                v = [fill(_RESULT, r) for r in v]
            out[name] = v
            del read
        return out

    return fill(PAYLOADS[kind], payload)


def canonical_outcome(outcome: Mapping[str, Any]) -> dict[str, Any]:
    status = outcome["status"]
    fields = {"succeeded": _SUCCEEDED, "failed": _FAILED, "handler_missing": _MISSING}[status]
    out: dict[str, Any] = {"status": status}
    for name, _read, _required, _default, omit in fields:
        v = outcome.get(name)
        if v is None and omit:
            continue
        out[name] = v
    return out


def tls_context(ca_cert: str | None) -> ssl.SSLContext | None:
    """For `amqps://` and `https://`: the system's CAs plus the PEM file `ca_cert` (a private CA),
    or None (the defaults) without one."""
    if not ca_cert:
        return None
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=ca_cert)
    return context


def worker_name() -> str:
    """`{hostname}-{pid}`, the default worker name."""
    host = os.environ.get("HOSTNAME", "").strip()
    if not host:
        try:
            with open("/proc/sys/kernel/hostname") as f:
                host = f.read().strip()
        except OSError:
            host = ""
    return f"{host or 'worker'}-{os.getpid()}"


def step_routing_key(namespace: str, queue: str) -> str:
    """Routing key of a step message on the steps exchange: `{namespace}.{queue}`."""
    return f"{namespace}.{queue}"


def amqp_user(url: str) -> str:
    """The user an AMQP URL connects as (`guest` when it names none): the `user_id` property of
    everything a worker publishes (the broker refuses any other)."""
    import urllib.parse

    user = urllib.parse.urlsplit(url).username
    return urllib.parse.unquote(user) if user else "guest"
