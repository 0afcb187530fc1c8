"""The plan: which manifest rows a consumer reads, in shard order, over a manifest decoded on demand."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import ValidationError

from sluicegate._exceptions import NotFoundError, StoreError
from sluicegate.core.engine.upstream import URL_LIFETIME, BlobRef
from sluicegate.core.manifest import CHECK_COLUMN, info_from_metadata, query_fields
from sluicegate.core.partition import Positions
from sluicegate.core.query import Query, select_rows
from sluicegate.core.store import Store, _version_key

__all__ = ["Manifest", "Plan", "read_manifest"]


def read_manifest(store: Store, version: int) -> Manifest:
    """A version's manifest, fetched but not decoded; works in a forked process too (see :func:`forked`)."""
    key = _version_key(version)
    where = f"{store.uri}/{key}"
    root = store.local_root
    if root is not None:
        try:
            return Manifest((root / key).read_bytes(), where)
        except FileNotFoundError as exc:
            raise NotFoundError(f"{store.uri} has no version {version}") from exc
        except OSError as exc:
            raise StoreError(f"cannot read {where}: {exc}") from exc
    # A presigned GET: the same code with or without a usable obstore runtime.
    response = httpx.get(store.presign(key, URL_LIFETIME), timeout=120, trust_env=False)
    if response.status_code == 404:
        raise NotFoundError(f"{store.uri} has no version {version}")
    if response.status_code != 200:
        raise StoreError(f"cannot read {where}: HTTP {response.status_code}")
    return Manifest(response.content, where)


_HASH_COLUMNS = ("blob", CHECK_COLUMN)


def _check_hashes(column: pa.Array, name: str, where: str) -> None:
    """Refuse a manifest whose hashes are not hex digests: they name files (``blobs/<sha256>``, cache
    entries), so a value such as ``../../dev/zero`` must never reach a path. Checked once per column."""
    ok = pc.match_substring_regex(column, r"^[0-9a-f]{64}$")
    bad = pc.invert(pc.fill_null(ok, name != "blob"))  # the check column may be null; the blob may not
    if pc.any(bad).as_py():
        first = int(pc.index(bad, True).as_py())
        raise StoreError(
            f"{where} row {first}: {name} {column[first].as_py()!r} is not a lowercase hex digest; "
            "the manifest is corrupt or was not written by sluicegate (re-import the dataset)"
        )


class Manifest:
    """A manifest decoded on demand: a column when a query or a batch needs it, full rows one Parquet row
    group at a time when an item's annotations are asked for.

    Decoding a realistic million-item manifest whole takes seconds (annotations, a hash per item); the
    first item needs three columns. Built from Parquet bytes, or from a table already in memory.
    """

    def __init__(self, source: pa.Table | bytes, where: str = "manifest") -> None:
        self._where = where
        self._lock = threading.Lock()
        self._columns: dict[str, pa.Array] = {}
        self._groups: dict[int, tuple[pa.Table, list[str]]] = {}
        # The Parquet reader holds these bytes anyway; kept here so the digest can be taken when asked.
        self._raw = None if isinstance(source, pa.Table) else source
        self._digest: str | None = None
        if isinstance(source, pa.Table):
            self._file = None
            self._table: pa.Table | None = source
            self.schema = source.schema
            sizes = [b.num_rows for b in source.to_batches()]
        else:
            try:
                self._file = pq.ParquetFile(pa.BufferReader(source))
            except (pa.ArrowInvalid, OSError) as exc:
                raise StoreError(f"{where} is not a readable Parquet manifest: {exc}") from exc
            try:
                info_from_metadata(self._file.schema_arrow.metadata, where)
            except ValidationError as exc:
                raise StoreError(f"{where} has malformed version info in its footer: {exc}") from exc
            self._table = None
            self.schema = self._file.schema_arrow.remove_metadata()
            sizes = [self._file.metadata.row_group(g).num_rows for g in range(self._file.num_row_groups)]
        self._offsets = np.cumsum([0, *sizes])
        self.num_rows = int(self._offsets[-1])

    def __len__(self) -> int:
        return self.num_rows

    @property
    def digest(self) -> str | None:
        """The sha256 of the Parquet bytes this manifest was read from (None when built from a table);
        hashed on first use, so only what asks (the ledger) pays for it."""
        if self._digest is None and self._raw is not None:
            self._digest = hashlib.sha256(self._raw).hexdigest()
        return self._digest

    def column(self, name: str) -> pa.Array:
        """One column, decoded once and kept contiguous (take() on chunks concatenates them every call)."""
        return self.columns([name])[0]

    def columns(self, names: Sequence[str]) -> list[pa.Array]:
        """Several columns; those not decoded yet are read in one pass (decoded in parallel)."""
        with self._lock:
            missing = [n for n in names if n not in self._columns]
            if missing:
                source = self._table if self._table is not None else self._read(columns=missing)
                for name in missing:
                    column = source.column(name).combine_chunks()
                    if name in _HASH_COLUMNS:
                        _check_hashes(column, name, self._where)
                    self._columns[name] = column
            return [self._columns[n] for n in names]

    def query_table(self, queries: Sequence[Query]) -> pa.Table:
        """A table :func:`select_rows` can evaluate ``queries`` on: just the columns they name.

        Naming a field the manifest lacks raises :class:`QueryError` here, resolved against every field.
        """
        fields = query_fields(self.schema)
        needed = sorted({column for q in queries for column in q.columns(fields)})
        return pa.table(self.columns(needed), schema=pa.schema([self.schema.field(n) for n in needed]))

    def rows(self, positions: Positions) -> list[dict[str, Any]]:
        """Full rows at ``positions`` (plain dicts, as the wire carries them)."""
        group_of = np.searchsorted(self._offsets, positions, side="right") - 1
        out: list[dict[str, Any]] = [{}] * len(positions)
        for g in np.unique(group_of).tolist():
            where = np.flatnonzero(group_of == g)
            table, empty = self._group(g)
            part = table.take(pa.array(positions[where] - self._offsets[g])).to_pylist()
            for i, row in zip(where.tolist(), part, strict=True):
                for name in empty:
                    row[name] = []
                out[i] = row
        return out

    def _group(self, g: int) -> tuple[pa.Table, list[str]]:
        """Row group ``g`` without its list columns that hold only empty lists, and their names: taking
        rows of a nested column (annotations) costs more than all the others together, and a dataset
        without annotations need not pay it for every batch."""
        with self._lock:
            if g not in self._groups:
                if self._table is not None:
                    start, stop = int(self._offsets[g]), int(self._offsets[g + 1])
                    table = self._table.slice(start, stop - start).combine_chunks()
                else:
                    assert self._file is not None
                    table = self._file.read_row_group(g).replace_schema_metadata(None)
                empty = [
                    name
                    for name, column in zip(table.column_names, table.columns, strict=True)
                    if pa.types.is_list(column.type)
                    and column.null_count == 0
                    and pc.sum(pc.list_value_length(column)).as_py() in (0, None)
                ]
                self._groups[g] = (table.drop_columns(empty), empty)
            return self._groups[g]

    def _read(self, columns: list[str]) -> pa.Table:
        assert self._file is not None
        return self._file.read(columns=columns)


