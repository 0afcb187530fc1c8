"""The SDK side of the sidecar protocol: an httpx client over loopback TCP or a unix socket.

Requests run on a private loop thread so that iteration can keep several batch requests in flight while
the trainer works. A sidecar that is restarting (connection refused, 503 not ready) is retried with
backoff until ``timeout``; a sidecar that comes back serving another version is refused loudly.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import mmap
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlparse

import httpx
import numpy as np
from pydantic import ValidationError

from sluicegate._exceptions import (
    ConfigError,
    IntegrityError,
    ItemNotInShard,
    QueryError,
    SidecarUnavailable,
    StoreError,
    StreamError,
)
from sluicegate._ledger import Sink, chain_name
from sluicegate._source import Item, Live, Pending, Rows, Source, live_here
from sluicegate.core import backoff
from sluicegate.core import protocol as proto
from sluicegate.core.ledger import Consumed, Writer
from sluicegate.core.memfd import received, rights
from sluicegate.core.partition import Positions, ShardSpec
from sluicegate.core.query import Query

__all__ = ["BATCH_TIMEOUT_S", "RemoteSource"]

R = TypeVar("R")
Buffer = bytes | bytearray
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
# Retries of a sidecar that is not up yet: the first within 20 ms, none more than 1 s apart.
_RETRY_FIRST_S, _RETRY_MAX_S = 0.02, 1.0
# How long one batch may take to arrive: a cold batch from a slow store takes long, a stalled sidecar forever.
BATCH_TIMEOUT_S = 300.0

_ERRORS: dict[proto.ErrorCode, type[Exception]] = {
    proto.ErrorCode.NOT_IN_SHARD: ItemNotInShard,
    proto.ErrorCode.QUERY: QueryError,
    proto.ErrorCode.INTEGRITY: IntegrityError,
    proto.ErrorCode.UPSTREAM: StoreError,
}


def _endpoint(address: str) -> tuple[str, str | None]:
    """The base URL of a sidecar address and its unix socket path (None over TCP)."""
    parsed = urlparse(address)
    if parsed.scheme == "unix":
        return "http://sidecar", parsed.path or parsed.netloc
    if parsed.scheme == "http" and parsed.netloc:
        return address.rstrip("/"), None
    raise StreamError(
        f"sidecar address {address!r} is neither unix:///PATH nor http://HOST:PORT; check SLUICEGATE_ADDRESS"
    )


def _transport(address: str) -> tuple[str, httpx.AsyncHTTPTransport]:
    base, uds = _endpoint(address)
    # Plain HTTP only (_endpoint refuses anything else), so no TLS context is loaded: the default one
    # costs 20-65 ms per transport, paid again in each DataLoader worker.
    return base, httpx.AsyncHTTPTransport(uds=uds, verify=False)


class _BodyReader(asyncio.BufferedProtocol):
    """One keep-alive HTTP/1.1 connection that receives a response body straight into its final buffer.

    httpx reads a large body in 64 KiB pieces through several layers and joins them (~0.25 GB/s measured
    here for 4 MB items); this protocol lets the kernel write into one preallocated buffer (one copy),
    which is what the batch endpoint needs. It handles exactly what the sidecar sends: a status line,
    headers with Content-Length, a body.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._head = bytearray()
        self._scratch = bytearray(64 * 1024)
        self._body: bytearray | None = None
        self._got = 0
        self._status = 0
        self._close_after = False
        self._done: asyncio.Future[tuple[int, bytearray]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._done is not None and not self._done.done():
            self._done.set_exception(ConnectionResetError(f"sidecar closed the connection: {exc or 'EOF'}"))

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._body is not None:
            return memoryview(self._body)[self._got :]
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        if self._body is not None:
            self._got += nbytes
        else:
            self._head += self._scratch[:nbytes]
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head) > 64 * 1024:
                    self._fail(ValueError("response headers from the sidecar exceed 64 KiB"))
                return
            self._start_body(end)
        body, done = self._body, self._done
        if body is not None and self._got >= len(body):
            self._body = None  # complete: anything more (EOF, a stray byte) goes to the head buffer
            if done is not None and not done.done():
                done.set_result((self._status, body))

    def _start_body(self, end: int) -> None:
        lines = bytes(self._head[:end]).split(b"\r\n")
        try:
            self._status = int(lines[0].split()[1])
            headers = dict(line.split(b":", 1) for line in lines[1:])
            length = int(next(v for k, v in headers.items() if k.strip().lower() == b"content-length"))
        except (IndexError, ValueError, StopIteration):
            self._fail(ValueError(f"malformed response head from the sidecar: {bytes(self._head[:200])!r}"))
            return
        self._close_after = any(
            k.strip().lower() == b"connection" and v.strip().lower() == b"close" for k, v in headers.items()
        )
        rest = self._head[end + 4 :]
        self._body = bytearray(length)
        self._body[: len(rest)] = rest
        self._got = len(rest)
        self._head = bytearray()

    def _fail(self, exc: Exception) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    async def request(self, head: bytes, body: bytes) -> tuple[int, bytearray]:
        assert self.transport is not None
        self._done = asyncio.get_running_loop().create_future()
        self._body, self._got, self._head = None, 0, bytearray()
        self.transport.write(head + body)
        try:
            return await self._done
        finally:
            self._done = None
            if self._close_after:
                self.transport.close()
                self.closed = True


