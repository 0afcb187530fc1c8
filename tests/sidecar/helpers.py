"""Helpers for data-path tests: datasets with known bytes, a sidecar (in-process or a real subprocess) and a
fault-injecting proxy for the S3 server."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from aiohttp import web
from sluicegate import S3Options, Store
from sluicegate.core.manifest import Annotation, ItemRecord, records_to_table
from sluicegate_sidecar.config import parse_args
from sluicegate_sidecar.server import Sidecar

from tests.testbed import wait_for


def item_bytes(i: int, size: int) -> bytes:
    """Deterministic, distinct bytes for item ``i``."""
    head = f"item-{i:06d}|".encode()
    return (head * (size // len(head) + 1))[:size] if size >= len(head) else head


def make_dataset(uri: str, n: int, size: int = 1000, s3: S3Options | None = None) -> dict[str, bytes]:
    """Commit a version of ``n`` items (every 5th is meta.split "val", item i has i % 3 cars); id -> bytes."""
    store = Store(uri, s3)
    records, expected = [], {}
    for i in range(n):
        data = item_bytes(i, size)
        item_id = f"item{i:06d}"
        expected[item_id] = data
        records.append(
            ItemRecord(
                id=item_id,
                blob=store.put_blob(data),
                size=len(data),
                media_type="application/octet-stream",
                metadata={"split": "val" if i % 5 == 0 else "train", "index": i},
                labels={"car": i % 3} if i % 3 else {},
                annotations=[Annotation(label="car", bbox=(1.0, 2.0, 3.0, 4.0))] * (i % 3),
            )
        )
    store.commit(lambda _base: records_to_table(records))
    return expected


class InProcessSidecar:
    """A :class:`Sidecar` on its own loop thread in this process (fast to start; metrics readable)."""

    def __init__(self, argv: list[str], environ: Mapping[str, str] | None = None) -> None:
        self.config = parse_args(argv, environ or {})
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.sidecar: Sidecar | None = None
        self.addresses: list[str] = []

    def __enter__(self) -> InProcessSidecar:
        self._thread.start()

        async def start() -> tuple[Sidecar, list[str]]:
            sidecar = Sidecar(self.config)
            return sidecar, await sidecar.start()

        self.sidecar, self.addresses = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)
        return self

    @property
    def tcp(self) -> str:
        return next(a for a in self.addresses if a.startswith("http://"))

    def wait_ready(self, timeout_s: float = 20) -> InProcessSidecar:
        """Until /readyz says so: the sidecar loads its plan after it starts listening."""

        def ready() -> bool:
            return httpx.get(self.tcp + "/readyz", trust_env=False, timeout=10).status_code == 200

        wait_for(ready, timeout_s=timeout_s, what="the sidecar ready")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.sidecar is not None
        asyncio.run_coroutine_threadsafe(self.sidecar.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@dataclass
class SidecarProcess:
    """``sluicegate-sidecar`` as a real subprocess (for SIGTERM and kill -9)."""

    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[str] | None = None
    addresses: list[str] = field(default_factory=list)

    def start(self) -> SidecarProcess:
        bin_dir = Path(sys.executable).parent
        self.proc = subprocess.Popen(
            [str(bin_dir / "sluicegate-sidecar"), *self.args],
            env={**os.environ, **self.env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        lines = []
        for line in self.proc.stdout:
            lines.append(line)
            m = re.search(r"listening on (.*)$", line)
            if m:
                self.addresses = m.group(1).split()
                break
        else:
            raise RuntimeError(f"sidecar exited with {self.proc.wait()}:\n{''.join(lines)}")
        # Keep draining its output so a chatty log can never block it on a full pipe.
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        return self

    @property
    def tcp(self) -> str:
        return next(a for a in self.addresses if a.startswith("http://"))

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(20)

    def __enter__(self) -> SidecarProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


class FaultProxy:
    """An HTTP proxy in front of the S3 server that injects faults on a schedule.

    A real S3 server cannot be made to fail on demand, so this small aiohttp proxy is the fault injector:
    it forwards requests unchanged (the Host header too, so signatures still verify) and, on the requests
    the schedule picks, answers HTTP 500 or 503, resets the connection, or stalls past the client's timeout.
    ``faults`` cycles, one entry per GET of a blob: "ok", "500", "503", "reset" or "slow".
    """

    def __init__(self, upstream: str, faults: list[str], slow_s: float = 3.0) -> None:
        self.upstream = upstream.rstrip("/")
        self.faults = faults
        self.slow_s = slow_s
        self.counts: dict[str, int] = {}
        self._n = 0
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.endpoint = ""

    def _pick(self, request: web.Request) -> str:
        if request.method != "GET" or "/blobs/" not in request.path:
            return "ok"
        fault = self.faults[self._n % len(self.faults)]
        self._n += 1
        self.counts[fault] = self.counts.get(fault, 0) + 1
        return fault

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        fault = self._pick(request)
        if fault in ("500", "503"):
            return web.Response(status=int(fault), text="<Error><Code>InternalError</Code></Error>")
        if fault == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        if fault == "slow":
            await asyncio.sleep(self.slow_s)
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("content-length",)}
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=await request.read(),
            allow_redirects=False,
            auto_decompress=False,
        ) as upstream:
            body = await upstream.read()
            # HEAD answers carry the object's Content-Length without a body; keep it for those.
            drop = (
                ("transfer-encoding",)
                if request.method == "HEAD"
                else ("content-length", "transfer-encoding")
            )
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in drop}
            return web.Response(status=upstream.status, body=body or None, headers=out)

    def __enter__(self) -> FaultProxy:
        self._thread.start()

        async def start() -> str:
            self._session = aiohttp.ClientSession(auto_decompress=False)
            app = web.Application(client_max_size=1 << 30)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            sock: Any = site._server.sockets[0]  # type: ignore[union-attr]
            return f"http://127.0.0.1:{sock.getsockname()[1]}"

        self.endpoint = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._runner is not None
            assert self._session is not None
            await self._runner.cleanup()
            await self._session.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def metrics(text: str) -> dict[str, float]:
    """Prometheus exposition text -> {sample name with labels: value}."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def ids_of(items: Iterator[Any]) -> list[str]:
    return [item.id for item in items]
