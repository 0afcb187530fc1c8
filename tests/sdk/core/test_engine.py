"""The engine against a real local store: cache budget, eviction order, single flight, verification,
disk tier, read-ahead."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sluicegate import IntegrityError, NotFoundError, QueryError, Store, StoreError
from sluicegate.core.engine import (
    BlobRef,
    DiskCache,
    Engine,
    EngineConfig,
    Fetched,
    Limits,
    Manifest,
    MemoryCache,
    Outcome,
    Plan,
    StoreUpstream,
    Workers,
)
from sluicegate.core.query import Query

from tests.sidecar.helpers import make_dataset


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    make_dataset(str(tmp_path / "ds"), 60, size=1000)
    return Store(tmp_path / "ds")


def _plan(store: Store) -> Plan:
    return Plan(1, store.manifest(1)[0])


def _engine(store: Store, **config: object) -> Engine:
    return Engine(StoreUpstream(store), EngineConfig.model_validate(config))


def test_memory_cache_evicts_the_newest_served_first_then_least_recent_fresh() -> None:
    cache = MemoryCache(budget=400)
    for name in "abcd":
        assert cache.put(name, bytes(100)) == []
    cache.consume("b")
    cache.consume("c")
    cache.get("b")  # a hit moves nothing
    evicted = cache.put("e", bytes(100))
    assert [sha for sha, _ in evicted] == ["c"], "the most recently served goes first"
    cache.get("a")  # a becomes the most recently used of the fresh
    evicted = cache.put("f", bytes(150))
    assert [sha for sha, _ in evicted] == ["b", "d"], "then the fresh, least recently used first"
    assert cache.nbytes == 350


def test_a_shard_larger_than_the_cache_keeps_hitting_its_first_part_every_epoch() -> None:
    """A scan over 50 blobs through a 10-blob cache, two blobs read ahead: with least recently used
    eviction no epoch would hit; here every epoch after the first hits the ten blobs served first (the
    read-ahead room is taken from blobs served since), whatever the epoch's order."""
    cache = MemoryCache(budget=10 * 100)
    names = [f"{i:02d}" for i in range(50)]
    hits = []
    for epoch in range(4):
        order = names if epoch % 2 == 0 else names[::-1]
        hit = 0
        for i, name in enumerate(order):
            for ahead in order[i : i + 2]:  # read-ahead of two blobs
                if ahead not in cache:
                    cache.put(ahead, bytes(100))
            hit += name in cache._consumed
            cache.get(name)
            cache.consume(name)
        hits.append(hit)
    assert hits[0] == 0
    assert hits[1:] == [10, 10, 10]


def test_memory_cache_refuses_blob_larger_than_budget() -> None:
    cache = MemoryCache(budget=100)
    cache.put("a", bytes(60))
    assert cache.put("big", bytes(101)) == [("big", bytes(101))]
    assert "a" in cache
    assert "big" not in cache


@settings(max_examples=60, deadline=None)
@given(
    budget=st.integers(0, 5000),
    ops=st.lists(st.tuples(st.sampled_from("pgc"), st.integers(0, 30), st.integers(0, 1500)), max_size=120),
)
def test_memory_cache_never_exceeds_budget(budget: int, ops: list[tuple[str, int, int]]) -> None:
    cache = MemoryCache(budget)
    for op, key, size in ops:
        if op == "p":
            cache.put(str(key), bytes(size))
        elif op == "g":
            cache.get(str(key))
        else:
            cache.consume(str(key))
        assert cache.nbytes <= budget
        assert cache.nbytes == sum(len(cache.get(k) or b"") for k in cache.order())


