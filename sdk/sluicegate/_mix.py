"""Weighted mixing: ``sluicegate.mix(...)``, one dataset view over several sources.

A :class:`Mix` holds one :class:`~sluicegate.Dataset` view per source (each its own store, version and
query) and reads them in the proportions of its weights. What one epoch of a mix is (its length, each
source's count and items, the interleave) is :mod:`sluicegate.core.mix`'s arithmetic; this module reads
it: every source through its own view's batched, read-ahead path, each item tagged with its source's name.

Like a Dataset, a mix is a spec: ``shard`` shards every source with the same rule (so every rank gets the
same epoch length), ``shuffle`` shuffles every source and the interleave, and a pickled copy (a DataLoader
worker) reconnects its sources on first use. The torch and TensorFlow adapters take a mix as they take a
Dataset: both have the :class:`Readable` interface.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Self, SupportsIndex

import numpy as np
from pydantic import Field

from sluicegate import _ledger
from sluicegate._dataset import Dataset, _adapter, _Epochs, _Planned
from sluicegate._exceptions import ConfigError
from sluicegate._source import Item, Source
from sluicegate.core import partition as _partition
from sluicegate.core.ledger import Order, Reading
from sluicegate.core.mix import EpochLength, MixKeys, MixPlan, MixSpec, Stop, source_seed
from sluicegate.core.partition import (
    Pass,
    Positions,
    Progress,
    RankPlan,
    RankState,
    Remainder,
    Segment,
    ShardSpec,
)

__all__ = ["Mix", "Readable", "mix"]

_NOTE_EVERY = 256  # items of one source between ledger notes while iterating (a note takes a lock)


class Readable(Protocol):
    """What the adapters (:mod:`sluicegate.torch`, :mod:`sluicegate.tensorflow`) read through: a
    :class:`~sluicegate.Dataset` or a :class:`Mix`; both resume an epoch from what a loader consumed."""

    _progress: Progress | None

    def _epoch_plan(self) -> _Planned: ...

    def _consumed(self, step: Pass | None = None) -> Progress: ...

    def _state(self, step: Pass | None = None) -> RankState: ...

    def _reporter(self) -> Source | None: ...

    def _report(self, step: Pass | None = None) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    @property
    def epoch(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int: ...

    def epoch_positions(self, worker: int = 0, num_workers: int = 1) -> Positions: ...

    def get_many(self, indexes: Sequence[SupportsIndex] | Positions) -> list[Item]: ...

    def _iter_epoch(
        self, worker: int = 0, num_workers: int = 1, start: int = 0, order: Positions | None = None
    ) -> Iterator[Item]: ...


class _MixState(RankState):
    """What :meth:`Mix.state_dict` saves (see :class:`~sluicegate.core.partition.RankState`): the epoch's
    progress over this rank's mix order, and what identifies the mix. ``selected``: each source's items
    before sharding (None: the sources are cut by their sidecars, not by the mix; it cannot be re-cut)."""

    length: int
    seed: int | None
    names: list[str]
    counts: list[int]
    versions: list[int]
    weights: list[float] = Field(default_factory=list)  # empty in states saved before elastic resume
    epoch_length: EpochLength = Stop.FIRST_EXHAUSTED
    selected: list[int] | None = None


@dataclass(frozen=True)
class _MixEpoch:
    """One epoch's plan on this rank: ``rank.assignment`` holds the mix's slots (segment 0) or, in an epoch
    re-cut for another world size, keys (:class:`~sluicegate.core.mix.MixKeys`) into the sources' whole
    selections; ``progress`` is what the epoch's reading continues (None: a fresh epoch)."""

    rank: RankPlan
    progress: Progress | None
    # A re-cut epoch: each assignment entry's source and its index into what reads it there (the source's
    # whole view: its selection; a sidecar: the re-cut rows it serves after its shard).
    sources: Positions | None = None
    within: Positions | None = None
    sidecars: bool = False


