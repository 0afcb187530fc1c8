"""The errors sluicegate raises.

Every error derives from :class:`SluicegateError`, so ``except sluicegate.SluicegateError`` catches
all of them; errors of the libraries underneath (object store, Parquet, DuckDB, HTTP) are translated
at the boundary and chained (``raise ... from exc``) so the cause stays visible.

    SluicegateError
    ├── QueryError              a slice query that cannot be parsed or does not fit the manifest
    ├── ImportError_            input to an importer that is malformed (file, line or id named)
    ├── StoreError              the dataset store cannot be read or written
    │   ├── NotFoundError       no dataset, version or blob at that address
    │   ├── ConflictError       a concurrent writer won and retrying did not help
    │   └── IntegrityError      bytes that do not match their sha256
    ├── StreamError             the data path (sidecar, embedded or remote) failed
    │   ├── SidecarUnavailable  the sidecar cannot be reached
    │   └── ItemNotInShard      an index or id outside this rank's shard
    └── ConfigError             bad options or environment (what was wrong and what to set)
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConflictError",
    "ImportError_",
    "IntegrityError",
    "ItemNotInShard",
    "NotFoundError",
    "QueryError",
    "SidecarUnavailable",
    "SluicegateError",
    "StoreError",
    "StreamError",
]


class SluicegateError(Exception):
    """Base class of every error sluicegate raises."""


class QueryError(SluicegateError, ValueError):
    """A slice query that cannot be parsed or does not fit the manifest.

    ``position`` is the 0-based offset in ``query`` the problem points at (``None`` when the whole
    query is at fault); ``str(err)`` shows the query with a caret under that column.
    """

    def __init__(self, message: str, query: str = "", position: int | None = None) -> None:
        self.message = message
        self.query = query
        self.position = position
        super().__init__(self._render())

    def _render(self) -> str:
        if self.position is None or not self.query:
            return self.message
        line = self.query.replace("\n", " ")
        return f"{self.message} (at column {self.position + 1})\n  {line}\n  {' ' * self.position}^"


class ImportError_(SluicegateError, ValueError):
    """Importer input that is malformed; the message names the file and the line or id."""


class StoreError(SluicegateError):
    """The dataset store cannot be read or written."""


class NotFoundError(StoreError, LookupError):
    """No dataset, version or blob at that address."""


class ConflictError(StoreError):
    """A concurrent writer committed first and retrying on top of it did not succeed."""


class IntegrityError(StoreError):
    """Bytes that do not match the sha256 they are addressed by."""


class StreamError(SluicegateError):
    """The data path failed."""


class SidecarUnavailable(StreamError, ConnectionError):
    """The sidecar cannot be reached (not started, crashed, or wrong address)."""


class ItemNotInShard(StreamError, IndexError):
    """An index or id outside the range this rank may read."""


class ConfigError(SluicegateError, ValueError):
    """Bad options or environment; the message says what was wrong and what to set."""
