"""Elastic resume in embedded mode: an epoch saved at one world size goes on at another with nothing
repeated and nothing skipped (but pad's repeats), with real torch DataLoader workers too."""
# ruff: noqa: F811 - the fixtures imported from adapter_fixtures are test parameters here

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sluicegate
from sluicegate import ConfigError, Dataset, Store
from sluicegate.core import ledger
from sluicegate.core.partition import per_rank

from tests.sdk.adapter_fixtures import N, ds, expected  # noqa: F401 - fixtures
from tests.sidecar.helpers import make_dataset

ALL = {f"item{i:06d}" for i in range(N)}


def _take(view: Dataset, count: int) -> list[str]:
    taken = []
    for item in view:
        taken.append(item.id)
        if len(taken) == count:
            break
    return taken


def test_four_ranks_to_two_mid_epoch_in_lockstep(ds: Dataset) -> None:
    """The worked example: 4 ranks read 5 items each of epoch 1, rank 0 checkpoints, 2 ranks finish."""
    views = [ds.shuffle(3).shard(r, 4) for r in range(4)]
    for v in views:
        v.set_epoch(1)
    first = [_take(v, 5) for v in views]
    state = views[0].state_dict()
    assert (state["epoch"], state["position"], state["world_size"], state["selected"]) == (1, 5, 4, N)
    rest = []
    for r in range(2):
        view = ds.shuffle(3).shard(r, 2)
        view.load_state_dict(state)
        assert view.epoch == 1
        rest.append([i.id for i in view])
        assert view.epoch == 2, "a finished pass moves on to the next epoch, cut as usual"
    assert len(rest[0]) == len(rest[1]) == per_rank(N - 20, 2, sluicegate.Remainder.PAD)
    seen = Counter(i for part in first + rest for i in part)
    assert set(seen) == ALL
    assert sum(seen.values()) - N == (N - 20) % 2, "one pad repeat: the 83 left do not halve"
    again = ds.shuffle(3).shard(1, 2)
    again.load_state_dict(state)
    assert [i.id for i in again] == rest[1], "deterministic in (seed, epoch, segments)"


def test_two_ranks_to_eight_with_dataloader_workers(ds: Dataset) -> None:
    """2 ranks read unequal amounts through loaders with 2 workers (one worker a batch ahead), all ranks'
    states are merged, and 8 ranks finish the epoch through loaders with one worker each."""
    seen: Counter[str] = Counter()
    states = []
    for rank, batches in ((0, 3), (1, 4)):
        tds = ds.shuffle(11).shard(rank, 2).to_pytorch(iterable=True, fields=())
        loader = tds.loader(batch_size=2, num_workers=2)
        for i, batch in enumerate(loader):
            seen.update(batch["id"])
            if i + 1 == batches:
                break
        states.append(loader.state_dict())
    assert [s["position"] for s in states] == [6, 8]
    merged = Dataset.merge_states(states)
    for rank in range(8):
        tds = ds.shuffle(11).shard(rank, 8).to_pytorch(iterable=True, fields=())
        loader = tds.loader(batch_size=3, num_workers=1)
        loader.load_state_dict(merged)
        got = [i for batch in loader for i in batch["id"]]
        assert len(got) == per_rank(N - 14, 8, sluicegate.Remainder.PAD)
        seen.update(got)
    assert set(seen) == ALL
    assert sum(seen.values()) - N == -(N - 14) % 8, "repeats are pad slots only"


def test_a_loader_state_with_workers_resumes_exactly_at_the_same_world_size(ds: Dataset) -> None:
    tds = ds.shuffle(2).shard(1, 3).to_pytorch(iterable=True, fields=())
    tds.set_epoch(4)
    loader = tds.loader(batch_size=4, num_workers=2)
    first = []
    for i, batch in enumerate(loader):
        first += batch["id"]
        if i == 2:  # worker 0 has handed out two batches, worker 1 one
            break
    state = loader.state_dict()
    # 13 items: worker 0's part holds 7 (batches of 4 and 3), worker 1's 6 (one batch of 4 handed out).
    assert state["progress"]["segments"][0]["consumed"][1] == [[7, 4]]
    again = ds.shuffle(2).shard(1, 3).to_pytorch(iterable=True, fields=())
    again.load_state_dict(state)
    assert again.epoch == 4
    rest = [i for batch in again.loader(batch_size=5, num_workers=0) for i in batch["id"]]
    whole = ds.shuffle(2).shard(1, 3)
    whole.set_epoch(4)
    assert sorted(first + rest) == sorted(i.id for i in whole)
    assert len(set(first) & set(rest)) == 0