class _BatchPool:
    """Idle :class:`_BodyReader` connections to one sidecar, reused across requests."""

    def __init__(self, address: str) -> None:
        parsed = urlparse(address)
        self._unix = (parsed.path or parsed.netloc) if parsed.scheme == "unix" else None
        self._host, self._port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self._idle: list[_BodyReader] = []

    async def _connect(self) -> _BodyReader:
        loop = asyncio.get_running_loop()
        if self._unix is not None:
            _, protocol = await loop.create_unix_connection(_BodyReader, self._unix)
        else:
            _, protocol = await loop.create_connection(_BodyReader, self._host, self._port)
        return protocol

    async def post(self, path: str, body: bytes) -> tuple[int, bytearray]:
        conn = None
        while self._idle and conn is None:
            candidate = self._idle.pop()
            conn = None if candidate.closed else candidate
        if conn is None:
            conn = await self._connect()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: sidecar\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        try:
            result = await conn.request(head, body)
        except BaseException:
            if conn.transport is not None:
                conn.transport.abort()
            raise
        if not conn.closed:
            self._idle.append(conn)
        return result

    async def aclose(self) -> None:
        for conn in self._idle:
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()


class _WireRows(Rows):
    def __init__(self, rows: Sequence[proto.WireRow]) -> None:
        self._rows = rows
        self._dicts: list[dict[str, Any] | None] = [None] * len(rows)

    def row(self, i: int) -> dict[str, Any]:
        row = self._dicts[i]
        if row is None:
            row = self._dicts[i] = self._rows[i].model_dump()
        return row


class _RemotePending(Pending):
    def __init__(self, future: concurrent.futures.Future[bytearray], source: RemoteSource) -> None:
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


class _MemoryFile:
    """A memory file of this process's that sidecars write answers into, kept mapped between batches.

    The sidecar overwrites its pages in place, so once mapped the next batches cost no page faults and
    no mapping; it only grows (and is mapped again) when a batch outgrows it.
    """

    __slots__ = ("__weakref__", "_close_fd", "_mapped", "fd")

    def __init__(self) -> None:
        self.fd = os.memfd_create("sluicegate-batch", os.MFD_CLOEXEC)
        self._close_fd = weakref.finalize(self, os.close, self.fd)  # also when dropped unclosed
        self._mapped: mmap.mmap | None = None

    def view(self, total: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """The first ``total`` bytes, as a read-only array: the batch's items are views of it, and it is
        what tells the pool when the last of them is gone."""
        if self._mapped is None or len(self._mapped) < total:
            if self._mapped is not None:
                self._mapped.close()  # free: nothing views it
            size = max(total, os.fstat(self.fd).st_size)
            self._mapped = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ)
        return np.frombuffer(self._mapped, dtype=np.uint8, count=total)

    @property
    def size(self) -> int:
        """Bytes mapped (what it holds of this process's memory once written)."""
        return 0 if self._mapped is None else len(self._mapped)

    def close(self) -> None:
        if self._mapped is not None:
            with contextlib.suppress(BufferError):  # still viewed: unmapped when the views go
                self._mapped.close()
            self._mapped = None
        self._close_fd()


