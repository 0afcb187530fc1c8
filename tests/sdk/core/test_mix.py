"""Invariants of weighted mixing: epoch length, exact counts, no repeats, equal ranks (property-based)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sluicegate import ConfigError, Remainder
from sluicegate.core import partition
from sluicegate.core.mix import (
    MixKeys,
    MixPlan,
    MixSpec,
    SourceStream,
    Stop,
    apportion,
    epoch_pairs,
    layout,
    mix_length,
    source_seed,
    weight_fractions,
)

SETTINGS = settings(max_examples=150, deadline=None)
lengths_st = st.lists(st.integers(min_value=1, max_value=120), min_size=2, max_size=4)
weight_st = st.floats(min_value=0.05, max_value=20, allow_nan=False, allow_infinity=False)
worlds = st.integers(min_value=1, max_value=6)
seeds = st.one_of(st.none(), st.integers(min_value=0, max_value=2**64 - 1))
remainders = st.sampled_from([Remainder.PAD, Remainder.DROP])


@st.composite
def mixes(draw: st.DrawFn) -> tuple[list[int], list[float], int, Remainder]:
    lengths = draw(lengths_st)
    weights = [draw(weight_st) for _ in lengths]
    world = draw(worlds)
    remainder = draw(remainders)
    if remainder is Remainder.DROP:
        lengths = [max(n, world) for n in lengths]  # every rank gets at least one item of each source
    return lengths, weights, world, remainder


def _per_rank(lengths: list[int], world: int, remainder: Remainder) -> list[int]:
    return [partition.per_rank(n, world, remainder) for n in lengths]


def _epoch(
    lengths: list[int], weights: list[float], world: int, remainder: Remainder, seed: int | None, epoch: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    return [
        epoch_pairs(lengths, weights, epoch=epoch, seed=seed, rank=r, world_size=world, remainder=remainder)
        for r in range(world)
    ]


def _fits(lengths: list[int], weights: list[float], world: int, remainder: Remainder) -> bool:
    shares = weight_fractions(weights)
    return mix_length(_per_rank(lengths, world, remainder), shares, Stop.FIRST_EXHAUSTED) >= 1


@SETTINGS
@given(case=mixes(), seed=seeds, epoch=st.integers(min_value=0, max_value=6))
def test_counts_are_exact_and_every_rank_reads_as_many(
    case: tuple[list[int], list[float], int, Remainder], seed: int | None, epoch: int
) -> None:
    lengths, weights, world, remainder = case
    if not _fits(lengths, weights, world, remainder):
        return
    per_rank = _per_rank(lengths, world, remainder)
    shares = weight_fractions(weights)
    n = mix_length(per_rank, shares, Stop.FIRST_EXHAUSTED)
    # The longest epoch in which no source repeats: one more would need more items than some source has.
    assert all(n * p <= m for m, p in zip(per_rank, shares, strict=True))
    assert any((n + 1) * p > m for m, p in zip(per_rank, shares, strict=True))
    counts = apportion(n, shares)
    assert counts.sum() == n
    assert all(abs(c - n * p) < 1 for c, p in zip(counts.tolist(), shares, strict=True))
    assert all(c <= m for c, m in zip(counts.tolist(), per_rank, strict=True))
    for sources, indexes in _epoch(lengths, weights, world, remainder, seed, epoch):
        assert len(sources) == len(indexes) == n  # the same on every rank: nobody waits at the end
        assert np.bincount(sources, minlength=len(lengths)).tolist() == counts.tolist()
        for i, m in enumerate(per_rank):
            mine = indexes[sources == i]
            assert len(set(mine.tolist())) == len(mine)  # no item of a source twice in one epoch
            assert mine.size == 0 or (mine.min() >= 0 and mine.max() < m)


@SETTINGS
@given(case=mixes(), seed=seeds, epoch=st.integers(min_value=0, max_value=6))
def test_ranks_are_disjoint_and_deterministic(
    case: tuple[list[int], list[float], int, Remainder], seed: int | None, epoch: int
) -> None:
    lengths, weights, world, _ = case
    remainder = Remainder.DROP  # pad repeats items across ranks by design
    lengths = [max(n, world) for n in lengths]
    if not _fits(lengths, weights, world, remainder):
        return
    ranks = _epoch(lengths, weights, world, remainder, seed, epoch)
    for i, n in enumerate(lengths):
        own = None if seed is None else source_seed(seed, i)
        read: list[int] = []
        for r, (sources, indexes) in enumerate(ranks):
            shard = partition.shard(n, r, world, seed=own or 0, shuffle=own is not None, remainder=remainder)
            read += shard[indexes[sources == i]].tolist()
        assert len(read) == len(set(read))  # no item of the source on two ranks
    again = _epoch(lengths, weights, world, remainder, seed, epoch)
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(ranks, again, strict=True))


@SETTINGS
@given(
    lengths=st.lists(st.integers(min_value=8, max_value=120), min_size=2, max_size=3),
    weights=st.lists(weight_st, min_size=3, max_size=3),
    seed=st.integers(min_value=0, max_value=2**63),
)
def test_shuffled_epochs_differ(lengths: list[int], weights: list[float], seed: int) -> None:
    weights = weights[: len(lengths)]
    per_epoch = [epoch_pairs(lengths, weights, epoch=e, seed=seed) for e in range(3)]
    if len(per_epoch[0][0]) < 8:
        return
    orders = {tuple(zip(s.tolist(), i.tolist(), strict=True)) for s, i in per_epoch}
    assert len(orders) == 3


@SETTINGS
@given(
    m=st.integers(min_value=1, max_value=60),
    c=st.integers(min_value=1, max_value=60),
    seed=st.integers(min_value=0, max_value=2**32),
    epochs=st.integers(min_value=1, max_value=25),
    cold=st.integers(min_value=0, max_value=24),
)
def test_a_source_is_read_as_its_own_epochs_each_item_once_per_pass(
    m: int, c: int, seed: int, epochs: int, cold: int
) -> None:
    c = min(c, m)

    def order(t: int) -> np.ndarray:
        return partition.epoch_order(m, seed=seed, epoch=t, rank=0)

    stream = SourceStream(m, c, order)
    windows = [stream.window(e) for e in range(epochs)]
    for w in windows:
        assert len(w) == c
        assert len(set(w.tolist())) == c
    flat = np.concatenate(windows)
    for t in range(len(flat) // m):  # every pass over the source reads each item exactly once
        assert sorted(flat[t * m : (t + 1) * m].tolist()) == list(range(m))
    for e, w in enumerate(windows):  # a window within one source epoch is that epoch's own order
        t, x = divmod(e * c, m)
        if x + c <= m and (t == 0 or stream._crossing(t) is None):
            assert (w == order(t)[x : x + c]).all()
    e = min(cold, epochs - 1)
    assert (SourceStream(m, c, order).window(e) == windows[e]).all()  # a cold start agrees (resume)


def test_an_unshuffled_source_larger_than_its_share_is_read_round_robin() -> None:
    stream = SourceStream(10, 4, lambda t: np.arange(10, dtype=np.int64))
    assert [stream.window(e).tolist() for e in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]


@SETTINGS
@given(counts=st.lists(st.integers(min_value=0, max_value=80), min_size=2, max_size=5))
def test_the_unshuffled_interleave_is_smooth(counts: list[int]) -> None:
    slots = layout(counts)
    total = sum(counts)
    assert np.bincount(slots, minlength=len(counts)).tolist() == counts
    for k in range(1, total + 1):  # every prefix close to the weights
        seen = np.bincount(slots[:k], minlength=len(counts))
        assert all(abs(seen[i] - k * c / total) <= len(counts) for i, c in enumerate(counts))


@SETTINGS
@given(case=mixes(), seed=seeds, workers=st.integers(min_value=1, max_value=5))
def test_workers_split_the_epoch_without_overlap_or_gaps(
    case: tuple[list[int], list[float], int, Remainder], seed: int | None, workers: int
) -> None:
    lengths, weights, _, _ = case
    if not _fits(lengths, weights, 1, Remainder.PAD):
        return
    whole = epoch_pairs(lengths, weights, epoch=1, seed=seed)
    parts = [
        epoch_pairs(lengths, weights, epoch=1, seed=seed, worker=w, num_workers=workers)
        for w in range(workers)
    ]
    for w, (sources, indexes) in enumerate(parts):
        assert (sources == whole[0][w::workers]).all()
        assert (indexes == whole[1][w::workers]).all()


def test_worked_example_two_sources_two_ranks() -> None:
    """0.7/0.3 over 20 and 6 items on 2 ranks: 10 and 3 per rank, an epoch of 10 (b limits: 3 / 0.3)."""
    rank0 = epoch_pairs([20, 6], [0.7, 0.3], epoch=0, rank=0, world_size=2)
    assert rank0[0].tolist() == [0, 1, 0, 0, 0, 1, 0, 0, 1, 0]  # a b a a a b a a b a
    assert rank0[1].tolist() == [0, 0, 1, 2, 3, 1, 4, 5, 2, 6]
    epoch1 = epoch_pairs([20, 6], [0.7, 0.3], epoch=1, rank=0, world_size=2)
    assert epoch1[1][epoch1[0] == 0].tolist() == [7, 8, 9, 0, 1, 2, 3]  # a goes on where epoch 0 stopped
    assert epoch1[1][epoch1[0] == 1].tolist() == [0, 1, 2]


def test_weights_are_read_as_the_decimals_they_print_as() -> None:
    # 0.1 as a binary float is a hair over 1/10: read literally, 1 / 0.1 would floor to 9.
    assert mix_length([1, 9], weight_fractions([0.1, 0.9]), Stop.FIRST_EXHAUSTED) == 10
    assert weight_fractions([7, 3]) == [Fraction(7, 10), Fraction(3, 10)]


def test_other_epoch_lengths() -> None:
    shares = weight_fractions([1, 1])
    assert mix_length([10, 4], shares, Stop.ALL_EXHAUSTED) == 20  # a is read through once, b 2.5 times
    plan = MixPlan([10, 4], [1, 1], [lambda t: np.arange(10), lambda t: np.arange(4)], Stop.ALL_EXHAUSTED)
    sources, indexes = plan.resolve(plan.visit_order(seed=None, epoch=0), 0)
    assert np.bincount(indexes[sources == 1]).tolist() == [3, 3, 2, 2]  # b repeats, in its epochs' order
    assert sorted(indexes[sources == 0].tolist()) == list(range(10))
    plan = MixPlan([10, 4], [1, 1], [lambda t: np.arange(10), lambda t: np.arange(4)], 6)
    assert plan.length == 6
    assert plan.counts.tolist() == [3, 3]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"names": ("a",), "weights": (1.0,)}, "at least two sources"),
        ({"names": ("a", "b"), "weights": (1.0, 0.0)}, "finite and > 0"),
        ({"names": ("a", "b"), "weights": (1.0, -2.0)}, "finite and > 0"),
        ({"names": ("a", "b"), "weights": (1.0, math.nan)}, "finite and > 0"),
        ({"names": ("a", "b"), "weights": (1.0,)}, "2 sources but 1 weights"),
        ({"names": ("a", "a"), "weights": (1.0, 1.0)}, "unique"),
        ({"names": ("a", ""), "weights": (1.0, 1.0)}, "printable"),
        ({"names": ("a", "b"), "weights": (1.0, 1.0), "epoch_length": 0}, ">= 1"),
        ({"names": ("a", "b"), "weights": (1.0, 1.0), "epoch_length": "longest"}, "epoch_length"),
    ],
)
def test_bad_specs_are_config_errors(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        MixSpec.checked(**fields)


def test_empty_sources_and_epochs_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="'b' has no items"):
        MixPlan([5, 0], [1, 1], [lambda t: np.arange(5)] * 2, names=["a", "b"])
    with pytest.raises(ConfigError, match="rank"):
        epoch_pairs([5, 5], [1, 1], epoch=0, rank=2, world_size=2)


def _keyed(lengths: list[int], weights: list[float], remainder: Remainder, seed: int | None) -> MixKeys:
    return MixKeys(tuple(lengths), tuple(weights), seed, remainder, Stop.FIRST_EXHAUSTED)


def _keys(
    lengths: list[int], weights: list[float], world: int, remainder: Remainder, seed: int | None, epoch: int
) -> list[np.ndarray]:
    keyed = _keyed(lengths, weights, remainder, seed)
    return [keyed.keys(epoch, r, world) for r in range(world)]


@SETTINGS
@given(case=mixes(), seed=seeds, epoch=st.integers(min_value=0, max_value=4))
def test_keys_name_each_entrys_source_and_item(
    case: tuple[list[int], list[float], int, Remainder], seed: int | None, epoch: int
) -> None:
    lengths, weights, world, remainder = case
    if not _fits(lengths, weights, world, remainder):
        return
    for r, keys in enumerate(_keys(lengths, weights, world, remainder, seed, epoch)):
        sources, within = epoch_pairs(
            lengths, weights, epoch=epoch, seed=seed, rank=r, world_size=world, remainder=remainder
        )
        got_sources, positions = _keyed(lengths, weights, remainder, seed).split(keys)
        assert (got_sources == sources).all()
        for i, n in enumerate(lengths):
            own = None if seed is None else source_seed(seed, i)
            cut = partition.shard(n, r, world, seed=own or 0, shuffle=own is not None, remainder=remainder)
            assert (positions[sources == i] == cut[within[sources == i]]).all()


@SETTINGS
@given(
    case=mixes(),
    seed=seeds,
    restarts=st.lists(
        st.tuples(worlds, st.integers(min_value=1, max_value=3), st.integers(min_value=0, max_value=9)),
        min_size=1,
        max_size=4,
    ),
)
def test_re_cuts_over_any_world_sizes_read_the_epoch_once(
    case: tuple[list[int], list[float], int, Remainder],
    seed: int | None,
    restarts: list[tuple[int, int, int]],
) -> None:
    """Segment 0 at the mix's world size, then a restart at each of ``restarts`` (world size, DataLoader
    workers, items each worker consumed), the last read to its end: pad reads every key the epoch picked,
    drop reads none twice and leaves out fewer than the last world size, and every segment's ranks are
    equal."""
    lengths, weights, world, remainder = case
    if not _fits(lengths, weights, world, remainder):
        return
    epoch = 1
    progress = partition.Progress.start(epoch, world)
    read: list[int] = []
    for step, (next_world, workers, each) in enumerate([(world, 1, 0), *restarts]):
        progress = progress.recut(next_world)
        if progress.segment == 0 and not _fits(lengths, weights, next_world, remainder):
            return  # a fresh epoch at a world size the sources cannot fill: refused, as mix() refuses it
        if progress.segment == 0:  # nothing read yet: the epoch starts afresh at this world size
            sequences = _keys(lengths, weights, next_world, remainder, seed, epoch)
            picked = np.concatenate(sequences)
        else:
            keyed = _keyed(lengths, weights, remainder, seed)
            sequences = [keyed.recut(progress, r) for r in range(next_world)]
        assert len({len(k) for k in sequences}) == 1, "equal ranks"
        assert len(sequences[0]) == _keyed(lengths, weights, remainder, seed).segment_length(progress)
        final = step == len(restarts)
        for r, keys in enumerate(sequences):
            before = progress.current.consumed[r]
            todo = len(partition.remaining(len(keys), before))
            parts = [(todo - w + workers - 1) // workers for w in range(workers)]
            step_pass = (todo,) if final else tuple(min(each, n) for n in parts)
            progress = progress.after(r, len(keys), step_pass)
            now = partition.consumed(len(keys), progress.current.consumed[r])
            read += keys[now & ~partition.consumed(len(keys), before)].tolist()
    if remainder is Remainder.PAD:
        assert set(read) == set(picked.tolist())
    else:  # drop's cuts leave out fewer items than the last world size, and read none twice
        assert set(read) <= set(picked.tolist())
        assert len(set(picked.tolist()) - set(read)) < progress.current.world_size
        assert len(read) == len(set(read))
