"""The fd socket: batch answers whose bytes travel in a memory file passed with the answer.

The framing and the models are :mod:`sluicegate.core.protocol`'s (see its docstring). The socket sits
beside the sidecar's unix socket, in the pod-private volume the trainer shares; the memory file a
descriptor refers to holds only the bytes of the batch it answers, and the sidecar closes its own
descriptor once it is sent.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from sluicegate.core import protocol as proto

__all__ = ["FdServer", "memory_file"]

log = logging.getLogger("sluicegate.sidecar.fd")

# framed answer and the blobs it describes, for one request
Serve = Callable[[bytes], Awaitable[tuple[bytes, Sequence[bytes]]]]
# a batch's bytes (and the connection's memory file, if any) -> the memory file holding them, concatenated
WriteFile = Callable[[Sequence[bytes], int | None], Awaitable[int]]
_IOV_MAX = 1024
_KEEP_BYTES = 64 * 2**20  # a connection's memory file keeps up to this much between batches


def memory_file(blobs: Sequence[bytes], fd: int | None = None) -> int:
    """A memory file holding ``blobs`` end to end from offset 0; returns its descriptor. Blocking: a worker
    runs it. ``fd``: a memory file to overwrite (its pages are already there: writing new ones costs more
    than the copy), shrunk when it holds far more than this batch."""
    new = fd is None
    if fd is None:
        fd = os.memfd_create("sluicegate-batch", os.MFD_CLOEXEC)
    try:
        views = [memoryview(b) for b in blobs if len(b)]
        total = sum(len(v) for v in views)
        if not new and os.fstat(fd).st_size > max(2 * total, _KEEP_BYTES):
            os.ftruncate(fd, total)
        os.lseek(fd, 0, os.SEEK_SET)
        i = 0
        while i < len(views):
            written = os.writev(fd, views[i : i + _IOV_MAX])
            while i < len(views) and written >= len(views[i]):
                written -= len(views[i])
                i += 1
            if written:  # a short write: the rest of that blob goes next
                views[i] = views[i][written:]
    except BaseException:
        if new:
            os.close(fd)
        raise
    return fd


class FdServer:
    """Serves the fd socket at ``path``; ``serve`` answers one framed request's payload."""

    def __init__(self, path: Path, serve: Serve, write_file: WriteFile) -> None:
        self.path = path
        self._serve = serve
        self._write_file = write_file
        self._sock: socket.socket | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)  # a stale socket from a killed predecessor
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        sock.listen(64)
        sock.setblocking(False)
        self._sock = sock
        self._spawn(self._accept(sock))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(sock)
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            self._spawn(self._connection(conn))

    async def _connection(self, conn: socket.socket) -> None:
        """Answers one request at a time. The client reads an answer's file before it sends the next
        request on the connection, so one memory file per connection is rewritten for each answer."""
        loop = asyncio.get_running_loop()
        memfd: int | None = None
        try:
            while (head := await _recv_exactly(loop, conn, 4)) is not None:
                body = await _recv_exactly(loop, conn, proto.frame_length(head))
                if body is None:
                    return
                answer, blobs = await self._serve(body)
                if blobs:
                    memfd = await self._write_file(blobs, memfd)
                await _send(loop, conn, answer, memfd if blobs else None)
        except (ConnectionError, ValueError) as exc:  # the client went away, or sent no frame
            log.debug("fd socket connection closed: %s", exc)
        finally:
            conn.close()
            if memfd is not None:
                os.close(memfd)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.path.unlink(missing_ok=True)


async def _recv_exactly(loop: asyncio.AbstractEventLoop, conn: socket.socket, n: int) -> bytes | None:
    """``n`` bytes, or None at a clean end of stream before the first of them."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        chunk = await loop.sock_recv(conn, n - got)
        if not chunk:
            if got:
                raise ConnectionResetError(f"the client closed mid-frame ({got} of {n} bytes)")
            return None
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


async def _send(loop: asyncio.AbstractEventLoop, conn: socket.socket, data: bytes, fd: int | None) -> None:
    view = memoryview(data)
    if fd is not None:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
        while True:
            try:
                sent = conn.sendmsg([view], rights)
                break
            except BlockingIOError:
                await _writable(loop, conn)
        view = view[sent:]
    if view:
        await loop.sock_sendall(conn, view)


async def _writable(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(conn.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_writer(conn.fileno())
