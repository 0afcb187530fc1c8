"""The operator's view of dataset stores: one handle per full store identity, manifests and query
results cached and bounded.

Every cache is keyed on the *full* identity of what it holds: the canonical store URI, the endpoint, the
region and a digest of the credentials (:class:`StoreKey`), plus the manifest's own identity (its ETag,
or size and mtime for file stores). Two Datasets share an entry only when they would read the same bytes
with the same identity, so one tenant can neither read another's cached rows nor plant rows for them.

Every per-tenant cost is bounded (:class:`Limits`): manifest bytes (checked by a HEAD before the read),
rows, columns and decoded bytes (checked on the Parquet footer before decoding, and on the strings'
decoded size before they are expanded), cache bytes (least recently used entries go first). Store reads
have short timeouts and run on the catalog's own threads, so a slow or hostile store holds those threads
only, never the ones that Kubernetes API calls (and so admission) use.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

import duckdb
import numpy as np
import numpy.typing as npt
import obstore
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from obstore.exceptions import BaseError
from obstore.exceptions import NotFoundError as ObsNotFound
from obstore.store import LocalStore, ObjectStore, S3Store
from sluicegate import ConfigError, NotFoundError, StoreError
from sluicegate.core import partition as _partition
from sluicegate.core.manifest import info_from_metadata
from sluicegate.core.partition import Progress, ShardSpec
from sluicegate.core.query import guard_query, select_rows
from sluicegate.core.store import S3Options, Store

from .models import Dataset

Positions = npt.NDArray[np.int64]
ACCESS_KEY = "AWS_ACCESS_KEY_ID"
SECRET_KEY = "AWS_SECRET_ACCESS_KEY"
SESSION_TOKEN = "AWS_SESSION_TOKEN"
LATEST_REF = "refs/latest"
_NOT_FOUND = (ObsNotFound, FileNotFoundError)
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


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
class Limits:
    """What one Dataset may cost the shared operator."""

    manifest_bytes: int = 64 * 1024 * 1024  # a manifest object, as stored (compressed)
    manifest_rows: int = 10_000_000
    manifest_columns: int = 10_000
    decoded_bytes: int = 512 * 1024 * 1024  # one manifest in memory
    cache_bytes: int = 1024 * 1024 * 1024  # manifests, selections and shards together
    timeout_s: float = 10.0  # one store request, start to end
    connect_timeout_s: float = 3.0
    io_threads: int = 8  # store calls at once; one endpoint may hold a quarter of them


class ManifestTooLarge(StoreError):
    """A manifest exceeds one of the :class:`Limits`; the message says which and by how much."""


@dataclass(frozen=True)
class StoreKey:
    """The full identity of a store as the operator reads it."""

    uri: str  # canonical (sources.canonical_uri)
    endpoint: str  # canonical, "" for the default endpoint
    region: str
    credentials: str  # a digest of the keys ("ambient" for the operator's own), never the keys


@dataclass(frozen=True, eq=False)
class Handle:
    """An opened store: its identity, the SDK store (presigning, no I/O) and a reader with timeouts."""

    key: StoreKey
    store: Store
    reader: ObjectStore = field(repr=False)

    @property
    def uri(self) -> str:
        return self.key.uri


@dataclass(frozen=True)
class Manifest:
    table: pa.Table
    tag: str  # the manifest object's identity: ETag, or size and mtime
    nbytes: int
    digest: str  # sha256 of the object's bytes, as a ledger record names the manifest it read


@dataclass(frozen=True)
class Shard:
    """One rank's shard, serialised once: every broker request of that pod reuses it."""

    rows_json: bytes  # JSON array of the manifest rows in assignment order (sluicegate.core.protocol.WireRow)
    blobs: tuple[str, ...]  # distinct blob hashes, in first-use order
    blob_set: frozenset[str]
    items: int
    total: int  # items selected before sharding


