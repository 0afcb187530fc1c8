"""The data path shared by embedded mode and the sidecar: fetch, verify, cache and prefetch blobs.

An :class:`Engine` lives on one asyncio loop (the sidecar's, or a private :class:`LoopThread` in embedded
mode) and touches its state only from that loop, so it needs no locks. What it guarantees:

* **one upstream fetch per blob** however many requests wait for it (single flight);
* **retries** of transient upstream faults with exponential backoff and full jitter, counted;
* **verification**: every blob is checked against its sha256 before it is served; a mismatch is refetched
  once, then raises :class:`IntegrityError` naming the item, and the bytes are never delivered;
* **a byte budget**: the memory tier never holds more than ``memory_bytes``; what the consumer has
  already been served is evicted first; evicted blobs spill to an optional disk tier with its own budget;
* **read-ahead**: callers announce what they will ask for next (:meth:`Engine.readahead`) and the engine
  fetches it in the background while the announced-but-unserved bytes fit the budget.

The upstream is pluggable (:class:`StoreUpstream` reads the dataset store, :class:`UrlUpstream` GETs
presigned URLs such as a broker hands out), and so is the plan: a :class:`Plan` is just manifest rows in
shard order, whether a local query or a broker response produced them.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import logging
import os
import random
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._exceptions import IntegrityError, NotFoundError, StoreError
from ._manifest import info_from_metadata, query_fields
from ._partition import Positions
from ._query import Query, select_rows
from ._store import S3Options, Store, _version_key, blob_key

__all__ = [
    "BlobRef",
    "Digested",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "LoopThread",
    "Manifest",
    "Plan",
    "StoreUpstream",
    "Upstream",
    "UrlRefused",
    "UrlUpstream",
    "close_on_collect",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

_HASH_INLINE_BYTES = (
    256 * 1024
)  # smaller blobs hash on the loop; bigger ones in a thread (hashlib drops the GIL)
_FILE_THREADS = 2  # worker threads a burst of local reads is split over (the machines here have 2 cores)
# Local reads in flight at once, at least: they are queued for _FILE_THREADS threads, not open connections,
# and a bigger burst means fewer thread hops per blob (the configured limit is meant for remote stores).
_LOCAL_IN_FLIGHT = 128
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class BlobRef:
    """What the engine needs to fetch one item's bytes; ``item_id`` names the item in errors."""

    sha: str
    size: int
    item_id: str
    url: str | None = None


class EngineConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    memory_bytes: int = Field(default=512 * 2**20, ge=0, description="memory tier budget")
    disk_dir: Path | None = Field(default=None, description="directory of the disk tier (None: no disk tier)")
    disk_bytes: int = Field(default=8 * 2**30, ge=0, description="disk tier budget")
    concurrency: int = Field(default=16, ge=1, description="upstream fetches in flight at once")
    attempts: int = Field(default=5, ge=1, description="tries per blob for transient upstream faults")
    backoff_s: float = Field(default=0.05, gt=0, description="first retry's backoff ceiling")
    max_backoff_s: float = Field(default=2.0, gt=0)
    timeout_s: float = Field(default=30.0, gt=0, description="limit on one upstream fetch")


@dataclass
class Histogram:
    """Cumulative-bucket histogram (Prometheus semantics) without a dependency on prometheus-client."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass
class EngineStats:
    """Counters the sidecar exports as Prometheus metrics (and tests read directly)."""

    items_served: int = 0
    bytes_served: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    disk_hits: int = 0
    evictions: int = 0
    upstream_fetches: int = 0
    upstream_bytes: int = 0
    upstream_errors: int = 0
    retries: int = 0
    integrity_failures: int = 0
    prefetched: int = 0
    wait_seconds: float = 0.0
    upstream_latency: Histogram = field(default_factory=Histogram)


# -- upstreams ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Digested:
    """Fetched bytes with their sha256 already computed (where it was cheaper to hash: a worker thread).

    The engine still compares the digest with the expected hash; it only skips computing it again.
    """

    data: bytes
    sha256: str


class Upstream(Protocol):
    """Where blobs come from. ``fetch`` returns the bytes unverified; the engine verifies and retries."""

    async def fetch(self, ref: BlobRef) -> bytes | Digested: ...

    async def aclose(self) -> None: ...


class _Permanent(StoreError):
    """An upstream refusal that retrying will not change (e.g. HTTP 403 on an expired URL)."""


class UrlRefused(_Permanent):
    """The server refused a (presigned) URL; ``status`` tells a caller that can get a fresh URL (403:
    expired or bad signature) from one that cannot."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


