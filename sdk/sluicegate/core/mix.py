"""Weighted mixing as pure functions of (source lengths, weights, seed, epoch, rank, worker).

No I/O here: :mod:`sluicegate._mix` (``sluicegate.mix``) reads the sources, these functions decide which
item of which source comes next, and tests check their invariants directly.

A mix of sources ``0..k-1`` with weights ``w_i`` (any positive numbers; only their ratios count) reads,
on one rank, the rank's shard of every source (each source sharded with the same rank, world size and
pad/drop rule, so each has the same length ``m_i`` on every rank). One *epoch* of the mix:

1. *Length.* ``L = floor(min_i m_i / p_i)`` with ``p_i = w_i / sum(w)`` (``"first_exhausted"``, the
   default): the largest epoch in which no source has to repeat an item. ``"all_exhausted"`` takes
   ``ceil(max_i m_i / p_i)`` (every source read at least once through; the others repeat), an ``int``
   any length. ``L`` is the same on every rank, so distributed training never waits on a short rank.
2. *Counts.* Source ``i`` gives ``c_i`` items: ``L * p_i`` rounded by largest remainder (ties to the
   lower source), so ``sum c_i = L`` and ``|c_i - L p_i| < 1``; with the default, ``c_i <= m_i``.
3. *Which items.* Each source is read as if it were iterated on its own, epoch after epoch in its own
   epoch order (its shuffle seed, its rank), and mix epoch ``e`` takes the next ``c_i`` items of that
   stream: positions ``[e c_i, (e + 1) c_i)``. A source larger than its share is so read round-robin
   across mix epochs, not the same prefix every time. Where a mix epoch spans the seam between two of a
   source's epochs, the items of the new source epoch that this mix epoch already had from the old one
   are put off until just after it (:func:`seam`): no item repeats within a mix epoch (when
   ``c_i <= m_i``), and every pass over a source still reads each of its items exactly once.
4. *Interleave.* Unshuffled, the ``c_i`` slots of each source are spread evenly over the epoch (slot
   ``j`` of source ``i`` at ``(j + 1/2) / c_i``: a smooth interleave, every stretch of the epoch close
   to the weights). Shuffled, the sources' slots are permuted by ``(seed, epoch, rank)``: exact counts,
   random positions. Either way each source's items come in its own stream order.
5. *Workers.* DataLoader worker ``w`` of ``n`` takes every ``n``-th entry of the epoch from ``w``.

Elastic resume: an epoch saved at one world size goes on at another as a dataset's does
(:mod:`sluicegate.core.partition`), over *keys*: item ``p`` of source ``i`` (its place in the source's
selection, before sharding) is ``offset_i + p`` (:class:`MixKeys`). Segment 0 is the mix's epoch above,
every rank's sequence of keys; what its ranks left is re-cut in equal blocks for the next world size
(:meth:`MixKeys.recut`), each block read in the order it has. So over the epoch each item the mix epoch
picked is read once (but pad's repeats), and ranks stay equal. The next epoch is the mix's epoch at the
new world size: its windows (step 3) are that world size's, so a source larger than its share is read
round-robin across the epochs of one world size.

Index space: the mix's indexes ``0..L-1`` are the smooth interleave's slots (:func:`layout`), stable
across epochs in which source each belongs to; which item a slot holds moves on each epoch (step 3).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sluicegate._exceptions import ConfigError
from sluicegate.core import partition as _partition
from sluicegate.core.partition import Positions, Progress, Remainder, ShardSpec

__all__ = [
    "EpochLength",
    "MixKeys",
    "MixPlan",
    "MixSpec",
    "SourceStream",
    "Stop",
    "apportion",
    "epoch_pairs",
    "layout",
    "mix_length",
    "seam",
    "source_seed",
    "weight_fractions",
]

_INTERLEAVE = 0x6D6978  # "mix": keeps the interleave's random stream apart from any source's
_KEEP = 3  # adjusted source epochs a stream keeps: the current one, its neighbours


class Stop(StrEnum):
    """Where a mix's epoch ends (the names Hugging Face's ``interleave_datasets`` uses)."""

    FIRST_EXHAUSTED = "first_exhausted"  # when the first source (relative to its weight) is read through
    ALL_EXHAUSTED = "all_exhausted"  # when the last is: the others repeat items within the epoch


EpochLength = int | Stop


class MixSpec(BaseModel):
    """A mix's sources by name, their weights and where its epoch ends: checked once, at ``mix()``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    names: tuple[str, ...] = Field(description="one per source, unique: what each sample's 'source' says")
    weights: tuple[float, ...] = Field(description="one per source, > 0; only their ratios count")
    epoch_length: EpochLength = Stop.FIRST_EXHAUSTED

    @field_validator("names")
    @classmethod
    def _names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        if len(names) < 2:
            raise ValueError(
                f"a mix needs at least two sources, got {len(names)}; use the dataset itself for one"
            )
        for name in names:
            if not name or not name.isprintable() or len(name) > 253:
                raise ValueError(f"source name {name!r} must be 1-253 printable characters")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; {', '.join(map(repr, dupes))} repeat")
        return names

    @field_validator("weights")
    @classmethod
    def _weights(cls, weights: tuple[float, ...]) -> tuple[float, ...]:
        bad = [w for w in weights if not (math.isfinite(w) and w > 0)]
        if bad:
            raise ValueError(f"weights must be finite and > 0, got {bad[0]!r}")
        return weights

    @field_validator("epoch_length", mode="before")
    @classmethod
    def _length(cls, value: object) -> object:
        if isinstance(value, bool):
            raise ValueError("epoch_length must be 'first_exhausted', 'all_exhausted' or an int >= 1")
        if isinstance(value, int) and value < 1:
            raise ValueError(f"epoch_length must be >= 1, got {value}")
        return value

    @model_validator(mode="after")
    def _one_weight_per_source(self) -> MixSpec:
        if len(self.weights) != len(self.names):
            raise ValueError(f"{len(self.names)} sources but {len(self.weights)} weights")
        return self

    @classmethod
    def checked(cls, **fields: Any) -> MixSpec:
        """The spec, or a :class:`ConfigError` that says what is wrong (the API's error, not pydantic's)."""
        try:
            return cls.model_validate(fields)
        except ValidationError as exc:
            problems = "; ".join(
                f"{e['loc'][0] if e['loc'] else 'mix'}: {str(e['msg']).removeprefix('Value error, ')}"
                for e in exc.errors()
            )
            raise ConfigError(f"bad mix: {problems}") from None


