"""Elastic resume as pure functions: an epoch continued at other world sizes visits every item exactly once
(up to pad's repeats and drop's omissions), with equal counts per rank in every segment (property-based)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sluicegate import ConfigError, Remainder
from sluicegate.core.partition import (
    MAX_SEGMENTS,
    Pass,
    Progress,
    Segment,
    ShardSpec,
    consumed,
    covers,
    epoch_order,
    normalize,
    pass_of,
    per_rank,
    rank_plan,
    remainder_after,
    remaining,
    shard,
    worker_split,
)

SETTINGS = settings(max_examples=150, deadline=None)


def _spec(rank: int, world: int, seed: int, shuffle: bool, remainder: Remainder) -> ShardSpec:
    return ShardSpec(rank=rank, world_size=world, seed=seed, shuffle=shuffle, remainder=remainder)


@dataclass
class Reader:
    """One rank's reader: ``workers`` DataLoader workers split what the rank has left, item by item."""

    workers: int
    fractions: list[float]  # how far each worker gets through its part (a worker may be one batch ahead)


def _read(plan_todo: np.ndarray, reader: Reader) -> tuple[Pass, np.ndarray]:
    """What ``reader`` consumes of the remaining slots: its pass and the slots, as the trainer saw them."""
    k = reader.workers
    counts, slots = [], []
    for w in range(k):
        part = worker_split(plan_todo, w, k)
        c = int(len(part) * reader.fractions[w % len(reader.fractions)])
        counts.append(c)
        slots.append(part[:c])
    return tuple(counts), np.concatenate(slots) if slots else np.empty(0, np.int64)


readers = st.builds(
    Reader,
    workers=st.integers(1, 4),
    fractions=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=4),
)
step = st.tuples(st.integers(1, 9), st.lists(readers, min_size=1, max_size=2), st.booleans())


@SETTINGS
@given(
    n=st.integers(0, 120),
    seed=st.integers(0, 2**64 - 1),
    shuffle=st.booleans(),
    remainder=st.sampled_from(list(Remainder)),
    epoch=st.integers(0, 5),
    steps=st.lists(step, min_size=0, max_size=4),
    last=st.integers(1, 9),
)
def test_any_sequence_of_world_sizes_visits_the_epoch_exactly_once(
    n: int,
    seed: int,
    shuffle: bool,
    remainder: Remainder,
    epoch: int,
    steps: list[tuple[int, list[Reader], bool]],
    last: int,
) -> None:
    """Each step runs a segment at a world size with one or more readers per rank (a rank restarted
    within the segment, with other worker counts), stopped part-way; the last segment reads to the end.
    ``lockstep``: every rank consumed what rank 0 did (one checkpoint), else each its own."""
    visits: Counter[int] = Counter()
    pads = 0
    progress: Progress | None = None
    for world, passes, lockstep in [*steps, (last, [Reader(1, [1.0])], False)]:
        # At the same world size the segment goes on; else a new one cuts what is left.
        goes_on = progress is not None and progress.current.world_size == world
        progress = Progress.start(epoch, world) if progress is None else progress.recut(world)
        plans = [
            rank_plan(n, _spec(r, world, seed, shuffle, remainder), epoch=epoch, progress=progress)
            for r in range(world)
        ]
        counts = {len(p.assignment) for p in plans}
        assert len(counts) == 1, "every rank gets the same count in every segment"
        if goes_on:
            pass
        elif plans[0].segment:
            rest = remainder_after(
                n, _spec(0, world, seed, shuffle, remainder), epoch, progress.segments[:-1]
            )
            assert sorted(rest.tolist()) == sorted(set(range(n)) - set(visits)), "the remainder is the rest"
            assert counts == {per_rank(len(rest), world, remainder)}
            pads += per_rank(len(rest), world, remainder) * world - len(rest)
        else:
            pads += per_rank(n, world, remainder) * world - n
        for r, plan in enumerate(plans):
            before = progress.current.consumed[r]
            if lockstep and r:
                rank_passes = progress.current.consumed[0]  # what rank 0 consumed, of this rank's order
                fresh = consumed(len(plan.order), rank_passes) & ~consumed(len(plan.order), before)
                visits.update(plan.assignment[plan.order[fresh]].tolist())
            else:
                rank_passes, todo = before, plan.todo
                for reader in passes:
                    this, slots = _read(todo, reader)
                    rank_passes = (*rank_passes, this)
                    visits.update(plan.assignment[plan.order[slots]].tolist())
                    todo = remaining(len(plan.order), rank_passes)
                rank_passes = normalize(len(plan.order), rank_passes)
                assert np.array_equal(remaining(len(plan.order), rank_passes), todo)
            progress = progress.consumed_by(r, rank_passes)
    assert progress is not None
    world = progress.current.world_size
    if remainder is Remainder.DROP:
        assert max(visits.values(), default=1) == 1, "drop never visits an item twice"
        assert n - len(visits) < world, "drop leaves out less than the last segment's world size"
    else:
        assert set(visits) == set(range(n)), "pad visits every item"
        assert sum(visits.values()) - n <= pads, "repeats come from pad slots only"