_IMPORT_PID = os.getpid()
_URL_LIFETIME = timedelta(minutes=15)


def forked() -> bool:
    """True in a process forked after sluicegate (and so obstore) was imported, e.g. a DataLoader worker.

    obstore's tokio runtime does not survive ``fork()``: its threads are gone and calls that need I/O hang.
    """
    return os.getpid() != _IMPORT_PID


def engine_store(uri: str | os.PathLike[str], s3: S3Options | None) -> Store:
    """A Store for the engine: the object-store client's own retries off, because the engine retries
    transient faults itself (with jitter, and counted in its metrics)."""
    return Store(uri, dataclasses.replace(s3 or S3Options(), max_retries=0))


class StoreUpstream:
    """Reads ``blobs/<sha256>`` from the dataset store.

    Local stores are read with plain file reads (fast, and safe after fork). Object stores go through
    obstore, except in a forked process, where blobs are fetched by httpx from URLs presigned on the spot
    (signing with static credentials is computation, which still works there).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._urls: UrlUpstream | None = None
        root = store.local_root
        self._files = None if root is None else _FileReader(root)

    async def fetch(self, ref: BlobRef) -> bytes | Digested:
        if self._files is not None:
            return await self._files.read(ref)
        if not forked():
            return await self.store.get_blob_async(ref.sha)
        if self._urls is None:
            self._urls = UrlUpstream()
        url = self.store.presign(blob_key(ref.sha), _URL_LIFETIME)
        return await self._urls.fetch(BlobRef(ref.sha, ref.size, ref.item_id, url))

    @property
    def local(self) -> bool:
        """Whether blobs are files read here (see :class:`_FileReader`) rather than remote objects."""
        return self._files is not None

    async def aclose(self) -> None:
        if self._urls is not None:
            await self._urls.aclose()


_ReadResult = tuple["asyncio.Future[Digested]", Digested | BaseException]


class _FileReader:
    """Reads and hashes local blobs in worker threads, many per thread hop.

    One ``to_thread`` per 100 KB blob costs about as much as reading it; here the reads requested in one
    loop iteration (a batch, a read-ahead burst) are split over :data:`_FILE_THREADS` threads, each of
    which reads and hashes its share and hands the results back in one callback. hashlib drops the GIL
    while hashing, so the threads hash in parallel and the loop stays free to serve.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._queue: list[tuple[BlobRef, asyncio.Future[Digested]]] = []

    async def read(self, ref: BlobRef) -> Digested:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Digested] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._flush, loop)  # after the other reads requested in this iteration
        self._queue.append((ref, future))
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._queue = self._queue, []
        for share in (batch[i::_FILE_THREADS] for i in range(_FILE_THREADS)):
            if share:
                loop.run_in_executor(None, self._read_share, loop, share)

    def _read_share(
        self, loop: asyncio.AbstractEventLoop, share: list[tuple[BlobRef, asyncio.Future[Digested]]]
    ) -> None:
        results: list[_ReadResult] = []
        for ref, future in share:
            try:
                data = _read_file(self.root / blob_key(ref.sha), ref)
                results.append((future, Digested(data, hashlib.sha256(data).hexdigest())))
            except Exception as exc:  # delivered to the one waiter it belongs to
                results.append((future, exc))
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting
            loop.call_soon_threadsafe(_settle, results)


def _settle(results: list[_ReadResult]) -> None:
    for future, outcome in results:
        if future.done():  # its waiter was cancelled
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


def _read_file(path: Path, ref: BlobRef) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise NotFoundError(f"blob {ref.sha} of item {ref.item_id!r} is missing ({path})") from exc
    except OSError as exc:
        raise StoreError(f"cannot read blob {ref.sha} of item {ref.item_id!r}: {exc}") from exc


