"""A pod's processes run here, as the testbed's kwok nodes never run containers: its sidecar with exactly
the environment the webhook injected (only the socket and token paths moved to a temp dir) and a real
token bound to the pod, and on demand a trainer script with the trainer's environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sluicegate.core.broker_protocol import SidecarEnv
from sluicegate_operator.inject import SIDECAR_NAME

from tests.e2e.conftest import ControlPlane
from tests.testbed import stop_process_group


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env") or [] if "value" in e}


def clean_environ() -> dict[str, str]:
    """This process's environment without anything sluicegate or S3 would read."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("SLUICEGATE_", "AWS_"))}


@dataclass
class LocalPod:
    """One pod's sidecar (and on demand its trainer) as local processes, with the injected environment."""

    name: str
    root: Path
    injected: str  # where the webhook had the sidecar listen
    sidecar_env: dict[str, str]
    trainer_env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None

    @classmethod
    def of(cls, pod: dict[str, Any], cp: ControlPlane, root: Path, container: str = SIDECAR_NAME) -> LocalPod:
        """The sidecar ``container`` of ``pod``, its socket and token moved under ``root``; the trainer's
        environment names the moved socket wherever it named the injected one (its address, or in a mix
        this source's address)."""
        sidecar = next(c for c in pod["spec"]["initContainers"] if c["name"] == container)
        sidecar_env, trainer_env = env_of(sidecar), env_of(pod["spec"]["containers"][0])
        # The operator runs locally and was told its public URL, so the injected URL works as is.
        assert sidecar_env[SidecarEnv.BROKER_URL] == cp.url
        injected = sidecar_env[SidecarEnv.LISTEN]
        sidecar_env |= {
            SidecarEnv.LISTEN: f"unix://{root / 'sidecar.sock'}",
            SidecarEnv.TOKEN_FILE: str(root / "token"),
        }
        local = cls(pod["metadata"]["name"], root, injected, sidecar_env, trainer_env)
        local.trainer_env = local.moved(trainer_env)
        return local

    def moved(self, env: dict[str, str]) -> dict[str, str]:
        """``env`` naming this sidecar's moved socket wherever it named the injected one."""
        return {k: v.replace(self.injected, self.sidecar_env[SidecarEnv.LISTEN]) for k, v in env.items()}

    @property
    def log(self) -> Path:
        return self.root / "sidecar.log"

    def start(self, token: str) -> LocalPod:
        (self.root / "token").write_text(token)
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sluicegate_sidecar"],
                env={**clean_environ(), **self.sidecar_env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def get(self, path: str) -> httpx.Response | None:
        """``path`` from the sidecar over its unix socket; None while it does not listen yet."""
        transport = httpx.HTTPTransport(uds=self.sidecar_env[SidecarEnv.LISTEN].removeprefix("unix://"))
        try:
            with httpx.Client(transport=transport, trust_env=False, timeout=10) as client:
                return client.get(f"http://sidecar{path}")
        except httpx.TransportError:
            return None

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"sidecar of {self.name} exited {self.process.returncode}:\n{self.logs()}")
        response = self.get("/readyz")
        return response is not None and response.status_code == 200

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    def trainer_logs(self) -> str:
        """What the last trainer collected with :func:`shard_of` wrote to stderr."""
        path = self.root / "trainer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def train(self, script: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """The trainer ``script``, started with the trainer's environment (or ``env``); collect it with
        :func:`shard_of`."""
        return subprocess.Popen(
            [sys.executable, "-c", script],
            env={**clean_environ(), **(self.trainer_env if env is None else env)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)


def shard_of(trainer: subprocess.Popen[str], pod: LocalPod) -> list[tuple[str, str, str]]:
    out, err = trainer.communicate(timeout=90)
    (pod.root / "trainer.log").write_text(err)
    assert trainer.returncode == 0, f"trainer of {pod.name} failed:\n{err}\nsidecar log:\n{pod.logs()}"
    return [(i, blob, sha) for i, blob, sha in json.loads(out)]