def weight_fractions(weights: Sequence[float]) -> list[Fraction]:
    """Each weight's share of the total, exactly. A float is read as the decimal it prints as (0.1 is
    1/10, not the binary fraction nearest it), so ``m / p`` is an integer where the user means one."""
    exact = [Fraction(repr(float(w))) for w in weights]
    total = sum(exact, Fraction(0))
    return [w / total for w in exact]


def mix_length(lengths: Sequence[int], shares: Sequence[Fraction], stop: EpochLength) -> int:
    """The epoch's length for sources of ``lengths`` items with ``shares`` (see the module docstring)."""
    if isinstance(stop, int) and not isinstance(stop, Stop):
        return int(stop)
    if Stop(stop) is Stop.FIRST_EXHAUSTED:
        return min(math.floor(m / p) for m, p in zip(lengths, shares, strict=True))
    return max(math.ceil(m / p) for m, p in zip(lengths, shares, strict=True))


def apportion(total: int, shares: Sequence[Fraction]) -> Positions:
    """``total`` split by ``shares``, by largest remainder (ties to the lower index): exact to < 1 each."""
    quotas = [total * p for p in shares]
    counts = [math.floor(q) for q in quotas]
    short = total - sum(counts)
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[:short]:
        counts[i] += 1
    return np.array(counts, dtype=np.int64)


