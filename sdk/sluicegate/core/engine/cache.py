"""The cache tiers: blobs in memory under a byte budget, and an optional disk tier under its own."""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from sluicegate.core.engine.upstream import BlobRef, Fetched, read_verifiable

__all__ = ["DiskCache", "MemoryCache"]


class MemoryCache:
    """Blobs in memory under a byte budget. Blobs not yet served (read-ahead) are kept; of the served
    ones, the most recently served is evicted first, and a hit does not move a blob.

    A stream over a shard larger than the budget is a scan: least-recently-used eviction would throw out
    each blob just before its next epoch reaches it, and no epoch would ever hit. Evicting the newest
    served blob instead keeps the first part of the shard resident from epoch to epoch, so every epoch
    after the first serves (budget - read-ahead) / shard of its items from memory, in any order.
    Fresh blobs go least recently used first, and only when nothing served is left."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.nbytes = 0
        self.consumed_bytes = 0
        self._fresh: OrderedDict[str, bytes] = OrderedDict()  # not yet served since they arrived
        self._consumed: OrderedDict[str, bytes] = OrderedDict()

    def __contains__(self, sha: str) -> bool:
        return sha in self._fresh or sha in self._consumed

    def __len__(self) -> int:
        return len(self._fresh) + len(self._consumed)

    @property
    def fresh_bytes(self) -> int:
        return self.nbytes - self.consumed_bytes

    def get(self, sha: str) -> bytes | None:
        data = self._fresh.get(sha)
        if data is not None:
            self._fresh.move_to_end(sha)
            return data
        return self._consumed.get(sha)

    def consume(self, sha: str) -> None:
        data = self._fresh.pop(sha, None)
        if data is not None:
            self._consumed[sha] = data
            self.consumed_bytes += len(data)

    def put(self, sha: str, data: bytes) -> list[tuple[str, bytes]]:
        """Insert ``data``; returns what was evicted to make room (or ``data`` itself if it cannot fit)."""
        if sha in self:
            return []
        if len(data) > self.budget:
            return [(sha, data)]
        evicted = []
        while self.nbytes + len(data) > self.budget:
            if self._consumed:
                old, old_data = self._consumed.popitem(last=True)
                self.consumed_bytes -= len(old_data)
            else:
                old, old_data = self._fresh.popitem(last=False)
            self.nbytes -= len(old_data)
            evicted.append((old, old_data))
        self._fresh[sha] = data
        self.nbytes += len(data)
        return evicted

    def order(self) -> list[str]:
        """Eviction order, first out first (for tests and debugging)."""
        return [*self._consumed, *self._fresh]


_BLOCK = 4096


def _on_disk(size: int) -> int:
    """What a file of ``size`` bytes takes on disk (whole blocks): what an emptyDir's sizeLimit counts."""
    return -(-size // _BLOCK) * _BLOCK


class DiskCache:
    """Blobs as files ``<dir>/<sha256>`` under a byte budget (LRU) counted in disk blocks, so a volume
    sized to the budget never fills; re-verified on every read (natively, as the store's blobs are).

    Blocking; the engine calls it from worker threads. Files left by an earlier run are adopted, and the
    temporary files of writes it did not finish (a crash) are removed.
    """

    def __init__(self, root: Path, budget: int) -> None:
        self.root = root
        self.budget = budget
        self.nbytes = 0
        self._index: OrderedDict[str, int] | None = None
        self._lock = threading.Lock()

    def _entries(self) -> OrderedDict[str, int]:
        if self._index is None:
            self.root.mkdir(parents=True, exist_ok=True)
            found = []
            for entry in os.scandir(self.root):
                if entry.name.startswith("."):  # a temporary file: its write never finished
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)
                elif len(entry.name) == 64 and entry.is_file():
                    stat = entry.stat()
                    found.append((stat.st_mtime, entry.name, _on_disk(stat.st_size)))
            found.sort()
            self._index = OrderedDict((name, size) for _, name, size in found)
            self.nbytes = sum(self._index.values())
        return self._index

    def put(self, sha: str, data: bytes) -> int:
        """Store ``data``; returns how many files were evicted."""
        size = _on_disk(len(data))
        if size > self.budget:
            return 0
        with self._lock:
            entries = self._entries()
            if sha in entries:
                return 0
            victims = []
            while entries and self.nbytes + size > self.budget:
                old, old_size = entries.popitem(last=False)
                self.nbytes -= old_size
                victims.append(old)
            entries[sha] = size
            self.nbytes += size
        for old in victims:
            (self.root / old).unlink(missing_ok=True)
        tmp = self.root / f".{sha}.{os.getpid()}.{threading.get_ident()}"
        tmp.write_bytes(data)
        tmp.replace(self.root / sha)  # atomic: a reader never sees half a file under the final name
        return len(victims)

    def get_many(self, refs: Sequence[BlobRef]) -> list[bytes | None]:
        """Each blob, if held and intact (its digest is what its ref checks), read in one batch; a file that
        fails its check (a torn write, bit rot) is dropped, so the caller fetches it again."""
        with self._lock:
            entries = self._entries()
            held = [ref for ref in refs if ref.sha in entries]
            for ref in held:
                entries.move_to_end(ref.sha)
        read = read_verifiable([f"{self.root}/{ref.sha}" for ref in held], held)
        found = {ref.sha: got for ref, got in zip(held, read, strict=True)}
        out: list[bytes | None] = []
        for ref in refs:
            got = found.get(ref.sha)
            if isinstance(got, Fetched) and got.digest == ref.check:
                out.append(got.data)
                continue
            if got is not None:
                self._drop(ref.sha)
            out.append(None)
        return out

    def put_many(self, blobs: Sequence[tuple[str, bytes]]) -> int:
        """:meth:`put` for a batch; returns how many files were evicted."""
        return sum(self.put(sha, data) for sha, data in blobs)

    def _drop(self, sha: str) -> None:
        with self._lock:
            size = self._entries().pop(sha, None)
            if size is not None:
                self.nbytes -= size
        (self.root / sha).unlink(missing_ok=True)
