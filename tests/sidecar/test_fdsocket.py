"""The fd socket: batches whose bytes come in a memory file, for a trainer beside its sidecar."""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import os
import socket
import stat
import struct
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import sluicegate
from sluicegate import ItemNotInShard
from sluicegate.core import protocol as proto

from tests.sidecar.helpers import InProcessSidecar, SidecarProcess, make_dataset, metrics

N = 41


def _start(tmp_path: Path, size: int = 3000) -> tuple[InProcessSidecar, dict[str, bytes], Path]:
    uri = str(tmp_path / "ds")
    expected = make_dataset(uri, N, size=size)
    sock = tmp_path / "run" / "sidecar.sock"
    return InProcessSidecar(["--store", uri, "--listen", f"unix://{sock}"]), expected, sock


def _ask(
    path: Path, payload: bytes, fds: list[int] | None = None
) -> tuple[proto.FdAnswer, int | None, socket.socket]:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(10)
    conn.connect(str(path))
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    conn.sendmsg([struct.pack(">I", len(payload)) + payload], rights)
    data, ancillary, _, _ = conn.recvmsg(1 << 20, socket.CMSG_SPACE(4))
    fds = [array.array("i", p[:4])[0] for level, kind, p in ancillary if kind == socket.SCM_RIGHTS]
    while len(data) < 4 + struct.unpack(">I", data[:4])[0]:
        data += conn.recv(1 << 20)
    return proto.FdAnswer.model_validate_json(data[4:]), (fds[0] if fds else None), conn


def test_a_trainer_beside_its_sidecar_gets_batches_through_the_fd_socket(tmp_path: Path) -> None:
    sidecar, expected, sock = _start(tmp_path)
    with sidecar as sc:
        fd_sock = sock.parent / (sock.name + proto.FD_SOCKET_SUFFIX)
        # A trainer running as another UID in the pod can connect to both (the volume is the pod's own).
        assert stat.S_IMODE(sock.stat().st_mode) == stat.S_IMODE(fd_sock.stat().st_mode) == 0o666
        ds = sluicegate.connect(f"unix://{sock}")
        assert {i.id: i.data for i in ds} == expected
        assert [i.id for i in ds.get_many([3, 1, 3])] == [ds[3].id, ds[1].id, ds[3].id]
        loader = ds.to_pytorch(iterable=True).loader(batch_size=8, num_workers=2)  # forked workers
        assert sorted(i for batch in loader for i in batch["id"]) == sorted(expected)
        ds.close()
        assert sc.sidecar is not None
        assert sc.sidecar.requests[("fd:" + proto.Paths.BATCH, 200)] > 0
        assert sc.sidecar.requests[(proto.Paths.BATCH, 200)] == 0  # no batch went over HTTP


def test_bad_requests_on_the_fd_socket_get_a_clear_answer_and_serving_goes_on(tmp_path: Path) -> None:
    sidecar, expected, sock = _start(tmp_path)
    fd_path = sock.parent / (sock.name + proto.FD_SOCKET_SUFFIX)
    with sidecar:
        ds = sluicegate.connect(f"unix://{sock}")
        len(ds)  # ready
        cases = [
            (b"{not json", 400, "bad_request", "malformed request"),
            (json.dumps({"indexes": [1], "bogus": 1}).encode(), 400, "bad_request", "bogus"),
            (json.dumps({"indexes": [0, 99]}).encode(), 404, "not_in_shard", "index 99"),
        ]
        for payload, status, code, text in cases:
            answer, fd, conn = _ask(fd_path, payload)
            conn.close()
            assert fd is None
            assert answer.status == status
            assert answer.error is not None
            assert answer.error.code == code
            assert text in answer.error.message
        # A frame longer than any request: the connection is dropped, nothing else happens.
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(10)
        conn.connect(str(fd_path))
        conn.sendall(struct.pack(">I", 2**31) + b"x" * 100)
        with contextlib.suppress(ConnectionResetError):  # reset: the sidecar did not read the rest
            assert conn.recv(10) == b""
        conn.close()
        with pytest.raises(ItemNotInShard, match="outside"):
            ds.source.fetch(np.array([1000]), np.array([], dtype=np.int64)).result()
        answer, fd, conn = _ask(fd_path, json.dumps({"indexes": [2]}).encode())
        assert answer.header is not None
        assert fd is not None
        row = answer.header.rows[0]
        assert os.pread(fd, row.size, 0) == expected[row.id]
        os.close(fd)
        conn.close()
        assert {i.id for i in ds} == set(expected)
        ds.close()