def read_manifest(store: Store, version: int) -> Manifest:
    """A version's manifest, fetched but not decoded; works in a forked process too (see :func:`forked`)."""
    key = _version_key(version)
    where = f"{store.uri}/{key}"
    root = store.local_root
    if root is not None:
        return Manifest(_read_file(root / key, BlobRef(key, 0, f"manifest of version {version}")), where)
    # A presigned GET: the same code with or without a usable obstore runtime.
    response = httpx.get(store.presign(key, _URL_LIFETIME), timeout=120, trust_env=False)
    if response.status_code == 404:
        raise NotFoundError(f"{store.uri} has no version {version}")
    if response.status_code != 200:
        raise StoreError(f"cannot read {where}: HTTP {response.status_code}")
    return Manifest(response.content, where)


class UrlUpstream:
    """GETs each blob from its own (presigned) URL, as the broker hands them out."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self._timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None  # created on the loop that uses it

    async def fetch(self, ref: BlobRef) -> bytes:
        if ref.url is None:
            raise _Permanent(
                f"item {ref.item_id!r} has no URL in the plan; the broker must send one per blob"
            )
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout_s, trust_env=False)
        try:
            response = await self._client.get(ref.url)
        except httpx.HTTPError as exc:
            raise StoreError(f"cannot GET blob {ref.sha}: {exc!r}") from exc
        if response.status_code == 404:
            raise NotFoundError(f"blob {ref.sha} of item {ref.item_id!r} is missing upstream (HTTP 404)")
        if response.status_code >= 500 or response.status_code in (408, 429):
            raise StoreError(f"upstream answered HTTP {response.status_code} for blob {ref.sha}")
        if response.status_code != 200:
            raise UrlRefused(
                f"upstream refused blob {ref.sha} of item {ref.item_id!r}: HTTP {response.status_code} "
                f"{response.text[:200]}",
                response.status_code,
            )
        return response.content

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, NotFoundError | IntegrityError | _Permanent):
        return False
    return isinstance(exc, StoreError | TimeoutError | OSError)


# -- the plan ----------------------------------------------------------------------------------------


class Manifest:
    """A manifest decoded on demand: a column when a query or a batch needs it, full rows one Parquet row
    group at a time when an item's annotations are asked for.

    Decoding a realistic million-item manifest whole takes seconds (annotations, a hash per item); the
    first item needs three columns. Built from Parquet bytes, or from a table already in memory.
    """

    def __init__(self, source: pa.Table | bytes, where: str = "manifest") -> None:
        self._lock = threading.Lock()
        self._columns: dict[str, pa.Array] = {}
        self._groups: dict[int, pa.Table] = {}
        if isinstance(source, pa.Table):
            self._file = None
            self._table: pa.Table | None = source
            self.schema = source.schema
            sizes = [b.num_rows for b in source.to_batches()]
        else:
            try:
                self._file = pq.ParquetFile(pa.BufferReader(source))
            except (pa.ArrowInvalid, OSError) as exc:
                raise StoreError(f"{where} is not a readable Parquet manifest: {exc}") from exc
            try:
                info_from_metadata(self._file.schema_arrow.metadata, where)
            except ValidationError as exc:
                raise StoreError(f"{where} has malformed version info in its footer: {exc}") from exc
            self._table = None
            self.schema = self._file.schema_arrow.remove_metadata()
            sizes = [self._file.metadata.row_group(g).num_rows for g in range(self._file.num_row_groups)]
        self._offsets = np.cumsum([0, *sizes])
        self.num_rows = int(self._offsets[-1])

    def __len__(self) -> int:
        return self.num_rows

    def column(self, name: str) -> pa.Array:
        """One column, decoded once and kept contiguous (take() on chunks concatenates them every call)."""
        return self.columns([name])[0]

    def columns(self, names: Sequence[str]) -> list[pa.Array]:
        """Several columns; those not decoded yet are read in one pass (decoded in parallel)."""
        with self._lock:
            missing = [n for n in names if n not in self._columns]
            if missing:
                source = self._table if self._table is not None else self._read(columns=missing)
                for name in missing:
                    self._columns[name] = source.column(name).combine_chunks()
            return [self._columns[n] for n in names]

    def query_table(self, queries: Sequence[str]) -> pa.Table:
        """A table :func:`select_rows` can evaluate ``queries`` on: just the columns they name.

        Naming a field the manifest lacks raises :class:`QueryError` here, resolved against every field.
        """
        fields = query_fields(self.schema)
        needed = sorted({column for q in queries for column in Query.parse(q).columns(fields)})
        return pa.table(self.columns(needed), schema=pa.schema([self.schema.field(n) for n in needed]))

    def rows(self, positions: Positions) -> list[dict[str, Any]]:
        """Full rows at ``positions`` (plain dicts, as the wire carries them)."""
        group_of = np.searchsorted(self._offsets, positions, side="right") - 1
        out: list[dict[str, Any]] = [{}] * len(positions)
        for g in np.unique(group_of).tolist():
            where = np.flatnonzero(group_of == g)
            part = self._group(g).take(pa.array(positions[where] - self._offsets[g])).to_pylist()
            for i, row in zip(where.tolist(), part, strict=True):
                out[i] = row
        return out

    def _group(self, g: int) -> pa.Table:
        with self._lock:
            if g not in self._groups:
                if self._table is not None:
                    start, stop = int(self._offsets[g]), int(self._offsets[g + 1])
                    self._groups[g] = self._table.slice(start, stop - start).combine_chunks()
                else:
                    assert self._file is not None
                    self._groups[g] = self._file.read_row_group(g).replace_schema_metadata(None)
            return self._groups[g]

    def _read(self, columns: list[str]) -> pa.Table:
        assert self._file is not None
        return self._file.read(columns=columns)


class Plan:
    """The items one consumer may read, in shard order: positions ``index`` into a :class:`Manifest` (all of
    it when ``index`` is None), plus blob URLs when the upstream is presigned GETs.

    Comes from a local query over the store's manifest or from a broker's response. Stays Arrow: nothing
    per item is built up front, so a million-item plan is ready at once.
    """

    def __init__(
        self,
        version: int,
        manifest: Manifest | pa.Table,
        index: Positions | None = None,
        urls: Mapping[str, str] | None = None,
    ) -> None:
        self.version = version
        self.manifest = manifest if isinstance(manifest, Manifest) else Manifest(manifest)
        self.index = index
        self.urls = urls
        self._ids: dict[str, int] | None = None

    def __len__(self) -> int:
        return self.manifest.num_rows if self.index is None else len(self.index)

    def _at(self, positions: Positions | Sequence[int]) -> Positions:
        pos = np.asarray(positions, dtype=np.int64)
        return pos if self.index is None else self.index[pos]

    def refs(self, positions: Positions | Sequence[int]) -> list[BlobRef]:
        idx = pa.array(self._at(positions))
        shas, sizes, ids = (c.take(idx).to_pylist() for c in self.manifest.columns(["blob", "size", "id"]))
        if self.urls is None:
            return [BlobRef(s, n, i) for s, n, i in zip(shas, sizes, ids, strict=True)]
        urls = self.urls
        return [BlobRef(s, n, i, urls.get(s)) for s, n, i in zip(shas, sizes, ids, strict=True)]

    def rows(self, positions: Positions | Sequence[int]) -> list[dict[str, Any]]:
        """Full manifest rows (plain dicts, as the wire carries them)."""
        return self.manifest.rows(self._at(positions))

    def select(self, queries: Sequence[str]) -> Positions:
        """Plan positions (ascending) of the items that match every query."""
        table = self.manifest.query_table(queries)
        if self.index is not None:
            table = table.take(pa.array(self.index))
        return np.asarray(select_rows(table, list(queries)), dtype=np.int64)

    def position_of(self, item_id: str) -> int | None:
        """The position of ``item_id`` in the plan (an index built on first use)."""
        if self._ids is None:
            ids = self.manifest.column("id")
            if self.index is not None:
                ids = ids.take(pa.array(self.index))
            self._ids = {v: i for i, v in enumerate(ids.to_pylist())}
        return self._ids.get(item_id)


# -- cache tiers -------------------------------------------------------------------------------------


class MemoryCache:
    """Blobs in memory under a byte budget; consumed blobs are evicted first, then least recently used."""

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
        data = self._consumed.get(sha)
        if data is not None:
            self._consumed.move_to_end(sha)
        return data

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
                old, old_data = self._consumed.popitem(last=False)
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


class DiskCache:
    """Blobs as files ``<dir>/<sha256>`` under a byte budget (LRU); re-verified on every read.

    Blocking; the engine calls it from worker threads. Files left by an earlier run are adopted.
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
            found = sorted(
                (p.stat().st_mtime, p.name, p.stat().st_size)
                for p in self.root.iterdir()
                if p.is_file() and len(p.name) == 64
            )
            self._index = OrderedDict((name, size) for _, name, size in found)
            self.nbytes = sum(self._index.values())
        return self._index

    def get(self, sha: str) -> bytes | None:
        with self._lock:
            if sha not in self._entries():
                return None
            self._entries().move_to_end(sha)
        try:
            data = (self.root / sha).read_bytes()
        except OSError:
            data = b""
        if hashlib.sha256(data).hexdigest() != sha:
            self._drop(sha)  # torn write or bit rot: the caller fetches it again
            return None
        return data

    def put(self, sha: str, data: bytes) -> int:
        """Store ``data``; returns how many files were evicted."""
        if len(data) > self.budget:
            return 0
        with self._lock:
            entries = self._entries()
            if sha in entries:
                return 0
            victims = []
            while entries and self.nbytes + len(data) > self.budget:
                old, size = entries.popitem(last=False)
                self.nbytes -= size
                victims.append(old)
            entries[sha] = len(data)
            self.nbytes += len(data)
        for old in victims:
            (self.root / old).unlink(missing_ok=True)
        tmp = self.root / f".{sha}.{os.getpid()}.{threading.get_ident()}"
        tmp.write_bytes(data)
        tmp.replace(self.root / sha)  # atomic: a reader never sees half a file under the final name
        return len(victims)

    def _drop(self, sha: str) -> None:
        with self._lock:
            size = self._entries().pop(sha, None)
            if size is not None:
                self.nbytes -= size
        (self.root / sha).unlink(missing_ok=True)


