"""The Dataset API: ``sluicegate.open()`` (embedded) and ``sluicegate.connect()`` (a pod's sidecar).

A :class:`Dataset` is a *view* over a source of items: the source's items, narrowed by slice queries,
cut to one rank's shard, visited each epoch in a deterministic order. The view is a spec (queries, shard,
seed, epoch), so ``ds.shard(...).shuffle(7)`` and ``ds.shuffle(7).shard(...)`` are the same dataset and a
pickled copy (a DataLoader worker) is a few hundred bytes that reconnects on first use.

Index spaces: ``ds[i]`` and :meth:`Dataset.get_many` take indexes ``0 .. len(ds)-1`` in *assignment*
order (stable across epochs); :meth:`Dataset.epoch_positions` gives this epoch's visiting order as such
indexes; iteration walks that order with read-ahead.
"""

from __future__ import annotations

import importlib
import os
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Self, SupportsIndex

import numpy as np
from pydantic import BaseModel, ConfigDict

from sluicegate import _ledger
from sluicegate._exceptions import ConfigError
from sluicegate._ledger import Ledger
from sluicegate._local import LocalSource
from sluicegate._remote import BATCH_TIMEOUT_S, RemoteSource
from sluicegate._source import Item, Pending, Source
from sluicegate.core import partition as _partition
from sluicegate.core.alloc import keep_freed_memory
from sluicegate.core.engine import EngineConfig, engine_store
from sluicegate.core.ledger import Order, Reading, View
from sluicegate.core.partition import Positions, Remainder, ShardSpec
from sluicegate.core.query import Query
from sluicegate.core.store import S3Options
from sluicegate.core.wait import METER, DataWait

__all__ = ["Dataset", "Item", "Ledger", "Source", "connect", "data_wait", "open"]

_FIRST_BATCH = 8  # a small first request keeps the time to the first item low
_MAX_BATCH = 512
_ENGINE = EngineConfig.model_fields  # the engine's defaults are open()'s
_BATCH_BYTES = 16 * 2**20  # target bytes per request once item sizes are known
_MIN_DEPTH = 2
_LARGE_ITEM = 2**20  # items this big on average: keep freed memory for the next batch (see _alloc)


# -- the dataset -------------------------------------------------------------------------------------


class _State(BaseModel):
    """What :meth:`Dataset.state_dict` saves; checked on load so a resume never silently reorders."""

    model_config = ConfigDict(extra="forbid")

    epoch: int
    position: int
    length: int
    seed: int | None
    version: int


