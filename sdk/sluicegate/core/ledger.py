"""The ledger: what every stream consumed, append-only and hash-chained, beside the versions.

Layout under a dataset's root (see :mod:`sluicegate.core.store`)::

    ledger/<run>/<chain>/<seq>.json     one record, seq zero-padded to 10 digits, written create-only

A *run* is a training run's id. A *chain* is one writer's records within a run: one trainer process, one
DataLoader worker process or one sidecar session. A writer appends only to its own chain, so no two writers
ever contend for a record and none reads anything before it writes (which a DataLoader worker could not do
on an object store: obstore's client does not survive ``fork()``, and a listing cannot be presigned).

A record says what one reader consumed in one stretch: the dataset, its pinned version (and the manifest's
sha256), how the reader's view was cut from that version (:class:`View`: queries, then a shard, possibly
twice, a sidecar's then the trainer's own), the epoch order it followed (seed, rank, epoch, DataLoader
worker) and the consumed positions of that order as ``[start, end)`` ranges in the order they were read
(a sequential pass is one range, never one row per item).

Tamper evidence: every record holds ``prev``, the sha256 of the previous record's exact bytes (``""`` for
the first), and ``digest``, the sha256 of its own canonical JSON with an empty ``digest``. Reading a chain
(:func:`read_run`) checks that seqs run 0, 1, 2, ... without a gap, that each record names the run, chain
and seq it is stored under, is in canonical form, matches its digest and follows its predecessor's hash: a
changed byte, a removed record and a re-ordered one are each reported, naming the record. What no chain can
show by itself is that its newest records, or a whole chain, were deleted; ``sluicegate ledger runs``
prints each run's chain heads so they can be compared with a copy kept elsewhere.

Reproducing a record (:class:`Resolver`) recomputes its items from its version's manifest with the data
path's own functions (:meth:`Plan.select`, :func:`~sluicegate.core.partition.assign`,
:func:`~sluicegate.core.partition.visit_order`), never with a copy of their arithmetic.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from sluicegate._exceptions import ConfigError, ConflictError, IntegrityError, NotFoundError, StoreError
from sluicegate.core import partition as _partition
from sluicegate.core.engine.plan import Manifest, Plan, read_manifest
from sluicegate.core.partition import Positions, Progress, RankPlan, ShardSpec
from sluicegate.core.query import Query
from sluicegate.core.store import Store

__all__ = [
    "MAX_RANGES",
    "NAME_PATTERN",
    "Chain",
    "ChainWriter",
    "Consumed",
    "Order",
    "Range",
    "Reading",
    "Record",
    "Resolver",
    "View",
    "Writer",
    "append_at",
    "check_name",
    "expand",
    "extend_ranges",
    "merge_ranges",
    "parse",
    "read_run",
    "record_key",
    "runs",
    "to_ranges",
]

PREFIX = "ledger/"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_NAME = re.compile(NAME_PATTERN)
_RECORD_FILE = re.compile(r"^(\d{10})\.json$")
_HEX = r"^([0-9a-f]{64})?$"
MAX_VIEWS = 4  # a reading's cuts: a sidecar's (or the broker's) and a trainer's, each a query and a shard
MAX_RANGES = 100_000  # bounds one record (a random-access reader's stretch is cut well before this)

Range = tuple[int, int]


# -- ranges ------------------------------------------------------------------------------------------


def to_ranges(sequence: Sequence[int] | Positions) -> list[Range]:
    """``sequence`` as ``[start, end)`` ranges in its own order: each range a run of consecutive
    positions, so a sequential read is one range and the exact order survives (duplicates included)."""
    ranges: list[Range] = []
    extend_ranges(ranges, sequence)
    return ranges


def extend_ranges(ranges: list[Range], sequence: Sequence[int] | Positions) -> None:
    """Append ``sequence`` to ``ranges`` (see :func:`to_ranges`), continuing the last range if it can."""
    seq = np.asarray(sequence, dtype=np.int64).reshape(-1)
    if seq.size == 0:
        return
    breaks = np.flatnonzero(np.diff(seq) != 1) + 1
    starts = seq[np.concatenate(([0], breaks))].tolist()
    ends = (seq[np.concatenate((breaks - 1, [seq.size - 1]))] + 1).tolist()
    if ranges and ranges[-1][1] == starts[0]:
        ranges[-1] = (ranges[-1][0], ends[0])
        starts, ends = starts[1:], ends[1:]
    ranges.extend(zip(starts, ends, strict=True))


def merge_ranges(ranges: Iterable[Range]) -> list[Range]:
    """The positions ``ranges`` cover, as sorted, disjoint, non-touching ranges (order and repeats gone)."""
    merged: list[Range] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def expand(ranges: Iterable[Range]) -> Positions:
    """Every position of ``ranges``, in their order."""
    parts = [np.arange(start, end, dtype=np.int64) for start, end in ranges]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


# -- the format --------------------------------------------------------------------------------------


class Order(StrEnum):
    """What a record's ranges index."""

    EPOCH = "epoch"  # the view's visiting order in that epoch (the worker's part of it): iteration
    INDEX = "index"  # the view's own indexes, in the order asked for: random access (ds[i], a sampler)


