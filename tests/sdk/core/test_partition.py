"""Invariants of sharding, epoch order and worker splits (property-based)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sluicegate import ConfigError, Remainder
from sluicegate.core.broker_protocol import PlanResponse
from sluicegate.core.partition import ShardSpec, epoch_order, per_rank, shard, worker_split

sizes = st.integers(min_value=0, max_value=300)
worlds = st.integers(min_value=1, max_value=17)
seeds = st.integers(min_value=0, max_value=2**64 - 1)
SETTINGS = settings(max_examples=200, deadline=None)


def _all_shards(n: int, world: int, seed: int, shuffle: bool, remainder: Remainder) -> list[np.ndarray]:
    return [shard(n, r, world, seed=seed, shuffle=shuffle, remainder=remainder) for r in range(world)]


@SETTINGS
@given(n=sizes, world=worlds, seed=seeds, shuffle=st.booleans())
def test_pad_gives_equal_counts_covering_every_item(n: int, world: int, seed: int, shuffle: bool) -> None:
    shards = _all_shards(n, world, seed, shuffle, Remainder.PAD)
    count = per_rank(n, world, Remainder.PAD)
    assert all(len(s) == count for s in shards)
    joined = np.concatenate(shards)
    assert set(joined.tolist()) == set(range(n))  # every item is read at least once
    assert len(joined) - n == (-n) % world if n else len(joined) == 0  # only the minimum is padding


@SETTINGS
@given(n=st.integers(min_value=1, max_value=300), world=worlds, seed=seeds, shuffle=st.booleans())
def test_pad_shards_are_disjoint_apart_from_padding(n: int, world: int, seed: int, shuffle: bool) -> None:
    if n < world:
        return  # fewer items than ranks: every rank must repeat something
    shards = _all_shards(n, world, seed, shuffle, Remainder.PAD)
    base, extra = divmod(n, world)
    own = [s[: base + (r < extra)] for r, s in enumerate(shards)]  # each rank's block, before padding
    flat = np.concatenate(own)
    assert sorted(flat.tolist()) == list(range(n))  # blocks are disjoint and cover every item
    assert all(len(set(s.tolist())) == len(s) for s in shards)  # no rank reads an item twice per epoch
    if extra == 0:
        assert len(set(np.concatenate(shards).tolist())) == n  # divisible: shards fully disjoint


@SETTINGS
@given(n=sizes, world=worlds, seed=seeds, shuffle=st.booleans())
def test_drop_gives_equal_disjoint_counts(n: int, world: int, seed: int, shuffle: bool) -> None:
    shards = _all_shards(n, world, seed, shuffle, Remainder.DROP)
    count = n // world
    assert all(len(s) == count for s in shards)
    flat = np.concatenate(shards)
    assert len(set(flat.tolist())) == len(flat) == count * world  # disjoint
    assert n - len(flat) < world  # at most world-1 items left out


@SETTINGS
@given(n=sizes, world=worlds, seed=seeds, rank_pick=st.integers(min_value=0), epoch=st.integers(0, 1000))
def test_deterministic_by_seed_and_epoch(n: int, world: int, seed: int, rank_pick: int, epoch: int) -> None:
    rank = rank_pick % world
    a = shard(n, rank, world, seed=seed)
    assert np.array_equal(a, shard(n, rank, world, seed=seed))
    order = epoch_order(len(a), seed=seed, epoch=epoch, rank=rank)
    assert np.array_equal(order, epoch_order(len(a), seed=seed, epoch=epoch, rank=rank))
    assert sorted(order.tolist()) == list(range(len(a)))  # a permutation of the shard


@SETTINGS
@given(count=st.integers(min_value=20, max_value=500), seed=seeds, epoch=st.integers(0, 1000))
def test_different_epochs_and_seeds_differ(count: int, seed: int, epoch: int) -> None:
    this = epoch_order(count, seed=seed, epoch=epoch)
    assert not np.array_equal(this, epoch_order(count, seed=seed, epoch=epoch + 1))
    assert not np.array_equal(this, epoch_order(count, seed=seed ^ 1, epoch=epoch))
    assert np.array_equal(epoch_order(count, seed=seed, epoch=epoch, shuffle=False), np.arange(count))


@SETTINGS
@given(count=st.integers(0, 400), workers=st.integers(1, 16), seed=seeds)
def test_worker_splits_are_disjoint_and_cover(count: int, workers: int, seed: int) -> None:
    order = epoch_order(count, seed=seed, epoch=0)
    parts = [worker_split(order, w, workers) for w in range(workers)]
    flat = np.concatenate(parts)
    assert sorted(flat.tolist()) == sorted(order.tolist())
    assert len(set(flat.tolist())) == count
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="world_size"):
        shard(10, 0, 0)
    with pytest.raises(ConfigError, match="rank"):
        shard(10, 3, 3)
    with pytest.raises(ConfigError, match="epoch"):
        epoch_order(5, seed=0, epoch=-1)
    with pytest.raises(ConfigError, match="worker"):
        worker_split(np.arange(4), 2, 2)


@given(n=sizes, world=worlds, seed=seeds, shuffle=st.booleans(), remainder=st.sampled_from(list(Remainder)))
def test_a_shard_spec_cuts_what_shard_cuts(
    n: int, world: int, seed: int, shuffle: bool, remainder: Remainder
) -> None:
    for rank in range(world):
        spec = ShardSpec(rank=rank, world_size=world, seed=seed, shuffle=shuffle, remainder=remainder)
        expected = shard(n, rank, world, seed=seed, shuffle=shuffle, remainder=remainder)
        assert np.array_equal(spec.positions(n), expected)


def test_a_shard_spec_refuses_a_rank_outside_its_world_and_travels_whole() -> None:
    with pytest.raises(ValidationError, match=r"rank 4 is outside \[0, 4\)"):
        ShardSpec(rank=4, world_size=4)
    spec = ShardSpec(rank=1, world_size=4, seed=9, shuffle=False, remainder=Remainder.DROP)
    plan = PlanResponse.model_validate(
        {
            "namespace": "ns",
            "stream": "s",
            "dataset": "ns/d",
            "version": 1,
            "query": "",
            "policies": [],
            "total": 0,
            "rows": [],
            "urls": {},
            "expires_at": "2026-01-01T00:00:00Z",
            **spec.model_dump(mode="json"),
        }
    )
    assert plan.shard_spec() == spec
    assert type(plan.shard_spec()) is ShardSpec
