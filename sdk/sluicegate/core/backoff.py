"""The one retry policy: exponential backoff with full jitter, and a deadline for retrying at all.

Every retry loop (the engine's upstream fetches, the SDK's requests to its sidecar, the sidecar's plan
and broker requests) waits :func:`delay` between tries, so concurrent clients spread out instead of
hammering a store, a sidecar or the broker in step.
"""

from __future__ import annotations

import random
import time

__all__ = ["Deadline", "delay"]


def delay(attempt: int, *, first_s: float, max_s: float) -> float:
    """Seconds to wait before try ``attempt + 1`` (``attempt`` counts from 0): uniform in
    ``[0, min(max_s, first_s * 2**attempt)]``."""
    return random.uniform(0, min(max_s, first_s * 2 ** min(attempt, 62)))


class Deadline:
    """When retrying stops: ``timeout_s`` after the first failure."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._at: float | None = None

    def passed(self) -> bool:
        now = time.monotonic()
        if self._at is None:
            self._at = now + self.timeout_s
        return now >= self._at
