"""Shared helpers for the SDK's tests. The `tasker` fixture comes from the package's pytest
plugin (tasker_worker.pytest_plugin): one orchestrator process for the session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
VECTORS = ROOT / "schemas" / "test-vectors.json"


def template(name: str, steps: list[dict[str, Any]], namespace: str = "pytest") -> dict[str, Any]:
    """A template (JSON) with fast defaults: short waits and retry delays."""
    for s in steps:
        s.setdefault("queue_wait_timeout", "20s")
        s.setdefault("execution_timeout", "10s")
        s.setdefault("retry", {"max_attempts": 3, "initial_delay": "100ms", "jitter": 0.0})
    return {"namespace": namespace, "name": name, "version": 1, "steps": steps}


def step_named(task: Any, name: str) -> dict[str, Any]:
    for s in task["steps"]:
        if s["name"] == name:
            return dict(s)
    raise KeyError(name)
