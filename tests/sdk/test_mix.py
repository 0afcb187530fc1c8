"""``sluicegate.mix`` in embedded mode: real stores, real DataLoader workers, resume, the ledger."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sluicegate
from sluicegate import ConfigError, Dataset, Ledger, Mix, Store
from sluicegate.core import ledger
from sluicegate.core.mix import epoch_pairs, source_seed
from sluicegate.core.partition import Remainder, shard

from tests.conftest import Backend
from tests.sidecar.helpers import make_dataset

A, B = 41, 13  # primes: no world size divides them


@pytest.fixture
def stores(store_backend: Backend) -> tuple[Dataset, Dataset]:
    """Two datasets in two stores (on the backend under test): "a" of A items, "b" of B items."""
    a_uri, b_uri = store_backend.uri + "-a", store_backend.uri + "-b"
    make_dataset(a_uri, A, size=120, s3=store_backend.s3)
    make_dataset(b_uri, B, size=90, s3=store_backend.s3)
    return sluicegate.open(a_uri, s3=store_backend.s3), sluicegate.open(b_uri, s3=store_backend.s3)


@pytest.fixture
def local(tmp_path: Path) -> tuple[Dataset, Dataset]:
    make_dataset(str(tmp_path / "a"), A, size=64)
    make_dataset(str(tmp_path / "b"), B, size=48)
    return sluicegate.open(tmp_path / "a"), sluicegate.open(tmp_path / "b")


def _mixed(pair: tuple[Dataset, Dataset], **options: object) -> Mix:
    a, b = pair
    return sluicegate.mix({"a": a, "b": b}, weights={"a": 0.7, "b": 0.3}, **options)  # type: ignore[arg-type]


def _read(mix: Mix) -> list[tuple[str | None, str]]:
    return [(item.source, item.id) for item in mix]


def _expected(
    mix: Mix,
    lengths: tuple[int, int],
    epoch: int,
    seed: int | None,
    rank: int = 0,
    world: int = 1,
    remainder: Remainder = Remainder.PAD,
) -> list[tuple[str, str]]:
    """What the pure arithmetic says rank ``rank`` reads, as (source, item id). An unsharded view is
    not cut (its indexes are its items); a shard's are into its assignment."""
    sources, indexes = epoch_pairs(
        list(lengths), [0.7, 0.3], epoch=epoch, seed=seed, rank=rank, world_size=world, remainder=remainder
    )
    out = []
    for s, i in zip(sources.tolist(), indexes.tolist(), strict=True):
        own = None if seed is None else source_seed(seed, s)
        cut = shard(lengths[s], rank, world, seed=own or 0, shuffle=own is not None, remainder=remainder)
        position = cut[i] if mix._shard is not None else i
        out.append((mix.names[s], f"item{position:06d}"))
    return out


def test_a_mix_reads_each_source_in_proportion_and_says_where_from(
    stores: tuple[Dataset, Dataset],
) -> None:
    mix = _mixed(stores)
    # b limits: 13 / 0.3 = 43.3 -> 43 items an epoch, 30 of a and 13 of b (all of it, once).
    assert len(mix) == 43
    assert mix.counts() == {"a": 30, "b": 13}
    got = _read(mix)
    assert Counter(s for s, _ in got) == {"a": 30, "b": 13}
    assert got == _expected(mix, (A, B), 0, None)
    assert len(set(got)) == len(got)  # nothing twice in an epoch
    assert got[:3] == [("a", "item000000"), ("b", "item000000"), ("a", "item000001")]
    assert mix.served() == {"a": 30, "b": 13}
    assert mix.epoch == 1
    # Epoch 1 goes on through a where epoch 0 stopped: the other 11 of a, then a's next pass.
    second = [i for s, i in _read(mix) if s == "a"]
    assert second[:11] == [f"item{p:06d}" for p in range(30, 41)]
    assert second[11:] == [f"item{p:06d}" for p in range(19)]
    mix.set_epoch(0)
    item = mix[1]
    assert (item.source, item.id) == ("b", "item000000")
    assert item.data == stores[1][0].data  # the right store's bytes
    assert [(i.source, i.id) for i in mix.get_many([0, -1])] == [got[0], got[-1]]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("remainder", ["pad", "drop"])
