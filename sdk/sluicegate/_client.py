"""The SDK side of the sidecar protocol: an httpx client over loopback TCP or a unix socket.

Requests run on a private loop thread so that iteration can keep several batch requests in flight while
the trainer works. A sidecar that is restarting (connection refused, 503 not ready) is retried with
backoff until ``timeout``; a sidecar that comes back serving another version is refused loudly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import random
import time
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
from pydantic import ValidationError

from . import _protocol as proto
from ._dataset import Item, Pending, Rows, Source
from ._engine import LoopThread, close_on_collect
from ._exceptions import (
    IntegrityError,
    ItemNotInShard,
    QueryError,
    SidecarUnavailable,
    StoreError,
    StreamError,
)
from ._partition import Positions

__all__ = ["RemoteSource"]

_ERRORS: dict[proto.ErrorCode, type[Exception]] = {
    proto.ErrorCode.NOT_IN_SHARD: ItemNotInShard,
    proto.ErrorCode.QUERY: QueryError,
    proto.ErrorCode.INTEGRITY: IntegrityError,
    proto.ErrorCode.UPSTREAM: StoreError,
}


def _transport(address: str) -> tuple[str, httpx.AsyncHTTPTransport]:
    parsed = urlparse(address)
    if parsed.scheme == "unix":
        path = parsed.path or parsed.netloc
        return "http://sidecar", httpx.AsyncHTTPTransport(uds=path)
    if parsed.scheme == "http" and parsed.netloc:
        return address.rstrip("/"), httpx.AsyncHTTPTransport()
    raise StreamError(
        f"sidecar address {address!r} is neither unix:///PATH nor http://HOST:PORT; check SLUICEGATE_ADDRESS"
    )


class _WireRows(Rows):
    def __init__(self, rows: Sequence[proto.WireRow]) -> None:
        self._rows = rows

    def row(self, i: int) -> dict[str, Any]:
        return self._rows[i].model_dump()


class _RemotePending(Pending):
    def __init__(self, future: concurrent.futures.Future[bytes], source: RemoteSource) -> None:
        self._future, self._source = future, source

    def result(self) -> list[Item]:
        body = self._future.result()
        try:
            header, blobs = proto.decode_batch(body)
        except (ValueError, ValidationError) as exc:
            raise StreamError(f"malformed batch from the sidecar at {self._source.address}: {exc}") from exc
        self._source.check_version(header.version)
        rows = _WireRows(header.rows)
        return [
            Item(row.id, data, rows, i) for i, (row, data) in enumerate(zip(header.rows, blobs, strict=True))
        ]

    def cancel(self) -> None:
        self._future.cancel()


class _Connection:
    """The httpx client, created on the loop that uses it (kept apart from _Live so closing it on
    garbage collection does not keep _Live alive)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._client: httpx.AsyncClient | None = None

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            base, transport = _transport(self.address)
            self._client = httpx.AsyncClient(
                base_url=base, transport=transport, timeout=httpx.Timeout(300.0, connect=5.0), trust_env=False
            )
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class _Live:
    """What a RemoteSource holds while in use in one process: never pickled, rebuilt after fork."""

    def __init__(self, address: str) -> None:
        self.pid = os.getpid()
        self.loop = LoopThread("sluicegate-client")
        self.connection = _Connection(address)
        self.id = uuid.uuid4().hex  # read-ahead hints are kept per client on the sidecar
        close_on_collect(self, self.loop, self.connection.aclose)


class RemoteSource(Source):
    """A sidecar's shard as a Dataset source. Pickles as its address and info; reconnects on use."""

    def __init__(self, address: str, timeout: float = 60.0) -> None:
        _transport(address)  # reject a malformed address now, not on first read
        self.address = address
        self._timeout = timeout
        self._info: proto.Info | None = None
        self._live: _Live | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"address": self.address, "_timeout": self._timeout, "_info": self._info}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._live = None

    # -- plumbing ------------------------------------------------------------------------------

    def _running(self) -> _Live:
        if self._live is None or self._live.pid != os.getpid():
            self._live = _Live(self.address)
        return self._live

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request, retried while the sidecar is unreachable or not ready, up to the timeout."""
        live = self._running()
        deadline = time.monotonic() + self._timeout
        attempt = 0
        while True:
            try:
                response = await live.connection.client().request(method, path, **kwargs)
            except httpx.TransportError as exc:
                reason = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code < 400:
                    return response
                error = _error_body(response)
                if error.code is not proto.ErrorCode.NOT_READY:
                    raise _ERRORS.get(error.code, StreamError)(error.message)
                reason = error.message
            attempt += 1
            if time.monotonic() >= deadline:
                raise SidecarUnavailable(
                    f"the sidecar at {self.address} did not answer {method} {path} within "
                    f"{self._timeout:.0f}s ({reason}); is the sidecar container running?"
                )
            await asyncio.sleep(min(1.0, 0.02 * 2**attempt) * random.uniform(0.5, 1.0))

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self._running().loop.run(self._request(method, path, **kwargs))

    # -- Source --------------------------------------------------------------------------------

    def wait_ready(self) -> proto.Info:
        self._call("GET", proto.Paths.READYZ)
        return self.info

    @property
    def info(self) -> proto.Info:
        if self._info is None:
            self._info = proto.Info.model_validate_json(self._call("GET", proto.Paths.INFO).content)
        return self._info

    def check_version(self, version: int) -> None:
        if version != self.info.version:
            raise StreamError(
                f"the sidecar at {self.address} now serves version {version}, but this dataset is pinned to "
                f"version {self.info.version}; restart the job to pick up the new version"
            )

    @property
    def rank(self) -> int:
        return self.info.rank

    @property
    def seed(self) -> int | None:
        return self.info.seed if self.info.shuffle else None

    @property
    def version(self) -> int:
        return self.info.version

    def __len__(self) -> int:
        return self.info.items

    def select(self, queries: Sequence[str]) -> Positions:
        body = proto.SelectRequest(queries=list(queries)).model_dump_json()
        response = self._call(
            "POST", proto.Paths.SELECT, content=body, headers={"content-type": "application/json"}
        )
        return np.asarray(proto.SelectResponse.model_validate_json(response.content).indexes, dtype=np.int64)

    def fetch(self, positions: Positions, readahead: Positions) -> Pending:
        body = proto.BatchRequest(
            indexes=positions.tolist(),
            readahead=readahead[: 16 * proto.MAX_BATCH_ITEMS].tolist(),
            client=self._running().id,
        ).model_dump_json()

        async def run() -> bytes:
            response = await self._request(
                "POST", proto.Paths.BATCH, content=body, headers={"content-type": "application/json"}
            )
            return response.content

        return _RemotePending(self._running().loop.submit(run()), self)

    def describe(self) -> str:
        info = self._info
        where = f"sidecar {self.address}"
        return where if info is None else f"{where} ({info.dataset} version {info.version}, rank {info.rank})"

    def close(self) -> None:
        live, self._live = self._live, None
        if live is not None:
            live.loop.close(live.connection.aclose)


def _error_body(response: httpx.Response) -> proto.ErrorBody:
    try:
        return proto.ErrorBody.model_validate_json(response.content)
    except ValidationError:
        return proto.ErrorBody(
            code=proto.ErrorCode.INTERNAL,
            message=f"HTTP {response.status_code} from the sidecar: {response.text[:300]}",
        )