class _FdPool:
    """Idle blocking connections to a sidecar's fd socket (see :mod:`._protocol`), and the memory files
    answers are written into, for this process only.

    Each request owns a connection and a memory file until its answer is read, so requests kept in flight
    ahead of the consumer each hold one; a memory file comes back once no item of its batch is referenced
    any more. No loop thread is involved.
    """

    # Memory files kept for the next requests, at most this many and this many bytes; more are closed as
    # they come back.
    _IDLE_FILES, _IDLE_BYTES = 8, 128 * 2**20

    def __init__(self, path: str, timeout_s: float) -> None:
        self.path = path
        self._timeout_s = timeout_s
        self._idle: list[socket.socket] = []
        self._files: list[_MemoryFile] = []
        self._lock = threading.Lock()
        self._closed = False

    def take(self) -> socket.socket:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self._timeout_s)
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        return sock

    def give(self, sock: socket.socket) -> None:
        with self._lock:
            self._idle.append(sock)

    def take_file(self) -> _MemoryFile:
        with self._lock:
            if self._files:
                return self._files.pop()
        return _MemoryFile()

    def give_file(self, file: _MemoryFile) -> None:
        with self._lock:
            idle = sum(f.size for f in self._files) + file.size
            if not self._closed and len(self._files) < self._IDLE_FILES and idle <= self._IDLE_BYTES:
                self._files.append(file)
                return
        file.close()

    def close_idle(self) -> None:
        """Close the idle connections (one failed: the others went the same way)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()

    def close(self) -> None:
        self.close_idle()
        with self._lock:
            files, self._files = self._files, []
            self._closed = True
        for file in files:
            file.close()


class _FdPending(Pending):
    """A batch request on the fd socket; :meth:`result` reads the answer and the items in the memory file.

    The request carries a memory file of this process's, which the sidecar writes the batch into, and the
    items are views of it. A sidecar that predates that answers with a memory file of its own instead,
    which is copied out of.

    Like every request, it rides out a sidecar that restarts: a refused or broken connection, or a
    sidecar that is not ready, is retried (the request is a read, so it can be sent again) with backoff,
    until ``timeout`` seconds after the first failure.
    """

    def __init__(self, source: RemoteSource, pool: _FdPool, body: bytes) -> None:
        self._source, self._pool, self._body = source, pool, body
        self._sock: socket.socket | None = None
        self._file: _MemoryFile | None = None
        with contextlib.suppress(OSError):  # sent again, and reported, by result()
            self._send()

    def _send(self) -> None:
        sock = self._pool.take()
        if self._file is None:
            self._file = self._pool.take_file()
        try:
            sock.sendmsg([proto.frame(self._body)], rights(self._file.fd))  # this small a frame: one message
        except BaseException:
            sock.close()
            raise
        self._sock = sock

    def _drop_file(self) -> None:
        """Close the request's memory file: a sidecar that lost the connection may still be writing it."""
        file, self._file = self._file, None
        if file is not None:
            file.close()

    def result(self) -> list[Item]:
        deadline = backoff.Deadline(self._source.timeout)
        attempt = 0
        while True:
            try:
                if self._sock is None:
                    self._send()
                answer, fd, sock = self._receive()
            except TimeoutError:  # not retried: a stalled sidecar would stall again
                self._drop_file()
                raise self._source.stalled(f"a batch on {self._pool.path}") from None
            except OSError as exc:
                self._pool.close_idle()  # the other idle connections went the same way
                self._drop_file()
                reason = f"{type(exc).__name__}: {exc}"
            else:
                if answer.header is not None:
                    return self._items(answer.header, fd, sock)
                self._pool.give(sock)
                reason = _retry_reason(
                    answer.error
                    or proto.ErrorBody(
                        code=proto.ErrorCode.INTERNAL, message=f"the sidecar answered status {answer.status}"
                    )
                )
            if deadline.passed():
                self._give_file()
                raise _gave_up(
                    self._source.address, f"a batch on {self._pool.path}", self._source.timeout, reason
                )
            time.sleep(backoff.delay(attempt, first_s=_RETRY_FIRST_S, max_s=_RETRY_MAX_S))
            attempt += 1

    def _give_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            self._pool.give_file(file)

    def _receive(self) -> tuple[proto.FdAnswer, int | None, socket.socket]:
        """The answer on this request's connection; OSError when the connection failed (closed here)."""
        sock, self._sock = self._sock, None
        assert sock is not None
        fd: int | None = None
        try:
            data, ancillary, _, _ = sock.recvmsg(1 << 16, socket.CMSG_SPACE(4))  # room for one only
            fd = next(iter(received(ancillary)), None)
            if not data:
                raise ConnectionResetError("the sidecar closed the connection")
            if len(data) < 4:
                data += _recv_exactly(sock, 4 - len(data))
            end = 4 + proto.frame_length(data)
            if len(data) < end:
                data += _recv_exactly(sock, end - len(data))
            answer = proto.FdAnswer.model_validate_json(data[4:end])
        except BaseException as exc:
            sock.close()
            if fd is not None:
                os.close(fd)
            if isinstance(exc, ValueError | ValidationError):
                self._drop_file()
                raise StreamError(
                    f"malformed answer from the sidecar's fd socket {self._pool.path}: {exc}"
                ) from exc
            raise
        return answer, fd, sock

    def _items(self, header: proto.BatchHeader, fd: int | None, sock: socket.socket) -> list[Item]:
        """The items: views of this request's memory file, or (``fd``: a sidecar's own memory file)
        copied out of that; then the connection may take the next request."""
        try:
            self._source.check_version(header.version)
            total = sum(row.size for row in header.rows)
            if fd is None:
                blobs = self._views(header, total)
            else:
                self._give_file()  # unused: the sidecar wrote its own
                blobs = _copies(header, fd, total)
        except (OSError, ValueError) as exc:
            sock.close()
            self._drop_file()
            where = self._source.address
            raise StreamError(
                f"cannot read the memory file of a batch from the sidecar at {where}: {exc}"
            ) from exc
        finally:
            if fd is not None:
                os.close(fd)
        self._pool.give(sock)
        rows = _WireRows(header.rows)
        return [
            Item(row.id, data, rows, i) for i, (row, data) in enumerate(zip(header.rows, blobs, strict=True))
        ]

    def _views(self, header: proto.BatchHeader, total: int) -> Sequence[bytes | memoryview]:
        if not total:
            self._give_file()
            return [memoryview(b"")] * len(header.rows)
        assert self._file is not None
        array_ = self._file.view(total)
        file, self._file = self._file, None
        # The file goes back to the pool when the array does: when the last item's view of it is gone.
        weakref.finalize(array_, self._pool.give_file, file)
        # array_.data: a view that keeps the array alive, as its slices do
        return proto.item_views(array_.data, header.rows)[0]

    def cancel(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()  # its answer is unread: the connection cannot be reused
            self._drop_file()
        else:
            self._give_file()


def _copies(header: proto.BatchHeader, fd: int, total: int) -> Sequence[bytes | memoryview]:
    """The items' bytes copied out of a sidecar's memory file: one mapping, populated up front, and one
    copy per item, faster than a read per item."""
    if not total:
        return [b""] * len(header.rows)
    blobs = []
    with mmap.mmap(fd, total, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ) as mapped:
        offset = 0
        for row in header.rows:
            blobs.append(mapped[offset : offset + row.size])
            offset += row.size
    return blobs


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    parts = []
    while n > 0:
        chunk = sock.recv(n)
        if not chunk:
            raise ConnectionResetError("the sidecar closed the fd socket mid-answer")
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


class _Connection:
    """A RemoteSource's connections in one process: the httpx client (created on the loop that uses it),
    the batch connections, the fd socket's pool where there is one, and the id read-ahead is kept under."""

    def __init__(self, address: str, batch_timeout: float) -> None:
        self.address = address
        self._client: httpx.AsyncClient | None = None
        self.batches = _BatchPool(address)
        self._fd_path = _fd_path(address)
        self._fds: _FdPool | None = None
        self._batch_timeout = batch_timeout
        self.id = uuid.uuid4().hex  # read-ahead hints are kept per client on the sidecar

    @property
    def fds(self) -> _FdPool | None:
        """The pool for the sidecar's fd socket, once that socket exists (the sidecar makes it as it
        starts, so it is looked for on each request until found)."""
        if self._fds is None and self._fd_path is not None and os.path.exists(self._fd_path):
            self._fds = _FdPool(self._fd_path, self._batch_timeout)
        return self._fds

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            base, transport = _transport(self.address)
            self._client = httpx.AsyncClient(
                base_url=base, transport=transport, timeout=httpx.Timeout(300.0, connect=5.0), trust_env=False
            )
        return self._client

    async def aclose(self) -> None:
        if self._fds is not None:
            self._fds.close()
        await self.batches.aclose()
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _fd_path(address: str) -> str | None:
    """Where the fd socket beside a unix socket address is (see :mod:`._protocol`), where it can be used."""
    parsed = urlparse(address)
    if parsed.scheme != "unix" or not hasattr(socket, "SCM_RIGHTS"):
        return None
    return (parsed.path or parsed.netloc) + proto.FD_SOCKET_SUFFIX


_REPORT_TIMEOUT_S = 5.0


class RemoteSource(Source):
    """A sidecar's shard as a Dataset source. Pickles as its address and info; reconnects on use."""

    def __init__(self, address: str, timeout: float = 60.0, batch_timeout: float = BATCH_TIMEOUT_S) -> None:
        _endpoint(address)  # reject a malformed address now, not on first read
        self.address = address
        self._timeout = timeout
        self.batch_timeout = batch_timeout
        self._info: proto.Info | None = None
        self._live: Live[_Connection] | None = None
        self._reporting: concurrent.futures.Future[Any] | None = None  # the last progress report

    def __getstate__(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "_timeout": self._timeout,
            "batch_timeout": self.batch_timeout,
            "_info": self._info,
        }

    def stalled(self, what: str) -> SidecarUnavailable:
        return SidecarUnavailable(
            f"the sidecar at {self.address} sent no complete answer to {what} within "
            f"{self.batch_timeout:g}s; it is stalled (check the sidecar container's log and its store), "
            "or raise batch_timeout in sluicegate.connect() for a store this slow"
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._live = None
        self._reporting = None

    @property
    def timeout(self) -> float:
        """How long a request waits for a sidecar that is unreachable or not ready."""
        return self._timeout

    # -- plumbing ------------------------------------------------------------------------------

    def _running(self) -> Live[_Connection]:
        self._live = live_here(
            self._live, lambda: Live("sluicegate-client", _Connection(self.address, self.batch_timeout))
        )
        return self._live

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A control request through httpx, retried like every request (see :meth:`_retrying`)."""
        connection = self._running().resource

        async def send() -> tuple[int, bytes, httpx.Response]:
            response = await connection.client().request(method, path, **kwargs)
            return response.status_code, response.content, response

        return await self._retrying(f"{method} {path}", send)

    async def _post_batch(self, body: bytes) -> bytearray:
        """POST a batch request through the fast body reader."""
        pool = self._running().resource.batches

        async def send() -> tuple[int, bytearray, bytearray]:
            try:
                async with asyncio.timeout(self.batch_timeout):
                    status, content = await pool.post(proto.Paths.BATCH, body)
            except TimeoutError:  # not retried: a stalled sidecar would stall again
                raise self.stalled(f"POST {proto.Paths.BATCH}") from None
            return status, content, content

        return await self._retrying(f"POST {proto.Paths.BATCH}", send)

    async def _retrying(self, what: str, send: Callable[[], Awaitable[tuple[int, Buffer, R]]]) -> R:
        """``send()`` retried while the sidecar is unreachable or not ready, up to the timeout; an error
        answer becomes the matching exception."""
        deadline = backoff.Deadline(self._timeout)
        attempt = 0
        while True:
            try:
                status, content, result = await send()
            except (httpx.TransportError, OSError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            else:
                if status < 400:
                    return result
                reason = _retry_reason(_error_body(status, bytes(content)))
            if deadline.passed():
                raise _gave_up(self.address, what, self._timeout, reason)
            await asyncio.sleep(backoff.delay(attempt, first_s=_RETRY_FIRST_S, max_s=_RETRY_MAX_S))
            attempt += 1

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

    @property
    def shard_spec(self) -> ShardSpec:
        return self.info.shard_spec()

    @property
    def total(self) -> int:
        return self.info.total

    @property
    def resume(self) -> proto.Resume | None:
        return self.info.resume

    def __len__(self) -> int:
        return self.info.items

    def select(self, queries: Sequence[Query]) -> Positions:
        body = proto.SelectRequest(queries=[q.text for q in queries]).model_dump_json()
        response = self._call(
            "POST", proto.Paths.SELECT, content=body, headers={"content-type": "application/json"}
        )
        return np.asarray(proto.SelectResponse.model_validate_json(response.content).indexes, dtype=np.int64)

    def fetch(self, positions: Positions, readahead: Positions) -> Pending:
        live = self._running()
        body = proto.BatchRequest(
            indexes=positions.tolist(),
            readahead=readahead[: 16 * proto.MAX_BATCH_ITEMS].tolist(),
            client=live.resource.id,
        ).model_dump_json()
        fds = live.resource.fds
        if fds is not None:
            return _FdPending(self, fds, body.encode())
        return _RemotePending(live.loop.submit(self._post_batch(body.encode())), self)

    def report_wait(self, waited_s: float) -> None:
        """Tell the sidecar how long the trainer waited (see :mod:`sluicegate.core.wait`); fire and forget:
        a lost report must never slow or fail the trainer."""
        live = self._running()
        body = proto.WaitReport(waited_s=waited_s).model_dump_json()
        # Not retried: the next report carries on, and a sidecar that is away has no metrics to serve.
        send = live.resource.client().post(proto.Paths.WAIT, content=body, timeout=_REPORT_TIMEOUT_S)
        live.loop.submit(send).add_done_callback(lambda f: f.cancelled() or f.exception())

    def report_progress(self, report: proto.ProgressReport) -> None:
        """Tell the sidecar how far the trainer got (it passes it on to the broker); fire and forget, like
        :meth:`report_wait`: each report says it all, so the next one makes up for a lost one."""
        live = self._running()
        body = report.model_dump_json()
        headers = {"content-type": "application/json"}
        send = live.resource.client().post(
            proto.Paths.PROGRESS, content=body, headers=headers, timeout=_REPORT_TIMEOUT_S
        )
        self._reporting = live.loop.submit(send)
        self._reporting.add_done_callback(lambda f: f.cancelled() or f.exception())

    def ledger_sink(self, run: str) -> Sink:
        return _SidecarSink(self.address, run)

    def describe(self) -> str:
        info = self._info
        where = f"sidecar {self.address}"
        return where if info is None else f"{where} ({info.dataset} version {info.version}, rank {info.rank})"

    def close(self) -> None:
        reporting, self._reporting = self._reporting, None
        if reporting is not None:
            # The last progress report says where the trainer stopped: give it a moment to get there.
            with contextlib.suppress(Exception):
                reporting.result(_REPORT_TIMEOUT_S)
        live, self._live = self._live, None
        if live is not None:
            live.close()


class _SidecarSink(Sink):
    """Reports consumed stretches to the sidecar, which records them (see ``sluicegate_sidecar.ledger``).

    Its own blocking client, not the source's loop thread: the recorder's thread waits for each answer,
    and at exit the loops may already be stopped when the last stretches go out.
    """

    def __init__(self, address: str, run: str) -> None:
        self._address, self._run = address, run
        base, uds = _endpoint(address)
        self._client = httpx.Client(
            base_url=base,
            transport=httpx.HTTPTransport(uds=uds, verify=False),  # plain HTTP, as in _transport
            timeout=_REPORT_TIMEOUT_S,
            trust_env=False,
        )
        self._chain: str | None = None
        self._number = 0

    def write(self, consumed: Consumed, writer: Writer) -> None:
        if self._chain is None:
            self._chain = chain_name(writer)
        body = proto.LedgerReport(
            run=self._run, chain=self._chain, number=self._number, consumed=consumed, writer=writer
        ).model_dump_json()
        try:
            response = self._client.post(
                proto.Paths.LEDGER, content=body, headers={"content-type": "application/json"}
            )
        except httpx.HTTPError as exc:
            raise StreamError(f"cannot reach the sidecar at {self._address}: {exc!r}") from exc
        if response.status_code == 204:
            self._number += 1
            return
        error = _error_body(response.status_code, response.content)
        if response.status_code in (400, 404, 405):  # this sidecar cannot record: retrying will not help
            raise ConfigError(f"the sidecar at {self._address} does not record the ledger: {error.message}")
        raise StreamError(f"the sidecar at {self._address} could not record: {error.message}")

    def close(self) -> None:
        self._client.close()


def _retry_reason(error: proto.ErrorBody) -> str:
    """Why to try again: the sidecar is not ready yet. Any other error answer is raised as its exception."""
    if error.code is not proto.ErrorCode.NOT_READY:
        raise _ERRORS.get(error.code, StreamError)(error.message)
    return error.message


def _gave_up(address: str, what: str, timeout_s: float, reason: str) -> SidecarUnavailable:
    return SidecarUnavailable(
        f"the sidecar at {address} did not answer {what} within {timeout_s:.0f}s ({reason}); "
        "is the sidecar container running?"
    )


def _error_body(status: int, content: bytes) -> proto.ErrorBody:
    try:
        return proto.ErrorBody.model_validate_json(content)
    except ValidationError:
        text = content[:300].decode("utf-8", "replace")
        return proto.ErrorBody(
            code=proto.ErrorCode.INTERNAL, message=f"HTTP {status} from the sidecar: {text}"
        )
