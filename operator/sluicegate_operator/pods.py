"""Counting live injected pods per stream from label-selected pod events (pure, no I/O)."""

from __future__ import annotations

import threading


class PodCounter:
    """Live pod uids per (namespace, stream); ``take_changes`` yields the counts that moved since."""

    def __init__(self) -> None:
        self._pods: dict[tuple[str, str], set[str]] = {}
        self._world: dict[tuple[str, str], int] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def observe(
        self, namespace: str, stream: str, uid: str, *, alive: bool, world_size: int | None = None
    ) -> None:
        key = (namespace, stream)
        with self._lock:
            pods = self._pods.setdefault(key, set())
            before = len(pods)
            if alive:
                pods.add(uid)
            else:
                pods.discard(uid)
            if len(pods) != before:
                self._dirty.add(key)
            if alive and world_size and self._world.get(key) != world_size:
                self._world[key] = world_size
                self._dirty.add(key)

    def mark_dirty(self, namespace: str, stream: str) -> None:
        with self._lock:
            self._dirty.add((namespace, stream))

    def count(self, namespace: str, stream: str) -> int:
        with self._lock:
            return len(self._pods.get((namespace, stream), ()))

    def take_changes(self) -> dict[tuple[str, str], tuple[int, int | None]]:
        """(live pods, latest world size) of every stream that changed since the last call."""
        with self._lock:
            changes = {key: (len(self._pods.get(key, ())), self._world.get(key)) for key in self._dirty}
            self._dirty.clear()
            return changes