def _batch_files() -> int:
    """How many of this process's descriptors are the trainer's batch memory files."""
    return sum(
        "sluicegate-batch" in os.readlink(f"/proc/self/fd/{fd}")
        for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")
    )


def test_items_view_the_trainers_memory_file_which_is_reused_only_once_they_are_gone(
    tmp_path: Path,
) -> None:
    sidecar, expected, sock = _start(tmp_path)
    with sidecar:
        ds = sluicegate.connect(f"unix://{sock}")
        ds.set_epoch(0)
        held = list(ds)  # every item kept: no batch's memory may be written over by a later batch
        assert all(isinstance(i.buffer, memoryview) and i.buffer.readonly for i in held)
        assert {i.id: bytes(i.buffer) for i in held} == expected
        assert {i.id: i.data for i in held} == expected  # copied out on first access, views dropped
        del held
        before = _batch_files()
        for epoch in range(1, 6):  # items dropped as read: the files come back and are written again
            ds.set_epoch(epoch)
            assert {i.id: i.data for i in ds} == expected
        assert _batch_files() <= max(before, 8 + 4), "memory files were not reused"
        first = next(iter(ds))
        view = first.buffer
        assert bytes(view) == expected[first.id]
        ds.close()


def test_a_descriptor_that_is_not_a_writable_memory_file_is_refused_and_left_untouched(
    tmp_path: Path,
) -> None:
    sidecar, expected, sock = _start(tmp_path)
    fd_path = sock.parent / (sock.name + proto.FD_SOCKET_SUFFIX)
    on_disk = tmp_path / "victim.bin"
    on_disk.write_bytes(b"keep me")
    read_end, write_end = os.pipe()
    sealed = os.memfd_create("sealed", os.MFD_ALLOW_SEALING)
    fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    writable = os.memfd_create("mine")
    read_only = os.open(f"/proc/self/fd/{writable}", os.O_RDONLY)
    disk = os.open(on_disk, os.O_RDWR)
    request = json.dumps({"indexes": [0, 1]}).encode()
    with sidecar:
        ds = sluicegate.connect(f"unix://{sock}")
        len(ds)  # ready
        for fds, text in [
            ([disk], "not a memory file"),
            ([write_end], "not a regular file"),
            ([sealed], "sealed"),
            ([read_only], "read-only"),
            ([writable, writable], "at most one descriptor"),
        ]:
            answer, fd, conn = _ask(fd_path, request, fds)
            conn.close()
            assert fd is None
            assert answer.status == 400, (text, answer)
            assert answer.error is not None
            assert text in answer.error.message
        assert on_disk.read_bytes() == b"keep me"
        assert os.fstat(sealed).st_size == 0
        # A memory file of the client's own gets the batch, and no descriptor comes back.
        answer, fd, conn = _ask(fd_path, request, [writable])
        conn.close()
        assert fd is None
        assert answer.header is not None
        first, second = answer.header.rows
        assert os.pread(writable, first.size, 0) == expected[first.id]
        assert os.pread(writable, second.size, first.size) == expected[second.id]
        assert {i.id for i in ds} == set(expected)  # serving went on
        ds.close()
    for fd in (read_end, write_end, sealed, writable, read_only, disk):
        os.close(fd)


def test_a_trainer_that_connects_before_its_sidecar_starts_still_finds_the_fd_socket(tmp_path: Path) -> None:
    uri = str(tmp_path / "ds")
    expected = make_dataset(uri, N, size=3000)
    sock = tmp_path / "run" / "sidecar.sock"
    got: dict[str, bytes] = {}

    def train() -> None:  # as a trainer container that starts first: connect() waits for the sidecar
        ds = sluicegate.connect(f"unix://{sock}", timeout=60)
        got.update((i.id, i.data) for i in ds)
        ds.close()

    trainer = threading.Thread(target=train)
    trainer.start()
    time.sleep(0.5)
    with SidecarProcess(["--store", uri, "--listen", f"127.0.0.1:0,unix://{sock}"]) as sc:
        trainer.join(60)
        assert got == expected
        scraped = metrics(httpx.get(f"{sc.tcp}{proto.Paths.METRICS}").text)
    fd_batches = 'sluicegate_requests_total{code="200",path="fd:/v1/batch"}'
    assert scraped.get(fd_batches, 0) > 0, "the batches went over HTTP, not the fd socket"
    assert scraped.get('sluicegate_requests_total{code="200",path="/v1/batch"}', 0) == 0