# -- the engine --------------------------------------------------------------------------------------


class Engine:
    """Fetch/verify/cache/prefetch on one asyncio loop. Construction is cheap; tasks start on first use."""

    def __init__(self, upstream: Upstream, config: EngineConfig | None = None) -> None:
        self.upstream = upstream
        self.config = config or EngineConfig()
        self.stats = EngineStats()
        self.memory = MemoryCache(self.config.memory_bytes)
        self.disk = DiskCache(self.config.disk_dir, self.config.disk_bytes) if self.config.disk_dir else None
        local = isinstance(upstream, StoreUpstream) and upstream.local
        self._max_inflight = (
            max(self.config.concurrency, _LOCAL_IN_FLIGHT) if local else self.config.concurrency
        )
        self._inflight: dict[str, asyncio.Task[bytes]] = {}
        self._inflight_bytes = 0
        self._hints: dict[str, deque[BlobRef]] = {}
        self._prefetcher: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._room: asyncio.Event | None = None
        self._upstream_slots: asyncio.Semaphore | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._closed = False

    # -- serving -------------------------------------------------------------------------------

    async def get(self, ref: BlobRef) -> bytes:
        """The verified bytes of one blob (from cache, or fetched once however many callers wait)."""
        return (await self.get_many([ref]))[0]

    async def get_many(self, refs: Sequence[BlobRef]) -> list[bytes]:
        """Verified bytes of many blobs, fetched concurrently; the served blobs become evictable first."""
        started = time.perf_counter()
        out: list[bytes | None] = [self.memory.get(ref.sha) for ref in refs]
        missing = [i for i, data in enumerate(out) if data is None]
        self.stats.cache_hits += len(refs) - len(missing)
        self.stats.cache_misses += len(missing)
        if missing:
            results = await asyncio.gather(*(self._join(refs[i]) for i in missing))
            for i, data in zip(missing, results, strict=True):
                out[i] = data
            self.stats.wait_seconds += time.perf_counter() - started
        served = [d for d in out if d is not None]
        for ref in refs:
            self.memory.consume(ref.sha)
        self.stats.items_served += len(served)
        self.stats.bytes_served += sum(len(d) for d in served)
        if self._room is not None:
            self._room.set()
        return served

    def _join(self, ref: BlobRef) -> asyncio.Future[bytes]:
        task = self._inflight.get(ref.sha)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(ref))
            self._inflight[ref.sha] = task
            self._inflight_bytes += ref.size

            def done(_: asyncio.Task[bytes], sha: str = ref.sha, size: int = ref.size) -> None:
                self._inflight.pop(sha, None)
                self._inflight_bytes -= size

            task.add_done_callback(done)
        # A cancelled waiter (client went away) must not cancel the fetch other waiters share.
        return asyncio.shield(task)

    async def _load(self, ref: BlobRef) -> bytes:
        if self.disk is not None:
            data = await asyncio.to_thread(self.disk.get, ref.sha)
            if data is not None:
                self.stats.disk_hits += 1
                self._remember(ref.sha, data)
                return data
        data = await self._fetch_verified(ref)
        self._remember(ref.sha, data)
        return data

    def _remember(self, sha: str, data: bytes) -> None:
        evicted = self.memory.put(sha, data)
        self.stats.evictions += sum(1 for old, _ in evicted if old != sha)
        if self.disk is not None and evicted:
            self._spawn(self._spill(evicted))

    async def _spill(self, blobs: list[tuple[str, bytes]]) -> None:
        assert self.disk is not None
        for sha, data in blobs:
            self.stats.evictions += await asyncio.to_thread(self.disk.put, sha, data)

    # -- upstream ------------------------------------------------------------------------------

    async def _fetch_verified(self, ref: BlobRef) -> bytes:
        got = ""
        for _ in range(2):
            fetched = await self._fetch_retrying(ref)
            if isinstance(fetched, Digested):
                data, got = fetched.data, fetched.sha256
            else:
                data, got = fetched, await _sha256(fetched)
            if got == ref.sha:
                return data
            self.stats.integrity_failures += 1
            log.warning("item %r: blob %s hashed to %s; fetching it again", ref.item_id, ref.sha, got)
        raise IntegrityError(
            f"item {ref.item_id!r}: blob {ref.sha} is corrupt upstream (fetched twice, its bytes hash to "
            f"{got}); it was not delivered. Repair the store (re-import the item) or exclude it with a query"
        )

    async def _fetch_retrying(self, ref: BlobRef) -> bytes | Digested:
        if self._upstream_slots is None:
            self._upstream_slots = asyncio.Semaphore(self._max_inflight)
        cfg = self.config
        for attempt in range(cfg.attempts):
            started = time.perf_counter()
            try:
                async with self._upstream_slots, asyncio.timeout(cfg.timeout_s):
                    fetched = await self.upstream.fetch(ref)
            except Exception as exc:
                self.stats.upstream_errors += 1
                if not _transient(exc):
                    raise
                if attempt + 1 == cfg.attempts:
                    raise StoreError(
                        f"item {ref.item_id!r}: blob {ref.sha} could not be fetched after {cfg.attempts} "
                        f"attempts; last error: {exc}"
                    ) from exc
                self.stats.retries += 1
                # Full jitter: concurrent retries spread out instead of hammering the store in step.
                await asyncio.sleep(random.uniform(0, min(cfg.max_backoff_s, cfg.backoff_s * 2**attempt)))
                continue
            self.stats.upstream_latency.observe(time.perf_counter() - started)
            self.stats.upstream_fetches += 1
            self.stats.upstream_bytes += len(fetched.data if isinstance(fetched, Digested) else fetched)
            return fetched
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    # -- read-ahead ----------------------------------------------------------------------------

    def readahead(self, key: str, refs: Sequence[BlobRef]) -> None:
        """Announce that consumer ``key`` will ask for ``refs`` next, in order (replaces its last hint)."""
        if self._closed:
            return
        if refs:
            self._hints[key] = deque(refs)
        else:
            self._hints.pop(key, None)
        if self._prefetcher is None:
            self._wake, self._room = asyncio.Event(), asyncio.Event()
            self._prefetcher = asyncio.get_running_loop().create_task(self._prefetch_loop())
        assert self._wake is not None
        self._wake.set()

    def _next_hint(self) -> BlobRef | None:
        """The next announced blob that is neither cached nor on its way, round-robin over consumers."""
        for key in list(self._hints):
            queue = self._hints[key]
            while queue and (queue[0].sha in self.memory or queue[0].sha in self._inflight):
                queue.popleft()
            if not queue:
                del self._hints[key]
                continue
            # Rotate so the next call serves another consumer first.
            self._hints[key] = self._hints.pop(key)
            return queue[0]
        return None

    def _has_room(self, size: int) -> bool:
        pending = self.memory.fresh_bytes + self._inflight_bytes
        return pending == 0 or pending + size <= self.memory.budget

    async def _prefetch_loop(self) -> None:
        assert self._wake is not None
        assert self._room is not None
        while not self._closed:
            ref = self._next_hint()
            if ref is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            if not self._has_room(ref.size) or len(self._inflight) >= self._max_inflight:
                # Wait for the consumer to take something (or a fetch to land) before reading further.
                self._room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._room.wait(), timeout=0.05)
                continue
            self._hints[next(k for k, q in self._hints.items() if q and q[0] is ref)].popleft()
            self.stats.prefetched += 1
            # Joined here, not in the task, so the fetch counts as in flight before the next room check.
            self._spawn(self._prefetch_one(ref, self._join(ref)))

    async def _prefetch_one(self, ref: BlobRef, fetch: asyncio.Future[bytes]) -> None:
        try:
            await fetch
        except Exception as exc:  # the consumer's own request will retry and report it
            log.debug("prefetch of item %r failed: %s", ref.item_id, exc)
        finally:
            if self._room is not None:
                self._room.set()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def aclose(self) -> None:
        """Stop prefetching, let spills finish, close the upstream."""
        self._closed = True
        self._hints.clear()
        if self._prefetcher is not None:
            self._prefetcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prefetcher
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.upstream.aclose()


