"""The Dataset API in embedded mode (``sluicegate.open``) on a local directory and on the S3 server."""

from __future__ import annotations

import gc
import multiprocessing
import pickle
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import sluicegate
from sluicegate import ConfigError, Dataset, NotFoundError, QueryError, Store
from sluicegate.core.env import detect
from sluicegate.core.manifest import ItemRecord, records_to_table

from tests.conftest import Backend, PngWriter
from tests.sidecar.helpers import make_dataset

N = 103  # prime, so no world size divides it


@pytest.fixture
def expected(store_backend: Backend) -> dict[str, bytes]:
    return make_dataset(store_backend.uri, N, size=300, s3=store_backend.s3)


@pytest.fixture
def ds(store_backend: Backend, expected: dict[str, bytes]) -> Dataset:
    return sluicegate.open(store_backend.uri, s3=store_backend.s3)


def test_random_access_returns_verified_bytes_and_row(ds: Dataset, expected: dict[str, bytes]) -> None:
    assert len(ds) == N
    assert ds.version == 1
    item = ds[7]
    assert item.id == "item000007"
    assert item.data == expected[item.id]
    assert item.labels == {"car": 1}
    assert item.metadata == {"split": "train", "index": 7}
    assert [a.bbox for a in item.annotations] == [(1.0, 2.0, 3.0, 4.0)]
    assert item.media_type == "application/octet-stream"
    assert item.width is None
    assert ds[-1].id == "item000102"
    with pytest.raises(IndexError, match="out of range"):
        ds[N]
    with pytest.raises(IndexError):
        ds[-N - 1]
    assert [i.id for i in ds.get_many([5, -1, 5])] == ["item000005", "item000102", "item000005"]


def test_iteration_visits_every_item_once_in_epoch_order(ds: Dataset, expected: dict[str, bytes]) -> None:
    shuffled = ds.shuffle(11)
    order = shuffled.epoch_positions()
    got = [(item.id, item.data) for item in shuffled]
    assert [i for i, _ in got] == [f"item{p:06d}" for p in order]
    assert dict(got) == expected
    assert shuffled.epoch == 1  # a full pass moves on
    assert [i.id for i in shuffled] != [i for i, _ in got]  # and epoch 1 has another order
    shuffled.set_epoch(0)
    assert [i.id for i in shuffled] == [i for i, _ in got]


def test_slices_are_anded(ds: Dataset) -> None:
    val = ds.slice('meta.split = "val"')
    assert len(val) == len(range(0, N, 5))
    both = val.slice("labels.car >= 1")
    assert sorted(i.id for i in both) == [f"item{i:06d}" for i in range(N) if i % 5 == 0 and i % 3]
    with pytest.raises(QueryError):
        ds.slice("labels.car >")
    with pytest.raises(QueryError, match="unknown label"):
        len(ds.slice("labels.bus > 1"))


@pytest.mark.parametrize("world", [1, 2, 4, 7])
@pytest.mark.parametrize("remainder", ["pad", "drop"])
def test_shards_are_equal_disjoint_and_cover(ds: Dataset, world: int, remainder: str) -> None:
    view = ds.slice("labels.car >= 1").shuffle(5)
    wanted = {i.id for i in view}
    shards = [[i.id for i in view.shard(rank, world, remainder)] for rank in range(world)]
    assert len({len(s) for s in shards}) == 1
    counts = Counter(i for s in shards for i in s)
    if remainder == "drop":
        assert max(counts.values()) == 1
        assert len(counts) == len(wanted) - len(wanted) % world
    else:
        assert set(counts) == wanted
        assert sum(counts.values()) - len(wanted) == -len(wanted) % world


def test_shard_and_shuffle_commute_and_are_deterministic(ds: Dataset) -> None:
    a = [i.id for i in ds.shuffle(3).shard(1, 3)]
    b = [i.id for i in ds.shard(1, 3).shuffle(3)]
    assert a == b
    assert a != [i.id for i in ds.shuffle(4).shard(1, 3)]
    with pytest.raises(ConfigError, match="already shard"):
        ds.shard(0, 2).shard(0, 2)
    with pytest.raises(ConfigError, match="rank"):
        ds.shard(3, 3)
    with pytest.raises(ConfigError, match="remainder"):
        ds.shard(0, 2, "spread")


def test_workers_split_the_epoch_without_gaps_or_overlap(ds: Dataset) -> None:
    view = ds.shuffle(9).shard(0, 2)
    parts = [view.epoch_positions(w, 3) for w in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(view)))
    got = [i.id for p in parts for i in view.iter_positions(p)]
    assert Counter(got) == Counter(i.id for i in view)


