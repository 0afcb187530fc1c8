"""Memory files: writing many buffers into one in as few system calls as the kernel allows, and passing
descriptors over a unix socket (``SCM_RIGHTS``), as the fd socket's two ends do."""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Sequence
from typing import Any

__all__ = ["received", "rights", "write_all"]

_IOV_MAX = 1024  # the most buffers one writev takes


def write_all(fd: int, buffers: Sequence[memoryview]) -> None:
    """Write ``buffers`` end to end at ``fd``'s offset (byte views; short writes are resumed)."""
    views = [b for b in buffers if len(b)]
    i = 0
    while i < len(views):
        written = os.writev(fd, views[i : i + _IOV_MAX])
        while i < len(views) and written >= len(views[i]):
            written -= len(views[i])
            i += 1
        if written:  # a short write: the rest of that buffer goes next
            views[i] = views[i][written:]


def rights(fd: int) -> list[tuple[int, int, array.array[int]]]:
    """The ancillary data of ``sendmsg`` that passes ``fd``."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]


def received(ancillary: Sequence[tuple[int, int, Any]]) -> list[int]:
    """The descriptors in the ancillary data ``recvmsg`` returned (each now open in this process)."""
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", payload[: len(payload) - len(payload) % 4]))
    return fds