@SETTINGS
@given(
    n=st.integers(0, 200),
    seed=st.integers(0, 2**64 - 1),
    shuffle=st.booleans(),
    remainder=st.sampled_from(list(Remainder)),
    world=st.integers(1, 9),
    epoch=st.integers(0, 3),
)
def test_segment_zero_is_todays_plan(
    n: int, seed: int, shuffle: bool, remainder: Remainder, world: int, epoch: int
) -> None:
    for r in range(world):
        spec = _spec(r, world, seed, shuffle, remainder)
        plan = rank_plan(n, spec, epoch=epoch, progress=Progress.start(epoch, world))
        want = shard(n, r, world, seed=seed, shuffle=shuffle, remainder=remainder)
        assert np.array_equal(plan.assignment, want)
        order = epoch_order(len(want), seed=seed, epoch=epoch, rank=r, shuffle=shuffle)
        assert np.array_equal(plan.order, order)
        assert np.array_equal(plan.visit(), order)
        assert np.array_equal(rank_plan(n, spec, epoch=epoch).assignment, want)
        # Progress of another epoch does not apply.
        other = Progress.start(epoch + 1, world).lockstep(((1,),)) if len(want) else None
        assert np.array_equal(rank_plan(n, spec, epoch=epoch, progress=other).todo, np.arange(len(want)))


@SETTINGS
@given(length=st.integers(0, 300), workers=st.integers(1, 8), data=st.data())
def test_a_pass_says_exactly_which_items_its_workers_consumed(
    length: int, workers: int, data: st.DataObject
) -> None:
    todo = np.arange(length)
    parts = [worker_split(todo, w, workers) for w in range(workers)]
    counts = tuple(data.draw(st.integers(0, len(p))) for p in parts)
    slots = np.concatenate([p[:c] for p, c in zip(parts, counts, strict=True)])
    assert pass_of(length, slots, workers) == counts
    assert sorted(np.flatnonzero(consumed(length, (counts,))).tolist()) == sorted(slots.tolist())
    # A consumer that skipped an item counts each worker up to its first gap only.
    if slots.size:
        gap = data.draw(st.sampled_from(slots.tolist()))
        fewer = pass_of(length, slots[slots != gap], workers)
        assert fewer[gap % workers] == gap // workers
        assert covers(length, (counts,), (fewer,))
        assert not covers(length, (fewer,), (counts,))
    # The shortest form consumes the same.
    assert np.array_equal(consumed(length, normalize(length, (counts,))), consumed(length, (counts,)))


def test_worked_example_four_ranks_to_two_mid_epoch() -> None:
    """12 items, 4 ranks each read 2 of their 3 (rank 1 with 2 workers, one ahead), then 2 ranks finish."""
    n, seed = 12, 7
    progress = Progress.start(0, 4)
    seen = []
    for r in range(4):
        plan = rank_plan(n, _spec(r, 4, seed, True, Remainder.PAD), epoch=0, progress=progress)
        assert len(plan.assignment) == 3
        passes: tuple[Pass, ...] = ((2, 0),) if r == 1 else ((2,),)
        progress = progress.consumed_by(r, passes)
        seen += plan.assignment[plan.order[consumed(3, passes)]].tolist()
    assert len(seen) == len(set(seen)) == 8
    progress = progress.recut(2)
    rest = []
    for r in range(2):
        plan = rank_plan(n, _spec(r, 2, seed, True, Remainder.PAD), epoch=0, progress=progress)
        assert (plan.segment, len(plan.assignment)) == (1, 2)
        rest += plan.assignment[plan.visit()].tolist()
    assert sorted(seen + rest) == list(range(n)), "4 + 4 + ... the epoch exactly once"


def test_resuming_is_deterministic_and_segments_are_bounded() -> None:
    spec = _spec(1, 3, 5, True, Remainder.DROP)
    progress = Progress.start(2, 4).lockstep(((3, 2),)).recut(3)
    a = rank_plan(50, spec, epoch=2, progress=progress)
    b = rank_plan(50, spec, epoch=2, progress=Progress.model_validate_json(progress.model_dump_json()))
    assert np.array_equal(a.assignment, b.assignment)
    assert np.array_equal(a.order, b.order)
    assert Progress.start(0, 4).recut(2) == Progress.start(0, 2), "an unread segment is replaced"
    grown = Progress.start(0, 2)
    for i in range(MAX_SEGMENTS - 1):
        grown = grown.lockstep(((1,),)).recut(2 + (i + 1) % 2)
    with pytest.raises(ConfigError, match="re-cut"):
        grown.lockstep(((1,),)).recut(7)


def test_progress_cuts_as_another_when_only_the_current_segments_consumption_differs() -> None:
    recut = Progress.start(2, 4).lockstep(((3, 2),)).recut(3)
    assert recut.cuts_as(recut.lockstep(((5,),))), "reading on in the current segment changes no block"
    assert not recut.cuts_as(recut.model_copy(update={"epoch": 3}))
    assert not recut.cuts_as(Progress.start(2, 4).lockstep(((3, 3),)).recut(3)), "another closed segment"
    assert not recut.cuts_as(Progress.start(2, 4).lockstep(((3, 2),)).recut(2)), "another world size"
    assert not recut.cuts_as(recut.lockstep(((1,),)).recut(2).recut(3)), "one more segment"


def test_malformed_progress_is_refused() -> None:
    with pytest.raises(ValidationError, match="world size"):
        Segment(world_size=2, consumed=((),))
    with pytest.raises(ValidationError, match="counts"):
        Segment(world_size=1, consumed=(((-1,),),))
    with pytest.raises(ConfigError, match="holds"):
        remaining(4, ((5,),))
    spec = _spec(0, 2, 0, True, Remainder.PAD)
    with pytest.raises(ConfigError, match="world size 4"):
        rank_plan(10, spec, epoch=0, progress=Progress.start(0, 4))
    with pytest.raises(ConfigError, match="unsharded"):
        rank_plan(
            10,
            _spec(0, 1, 0, True, Remainder.PAD),
            epoch=0,
            whole=True,
            progress=Progress.start(0, 2).lockstep(((1,),)).recut(1),
        )
