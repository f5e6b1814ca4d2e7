"""The contract's test vectors (schemas/test-vectors.json) and the wire helpers."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from _helpers import VECTORS

from tasker_worker import wire

DATA: dict[str, Any] = json.loads(VECTORS.read_text())


@pytest.mark.parametrize("vector", DATA["valid"], ids=lambda v: v["name"])
def test_valid_vectors_decode_to_their_meaning(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["hex"])
    envelope = wire.decode(data, vector["kind"])
    assert envelope.as_dict() == vector.get("decoded", vector["message"])
    # Packing the message as given (order kept) gives exactly the bytes.
    assert wire.encode_envelope(vector["message"]) == data


@pytest.mark.parametrize(
    "vector", [v for v in DATA["valid"] if v["canonical"]], ids=lambda v: v["name"]
)
def test_canonical_vectors_are_written_byte_for_byte(vector: dict[str, Any]) -> None:
    envelope = wire.decode(bytes.fromhex(vector["hex"]), vector["kind"])
    payload = wire.canonical_payload(envelope.kind, envelope.payload)
    written = wire.encode(envelope.kind, payload, envelope.message_id)
    assert written.hex() == vector["hex"]


@pytest.mark.parametrize("vector", DATA["invalid"], ids=lambda v: v["name"])
def test_invalid_vectors_are_refused_with_their_class(vector: dict[str, Any]) -> None:
    with pytest.raises(wire.DecodeError) as refused:
        wire.decode(bytes.fromhex(vector["hex"]), vector["decode_as"])
    assert refused.value.error_class == vector["error"], str(refused.value)
    assert str(refused.value)


def test_refusal_reasons_read_like_the_rust_crate() -> None:
    cancel = bytes.fromhex(next(v for v in DATA["valid"] if v["name"] == "cancel")["hex"])
    with pytest.raises(wire.DecodeError, match=r'unexpected message kind "cancel", expected step'):
        wire.decode(cancel, "step")
    with pytest.raises(wire.DecodeError, match="1 trailing bytes after the message"):
        wire.decode(cancel + b"\xc0", "cancel")
    with pytest.raises(wire.DecodeError, match="must be a MessagePack map"):
        wire.decode(b"hello", "cancel")


def test_uuid7_is_time_ordered_and_canonical() -> None:
    ids = [wire.uuid7() for _ in range(1000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    for i in ids[:10]:
        u = uuid.UUID(i)
        assert u.version == 7 and str(u) == i and len(i) == 36


def test_output_checks_follow_the_data_rules() -> None:
    assert wire.check_output("output", {"a": [1, 2.5, None, True]}, 1000) is None
    assert "over the limit of 10 bytes" in (wire.check_output("output", "x" * 20, 10) or "")
    assert "NUL" in (wire.check_output("output", {"k": "a\0b"}, 1000) or "")
    deep: Any = 1
    for _ in range(101):
        deep = [deep]
    assert "more than 100 levels deep" in (wire.check_output("output", deep, 10**6) or "")
    assert wire.json_problem({1: "a"}) is not None
    assert wire.json_problem(b"x") is not None
    assert "not JSON" in (wire.check_output("output", float("nan"), 1000) or "")


def test_names_follow_the_prefix() -> None:
    n = wire.Names("p1")
    assert n.step_queue("shop", "payments") == "p1.step.shop.payments"
    assert wire.step_routing_key("shop", "payments") == "shop.payments"
    assert n.results_exchange == "p1.results"
    assert n.dead_letter_exchange == "p1.dlx"
    assert n.cancel_exchange == "p1.cancel"
