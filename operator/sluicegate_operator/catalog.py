"""The operator's view of dataset stores: one Store per (source, credentials), query results cached.

Manifests are immutable per version, so a selection (version, queries) -> row positions is computed
once and reused by the reconciler and every broker request of every pod of a stream.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import duckdb
import numpy as np
import numpy.typing as npt
import pyarrow as pa
from sluicegate._exceptions import ConfigError
from sluicegate._partition import Remainder, shard
from sluicegate._query import select_rows
from sluicegate._store import S3Options, Store

from .models import Dataset

Positions = npt.NDArray[np.int64]
ACCESS_KEY = "AWS_ACCESS_KEY_ID"
SECRET_KEY = "AWS_SECRET_ACCESS_KEY"
SESSION_TOKEN = "AWS_SESSION_TOKEN"


def s3_options(dataset: Dataset, secret: Mapping[str, str] | None) -> S3Options:
    """S3 options for ``dataset``: its endpoint and region plus the keys of its credentials Secret."""
    source = dataset.spec.source
    if secret is None:
        return S3Options(endpoint=source.endpoint, region=source.region)
    missing = [k for k in (ACCESS_KEY, SECRET_KEY) if not secret.get(k)]
    if missing:
        ref = dataset.spec.credentials.secret_ref.name if dataset.spec.credentials else "?"
        raise ConfigError(f"Secret {dataset.metadata.namespace}/{ref} lacks the key(s) {', '.join(missing)}")
    return S3Options(
        endpoint=source.endpoint,
        region=source.region,
        access_key_id=secret[ACCESS_KEY],
        secret_access_key=secret[SECRET_KEY],
        session_token=secret.get(SESSION_TOKEN) or None,
    )


@dataclass(frozen=True)
class Shard:
    """One rank's shard, serialised once: every broker request of that pod reuses it."""

    rows_json: bytes  # JSON array of the manifest rows in assignment order (sluicegate._protocol.WireRow)
    blobs: tuple[str, ...]  # distinct blob hashes, in first-use order
    blob_set: frozenset[str]
    items: int
    total: int  # items selected before sharding


@dataclass(frozen=True)
class _StoreKey:
    uri: str
    endpoint: str | None
    region: str | None
    credentials: str  # a digest, so keys never sit in a dict key that might be logged


class Catalog:
    """Stores and cached selections; thread-safe (the reconciler and the broker run it in threads)."""

    def __init__(self, max_selections: int = 512) -> None:
        self._stores: dict[_StoreKey, Store] = {}
        self._selections: OrderedDict[tuple[str, int, tuple[str, ...]], Positions] = OrderedDict()
        self._shards: OrderedDict[tuple[object, ...], Shard] = OrderedDict()
        self._max = max_selections
        self._lock = threading.Lock()

    def store(self, uri: str, options: S3Options) -> Store:
        digest = hashlib.sha256(
            f"{options.access_key_id}\0{options.secret_access_key}\0{options.session_token}".encode()
        ).hexdigest()
        key = _StoreKey(uri, options.endpoint, options.region, digest)
        with self._lock:
            if key not in self._stores:
                self._stores[key] = Store(uri, options)
            return self._stores[key]

    def select(self, store: Store, version: int, queries: tuple[str, ...]) -> Positions:
        """Row positions of ``version`` matching every non-empty query (raises QueryError)."""
        queries = tuple(q for q in queries if q.strip())
        key = (store.uri, version, queries)
        with self._lock:
            if key in self._selections:
                self._selections.move_to_end(key)
                return self._selections[key]
        table, _ = store.manifest(version)
        positions = np.asarray(select_rows(table, list(queries)).to_numpy(), dtype=np.int64)
        with self._lock:
            self._selections[key] = positions
            while len(self._selections) > self._max:
                self._selections.popitem(last=False)
        return positions

    def shard(
        self,
        store: Store,
        version: int,
        queries: tuple[str, ...],
        *,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool,
        remainder: Remainder,
    ) -> Shard:
        """``rank``'s shard of the selection, serialised; cached like selections."""
        key = (
            store.uri,
            version,
            tuple(q for q in queries if q.strip()),
            rank,
            world_size,
            seed,
            shuffle,
            remainder,
        )
        with self._lock:
            if key in self._shards:
                self._shards.move_to_end(key)
                return self._shards[key]
        selected = self.select(store, version, queries)
        table, _ = store.manifest(version)
        rows = shard_table(
            table, selected, rank=rank, world_size=world_size, seed=seed, shuffle=shuffle, remainder=remainder
        )
        blobs = tuple(dict.fromkeys(rows.column("blob").to_pylist()))
        result = Shard(
            rows_json=rows_json(rows),
            blobs=blobs,
            blob_set=frozenset(blobs),
            items=rows.num_rows,
            total=len(selected),
        )
        with self._lock:
            self._shards[key] = result
            while len(self._shards) > self._max:
                self._shards.popitem(last=False)
        return result


def rows_json(rows: pa.Table) -> bytes:
    """``rows`` as a JSON array of objects, one per row in order, written by DuckDB straight from Arrow.

    Building Python dicts first (``to_pylist``) took ~4x as long and made the first plan of a rank slow;
    the JSON values are the same (floats at full double precision, NaN/Infinity as pydantic writes them).
    """
    with duckdb.connect() as con:  # a private in-memory database per call: callers run in threads
        con.register("shard_rows", rows)
        # A plain projection keeps the rows' order (DuckDB preserves insertion order unless told not to).
        objects = con.sql("SELECT to_json(r) AS j FROM shard_rows r").to_arrow_table().column("j")
    return ("[" + ",".join(objects.to_pylist()) + "]").encode()


def shard_table(
    table: pa.Table,
    selected: Positions,
    *,
    rank: int,
    world_size: int,
    seed: int,
    shuffle: bool,
    remainder: Remainder,
) -> pa.Table:
    """The manifest rows of ``rank``'s shard of ``selected``, in assignment order."""
    local = shard(len(selected), rank, world_size, seed=seed, shuffle=shuffle, remainder=remainder)
    return table.take(pa.array(selected[local], pa.int64()))