def test_ranks_read_equal_disjoint_parts(local: tuple[Dataset, Dataset], world: int, remainder: str) -> None:
    mix = _mixed(local)
    parts = [mix.shard(r, world, remainder).shuffle(5) for r in range(world)]
    lengths = {len(p) for p in parts}
    assert len(lengths) == 1  # every rank the same: no rank waits on another at the end of an epoch
    reads = [_read(p) for p in parts]
    for r, got in enumerate(reads):
        assert got == _expected(parts[r], (A, B), 0, 5, r, world, Remainder(remainder))
        assert len(got) == len(set(got))
    if remainder == "drop":
        flat = [x for got in reads for x in got]
        assert len(flat) == len(set(flat))  # disjoint across ranks
    other = mix.shuffle(5).shard(1, world, remainder)  # views compose either way round
    assert _read(other) == _read(mix.shard(1, world, remainder).shuffle(5))


def test_shuffling_is_deterministic_and_differs_by_epoch(local: tuple[Dataset, Dataset]) -> None:
    mix = _mixed(local, seed=3)
    first, second = _read(mix), _read(mix)
    assert first != second
    assert Counter(s for s, _ in first) == Counter(s for s, _ in second) == mix.counts()
    again = _mixed(local, seed=3)
    assert _read(again) == first
    assert first == _expected(mix, (A, B), 0, 3)
    assert [x for x in first if x[0] == "b"] != [("b", f"item{i:06d}") for i in range(B)]  # b shuffled too


def test_resume_mid_epoch_is_exact(local: tuple[Dataset, Dataset]) -> None:
    mix = _mixed(local).shard(1, 2).shuffle(9)
    mix.set_epoch(2)
    whole = _read(mix)
    mix.set_epoch(2)
    taken = []
    for item in mix:
        taken.append((item.source, item.id))
        if len(taken) == 11:
            break
    state = pickle.loads(pickle.dumps(mix.state_dict()))
    fresh = _mixed(local).shard(1, 2).shuffle(9)
    fresh.load_state_dict(state)
    assert taken + _read(fresh) == whole
    assert fresh.epoch == 3
    with pytest.raises(ConfigError, match="different mix"):
        _mixed(local).shard(1, 2).shuffle(8).load_state_dict(state)
    a, b = local
    with pytest.raises(ConfigError, match="counts"):
        sluicegate.mix({"a": a, "b": b}, weights={"a": 0.5, "b": 0.5}).shard(1, 2).shuffle(9).load_state_dict(
            state
        )


def test_a_pickled_mix_reads_the_same(local: tuple[Dataset, Dataset]) -> None:
    mix = _mixed(local, seed=4).shard(0, 2)
    mix.set_epoch(5)
    copy = pickle.loads(pickle.dumps(mix))
    assert len(pickle.dumps(mix)) < 4000  # a spec, not the data or the orders
    assert _read(copy) == _read(mix)