async def _sha256(data: bytes) -> str:
    if len(data) < _HASH_INLINE_BYTES:
        return hashlib.sha256(data).hexdigest()
    return await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())


Finalizer = Callable[[], Coroutine[Any, Any, None]]
_RUNNING: dict[int, tuple[asyncio.AbstractEventLoop, threading.Thread]] = {}


class LoopThread:
    """An asyncio loop on a daemon thread, for synchronous callers (embedded mode, the HTTP client).

    Started on first use. A forked child (DataLoader worker) does not inherit threads, so it starts its
    own loop instead of waiting forever on the parent's. :meth:`close` (also called when the owner is
    garbage collected, see :func:`close_on_collect`) runs a final coroutine, cancels what is left and
    ends the thread.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._lock = threading.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name=self._name, daemon=True)
                thread.start()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
                _RUNNING[id(loop)] = (loop, thread)
            return self._loop

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.submit(coro).result()

    def close(self, final: Finalizer | None = None, wait: bool = True) -> None:
        """Run ``final()`` on the loop, cancel the remaining tasks and stop the thread."""
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None or self._pid != os.getpid():
            return
        _RUNNING.pop(id(loop), None)
        _stop(loop, thread, final, wait=wait and threading.current_thread() is not thread)


def close_on_collect(owner: object, loop: LoopThread, final: Finalizer | None = None) -> None:
    """Close ``loop`` when ``owner`` is garbage collected, so a dropped dataset leaves no thread behind."""
    weakref.finalize(owner, loop.close, final, False)


def _stop(
    loop: asyncio.AbstractEventLoop, thread: threading.Thread, final: Finalizer | None, wait: bool
) -> None:
    async def finish() -> None:
        if final is not None:
            with contextlib.suppress(Exception):
                await final()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await loop.shutdown_default_executor()  # the threads of asyncio.to_thread

    if not loop.is_running():
        return
    done = asyncio.run_coroutine_threadsafe(finish(), loop)
    # Stopped only once the result is delivered: stopping inside finish() would strand the waiter.
    done.add_done_callback(lambda _: loop.call_soon_threadsafe(loop.stop))
    if wait:
        with contextlib.suppress(Exception):
            done.result(timeout=10)
        thread.join(timeout=5)


@atexit.register
def _shutdown_all() -> None:
    """Stop every loop still running at interpreter exit, so no task is destroyed while pending."""
    for loop, thread in list(_RUNNING.values()):
        _stop(loop, thread, None, wait=True)
    _RUNNING.clear()
