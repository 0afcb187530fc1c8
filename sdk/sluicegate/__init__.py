"""sluicegate: stream versioned, access-controlled training data into PyTorch and TensorFlow.

The public API is what ``__all__`` lists. :mod:`sluicegate.core` is what the sidecar and the operator
build on (internal, see its docstring); every other module is private.
"""

from importlib.metadata import version as _version

from sluicegate._connect import connect
from sluicegate._dataset import Dataset, Item, Ledger, data_wait, open
from sluicegate._exceptions import (
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
from sluicegate._importers import ImportResult, import_dataset
from sluicegate._mix import Mix, mix
from sluicegate.core.manifest import Annotation, ItemRecord, VersionInfo
from sluicegate.core.partition import Remainder
from sluicegate.core.query import Query
from sluicegate.core.query import parse as parse_query
from sluicegate.core.store import S3Options, Store
from sluicegate.core.wait import DataWait

__version__ = _version("sluicegate")  # pyproject.toml states it once

__all__ = [
    "Annotation",
    "ConfigError",
    "ConflictError",
    "DataWait",
    "Dataset",
    "ImportError_",
    "ImportResult",
    "IntegrityError",
    "Item",
    "ItemNotInShard",
    "ItemRecord",
    "Ledger",
    "Mix",
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
    "data_wait",
    "import_dataset",
    "mix",
    "open",
    "parse_query",
]
