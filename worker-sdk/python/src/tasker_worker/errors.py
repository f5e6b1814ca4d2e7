"""What a handler raises to fail an attempt, and what a decision step returns."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class StepError(Exception):
    """Base of the errors a handler raises on purpose. Any other exception counts as a
    retryable failure too (`handler raised ValueError: ...`)."""

    retryable: bool = True

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def outcome(self) -> dict[str, Any]:
        return {
            "status": "failed",
            "message": self.message,
            "retryable": self.retryable,
            "retry_after_ms": None,
        }


class Retryable(StepError):
    """A failure worth another attempt (if the template's `max_attempts` allows).

    `retry_after` (seconds) replaces the template's backoff delay for the next attempt, as given
    (no jitter, no `max_delay` cap)."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        if retry_after is not None and retry_after < 0:
            raise ValueError("retry_after must not be negative")
        self.retry_after = retry_after

    def outcome(self) -> dict[str, Any]:
        out = super().outcome()
        if self.retry_after is not None:
            out["retry_after_ms"] = round(self.retry_after * 1000)
        return out


class Permanent(StepError):
    """A failure that no retry can fix: the step fails now, whatever attempts are left."""

    retryable = False


class Decision:
    """What the handler of a decision step (`decides: [a, b]` in its template) returns: the
    branches that run (the others are skipped) and the step's output.

    >>> Decision.choose(["express"], output={"carrier": "dhl"})
    >>> Decision.none()
    """

    __slots__ = ("branches", "output")

    def __init__(self, branches: Iterable[str], output: Any = None) -> None:
        if isinstance(branches, str):
            raise TypeError("branches must be a list of step names, not a string")
        self.branches: list[str] = list(branches)
        self.output = output

    @classmethod
    def choose(cls, branches: Iterable[str], *, output: Any = None) -> Decision:
        """Runs `branches` (names from the step's `decides`) and skips its other branches."""
        return cls(branches, output)

    @classmethod
    def none(cls, *, output: Any = None) -> Decision:
        """Chooses no branch: every branch of the step is skipped."""
        return cls([], output)

    def __repr__(self) -> str:
        return f"Decision(branches={self.branches!r}, output={self.output!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Decision)
            and self.branches == other.branches
            and self.output == other.output
        )

    __hash__ = None  # type: ignore[assignment]
