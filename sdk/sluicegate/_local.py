"""The embedded source: the same :class:`~._engine.Engine` the sidecar runs, in this process."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from typing import Any

from sluicegate._ledger import Sink, StoreSink
from sluicegate._source import Item, Live, Pending, Rows, Source, live_here
from sluicegate.core.engine import (
    BlobRef,
    Engine,
    EngineConfig,
    Plan,
    StoreUpstream,
    engine_store,
    read_manifest,
)
from sluicegate.core.partition import Positions
from sluicegate.core.query import Query
from sluicegate.core.store import S3Options, Store

__all__ = ["LocalSource"]


class _PlanRows(Rows):
    def __init__(self, plan: Plan, positions: Positions) -> None:
        self._plan, self._positions = plan, positions
        self._rows: list[dict[str, Any]] | None = None

    def row(self, i: int) -> dict[str, Any]:
        if self._rows is None:
            self._rows = self._plan.rows(self._positions)
        return self._rows[i]


class _LocalPending(Pending):
    def __init__(
        self, future: concurrent.futures.Future[tuple[list[BlobRef], list[bytes]]], rows: Rows
    ) -> None:
        self._future, self._rows = future, rows

    def result(self) -> list[Item]:
        refs, blobs = self._future.result()
        rows = self._rows
        return [
            Item(ref.item_id, data, rows, i) for i, (ref, data) in enumerate(zip(refs, blobs, strict=True))
        ]

    def cancel(self) -> None:
        self._future.cancel()


class LocalSource(Source):
    """The embedded data path: the same :class:`Engine` the sidecar runs, on a private loop thread."""

    def __init__(self, uri: str, s3: S3Options | None, version: int, config: EngineConfig) -> None:
        self._uri, self._s3, self._version, self._config = uri, s3, version, config
        self._store: Store | None = None
        self._plan: Plan | None = None
        self._live: Live[Engine] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"_uri": self._uri, "_s3": self._s3, "_version": self._version, "_config": self._config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["_uri"], state["_s3"], state["_version"], state["_config"])  # type: ignore[misc]

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = engine_store(self._uri, self._s3)
        return self._store

    @property
    def plan(self) -> Plan:
        if self._plan is None:
            self._plan = Plan(self._version, read_manifest(self.store, self._version))
        return self._plan

    def _running(self) -> Live[Engine]:
        self._live = live_here(self._live, self._start)
        return self._live

    def _start(self) -> Live[Engine]:
        return Live("sluicegate-engine", Engine(StoreUpstream(self.store), self._config))

    @property
    def version(self) -> int:
        return self._version

    @property
    def engine(self) -> Engine:
        return self._running().resource

    def __len__(self) -> int:
        return len(self.plan)

    def select(self, queries: Sequence[Query]) -> Positions:
        return self.plan.select(queries)

    def fetch(self, positions: Positions, readahead: Positions) -> Pending:
        # ``readahead`` is not announced to the engine: the requests Dataset keeps in flight ahead of the
        # consumer are this path's read-ahead already, and announcing them again costs a ref per item.
        live = self._running()
        plan, engine = self.plan, live.resource

        async def run() -> tuple[list[BlobRef], list[bytes]]:
            refs = plan.refs(positions)  # on the engine's thread: the training loop's is the busy one
            return refs, await engine.get_many(refs)

        return _LocalPending(live.loop.submit(run()), _PlanRows(plan, positions))

    def describe(self) -> str:
        return f"{self._uri} version {self._version}"

    def ledger_sink(self, run: str) -> Sink:
        return StoreSink(lambda: self.store, run, self._version, lambda: self.plan.manifest.digest)

    def close(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.close()
