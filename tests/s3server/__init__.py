"""A real S3-compatible server (versitygw, posix backend) for integration tests.

moto's server accepts expired and tampered presigned URLs; versitygw verifies SigV4 signatures, presigned-URL
expiry and conditional writes (If-None-Match / If-Match), so tests see the refusals AWS S3 would give.
The binary is built from the Go module pinned in go.mod beside this file and cached per version.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Self

from tests.testbed import stop_process_group

if TYPE_CHECKING:
    from botocore.client import BaseClient
    from obstore.store import S3Store
    from sluicegate import S3Options

__all__ = ["BuildFailed", "GoUnavailable", "S3Server", "build", "cache_path", "pinned_version"]

MODULE_DIR = Path(__file__).resolve().parent
_MODULE = "github.com/versity/versitygw"
_PACKAGE = f"{_MODULE}/cmd/versitygw"


class GoUnavailable(RuntimeError):
    """The binary is not cached and there is no Go toolchain to build it."""


class BuildFailed(RuntimeError):
    pass


def pinned_version() -> str:
    """The versitygw version go.mod pins; go.mod is the single source of truth for it."""
    text = (MODULE_DIR / "go.mod").read_text()
    match = re.search(rf"^\s*(?:require\s+)?{re.escape(_MODULE)}\s+(v\S+)", text, re.M)
    if match is None:
        raise BuildFailed(f"{MODULE_DIR}/go.mod does not require {_MODULE}")
    return match.group(1)


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sluicegate-s3" / pinned_version() / "versitygw"


def _log(message: str) -> None:
    print(f"[s3server] {message}", file=sys.stderr, flush=True)


def build() -> Path:
    """Return the cached versitygw binary, building it first if this version was never built here."""
    target = cache_path()
    if target.is_file():
        return target
    go = shutil.which("go")
    if go is None:
        raise GoUnavailable(f"`go` is not on PATH and {target} is not cached")
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.with_name("build.lock").open("w") as lock:
        # Parallel test sessions on a cold machine must not each spend minutes compiling the same binary.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        staging = target.with_name(f".versitygw.tmp-{os.getpid()}")
        # GOWORK=off and our own GOFLAGS keep a stray go.work or a user's -mod=vendor from changing the pin;
        # without cgo the binary is static, so a cached copy runs on any Linux of the same architecture.
        env = {**os.environ, "GOWORK": "off", "GOFLAGS": "-mod=readonly", "CGO_ENABLED": "0"}
        command = [go, "build", "-trimpath", "-ldflags=-s -w", "-o", str(staging), _PACKAGE]
        _log(f"building versitygw {pinned_version()} (first run only)")
        started = time.monotonic()
        try:
            result = subprocess.run(command, cwd=MODULE_DIR, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                raise BuildFailed(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
            # Renaming makes the binary appear whole: an interrupted build never leaves a truncated one.
            staging.replace(target)
        finally:
            staging.unlink(missing_ok=True)
        _log(f"built in {time.monotonic() - started:.0f}s: {target}")
    return target


# Proxy variables must not send readiness probes for 127.0.0.1 elsewhere.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class S3Server:
    """A versitygw process on 127.0.0.1 with a fresh temp data dir; use as a context manager.

    The given access/secret key are the root credentials, which may do everything (create buckets included).
    """

    def __init__(
        self,
        access_key: str = "sluicegate-test-access",
        secret_key: str = "sluicegate-test-secret",
        region: str = "us-east-1",
        *,
        binary: Path | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self._binary = binary
        self._startup_timeout = startup_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._log: IO[bytes] | None = None
        self._port = 0

    @property
    def endpoint(self) -> str:
        if self._process is None:
            raise RuntimeError("S3Server is not running")
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> Self:
        binary = self._binary or build()
        self._workdir = Path(tempfile.mkdtemp(prefix="sluicegate-s3-"))
        (self._workdir / "data").mkdir()
        self._log = (self._workdir / "server.log").open("ab")
        try:
            # The free port is only probed, so another process may grab it first; then it exits and a new
            # port is tried. A gateway that hangs instead would hang again, so that is not retried.
            for _ in range(3):
                self._port = _free_port()
                self._process = self._spawn(binary)
                if self._wait_ready():
                    return self
                exited = self._process.poll() is not None
                self._terminate()
                if not exited:
                    break
            raise RuntimeError(f"versitygw did not start; its log:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _spawn(self, binary: Path) -> subprocess.Popen[bytes]:
        # Credentials go through the environment, not argv, so they don't show in `ps`; inherited VGW_* and
        # ROOT_* variables are dropped because they would reconfigure the gateway (IAM, TLS, logging, ...).
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VGW_", "ROOT_"))}
        env |= {
            "ROOT_ACCESS_KEY_ID": self.access_key,
            "ROOT_SECRET_ACCESS_KEY": self.secret_key,
            "VGW_REGION": self.region,
            "VGW_PORT": f"127.0.0.1:{self._port}",
        }
        assert self._workdir is not None
        return subprocess.Popen(
            [str(binary), "--quiet", "posix", str(self._workdir / "data")],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Its own process group lets stop() kill it and anything it spawns in one signal.
            start_new_session=True,
        )

    def _wait_ready(self) -> bool:
        """True once the gateway answers HTTP; False if it exited (e.g. the port was taken) or hangs."""
        assert self._process is not None
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                _DIRECT.open(f"http://127.0.0.1:{self._port}/", timeout=1).close()
                return True
            except urllib.error.HTTPError:
                # An anonymous request is refused with 403, which proves the S3 API is serving.
                return True
            except OSError:
                time.sleep(0.02)
        return False

    def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        stop_process_group(process, timeout_s=5)

    def stop(self) -> None:
        self._terminate()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def log_tail(self, lines: int = 40) -> str:
        if self._workdir is None:
            return ""
        log = self._workdir / "server.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def boto3_client(self, *, access_key: str | None = None, secret_key: str | None = None) -> BaseClient:
        """A SigV4, path-style boto3 client; pass other keys to sign requests wrongly."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key if access_key is None else access_key,
            aws_secret_access_key=self.secret_key if secret_key is None else secret_key,
            region_name=self.region,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )

    def s3_store(self, bucket: str, *, secret_key: str | None = None) -> S3Store:
        """An obstore S3Store for one bucket; pass another secret_key to sign requests wrongly."""
        from obstore.store import S3Store

        return S3Store(
            bucket,
            endpoint=self.endpoint,
            access_key_id=self.access_key,
            secret_access_key=self.secret_key if secret_key is None else secret_key,
            region=self.region,
            virtual_hosted_style_request=False,
            client_options={"allow_http": True},
        )

    def options(self) -> S3Options:
        """sluicegate's S3 options for this server, with its keys."""
        from sluicegate import S3Options

        return S3Options(
            endpoint=self.endpoint,
            region=self.region,
            access_key_id=self.access_key,
            secret_access_key=self.secret_key,
        )

    def create_bucket(self, name: str) -> None:
        self.boto3_client().create_bucket(Bucket=name)
