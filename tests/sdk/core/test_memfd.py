"""write_all: many buffers into a memory file, in order, past the kernel's limit of buffers per call;
rights and received: a descriptor over a unix socket."""

from __future__ import annotations

import os
import socket

import pytest
from sluicegate.core.memfd import received, rights, write_all


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


def test_a_descriptor_passed_with_rights_is_received_open_in_the_receiver() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    read_end, write_end = os.pipe()
    try:
        left.sendmsg([b"x"], rights(write_end))
        data, ancillary, _, _ = right.recvmsg(1, socket.CMSG_SPACE(4 * 4))
        assert data == b"x"
        (fd,) = received(ancillary)
        assert fd != write_end
        os.write(fd, b"through the passed descriptor")
        os.close(fd)
        assert os.read(read_end, 100) == b"through the passed descriptor"
        left.sendmsg([b"y"])
        assert received(right.recvmsg(1, socket.CMSG_SPACE(4))[1]) == []
    finally:
        for fd in (read_end, write_end):
            os.close(fd)
        left.close()
        right.close()
