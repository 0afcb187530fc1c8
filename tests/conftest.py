"""Shared fixtures: a real S3-compatible server (moto's standalone server on loopback) and stores on
both backends, plus small image helpers.

``store_backend`` is parametrised over ``local`` and ``s3``: a test that takes it runs once against
a directory and once against a fresh bucket on the server.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import httpx
import numpy as np
import pytest

# TensorFlow and triton (which torchvision pulls in) both register LLVM options; loading TensorFlow
# first aborts the process when triton loads. The suite imports both, so torch goes first.
import torch  # noqa: F401
import torchvision  # noqa: F401
from PIL import Image
from sluicegate import S3Options, Store

_ACCESS_KEY = "sluicegate-test"
_SECRET_KEY = "sluicegate-test-secret"
_REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    """A running S3-compatible server and the credentials it accepts."""

    endpoint: str

    @property
    def env(self) -> dict[str, str]:
        """AWS_* variables that point obstore (and the CLI) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": _ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": _SECRET_KEY,
            "AWS_REGION": _REGION,
        }

    @property
    def options(self) -> S3Options:
        return S3Options(
            endpoint=self.endpoint, region=_REGION, access_key_id=_ACCESS_KEY, secret_access_key=_SECRET_KEY
        )

    def create_bucket(self) -> str:
        name = f"sg-{uuid.uuid4().hex[:16]}"
        boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=_ACCESS_KEY,
            aws_secret_access_key=_SECRET_KEY,
            region_name=_REGION,
        ).create_bucket(Bucket=name)
        return name


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's standalone S3 server as a subprocess on a free loopback port."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto server exited with {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{endpoint}/moto-api/", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"moto server silent on {endpoint} for 60 s: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield S3Server(endpoint)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class Backend:
    """Where a test's dataset lives: ``uri`` plus what a process needs to reach it."""

    name: str
    uri: str
    s3: S3Options | None = None
    env: dict[str, str] = field(default_factory=dict)

    def store(self) -> Store:
        return Store(self.uri, self.s3)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """A fresh, empty dataset location on a local directory or on the S3 server."""
    if request.param == "local":
        return Backend("local", str(tmp_path / "store"))
    server: S3Server = request.getfixturevalue("s3_server")
    return Backend("s3", f"s3://{server.create_bucket()}/datasets/test", server.options, server.env)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The S3 server's AWS_* variables set in this process (for code that reads the environment)."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server


PngWriter = Callable[..., Path]


def _write_png(path: Path, width: int = 32, height: int = 24, seed: int = 0, gray: bool = False) -> Path:
    """A small random PNG at ``path`` (parents created); different seeds give different bytes."""
    rng = np.random.default_rng(seed)
    shape = (height, width) if gray else (height, width, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def write_png() -> PngWriter:
    """``write_png(path, width=32, height=24, seed=0, gray=False) -> path``: a small random PNG."""
    return _write_png


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture
def venv_bin(repo_root: Path) -> Path:
    """The project's virtualenv ``bin`` (for console scripts run as real subprocesses)."""
    return Path(os.environ.get("VIRTUAL_ENV", repo_root / ".venv")) / "bin"