def test_state_dict_resumes_mid_epoch(store_backend: Backend, ds: Dataset) -> None:
    first = ds.shuffle(2)
    first.set_epoch(3)
    it = iter(first)
    seen = [next(it).id for _ in range(40)]
    state = first.state_dict()
    assert state["epoch"] == 3
    assert state["position"] == 40
    again = sluicegate.open(store_backend.uri, s3=store_backend.s3).shuffle(2)
    again.load_state_dict(state)
    rest = [i.id for i in again]
    assert len(seen) + len(rest) == N
    assert set(seen) | set(rest) == {f"item{i:06d}" for i in range(N)}
    other = sluicegate.open(store_backend.uri, s3=store_backend.s3).shuffle(2).slice("labels.car >= 1")
    with pytest.raises(ConfigError, match="different dataset view"):
        other.load_state_dict(state)


def _read_ids(ds: Dataset) -> list[str]:
    return [i.id for i in ds]


def test_pickled_dataset_is_small_and_reads_in_other_processes(ds: Dataset) -> None:
    view = ds.slice("labels.car >= 1").shuffle(1).shard(1, 2)
    want = [i.id for i in view]
    view.set_epoch(0)
    blob = pickle.dumps(view)
    assert len(blob) < 2000
    for method in ("fork", "spawn"):
        with multiprocessing.get_context(method).Pool(1) as pool:
            assert pool.apply(_read_ids, (view,)) == want
    item = view[0]
    assert pickle.loads(pickle.dumps(item)).labels == item.labels


def test_open_pins_the_version(store_backend: Backend, expected: dict[str, bytes]) -> None:
    ds = sluicegate.open(store_backend.uri, s3=store_backend.s3)
    store = store_backend.store()
    store.commit(lambda base: base.slice(0, 10) if base is not None else base)
    assert len(ds) == N
    assert len(sluicegate.open(store_backend.uri, s3=store_backend.s3)) == 10
    assert len(sluicegate.open(store_backend.uri, version=1, s3=store_backend.s3)) == N
    with pytest.raises(NotFoundError, match="no version 9"):
        sluicegate.open(store_backend.uri, version=9, s3=store_backend.s3)


def test_image_items_decode(tmp_path: Path, write_png: PngWriter) -> None:
    store = Store(tmp_path / "img")
    data = write_png(tmp_path / "a.png", width=20, height=10, seed=1).read_bytes()
    rec = ItemRecord(
        id="a", blob=store.put_blob(data), size=len(data), media_type="image/png", width=20, height=10
    )
    store.commit(lambda _: records_to_table([rec]))
    item = sluicegate.open(tmp_path / "img")[0]
    assert item.image().size == (20, 10)
    assert (item.width, item.height) == (20, 10)
    bad = sluicegate.open(tmp_path / "img")
    assert bad[0].media_type == "image/png"


def test_non_image_bytes_give_a_clear_error(ds: Dataset) -> None:
    with pytest.raises(ConfigError, match="not an image"):
        ds[0].image()


def test_dropped_datasets_leave_no_threads(store_backend: Backend, expected: dict[str, bytes]) -> None:
    before = {t.ident for t in threading.enumerate()}
    for _ in range(3):
        ds = sluicegate.open(store_backend.uri, s3=store_backend.s3)
        assert sum(1 for _ in ds) == N
        del ds
    gc.collect()
    deadline = time.monotonic() + 5
    while {t.ident for t in threading.enumerate() if t.name == "sluicegate-engine"} - before:
        assert time.monotonic() < deadline, "engine threads outlived their datasets"
        time.sleep(0.05)


def test_environment_detection() -> None:
    assert detect({}).model_dump(include={"rank", "world_size"}) == {"rank": 0, "world_size": 1}
    env = {"JOB_COMPLETION_INDEX": "3", "SLUICEGATE_WORLD_SIZE": "8", "RANK": "1", "WORLD_SIZE": "2"}
    got = detect(env, worker=1, num_workers=2)
    assert (got.rank, got.world_size, got.source, got.worker) == (3, 8, "JOB_COMPLETION_INDEX", 1)
    got = detect({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (got.rank, got.world_size, got.local_rank, got.local_world_size) == (1, 2, 1, 2)
    assert detect({"SLUICEGATE_ADDRESS": "unix:///s.sock"}).address == "unix:///s.sock"
    for bad, message in (
        ({"JOB_COMPLETION_INDEX": "1"}, "SLUICEGATE_WORLD_SIZE"),
        ({"RANK": "1"}, "go together"),
        ({"SLUICEGATE_RANK": "x", "SLUICEGATE_WORLD_SIZE": "2"}, "not an integer"),
        ({"SLUICEGATE_RANK": "2", "SLUICEGATE_WORLD_SIZE": "2"}, r"outside \[0, 2\)"),
    ):
        with pytest.raises(ConfigError, match=message):
            detect(bad)
