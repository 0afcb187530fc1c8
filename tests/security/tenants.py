"""The victim and the attacker of the adversarial suite (and of the admission-under-attack benchmark).

One control plane (the operator as a local process under the chart's ServiceAccount, on the testbed's
real API server), with a victim (the Dataset ``coco`` in ``data_ns``, streamed by ``trainer`` in
``team_ns``) and an attacker: the user ``mallory`` with the built-in ``edit`` role in her own namespace
``evil`` (which aggregates sluicegate's), acting through ``kubectl --as``, the broker's HTTPS and real
pod-bound tokens. Nothing here reaches into the operator's process.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sluicegate_operator.resolve import POLICY_TTL_S

from tests.e2e.conftest import ControlPlane, control_plane
from tests.s3server import S3Server
from tests.testbed import Testbed

MALLORY = "mallory"


@dataclass
class Tenants:
    """The victim's control plane and the attacker's namespace."""

    cp: ControlPlane
    evil: str
    user: str = MALLORY
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:6])

    def as_user(
        self, *args: str, user: str | None = None, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """kubectl as ``user`` (mallory by default), through the API server's impersonation: her RBAC,
        her admission reviews. Never raises; the caller checks the result."""
        return self.cp.kubectl(f"--as={user or self.user}", *args, input=input, check=False)

    def apply_as(self, obj: dict[str, Any], user: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.as_user("apply", "-f", "-", user=user, input=json.dumps(obj))

    def allow(self, *rules: dict[str, Any]) -> None:
        """The platform team's chart values: the victim's rule plus ``rules`` (``helm upgrade``)."""
        cp = self.cp
        victim = {"namespaces": [cp.data_ns], "uris": [cp.uri], "endpoints": [cp.s3.endpoint]}
        cp.operator.set_sources(cp.testbed, [victim, *rules])
        time.sleep(POLICY_TTL_S + 0.5)  # the operator re-reads the policy this often

    def grant_stream(self, namespace: str, service_account: str, ds_ns: str) -> None:
        """What a namespace admin does: let a ServiceAccount stream the Datasets of ``ds_ns``."""
        self.cp.kubectl(
            "create",
            "rolebinding",
            f"{namespace}-{service_account}-streams",
            "-n",
            ds_ns,
            f"--clusterrole={self.cp.operator.name}-dataset-streamer",
            f"--serviceaccount={namespace}:{service_account}",
        )

    def admin_api(self) -> httpx.Client:
        """An HTTP client to the API server as the testbed admin (for timing admission)."""
        tb = self.cp.testbed
        context = ssl.create_default_context(cafile=str(tb.ca_bundle))
        context.load_cert_chain(str(tb.pki_dir / "admin.crt"), str(tb.pki_dir / "admin.key"))
        return httpx.Client(base_url=tb.server, verify=context, trust_env=False, timeout=30)


def dataset(name: str, namespace: str, source: dict[str, Any], secret: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"source": source}
    if secret is not None:
        spec["credentials"] = {"secretRef": {"name": secret}}
    return {
        "apiVersion": "sluicegate.io/v1alpha1",
        "kind": "Dataset",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def stream(name: str, namespace: str, ds_ns: str, ds_name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "sluicegate.io/v1alpha1",
        "kind": "DatasetStream",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"dataset": {"namespace": ds_ns, "name": ds_name}, **spec},
    }


def condition(cp: ControlPlane, kind: str, ns: str, name: str) -> tuple[str, str, str] | None:
    """(status, reason, message) of the Ready condition once the operator has written one."""
    obj = cp.get(kind, name, "-n", ns)
    ready = [c for c in obj.get("status", {}).get("conditions", []) if c["type"] == "Ready"]
    return (ready[0]["status"], ready[0]["reason"], ready[0]["message"]) if ready else None


class Tarpit:
    """A TCP server on loopback that accepts connections and never answers (a hostile S3 endpoint)."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.port = int(self._sock.getsockname()[1])
        self.connections = 0
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            self._held.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self._held:
            conn.close()
        self._sock.close()


@contextlib.contextmanager
def tenant_plane(testbed: Testbed, s3: S3Server, log: Path) -> Iterator[Tenants]:
    """The victim's control plane (operator log at ``log``) and mallory's namespace, removed after."""
    suffix = uuid.uuid4().hex[:6]
    with control_plane(
        testbed,
        s3,
        log,
        data_ns=f"data-{suffix}",
        team_ns=f"team-{suffix}",
        service_accounts=("trainer",),
        operator_args=(
            "--manifest-max-decoded-bytes=16777216",
            "--store-timeout-s=2",
            "--broker-rate=5",
            "--presign-ttl-s=60",
            "--metrics-auth=true",
        ),
    ) as cp:
        evil = f"evil-{suffix}"
        testbed.kubectl("create", "namespace", evil)
        testbed.kubectl(
            "create", "rolebinding", "mallory-edit", "-n", evil, "--clusterrole=edit", f"--user={MALLORY}"
        )
        yield Tenants(cp, evil, suffix=suffix)
        testbed.kubectl("delete", "namespace", evil, "--wait=false", check=False)
