"""Selections and shards over a real (local) store: disjoint, equal, exactly the query result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sluicegate._exceptions import ConfigError, NotFoundError, QueryError
from sluicegate.core.broker_protocol import PlanResponse
from sluicegate.core.manifest import ItemRecord, records_to_table, to_parquet
from sluicegate.core.partition import Remainder, ShardSpec
from sluicegate.core.store import S3Options, Store, sha256_hex
from sluicegate_operator.catalog import Catalog, Handle, s3_options, shard_table

from .conftest import dataset


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "ds")
    records = []
    for i in range(23):
        data = f"item-{i}".encode()
        records.append(
            ItemRecord(
                id=f"i{i}",
                blob=s.put_blob(data),
                size=len(data),
                media_type="text/plain",
                labels={"car": i % 3},
                metadata={"split": "train" if i % 2 else "val"},
            )
        )
    s.commit(lambda _: records_to_table(records))
    return s


def handle(catalog: Catalog, store: Store) -> Handle:
    return catalog.open(store.uri, "", S3Options())


def test_shards_are_disjoint_equal_and_cover_the_selection(store: Store) -> None:
    catalog = Catalog()
    h = handle(catalog, store)
    selected = catalog.select(h, 1, ("labels.car > 0", 'meta.split = "train"', ""))
    table = catalog.manifest(h, 1).table
    expected = {r["id"] for r in table.to_pylist() if r["labels.car"] > 0 and r["meta.split"] == "train"}
    assert len(selected) == len(expected)
    assert catalog.select(h, 1, ("labels.car > 0", 'meta.split = "train"')) is selected, "cached, '' ignored"
    shards = [
        shard_table(table, selected, ShardSpec(rank=r, world_size=4, seed=7, remainder=Remainder.DROP))
        for r in range(4)
    ]
    ids = [s.column("id").to_pylist() for s in shards]
    assert len({len(x) for x in ids}) == 1
    assert sum(len(x) for x in ids) == len(expected) // 4 * 4
    assert len(set().union(*map(set, ids))) == sum(len(x) for x in ids)
    assert set().union(*map(set, ids)) <= expected
    rows = shards[0].to_pylist()
    assert all(sha256_hex(f"item-{r['id'][1:]}".encode()) == r["blob"] for r in rows)
    plan = PlanResponse.model_validate(
        {
            "namespace": "team-a",
            "stream": "s",
            "dataset": "data/coco",
            "version": 1,
            "query": "",
            "policies": [],
            "total": len(selected),
            "rank": 0,
            "world_size": 4,
            "seed": 7,
            "shuffle": True,
            "remainder": "drop",
            "rows": rows,
            "urls": {},
            "expires_at": "2026-01-01T00:00:00Z",
        }
    )
    assert plan.rows[0].model_extra is not None
    assert "labels.car" in plan.rows[0].model_extra


def test_unknown_field_is_a_query_error(store: Store) -> None:
    catalog = Catalog()
    with pytest.raises(QueryError, match=r"labels\.truck"):
        catalog.select(handle(catalog, store), 1, ("labels.truck > 0",))


def test_s3_options_from_secret() -> None:
    ds = dataset(
        source={"uri": "s3://bucket/p", "endpoint": "http://127.0.0.1:9000", "region": "eu-west-1"},
        credentials={"secretRef": {"name": "keys"}},
    )
    opts = s3_options(ds, {"AWS_ACCESS_KEY_ID": "AK", "AWS_SECRET_ACCESS_KEY": "SK"})
    assert (opts.endpoint, opts.region, opts.access_key_id, opts.secret_access_key) == (
        "http://127.0.0.1:9000",
        "eu-west-1",
        "AK",
        "SK",
    )
    with pytest.raises(ConfigError, match="AWS_SECRET_ACCESS_KEY"):
        s3_options(ds, {"AWS_ACCESS_KEY_ID": "AK"})


def test_shard_is_serialised_once_and_matches_the_rows(store: Store) -> None:
    catalog = Catalog()
    h = handle(catalog, store)
    spec = ShardSpec(rank=1, world_size=3, seed=5)
    shard = catalog.shard(h, 1, ("labels.car > 0",), spec)
    assert catalog.shard(h, 1, ("labels.car > 0", " "), ShardSpec(rank=1, world_size=3, seed=5)) is shard
    table, _ = store.manifest(1)
    selected = catalog.select(h, 1, ("labels.car > 0",))
    rows = shard_table(table, selected, spec).to_pylist()
    assert json.loads(shard.rows_json) == rows
    assert (shard.items, shard.total) == (len(rows), len(selected))
    assert list(shard.blobs) == list(dict.fromkeys(r["blob"] for r in rows))
    assert shard.blob_set == set(shard.blobs)


def test_caches_are_keyed_on_the_full_store_identity(store: Store, tmp_path: Path) -> None:
    """Two handles of one URI with other endpoints or keys never share a cached manifest or selection."""
    catalog = Catalog()
    plain = catalog.open(store.uri, "", S3Options())
    assert catalog.open(store.uri, "", S3Options()) is plain
    keyed = catalog.open(
        store.uri, "", S3Options(access_key_id="AKIDSECRET", secret_access_key="TOPSECRETKEY")
    )
    elsewhere = catalog.open(store.uri, "http://127.0.0.1:1", S3Options())
    assert len({plain.key, keyed.key, elsewhere.key}) == 3
    assert "TOPSECRETKEY" not in repr(keyed.key), "keys are digested, never kept in a cache key"
    assert catalog.latest_version(plain) == 1
    assert catalog.resolve(plain, 1) == 1
    with pytest.raises(NotFoundError, match="no version 2"):
        catalog.resolve(plain, 2)
    first = catalog.select(plain, 1, ("labels.car > 0",))
    assert catalog.select(plain, 1, ("labels.car > 0",)) is first
    # The manifest object changes under the same version (a store owner rewrote it): revalidation
    # notices the new tag and drops everything computed from the old bytes.
    before = catalog.manifest(plain, 1).tag
    records = [
        ItemRecord(id="only", blob=store.put_blob(b"x"), size=1, media_type="text/plain", labels={"car": 1})
    ]
    (Path(store.local_root or tmp_path) / "versions" / "1.parquet").write_bytes(
        to_parquet(records_to_table(records), store.manifest(1)[1])
    )
    assert catalog.manifest(plain, 1, revalidate=True).tag != before
    assert len(catalog.select(plain, 1, ("labels.car > 0",))) == 1
