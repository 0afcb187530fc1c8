"""write_all: many buffers into a memory file, in order, past the kernel's limit of buffers per call."""

from __future__ import annotations

import os

import pytest
from sluicegate.core.memfd import write_all


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memory files are Linux's")
def test_write_all_writes_every_buffer_in_order_past_iov_max() -> None:
    parts = [bytes([i % 251]) * (i % 7) for i in range(3000)]  # empty ones among them, > 1024 buffers
    fd = os.memfd_create("test")
    try:
        write_all(fd, [memoryview(p) for p in parts])
        expected = b"".join(parts)
        assert os.fstat(fd).st_size == len(expected)
        assert os.pread(fd, len(expected) + 1, 0) == expected
    finally:
        os.close(fd)
