"""The Dataset API: ``sluicegate.open()`` (embedded) and ``sluicegate.connect()`` (a pod's sidecar).

A :class:`Dataset` is a *view* over a source of items: the source's items, narrowed by slice queries,
cut to one rank's shard, visited each epoch in a deterministic order. The view is a spec (queries, shard,
seed, epoch), so ``ds.shard(...).shuffle(7)`` and ``ds.shuffle(7).shard(...)`` are the same dataset and a
pickled copy (a DataLoader worker) is a few hundred bytes that reconnects on first use.

Index spaces: ``ds[i]`` and :meth:`Dataset.get_many` take indexes ``0 .. len(ds)-1`` in *assignment*
order (stable across epochs); :meth:`Dataset.epoch_positions` gives this epoch's visiting order as such
indexes; iteration walks that order with read-ahead.

Resume: :meth:`Dataset.state_dict` saves the epoch's progress (:class:`~sluicegate.core.partition.Progress`:
its segments and what this rank consumed of the current one), and :meth:`Dataset.load_state_dict` continues
it, at the same world size or, for a sharded view, at another one (the epoch's rest re-cut for it, see
:mod:`sluicegate.core.partition`). An epoch continued at another world size visits its re-cut assignment,
not ``ds``'s: there :meth:`Dataset.epoch_positions` indexes that assignment.
"""

from __future__ import annotations

import importlib
import os
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Self, SupportsIndex

import numpy as np
from pydantic import Field

from sluicegate import _ledger
from sluicegate._exceptions import ConfigError
from sluicegate._ledger import Ledger
from sluicegate._local import LocalSource
from sluicegate._source import Item, Pending, Source
from sluicegate.core import partition as _partition
from sluicegate.core.alloc import keep_freed_memory
from sluicegate.core.engine import EngineConfig, engine_store
from sluicegate.core.ledger import Order, Reading, View
from sluicegate.core.partition import Pass, Positions, Progress, RankPlan, RankState, Remainder, ShardSpec
from sluicegate.core.protocol import ProgressReport
from sluicegate.core.query import Query
from sluicegate.core.store import S3Options
from sluicegate.core.wait import METER, DataWait

__all__ = ["Dataset", "Item", "Ledger", "Source", "data_wait", "open"]

_FIRST_BATCH = 8  # a small first request keeps the time to the first item low
_MAX_BATCH = 512
_ENGINE = EngineConfig.model_fields  # the engine's defaults are open()'s
_BATCH_BYTES = 16 * 2**20  # target bytes per request once item sizes are known
_MIN_DEPTH = 2
_LARGE_ITEM = 2**20  # items this big on average: keep freed memory for the next batch (see _alloc)
_REPORT_S = 1.0  # the least time between two progress reports to a sidecar


# -- the dataset -------------------------------------------------------------------------------------


class _State(RankState):
    """What :meth:`Dataset.state_dict` saves (see :class:`~sluicegate.core.partition.RankState`). States
    saved before elastic resume existed hold epoch, position, length, seed and version only, and load as
    they always did."""

    length: int
    seed: int | None
    version: int
    selected: int | None = Field(default=None, ge=0, description="items the cut divides (before sharding)")


@dataclass(frozen=True)
class _Cut:
    """What an epoch's plan cuts: ``spec`` over a selection of ``n`` items, which the view cuts itself
    (``selected``: their source positions) or its source cut (a sidecar: ``selected`` None, the plan's
    rows are the source's); ``whole``: an unsharded view, one rank that cannot be re-cut."""

    spec: ShardSpec
    n: int
    selected: Positions | None
    whole: bool = False
    order_rank: int | None = None


@dataclass(frozen=True)
class _EpochPlan:
    """One epoch's plan: ``positions`` are the source positions of ``rank``'s assignment (``rank.order``
    indexes both); ``progress`` is what the epoch's reading continues (None: a fresh epoch), as the ledger
    states it."""

    rank: RankPlan
    positions: Positions
    progress: Progress | None


