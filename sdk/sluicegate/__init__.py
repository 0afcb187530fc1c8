"""sluicegate: stream versioned, access-controlled training data into PyTorch and TensorFlow.

The public API is what ``__all__`` lists; every other module is private.
"""

from importlib.metadata import version as _version

from ._dataset import Dataset, Item, connect, open
from ._exceptions import (
    ConfigError,
    ConflictError,
    ImportError_,
    IntegrityError,
    ItemNotInShard,
    NotFoundError,
    QueryError,
    SidecarUnavailable,
    SluicegateError,
    StoreError,
    StreamError,
)
from ._importers import ImportResult, import_dataset
from ._manifest import Annotation, ItemRecord, VersionInfo
from ._partition import Remainder
from ._query import Query
from ._query import parse as parse_query
from ._store import S3Options, Store

__version__ = _version("sluicegate")  # pyproject.toml states it once

__all__ = [
    "Annotation",
    "ConfigError",
    "ConflictError",
    "Dataset",
    "ImportError_",
    "ImportResult",
    "IntegrityError",
    "Item",
    "ItemNotInShard",
    "ItemRecord",
    "NotFoundError",
    "Query",
    "QueryError",
    "Remainder",
    "S3Options",
    "SidecarUnavailable",
    "SluicegateError",
    "Store",
    "StoreError",
    "StreamError",
    "VersionInfo",
    "connect",
    "import_dataset",
    "open",
    "parse_query",
]
