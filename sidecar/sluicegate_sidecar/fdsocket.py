"""The fd socket: batch answers whose bytes travel in a memory file, the client's (sent with the request) or
the sidecar's (sent with the answer).

The framing and the models are :mod:`sluicegate.core.protocol`'s (see its docstring). The socket sits
beside the sidecar's unix socket, in the pod-private volume the trainer shares; a memory file holds only
the bytes of the batch it answers. A client's memory file is checked to be one (a regular file on shmem,
open for writing, not sealed against writes) before anything is written to it, and the sidecar closes its
copy of the descriptor once the answer is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from sluicegate.core import protocol as proto
from sluicegate.core.memfd import received, rights, write_all

__all__ = ["FdServer", "check_client_file", "memory_file"]

log = logging.getLogger("sluicegate.sidecar.fd")

# framed answer and the blobs it describes, for one request
Serve = Callable[[bytes], Awaitable[tuple[bytes, Sequence[bytes]]]]
# a batch's bytes, a memory file (or None) and whether it is the client's -> the memory file holding them
WriteFile = Callable[[Sequence[bytes], int | None, bool], Awaitable[int]]
_MAX_FDS = 4
_KEEP_BYTES = 64 * 2**20  # a connection's memory file keeps up to this much between batches


def memory_file(blobs: Sequence[bytes], fd: int | None = None, client: bool = False) -> int:
    """A memory file holding ``blobs`` end to end from offset 0; returns its descriptor. Blocking: a worker
    runs it. ``fd``: a memory file to overwrite (its pages are already there: writing new ones costs more
    than the copy). The sidecar's own is shrunk when it holds far more than this batch; a ``client``'s is
    never shrunk, since the client keeps it mapped."""
    new = fd is None
    if fd is None:
        fd = os.memfd_create("sluicegate-batch", os.MFD_CLOEXEC)
    try:
        views = [memoryview(b) for b in blobs]
        total = sum(len(v) for v in views)
        if not new and not client and os.fstat(fd).st_size > max(2 * total, _KEEP_BYTES):
            os.ftruncate(fd, total)
        os.lseek(fd, 0, os.SEEK_SET)
        write_all(fd, views)
    except BaseException:
        if new:
            os.close(fd)
        raise
    return fd


def check_client_file(fd: int) -> None:
    """ValueError unless ``fd`` is a memory file this sidecar may write a batch into: a regular file on
    shmem (which alone answers F_GET_SEALS), open for writing and not sealed against writing or growing. A
    pipe or a socket could block a worker forever, and a file on disk is not the client's memory."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("the descriptor sent with the request is not a regular file; send a memfd")
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        raise ValueError("the file sent with the request is not a memory file; send a memfd") from None
    if seals & (fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0)):
        raise ValueError("the memory file sent with the request is sealed against writing or growing")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
        raise ValueError("the memory file sent with the request is open read-only; open it for writing")


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
        """Answers one request at a time. The client reads an answer before it sends the next request on
        the connection, so one memory file per connection is rewritten for each answer that does not go
        into the client's own."""
        loop = asyncio.get_running_loop()
        memfd: int | None = None
        fds: list[int] = []  # descriptors that came with the request being read
        try:
            while (head := await _recv_exactly(loop, conn, 4, fds)) is not None:
                body = await _recv_exactly(loop, conn, proto.frame_length(head), fds)
                if body is None:
                    return
                client, fds = _client_file(fds), []
                blobs: Sequence[bytes] = []
                try:
                    if isinstance(client, str):  # a descriptor that will not do: refused, served on
                        answer = _refusal(client)
                    else:
                        answer, blobs = await self._serve(body)
                    if not blobs:
                        await _send(loop, conn, answer, None)
                    elif isinstance(client, int):
                        try:
                            await self._write_file(blobs, client, True)
                        except OSError as exc:  # e.g. sealed after the check, or out of memory
                            answer = _refusal(f"cannot write the batch into the memory file sent: {exc}")
                        await _send(loop, conn, answer, None)
                    else:
                        memfd = await self._write_file(blobs, memfd, False)
                        await _send(loop, conn, answer, memfd)
                finally:
                    if isinstance(client, int):
                        os.close(client)
        except (ConnectionError, ValueError) as exc:  # the client went away, or sent no frame
            log.debug("fd socket connection closed: %s", exc)
        finally:
            conn.close()
            for fd in fds:
                os.close(fd)
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


def _refusal(message: str) -> bytes:
    error = proto.ErrorBody(code=proto.ErrorCode.BAD_REQUEST, message=message)
    return proto.frame(proto.FdAnswer(status=400, error=error).model_dump_json().encode())


def _client_file(fds: list[int]) -> int | str | None:
    """The client's memory file among the descriptors of one request, None without one, or why they
    are refused (then all are closed)."""
    if not fds:
        return None
    if len(fds) == 1:
        try:
            check_client_file(fds[0])
        except (OSError, ValueError) as exc:
            reason = str(exc)
        else:
            return fds[0]
    else:
        reason = f"a request carries at most one descriptor (a memfd); this one carried {len(fds)}"
    for fd in fds:
        os.close(fd)
    return reason


async def _recv_exactly(
    loop: asyncio.AbstractEventLoop, conn: socket.socket, n: int, fds: list[int]
) -> bytes | None:
    """``n`` bytes, or None at a clean end of stream before the first of them; descriptors that come
    with them are appended to ``fds``."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        try:
            # Room for more than one descriptor, so extras are seen and refused (the kernel closes any
            # beyond the room).
            chunk, ancillary, _, _ = conn.recvmsg(n - got, socket.CMSG_SPACE(_MAX_FDS * 4))
        except BlockingIOError:
            await _readable(loop, conn)
            continue
        fds.extend(received(ancillary))
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
        while True:
            try:
                sent = conn.sendmsg([view], rights(fd))
                break
            except BlockingIOError:
                await _writable(loop, conn)
        view = view[sent:]
    if view:
        await loop.sock_sendall(conn, view)


async def _writable(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    await _ready(loop, conn, loop.add_writer, loop.remove_writer)


async def _readable(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
    await _ready(loop, conn, loop.add_reader, loop.remove_reader)


async def _ready(
    loop: asyncio.AbstractEventLoop,
    conn: socket.socket,
    add: Callable[..., object],
    remove: Callable[[int], object],
) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    add(conn.fileno(), wake)
    try:
        await ready
    finally:
        remove(conn.fileno())