class ByteLRU(Generic[K, V]):
    """A least-recently-used map bounded by the bytes its values are said to take (not thread-safe)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[K, tuple[int, V]] = OrderedDict()

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: K, value: V, nbytes: int) -> None:
        self.pop(key)
        if nbytes > self.max_bytes:
            return  # larger than the whole cache: used once, never kept
        self._entries[key] = (nbytes, value)
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            _, (size, _) = self._entries.popitem(last=False)
            self.bytes -= size

    def pop(self, key: K) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry[0]

    def drop(self, match: Callable[[K], bool]) -> None:
        for key in [k for k in self._entries if match(k)]:
            self.pop(key)

    def __len__(self) -> int:
        return len(self._entries)


def _reader(key: StoreKey, options: S3Options, limits: Limits) -> ObjectStore:
    """An obstore client for ``key`` with short timeouts and at most one retry."""
    if key.uri.startswith("file://"):
        return LocalStore(Path(key.uri[len("file://") :]))
    bucket, _, prefix = key.uri[len("s3://") :].partition("/")
    config: dict[str, str] = {"region": key.region or "us-east-1"}
    if key.endpoint:
        config["endpoint"] = key.endpoint
    for name, value in (
        ("access_key_id", options.access_key_id),
        ("secret_access_key", options.secret_access_key),
        ("session_token", options.session_token),
    ):
        if value:
            config[name] = value
    try:
        return S3Store(
            bucket,
            prefix=prefix or None,
            config=config,  # type: ignore[arg-type]
            client_options={
                "allow_http": key.endpoint.startswith("http://"),
                "timeout": f"{limits.timeout_s}s",
                "connect_timeout": f"{limits.connect_timeout_s}s",
            },
            retry_config={"max_retries": 1, "retry_timeout": timedelta(seconds=limits.timeout_s)},
        )
    except BaseError as exc:
        raise ConfigError(f"cannot configure the S3 store {key.uri}: {_short(exc)}") from exc


def _short(exc: BaseException, limit: int = 200) -> str:
    """An error's first line, cut short: a store's reply must not be copied wholesale into a status."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _size(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


