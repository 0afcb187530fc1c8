"""The seam between a Dataset and where its items come from (httpx's transport pattern).

A :class:`Source` fetches batches of items by position; :mod:`._local` is the embedded engine and
:mod:`._remote` a pod's sidecar. Both hold their live state (a loop thread, connections) in a
:class:`Live`, which is never pickled, is rebuilt in a forked child (a DataLoader worker) and closes itself
when garbage collected.
"""

from __future__ import annotations

import io
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from sluicegate._exceptions import ConfigError
from sluicegate._ledger import Sink
from sluicegate.core.engine import LoopThread, close_on_collect
from sluicegate.core.manifest import LABEL_PREFIX, META_PREFIX, Annotation, ItemRecord, record_from_row
from sluicegate.core.partition import Positions, ShardSpec
from sluicegate.core.protocol import ProgressReport, Resume
from sluicegate.core.query import Query

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["Item", "ListRows", "Live", "Pending", "Rows", "Source"]

_LABELS, _META = len(LABEL_PREFIX), len(META_PREFIX)


# -- items -------------------------------------------------------------------------------------------


class Rows(ABC):
    """Manifest rows of one batch, materialised on first access and shared by the batch's items."""

    @abstractmethod
    def row(self, i: int) -> dict[str, Any]: ...


class ListRows(Rows):
    def __init__(self, rows: Sequence[Mapping[str, Any]]) -> None:
        self._rows = rows

    def row(self, i: int) -> dict[str, Any]:
        return dict(self._rows[i])


class Item:
    """One item: its bytes and its manifest row (annotations, labels, metadata) built on first access.

    ``data`` is the bytes; ``buffer`` the same bytes as a read-only ``memoryview`` without a copy: items
    read through a sidecar's fd socket view the batch's shared memory, which ``data`` copies out on first
    access (and ``buffer`` does not; the batch's memory is reused once no item of it is referenced).
    ``source`` names the source it came from when it was read through a mix (``sluicegate.mix``), else
    None."""

    __slots__ = ("_data", "_i", "_record", "_rows", "id", "source")

    def __init__(
        self, id: str, data: bytes | memoryview, rows: Rows, i: int, source: str | None = None
    ) -> None:
        self.id = id
        self._data = data
        self._rows, self._i = rows, i
        self._record: ItemRecord | None = None
        self.source = source

    @property
    def data(self) -> bytes:
        """The item's bytes."""
        data = self._data
        if isinstance(data, memoryview):
            # Copied once, and the view dropped: the batch's memory goes back as soon as it can.
            data = self._data = data.tobytes()
        return data

    @property
    def buffer(self) -> memoryview:
        """The item's bytes as a read-only view, without copying them."""
        data = self._data
        return data if isinstance(data, memoryview) else memoryview(data)

    @property
    def row(self) -> dict[str, Any]:
        """The raw manifest row (column name -> value)."""
        return self._rows.row(self._i)

    @property
    def record(self) -> ItemRecord:
        if self._record is None:
            self._record = record_from_row(self.row)
        return self._record

    @property
    def blob(self) -> str:
        return str(self.row["blob"])

    @property
    def media_type(self) -> str:
        return str(self.row["media_type"])

    @property
    def width(self) -> int | None:
        value = self.row["width"]
        return None if value is None else int(value)

    @property
    def height(self) -> int | None:
        value = self.row["height"]
        return None if value is None else int(value)

    @property
    def annotations(self) -> list[Annotation]:
        # Most items of a classification set have none: skip building the record for them.
        return self.record.annotations if self.row["annotations"] else []

    @property
    def labels(self) -> dict[str, int]:
        """Instance count per label."""
        if self._record is not None:
            return self._record.labels
        return {c[_LABELS:]: v for c, v in self.row.items() if v and c.startswith(LABEL_PREFIX)}

    @property
    def metadata(self) -> dict[str, bool | int | float | str]:
        if self._record is not None:
            return self._record.metadata
        return {c[_META:]: v for c, v in self.row.items() if v is not None and c.startswith(META_PREFIX)}

    def image(self) -> Image.Image:
        """The bytes decoded as an image (PIL), decoded now, not cached."""
        from PIL import Image

        try:
            img = Image.open(io.BytesIO(self.buffer))
            img.load()
        except (OSError, ValueError) as exc:  # UnidentifiedImageError is an OSError
            raise ConfigError(
                f"item {self.id!r} ({self.media_type}) is not an image PIL can decode: {exc}"
            ) from exc
        return img

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        source = "" if self.source is None else f", source={self.source!r}"
        return f"Item(id={self.id!r}{source}, {len(self._data)} bytes)"

    def __reduce__(self) -> tuple[Any, ...]:
        # Crossing a process boundary takes the row along, not the batch (or the whole manifest) behind it.
        return (_restore_item, (self.id, self.data, self.row, self.source))