class Dataset:
    """A view of a dataset version: ``len(ds)``, ``ds[i]``, ``for item in ds``; see the module docstring.

    ``prefetch`` is the read-ahead budget in bytes: iteration keeps that much requested ahead of the item
    it hands out. ``ledger``: record what this view hands out in the store's ledger (see :class:`Ledger`).
    """

    def __init__(
        self,
        source: Source,
        *,
        queries: tuple[Query, ...] = (),
        shard: ShardSpec | None = None,
        seed: int | None = None,
        prefetch: int = 64 * 2**20,
        ledger: Ledger | None = None,
    ) -> None:
        self._source = source
        self._queries = queries
        self._shard = shard
        self._seed = seed
        self._prefetch = prefetch
        self._ledger = ledger
        self._epoch = 0
        self._position = 0
        self._view: Positions | None = None

    def _derive(self, **changes: Any) -> Dataset:
        spec: dict[str, Any] = {
            "queries": self._queries,
            "shard": self._shard,
            "seed": self._seed,
            "prefetch": self._prefetch,
            "ledger": self._ledger,
        }
        spec.update(changes)
        ds = Dataset(self._source, **spec)
        ds._epoch = self._epoch
        return ds

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_view"] = None  # recomputed on demand: cheaper than shipping a million positions
        return state

    # -- views ---------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """The pinned dataset version this view reads."""
        return self._source.version

    @property
    def source(self) -> Source:
        return self._source

    def slice(self, query: str) -> Dataset:
        """The items that also match ``query`` (AND-ed with earlier slices); syntax is checked now."""
        return self._derive(queries=(*self._queries, Query.parse(query)))

    def shard(self, rank: int, world_size: int, remainder: Remainder | str = Remainder.PAD) -> Dataset:
        """Rank ``rank``'s part of ``world_size``: disjoint, equal-length parts covering the view."""
        if self._shard is not None:
            raise ConfigError(
                f"this dataset is already shard {self._shard.rank} of {self._shard.world_size}; shard the "
                "unsharded dataset instead"
            )
        try:
            rem = Remainder(remainder)
        except ValueError:
            raise ConfigError(f"remainder must be 'pad' or 'drop', got {remainder!r}") from None
        _partition.shard(0, rank, world_size)  # validates rank and world size now, as a ConfigError
        # The seed and whether to shuffle are the view's own (shuffle() may come before or after).
        return self._derive(shard=ShardSpec(rank=rank, world_size=world_size, remainder=rem))

    def shuffle(self, seed: int = 0) -> Dataset:
        """Visit items in an order that changes each epoch, deterministically from ``(seed, epoch)``."""
        return self._derive(seed=int(seed))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order iteration follows (from its start)."""
        if epoch < 0:
            raise ConfigError(f"epoch must be >= 0, got {epoch}")
        self._epoch, self._position = int(epoch), 0

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def ledger(self) -> Ledger | None:
        """Where this view records what it hands out (``ds.ledger.run``), or None: not recorded."""
        return self._ledger

    def _spec(self) -> ShardSpec | None:
        """The shard with this view's seed applied: what cuts the selection."""
        return None if self._shard is None else self._shard.seeded(self._seed)

    def _positions(self) -> Positions:
        """Source positions of this view, in assignment order."""
        if self._view is None:
            if self._queries:
                view = self._source.select(self._queries)
            else:
                view = np.arange(len(self._source), dtype=np.int64)
            self._view = _partition.assign(view, self._spec())
        return self._view

    def __len__(self) -> int:
        return len(self._positions())

    def _order_rank(self) -> int:
        return self._shard.rank if self._shard is not None else self._source.rank

    def epoch_positions(self, worker: int = 0, num_workers: int = 1) -> Positions:
        """This epoch's order as indexes into the dataset; worker ``worker``'s part of it if split."""
        return _partition.visit_order(
            len(self),
            seed=self._seed,
            epoch=self._epoch,
            rank=self._order_rank(),
            worker=worker,
            num_workers=num_workers,
        )

    # -- the ledger ----------------------------------------------------------------------------

    def _reading(self, order: Order, worker: int = 0, num_workers: int = 1) -> Reading:
        """How this view walks its source, as the ledger states it (the source adds its own cut)."""
        view = View(queries=tuple(q.text for q in self._queries), shard=self._spec())
        return Reading(
            views=(view,),
            seed=self._seed,
            rank=self._order_rank(),
            epoch=self._epoch,
            order=order,
            worker=worker,
            num_workers=num_workers,
        )

    def _recorder(self) -> _ledger.Recorder | None:
        if self._ledger is None:
            return None
        run, source = self._ledger.run, self._source
        return _ledger.recorder(source, run, lambda: source.ledger_sink(run))

    def _iter_epoch(
        self, worker: int = 0, num_workers: int = 1, start: int = 0, order: Positions | None = None
    ) -> Iterator[Item]:
        """This epoch's items (worker ``worker``'s part of the order, ``order`` if already computed) from
        ``start`` on: what iteration and the adapters hand out, recorded when the ledger is on."""
        if order is None:
            order = self.epoch_positions(worker, num_workers)
        items = self.iter_positions(order[start:])
        recorder = self._recorder()
        if recorder is None or self._ledger is None:
            return items
        reading = self._reading(Order.EPOCH, worker, num_workers)
        return _recorded(items, recorder, recorder.begin(reading, start, self._ledger))

    # -- reading -------------------------------------------------------------------------------

    def _indexes(self, indexes: Sequence[SupportsIndex] | Positions) -> Positions:
        """``indexes`` checked and made non-negative."""
        idx = np.asarray(indexes, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            bad = int(idx[(idx < -n) | (idx >= n)][0])
            raise IndexError(f"index {bad} is out of range for a dataset of {n} items")
        return np.where(idx < 0, idx + n, idx)

    def _resolve(self, indexes: Sequence[SupportsIndex] | Positions) -> Positions:
        return self._positions()[self._indexes(indexes)]

    def __getitem__(self, index: SupportsIndex) -> Item:
        if isinstance(index, slice | str | bytes):
            raise TypeError(
                f"dataset indexes are integers, got {type(index).__name__}; use get_many() for many"
            )
        return self.get_many([index])[0]

    def get_many(self, indexes: Sequence[SupportsIndex] | Positions) -> list[Item]:
        """Items at ``indexes`` (negative allowed), fetched together."""
        idx = self._indexes(indexes)
        pending = self._source.fetch(self._positions()[idx], np.empty(0, np.int64))
        with METER.blocked():
            items = pending.result()
        recorder = self._recorder()
        if recorder is not None and self._ledger is not None:
            recorder.picked(self._reading(Order.INDEX), idx, self._ledger)
        return items

    def iter_positions(self, indexes: Sequence[SupportsIndex] | Positions) -> Iterator[Item]:
        """Items at ``indexes`` in that order, with batches requested ahead of the consumer."""
        positions = self._resolve(indexes)
        pending: deque[tuple[Pending, int]] = deque()
        sent = 0
        batch = _FIRST_BATCH
        item_bytes = 0.0  # running mean, sizes the batches and the read-ahead depth
        depth = _MIN_DEPTH
        try:
            while sent < len(positions) or pending:
                while sent < len(positions) and len(pending) < depth:
                    chunk = positions[sent : sent + batch]
                    ahead = positions[sent + batch : sent + 2 * batch]
                    pending.append((self._source.fetch(chunk, ahead), len(chunk)))
                    sent += len(chunk)
                head, count = pending.popleft()
                with METER.blocked():
                    items = head.result()
                total = sum(len(it.data) for it in items)
                item_bytes = total / count if not item_bytes else 0.8 * item_bytes + 0.2 * total / count
                if item_bytes >= _LARGE_ITEM:
                    keep_freed_memory()
                batch = int(min(_MAX_BATCH, max(1, _BATCH_BYTES // max(item_bytes, 1.0))))
                depth = int(max(_MIN_DEPTH, self._prefetch // max(batch * item_bytes, 1.0)))
                yield from items
        finally:
            for p, _ in pending:
                p.cancel()

    def __iter__(self) -> Iterator[Item]:
        """This epoch's items from the saved position on; a complete pass moves to the next epoch."""
        for item in self._iter_epoch(start=self._position):
            self._position += 1
            yield item
        self._epoch, self._position = self._epoch + 1, 0

    # -- resume --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Epoch and position within it, to resume mid-epoch with nothing lost or repeated."""
        return _State(
            epoch=self._epoch,
            position=self._position,
            length=len(self),
            seed=self._seed,
            version=self.version,
        ).model_dump()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = _State.model_validate(dict(state))
        mismatch = [
            f"{name} {saved_value} (now {now})"
            for name, saved_value, now in (
                ("version", saved.version, self.version),
                ("length", saved.length, len(self)),
                ("seed", saved.seed, self._seed),
            )
            if saved_value != now
        ]
        if mismatch:
            raise ConfigError(
                "this state was saved from a different dataset view: "
                + ", ".join(mismatch)
                + "; resume with "
                "the same version, query, shard and seed"
            )
        if not 0 <= saved.position <= saved.length:
            raise ConfigError(f"saved position {saved.position} is outside [0, {saved.length}]")
        self._epoch, self._position = saved.epoch, saved.position

    # -- adapters and lifecycle ----------------------------------------------------------------

    def to_pytorch(self, **kwargs: Any) -> Any:
        """A torch DataLoader/IterableDataset over this view (see :mod:`sluicegate.torch`)."""
        return _adapter("torch").to_pytorch(self, **kwargs)

    def to_tensorflow(self, **kwargs: Any) -> Any:
        """A ``tf.data.Dataset`` over this view (see :mod:`sluicegate.tensorflow`)."""
        return _adapter("tensorflow").to_tensorflow(self, **kwargs)

    def close(self) -> None:
        """Stop the data path's background work (threads, connections); the dataset reopens on use.

        With the ledger on, what this process handed out is written first (waiting up to 10 s)."""
        recorder = self._recorder()
        if recorder is not None:
            recorder.flush()
        self._source.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        parts = [self._source.describe()]
        if self._queries:
            parts.append("query " + " and ".join(f"({q.text})" for q in self._queries))
        if self._shard is not None:
            parts.append(f"shard {self._shard.rank}/{self._shard.world_size} ({self._shard.remainder.value})")
        if self._seed is not None:
            parts.append(f"shuffled (seed {self._seed})")
        return f"<sluicegate.Dataset {', '.join(parts)}, epoch {self._epoch}>"


def _recorded(items: Iterator[Item], recorder: _ledger.Recorder, counted: _ledger.Pass) -> Iterator[Item]:
    """``items``, each counted as handed out; the count is cut every ``flush_items`` and when the pass ends
    (exhausted, or closed by a consumer that stopped early)."""
    try:
        for item in items:
            counted.pos += 1
            if counted.pos >= counted.due:
                recorder.cut(counted)
            yield item
    finally:
        recorder.end(counted)


def _adapter(name: str) -> Any:
    """Import an adapter module only when asked for: torch and tensorflow are optional extras."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name in (name, f"{__package__}.{name}"):
            raise ConfigError(f"{name} is not installed: pip install 'sluicegate[{name}]'") from exc
        raise


def open(
    uri: str | os.PathLike[str],
    version: int | None = None,
    query: str | None = None,
    *,
    cache_bytes: int = _ENGINE["memory_bytes"].default,
    disk_cache: str | os.PathLike[str] | None = None,
    disk_cache_bytes: int = _ENGINE["disk_bytes"].default,
    s3: S3Options | None = None,
    prefetch: int = 64 * 2**20,
    concurrency: int = _ENGINE["concurrency"].default,
    ledger: Ledger | str | bool | None = None,
) -> Dataset:
    """Open a dataset store in this process (no sidecar), pinned to ``version`` (default: latest).

    Resolving the version is the only I/O done here (so the dataset and every pickled copy of it read
    the same version); the manifest is read on first use. ``cache_bytes`` bounds the memory cache,
    ``disk_cache`` adds a disk tier in that directory, ``prefetch`` is the read-ahead in bytes.
    ``ledger``: a run id (or ``True`` for the default one, or a :class:`Ledger`) records what this
    dataset and every view and copy of it hand out in the store's ledger (``sluicegate ledger --help``).
    """
    recording = _ledger.ledger_of(ledger)
    store = engine_store(uri, s3)
    pinned = store.resolve(version)
    config = EngineConfig(
        memory_bytes=cache_bytes,
        disk_dir=None if disk_cache is None else os.fspath(disk_cache),
        disk_bytes=disk_cache_bytes,
        concurrency=concurrency,
    )
    source = LocalSource(store.uri, s3, pinned, config)
    source._store = store  # reuse the client that resolved the version
    ds = Dataset(source, prefetch=prefetch, ledger=recording)
    return ds.slice(query) if query else ds


def connect(
    address: str | None = None,
    *,
    timeout: float = 60.0,
    batch_timeout: float = BATCH_TIMEOUT_S,
    prefetch: int = 64 * 2**20,
    ledger: Ledger | str | bool | None = None,
) -> Dataset:
    """The pod's shard, served by its sidecar at ``address`` (default: ``$SLUICEGATE_ADDRESS``).

    Waits up to ``timeout`` seconds for the sidecar to be ready (and for one that restarts); a batch that
    takes longer than ``batch_timeout`` seconds to arrive raises :class:`SidecarUnavailable` instead of
    hanging the trainer. When several trainer processes share the pod (torchrun ``LOCAL_WORLD_SIZE`` > 1),
    each gets its ``LOCAL_RANK``'s part of the shard. ``ledger``: as for :func:`open`; the sidecar writes
    the records (a sidecar in store mode; in broker mode it refuses, and recording stops with an error).
    """
    recording = _ledger.ledger_of(ledger)
    from sluicegate.core.env import detect

    env = detect()
    target = address or env.address
    if not target:
        raise ConfigError(
            "no sidecar address: pass connect(address) or set SLUICEGATE_ADDRESS (unix:///PATH or "
            "http://127.0.0.1:PORT); without a sidecar use sluicegate.open(URI)"
        )
    source = RemoteSource(target, timeout=timeout, batch_timeout=batch_timeout)
    source.wait_ready()
    METER.report_to(source.report_wait)
    ds = Dataset(source, seed=source.seed, prefetch=prefetch, ledger=recording)
    if env.local_world_size > 1:
        ds = ds.shard(env.local_rank, env.local_world_size)
    return ds


def data_wait() -> DataWait:
    """How long this process's trainer has waited for sluicegate data, and for how long it has been
    reading: ``data_wait().ratio`` near 1 means training is starved (see :mod:`sluicegate.core.wait`)."""
    return METER.read()