class Catalog:
    """Store handles and cached, bounded manifests, selections and shards; thread-safe."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._handles: OrderedDict[StoreKey, Handle] = OrderedDict()
        self._cache: ByteLRU[tuple[Any, ...], Any] = ByteLRU(self.limits.cache_bytes)
        self._lock = threading.Lock()
        self._io = ThreadPoolExecutor(self.limits.io_threads, thread_name_prefix="sluicegate-store")
        self._per_endpoint: dict[str, asyncio.Semaphore] = {}

    async def run(self, fn: Callable[..., V], *args: Any, store: Handle | None = None, **kwargs: Any) -> V:
        """Run a call that may read ``store`` on the catalog's own threads (not the default executor).

        Calls for one endpoint (or file store) hold at most a quarter of those threads at once, so a
        store that hangs until its timeout (a tarpit) cannot hold the others' reads up.
        """
        loop = asyncio.get_running_loop()
        if store is None:
            return await loop.run_in_executor(self._io, partial(fn, *args, **kwargs))
        where = store.key.endpoint or store.key.uri.split("/")[2]
        slots = self._per_endpoint.setdefault(where, asyncio.Semaphore(max(1, self.limits.io_threads // 4)))
        async with slots:
            return await loop.run_in_executor(self._io, partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._io.shutdown(wait=False, cancel_futures=True)

    @property
    def cached_bytes(self) -> int:
        with self._lock:
            return self._cache.bytes

    def open(self, uri: str, endpoint: str, options: S3Options) -> Handle:
        """The handle of the store at canonical ``uri`` and ``endpoint`` read with ``options``' keys."""
        if options.access_key_id or options.secret_access_key:
            digest = hashlib.sha256(
                f"{options.access_key_id}\0{options.secret_access_key}\0{options.session_token}".encode()
            ).hexdigest()
        else:
            digest = "ambient"
        key = StoreKey(uri, endpoint, options.region or "", digest)
        with self._lock:
            found = self._handles.get(key)
            if found is not None:
                self._handles.move_to_end(key)
                return found
        sdk_options = S3Options(
            endpoint=endpoint or None,
            region=options.region,
            access_key_id=options.access_key_id,
            secret_access_key=options.secret_access_key,
            session_token=options.session_token,
        )
        handle = Handle(key, Store(uri, sdk_options), _reader(key, options, self.limits))
        with self._lock:
            self._handles[key] = handle
            while len(self._handles) > 4096:
                self._handles.popitem(last=False)
        return handle

    # -- reads (blocking; call through run) ---------------------------------------------------

    def _head(self, handle: Handle, path: str) -> dict[str, Any] | None:
        try:
            return dict(obstore.head(handle.reader, path))
        except _NOT_FOUND:
            return None
        except BaseError as exc:
            raise StoreError(f"cannot read {path} from {handle.uri}: {_short(exc)}") from exc

    def latest_version(self, handle: Handle) -> int:
        """The newest committed version, 0 for an empty store."""
        meta = self._head(handle, LATEST_REF)
        if meta is not None and int(meta.get("size") or 0) > 64:
            raise StoreError(f"{handle.uri}/{LATEST_REF} is {meta.get('size')} bytes, not a version number")
        try:
            raw = b"0" if meta is None else obstore.get(handle.reader, LATEST_REF).bytes().to_bytes()[:64]
            text = raw.decode("ascii", "replace").strip()
        except _NOT_FOUND:
            text = "0"
        except BaseError as exc:
            raise StoreError(f"cannot read {LATEST_REF} from {handle.uri}: {_short(exc)}") from exc
        if not text.isdigit():
            raise StoreError(f"{handle.uri}/{LATEST_REF} holds {text[:20]!r}, not a version number")
        n = int(text)
        for _ in range(1000):  # the ref is a hint that may lag a few commits behind
            if self._head(handle, f"versions/{n + 1}.parquet") is None:
                return n
            n += 1
        raise StoreError(f"{handle.uri}/{LATEST_REF} lags more than 1000 versions behind; repair the ref")

    def resolve(self, handle: Handle, version: int) -> int:
        if version < 1:
            raise NotFoundError(f"version {version} does not exist: versions are numbered from 1")
        if self._head(handle, f"versions/{version}.parquet") is None:
            raise NotFoundError(f"{handle.uri} has no version {version}")
        return version

    def manifest(self, handle: Handle, version: int, *, revalidate: bool = False) -> Manifest:
        """The bounded, decoded manifest of ``version``; cached by store identity, version and tag.

        ``revalidate`` checks the object's tag again (a HEAD): if the object changed, every cached
        result computed from the old bytes is dropped.
        """
        key = ("manifest", handle.key, version)
        with self._lock:
            cached: Manifest | None = self._cache.get(key)
        if cached is not None and not revalidate:
            return cached
        path = f"versions/{version}.parquet"
        meta = self._head(handle, path)
        if meta is None:
            raise NotFoundError(f"{handle.uri} has no version {version}")
        tag = str(meta.get("e_tag") or f"{meta.get('size')}-{meta.get('last_modified')}")
        if cached is not None and cached.tag == tag:
            return cached
        if cached is not None:
            with self._lock:
                self._cache.drop(lambda k: len(k) > 2 and k[1] == handle.key and k[2] == version)
        size = int(meta.get("size") or 0)
        if size > self.limits.manifest_bytes:
            raise ManifestTooLarge(
                f"{handle.uri}/{path} is {_size(size)}, over the operator's limit of "
                f"{_size(self.limits.manifest_bytes)} per manifest (chart value limits.manifestBytes)"
            )
        options: dict[str, Any] = {"range": (0, size)} if size else {}
        if meta.get("e_tag"):
            options["if_match"] = meta["e_tag"]
        try:
            data = obstore.get(handle.reader, path, options=options).bytes().to_bytes()  # type: ignore[arg-type]
        except _NOT_FOUND as exc:
            raise NotFoundError(f"{handle.uri} has no version {version}") from exc
        except BaseError as exc:
            raise StoreError(f"cannot read {path} from {handle.uri}: {_short(exc)}") from exc
        table = decode_manifest(data[: self.limits.manifest_bytes], f"{handle.uri}/{path}", self.limits)
        found = Manifest(table, tag, table.nbytes, hashlib.sha256(data).hexdigest())
        with self._lock:
            self._cache.put(key, found, found.nbytes)
        return found

    def select(self, handle: Handle, version: int, queries: tuple[str, ...]) -> Positions:
        """Row positions of ``version`` matching every non-empty query (raises QueryError)."""
        queries = tuple(q for q in queries if q.strip())
        for q in queries:
            guard_query(q)
        manifest = self.manifest(handle, version)
        key = ("select", handle.key, version, manifest.tag, queries)
        return self._memo(
            key,
            lambda: np.asarray(select_rows(manifest.table, list(queries)).to_numpy(), dtype=np.int64),
            lambda positions: positions.nbytes + 64 + sum(map(len, queries)),
        )

    def _memo(self, key: tuple[Any, ...], make: Callable[[], V], cost: Callable[[V], int]) -> V:
        """``make()``, kept in the byte-bounded cache under ``key`` at ``cost(result)`` bytes."""
        with self._lock:
            cached: V | None = self._cache.get(key)
        if cached is not None:
            return cached
        result = make()
        with self._lock:
            self._cache.put(key, result, cost(result))
        return result

    def shard(
        self,
        handle: Handle,
        version: int,
        queries: tuple[str, ...],
        spec: ShardSpec,
    ) -> Shard:
        """One rank's shard of the selection, serialised; cached like selections."""
        queries = tuple(q for q in queries if q.strip())
        manifest = self.manifest(handle, version)
        key = (
            "shard",
            handle.key,
            version,
            manifest.tag,
            queries,
            spec,
        )

        def make() -> Shard:
            selected = self.select(handle, version, queries)
            return _serialised(shard_table(manifest.table, selected, spec), len(selected))

        return self._memo(key, make, _shard_cost)

    def remainder(
        self, handle: Handle, version: int, queries: tuple[str, ...], spec: ShardSpec, progress: Progress
    ) -> Positions:
        """What the closed segments of ``progress`` left of the selection (partition.remainder_after),
        cached like selections: the same for every rank of the re-cut."""
        queries = tuple(q for q in queries if q.strip())
        manifest = self.manifest(handle, version)
        closed = progress.segments[:-1]
        cut = spec.model_copy(update={"rank": 0, "world_size": 1})  # what the remainder depends on
        key = ("remainder", handle.key, version, manifest.tag, queries, cut, progress.epoch, closed)

        def make() -> Positions:
            selected = self.select(handle, version, queries)
            return _partition.remainder_after(len(selected), spec, progress.epoch, closed)

        return self._memo(key, make, lambda rest: rest.nbytes + 256)

    def segment(
        self, handle: Handle, version: int, queries: tuple[str, ...], spec: ShardSpec, progress: Progress
    ) -> Shard:
        """One rank's assignment in the current segment of a re-cut epoch, serialised; cached."""
        queries = tuple(q for q in queries if q.strip())
        manifest = self.manifest(handle, version)
        key = (
            "segment",
            handle.key,
            version,
            manifest.tag,
            queries,
            spec,
            progress.epoch,
            progress.segments[:-1],
        )

        def make() -> Shard:
            selected = self.select(handle, version, queries)
            assignment = _partition.recut_assignment(
                self.remainder(handle, version, queries, spec, progress), spec
            )
            return _serialised(manifest.table.take(pa.array(selected[assignment], pa.int64())), len(selected))

        return self._memo(key, make, _shard_cost)

    def rows(self, handle: Handle, version: int, queries: tuple[str, ...], positions: Positions) -> Shard:
        """The rows at ``positions`` of the selection, in that order, serialised (a mix's re-cut: the
        source's part of a rank's block, which depends on every source; not cached)."""
        queries = tuple(q for q in queries if q.strip())
        manifest = self.manifest(handle, version)
        selected = self.select(handle, version, queries)
        return _serialised(manifest.table.take(pa.array(selected[positions], pa.int64())), len(selected))


