"""The data path shared by embedded mode and the sidecar: fetch, verify, cache and read ahead blobs.

One module per job: :mod:`.config` (settings, counters), :mod:`.upstream` (where blobs come from),
:mod:`.plan` (which manifest rows a consumer reads), :mod:`.cache` (memory and disk tiers), :mod:`.core`
(the engine), :mod:`.loop` (its loop thread and worker threads). The sidecar is an HTTP server around
the same :class:`Engine` that embedded mode runs in-process, so both paths share every guarantee.
"""

from sluicegate.core.engine.cache import DiskCache, MemoryCache
from sluicegate.core.engine.config import EngineConfig, EngineStats
from sluicegate.core.engine.core import Engine
from sluicegate.core.engine.loop import LoopThread, Workers, close_on_collect
from sluicegate.core.engine.plan import Manifest, Plan, read_manifest
from sluicegate.core.engine.upstream import (
    BlobRef,
    Fetched,
    Limits,
    Outcome,
    StoreUpstream,
    Upstream,
    UrlRefused,
    UrlUpstream,
    engine_store,
    fetch_each,
    forked,
)

__all__ = [
    "BlobRef",
    "DiskCache",
    "Engine",
    "EngineConfig",
    "EngineStats",
    "Fetched",
    "Limits",
    "LoopThread",
    "Manifest",
    "MemoryCache",
    "Outcome",
    "Plan",
    "StoreUpstream",
    "Upstream",
    "UrlRefused",
    "UrlUpstream",
    "Workers",
    "close_on_collect",
    "engine_store",
    "fetch_each",
    "forked",
    "read_manifest",
]