def _restore_item(item_id: str, data: bytes, row: dict[str, Any], source: str | None = None) -> Item:
    return Item(item_id, data, ListRows([row]), 0, source)


# -- sources -----------------------------------------------------------------------------------------


class Pending(ABC):
    """A batch on its way; :meth:`result` waits for it and builds the items in the caller's thread."""

    @abstractmethod
    def result(self) -> list[Item]: ...

    @abstractmethod
    def cancel(self) -> None: ...


class Source(ABC):
    """Where a Dataset's items come from: an embedded engine or a sidecar. Pickles without live state."""

    @property
    def rank(self) -> int:
        """The rank the epoch order is drawn for when the dataset itself is not sharded."""
        return 0

    @property
    def seed(self) -> int | None:
        """The source's own shuffle seed (a sidecar's); None: no shuffle."""
        return None

    @property
    def shard_spec(self) -> ShardSpec | None:
        """The cut the source's items are (a sidecar's shard of its selection); None: the whole store."""
        return None

    @property
    def total(self) -> int:
        """Items of the selection the source's shard was cut from (its own length when not a shard)."""
        return len(self)

    @property
    def resume(self) -> Resume | None:
        """The epoch the source continues from its stream's progress (a sidecar's), if any."""
        return None

    @property
    @abstractmethod
    def version(self) -> int: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def select(self, queries: Sequence[Query]) -> Positions:
        """Positions (ascending) of the source's items that match every query (parsed once, by the
        Dataset that sliced)."""

    @abstractmethod
    def fetch(self, positions: Positions, readahead: Positions) -> Pending:
        """Start fetching ``positions``; ``readahead`` are the positions that will be asked for next."""

    @abstractmethod
    def describe(self) -> str: ...

    def report_progress(self, report: ProgressReport) -> None:
        """Hear how far a trainer got in its epoch (a sidecar keeps its stream's progress); by default
        nobody keeps it."""
        return None

    def ledger_sink(self, run: str) -> Sink:
        """Where this source's ledger records of ``run`` go (see :mod:`._ledger`); made in the process that
        writes them."""
        raise ConfigError(f"{self.describe()} cannot record a ledger")

    def close(self) -> None:
        return None


class _Closable(Protocol):
    def aclose(self) -> Coroutine[Any, Any, None]: ...


R = TypeVar("R", bound=_Closable)


class Live(Generic[R]):
    """What a source holds while in use in one process: a loop thread and ``resource`` (closed on it)."""

    def __init__(self, name: str, resource: R) -> None:
        self.pid = os.getpid()
        self.loop = LoopThread(name)
        self.resource = resource
        close_on_collect(self, self.loop, resource.aclose)

    def close(self) -> None:
        self.loop.close(self.resource.aclose)


def live_here(current: Live[R] | None, make: Callable[[], Live[R]]) -> Live[R]:
    """``current`` if it belongs to this process, else a new one (a forked child has no loop thread)."""
    if current is None or current.pid != os.getpid():
        return make()
    return current