def test_engine_stays_within_budget_over_an_epoch(store: Store) -> None:
    plan = _plan(store)
    budget = 5 * 1000 + 500

    async def run() -> Engine:
        engine = _engine(store, memory_bytes=budget, concurrency=4)
        for start in range(0, len(plan), 7):
            refs = plan.refs(range(start, min(start + 7, len(plan))))
            engine.readahead("t", plan.refs(range(start + 7, min(start + 30, len(plan)))))
            got = await engine.get_many(refs)
            assert [_sha(b) for b in got] == [r.sha for r in refs]
            assert engine.memory.nbytes <= budget * 1.05
        await engine.aclose()
        return engine

    engine = asyncio.run(run())
    assert engine.stats.items_served == len(plan)
    assert engine.stats.evictions > 0


def test_single_flight_one_upstream_fetch_for_many_waiters(store: Store) -> None:
    ref = _plan(store).refs([3])[0]

    async def run() -> tuple[list[bytes], Engine]:
        engine = _engine(store)
        got = await asyncio.gather(*(engine.get(ref) for _ in range(50)))
        await engine.aclose()
        return got, engine

    got, engine = asyncio.run(run())
    assert {_sha(b) for b in got} == {ref.sha}
    assert engine.stats.upstream_fetches == 1
    assert engine.stats.cache_misses == 50


def test_corrupt_blob_is_refetched_once_then_refused_naming_the_item(store: Store, tmp_path: Path) -> None:
    plan = _plan(store)
    bad, good = plan.refs([4, 5])
    (tmp_path / "ds" / "blobs" / bad.sha).write_bytes(b"not the original bytes")

    async def run() -> Engine:
        engine = _engine(store)
        with pytest.raises(IntegrityError, match=r"item 'item000004'.*not delivered"):
            await engine.get(bad)
        assert _sha(await engine.get(good)) == good.sha
        assert bad.sha not in engine.memory
        await engine.aclose()
        return engine

    engine = asyncio.run(run())
    assert engine.stats.integrity_failures == 2
    assert engine.stats.retries == 0


def test_missing_blob_is_not_retried(store: Store, tmp_path: Path) -> None:
    ref = _plan(store).refs([7])[0]
    (tmp_path / "ds" / "blobs" / ref.sha).unlink()

    async def run() -> Engine:
        engine = _engine(store, attempts=4)
        with pytest.raises(NotFoundError, match=ref.sha):
            await engine.get(ref)
        await engine.aclose()
        return engine

    assert asyncio.run(run()).stats.retries == 0


def test_disk_tier_serves_evicted_blobs_and_drops_corrupt_files(store: Store, tmp_path: Path) -> None:
    plan = _plan(store)
    refs = plan.refs(range(20))
    disk = tmp_path / "disk"

    async def run() -> Engine:
        engine = _engine(store, memory_bytes=3000, disk_dir=disk, disk_bytes=100_000)
        for ref in refs:
            await engine.get(ref)
        await asyncio.sleep(0.2)  # spills run in the background
        fetched = engine.stats.upstream_fetches
        spilled = [r for r in refs[:10] if r.sha not in engine.memory]
        assert len(spilled) >= 7, "memory holds three blobs at most"
        assert all((disk / r.sha).exists() for r in spilled)
        (disk / spilled[0].sha).write_bytes(b"rotten")
        for ref in refs[:10]:
            assert _sha(await engine.get(ref)) == ref.sha
        assert engine.stats.upstream_fetches == fetched + 1  # only the rotten file went upstream again
        assert engine.stats.disk_hits == len(spilled) - 1
        await engine.aclose()
        return engine

    engine = asyncio.run(run())
    assert engine.disk is not None
    assert engine.disk.nbytes <= 100_000


def test_readahead_fetches_before_the_consumer_asks_within_budget(store: Store) -> None:
    plan = _plan(store)

    async def run() -> Engine:
        engine = _engine(store, memory_bytes=10_500)
        engine.readahead("c", plan.refs(range(40)))
        await asyncio.sleep(0.5)
        # The budget holds 10 items: the prefetcher stops there until the consumer takes some.
        assert engine.stats.upstream_fetches == 10
        await engine.get_many(plan.refs(range(10)))
        assert engine.stats.cache_hits == 10
        await asyncio.sleep(0.5)
        assert engine.stats.upstream_fetches == 20
        assert engine.memory.nbytes <= 10_500
        await engine.aclose()
        return engine

    asyncio.run(run())


