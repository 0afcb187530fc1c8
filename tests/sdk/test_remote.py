"""The sidecar client against a sidecar that stalls mid-answer: the trainer gets a clear error, not a hang.

The stalling sidecar is a small stand-in (a real sidecar cannot be made to stop halfway through a body);
it answers the control calls as the real one does, then sends half a batch and goes silent.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sluicegate
from sluicegate import SidecarUnavailable
from sluicegate.core import protocol as proto

_INFO = proto.Info(
    dataset="file:///stalled", version=1, query=None, total=4, items=4, rank=0, world_size=1, seed=0,
    shuffle=False, remainder="pad",
)  # fmt: skip


_HANDLERS: set[asyncio.Task[None]] = set()


async def _stalling(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    task = asyncio.current_task()
    assert task is not None
    _HANDLERS.add(task)
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            ),
            0,
        )
        await reader.readexactly(length)
        if head.startswith(b"POST /v1/batch"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100)
            await writer.drain()
            await asyncio.sleep(3600)  # and never the rest
        body = _INFO.model_dump_json().encode() if b"/v1/info" in head else b'{"status":"ready","items":4}'
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        writer.write(body)
        await writer.drain()


@pytest.fixture(params=["tcp", "unix"])
def stalled_sidecar(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[asyncio.Server, str]:
        if request.param == "unix":
            path = str(tmp_path / "stalled.sock")
            return await asyncio.start_unix_server(_stalling, path), f"unix://{path}"
        server = await asyncio.start_server(_stalling, "127.0.0.1", 0)
        return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    server, address = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    yield address

    async def stop() -> None:
        server.close()
        for task in _HANDLERS:
            task.cancel()
        await asyncio.gather(*_HANDLERS, return_exceptions=True)
        _HANDLERS.clear()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def test_a_sidecar_that_stalls_mid_batch_raises_instead_of_hanging(stalled_sidecar: str) -> None:
    ds = sluicegate.connect(stalled_sidecar, timeout=5, batch_timeout=1.0)
    assert len(ds) == 4
    started = time.monotonic()
    with pytest.raises(SidecarUnavailable, match=r"within 1s; it is stalled"):
        ds[0]
    assert time.monotonic() - started < 10
    ds.close()


@pytest.mark.parametrize("address", ["https://sidecar:8080", "tcp://127.0.0.1:80", "http://", "/run/sg.sock"])
def test_an_address_the_sidecar_does_not_serve_is_refused_before_any_connection(address: str) -> None:
    # The sidecar speaks plain HTTP on a unix socket or TCP only; the SDK's transports load no TLS context
    # because nothing else gets through this check.
    with pytest.raises(sluicegate.StreamError, match=r"neither unix:///PATH nor http://HOST:PORT"):
        sluicegate.connect(address, timeout=1)