def layout(counts: Sequence[int] | Positions) -> Positions:
    """The source of each of the epoch's slots, smoothly interleaved: slot ``j`` of source ``i`` sits at
    ``(2j + 1) / (2 c_i)`` of the epoch, ties to the lower source."""
    counts = np.asarray(counts, dtype=np.int64)
    sources = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    within = np.arange(len(sources), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    keys = (2 * within + 1) / (2 * np.repeat(counts, counts)).astype(np.float64)
    return sources[np.lexsort((sources, keys))]


def source_seed(seed: int, source: int) -> int:
    """The shuffle seed of source ``source`` in a mix shuffled with ``seed``: sources of the same length
    get unrelated orders (a permutation's seed goes through a SeedSequence, so neighbours are unrelated)."""
    return (int(seed) + source) & (2**64 - 1)


def seam(order: Positions, taken: Positions, head: int) -> Positions:
    """``order`` (a source epoch's order) with the items in ``taken`` (what the mix epoch spanning the seam
    already had from the previous source epoch) moved from the first ``head`` reads to just after them."""
    mask = np.zeros(len(order), dtype=bool)
    mask[taken] = True
    repeat = mask[order]
    free = np.flatnonzero(~repeat)
    end = int(free[head - 1]) + 1  # the head-th item not taken: exists while c_i <= m_i
    front, flags = order[:end], repeat[:end]
    return np.concatenate([front[~flags], front[flags], order[end:]])


class SourceStream:
    """One source as a mix reads it: its epochs one after another (``order(t)`` is the source's order in
    its own epoch ``t``), ``count`` items per mix epoch, seams adjusted (see the module docstring).

    Deterministic in its inputs; a few adjusted source epochs are kept, so reading epochs in turn costs one
    source-epoch order each. A cold start at a late epoch walks back only over seams that depend on the one
    before (sources whose share is over half their length), never further than it must.
    """

    def __init__(self, length: int, count: int, order: Callable[[int], Positions]) -> None:
        if length < 1:
            raise ConfigError("a mixed source has no items")
        self.length, self.count = int(length), int(count)
        self._order = order
        self._adjusted: dict[int, Positions] = {}

    def window(self, epoch: int) -> Positions:
        """Indexes (into the source) that mix epoch ``epoch`` reads, in stream order."""
        m, c = self.length, self.count
        start, end = epoch * c, (epoch + 1) * c
        if c == 0:
            return np.empty(0, dtype=np.int64)
        if c > m:
            # Longer than the source: it repeats within the epoch anyway; read its epochs as they are.
            parts = [self._order(t) for t in range(start // m, (end - 1) // m + 1)]
            joined = np.concatenate(parts)
            return joined[start - (start // m) * m :][:c]
        t, x = divmod(start, m)
        first = self._epoch(t)
        if end <= (t + 1) * m:
            return first[x : x + c]
        return np.concatenate([first[x:], self._epoch(t + 1)[: end - (t + 1) * m]])

    def _crossing(self, t: int) -> tuple[int, int] | None:
        """The mix window that spans the seam into source epoch ``t``: where it starts in epoch ``t - 1``
        and how many items it takes from ``t``; None when no window spans it."""
        m, c = self.length, self.count
        if t == 0:
            return None
        begin = ((t * m - 1) // c) * c  # the window holding the last item of source epoch t - 1
        if begin + c <= t * m:
            return None
        return begin - (t - 1) * m, begin + c - t * m

    def _epoch(self, t: int) -> Positions:
        """Source epoch ``t``'s order as the mix reads it (seam-adjusted)."""
        todo: list[int] = []
        u = t
        while u not in self._adjusted:
            cross = self._crossing(u)
            if cross is None:
                self._adjusted[u] = self._order(u)
                break
            todo.append(u)
            # A seam only reorders the first c reads of its epoch: a tail starting at >= c is the raw order's.
            if cross[0] >= self.count:
                break
            u -= 1
        for u in reversed(todo):
            cross = self._crossing(u)
            assert cross is not None
            x, head = cross
            before = self._adjusted.get(u - 1)
            tail = (before if before is not None else self._order(u - 1))[x:]
            self._adjusted[u] = seam(self._order(u), tail, head)
        found = self._adjusted[t]
        for old in sorted(self._adjusted)[:-_KEEP]:
            if abs(old - t) > 1:
                del self._adjusted[old]
        return found


class MixPlan:
    """One rank's mix: counts, layout and each source's stream, from the lengths of the rank's sources.

    ``orders[i](t)`` is source ``i``'s visiting order in its own epoch ``t`` (indexes into the rank's
    shard of it); :func:`epoch_pairs` passes :func:`sluicegate.core.partition.visit_order`'s.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        weights: Sequence[float],
        orders: Sequence[Callable[[int], Positions]],
        epoch_length: EpochLength = Stop.FIRST_EXHAUSTED,
        names: Sequence[str] | None = None,
    ) -> None:
        self.names = tuple(names) if names is not None else tuple(str(i) for i in range(len(lengths)))
        empty = [name for name, m in zip(self.names, lengths, strict=True) if m < 1]
        if empty:
            raise ConfigError(
                f"mixed source {', '.join(map(repr, empty))} has no items (on this rank): check its query, "
                "or with remainder 'drop' that it has at least as many items as there are ranks"
            )
        self.lengths = np.array(lengths, dtype=np.int64)
        shares = weight_fractions(weights)
        self.length = _length_checked(lengths, shares, epoch_length)
        self.counts = apportion(self.length, shares)
        self.sources = layout(self.counts)
        # The slot's place among its source's slots: the k-th slot of source i reads window_i[k].
        self.within = np.empty(self.length, dtype=np.int64)
        by_source = np.argsort(self.sources, kind="stable")
        self.within[by_source] = np.arange(self.length, dtype=np.int64) - np.repeat(
            np.cumsum(self.counts) - self.counts, self.counts
        )
        self._by_source = by_source
        self._streams = [
            SourceStream(int(m), int(c), order)
            for m, c, order in zip(self.lengths, self.counts, orders, strict=True)
        ]
        self._windows: dict[int, list[Positions]] = {}  # per epoch: random access asks for one often

    def count_of(self) -> Mapping[str, int]:
        return {name: int(c) for name, c in zip(self.names, self.counts, strict=True)}

    def visit_order(
        self, *, seed: int | None, epoch: int, rank: int = 0, worker: int = 0, num_workers: int = 1
    ) -> Positions:
        """The epoch's order as slots (indexes of the mix), worker ``worker``'s part of it."""
        if epoch < 0:
            raise ConfigError(f"epoch must be >= 0, got {epoch}")
        if seed is None:
            order = np.arange(self.length, dtype=np.int64)
        else:
            rng = np.random.Generator(
                np.random.PCG64(np.random.SeedSequence([seed & (2**63 - 1), epoch, rank, _INTERLEAVE]))
            )
            drawn = rng.permutation(self.sources)
            # The k-th time source i comes up in the draw it reads source i's k-th slot: own order kept.
            order = np.empty(self.length, dtype=np.int64)
            order[np.argsort(drawn, kind="stable")] = self._by_source
        return _partition.worker_split(order, worker, num_workers)

    def resolve(self, slots: Positions, epoch: int) -> tuple[Positions, Positions]:
        """For each slot, its source and the index into that source it holds in ``epoch``."""
        sources = self.sources[slots]
        indexes = np.empty(len(slots), dtype=np.int64)
        windows = self.windows(epoch)
        for i, window in enumerate(windows):
            picked = sources == i
            if picked.any():
                indexes[picked] = window[self.within[slots[picked]]]
        return sources, indexes

    def windows(self, epoch: int) -> list[Positions]:
        """What each source gives in ``epoch``: indexes into it, in its stream order."""
        found = self._windows.get(epoch)
        if found is None:
            if epoch < 0:
                raise ConfigError(f"epoch must be >= 0, got {epoch}")
            found = self._windows[epoch] = [stream.window(epoch) for stream in self._streams]
            for old in sorted(self._windows)[:-2]:
                del self._windows[old]
        return found


def _length_checked(lengths: Sequence[int], shares: Sequence[Fraction], stop: EpochLength) -> int:
    n = mix_length(lengths, shares, stop)
    if n < 1:
        raise ConfigError(
            f"this mix's epoch has no items: sources of {list(lengths)} items cannot fill one epoch at "
            "these weights; lower the weight of the smallest source or use epoch_length='all_exhausted'"
        )
    return n


def epoch_pairs(
    lengths: Sequence[int],
    weights: Sequence[float],
    *,
    epoch: int,
    seed: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    remainder: Remainder = Remainder.PAD,
    epoch_length: EpochLength = Stop.FIRST_EXHAUSTED,
    worker: int = 0,
    num_workers: int = 1,
) -> tuple[Positions, Positions]:
    """Rank ``rank``'s sequence for ``epoch`` of a mix of sources with ``lengths`` items (before sharding):
    each entry's source and its index into that source's rank shard
    (:func:`~sluicegate.core.partition.shard` of the source with seed :func:`source_seed`).

    ``seed`` shuffles both the interleave and every source (``None``: neither); this is the arithmetic
    ``sluicegate.mix(...).shard(rank, world_size).shuffle(seed)`` follows.
    """
    per_rank = [_partition.per_rank(int(n), world_size, remainder) for n in lengths]
    _partition.shard(0, rank, world_size)  # rank and world size checked, as a ConfigError

    def order_of(i: int) -> Callable[[int], Positions]:
        own = None if seed is None else source_seed(seed, i)
        return lambda t: _partition.visit_order(per_rank[i], seed=own, epoch=t, rank=rank)

    plan = MixPlan(per_rank, weights, [order_of(i) for i in range(len(lengths))], epoch_length)
    slots = plan.visit_order(seed=seed, epoch=epoch, rank=rank, worker=worker, num_workers=num_workers)
    return plan.resolve(slots, epoch)


@dataclass(frozen=True)
class MixKeys:
    """A mix's epochs as keys, for re-cutting them at another world size (elastic resume): source ``i``'s
    item ``p`` (its place in the source's selection, before sharding) is ``offset_i + p``, the offsets the
    running sum of ``lengths``. What a trainer's mix and the broker both compute a re-cut from."""

    lengths: tuple[int, ...]  # each source's selection
    weights: tuple[float, ...]
    seed: int | None  # None: not shuffled
    remainder: Remainder
    epoch_length: EpochLength

    def keys(self, epoch: int, rank: int, world_size: int) -> Positions:
        """Rank ``rank``'s sequence of ``epoch`` (:func:`epoch_pairs`), as keys."""
        sources, within = epoch_pairs(
            self.lengths,
            self.weights,
            epoch=epoch,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            remainder=self.remainder,
            epoch_length=self.epoch_length,
        )
        offsets = self._offsets()
        keys = np.empty(len(sources), dtype=np.int64)
        for i, n in enumerate(self.lengths):
            picked = sources == i
            cut = self._spec(rank, world_size, source_seed(self.seed, i) if self.seed is not None else None)
            keys[picked] = offsets[i] + cut.positions(int(n))[within[picked]]
        return keys

    def split(self, keys: Positions) -> tuple[Positions, Positions]:
        """Each key's source and its place in that source's selection (the inverse of :meth:`keys`)."""
        offsets = self._offsets()
        sources = np.searchsorted(offsets, keys, side="right") - 1
        return sources.astype(np.int64), (keys - offsets[sources]).astype(np.int64)

    def rest(self, progress: Progress) -> Positions:
        """The keys the closed segments of ``progress`` left, in the order the current segment cuts them."""
        return _partition.remainder_after(
            int(sum(self.lengths)),
            self._spec(0, 1, self.seed),
            progress.epoch,
            progress.segments[:-1],
            lambda rank, world: self.keys(progress.epoch, rank, world),
        )

    def recut(self, progress: Progress, rank: int) -> Positions:
        """Rank ``rank``'s keys in ``progress``'s current segment (one after segment 0: a re-cut), in the
        order it reads them: its block of what the closed segments left."""
        spec = self._spec(rank, progress.current.world_size, self.seed)
        return _partition.recut_assignment(self.rest(progress), spec)

    def segment_length(self, progress: Progress) -> int:
        """What each rank reads of ``progress``'s current segment: the mix's epoch on a rank in segment 0,
        its block of the re-cut after."""
        world = progress.current.world_size
        if not progress.segment:
            per_rank = [_partition.per_rank(int(n), world, self.remainder) for n in self.lengths]
            return _length_checked(per_rank, weight_fractions(self.weights), self.epoch_length)
        return _partition.per_rank(len(self.rest(progress)), world, self.remainder)

    def _offsets(self) -> Positions:
        return np.concatenate([[0], np.cumsum(np.asarray(self.lengths, dtype=np.int64))]).astype(np.int64)

    def _spec(self, rank: int, world_size: int, seed: int | None) -> ShardSpec:
        shuffled = seed is not None
        return ShardSpec(
            rank=rank, world_size=world_size, seed=seed or 0, shuffle=shuffled, remainder=self.remainder
        )