class View(BaseModel):
    """One cut from a sequence of manifest rows: the rows that match every query (in query order), then,
    when sharded, one rank's part of them in assignment order (:func:`~sluicegate.core.partition.assign`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    queries: tuple[str, ...] = ()
    shard: ShardSpec | None = None


class Reading(BaseModel):
    """How a reader walks a dataset version: its views applied in turn to the manifest, and the order it
    visits the result in (:func:`~sluicegate.core.partition.visit_order` for ``order`` epoch)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    views: tuple[View, ...] = Field(min_length=1, max_length=MAX_VIEWS)
    seed: int | None = Field(description="epoch-order shuffle seed; None: the view's own order")
    rank: int = Field(ge=0, description="the rank the epoch order is drawn for")
    epoch: int = Field(ge=0)
    order: Order
    worker: int = Field(default=0, ge=0, description="DataLoader worker whose part of the order was read")
    num_workers: int = Field(default=1, ge=1)
    progress: Progress | None = Field(
        default=None,
        description="an epoch resumed: the progress its pass continues (partition.rank_plan of the last "
        "sharded view, or of the whole reading when none); its order is what that progress left",
    )

    @model_validator(mode="after")
    def _worker_in_range(self) -> Reading:
        if self.worker >= self.num_workers:
            raise ValueError(f"worker {self.worker} is outside [0, {self.num_workers})")
        return self

    @model_serializer(mode="wrap")
    def _without_progress(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        # A fresh epoch's reading is written as it was before resuming existed: old records stay canonical.
        data: dict[str, object] = handler(self)
        if data.get("progress") is None:
            data.pop("progress", None)
        return data

    @property
    def ranks(self) -> str:
        """The reader's rank as its views cut it: ``"3"``, or ``"3.1"`` for local rank 1 of pod rank 3; with
        no shard, the rank it read for (a re-cut mix epoch reads each source whole, by key)."""
        return ".".join(str(v.shard.rank) for v in self.views if v.shard is not None) or str(self.rank)


class Writer(BaseModel):
    """Who wrote a chain: a process, and in a pod the pod, its namespace and its stream."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = Field(default="", max_length=253)
    pid: int = Field(default=0, ge=0)
    worker: int | None = Field(default=None, ge=0, description="DataLoader worker id, in a worker process")
    namespace: str | None = Field(default=None, max_length=253)
    stream: str | None = Field(default=None, max_length=253)
    pod: str | None = Field(default=None, max_length=253)


class Consumed(BaseModel):
    """What one reader consumed in one stretch: positions of its reading's sequence, as ranges in the order
    they were handed out. What a recorder cuts and a sidecar receives; a :class:`Record` once written."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    reading: Reading
    ranges: tuple[Range, ...] = Field(min_length=1, max_length=MAX_RANGES)

    @field_validator("ranges")
    @classmethod
    def _ranges(cls, value: tuple[Range, ...]) -> tuple[Range, ...]:
        for start, end in value:
            if not 0 <= start < end:
                raise ValueError(f"range [{start}, {end}) is empty or negative")
        return value

    @property
    def items(self) -> int:
        return sum(end - start for start, end in self.ranges)

    def under(self, view: View) -> Consumed:
        """This stretch as read through ``view`` first: a sidecar's or the broker's cut, in front of the
        trainer's own views; :class:`ConfigError` when that makes more views than a reading holds."""
        try:
            reading = Reading(**{**dict(self.reading), "views": (view, *self.reading.views)})
        except ValidationError as exc:
            raise ConfigError(
                f"a reported reading has {len(self.reading.views)} views; a record holds {MAX_VIEWS} with "
                f"the serving side's cut in front, so report at most {MAX_VIEWS - 1}"
            ) from exc
        return self.model_copy(update={"reading": reading})

    @property
    def recut(self) -> Progress | None:
        """The re-cut epoch whose rows this stretch indexes, when it is of a mix's re-cut rows: a trainer's
        mix reads each source's re-cut rows (0 = the first of them) from that source's sidecar, and reports
        them in index order with the re-cut's progress (what random access never states)."""
        return self.reading.progress if self.reading.order is Order.INDEX else None

    def recut_as(self, cut: View, rows: Positions) -> Consumed:
        """This stretch of re-cut rows (:attr:`recut`) as the selection positions ``rows`` they are (row
        ``k`` is selection position ``rows[k]``): one plain view of ``cut``'s queries, in index order, as
        an embedded mix records its re-cut epoch. :class:`ConfigError` for a row outside ``rows`` or a
        reading that cuts the rows again."""
        reading = self.reading
        if reading.views != (View(),):
            raise ConfigError(
                "a report of a re-cut mix epoch's rows reads them as served: its reading has one plain view"
            )
        for start, end in self.ranges:  # checked before expanding: a range costs its length in memory
            if end > len(rows):
                raise ConfigError(
                    f"re-cut row range [{start}, {end}) is outside the {len(rows)} re-cut rows served"
                )
        recorded = Reading(
            views=(View(queries=cut.queries),),
            seed=None,
            rank=cut.shard.rank if cut.shard is not None else 0,
            epoch=reading.epoch,
            order=Order.INDEX,
        )
        ranges = to_ranges(rows[expand(self.ranges)])
        if len(ranges) > MAX_RANGES:
            raise ConfigError(f"a report of {len(ranges)} selection ranges is more than a record holds")
        return Consumed(reading=recorded, ranges=tuple(ranges))


class Record(BaseModel):
    """One record of a chain, as stored (``ledger/<run>/<chain>/<seq>.json``): the single source of truth
    of the format. Its bytes are exactly ``model_dump_json()``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal[1] = 1
    run: str = Field(pattern=NAME_PATTERN)
    chain: str = Field(pattern=NAME_PATTERN)
    seq: int = Field(ge=0)
    prev: str = Field(pattern=_HEX, description="sha256 of the previous record's bytes; '' for the first")
    time: str = Field(description="when the record was written, ISO 8601 in UTC")
    writer: Writer
    dataset: str = Field(description="the dataset store's URI")
    version: int = Field(ge=1)
    manifest: str | None = Field(pattern=_HEX, description="sha256 of versions/<version>.parquet")
    reading: Reading
    ranges: tuple[Range, ...] = Field(min_length=1, max_length=MAX_RANGES)
    items: int = Field(ge=1, description="positions the ranges cover")
    digest: str = Field(pattern=_HEX, description="sha256 of this record's JSON with digest ''")

    @field_validator("time")
    @classmethod
    def _time(cls, value: str) -> str:
        datetime.fromisoformat(value)  # ValueError: not a time
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Record:
        Consumed(reading=self.reading, ranges=self.ranges)  # the ranges' own checks
        covered = sum(end - start for start, end in self.ranges)
        if covered != self.items:
            raise ValueError(f"items is {self.items} but the ranges cover {covered}")
        return self

    @property
    def key(self) -> str:
        return record_key(self.run, self.chain, self.seq)

    def own_digest(self) -> str:
        return _sha256(self.model_copy(update={"digest": ""}).model_dump_json().encode())


def record_key(run: str, chain: str, seq: int) -> str:
    return f"{PREFIX}{run}/{chain}/{seq:010d}.json"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_name(what: str, name: str) -> str:
    """``name`` if it can name a run or chain (a path segment: letters, digits, ``.``, ``_``, ``-``)."""
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"{what} {name!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def parse(data: bytes, where: str) -> Record:
    """The record in ``data``: :class:`StoreError` when it is no record, :class:`IntegrityError` when it is
    not exactly as written (not canonical, or not matching its digest)."""
    try:
        record = Record.model_validate_json(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "record"
        raise StoreError(f"{where} is not a ledger record ({loc}: {first['msg']})") from None
    if record.model_dump_json().encode() != data:
        raise IntegrityError(f"{where} was changed: its bytes are not the record sluicegate wrote")
    if record.own_digest() != record.digest:
        raise IntegrityError(f"{where} was changed: its content does not match its digest")
    return record


# -- writing -----------------------------------------------------------------------------------------


def _seal(
    consumed: Consumed,
    *,
    run: str,
    chain: str,
    seq: int,
    prev: str,
    writer: Writer,
    dataset: str,
    version: int,
    manifest: str | None,
) -> bytes:
    """The exact bytes of record ``seq`` of ``run``/``chain``, written now, following ``prev``."""
    record = Record(
        run=run,
        chain=chain,
        seq=seq,
        prev=prev,
        time=datetime.now(UTC).isoformat(timespec="milliseconds"),
        writer=writer,
        dataset=dataset,
        version=version,
        manifest=manifest,
        reading=consumed.reading,
        ranges=consumed.ranges,
        items=consumed.items,
        digest="",
    )
    return record.model_copy(update={"digest": record.own_digest()}).model_dump_json().encode()


class ChainWriter:
    """Appends records to one chain of one run; used by one thread at a time.

    A failed append changes nothing here, and retrying the same :class:`Consumed` writes the very same
    bytes: an earlier try that landed although its answer was lost is recognised, not written twice.
    """

    def __init__(self, store: Store, run: str, chain: str) -> None:
        self.store = store
        self.run = check_name("run", run)
        self.chain = check_name("chain", chain)
        self.seq = 0
        self._prev = ""
        self._pending: tuple[Consumed, bytes] | None = None

    def append(
        self, consumed: Consumed, *, writer: Writer, dataset: str, version: int, manifest: str | None
    ) -> Record:
        if self._pending is not None and self._pending[0] == consumed:
            data = self._pending[1]
        else:
            data = _seal(
                consumed,
                run=self.run,
                chain=self.chain,
                seq=self.seq,
                prev=self._prev,
                writer=writer,
                dataset=dataset,
                version=version,
                manifest=manifest,
            )
            self._pending = (consumed, data)
        key = record_key(self.run, self.chain, self.seq)
        if not self.store.create_object(key, data) and self.store.read_object(key) != data:
            raise ConflictError(
                f"{self.store.uri}/{key} exists and is not this writer's record: another writer uses chain "
                f"{self.chain!r} of run {self.run!r}"
            )
        self._pending = None
        self.seq += 1
        self._prev = _sha256(data)
        return Record.model_validate_json(data)


def append_at(
    store: Store,
    consumed: Consumed,
    *,
    run: str,
    chain: str,
    seq: int,
    writer: Writer,
    dataset: str,
    version: int,
    manifest: str | None,
) -> Record:
    """Write record ``seq`` of a chain whose writer keeps no state between records (the broker: any of
    its replicas may take any report). The previous record is read back for its hash, so records are
    written in order: :class:`ConflictError` while record ``seq - 1`` is missing. A record already at
    ``seq`` with this very content (an earlier try whose answer was lost) is the answer; one with other
    content is a :class:`ConfigError` (the report's number was used before: retrying cannot help)."""
    check_name("run", run)
    check_name("chain", chain)
    prev = ""
    if seq:
        before = record_key(run, chain, seq - 1)
        try:
            prev = _sha256(store.read_object(before))
        except NotFoundError:
            raise ConflictError(
                f"record {seq - 1} of chain {chain!r} of run {run!r} is not written yet: a chain's records "
                "are written in order; send the earlier report first"
            ) from None
    data = _seal(
        consumed,
        run=run,
        chain=chain,
        seq=seq,
        prev=prev,
        writer=writer,
        dataset=dataset,
        version=version,
        manifest=manifest,
    )
    key = record_key(run, chain, seq)
    if store.create_object(key, data):
        return Record.model_validate_json(data)
    found = parse(store.read_object(key), f"{store.uri}/{key}")
    same = (found.prev, found.writer, found.dataset, found.version, found.reading, found.ranges)
    if same == (prev, writer, dataset, version, consumed.reading, consumed.ranges):
        return found
    raise ConfigError(
        f"{store.uri}/{key} holds another record: report {seq} of chain {chain!r} of run {run!r} was sent "
        "before with other content; a chain's reports are numbered once each"
    )


# -- reading -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chain:
    """One chain as read back: the records that verify, in order, and why it stops there if it does."""

    run: str
    name: str
    records: tuple[Record, ...]
    broken: str | None  # what is wrong, naming the record; None: every record verifies
    head: str  # sha256 of the last verified record ("" for none): compare with a copy kept elsewhere


def runs(store: Store) -> list[str]:
    """The runs that have records in ``store``'s ledger, sorted."""
    return sorted({key[len(PREFIX) :].split("/", 1)[0] for key in store.list_objects(PREFIX)})


def read_run(store: Store, run: str) -> list[Chain]:
    """Every chain of ``run``, each verified (see the module docstring); :class:`NotFoundError` for a run
    with no records."""
    check_name("run", run)
    keys = store.list_objects(f"{PREFIX}{run}/")
    if not keys:
        known = runs(store)
        hint = f"; it has {', '.join(known[:10])}" if known else "; it has no ledger yet"
        raise NotFoundError(f"{store.uri} has no run {run!r} in its ledger{hint}")
    chains: dict[str, list[str]] = {}
    for key in keys:
        rest = key[len(f"{PREFIX}{run}/") :]
        name, _, file = rest.partition("/")
        chains.setdefault(name, []).append(file)
    # An object store answers one small GET at a time slowly: read a run's records concurrently.
    wanted = [k for k in keys if not k.rsplit("/", 1)[-1].startswith(".")]
    with ThreadPoolExecutor(max_workers=16) as pool:
        data = dict(zip(wanted, pool.map(_read_or_none(store), wanted), strict=True))
    return [_read_chain(store, run, name, files, data) for name, files in sorted(chains.items())]


def _read_or_none(store: Store) -> Callable[[str], bytes | None]:
    def read(key: str) -> bytes | None:
        try:
            return store.read_object(key)
        except NotFoundError:  # deleted since the listing: reported as a missing record
            return None

    return read


def _read_chain(store: Store, run: str, name: str, files: list[str], data: dict[str, bytes | None]) -> Chain:
    where = f"{store.uri}/{PREFIX}{run}/{name}"
    records: list[Record] = []
    head = ""

    def broken(why: str) -> Chain:
        return Chain(run, name, tuple(records), f"chain {name} of run {run} is broken: {why}", head)

    if not _NAME.fullmatch(name):
        return broken(f"{where} is not a chain name")
    seqs: list[int] = []
    for file in files:
        if file.startswith("."):
            continue  # a local writer's temporary file (linked into place, then removed)
        match = _RECORD_FILE.fullmatch(file)
        if match is None:
            return broken(f"{where}/{file} is not a record file (<seq>.json)")
        seqs.append(int(match.group(1)))
    seqs.sort()
    for expected, seq in enumerate(seqs):
        if seq != expected:
            return broken(f"record {expected} is missing (the next one is {seq})")
        raw = data.get(record_key(run, name, seq))
        if raw is None:
            return broken(f"record {seq} disappeared while the chain was read")
        try:
            record = parse(raw, f"record {seq}")
        except StoreError as exc:  # IntegrityError included
            return broken(str(exc))
        if (record.run, record.chain, record.seq) != (run, name, seq):
            return broken(
                f"record {seq} says it is record {record.seq} of chain {record.chain} of run {record.run} "
                "(records were moved or re-ordered)"
            )
        if record.prev != head:
            return broken(
                f"record {seq} does not follow record {seq - 1}: its prev hash differs "
                "(a record before it was changed, removed or re-ordered)"
            )
        records.append(record)
        head = _sha256(raw)
    return Chain(run, name, tuple(records), None, head)


class Resolver:
    """Recomputes what records consumed, from their versions' manifests; caches per version and view."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._manifests: dict[int, Manifest] = {}
        self._views: dict[tuple[int, tuple[View, ...]], Positions] = {}
        self._plans: dict[tuple[int, Reading], tuple[Positions, RankPlan]] = {}
        self._ids: dict[int, list[str]] = {}
        self._rows: dict[int, dict[str, int]] = {}

    def manifest(self, version: int) -> Manifest:
        if version not in self._manifests:
            self._manifests[version] = read_manifest(self.store, version)
        return self._manifests[version]

    def check(self, record: Record) -> None:
        """:class:`IntegrityError` when the record's version is not the manifest it read."""
        digest = self.manifest(record.version).digest
        if record.manifest is not None and digest != record.manifest:
            raise IntegrityError(
                f"record {record.seq} of chain {record.chain} read version {record.version} with manifest "
                f"sha256 {record.manifest}, but versions/{record.version}.parquet now hashes to {digest}"
            )

    def view(self, version: int, views: tuple[View, ...]) -> Positions:
        """Manifest rows of a reading's views, in assignment order."""
        key = (version, views)
        if key not in self._views:
            manifest = self.manifest(version)
            positions = np.arange(len(manifest), dtype=np.int64)
            for level, view in enumerate(views):
                if view.queries:
                    plan = Plan(version, manifest, index=None if level == 0 else positions)
                    positions = positions[plan.select([Query.parse(q) for q in view.queries])]
                positions = _partition.assign(positions, view.shard)
            self._views[key] = positions
        return self._views[key]

    def consumed(self, record: Record) -> tuple[Positions, Positions]:
        """The manifest rows the record consumed, in the order consumed, and each one's place: its index in
        the rank's whole epoch order (for ``order`` epoch; across workers), else its index in the view."""
        reading = record.reading
        if reading.order is Order.EPOCH and reading.progress is not None:
            return self._resumed(record)
        view = self.view(record.version, reading.views)
        if reading.order is Order.EPOCH:
            sequence = _partition.visit_order(
                len(view),
                seed=reading.seed,
                epoch=reading.epoch,
                rank=reading.rank,
                worker=reading.worker,
                num_workers=reading.num_workers,
            )
        else:
            sequence = np.arange(len(view), dtype=np.int64)
        local = _consumed(record, len(sequence))
        indexes = sequence[local]
        # Worker w of k reads every k-th place of the epoch order from w (partition.worker_split).
        epoch = reading.order is Order.EPOCH
        places = reading.worker + local * reading.num_workers if epoch else indexes
        return view[indexes], places

    def plan(self, version: int, reading: Reading) -> tuple[Positions, RankPlan]:
        """A resumed reading's rank plan (partition.rank_plan) and the manifest rows its assignment
        indexes: the progress applies to the last view with a shard when only plain views follow it (a
        sidecar's shard read as it is, or the trainer's own), else to the whole reading."""
        key = (version, reading.model_copy(update={"worker": 0, "num_workers": 1}))
        if key not in self._plans:
            views = reading.views
            cut = None
            for i in range(len(views) - 1, -1, -1):
                if views[i].shard is not None:
                    cut = i
                    break
                if views[i].queries:
                    break
            if cut is not None:
                spec = views[cut].shard
                assert spec is not None
                base = (*views[:cut], views[cut].model_copy(update={"shard": None}))
                rows = self.view(version, base)
                plan = _partition.rank_plan(
                    len(rows), spec, epoch=reading.epoch, progress=reading.progress, order_rank=reading.rank
                )
            else:
                rows = self.view(version, views)
                spec = ShardSpec(seed=reading.seed or 0, shuffle=reading.seed is not None)
                plan = _partition.rank_plan(
                    len(rows),
                    spec,
                    epoch=reading.epoch,
                    progress=reading.progress,
                    whole=True,
                    order_rank=reading.rank,
                )
            self._plans[key] = (rows[plan.assignment], plan)
        return self._plans[key]

    def _resumed(self, record: Record) -> tuple[Positions, Positions]:
        """:meth:`consumed` of a resumed epoch's record: places are slots of the rank's order."""
        reading = record.reading
        try:
            rows, plan = self.plan(record.version, reading)
        except ConfigError as exc:
            raise StoreError(
                f"record {record.seq} of chain {record.chain} of run {record.run} is malformed: its progress "
                f"does not fit version {record.version}: {exc}"
            ) from exc
        slots = _partition.worker_split(plan.todo, reading.worker, reading.num_workers)
        places = slots[_consumed(record, len(slots))]
        return rows[plan.order[places]], places

    def ids(self, version: int) -> list[str]:
        if version not in self._ids:
            self._ids[version] = [str(v) for v in self.manifest(version).column("id").to_pylist()]
        return self._ids[version]

    def row_of(self, version: int, item_id: str) -> int | None:
        """The manifest row of ``item_id`` in ``version``, or None when that version has no such item."""
        if version not in self._rows:
            self._rows[version] = {v: i for i, v in enumerate(self.ids(version))}
        return self._rows[version].get(item_id)


# -- answers -----------------------------------------------------------------------------------------


@dataclass
class RunSummary:
    """One run as its records tell it."""

    run: str
    chains: list[Chain]
    ranks: set[str] = field(default_factory=set)
    versions: set[int] = field(default_factory=set)
    epochs: set[int] = field(default_factory=set)
    items: int = 0
    records: int = 0
    last: str = ""

    @property
    def broken(self) -> list[str]:
        return [c.broken for c in self.chains if c.broken is not None]


def summarize(store: Store) -> list[RunSummary]:
    """Every run of the ledger, its chains verified."""
    out = []
    for run in runs(store):
        summary = RunSummary(run, read_run(store, run))
        for chain in summary.chains:
            for record in chain.records:
                summary.ranks.add(record.reading.ranks)
                summary.versions.add(record.version)
                summary.epochs.add(record.reading.epoch)
                summary.items += record.items
                summary.records += 1
                summary.last = max(summary.last, record.time)
        out.append(summary)
    return out


@dataclass
class Use:
    """How often one (run, rank, epoch, version) consumed an item, and when last."""

    run: str
    rank: str
    epoch: int
    version: int
    times: int
    last: str


def item_uses(store: Store, item_id: str) -> tuple[list[Use], list[str], Resolver]:
    """Every (run, rank, epoch, version) whose records consumed ``item_id``, the chains that do not verify
    (their records up to the break are searched; the rest cannot be), and the resolver that read the
    versions (it knows which of them hold the item)."""
    resolver = Resolver(store)
    uses: dict[tuple[str, str, int, int], Use] = {}
    broken: list[str] = []
    for run in runs(store):
        for chain in read_run(store, run):
            if chain.broken is not None:
                broken.append(chain.broken)
            for record in chain.records:
                row = resolver.row_of(record.version, item_id)
                if row is None:
                    continue
                resolver.check(record)
                rows, _ = resolver.consumed(record)
                times = int(np.count_nonzero(rows == row))
                if not times:
                    continue
                key = (run, record.reading.ranks, record.reading.epoch, record.version)
                use = uses.setdefault(key, Use(*key, times=0, last=""))
                use.times += times
                use.last = max(use.last, record.time)
    return sorted(uses.values(), key=lambda u: (u.run, u.rank, u.epoch, u.version)), broken, resolver


@dataclass
class Passage:
    """The items one reading of a run consumed in one epoch, in order (see :func:`run_items`)."""

    rank: str
    epoch: int
    version: int
    order: Order
    places: Positions  # each item's index in the rank's epoch order (order index: in the view)
    ids: list[str]


def run_items(store: Store, run: str, rank: str | None = None, epoch: int | None = None) -> list[Passage]:
    """The exact items ``run`` consumed, per (rank, epoch, reading), in order: by place in the rank's
    epoch order (the DataLoader workers' parts put back together; a second pass over the same epoch after
    the first), random access in the order asked for. :class:`IntegrityError` if a chain does not verify:
    a sequence with a hole in it would not be exact."""
    chains = read_run(store, run)
    for chain in chains:
        if chain.broken is not None:
            raise IntegrityError(chain.broken)
    resolver = Resolver(store)
    groups: dict[tuple[str, int, int, Reading], list[tuple[int, Record, Positions, Positions]]] = {}
    for number, chain in enumerate(chains):
        for record in chain.records:
            reading = record.reading
            if (rank is not None and reading.ranks != rank) or (epoch is not None and reading.epoch != epoch):
                continue
            resolver.check(record)
            rows, places = resolver.consumed(record)
            same_pass = reading.model_copy(update={"worker": 0, "num_workers": 1})
            key = (reading.ranks, reading.epoch, record.version, same_pass)
            groups.setdefault(key, []).append((number, record, rows, places))
    passages = []
    for (ranks, ep, version, reading), parts in groups.items():
        if reading.order is Order.EPOCH:
            # The k-th read of a place within one chain belongs to pass k: passes in turn, each in order.
            rows_of, places_of, passes_of = [], [], []
            for n in sorted({p[0] for p in parts}):
                mine = sorted((p for p in parts if p[0] == n), key=lambda p: p[1].seq)
                chain_places = np.concatenate([p[3] for p in mine])
                rows_of.append(np.concatenate([p[2] for p in mine]))
                places_of.append(chain_places)
                passes_of.append(_occurrence(chain_places))
            rows, places = np.concatenate(rows_of), np.concatenate(places_of)
            order = np.lexsort((places, np.concatenate(passes_of)))
            rows, places = rows[order], places[order]
        else:
            parts.sort(key=lambda p: (p[1].time, p[0], p[1].seq))
            rows = np.concatenate([p[2] for p in parts])
            places = np.concatenate([p[3] for p in parts])
        ids = resolver.ids(version)
        passages.append(Passage(ranks, ep, version, reading.order, places, [ids[i] for i in rows.tolist()]))
    passages.sort(key=lambda p: (p.rank, p.epoch, p.version, p.order.value))
    return passages


def _occurrence(values: Positions) -> Positions:
    """For each element, how many equal elements come before it."""
    order = np.argsort(values, kind="stable")
    ranked = values[order]
    starts = np.flatnonzero(np.concatenate(([True], ranked[1:] != ranked[:-1])))
    counts = np.diff(np.concatenate((starts, [len(values)])))
    first = np.repeat(starts, counts)
    occurrence = np.empty(len(values), dtype=np.int64)
    occurrence[order] = np.arange(len(values)) - first
    return occurrence


def _consumed(record: Record, length: int) -> Positions:
    """The places of a sequence of ``length`` that ``record`` says were consumed; a record that names a
    place past the end is malformed."""
    local = expand(record.ranges)
    if local.size and int(local.max()) >= length:
        raise StoreError(
            f"record {record.seq} of chain {record.chain} of run {record.run} is malformed: it consumed "
            f"position {int(local.max())} of a sequence of {length} (version {record.version})"
        )
    return local