def _shard_cost(shard: Shard) -> int:
    return len(shard.rows_json) + 80 * len(shard.blobs)


def _serialised(rows: pa.Table, total: int) -> Shard:
    """A rank's rows as the broker sends them, with the set of blobs it may ask URLs for."""
    blobs = tuple(dict.fromkeys(rows.column("blob").to_pylist()))
    return Shard(
        rows_json=rows_json(rows), blobs=blobs, blob_set=frozenset(blobs), items=rows.num_rows, total=total
    )


def decode_manifest(data: bytes, where: str, limits: Limits) -> pa.Table:
    """A manifest's table, refusing (:class:`ManifestTooLarge`) before decoding what would exceed ``limits``.

    The footer gives rows, columns and the uncompressed size of every page; top-level strings are read
    dictionary-encoded first, so their expanded size is known (and refused) before they are expanded.
    """
    try:
        meta = pq.read_metadata(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise StoreError(f"{where} is not a readable Parquet manifest: {_short(exc)}") from exc
    if meta.num_rows > limits.manifest_rows:
        raise ManifestTooLarge(
            f"{where} has {meta.num_rows} rows, over the operator's limit of {limits.manifest_rows} "
            "(chart value limits.manifestRows)"
        )
    if meta.num_columns > limits.manifest_columns:
        raise ManifestTooLarge(
            f"{where} has {meta.num_columns} columns, over the operator's limit of {limits.manifest_columns}"
        )
    # Nested columns (annotations) can repeat values without rows: bound the leaf values too, at a
    # quarter of the decoded budget (no value decodes to less than a few bytes).
    values = sum(
        meta.row_group(i).column(j).num_values
        for i in range(meta.num_row_groups)
        for j in range(meta.num_columns)
    )
    if values > limits.decoded_bytes // 4:
        raise ManifestTooLarge(
            f"{where} holds {values} values (rows times fields, lists expanded), over the operator's limit "
            f"of {limits.decoded_bytes // 4} (a quarter of chart value limits.manifestDecodedBytes)"
        )
    uncompressed = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if uncompressed > limits.decoded_bytes:
        raise ManifestTooLarge(
            f"{where} decodes to {_size(uncompressed)}, over the operator's limit of "
            f"{_size(limits.decoded_bytes)} (chart value limits.manifestDecodedBytes)"
        )
    schema = meta.schema.to_arrow_schema()
    strings = [
        f.name
        for f in schema
        if pa.types.is_string(f.type)
        or pa.types.is_large_string(f.type)
        or pa.types.is_binary(f.type)
        or pa.types.is_large_binary(f.type)
    ]
    try:
        table = pq.read_table(pa.BufferReader(data), read_dictionary=strings)
    except (pa.ArrowInvalid, OSError) as exc:
        raise StoreError(f"{where} is not a readable Parquet manifest: {_short(exc)}") from exc
    expanded = table.nbytes
    for name in strings:
        column = table.column(name)
        for chunk in column.chunks:
            lengths = pc.binary_length(chunk.dictionary)
            expanded += int(pc.sum(pc.take(lengths, chunk.indices)).as_py() or 0)
    if expanded > limits.decoded_bytes:
        raise ManifestTooLarge(
            f"{where} expands to {_size(expanded)} in memory, over the operator's limit of "
            f"{_size(limits.decoded_bytes)} (chart value limits.manifestDecodedBytes)"
        )
    columns = []
    for f in table.schema:
        column = table.column(f.name)
        if f.name in strings:
            column = column.cast(column.type.value_type)
        columns.append(column)
    info_from_metadata(table.schema.metadata, where)  # a sluicegate manifest, or StoreError
    decoded = pa.Table.from_arrays(columns, names=table.column_names)
    _check_blobs(decoded, where)
    return decoded


_SHA256 = "^[0-9a-f]{64}$"


def _check_blobs(table: pa.Table, where: str) -> None:
    """:class:`StoreError` unless every row's blob is a sha256 in hex: sidecars join blob hashes into cache
    paths and store keys, so a manifest must not smuggle ``../../dev/zero`` into them."""
    if "blob" not in table.column_names:
        raise StoreError(f"{where} is not a sluicegate manifest (no blob column)")
    blobs = table.column("blob")
    ok = pc.match_substring_regex(blobs, _SHA256)
    bad = pc.invert(pc.fill_null(ok, False))
    if pc.any(bad).as_py():
        first = int(pc.index(bad, True).as_py())
        shown = str(blobs[first].as_py())[:80]
        raise StoreError(f"{where}: row {first} has blob {shown!r}, which is not a sha256 hash in hex")


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


def shard_table(table: pa.Table, selected: Positions, spec: ShardSpec) -> pa.Table:
    """The manifest rows of one rank's shard of ``selected``, in assignment order."""
    local = spec.positions(len(selected))
    return table.take(pa.array(selected[local], pa.int64()))