class _Planned(Protocol):
    """What an epoch's plan says whatever the view: the rank's plan and the progress it continues."""

    @property
    def rank(self) -> RankPlan: ...

    @property
    def progress(self) -> Progress | None: ...


class _Epochs(ABC):
    """The epoch a view reads and what it consumed of it: what a Dataset and a Mix share. The plan of an
    epoch is each view's own (:meth:`_epoch_plan`), cut for :meth:`_rank_spec`."""

    def __init__(self) -> None:
        self._epoch = 0
        self._position = 0  # items __iter__ handed out of what the epoch's plan had left
        self._progress: Progress | None = None  # the epoch resumed (load_state_dict), when it is _epoch's

    # What state_dict() saves, and the fields every rank's state must share to be merged.
    _STATE: ClassVar[type[RankState]]
    _MERGED_SAME: ClassVar[tuple[str, ...]]

    @abstractmethod
    def _epoch_plan(self) -> _Planned: ...

    @classmethod
    def merge_states(cls, states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """One state out of every rank's (``state_dict()`` of ranks ``0..world_size-1``, saved at one point
        of one epoch): what each rank really consumed, for ranks that did not move in lockstep."""
        parsed = [cls._STATE.model_validate(dict(s)) for s in states]
        return _partition.merge(parsed, cls._MERGED_SAME).model_dump(mode="json")

    @abstractmethod
    def _rank_spec(self) -> ShardSpec:
        """The rank, world size and pad or drop the view's epochs are cut for."""

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order iteration follows (from its start)."""
        if epoch < 0:
            raise ConfigError(f"epoch must be >= 0, got {epoch}")
        self._epoch, self._position, self._progress = int(epoch), 0, None

    @property
    def epoch(self) -> int:
        return self._epoch

    def _next_epoch(self) -> None:
        """A pass read to its end: the next epoch, from its start."""
        self._epoch, self._position, self._progress = self._epoch + 1, 0, None

    def _consumed(self, step: Pass | None = None) -> Progress:
        """The epoch's progress with this rank's consumption so far: what the plan continued, then ``step``
        (a pass of this plan's reader; default: what ``__iter__`` handed out)."""
        plan, spec = self._epoch_plan(), self._rank_spec()
        base = plan.progress or Progress.start(self._epoch, spec.world_size)
        if step is None and self._position:
            step = (self._position,)
        return base.after(spec.rank, len(plan.rank.order), step)

    @abstractmethod
    def _reporter(self) -> Source | None:
        """Where this view's progress reports go (its sidecar), or None: it reports none."""

    def _report(self, step: Pass | None = None) -> None:
        """Tell the sidecar how far this rank got (fire and forget: a report never fails the trainer)."""
        source = self._reporter()
        if source is None:
            return
        try:
            progress = self._consumed(step)
        except ConfigError:
            return
        rank = self._rank_spec().rank
        source.report_progress(
            ProgressReport(
                epoch=progress.epoch,
                segment=progress.segment,
                world_size=progress.current.world_size,
                rank=rank,
                consumed=progress.current.consumed[rank],
            )
        )

    def _passing(self, items: Iterator[Item]) -> Iterator[Item]:
        """``items`` (what the epoch has left) handed out by ``__iter__``: counted, reported to a sidecar
        at most every second and when the pass ends; a complete pass moves to the next epoch."""
        reports = self._reporter() is not None
        last = time.monotonic()
        try:
            for item in items:
                self._position += 1
                if reports and not self._position % 64 and time.monotonic() - last >= _REPORT_S:
                    self._report()
                    last = time.monotonic()
                yield item
        finally:
            if reports:
                self._report()
        self._next_epoch()

    def _adopt(self, epoch: int, progress: Progress | None) -> None:
        """Continue ``progress`` of ``epoch``, or stay as it was if the plan cannot: a progress that does
        not fit fails at the load, not mid-epoch."""
        before = (self._epoch, self._position, self._progress)
        self._epoch, self._position, self._progress = epoch, 0, progress
        try:
            self._epoch_plan()
        except ConfigError:
            self._epoch, self._position, self._progress = before
            raise


class Dataset(_Epochs):
    """A view of a dataset version: ``len(ds)``, ``ds[i]``, ``for item in ds``; see the module docstring.

    ``prefetch`` is the read-ahead budget in bytes: iteration keeps that much requested ahead of the item
    it hands out. ``ledger``: record what this view hands out in the store's ledger (see :class:`Ledger`).
    """

    _STATE = _State
    _MERGED_SAME = ("length", "seed", "version", "selected", "sharded", "remainder")

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
        super().__init__()
        self._view: Positions | None = None
        self._plan: tuple[tuple[Any, ...], _EpochPlan] | None = None
        self._cuts: _Cut | None = None

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
        state["_plan"] = state["_cuts"] = None
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
        """This epoch's order as indexes into the dataset; worker ``worker``'s part of it if split.

        In an epoch resumed by :meth:`load_state_dict` (or a sidecar's stream) it is what the epoch has
        left; resumed at another world size, its indexes are into the epoch's re-cut assignment, not ``ds``.
        """
        return self._epoch_plan().rank.visit(worker, num_workers)

    # -- the epoch's plan ----------------------------------------------------------------------

    def _cut(self) -> _Cut:
        """What this view's epochs cut (see :class:`_Cut`): its own shard, else the sidecar's when the view
        reads the sidecar's shard as it is (no slice, the sidecar's seed), else the whole view."""
        if self._cuts is None:
            self._cuts = self._make_cut()
        return self._cuts

    def _make_cut(self) -> _Cut:
        spec = self._spec()
        if spec is not None:
            selected = self._source.select(self._queries) if self._queries else None
            if selected is None:
                selected = np.arange(len(self._source), dtype=np.int64)
            return _Cut(spec, len(selected), selected)
        source = self._source.shard_spec
        # The sidecar's own cut, when this view visits it as the sidecar would (its shuffle, its seed).
        same_order = (self._seed is None) == (not source.shuffle) if source is not None else False
        if source is not None and same_order and self._seed in (None, source.seed) and not self._queries:
            return _Cut(source, self._source.total, None)
        whole = ShardSpec(seed=self._seed or 0, shuffle=self._seed is not None)
        return _Cut(whole, len(self), None, whole=True, order_rank=self._order_rank())

    def _progress_now(self) -> Progress | None:
        """The progress this epoch's plan continues: what load_state_dict gave, else the sidecar's."""
        if self._progress is not None and self._progress.epoch == self._epoch:
            return self._progress
        resume = self._source.resume
        if resume is not None and not resume.mix and resume.progress.epoch == self._epoch:
            cut = self._cut()
            if cut.selected is None and not cut.whole:
                return resume.progress
        return None

    def _epoch_plan(self) -> _EpochPlan:
        """This epoch's plan (cached until the epoch or its progress changes)."""
        progress = self._progress_now()
        key = (self._epoch, progress)
        if self._plan is not None and self._plan[0] == key:
            return self._plan[1]
        cut = self._cut()
        if cut.whole:
            plan = _partition.rank_plan(
                cut.n, cut.spec, epoch=self._epoch, progress=progress, whole=True, order_rank=cut.order_rank
            )
            positions = self._positions()
        elif cut.selected is not None:
            plan = _partition.rank_plan(cut.n, cut.spec, epoch=self._epoch, progress=progress)
            positions = cut.selected[plan.assignment]
        else:
            plan, positions = self._source_plan(cut.spec, progress)
        planned = _EpochPlan(plan, positions, progress)
        self._plan = (key, planned)
        return planned

    def _source_plan(self, spec: ShardSpec, progress: Progress | None) -> tuple[RankPlan, Positions]:
        """The plan over a sidecar's rows: its shard (indexes ``0..items-1``, in assignment order) and,
        in an epoch its stream re-cut, the rows of this rank's re-cut assignment that follow them."""
        items = len(self._source)
        if progress is None or progress.segment == 0:
            order = _partition.epoch_order(
                items, seed=spec.seed, epoch=self._epoch, rank=spec.rank, shuffle=spec.shuffle
            )
            assignment = np.arange(items, dtype=np.int64)
            segment = 0
        else:
            resume = self._source.resume
            if resume is None or resume.progress.segments[:-1] != progress.segments[:-1]:
                raise ConfigError(
                    f"epoch {progress.epoch} was re-cut for world size {progress.current.world_size}, but "
                    f"{self._source.describe()} does not serve that re-cut: give the sidecar the epoch's "
                    "progress (store mode: --progress, see Dataset.progress_of), or let its DatasetStream "
                    "keep it (broker mode)"
                )
            assignment = resume.first + np.arange(resume.items, dtype=np.int64)
            segment = progress.segment
            order = _partition.segment_order(
                resume.items,
                seed=spec.seed,
                shuffle=spec.shuffle,
                epoch=self._epoch,
                rank=spec.rank,
                segment=segment,
            )
        passes = () if progress is None else progress.current.consumed[spec.rank]
        plan = RankPlan(assignment, order, _partition.remaining(len(order), passes), segment)
        return plan, assignment

    # -- the ledger ----------------------------------------------------------------------------

    def _reading(
        self, order: Order, worker: int = 0, num_workers: int = 1, progress: Progress | None = None
    ) -> Reading:
        """How this view walks its source, as the ledger states it (the source adds its own cut);
        ``progress``: what an epoch's pass continues (its sequence is what that left)."""
        view = View(queries=tuple(q.text for q in self._queries), shard=self._spec())
        return Reading(
            views=(view,),
            seed=self._seed,
            rank=self._order_rank(),
            epoch=self._epoch,
            order=order,
            worker=worker,
            num_workers=num_workers,
            progress=progress,
        )

    def _recorder(self) -> _ledger.Recorder | None:
        if self._ledger is None:
            return None
        run, source = self._ledger.run, self._source
        return _ledger.recorder(source, run, lambda: source.ledger_sink(run))

    def _iter_epoch(
        self, worker: int = 0, num_workers: int = 1, start: int = 0, order: Positions | None = None
    ) -> Iterator[Item]:
        """This epoch's items (worker ``worker``'s part of the order, ``order`` if already computed by
        :meth:`epoch_positions`) from ``start`` on: what iteration and the adapters hand out, recorded when
        the ledger is on."""
        plan = self._epoch_plan()
        if order is None:
            order = plan.rank.visit(worker, num_workers)
        items = self._iter_source(plan.positions[order[start:]])
        recorder = self._recorder()
        if recorder is None or self._ledger is None:
            return items
        # A resumed pass states the progress it continues: its sequence is what that left. One reader
        # going on after a prefix of an epoch never re-cut reads the fresh order from there: said so, the
        # ledger joins it to the pass it continues.
        progress, offset = plan.progress, 0
        if progress is not None and progress.segment == 0 and num_workers == 1:
            passes = progress.current.consumed[self._cut().spec.rank]
            if len(passes) == 1 and len(passes[0]) == 1:
                progress, offset = None, passes[0][0]
        reading = self._reading(Order.EPOCH, worker, num_workers, progress)
        return _recorded(items, recorder, recorder.begin(reading, start + offset, self._ledger))

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
        return self._iter_source(self._resolve(indexes))

    def _iter_source(self, positions: Positions) -> Iterator[Item]:
        """The source's items at ``positions``, in that order, with batches requested ahead."""
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
                total = sum(len(it) for it in items)
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
        """This epoch's items from the saved position on; a complete pass moves to the next epoch.

        Over a sidecar, how far it got is reported to the sidecar (at most every second, and when the
        pass ends), which keeps its DatasetStream's progress in broker mode."""
        yield from self._passing(self._iter_epoch(start=self._position))

    # -- resume --------------------------------------------------------------------------------

    def _rank_spec(self) -> ShardSpec:
        return self._cut().spec

    def _state(self, step: Pass | None = None) -> _State:
        cut = self._cut()
        progress = self._consumed(step)
        rank = cut.spec.rank
        passes = progress.current.consumed[rank]
        done = int(_partition.consumed(len(self._epoch_plan().rank.order), passes).sum())
        simple = progress.segment == 0 and passes in ((), ((done,),))
        return _State(
            epoch=self._epoch,
            position=done,
            length=len(self),
            seed=self._seed,
            version=self.version,
            selected=cut.n,
            rank=rank,
            world_size=cut.spec.world_size,
            sharded=not cut.whole,
            remainder=cut.spec.remainder,
            # A prefix of an epoch never re-cut is all ``position`` says; anything else is spelled out.
            progress=None if simple else progress.lockstep(passes),
        )

    def state_dict(self) -> dict[str, Any]:
        """The epoch and what this rank consumed of it, to resume mid-epoch with nothing lost or repeated,
        at this world size or (for a sharded view) another: see :meth:`load_state_dict`."""
        return self._state().model_dump(mode="json")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the epoch ``state`` was saved in (by :meth:`state_dict`, or :meth:`merge_states`).

        The view must be the same dataset version, query and seed (and pad or drop) as the saved one, else
        :class:`ConfigError`. Saved at this world size, this rank goes on where the saved rank stood; at
        another, the epoch's rest is re-cut for this world size (:mod:`sluicegate.core.partition`): over the
        whole epoch nothing is visited twice and nothing left out, but for pad's repeats and drop's
        omissions. One rank's state stands for every rank (lockstep data-parallel training: every rank
        consumed the same count); when ranks consumed different amounts, load :meth:`merge_states` of all
        of theirs instead. An unsharded view resumes at its own world size (one) only."""
        saved = _State.model_validate(dict(state))
        cut = self._cut()
        checks: list[tuple[str, object, object]] = [
            ("version", saved.version, self.version),
            ("seed", saved.seed, self._seed),
        ]
        if saved.selected is None:  # saved before elastic resume: the very same view
            checks.append(("length", saved.length, len(self)))
        else:
            checks += [
                ("selected items", saved.selected, cut.n),
                ("remainder", saved.remainder.value, cut.spec.remainder.value),
            ]
        mismatch = [f"{name} {was} (now {now})" for name, was, now in checks if was != now]
        if mismatch:
            raise ConfigError(
                "this state was saved from a different dataset view: "
                + ", ".join(mismatch)
                + "; resume with the same version, query, shard and seed"
            )
        if saved.selected is None:  # its position is of this view's world size
            saved = saved.model_copy(update={"world_size": cut.spec.world_size})
        progress = saved.continued_at(
            cut.spec.world_size,
            not cut.whole,
            "sharded views on both sides: ds.shard(rank, world_size) (shard(0, 1) for one process)",
        )
        self._adopt(saved.epoch, progress)

    @staticmethod
    def progress_of(state: Mapping[str, Any]) -> Progress | None:
        """The epoch progress a state (or :meth:`merge_states`) continues: what a sidecar in store mode
        takes as ``--progress`` to serve that epoch's rest at its world size. None: a fresh epoch."""
        return _State.model_validate(dict(state)).continued()

    def _reporter(self) -> Source | None:
        """The sidecar, when this view reads its shard as it is."""
        cut = self._cut()
        return self._source if cut.selected is None and not cut.whole else None

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


def data_wait() -> DataWait:
    """How long this process's trainer has waited for sluicegate data, and for how long it has been
    reading: ``data_wait().ratio`` near 1 means training is starved (see :mod:`sluicegate.core.wait`)."""
    return METER.read()