def test_blob_ref_carries_item_id_for_errors(store: Store) -> None:
    ref = _plan(store).refs([0])[0]
    assert ref == BlobRef(ref.sha, 1000, "item000000")


def test_rows_of_row_groups_without_annotations_match_those_with(tmp_path: Path) -> None:
    """A row group whose annotations are all empty skips taking them; its rows must not change."""
    make_dataset(str(tmp_path / "m"), 50, size=10)
    full, _ = Store(tmp_path / "m").manifest(1)
    box = {"label": "car", "bbox": [1.0, 2.0, 3.0, 4.0], "polygon": [], "iscrowd": False, "attributes": "{}"}
    column = full.schema.field("annotations")
    annotations = pa.array([[box] if i in (25, 31) else [] for i in range(50)], type=column.type)
    full = full.set_column(full.schema.get_field_index("annotations"), column, annotations)
    data = io.BytesIO()
    footer = pq.read_schema(tmp_path / "m" / "versions" / "1.parquet").metadata
    pq.write_table(full.replace_schema_metadata(footer), data, row_group_size=20)  # only group 1 has any
    positions = np.array([49, 0, 25, 20, 19, 31, 5])
    rows = Manifest(data.getvalue()).rows(positions)
    assert rows == full.take(pa.array(positions)).to_pylist()
    assert [len(r["annotations"]) for r in rows] == [0, 0, 1, 0, 0, 1, 0]
    rows[0]["annotations"].append("mine")  # each row gets its own list
    assert rows[1]["annotations"] == []


def test_manifest_decodes_lazily_and_matches_the_full_table(tmp_path: Path) -> None:
    expected = make_dataset(str(tmp_path / "m"), 50, size=10)
    store = Store(tmp_path / "m")
    full, _ = store.manifest(1)
    # Three row groups, so rows() has to stitch positions from several of them back in order.
    data = io.BytesIO()
    footer = pq.read_schema(tmp_path / "m" / "versions" / "1.parquet").metadata
    pq.write_table(full.replace_schema_metadata(footer), data, row_group_size=20)
    lazy = Manifest(data.getvalue())
    assert lazy.num_rows == 50
    positions = np.array([49, 0, 21, 20, 19, 5, 49])
    assert lazy.rows(positions) == full.take(pa.array(positions)).to_pylist()
    plan = Plan(1, lazy, index=np.array([7, 3, 44]))
    assert [r.item_id for r in plan.refs([2, 0])] == ["item000044", "item000007"]
    assert plan.select([Query.parse("labels.car >= 1")]).tolist() == [
        0,
        2,
    ]  # items 7 and 44 have cars, 3 does not
    assert plan.position_of("item000003") == 1
    assert plan.position_of("item000004") is None
    # Resolved against every field, not just the decoded ones.
    with pytest.raises(QueryError, match=r"labels\.truck"):
        plan.select([Query.parse("labels.truck >= 1")])
    assert len(expected) == 50
    with pytest.raises(StoreError, match="not a readable Parquet"):
        Manifest(b"not parquet", "x")
    pq.write_table(full.replace_schema_metadata({b"sluicegate": b"{}"}), data := io.BytesIO())
    with pytest.raises(StoreError, match="version info"):
        Manifest(data.getvalue(), "y")


