"""Sharding and shuffling as pure functions of (item count, seed, epoch, rank, world size, worker).

No I/O and no environment here: :func:`sluicegate.core.env.detect` reads ranks from the environment,
these functions do the arithmetic, and tests check their invariants directly.

The plan, for ``n`` items in query order:

1. *Assignment.* Positions ``0..n-1`` are permuted once with ``seed`` (if shuffling) and cut into
   ``world_size`` contiguous blocks, one per rank; a rank keeps its block for every epoch, so its
   sidecar caches only that block.
2. *Equal length.* Every rank gets the same count: ``ceil(n / world_size)`` with ``pad`` (short
   blocks repeat items from the start of the assignment), ``floor(n / world_size)`` with ``drop``
   (the last ``n mod world_size`` items of the assignment are left out).
3. *Epoch order.* Each epoch, a rank visits its block in an order permuted by ``(seed, epoch, rank)``.
4. *Workers.* DataLoader worker ``w`` of ``k`` takes every ``k``-th position of the rank's epoch
   order starting at ``w``: disjoint, and together exactly the rank's order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sluicegate._exceptions import ConfigError

Positions = npt.NDArray[np.int64]


class Remainder(StrEnum):
    """What to do when items do not divide evenly among ranks."""

    PAD = "pad"
    DROP = "drop"


class ShardSpec(BaseModel):
    """Which part of a selection one rank reads and in which order: stated here once and carried whole
    (the sidecar's configuration, the broker's plan and the sidecar's Info extend it)."""

    model_config = ConfigDict(frozen=True)

    rank: int = Field(default=0, ge=0, description="this rank, in [0, world_size)")
    world_size: int = Field(default=1, ge=1, description="number of ranks the selection is cut for")
    seed: int = Field(default=0, description="shuffle seed")
    shuffle: bool = Field(default=True, description="permute the selection before cutting it")
    remainder: Remainder = Field(default=Remainder.PAD, description="pad or drop, to give ranks equal counts")

    @model_validator(mode="after")
    def _rank_in_world(self) -> ShardSpec:
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, {self.world_size})")
        return self

    def shard_spec(self) -> ShardSpec:
        """The spec alone, out of a model that extends it."""
        return ShardSpec(**{name: getattr(self, name) for name in ShardSpec.model_fields})

    def positions(self, n: int) -> Positions:
        """:func:`shard` of ``n`` items for this spec."""
        return shard(
            n, self.rank, self.world_size, seed=self.seed, shuffle=self.shuffle, remainder=self.remainder
        )

    def seeded(self, seed: int | None) -> ShardSpec:
        """This spec shuffled with ``seed`` (``None``: not shuffled), as a dataset view applies its seed."""
        return self.model_copy(update={"seed": seed or 0, "shuffle": seed is not None})


