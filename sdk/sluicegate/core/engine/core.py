"""The engine: fetch, verify, cache and read ahead, in batches, on one asyncio loop.

The unit of work is a *flight*: a batch of blobs fetched together by one task, read and hashed in worker
threads with one hand-off per thread, verified and cached in one pass on the loop. Per-blob tasks,
futures, semaphores and timers cost more CPU than reading and hashing a 100 KB blob (see ARCHITECTURE,
"Speed"), so nothing here is done per blob except a dict lookup and a digest comparison.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from sluicegate._exceptions import IntegrityError, StoreError
from sluicegate.core import backoff
from sluicegate.core.engine.cache import DiskCache, MemoryCache
from sluicegate.core.engine.config import EngineConfig, EngineStats
from sluicegate.core.engine.loop import Workers
from sluicegate.core.engine.upstream import BlobRef, Limits, Upstream, transient

__all__ = ["Engine"]

log = logging.getLogger("sluicegate.engine")

_BURST_BYTES = (
    8 * 2**20
)  # one read-ahead flight: big enough to amortise its hand-offs, small enough to land soon
_BURST_ITEMS = 256
_READAHEAD_FLIGHTS = 4  # read-ahead flights at once: keeps every worker busy while the loop settles one


class _Flight:
    """A batch of blobs on its way: waiters await ``done``, then read their blob's outcome in ``results``."""

    __slots__ = ("done", "nbytes", "refs", "results")

    def __init__(self, refs: list[BlobRef]) -> None:
        self.refs = refs  # may still grow until the flight is launched
        self.nbytes = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.results: dict[str, bytes | BaseException] = {}