class _CountingWorkers(Workers):
    def __init__(self) -> None:
        super().__init__(2, "test-io")
        self.jobs = 0

    def run(self, fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
        self.jobs += 1
        return super().run(fn, *args)


T = TypeVar("T")


def test_local_reads_of_a_batch_share_thread_hops_and_keep_errors_apart(store: Store, tmp_path: Path) -> None:
    refs = _plan(store).refs(list(range(40)))
    missing = refs[13]
    (tmp_path / "ds" / "blobs" / missing.sha).unlink()
    upstream = StoreUpstream(store)
    workers = _CountingWorkers()

    async def run() -> list[Outcome]:
        limits = Limits(workers, asyncio.Semaphore(4), 4, 5.0)
        try:
            return await upstream.fetch_many(refs, limits)
        finally:
            workers.close()

    results = asyncio.run(run())
    assert workers.jobs == 2  # one hand-off per worker thread for the whole batch, not one per blob
    assert isinstance(results[13], NotFoundError)
    assert missing.sha in str(results[13])
    for ref, got in zip(refs, results, strict=True):
        if ref is not missing:
            assert isinstance(got, Fetched)
            assert got.digest == ref.check == ref.sha == _sha(got.data)
            assert len(got.data) == ref.size


def test_disk_tier_counts_blocks_and_sweeps_what_a_crash_left(tmp_path: Path) -> None:
    root = tmp_path / "disk"
    cache = DiskCache(root, budget=3 * 4096)
    small = [bytes([i]) * 100 for i in range(4)]
    for data in small:
        cache.put(_sha(data), data)
    # 100-byte files still take a block each: a volume sized to the budget never fills.
    assert cache.nbytes == 3 * 4096
    refs = [BlobRef(_sha(data), len(data), f"item{i}") for i, data in enumerate(small)]
    assert cache.get_many(refs[:1]) == [None]  # evicted to stay within three blocks
    (root / f".{_sha(b'x')}.123.456").write_bytes(b"half a write")
    again = DiskCache(root, budget=3 * 4096)
    assert again.get_many(refs[3:]) == [small[3]]
    assert again.nbytes == 3 * 4096
    assert sorted(p.name for p in root.iterdir()) == sorted(_sha(d) for d in small[1:])


def test_a_manifest_with_blake3_is_verified_by_it_on_every_tier(tmp_path: Path) -> None:
    from sluicegate import ItemRecord
    from sluicegate.core.manifest import blake3_hex, records_to_table

    store = Store(tmp_path / "b3")
    blobs = [bytes([i]) * 3000 for i in range(6)]
    records = [
        ItemRecord(id=f"i{i}", blob=store.put_blob(b), blake3=blake3_hex(b), size=len(b), media_type="x")
        for i, b in enumerate(blobs)
    ]
    # Item 5's check says other bytes than its blob holds: only a reader that checks BLAKE3 notices.
    records[5] = records[5].model_copy(update={"blake3": blake3_hex(b"something else")})
    store.commit(lambda _base: records_to_table(records))
    plan = Plan(1, store.manifest(1)[0])
    refs = plan.refs(range(6))
    assert [r.blake3 for r in refs[:5]] == [blake3_hex(b) for b in blobs[:5]]

    async def run() -> Engine:
        engine = _engine(store, memory_bytes=4000, disk_dir=tmp_path / "disk", disk_bytes=10**6)
        assert await engine.get_many(refs[:5]) == blobs[:5]
        with pytest.raises(IntegrityError, match="item 'i5'"):
            await engine.get(refs[5])
        await asyncio.sleep(0.2)  # spills to the disk tier
        assert await engine.get_many(refs[:5]) == blobs[:5]  # the disk tier checks BLAKE3 too
        await engine.aclose()
        return engine

    engine = asyncio.run(run())
    assert engine.stats.disk_hits >= 3
    assert engine.stats.integrity_failures == 2


def test_a_manifest_whose_blob_is_a_path_is_refused_before_any_read(tmp_path: Path) -> None:
    good = "a" * 64
    table = pa.table(
        {"id": ["x", "y"], "blob": [good, "../../../../dev/zero"], "size": [1, 1], "media_type": ["a", "a"]}
    )
    plan = Plan(1, table)
    with pytest.raises(StoreError, match=r"row 1: blob '\.\./\.\./.*not a lowercase hex digest"):
        plan.refs([0])
