"""Elastic resume of a mix in embedded mode: an epoch of ``sluicegate.mix`` saved at one world size goes on
at another, every item the epoch picked read once (but pad's repeats), ranks equal, with real torch
DataLoader workers too."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sluicegate
from sluicegate import ConfigError, Dataset, Mix, Store
from sluicegate.core import ledger

from tests.sidecar.helpers import make_dataset

A, B = 97, 31  # primes: no world size divides them
Key = tuple[str | None, str]


@pytest.fixture
def sources(tmp_path: Path) -> tuple[Dataset, Dataset]:
    make_dataset(str(tmp_path / "a"), A, size=40)
    make_dataset(str(tmp_path / "b"), B, size=30)
    return sluicegate.open(tmp_path / "a"), sluicegate.open(tmp_path / "b")


def _mix(pair: tuple[Dataset, Dataset], rank: int, world: int, remainder: str = "pad", seed: int = 9) -> Mix:
    a, b = pair
    mixed = sluicegate.mix({"a": a, "b": b}, weights={"a": 0.7, "b": 0.3}, seed=seed)
    return mixed.shard(rank, world, remainder)


def _epoch(pair: tuple[Dataset, Dataset], world: int, epoch: int, remainder: str = "pad") -> Counter[Key]:
    """Every rank's items of a whole epoch at ``world``: what a run never restarted reads."""
    seen: Counter[Key] = Counter()
    for rank in range(world):
        view = _mix(pair, rank, world, remainder)
        view.set_epoch(epoch)
        seen.update((i.source, i.id) for i in view)
    return seen


def _take(view: Mix, count: int) -> list[Key]:
    taken: list[Key] = []
    if count:
        for item in view:
            taken.append((item.source, item.id))
            if len(taken) == count:
                break
    return taken


def test_four_ranks_to_two_mid_epoch_in_lockstep(sources: tuple[Dataset, Dataset]) -> None:
    views = [_mix(sources, r, 4) for r in range(4)]
    for v in views:
        v.set_epoch(1)
    first = [_take(v, 7) for v in views]
    state = views[0].state_dict()
    assert (state["epoch"], state["position"], state["world_size"], state["selected"]) == (1, 7, 4, [A, B])
    rest = []
    for rank in range(2):
        view = _mix(sources, rank, 2)
        view.load_state_dict(state)
        assert view.epoch == 1
        rest.append([(i.source, i.id) for i in view])
        assert view.epoch == 2, "a finished pass moves on to the next epoch, the mix's at this world size"
    whole = _epoch(sources, 4, 1)
    done = {k for part in first for k in part}
    # What the 4 ranks left, each item once (a source's pad repeats the epoch had are one item), halved.
    left = len(set(whole) - done)
    assert len(rest[0]) == len(rest[1]) == (left + 1) // 2, "ranks stay equal"
    seen = Counter(k for part in first + rest for k in part)
    assert set(seen) == set(whole), "every item the epoch picked, and nothing else"
    assert sum(len(p) for p in rest) - left == left % 2, "the re-cut repeats one item at most: its pad"
    assert not done & {k for part in rest for k in part}, "nothing read before is read again"
    again = _mix(sources, 1, 2)
    again.load_state_dict(state)
    assert [(i.source, i.id) for i in again] == rest[1], "deterministic in (seed, epoch, segments)"


def test_random_world_size_sequences_read_the_epoch_exactly_once(sources: tuple[Dataset, Dataset]) -> None:
    """Seeded random restarts (world sizes, stopping points, lockstep or merged states) over real reads;
    the last world size reads the epoch to its end."""
    rng = random.Random(3)
    for _ in range(6):
        remainder = rng.choice(["pad", "drop"])
        worlds = [rng.randint(1, 5) for _ in range(rng.randint(2, 4))]
        whole = _epoch(sources, worlds[0], 2, remainder)
        seen: Counter[Key] = Counter()
        state: dict[str, Any] | None = None
        for step, world in enumerate(worlds):
            final = step == len(worlds) - 1
            views = [_mix(sources, r, world, remainder) for r in range(world)]
            for v in views:
                if state is None:
                    v.set_epoch(2)
                else:
                    v.load_state_dict(state)
            assert len({len(v._epoch_plan().rank.order) for v in views}) == 1, "equal counts"
            lockstep, count = rng.random() < 0.5, rng.randint(0, 9)
            states = []
            for v in views:
                got = (
                    [(i.source, i.id) for i in v]
                    if final
                    else _take(v, count if lockstep else rng.randint(0, 9))
                )
                seen.update(got)
                states.append(v.state_dict())
            state = states[0] if lockstep else Mix.merge_states(states)
        if remainder == "drop":
            assert max(seen.values()) == 1, worlds
            assert set(seen) <= set(whole), worlds
            assert len(whole) - len(seen) < worlds[-1], worlds
        else:
            assert set(seen) == set(whole), worlds


