"""The wire protocol between the SDK and a sidecar: the one source of truth for paths, models and framing.

Every path is versioned (``/v1/...``). Errors are JSON ``{"code": ..., "message": ...}`` with a 4xx status
for a bad request (the sidecar keeps serving) and 5xx for a fault of the data path.

Items travel in *batches*, one response carrying many items, because one HTTP request per item cannot keep
up with a training loop (see ARCHITECTURE "Speed"). A batch body (``BATCH_CONTENT_TYPE``) is::

    u32 big-endian  header length N
    N bytes         BatchHeader as JSON: one manifest row per item (keys are manifest column names)
    ...             the items' bytes, concatenated in header order; item i is ``rows[i]["size"]`` long

Beside each unix socket ``PATH`` the sidecar serves, ``PATH`` + :data:`FD_SOCKET_SUFFIX` takes the same
batch requests without HTTP, and the items' bytes travel in a memory file (``memfd``), never through the
socket. Both directions are frames (``u32`` big-endian length, then JSON): a :class:`BatchRequest`,
answered by an :class:`FdAnswer`. A request may carry the descriptor of a memory file of the client's own
(``SCM_RIGHTS``, with its first bytes): the sidecar writes the answer's bytes into it from offset 0,
growing it if needed and never shrinking it, and answers without a descriptor. The client maps it once
and keeps reusing it, so the bytes are copied once, by the sidecar, and the client's items are views of
that memory. A request without one is answered with the descriptor of a memory file of the sidecar's
(in the answer's first message), rewritten for the connection's next answer, which the client copies out
of. Either way the file holds the items' bytes concatenated in header order. A trainer that shares the
pod's volume with its sidecar uses this socket; everything else (TCP, no ``memfd``) uses HTTP.

Indexes on the wire are positions in the sidecar's shard in *assignment* order (``0 .. items-1``); the
epoch order is computed on both sides by the pure functions of :mod:`sluicegate.core.partition`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import pydantic_core
from pydantic import BaseModel, ConfigDict, Field

from sluicegate._exceptions import ConfigError
from sluicegate.core.ledger import NAME_PATTERN, Consumed, View, Writer
from sluicegate.core.partition import Pass, Positions, Progress, ShardSpec

__all__ = [
    "BATCH_CONTENT_TYPE",
    "FD_SOCKET_SUFFIX",
    "MAX_BATCH_ITEMS",
    "BatchHeader",
    "BatchRequest",
    "ErrorBody",
    "ErrorCode",
    "FdAnswer",
    "Info",
    "LedgerReport",
    "Paths",
    "ProgressReport",
    "Resume",
    "SelectRequest",
    "SelectResponse",
    "StreamParams",
    "WireRow",
    "decode_batch",
    "encode_fd_answer",
    "encode_header",
    "frame",
    "frame_length",
    "item_views",
]

BATCH_CONTENT_TYPE = "application/x-sluicegate-batch"
MAX_BATCH_ITEMS = 4096  # bounds one response's size and the server's memory per request
_LEN = struct.Struct(">I")
FD_SOCKET_SUFFIX = ".fd"
MAX_FRAME = 4 * 2**20  # a request frame (indexes and read-ahead of one batch) is far smaller


class Paths:
    """The sidecar's endpoints."""

    INFO = "/v1/info"
    ITEM = "/v1/items/{index}"  # GET: one item by shard index
    ITEM_BY_ID = "/v1/items"  # GET ?id=...: one item by id (404 not_in_shard when another rank owns it)
    BATCH = "/v1/batch"  # POST BatchRequest -> batch body
    STREAM = "/v1/stream"  # GET StreamParams -> batch body: a stretch of the shard's epoch order
    SELECT = "/v1/select"  # POST SelectRequest -> SelectResponse
    WAIT = "/v1/wait"  # POST WaitReport -> 204: seconds the trainer waited for data (see core.wait)
    LEDGER = "/v1/ledger"  # POST LedgerReport -> 204: what the trainer consumed, for the ledger (core.ledger)
    PROGRESS = "/v1/progress"  # POST ProgressReport -> 204: how far the trainer got in its epoch
    METRICS = "/metrics"
    HEALTHZ = "/healthz"
    READYZ = "/readyz"


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    NOT_IN_SHARD = "not_in_shard"
    QUERY = "query_error"
    INTEGRITY = "integrity_error"
    UPSTREAM = "upstream_error"
    NOT_READY = "not_ready"
    UNAUTHENTICATED = "unauthenticated"  # the metrics listener: no or a wrong scrape token
    INTERNAL = "internal_error"