def test_input_forms_and_bad_input(local: tuple[Dataset, Dataset]) -> None:
    a, b = local
    ids = _read(sluicegate.mix({"a": a, "b": b}, weights={"a": 7, "b": 3}))
    assert _read(sluicegate.mix([a, b], weights=[0.7, 0.3], names=["a", "b"])) == ids
    assert _read(sluicegate.mix([(a, 0.7), (b, 0.3)], names=["a", "b"])) == ids
    assert _read(sluicegate.mix({"a": a, "b": b}, weights=[0.7, 0.3])) == ids
    assert sluicegate.mix({a: 0.7, b: 0.3}).names == ("0", "1")
    assert sluicegate.mix([a, b]).counts() == {"0": 13, "1": 13}  # equal weights by default
    bad: list[tuple[dict[str, object], str]] = [
        ({"sources": {"a": a, "b": b}, "weights": {"a": 1, "b": 0}}, "weights must be finite and > 0"),
        ({"sources": {"a": a, "b": b}, "weights": {"a": 1, "b": -1}}, "> 0"),
        ({"sources": {"a": a, "b": b}, "weights": {"a": 1, "b": "x"}}, "numbers > 0"),
        ({"sources": {"a": a}}, "at least two sources"),
        ({"sources": [a, b], "names": ["a"]}, "2 sources but 1 names"),
        ({"sources": [a, b], "names": ["a", "a"]}, "unique"),
        ({"sources": [a, b], "weights": [1.0]}, "2 sources but 1 weights"),
        (
            {"sources": {"a": a, "b": b}, "weights": {"a": 1, "c": 1}},
            "no weight for 'b'; no source named 'c'",
        ),
        ({"sources": {"a": a, "b": b}, "names": ["x", "y"]}, "names come from the mapping"),
        ({"sources": [a, "b"]}, "must be sluicegate Datasets, got str"),
        ({"sources": [a, sluicegate.mix([a, b])]}, "mixes do not nest"),
        ({"sources": [a, b], "epoch_length": "longest"}, "epoch_length"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ConfigError, match=message):
            sluicegate.mix(**kwargs)  # type: ignore[arg-type]
    empty = sluicegate.mix({"a": a, "none": b.slice("meta.index > 1000")})
    with pytest.raises(ConfigError, match="'none' has no items"):
        len(empty)
    with pytest.raises(ConfigError, match="already shard"):
        _mixed(local).shard(0, 2).shard(0, 2)


def test_longer_epochs_repeat_the_smaller_source_in_its_own_epochs(local: tuple[Dataset, Dataset]) -> None:
    mix = _mixed(local, epoch_length="all_exhausted")
    assert len(mix) == 59  # a read through once: ceil(41 / 0.7)
    got = _read(mix)
    assert Counter(s for s, _ in got) == {"a": 41, "b": 18}
    assert sorted(i for s, i in got if s == "a") == [f"item{p:06d}" for p in range(A)]
    assert len(_mixed(local, epoch_length=20)) == 20


def test_the_ledger_records_what_each_source_gave(tmp_path: Path) -> None:
    make_dataset(str(tmp_path / "a"), A, size=32)
    make_dataset(str(tmp_path / "b"), B, size=32)
    a = sluicegate.open(tmp_path / "a", ledger=Ledger(run="mix-1", flush_items=5))
    b = sluicegate.open(tmp_path / "b", ledger=Ledger(run="mix-1", flush_items=5))
    mix = sluicegate.mix({"a": a, "b": b}, weights={"a": 0.7, "b": 0.3}, seed=2)
    got = _read(mix)
    mix.close()
    for name, root in (("a", tmp_path / "a"), ("b", tmp_path / "b")):
        passages = ledger.run_items(Store(root), "mix-1", epoch=0)
        recorded = [i for p in passages for i in p.ids]
        assert recorded == [i for s, i in got if s == name]  # each store's own ledger, under the mix epoch


def test_torch_workers_read_the_exact_mix(local: tuple[Dataset, Dataset]) -> None:
    torch = pytest.importorskip("torch")
    del torch
    mix = _mixed(local).shard(0, 2, Remainder.DROP).shuffle(6)
    expected = {e: _read_epoch(mix, e) for e in (0, 1)}
    tds = mix.to_pytorch(iterable=True, fields=())
    loader = tds.loader(batch_size=4, num_workers=2, persistent_workers=True)
    for epoch in (0, 1):
        tds.set_epoch(epoch)
        seen = [(s, i) for batch in loader for s, i in zip(batch["source"], batch["id"], strict=True)]
        assert sorted(seen) == sorted(expected[epoch])  # the two workers together: exactly the epoch
        assert len(seen) == len(mix)
    # Map-style: a sampler's indexes, the mix's epoch set on the dataset (it reaches persistent workers).
    mds = mix.to_pytorch(fields=())
    loader = mds.loader(batch_size=5, num_workers=2, persistent_workers=True, shuffle=False)
    for epoch in (0, 1):
        mds.set_epoch(epoch)
        seen = [(s, i) for batch in loader for s, i in zip(batch["source"], batch["id"], strict=True)]
        assert seen == [(x.source, x.id) for x in _at_epoch(mix, epoch)]
    sample = mds[0]
    assert sample["source"] in ("a", "b")
    assert bytes(sample["data"].numpy()) == _at_epoch(mix, 1)[0].data


def test_tensorflow_samples_carry_their_source(local: tuple[Dataset, Dataset]) -> None:
    pytest.importorskip("tensorflow")
    mix = _mixed(local, seed=1)
    tfds = mix.to_tensorflow(batch_size=None)
    got = [(s["source"].numpy().decode(), s["id"].numpy().decode()) for s in tfds]
    assert got == _read_epoch(mix, 0)


def _read_epoch(mix: Mix, epoch: int) -> list[tuple[str | None, str]]:
    copy = pickle.loads(pickle.dumps(mix))
    copy.set_epoch(epoch)
    return _read(copy)


def _at_epoch(mix: Mix, epoch: int) -> list[sluicegate.Item]:
    copy = pickle.loads(pickle.dumps(mix))
    copy.set_epoch(epoch)
    return copy.get_many(np.arange(len(copy)))