def test_two_ranks_to_three_with_dataloader_workers(sources: tuple[Dataset, Dataset]) -> None:
    """2 ranks read unequal amounts through loaders with 2 workers each, their states are merged, and 3
    ranks finish the epoch through loaders with 2 workers: every item the epoch picked, once."""
    pytest.importorskip("torch")
    seen: Counter[Key] = Counter()
    states = []
    for rank, batches in ((0, 3), (1, 4)):
        tds = _mix(sources, rank, 2, "drop").to_pytorch(iterable=True, fields=())
        loader = tds.loader(batch_size=2, num_workers=2)
        for i, batch in enumerate(loader):
            seen.update(zip(batch["source"], batch["id"], strict=True))
            if i + 1 == batches:
                break
        states.append(loader.state_dict())
    assert [s["position"] for s in states] == [6, 8]
    merged = Mix.merge_states(states)
    parts = []
    for rank in range(3):
        tds = _mix(sources, rank, 3, "drop").to_pytorch(iterable=True, fields=())
        loader = tds.loader(batch_size=3, num_workers=2)
        loader.load_state_dict(merged)
        parts.append([k for batch in loader for k in zip(batch["source"], batch["id"], strict=True)])
        seen.update(parts[-1])
    assert len({len(p) for p in parts}) == 1, "ranks stay equal"
    whole = _epoch(sources, 2, 0, "drop")
    assert max(seen.values()) == 1
    assert set(seen) <= set(whole)
    assert len(whole) - len(seen) < 3


def test_a_loader_state_with_workers_resumes_exactly_at_the_same_world_size(
    sources: tuple[Dataset, Dataset],
) -> None:
    pytest.importorskip("torch")
    tds = _mix(sources, 1, 3).to_pytorch(iterable=True, fields=())
    tds.set_epoch(4)
    loader = tds.loader(batch_size=4, num_workers=2)
    first: list[Key] = []
    for i, batch in enumerate(loader):
        first += zip(batch["source"], batch["id"], strict=True)
        if i == 2:  # worker 0 has handed out two batches, worker 1 one
            break
    state = loader.state_dict()
    again = _mix(sources, 1, 3)
    again.load_state_dict(state)
    rest = [(i.source, i.id) for i in again]
    whole = _mix(sources, 1, 3)
    whole.set_epoch(4)
    assert sorted(first + rest) == sorted((i.source, i.id) for i in whole)
    assert len(first) + len(rest) == len(whole)


def test_states_of_another_mix_or_of_a_mix_that_does_not_shard_are_refused(
    sources: tuple[Dataset, Dataset],
) -> None:
    view = _mix(sources, 0, 2)
    _take(view, 5)
    state = view.state_dict()
    a, b = sources
    for other, what in (
        (_mix(sources, 0, 3, seed=8), "seed"),
        (_mix(sources, 0, 3, "drop"), "remainder"),
        (sluicegate.mix({"a": a, "b": b}, weights={"a": 0.5, "b": 0.5}, seed=9).shard(0, 3), "weights"),
        (
            sluicegate.mix({"a": a, "b": b.slice("meta.index < 20")}, [0.7, 0.3], seed=9).shard(0, 3),
            "selected",
        ),
    ):
        with pytest.raises(ConfigError, match=f"different mix: .*{what}"):
            other.load_state_dict(state)
    unsharded = sluicegate.mix({"a": a, "b": b}, weights={"a": 0.7, "b": 0.3}, seed=9)
    _take(unsharded, 5)
    with pytest.raises(ConfigError, match=r"mix.shard\(rank, world_size\)"):
        _mix(sources, 0, 2).load_state_dict(unsharded.state_dict())
    with pytest.raises(ConfigError, match="merge_states needs one state per rank"):
        Mix.merge_states([state])


def test_a_recut_mix_epoch_is_recorded_exactly_in_each_sources_ledger(tmp_path: Path) -> None:
    make_dataset(str(tmp_path / "a"), 50, size=20)
    make_dataset(str(tmp_path / "b"), 20, size=20)

    def ranked(rank: int, world: int) -> Mix:
        pair = [sluicegate.open(tmp_path / n, ledger=f"run-{world}") for n in ("a", "b")]
        return sluicegate.mix({"a": pair[0], "b": pair[1]}, weights=[0.6, 0.4], seed=1).shard(rank, world)

    views = [ranked(r, 3) for r in range(3)]
    for view in views:
        _take(view, 4)
    state = views[0].state_dict()
    for view in views:
        view.close()
    rests: list[list[Key]] = []
    for rank in range(2):
        with ranked(rank, 2) as view:
            view.load_state_dict(state)
            rests.append([(i.source, i.id) for i in view])
    rest = rests[0] + rests[1]
    for name in ("a", "b"):
        passages = ledger.run_items(Store(tmp_path / name), "run-2", epoch=0)
        assert sorted(i for p in passages for i in p.ids) == sorted(i for s, i in rest if s == name)
        for rank in ("0", "1"):  # each rank's re-cut reads, said as that rank's
            [mine] = ledger.run_items(Store(tmp_path / name), "run-2", rank=rank, epoch=0)
            assert mine.ids == [i for s, i in rests[int(rank)] if s == name]


def test_a_state_saved_before_elastic_resume_loads_at_its_own_rank(sources: tuple[Dataset, Dataset]) -> None:
    view = _mix(sources, 1, 2, "drop")
    view.set_epoch(3)
    taken = _take(view, 6)
    state = view.state_dict()
    old = {k: state[k] for k in ("epoch", "position", "length", "seed", "names", "counts", "versions")}
    again = _mix(sources, 1, 2, "drop")
    again.load_state_dict(old)
    whole = _mix(sources, 1, 2, "drop")
    whole.set_epoch(3)
    assert taken + [(i.source, i.id) for i in again] == [(i.source, i.id) for i in whole]