class ErrorBody(BaseModel):
    code: ErrorCode
    message: str


class Resume(BaseModel):
    """An epoch a sidecar continues from its stream's progress (:class:`~sluicegate.core.partition.Progress`,
    this rank's consumption of the current segment included). Re-cut for another world size (segment 1
    or later), this rank's assignment of the current segment is served as ``items`` rows from plan index
    ``first`` on, after the shard's own rows; in segment 0 the shard itself is the assignment."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    progress: Progress
    first: int = Field(ge=0, description="plan index of the re-cut assignment's first row")
    items: int = Field(ge=0, description="rows in this rank's re-cut assignment (0 in segment 0)")
    mix: bool = Field(
        default=False,
        description="the progress is of a mix's order (a DatasetStream's spec.sources), whose re-cut rows of "
        "this source are these: the trainer's mix continues it, not this source alone",
    )


class Info(ShardSpec):
    """What a sidecar serves: one shard (the spec's fields) of one pinned version of one dataset."""

    model_config = ConfigDict(frozen=True)

    dataset: str
    version: int
    query: str | None
    total: int = Field(description="items the query selects, before sharding")
    items: int = Field(description="items in this rank's shard (every rank has the same count)")
    resume: Resume | None = Field(default=None, description="the epoch continued from the stream's progress")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    indexes: list[int] = Field(max_length=MAX_BATCH_ITEMS, description="shard indexes, in response order")
    readahead: list[int] = Field(
        default_factory=list,
        max_length=16 * MAX_BATCH_ITEMS,
        description="shard indexes the client will ask for next; the sidecar prefetches them",
    )
    client: str = Field(
        default="", max_length=64, description="the caller's id: read-ahead is kept per client"
    )


class StreamParams(BaseModel):
    """A stretch ``[start, start + count)`` of worker ``worker``'s part of the shard's order in ``epoch``."""

    model_config = ConfigDict(extra="forbid")

    epoch: int = Field(default=0, ge=0)
    start: int = Field(default=0, ge=0)
    count: int = Field(default=64, ge=1, le=MAX_BATCH_ITEMS)
    worker: int = Field(default=0, ge=0)
    num_workers: int = Field(default=1, ge=1)


class SelectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    queries: list[str] = Field(min_length=1)


class WaitReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    waited_s: float = Field(ge=0, le=86_400, description="seconds waited since the previous report")


class LedgerReport(BaseModel):
    """One stretch a trainer consumed, for the ledger: the sidecar records it (store mode) or passes it on
    to the broker, which records it for the pod its token names (broker mode). The reading's views are the
    trainer's, over the sidecar's shard; the recorder adds that shard's cut in front of them, and the
    dataset, version and manifest served, and fills in the writer's namespace, stream and pod itself.
    ``number`` counts the trainer chain's reports from 0: a report sent again (its answer lost) is
    recognised and not recorded twice."""

    model_config = ConfigDict(extra="forbid")

    run: str = Field(pattern=NAME_PATTERN)
    chain: str = Field(pattern=NAME_PATTERN, max_length=96)
    number: int = Field(ge=0)
    consumed: Consumed
    writer: Writer

    def recorded(
        self,
        cut: View,
        *,
        namespace: str | None,
        stream: str | None,
        pod: str | None,
        recut: Positions | None = None,
    ) -> tuple[Consumed, Writer]:
        """What the record of this report holds: the reading under the ``cut`` its recorder served
        (:class:`ConfigError` if it cannot take one more view), and the writer as the recorder knows it,
        whatever the body says of namespace, stream and pod. A report of a mix's re-cut rows
        (``consumed.recut``) is recorded as the selection positions ``recut`` its recorder serves in those
        rows (:meth:`~sluicegate.core.ledger.Consumed.recut_as`); :class:`ConfigError` without them."""
        who = self.writer.model_copy(update={"namespace": namespace, "stream": stream, "pod": pod})
        if self.consumed.recut is None:
            return self.consumed.under(cut), who
        if recut is None:
            raise ConfigError(
                "this report is of a mix's re-cut epoch, but its sidecar serves no re-cut of a mix for that "
                "epoch: restart the pod, so that its sidecars ask their stream again"
            )
        return self.consumed.recut_as(cut, recut), who


class ProgressReport(BaseModel):
    """How far a trainer got: what its rank consumed of segment ``segment`` of ``epoch`` (cut for
    ``world_size``), as passes (:data:`~sluicegate.core.partition.Pass`); every report says it all, so a lost
    one costs nothing. The sidecar passes it on to the broker (broker mode), which keeps the stream's
    progress."""

    model_config = ConfigDict(extra="forbid")

    epoch: int = Field(ge=0)
    segment: int = Field(ge=0)
    world_size: int = Field(ge=1)
    rank: int = Field(ge=0)
    consumed: tuple[Pass, ...] = Field(max_length=64)


class SelectResponse(BaseModel):
    indexes: list[int]


class WireRow(BaseModel):
    """One item's manifest row as it travels; ``labels.*`` and ``meta.*`` columns ride along as extras."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: str
    blob: str
    size: int = Field(ge=0)
    media_type: str
    width: int | None = None
    height: int | None = None
    annotations: list[dict[str, Any]] = Field(default_factory=list)


class BatchHeader(BaseModel):
    version: int
    rows: list[WireRow]


def encode_header(version: int, rows: Sequence[dict[str, Any]]) -> bytes:
    """The framed header of a batch body; rows are plain manifest rows (``Table.to_pylist()``)."""
    raw = pydantic_core.to_json({"version": version, "rows": rows})
    return _LEN.pack(len(raw)) + raw


def item_views(view: memoryview, rows: Sequence[WireRow], start: int = 0) -> tuple[list[memoryview], int]:
    """The items' bytes in ``view`` from ``start``, concatenated in header order (item i is ``rows[i].size``
    long), and the offset after the last."""
    views = []
    for row in rows:
        views.append(view[start : start + row.size])
        start += row.size
    return views, start


def decode_batch(body: bytes | bytearray) -> tuple[BatchHeader, list[memoryview]]:
    """Split a batch body into its header and the items' bytes (read-only views of ``body``, which they
    keep alive); ValueError when it is not well formed."""
    if len(body) < _LEN.size:
        raise ValueError(f"batch body of {len(body)} bytes is too short for its header length")
    (n,) = _LEN.unpack_from(body)
    end = _LEN.size + n
    if end > len(body):
        raise ValueError(f"batch header claims {n} bytes but the body has {len(body) - _LEN.size}")
    header = BatchHeader.model_validate_json(body[_LEN.size : end])
    blobs, end = item_views(memoryview(body).toreadonly(), header.rows, end)
    if end != len(body):
        raise ValueError(f"batch body is {len(body)} bytes but its header accounts for {end}")
    return header, blobs


class FdAnswer(BaseModel):
    """An fd socket answer: ``header`` (and a descriptor) on success, else ``status`` and ``error``."""

    status: int = 200
    header: BatchHeader | None = None
    error: ErrorBody | None = None


def frame(payload: bytes) -> bytes:
    return _LEN.pack(len(payload)) + payload


def frame_length(prefix: bytes | bytearray) -> int:
    """The payload length a frame's first four bytes announce; ValueError past :data:`MAX_FRAME`."""
    (n,) = _LEN.unpack_from(prefix)
    if n > MAX_FRAME:
        raise ValueError(f"a frame of {n} bytes exceeds the limit of {MAX_FRAME}")
    return int(n)


def encode_fd_answer(version: int, rows: Sequence[dict[str, Any]]) -> bytes:
    """A framed successful :class:`FdAnswer` (rows as in :func:`encode_header`)."""
    # pydantic-core's encoder: a third of json.dumps's time, and one is made per batch served.
    return frame(pydantic_core.to_json({"status": 200, "header": {"version": version, "rows": rows}}))