class Engine:
    """Fetch/verify/cache/prefetch on one asyncio loop. Construction is cheap; threads start on first use.

    Guarantees:

    * **one upstream fetch per blob** however many requests wait for it (single flight);
    * **retries** of transient upstream faults with exponential backoff and full jitter, counted;
    * **verification**: every blob is checked against its digest (the manifest's BLAKE3, else its sha256)
      before it is served, whichever tier it comes from; a mismatch is
      refetched once, then raises :class:`IntegrityError` naming the item, and the bytes are never delivered;
    * **a byte budget**: the memory tier never holds more than ``memory_bytes``; what the consumer has
      already been served is evicted first; evicted blobs spill to an optional disk tier with its own budget;
    * **read-ahead**: callers announce what they will ask for next and the engine fetches it in the
      background while the announced-but-unserved bytes fit the budget.
    """

    def __init__(self, upstream: Upstream, config: EngineConfig | None = None) -> None:
        self.upstream = upstream
        self.config = config or EngineConfig()
        self.stats = EngineStats()
        self.memory = MemoryCache(self.config.memory_bytes)
        self.disk = DiskCache(self.config.disk_dir, self.config.disk_bytes) if self.config.disk_dir else None
        self.workers = Workers(self.config.threads, "sluicegate-io")
        self._inflight: dict[str, _Flight] = {}
        self._inflight_bytes = 0
        self._readahead_flights = 0
        self._hints: dict[str, deque[BlobRef]] = {}
        self._limits: Limits | None = None
        self._flying: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()  # spills
        self._closed = False

    # -- serving -------------------------------------------------------------------------------

    async def get(self, ref: BlobRef) -> bytes:
        """The verified bytes of one blob (from cache, or fetched once however many callers wait)."""
        return (await self.get_many([ref]))[0]

    async def get_many(
        self, refs: Sequence[BlobRef], ahead: tuple[str, Sequence[BlobRef]] | None = None
    ) -> list[bytes]:
        """Verified bytes of ``refs``, in order; the served blobs become evictable first.

        ``ahead``: ``(consumer, refs)`` announces what that consumer asks for next (see :meth:`readahead`),
        read ahead only once this request's own fetch has started.
        """
        started = time.perf_counter()
        get = self.memory.get
        out: list[bytes | BaseException | None] = [get(ref.sha) for ref in refs]
        missing = [i for i, data in enumerate(out) if data is None]
        self.stats.cache_hits += len(refs) - len(missing)
        self.stats.cache_misses += len(missing)
        owners = self._join([refs[i] for i in missing]) if missing else []
        if ahead is not None:
            self.readahead(*ahead)
        if missing:
            waiting = {f.done for f in owners if not f.done.done()}
            if waiting:
                # asyncio.wait, not gather: a cancelled waiter (client gone) leaves shared flights running.
                await asyncio.wait(waiting)
            for i, flight in zip(missing, owners, strict=True):
                got = flight.results.get(refs[i].sha)
                out[i] = StoreError("the engine was closed mid-fetch") if got is None else got
            self.stats.wait_seconds += time.perf_counter() - started
        served: list[bytes] = []
        nbytes = 0
        for data in out:
            if isinstance(data, BaseException):
                raise data
            assert data is not None
            served.append(data)
            nbytes += len(data)
        consume = self.memory.consume
        for ref in refs:
            consume(ref.sha)
        self.stats.items_served += len(served)
        self.stats.bytes_served += nbytes
        self._pump()  # serving made room for more read-ahead
        return served

    def _join(self, refs: Sequence[BlobRef]) -> list[_Flight]:
        """The flight bringing each ref: one already on its way, or one new flight for all the others."""
        owners: list[_Flight] = []
        fresh: list[BlobRef] = []
        flight: _Flight | None = None
        for ref in refs:
            owner = self._inflight.get(ref.sha)
            if owner is None:
                if flight is None:
                    flight = _Flight(fresh)
                fresh.append(ref)
                self._inflight[ref.sha] = owner = flight
            owners.append(owner)
        if flight is not None:
            self._launch(flight)
        return owners

    def _launch(self, flight: _Flight, readahead: bool = False) -> None:
        flight.nbytes = sum(r.size for r in flight.refs)
        self._inflight_bytes += flight.nbytes
        if readahead:
            self._readahead_flights += 1
        task = asyncio.get_running_loop().create_task(self._fly(flight, readahead))
        self._flying.add(task)
        task.add_done_callback(self._flying.discard)

    async def _fly(self, flight: _Flight, readahead: bool) -> None:
        results = flight.results
        try:
            todo = flight.refs
            if self.disk is not None:
                found = await self.workers.map(self.disk.get_many, todo)
                rest = []
                for ref, data in zip(todo, found, strict=True):
                    if data is None:
                        rest.append(ref)
                    else:
                        results[ref.sha] = data
                self.stats.disk_hits += len(todo) - len(rest)
                todo = rest
            if todo:
                await self._fetch_verified(todo, results)
            self._remember(results)
        except asyncio.CancelledError:
            for ref in flight.refs:
                results.setdefault(ref.sha, StoreError(f"item {ref.item_id!r}: the engine closed"))
            raise
        except Exception as exc:  # e.g. the disk tier's directory vanished: each waiter gets it
            log.debug("a flight of %d blobs failed: %r", len(flight.refs), exc)
            for ref in flight.refs:
                results.setdefault(ref.sha, exc)
        finally:
            for ref in flight.refs:
                if self._inflight.get(ref.sha) is flight:
                    del self._inflight[ref.sha]
            self._inflight_bytes -= flight.nbytes
            if readahead:
                self._readahead_flights -= 1
            if not flight.done.done():
                flight.done.set_result(None)
            self._pump()

    def _remember(self, results: dict[str, bytes | BaseException]) -> None:
        evicted: list[tuple[str, bytes]] = []
        put = self.memory.put
        for sha, data in results.items():
            if isinstance(data, bytes):
                evicted += put(sha, data)
        if not evicted:
            return
        self.stats.evictions += sum(1 for sha, _ in evicted if sha not in results)
        if self.disk is not None and not self._closed:
            self._spawn(self._spill(evicted))

    async def _spill(self, blobs: list[tuple[str, bytes]]) -> None:
        assert self.disk is not None
        self.stats.evictions += await self.workers.run(self.disk.put_many, blobs)

    # -- upstream ------------------------------------------------------------------------------

    def limits(self) -> Limits:
        if self._limits is None:  # made on the engine's loop, which its semaphore belongs to
            cfg = self.config
            self._limits = Limits(
                self.workers, asyncio.Semaphore(cfg.concurrency), cfg.concurrency, cfg.timeout_s
            )
        return self._limits

    async def _fetch_verified(self, refs: list[BlobRef], results: dict[str, bytes | BaseException]) -> None:
        """Fetch ``refs`` into ``results``: transient faults retried with backoff, a corrupt blob once."""
        cfg, stats, limits = self.config, self.stats, self.limits()
        refetched: set[str] = set()
        attempt = 0
        pending = refs
        while pending:
            outcomes = await self.upstream.fetch_many(pending, limits)
            retry: list[BlobRef] = []
            faulted = False
            for ref, got in zip(pending, outcomes, strict=True):
                if isinstance(got, BaseException):
                    stats.upstream_errors += 1
                    if not transient(got):
                        results[ref.sha] = got
                    elif attempt + 1 < cfg.attempts:
                        stats.retries += 1
                        retry.append(ref)
                        faulted = True
                    else:
                        error = StoreError(
                            f"item {ref.item_id!r}: blob {ref.sha} could not be fetched after {cfg.attempts} "
                            f"attempts; last error: {got}"
                        )
                        error.__cause__ = got
                        results[ref.sha] = error
                elif got.digest != ref.check:
                    stats.integrity_failures += 1
                    if ref.sha in refetched:
                        results[ref.sha] = IntegrityError(
                            f"item {ref.item_id!r}: blob {ref.sha} is corrupt upstream (fetched twice, its "
                            f"bytes hash to {got.digest}); it was not delivered. Repair the store (re-import "
                            "the item) or exclude it with a query"
                        )
                    else:
                        log.warning(
                            "item %r: blob %s hashed to %s; fetching it again",
                            ref.item_id,
                            ref.sha,
                            got.digest,
                        )
                        refetched.add(ref.sha)
                        retry.append(ref)
                else:
                    results[ref.sha] = got.data
                    stats.upstream_fetches += 1
                    stats.upstream_bytes += len(got.data)
                    stats.upstream_latency.observe(got.seconds)
            pending = retry
            if faulted:
                await asyncio.sleep(backoff.delay(attempt, first_s=cfg.backoff_s, max_s=cfg.max_backoff_s))
                attempt += 1

    # -- read-ahead ----------------------------------------------------------------------------

    def readahead(self, key: str, refs: Sequence[BlobRef]) -> None:
        """Announce that consumer ``key`` will ask for ``refs`` next, in order (replaces its last hint)."""
        if self._closed:
            return
        if refs:
            self._hints[key] = deque(refs)
        else:
            self._hints.pop(key, None)
        self._pump()

    def _pump(self) -> None:
        """Start read-ahead flights while announced blobs fit the budget and flights are free."""
        while not self._closed and self._hints and self._readahead_flights < _READAHEAD_FLIGHTS:
            burst = self._burst()
            if not burst:
                return
            flight = _Flight(burst)
            for ref in burst:
                self._inflight[ref.sha] = flight
            self.stats.prefetched += len(burst)
            self._launch(flight, readahead=True)

    def _burst(self) -> list[BlobRef]:
        """The next announced blobs that are neither cached nor on their way and fit the budget, from one
        consumer (the consumers take turns)."""
        memory, inflight = self.memory, self._inflight
        pending = memory.fresh_bytes + self._inflight_bytes
        for key in list(self._hints):
            queue = self._hints.pop(key)
            burst: list[BlobRef] = []
            taken: set[str] = set()
            nbytes = 0
            while queue and len(burst) < _BURST_ITEMS and nbytes < _BURST_BYTES:
                ref = queue[0]
                if ref.sha in memory or ref.sha in inflight or ref.sha in taken:
                    queue.popleft()
                    continue
                if pending + nbytes and pending + nbytes + ref.size > memory.budget:
                    break  # no room until the consumer takes something
                burst.append(queue.popleft())
                taken.add(ref.sha)
                nbytes += ref.size
            if queue:
                self._hints[key] = queue  # re-inserted last: the next burst serves another consumer first
            if burst:
                return burst
        return []

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Stop reading ahead, let spills finish, close the upstream and the workers."""
        self._closed = True
        self._hints.clear()
        for task in self._flying:
            task.cancel()
        if self._flying:
            await asyncio.gather(*self._flying, return_exceptions=True)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.upstream.aclose()
        self.workers.close()