class Mix(_Epochs):
    """Several dataset views read as one, in proportion to their weights; make one with :func:`mix`.

    ``len(mix)`` is one epoch's length on this rank; ``mix[i]`` and :meth:`get_many` take indexes
    ``0 .. len-1`` (which source an index belongs to is stable across epochs, which of its items it holds
    moves on each epoch); iteration walks this epoch's order with each source read ahead. Every item says
    where it came from: ``item.source`` is its source's name.
    """

    _STATE = _MixState
    _MERGED_SAME = ("length", "seed", "names", "counts", "versions", "weights", "selected", "remainder")

    def __init__(
        self,
        sources: tuple[Dataset, ...],
        spec: MixSpec,
        *,
        seed: int | None = None,
        shard: ShardSpec | None = None,
    ) -> None:
        self._sources = sources
        self._spec = spec
        self._seed = seed
        self._shard = shard
        super().__init__()
        self._lock = threading.Lock()
        self._plan: MixPlan | None = None
        self._epochs: tuple[tuple[Any, ...], _MixEpoch] | None = None
        self._wholes: tuple[Dataset, ...] | None = None
        self._served = [0] * len(sources)

    def _derive(self, sources: tuple[Dataset, ...], **changes: Any) -> Mix:
        spec: dict[str, Any] = {"seed": self._seed, "shard": self._shard}
        spec.update(changes)
        view = Mix(sources, self._spec, **spec)
        view._epoch = self._epoch
        return view

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        # Recomputed on demand: cheaper than shipping each source's orders; counts are per process.
        state.update(_lock=None, _plan=None, _epochs=None, _wholes=None, _served=[0] * len(self._sources))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- views ---------------------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        return self._spec.names

    @property
    def weights(self) -> dict[str, float]:
        return dict(zip(self._spec.names, self._spec.weights, strict=True))

    @property
    def sources(self) -> dict[str, Dataset]:
        """Each source's view as this mix reads it (sharded and shuffled with the mix)."""
        return dict(zip(self._spec.names, self._sources, strict=True))

    @property
    def versions(self) -> dict[str, int]:
        return {name: ds.version for name, ds in zip(self._spec.names, self._sources, strict=True)}

    @property
    def epoch_length(self) -> EpochLength:
        return self._spec.epoch_length

    def slice(self, query: str) -> Mix:
        """Every source narrowed by ``query`` (AND-ed with its own); it must make sense for each."""
        return self._derive(tuple(ds.slice(query) for ds in self._sources))

    def shard(self, rank: int, world_size: int, remainder: Remainder | str = Remainder.PAD) -> Mix:
        """Rank ``rank``'s part of ``world_size``: every source sharded with this rule, so each source,
        and the mix's epoch, has the same length on every rank."""
        if self._shard is not None:
            raise ConfigError(
                f"this mix is already shard {self._shard.rank} of {self._shard.world_size}; shard the "
                "unsharded mix instead"
            )
        sources = tuple(ds.shard(rank, world_size, remainder) for ds in self._sources)
        return self._derive(sources, shard=ShardSpec(rank=rank, world_size=world_size, remainder=remainder))

    def shuffle(self, seed: int = 0) -> Mix:
        """Shuffle the interleave and every source (source ``i`` with seed ``seed + i``), each epoch anew,
        deterministically from ``(seed, epoch)``."""
        seed = int(seed)
        sources = tuple(ds.shuffle(source_seed(seed, i)) for i, ds in enumerate(self._sources))
        return self._derive(sources, seed=seed)

    def _planned(self) -> MixPlan:
        with self._lock:
            if self._plan is None:
                self._plan = MixPlan(
                    [len(ds) for ds in self._sources],
                    self._spec.weights,
                    [_epoch_orders(ds) for ds in self._sources],
                    self._spec.epoch_length,
                    self._spec.names,
                )
            return self._plan

    def __len__(self) -> int:
        return self._planned().length

    def counts(self) -> dict[str, int]:
        """Items each source gives per epoch on this rank (they add up to ``len(mix)``)."""
        return dict(self._planned().count_of())

    def served(self) -> dict[str, int]:
        """Items this process has handed out from each source so far (a DataLoader worker counts its
        own)."""
        return dict(zip(self._spec.names, self._served, strict=True))

    def epoch_positions(self, worker: int = 0, num_workers: int = 1) -> Positions:
        """This epoch's order as indexes into the mix; worker ``worker``'s part of it if split.

        In an epoch resumed by :meth:`load_state_dict` it is what the epoch has left; resumed at another
        world size, its indexes are into the epoch's re-cut assignment, not the mix."""
        return self._epoch_plan().rank.visit(worker, num_workers)

    # -- the epoch's plan ----------------------------------------------------------------------

    def _rank_spec(self) -> ShardSpec:
        return self._shard if self._shard is not None else ShardSpec()

    def _recuttable(self) -> bool:
        """Whether the mix cuts its sources itself (``shard``): only then can it re-cut an epoch's rest
        for another world size (sources cut by their sidecars serve only their own shards)."""
        return self._shard is not None and all(ds._shard is not None for ds in self._sources)

    def _whole_views(self) -> tuple[Dataset, ...]:
        """Each source unsharded (indexes: its selection), which a re-cut epoch reads by key."""
        with self._lock:
            if self._wholes is None:
                self._wholes = tuple(ds._derive(shard=None) for ds in self._sources)
            return self._wholes

    def _selected(self) -> list[int] | None:
        return [len(ds) for ds in self._whole_views()] if self._recuttable() else None

    def _epoch_plan(self) -> _MixEpoch:
        """This epoch's plan (cached until the epoch or its progress changes)."""
        progress = self._progress
        if progress is not None and progress.epoch != self._epoch:
            progress = None
        key = (self._epoch, progress)
        cached = self._epochs
        if cached is not None and cached[0] == key:
            return cached[1]
        cut = self._rank_spec()
        if progress is None or progress.segment == 0:
            plan = self._planned()
            order = plan.visit_order(seed=self._seed, epoch=self._epoch, rank=cut.rank)
            assignment = np.arange(plan.length, dtype=np.int64)
            sources = within = None
        else:
            keyed = MixKeys(
                tuple(self._selected() or [ds._source.total for ds in self._sources]),
                self._spec.weights,
                self._seed,
                cut.remainder,
                self._spec.epoch_length,
            )
            assignment = keyed.recut(progress, cut.rank)
            order = np.arange(len(assignment), dtype=np.int64)
            sources, within = keyed.split(assignment)
            if not self._recuttable():
                within = self._sidecar_rows(sources, progress)
        passes = () if progress is None else progress.current.consumed[cut.rank]
        segment = 0 if progress is None else progress.segment
        rank = RankPlan(assignment, order, _partition.remaining(len(order), passes), segment)
        planned = _MixEpoch(rank, progress, sources, within, sidecars=not self._recuttable())
        self._epochs = (key, planned)
        return planned

    def _sidecar_rows(self, sources: Positions, progress: Progress) -> Positions:
        """Where each source's sidecar serves its entries of this rank's re-cut block: the rows after its
        shard, in block order (the broker cut them from the stream's progress, as this mix does)."""
        rows = np.empty(len(sources), dtype=np.int64)
        for i, ds in enumerate(self._sources):
            resume, picked = ds._source.resume, sources == i
            count = int(picked.sum())
            if (
                resume is None
                or not resume.mix
                or not resume.progress.cuts_as(progress)
                or resume.items != count
            ):
                raise ConfigError(
                    f"epoch {progress.epoch} of this mix was re-cut for world size "
                    f"{progress.current.world_size}, but the sidecar of source {self._spec.names[i]!r} does "
                    "not serve that re-cut: restart the pod, so that each sidecar asks its stream again"
                )
            rows[picked] = resume.first + np.arange(count, dtype=np.int64)
        return rows

    def locate(self, indexes: Sequence[SupportsIndex] | Positions) -> list[tuple[str, int]]:
        """For each index, in this epoch: its source's name and the index into that source's view."""
        sources, within = self._resolve(self._indexes(indexes))
        names = self._spec.names
        return [(names[s], i) for s, i in zip(sources.tolist(), within.tolist(), strict=True)]

    # -- reading -------------------------------------------------------------------------------

    def _indexes(self, indexes: Sequence[SupportsIndex] | Positions) -> Positions:
        idx = np.asarray(indexes, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            bad = int(idx[(idx < -n) | (idx >= n)][0])
            raise IndexError(f"index {bad} is out of range for a mix of {n} items per epoch")
        return np.where(idx < 0, idx + n, idx)

    def _resolve(self, slots: Positions) -> tuple[Positions, Positions]:
        plan = self._planned()
        with self._lock:  # a stream's cache of source epochs is not shared safely between threads
            return plan.resolve(slots, self._epoch)

    def __getitem__(self, index: SupportsIndex) -> Item:
        if isinstance(index, slice | str | bytes):
            raise TypeError(f"mix indexes are integers, got {type(index).__name__}; use get_many() for many")
        return self.get_many([index])[0]

    def get_many(self, indexes: Sequence[SupportsIndex] | Positions) -> list[Item]:
        """Items at ``indexes`` (negative allowed) of this epoch, fetched together per source."""
        sources, within = self._resolve(self._indexes(indexes))
        out: list[Item | None] = [None] * len(sources)
        for i, ds in enumerate(self._sources):
            picked = np.flatnonzero(sources == i)
            if not picked.size:
                continue
            name = self._spec.names[i]
            with self._lock:  # not between a stream's set_epoch and its epoch_positions (_epoch_orders)
                ds.set_epoch(self._epoch)  # what its ledger records the picks under: the mix's epoch
            for at, item in zip(picked.tolist(), ds.get_many(within[picked]), strict=True):
                item.source = name
                out[at] = item
            self._served[i] += len(picked)
        return [item for item in out if item is not None]

    def iter_positions(self, indexes: Sequence[SupportsIndex] | Positions) -> Iterator[Item]:
        """Items at ``indexes`` (of this epoch) in that order, each source read ahead of the consumer."""
        sources, within = self._resolve(self._indexes(indexes))
        views, epoch = self._sources, self._epoch
        return self._interleave(sources, within, lambda i, at: _source_items(views[i], at, epoch))

    def _interleave(
        self, sources: Positions, within: Positions, read: Callable[[int, Positions], Iterator[Item]]
    ) -> Iterator[Item]:
        """Items ``within[k]`` of source ``sources[k]`` in turn, each source read ahead (``read(i, at)``
        reads source ``i`` at ``at``, in that order)."""
        readers = [
            read(i, within[sources == i]) if bool((sources == i).any()) else iter(())
            for i in range(len(self._sources))
        ]
        names, served = self._spec.names, self._served
        try:
            for i in sources.tolist():
                item = next(readers[i])
                item.source = names[i]
                served[i] += 1
                yield item
        finally:
            for reader in readers:
                close = getattr(reader, "close", None)
                if close is not None:
                    close()

    def _iter_epoch(
        self, worker: int = 0, num_workers: int = 1, start: int = 0, order: Positions | None = None
    ) -> Iterator[Item]:
        """This epoch's items (worker ``worker``'s part of the order, ``order`` if already computed by
        :meth:`epoch_positions`) from ``start`` on: what iteration and the adapters hand out."""
        plan = self._epoch_plan()
        if order is None:
            order = plan.rank.visit(worker, num_workers)
        entries = order[start:]
        if plan.sources is None or plan.within is None:
            return self.iter_positions(plan.rank.assignment[entries])
        sources, within = plan.sources[entries], plan.within[entries]
        if plan.sidecars:
            views = self._sources
            return self._interleave(
                sources, within, lambda i, rows: _recut_items(views[i], rows, self._epoch)
            )
        wholes, rank = self._whole_views(), self._rank_spec().rank
        return self._interleave(
            sources, within, lambda i, at: _source_items(wholes[i], at, self._epoch, rank)
        )

    def __iter__(self) -> Iterator[Item]:
        """This epoch's items from the saved position on; a complete pass moves to the next epoch. A mix
        of sidecars reports how far it got through its first source's sidecar (its stream keeps it)."""
        yield from self._passing(self._iter_epoch(start=self._position))

    def _reporter(self) -> Source | None:
        if self._recuttable() or self._shard is None:
            return None
        sidecars = [ds._reporter() for ds in self._sources]
        return sidecars[0] if None not in sidecars else None

    # -- resume --------------------------------------------------------------------------------

    def _state(self, step: Pass | None = None) -> _MixState:
        mix, cut = self._planned(), self._rank_spec()
        progress = self._consumed(step)
        passes = progress.current.consumed[cut.rank]
        done = int(_partition.consumed(len(self._epoch_plan().rank.order), passes).sum())
        simple = progress.segment == 0 and passes in ((), ((done,),))
        return _MixState(
            epoch=self._epoch,
            position=done,
            rank=cut.rank,
            world_size=cut.world_size,
            sharded=self._recuttable(),
            remainder=cut.remainder,
            progress=None if simple else progress.lockstep(passes),
            length=mix.length,
            seed=self._seed,
            names=list(self._spec.names),
            counts=mix.counts.tolist(),
            versions=[ds.version for ds in self._sources],
            weights=list(self._spec.weights),
            epoch_length=self._spec.epoch_length,
            selected=self._selected(),
        )

    def state_dict(self) -> dict[str, Any]:
        """The epoch and what this rank consumed of it, to resume mid-epoch with nothing lost or repeated,
        at this world size or (a mix that shards its sources) another: see :meth:`load_state_dict`."""
        return self._state().model_dump(mode="json")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the epoch ``state`` was saved in (by :meth:`state_dict`, or :meth:`merge_states`).

        The mix must have the same sources (versions, queries), weights, epoch length, seed and pad or drop
        as the saved one, else :class:`ConfigError`. Saved at this world size, this rank goes on where the
        saved rank stood; at another, what the epoch's ranks left is re-cut for this world size
        (:mod:`sluicegate.core.mix`): over the whole epoch nothing is read twice and nothing left out, but
        for pad's repeats. One rank's state stands for every rank (lockstep); when ranks consumed different
        amounts, load :meth:`merge_states` of all of theirs."""
        saved = _MixState.model_validate(dict(state))
        now = self._state()
        names = ["names", "versions", "seed"]
        if saved.weights:
            names += ["remainder", "weights", "epoch_length"]
        else:  # saved before elastic resume: a position at this mix's own rank and world size
            saved = saved.model_copy(update={"rank": now.rank, "world_size": now.world_size})
        names += ["selected"] if saved.selected is not None and now.selected is not None else []
        names += ["counts", "length"] if saved.world_size == now.world_size else []
        mismatch = [
            f"{name} {getattr(saved, name)} (now {getattr(now, name)})"
            for name in names
            if getattr(saved, name) != getattr(now, name)
        ]
        if mismatch:
            raise ConfigError(
                "this state was saved from a different mix: "
                + ", ".join(mismatch)
                + "; resume with the same sources (versions, queries), weights, shard and seed"
            )
        if not 0 <= saved.position <= saved.length:
            raise ConfigError(f"saved position {saved.position} is outside [0, {saved.length}]")
        progress = saved.continued_at(
            now.world_size,
            now.sharded,
            "mixes that shard their sources on both sides: mix.shard(rank, world_size) (a mix of "
            "sidecars resumes at its own world size)",
        )
        self._adopt(saved.epoch, progress)

    # -- adapters and lifecycle ----------------------------------------------------------------

    def to_pytorch(self, **kwargs: Any) -> Any:
        """A torch DataLoader/IterableDataset over this mix (see :mod:`sluicegate.torch`); samples carry
        ``"source"``."""
        return _adapter("torch").to_pytorch(self, **kwargs)

    def to_tensorflow(self, **kwargs: Any) -> Any:
        """A ``tf.data.Dataset`` over this mix (see :mod:`sluicegate.tensorflow`); samples carry
        ``"source"``."""
        return _adapter("tensorflow").to_tensorflow(self, **kwargs)

    def close(self) -> None:
        for ds in self._sources:
            ds.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        parts = [f"{name} {weight:g}: {ds!r}" for name, weight, ds in zip(*self._spec_parts(), strict=True)]
        extra = []
        if self._shard is not None:
            extra.append(f"shard {self._shard.rank}/{self._shard.world_size} ({self._shard.remainder.value})")
        if self._seed is not None:
            extra.append(f"shuffled (seed {self._seed})")
        extra.append(f"epoch {self._epoch}")
        return f"<sluicegate.Mix [{'; '.join(parts)}], {', '.join(extra)}>"

    def _spec_parts(self) -> tuple[tuple[str, ...], tuple[float, ...], tuple[Dataset, ...]]:
        return self._spec.names, self._spec.weights, self._sources


if TYPE_CHECKING:

    def _conforms(ds: Dataset, mix: Mix) -> tuple[Readable, Readable]:
        return ds, mix  # both are what the adapters read: checked here, not first at a user's call


def _epoch_orders(view: Dataset) -> Callable[[int], Positions]:
    """Source epoch ``t`` -> the view's own order in its epoch ``t``. The view is the mix's own copy, so
    moving its epoch disturbs nobody; the view's arithmetic is used, never a copy of it."""

    def order(t: int) -> Positions:
        view.set_epoch(t)
        found = view.epoch_positions()
        if len(found) != len(view):
            # A sidecar continuing its stream's progress serves what an epoch has left, not a whole one.
            raise ConfigError(f"{view!r} serves part of its epoch {t} (a resumed stream); it cannot be mixed")
        return found

    return order


def _source_items(view: Dataset, indexes: Positions, epoch: int, rank: int | None = None) -> Iterator[Item]:
    """``view``'s items at ``indexes`` read ahead, noted in its ledger when it records: as picks of the
    view's own indexes, under the mix's ``epoch`` (for ``rank``: a re-cut epoch reads sources whole)."""
    items = view.iter_positions(indexes)
    recorder = view._recorder()
    if recorder is None or view._ledger is None:
        return items
    reading = view._reading(Order.INDEX).model_copy(
        update={"epoch": epoch} if rank is None else {"epoch": epoch, "rank": rank}
    )
    return _noted(items, indexes, recorder, reading, view._ledger)


def _recut_items(view: Dataset, rows: Positions, epoch: int) -> Iterator[Item]:
    """``view``'s sidecar rows ``rows`` of a re-cut mix epoch read ahead, noted in its ledger when it
    records: as picks of the sidecar's re-cut rows (0 = its first), with the re-cut's progress, which the
    serving side records as the selection positions it serves in those rows (``Consumed.recut_as``)."""
    items = view._iter_source(rows)
    recorder, resume = view._recorder(), view._source.resume
    if recorder is None or view._ledger is None or resume is None:
        return items
    cut = resume.progress
    fresh = cut.model_copy(update={"segments": (*cut.segments[:-1], Segment.fresh(cut.current.world_size))})
    reading = view._reading(Order.INDEX, progress=fresh).model_copy(update={"epoch": epoch})
    return _noted(items, rows - resume.first, recorder, reading, view._ledger)


def _noted(
    items: Iterator[Item],
    indexes: Positions,
    recorder: _ledger.Recorder,
    reading: Reading,
    ledger: _ledger.Ledger,
) -> Iterator[Item]:
    done = noted = 0
    every = min(_NOTE_EVERY, ledger.flush_items)
    try:
        for item in items:
            done += 1  # counted before it is handed out, as a Dataset's pass counts
            if done - noted >= every:
                recorder.picked(reading, indexes[noted:done], ledger)
                noted = done
            yield item
    finally:
        if done > noted:
            recorder.picked(reading, indexes[noted:done], ledger)


Sources = (
    Mapping[str, Dataset] | Mapping[Dataset, float] | Sequence[Dataset] | Sequence[tuple[Dataset, float]]
)


def mix(
    sources: Sources,
    weights: Mapping[str, float] | Sequence[float] | None = None,
    *,
    names: Sequence[str] | None = None,
    seed: int | None = None,
    epoch_length: int | str = Stop.FIRST_EXHAUSTED,
) -> Mix:
    """One dataset view over several, read in proportion to ``weights`` (see the README, "Mixing").

    ``sources``: ``{"coco": coco, "web": web}`` (names are the keys; ``weights`` a mapping with the same
    keys or a list in their order), or a list of datasets with ``weights`` a list and optional ``names``
    (default ``"0"``, ``"1"``...), or ``[(coco, 0.7), (web, 0.3)]`` / ``{coco: 0.7, web: 0.3}``. Weights
    are any positive numbers (only their ratios count; default: equal). ``seed``: as ``.shuffle(seed)``.
    ``epoch_length``: ``"first_exhausted"`` (default: the longest epoch in which no source repeats an
    item), ``"all_exhausted"`` (every source read through at least once) or a number of items.
    """
    views, weight_list, name_list = _parse(sources, weights, names)
    spec = MixSpec.checked(names=name_list, weights=weight_list, epoch_length=epoch_length)
    # The mix's own copies: it moves their epochs to read their orders.
    mixed = Mix(tuple(ds._derive() for ds in views), spec)
    return mixed if seed is None else mixed.shuffle(seed)


def _parse(
    sources: Sources,
    weights: Mapping[str, float] | Sequence[float] | None,
    names: Sequence[str] | None,
) -> tuple[list[Dataset], list[float], list[str]]:
    keys: list[str] | None = None
    given: Any = weights  # checked below, whatever the caller passed
    if isinstance(sources, Mapping):
        items: list[tuple[Any, Any]] = list(sources.items())
        if items and all(isinstance(k, str) for k, _ in items):
            if names is not None:
                raise ConfigError("names come from the mapping's keys; drop names= or pass a list")
            keys = [str(k) for k, _ in items]
            views: list[Any] = [v for _, v in items]
        else:
            if weights is not None:
                raise ConfigError("a {dataset: weight} mapping carries its weights; drop weights=")
            views = [k for k, _ in items]
            given = [v for _, v in items]
    elif isinstance(sources, Sequence) and not isinstance(sources, str | bytes):
        entries: list[Any] = list(sources)
        if entries and all(isinstance(e, tuple) for e in entries):
            if weights is not None:
                raise ConfigError("(dataset, weight) pairs carry their weights; drop weights=")
            if not all(len(e) == 2 for e in entries):
                raise ConfigError("mix pairs must be (dataset, weight)")
            views = [e[0] for e in entries]
            given = [e[1] for e in entries]
        else:
            views = entries
    else:
        kind = type(sources).__name__
        raise ConfigError(f"mix sources must be a mapping or a list of datasets, got {kind}")
    for view in views:
        if not isinstance(view, Dataset):
            what = "a mix (mixes do not nest)" if isinstance(view, Mix) else type(view).__name__
            raise ConfigError(f"mix sources must be sluicegate Datasets, got {what}")
    if keys is None:
        keys = [str(i) for i in range(len(views))] if names is None else [str(n) for n in names]
        if len(keys) != len(views):
            raise ConfigError(f"{len(views)} sources but {len(keys)} names")
    if given is None:
        weight_list = [1.0] * len(views)
    elif isinstance(given, Mapping):
        missing = [k for k in keys if k not in given]
        extra = [str(k) for k in given if k not in keys]
        if missing or extra:
            raise ConfigError(
                "weights must name exactly the sources"
                + (f"; no weight for {', '.join(map(repr, missing))}" if missing else "")
                + (f"; no source named {', '.join(map(repr, extra))}" if extra else "")
            )
        weight_list = [_number(given[k]) for k in keys]
    elif isinstance(given, Sequence) and not isinstance(given, str | bytes):
        weight_list = [_number(w) for w in given]
    else:
        raise ConfigError(f"weights must be a list or a mapping of numbers, got {type(given).__name__}")
    return views, weight_list, keys


def _number(value: object) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"weights must be numbers > 0, got {value!r}")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"weights must be numbers > 0, got {value!r}") from None