def _check(rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ConfigError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in [0, {world_size}), got {rank}")


def permutation(n: int, seed: int, *stream: int) -> Positions:
    """A permutation of ``0..n-1`` determined by ``seed`` and the ``stream`` integers."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed & (2**63 - 1), *stream])))
    return rng.permutation(n).astype(np.int64)


def per_rank(n: int, world_size: int, remainder: Remainder) -> int:
    """How many items each rank gets per epoch."""
    return -(-n // world_size) if remainder is Remainder.PAD else n // world_size


def shard(
    n: int,
    rank: int,
    world_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    remainder: Remainder = Remainder.PAD,
) -> Positions:
    """The positions (into the ``n`` query results) that ``rank`` owns, in assignment order."""
    _check(rank, world_size)
    order = permutation(n, seed) if shuffle else np.arange(n, dtype=np.int64)
    return _cut(order, rank, world_size, remainder)


def _cut(order: Positions, rank: int, world_size: int, remainder: Remainder) -> Positions:
    """Rank ``rank``'s block of ``order`` cut in ``world_size`` equal blocks (padded or dropped): the
    assignment of :func:`shard`, and of every later segment of a resumed epoch."""
    n = len(order)
    count = per_rank(n, world_size, remainder)
    if n == 0 or count == 0:
        return np.empty(0, dtype=np.int64)
    # Blocks are as even as they can be: the first n % world_size ranks hold one more item.
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    block = order[start : start + base + (rank < extra)]
    if len(block) >= count:
        return block[:count]
    pad = np.resize(order, count - len(block))  # wraps around the assignment when n < world_size
    return np.concatenate([block, pad])


def epoch_order(count: int, *, seed: int, epoch: int, rank: int = 0, shuffle: bool = True) -> Positions:
    """The order in which a rank visits its ``count`` items in ``epoch`` (indexes into its shard)."""
    if epoch < 0:
        raise ConfigError(f"epoch must be >= 0, got {epoch}")
    return permutation(count, seed, epoch, rank) if shuffle else np.arange(count, dtype=np.int64)


def assign(selected: Positions, spec: ShardSpec | None) -> Positions:
    """``selected`` (positions in query order) cut to ``spec``'s shard, in assignment order; all of it when
    not sharded. A dataset view and the ledger's reader both go through here."""
    return selected if spec is None else selected[spec.positions(len(selected))]


def visit_order(
    count: int, *, seed: int | None, epoch: int, rank: int = 0, worker: int = 0, num_workers: int = 1
) -> Positions:
    """Indexes ``0..count-1`` of a view in the order it visits them in ``epoch`` (shuffled by ``seed``, in
    order when ``None``), worker ``worker``'s part of it. A dataset view and the ledger's reader both go
    through here."""
    order = epoch_order(count, seed=seed or 0, epoch=epoch, rank=rank, shuffle=seed is not None)
    return worker_split(order, worker, num_workers)


def worker_split(order: Positions, worker: int, num_workers: int) -> Positions:
    """The part of ``order`` that DataLoader worker ``worker`` of ``num_workers`` reads."""
    if num_workers < 1 or not 0 <= worker < num_workers:
        raise ConfigError(f"worker must be in [0, {num_workers}), got {worker}")
    return order[worker::num_workers]


# -- resuming an epoch at another world size ------------------------------------------------------
#
# An epoch's *progress* is a list of segments. Segment 0 is the plan above for its world size. A segment
# records its world size and, per rank, what that rank consumed of its order (:data:`Pass`es). The items
# left after a segment are, in this order: each rank's unconsumed items in its visiting order, rank after
# rank, then the items the segment's cut dropped; an item consumed anywhere in the segment (a pad repeat
# included) is left out, and each item is kept once. The next segment cuts that remainder in its world
# size's equal blocks (pad or drop, on the remainder), and each rank visits its block in that order (it was
# shuffled by segment 0 already). So over a whole epoch every selected item is visited exactly once, apart
# from pad repeats and drop's omissions (see :func:`rank_plan`), deterministically in (seed, epoch, the
# segments' world sizes and counts).

MAX_SEGMENTS = 32  # re-cuts of one epoch: each is a restart at another world size
MAX_PASSES = 16  # passes of one rank over one segment that consumed something (restarts at the same size)
MAX_WORKERS = 1024

Pass = tuple[int, ...]
"""One reader's pass over what a rank had left of a segment: for each of its DataLoader workers (as many as
the tuple is long), how many items of its part it consumed. Worker ``w`` of ``k`` reads every ``k``-th
remaining item from ``w`` (:func:`worker_split`) in order, so what it consumed is a prefix of its part and
the count says exactly which items: unequal counts (a worker one batch ahead) lose nothing."""


class Segment(BaseModel):
    """One stretch of an epoch at one world size: what each rank consumed of its order in it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    world_size: int = Field(ge=1, description="ranks the segment's remainder was cut for")
    consumed: tuple[tuple[Pass, ...], ...] = Field(description="per rank, its passes over the segment")

    @model_validator(mode="after")
    def _shape(self) -> Segment:
        if len(self.consumed) != self.world_size:
            raise ValueError(
                f"consumed names {len(self.consumed)} ranks for a world size of {self.world_size}"
            )
        for rank, passes in enumerate(self.consumed):
            if len(passes) > MAX_PASSES:
                raise ValueError(f"rank {rank} has {len(passes)} passes; at most {MAX_PASSES} are kept")
            for counts in passes:
                if not 1 <= len(counts) <= MAX_WORKERS or min(counts) < 0:
                    raise ValueError(f"rank {rank}'s pass {list(counts)} is not 1-{MAX_WORKERS} counts >= 0")
        return self

    @classmethod
    def fresh(cls, world_size: int) -> Segment:
        """A segment nobody has read from yet."""
        return cls(world_size=world_size, consumed=((),) * world_size)

    @property
    def started(self) -> bool:
        return any(count for passes in self.consumed for counts in passes for count in counts)


class Progress(BaseModel):
    """How far one epoch got: its segments, oldest first; the last is the one being read now."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epoch: int = Field(ge=0)
    segments: tuple[Segment, ...] = Field(min_length=1, max_length=MAX_SEGMENTS)

    @classmethod
    def start(cls, epoch: int, world_size: int) -> Progress:
        return cls(epoch=epoch, segments=(Segment.fresh(world_size),))

    @property
    def current(self) -> Segment:
        return self.segments[-1]

    @property
    def segment(self) -> int:
        """The index of the segment being read."""
        return len(self.segments) - 1

    def cuts_as(self, other: Progress) -> bool:
        """Whether ``other`` cuts its current segment as this does (one epoch, the same closed segments,
        the same world size): then both give every rank the same assignment in it."""
        return (self.epoch, self.segments[:-1], self.current.world_size) == (
            other.epoch,
            other.segments[:-1],
            other.current.world_size,
        )

    def recut(self, world_size: int) -> Progress:
        """This progress continued at ``world_size``: the current segment closes (as it stands) and a new
        one cuts what is left; unchanged at the same world size. A segment nobody read from is replaced
        rather than closed, so a restart before the first item costs no segment."""
        if self.current.world_size == world_size:
            return self
        if not self.current.started:
            return self.model_copy(update={"segments": (*self.segments[:-1], Segment.fresh(world_size))})
        if len(self.segments) >= MAX_SEGMENTS:
            raise ConfigError(
                f"epoch {self.epoch} was already re-cut {MAX_SEGMENTS - 1} times; finish it at one world "
                "size (or start the next epoch) before changing the world size again"
            )
        return self.model_copy(update={"segments": (*self.segments, Segment.fresh(world_size))})

    def consumed_by(self, rank: int, passes: tuple[Pass, ...]) -> Progress:
        """This progress with ``rank``'s passes over the current segment set to ``passes``."""
        current = self.current
        if not 0 <= rank < current.world_size:
            raise ConfigError(f"rank {rank} is outside the current segment's world size {current.world_size}")
        consumed = tuple(passes if r == rank else p for r, p in enumerate(current.consumed))
        segment = Segment(world_size=current.world_size, consumed=consumed)
        return self.model_copy(update={"segments": (*self.segments[:-1], segment)})

    def after(self, rank: int, length: int, step: Pass | None) -> Progress:
        """This progress with ``rank``'s reader having consumed ``step`` (None: nothing) more of what its
        order of ``length`` slots had left in the current segment."""
        passes = self.current.consumed[rank] + ((step,) if step is not None else ())
        return self.consumed_by(rank, normalize(length, passes))

    def lockstep(self, passes: tuple[Pass, ...]) -> Progress:
        """This progress with every rank of the current segment having consumed ``passes``: what one rank's
        checkpoint says of all ranks in lockstep data-parallel training."""
        current = self.current
        segment = Segment(world_size=current.world_size, consumed=(passes,) * current.world_size)
        return self.model_copy(update={"segments": (*self.segments[:-1], segment)})


class RankState(BaseModel):
    """What one rank's ``state_dict()`` says of its epoch; a Dataset's and a Mix's add what identifies the
    view, which a load checks so a resume never silently reorders.

    ``position`` counts what this rank consumed of its epoch's current segment; ``progress`` says which
    items (None: a prefix of ``position`` items, or nothing, of an epoch never re-cut). Unless ``merged``
    (:func:`merge`), the current segment's every rank is taken to have consumed what rank ``rank`` did:
    lockstep data-parallel training."""

    model_config = ConfigDict(extra="forbid")

    epoch: int = Field(ge=0)
    position: int = Field(ge=0)
    rank: int = Field(default=0, ge=0)
    world_size: int = Field(default=1, ge=1)
    sharded: bool = Field(default=True, description="False: an unsharded view (cannot be re-cut)")
    remainder: Remainder = Remainder.PAD
    progress: Progress | None = None
    merged: bool = False

    def own(self) -> Progress:
        """The epoch's progress as this rank saved it (its own passes; other ranks' as it knew them)."""
        if self.progress is not None:
            return self.progress
        passes = ((self.position,),) if self.position else ()
        return Progress.start(self.epoch, self.world_size).lockstep(passes)

    def continued(self) -> Progress | None:
        """The progress a load continues (None: a fresh epoch): every rank where this one stood, unless
        merged."""
        if self.progress is None and not self.position:
            return None
        progress = self.own()
        if progress.epoch != self.epoch or self.rank >= progress.current.world_size:
            raise ConfigError(
                f"this state is malformed: its progress is of epoch {progress.epoch} at world size "
                f"{progress.current.world_size}, its epoch {self.epoch} and rank {self.rank}"
            )
        return progress if self.merged else progress.lockstep(progress.current.consumed[self.rank])

    def continued_at(self, world_size: int, recuttable: bool, how: str) -> Progress | None:
        """What a view at ``world_size`` continues of this state: :meth:`continued`, re-cut if it is of
        another world size, which needs views that can be re-cut on both sides (``how`` says how)."""
        progress = self.continued()
        if progress is None or progress.current.world_size == world_size:
            return progress
        if not (recuttable and self.sharded):
            raise ConfigError(
                f"this state was saved at world size {progress.current.world_size} and this view is at "
                f"{world_size}; resuming at another world size needs {how}"
            )
        return progress.recut(world_size)


State = TypeVar("State", bound=RankState)


def merge(states: Sequence[State], same: Sequence[str]) -> State:
    """One state out of every rank's (ranks ``0..world_size-1``, saved at one point of one epoch, equal in
    the fields ``same``): what each rank really consumed, for ranks that did not move in lockstep."""
    if not states:
        raise ConfigError("merge_states needs the states of every rank, got none")
    first = states[0]
    if sorted(p.rank for p in states) != list(range(first.world_size)):
        raise ConfigError(
            f"merge_states needs one state per rank 0..{first.world_size - 1}, got ranks "
            f"{sorted(p.rank for p in states)}"
        )
    for p in states[1:]:
        differ = [f for f in ("epoch", "world_size", *same) if getattr(p, f) != getattr(first, f)]
        if differ or p.own().segments[:-1] != first.own().segments[:-1]:
            raise ConfigError(
                f"rank {p.rank}'s state is of another epoch or view than rank {first.rank}'s "
                f"({', '.join(differ) or 'segments'} differ): merge states saved at one point"
            )
    merged = first.own()
    for p in sorted(states, key=lambda p: p.rank):
        merged = merged.consumed_by(p.rank, p.own().current.consumed[p.rank])
    return first.model_copy(update={"rank": 0, "progress": merged, "merged": True})


def _taken(length: int, counts: Pass) -> npt.NDArray[np.bool_]:
    """Which of ``length`` remaining items a pass with these worker counts consumed."""
    k = len(counts)
    place = np.arange(length)
    parts = [(length - w + k - 1) // k for w in range(k)]  # items in each worker's part
    over = [w for w in range(k) if counts[w] > parts[w]]
    if over:
        w = over[0]
        raise ConfigError(
            f"a pass says worker {w} of {k} consumed {counts[w]} items, but its part of the {length} "
            f"remaining items holds {parts[w]}: this progress is not of this epoch's plan"
        )
    taken: npt.NDArray[np.bool_] = place // k < np.asarray(counts, dtype=np.int64)[place % k]
    return taken


def remaining(length: int, passes: tuple[Pass, ...] = ()) -> Positions:
    """Slots ``0..length-1`` of a rank's order that ``passes`` left unconsumed, in order: what its next
    reader visits (split among its workers by :func:`worker_split`)."""
    todo = np.arange(length, dtype=np.int64)
    for counts in passes:
        todo = todo[~_taken(len(todo), counts)]
    return todo


def consumed(length: int, passes: tuple[Pass, ...]) -> npt.NDArray[np.bool_]:
    """A mask over the ``length`` slots of a rank's order: True where ``passes`` consumed it."""
    mask = np.ones(length, dtype=bool)
    mask[remaining(length, passes)] = False
    return mask


def covers(length: int, passes: tuple[Pass, ...], earlier: tuple[Pass, ...]) -> bool:
    """Whether ``passes`` consumed everything ``earlier`` did (a report that only grows)."""
    return bool(np.all(consumed(length, passes) >= consumed(length, earlier)))


def normalize(length: int, passes: tuple[Pass, ...]) -> tuple[Pass, ...]:
    """``passes`` in their shortest form: passes that consumed nothing go, and a consumed prefix of the
    order is one single-worker pass (``((n,),)``), which is what a lockstep restart leaves."""
    mask = consumed(length, passes)
    done = int(mask.sum())
    if not done:
        return ()
    if bool(mask[:done].all()):
        return ((done,),)
    kept = tuple(p for p in passes if any(p))
    if len(kept) > MAX_PASSES:
        raise ConfigError(
            f"a rank restarted {len(kept)} times within one segment of its epoch leaving items behind; "
            f"at most {MAX_PASSES} such passes are kept"
        )
    return kept


def pass_of(todo: int, slots: Positions, num_workers: int) -> Pass:
    """The :data:`Pass` of a reader whose ``num_workers`` workers split ``todo`` remaining items and that
    consumed the remaining items at places ``slots`` (indexes into the remaining items). Each worker
    consumes a prefix of its part; a worker whose consumption is not one (a consumer that skipped items)
    is counted up to its first gap, so nothing it did not consume counts as consumed."""
    k = max(1, num_workers)
    places = np.unique(np.asarray(slots, dtype=np.int64))
    if places.size and (places[0] < 0 or places[-1] >= todo):
        raise ConfigError(f"consumed places must be in [0, {todo}), got {int(places[0])}..{int(places[-1])}")
    counts = []
    for w in range(k):
        mine = places[places % k == w] // k
        # A prefix 0..c-1 is exactly the places whose rank among them equals their value.
        gaps = np.flatnonzero(mine != np.arange(len(mine)))
        counts.append(int(gaps[0]) if gaps.size else len(mine))
    return tuple(counts)


def segment_order(count: int, *, seed: int, shuffle: bool, epoch: int, rank: int, segment: int) -> Positions:
    """How a rank visits its ``count`` items of a segment: segment 0 in :func:`epoch_order`, a later one
    in the order its remainder already has (segment 0 shuffled it)."""
    if segment == 0:
        return epoch_order(count, seed=seed, epoch=epoch, rank=rank, shuffle=shuffle)
    return np.arange(count, dtype=np.int64)


def _segment(
    rest: Positions, spec: ShardSpec, epoch: int, index: int, rank: int, world_size: int
) -> tuple[Positions, Positions]:
    """Rank ``rank``'s assignment (positions into the selection) and visiting order in segment ``index``
    of ``world_size`` ranks, whose remainder is ``rest``."""
    assignment = _cut(rest, rank, world_size, spec.remainder)
    order = segment_order(
        len(assignment), seed=spec.seed, shuffle=spec.shuffle, epoch=epoch, rank=rank, segment=index
    )
    return assignment, order


def remainder_after(
    n: int,
    spec: ShardSpec,
    epoch: int,
    segments: tuple[Segment, ...],
    first: Callable[[int, int], Positions] | None = None,
) -> Positions:
    """The selection positions (of ``n``) that ``segments`` of ``epoch`` left, in the order the next
    segment cuts them (see the section's comment). ``first(rank, world_size)``: each rank's sequence in
    segment 0 (positions of ``n``) when the epoch is not this module's plan (a mix's, whose epoch holds
    only what it picked of each source: nothing else is left over)."""
    if first is not None:
        rest = np.empty(0, dtype=np.int64)  # segment 0's is what its ranks' sequences hold
    else:
        rest = permutation(n, spec.seed) if spec.shuffle else np.arange(n, dtype=np.int64)
    for index, seg in enumerate(segments):
        taken = np.zeros(n, dtype=bool)
        assigned = np.zeros(n, dtype=bool)
        left = []
        for rank in range(seg.world_size):
            if index == 0 and first is not None:
                sequence = assignment = first(rank, seg.world_size)
            else:
                assignment, order = _segment(rest, spec, epoch, index, rank, seg.world_size)
                sequence = assignment[order]
            todo = remaining(len(sequence), seg.consumed[rank])
            mask = np.ones(len(sequence), dtype=bool)
            mask[todo] = False
            taken[sequence[mask]] = True
            assigned[assignment] = True
            left.append(sequence[todo])
        if index or first is None:
            left.append(rest[~assigned[rest]])  # what drop left out goes on to the next segment
        joined = np.concatenate(left)
        joined = joined[~taken[joined]]
        _, at = np.unique(joined, return_index=True)
        rest = joined[np.sort(at)]
    return rest


def recut_assignment(rest: Positions, spec: ShardSpec) -> Positions:
    """Rank ``spec.rank``'s assignment in a re-cut segment whose remainder is ``rest``
    (:func:`remainder_after`): what a broker serves a pod of that segment."""
    return _cut(rest, spec.rank, spec.world_size, spec.remainder)


@dataclass(frozen=True)
class RankPlan:
    """What one rank reads of one epoch: its ``assignment`` (positions into the selection; pad repeats),
    the ``order`` it visits them in (indexes into the assignment), the slots of that order still to visit
    (``todo``, indexes into ``order``) and the segment they belong to."""

    assignment: Positions
    order: Positions
    todo: Positions
    segment: int

    def visit(self, worker: int = 0, num_workers: int = 1) -> Positions:
        """Indexes into the assignment that worker ``worker`` of ``num_workers`` visits, in order."""
        return self.order[worker_split(self.todo, worker, num_workers)]


def rank_plan(
    n: int,
    spec: ShardSpec,
    *,
    epoch: int,
    progress: Progress | None = None,
    whole: bool = False,
    order_rank: int | None = None,
) -> RankPlan:
    """Rank ``spec.rank``'s plan of ``epoch`` over a selection of ``n`` items, continuing ``progress`` when
    it is of this epoch (its current segment must be of ``spec.world_size``).

    Without progress this is :func:`shard` visited in :func:`epoch_order`. ``whole``: the view is not
    sharded (one rank, the selection in query order, as :func:`assign` leaves it); its order is drawn for
    ``order_rank`` (a sidecar's rank), and it cannot be re-cut.

    Guarantees over a whole epoch, its last segment read to the end: every rank gets the same count in
    each segment; *drop* visits no item twice and leaves out fewer items than the last segment's world
    size (its cut's remainder); *pad* visits every item, and visits beyond one per item come only from pad
    slots: at most ``-len(remainder) % world_size`` per segment.
    """
    rank = spec.rank if order_rank is None else order_rank
    if progress is not None and progress.epoch != epoch:
        progress = None
    if progress is not None and progress.current.world_size != spec.world_size:
        raise ConfigError(
            f"the epoch's progress is at world size {progress.current.world_size}, this view is cut for "
            f"{spec.world_size}: re-cut it first (Progress.recut)"
        )
    segment = 0 if progress is None else progress.segment
    if whole:
        if segment:
            raise ConfigError("an unsharded view cannot continue an epoch re-cut for another world size")
        assignment = np.arange(n, dtype=np.int64)
        order = epoch_order(n, seed=spec.seed, epoch=epoch, rank=rank, shuffle=spec.shuffle)
    elif progress is None or segment == 0:
        assignment = spec.positions(n)
        order = epoch_order(len(assignment), seed=spec.seed, epoch=epoch, rank=rank, shuffle=spec.shuffle)
    else:
        rest = remainder_after(n, spec, epoch, progress.segments[:-1])
        assignment, order = _segment(rest, spec, epoch, segment, spec.rank, spec.world_size)
    passes = () if progress is None else progress.current.consumed[spec.rank]
    return RankPlan(assignment, order, remaining(len(order), passes), segment)
