"""Single flight: one task per key in flight, whose result every caller for that key shares.

A task may serve several keys at once (one broker request brings the URLs of a window of blobs). The
engine's blob flights carry byte budgets as well and keep their own table (see ``engine.core``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import Generic, TypeVar

__all__ = ["Flights"]

K = TypeVar("K")
T = TypeVar("T")


class Flights(Generic[K, T]):
    """The tasks in flight, by key; a key leaves the table when its task ends, however it ends."""

    def __init__(self) -> None:
        self._tasks: dict[K, asyncio.Future[T]] = {}

    def get(self, key: K) -> asyncio.Future[T] | None:
        return self._tasks.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._tasks

    def start(self, keys: Iterable[K], work: Awaitable[T]) -> asyncio.Future[T]:
        """Run ``work`` for ``keys`` (callers of :meth:`get` for any of them now share it)."""
        task = asyncio.ensure_future(work)
        held = list(keys)
        for key in held:
            self._tasks[key] = task

        def landed(_: asyncio.Future[T]) -> None:
            for key in held:
                if self._tasks.get(key) is task:
                    del self._tasks[key]

        task.add_done_callback(landed)
        return task