def test_random_world_size_sequences_visit_the_epoch_exactly_once(ds: Dataset) -> None:
    """Seeded random restarts (world sizes, stopping points, lockstep or merged states) over real reads;
    the last world size reads the epoch to its end."""
    rng = random.Random(7)
    for _ in range(6):
        remainder = rng.choice(["pad", "drop"])
        seen: Counter[str] = Counter()
        state: dict[str, Any] | None = None
        worlds = [rng.randint(1, 6) for _ in range(rng.randint(1, 4))]
        for step, world in enumerate(worlds):
            final = step == len(worlds) - 1
            views = [ds.shuffle(5).shard(r, world, remainder) for r in range(world)]
            if state is not None:
                for v in views:
                    v.load_state_dict(state)
            assert len({len(v._epoch_plan().rank.order) for v in views}) == 1, "equal counts"
            lockstep, count = rng.random() < 0.5, rng.randint(0, 8)
            states = []
            for v in views:
                got = [i.id for i in v] if final else _take(v, count if lockstep else rng.randint(0, 8))
                seen.update(got)
                states.append(v.state_dict())
            state = states[0] if lockstep else Dataset.merge_states(states)
        if remainder == "drop":
            assert max(seen.values()) == 1
            assert N - len(seen) < worlds[-1]
        else:
            assert set(seen) == ALL


def test_states_of_another_view_or_an_unsharded_view_are_refused(ds: Dataset) -> None:
    view = ds.shuffle(3).shard(0, 4)
    _take(view, 3)
    state = view.state_dict()
    with pytest.raises(ConfigError, match="different dataset view"):
        ds.shuffle(4).shard(0, 2).load_state_dict(state)
    with pytest.raises(ConfigError, match="different dataset view"):
        ds.shuffle(3).slice("labels.car >= 1").shard(0, 2).load_state_dict(state)
    with pytest.raises(ConfigError, match="remainder"):
        ds.shuffle(3).shard(0, 2, "drop").load_state_dict(state)
    with pytest.raises(ConfigError, match="sharded views"):
        ds.shuffle(3).load_state_dict(state)
    with pytest.raises(ConfigError, match="one state per rank"):
        Dataset.merge_states([state])
    # A state saved before elastic resume existed loads as it always did.
    legacy = {"epoch": 0, "position": 3, "length": len(view), "seed": 3, "version": 1}
    again = ds.shuffle(3).shard(0, 4)
    again.load_state_dict(legacy)
    assert [i.id for i in again][:2] == [i.id for i in view][:2]


def test_a_recut_epoch_is_recorded_exactly_in_the_ledger(tmp_path: Path) -> None:
    make_dataset(str(tmp_path), 41, size=16)
    views = [sluicegate.open(tmp_path, ledger="run-e").shuffle(1).shard(r, 3) for r in range(3)]
    handed = {r: _take(v, 4) for r, v in enumerate(views)}
    state = views[0].state_dict()
    for v in views:
        v.close()
    for r in range(2):
        view = sluicegate.open(tmp_path, ledger="run-e").shuffle(1).shard(r, 2)
        view.load_state_dict(state)
        handed[10 + r] = [i.id for i in view]
        view.close()
    passages = ledger.run_items(Store(tmp_path), "run-e", epoch=0)
    recorded = Counter(i for p in passages for i in p.ids)
    assert recorded == Counter(i for ids in handed.values() for i in ids)
    assert set(recorded) == {f"item{i:06d}" for i in range(41)}
    resumed = [p for p in passages if p.rank in ("0", "1") and p.places.tolist()[:1] == [0]]
    assert resumed, "each re-cut pass is a passage of its own, placed in its segment's order"