class Plan:
    """The items one consumer may read, in shard order: positions ``index`` into a :class:`Manifest` (all of
    it when ``index`` is None), plus blob URLs when the upstream is presigned GETs.

    Comes from a local query over the store's manifest or from a broker's response. Stays Arrow: nothing
    per item is built up front, so a million-item plan is ready at once.
    """

    def __init__(
        self,
        version: int,
        manifest: Manifest | pa.Table,
        index: Positions | None = None,
        urls: Mapping[str, str] | None = None,
    ) -> None:
        self.version = version
        self.manifest = manifest if isinstance(manifest, Manifest) else Manifest(manifest)
        self.index = index
        self.urls = urls
        self._ids: dict[str, int] | None = None

    def __len__(self) -> int:
        return self.manifest.num_rows if self.index is None else len(self.index)

    def _at(self, positions: Positions | Sequence[int]) -> Positions:
        pos = np.asarray(positions, dtype=np.int64)
        return pos if self.index is None else self.index[pos]

    def refs(self, positions: Positions | Sequence[int]) -> list[BlobRef]:
        idx = pa.array(self._at(positions))
        names = ["blob", "size", "id"]
        checked = CHECK_COLUMN in self.manifest.schema.names
        columns = [
            c.take(idx).to_pylist()
            for c in self.manifest.columns([*names, CHECK_COLUMN] if checked else names)
        ]
        shas, sizes, ids = columns[:3]
        checks = columns[3] if checked else [None] * len(shas)
        urls = self.urls or {}
        return [BlobRef(s, n, i, urls.get(s), c) for s, n, i, c in zip(shas, sizes, ids, checks, strict=True)]

    def rows(self, positions: Positions | Sequence[int]) -> list[dict[str, Any]]:
        """Full manifest rows (plain dicts, as the wire carries them)."""
        return self.manifest.rows(self._at(positions))

    def select(self, queries: Sequence[Query]) -> Positions:
        """Plan positions (ascending) of the items that match every (parsed) query."""
        table = self.manifest.query_table(queries)
        if self.index is not None:
            table = table.take(pa.array(self.index))
        return np.asarray(select_rows(table, list(queries)), dtype=np.int64)

    def position_of(self, item_id: str) -> int | None:
        """The position of ``item_id`` in the plan (an index built on first use)."""
        if self._ids is None:
            ids = self.manifest.column("id")
            if self.index is not None:
                ids = ids.take(pa.array(self.index))
            self._ids = {v: i for i, v in enumerate(ids.to_pylist())}
        return self._ids.get(item_id)
