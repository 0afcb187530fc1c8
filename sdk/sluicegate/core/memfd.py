"""Writing many buffers into a file descriptor (a memory file) in as few system calls as the kernel allows."""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["write_all"]

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
