"""e2e tests run against the real control plane from tests/testbed (issue #4).

Shared here: the session's loopback S3 server and :func:`control_plane`, a sluicegate operator on the
testbed with a sample Dataset published in one namespace and ServiceAccounts allowed to stream it in
another (each test module starts its own, with the settings it needs).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import ssl
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sluicegate import S3Options
from sluicegate.core.broker_protocol import AUDIENCE
from sluicegate.core.manifest import ItemRecord

from tests.operator import devcluster
from tests.s3server import S3Server
from tests.s3server.fixtures import s3_server  # noqa: F401 - the session fixture `s3` builds on
from tests.testbed import GoUnavailable, Testbed, ensure_binaries, pytest_plugin, wait_for
from tests.testbed.image import Image, ImageUnavailable, ensure_image
from tests.testbed.node import RealNode

# The hook attaching component logs to failures.
pytest_runtest_makereport = pytest_plugin.pytest_runtest_makereport
_SHARED: list[Testbed] = []


def shared_testbed(request: pytest.FixtureRequest) -> Iterator[Testbed]:
    """One testbed per pytest session, however many test packages (tests/e2e, tests/security) ask for it:
    the first to ask starts it and stops it at the end of the session."""
    if _SHARED:
        yield _SHARED[0]
        return
    capture = request.config.pluginmanager.getplugin("capturemanager")
    try:
        with capture.global_and_fixture_disabled():  # a cold build shows its progress
            binaries = ensure_binaries()
    except GoUnavailable as error:
        pytest_plugin._unavailable(str(error))
    workdir = Path(tempfile.mkdtemp(prefix="sluicegate-testbed-"))
    bed = Testbed(workdir, binaries)
    try:
        bed.start()
        _SHARED.append(bed)
        yield bed
    finally:
        _SHARED.clear()
        bed.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def testbed(request: pytest.FixtureRequest) -> Iterator[Testbed]:
    yield from shared_testbed(request)


@pytest.fixture(scope="session")
def image(request: pytest.FixtureRequest) -> Image:
    """The project's image, built from the working tree (cached by content)."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    try:
        with capture.global_and_fixture_disabled():  # a cold build shows its progress
            return ensure_image()
    except ImageUnavailable as error:
        pytest_plugin._unavailable(str(error))


@pytest.fixture(scope="session")
def real_node(testbed: Testbed, image: Image) -> Iterator[RealNode]:
    """A kubelet on containerd registered with the session's testbed, the project's image loaded."""
    node = RealNode(testbed)
    try:
        node.start(images=(image.archive,))
        yield node
    finally:
        node.stop()


INDEX = "batch.kubernetes.io/job-completion-index"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: needs the Kubernetes testbed (built from Go modules on first use)"
    )


@pytest.fixture
def namespace(testbed: Testbed, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace whose default ServiceAccount exists, deleted afterwards."""
    name = f"e2e-{request.node.name[5:25].replace('_', '-').strip('-').lower()}-{uuid.uuid4().hex[:6]}"
    testbed.kubectl("create", "namespace", name)
    wait_for(
        lambda: testbed.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
        what=f"the default ServiceAccount in {name}",
    )
    yield name
    testbed.kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture(scope="session")
def s3(s3_server: S3Server) -> S3Server:  # noqa: F811
    """The SigV4-enforcing S3 server (versitygw) on loopback; every control plane uses its own bucket."""
    return s3_server


def wait_ready(
    testbed: Testbed, kind: str, ns: str, name: str, *, timeout_s: float, logs: Callable[[], str]
) -> dict[str, Any]:
    """``kind`` ``ns/name`` once its Ready condition is True; on timeout its status and ``logs()`` (the
    operator's) say why."""

    def get() -> dict[str, Any]:
        return dict(json.loads(testbed.kubectl("get", kind, name, "-n", ns, "-o", "json").stdout))

    def ready() -> dict[str, Any] | None:
        obj = get()
        conds = obj.get("status", {}).get("conditions", [])
        return obj if any(c["type"] == "Ready" and c["status"] == "True" for c in conds) else None

    try:
        return wait_for(ready, timeout_s=timeout_s, what=f"{kind} {ns}/{name} Ready")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{get().get('status')}\n{logs()}") from exc


@dataclass
class ControlPlane:
    testbed: Testbed
    s3: S3Server
    url: str
    ca: ssl.SSLContext
    data_ns: str
    team_ns: str
    log: Path
    records: list[ItemRecord]
    uri: str
    operator: devcluster.Operator

    @property
    def s3_options(self) -> S3Options:
        """What the operator reads the Dataset with (tests compare against the store directly)."""
        return self.s3.options()

    def kubectl(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.testbed.kubectl(*args, **kw)

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, *objs: dict[str, Any]) -> None:
        self.testbed.apply(*objs)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def broker(self, path: str, token: str | None, body: dict[str, Any] | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with httpx.Client(verify=self.ca, trust_env=False, timeout=30) as client:
            return client.post(self.url + path, json=body or {}, headers=headers)

    def pod_token(self, pod: dict[str, Any], *, audience: str = AUDIENCE) -> str:
        """A real token from the TokenRequest API, bound to ``pod`` (like the kubelet's projected one)."""
        meta = pod["metadata"]
        return self.kubectl(
            "create",
            "token",
            pod["spec"]["serviceAccountName"],
            "-n",
            meta["namespace"],
            "--duration=3600s",
            f"--audience={audience}",
            "--bound-object-kind=Pod",
            f"--bound-object-name={meta['name']}",
            f"--bound-object-uid={meta['uid']}",
        ).stdout.strip()

    def stream(self, name: str, **spec: Any) -> dict[str, Any]:
        return {
            "apiVersion": "sluicegate.io/v1alpha1",
            "kind": "DatasetStream",
            "metadata": {"name": name, "namespace": self.team_ns},
            "spec": {"dataset": {"namespace": self.data_ns, "name": "coco"}, **spec},
        }

    def pod(self, name: str, service_account: str, stream: str | None) -> dict[str, Any]:
        """A one-container pod in the team namespace, labelled for ``stream`` unless it is ``None``."""
        labels = {} if stream is None else {"labels": {"sluicegate.io/stream": stream}}
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": self.team_ns, **labels},
            "spec": {"serviceAccountName": service_account, "containers": [{"name": "main", "image": "x"}]},
        }

    def wait_ready(self, kind: str, ns: str, name: str, timeout_s: float = 30) -> dict[str, Any]:
        return wait_ready(self.testbed, kind, ns, name, timeout_s=timeout_s, logs=self.log_tail)

    def indexed_job(
        self, name: str, stream: str, *, service_account: str = "trainer", completions: int = 4
    ) -> list[dict[str, Any]]:
        """An Indexed Job of ``completions`` pods labelled with ``stream`` (Ready first); its Running
        pods, sorted by completion index."""
        self.wait_ready("datasetstreams", self.team_ns, stream)
        probe = self.pod("probe", service_account, stream)
        # The API server picks up a new webhook configuration asynchronously; a server-side dry run
        # shows when.
        wait_for(
            lambda: (
                "initContainers"
                in json.loads(
                    self.kubectl(
                        "create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(probe)
                    ).stdout
                )["spec"]
            ),
            timeout_s=30,
            what="the webhook to inject",
        )
        self.apply(
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {"name": name, "namespace": self.team_ns},
                "spec": {
                    "completions": completions,
                    "parallelism": completions,
                    "completionMode": "Indexed",
                    "template": {
                        "metadata": {"labels": {"sluicegate.io/stream": stream}},
                        "spec": {
                            "serviceAccountName": service_account,
                            "restartPolicy": "Never",
                            "containers": [{"name": "main", "image": "trainer:e2e"}],
                        },
                    },
                },
            }
        )

        def running() -> list[dict[str, Any]] | None:
            pods = self.get("pods", "-n", self.team_ns, "-l", f"batch.kubernetes.io/job-name={name}")["items"]
            ok = len(pods) == completions and all(p["status"].get("phase") == "Running" for p in pods)
            return sorted(pods, key=lambda p: int(p["metadata"]["annotations"][INDEX])) if ok else None

        return wait_for(running, timeout_s=60, what=f"{completions} Running pods of the Indexed Job")


@contextlib.contextmanager
def control_plane(
    testbed: Testbed,
    s3: S3Server,
    log: Path | None = None,
    *,
    data_ns: str | None = None,
    team_ns: str | None = None,
    service_accounts: Sequence[str] = ("trainer",),
    items: int = 40,
    operator_args: Sequence[str] = (),
) -> Iterator[ControlPlane]:
    """A local operator on the testbed, the sample Dataset ``coco`` in ``data_ns`` (keys in a Secret
    there, storage on ``s3``) and, in ``team_ns``, ``service_accounts`` each bound to the verb
    ``stream`` on it by a RoleBinding ``coco-stream-<sa>``. The namespaces default to ``data-<random>`` and
    ``team-<random>``, the operator's log to one in the testbed's workdir."""
    suffix = uuid.uuid4().hex[:6]
    log = log or testbed.workdir / "logs" / f"operator-{suffix}.log"
    data_ns, team_ns = data_ns or f"data-{suffix}", team_ns or f"team-{suffix}"
    uri, records = devcluster.sample_dataset(s3, f"datasets-{suffix}", items)
    operator = devcluster.start(
        testbed,
        f"sluicegate-{suffix}",
        f"sg-{suffix}",
        log,
        extra_args=("--dataset-resync-s=5", "--sidecar-image=sluicegate:e2e", *operator_args),
    )
    try:
        for ns in (data_ns, team_ns):
            testbed.kubectl("create", "namespace", ns)
        devcluster.publish_dataset(testbed, data_ns, uri, s3)
        testbed.kubectl(
            "create",
            "role",
            "coco-stream",
            "-n",
            data_ns,
            "--verb=stream",
            "--resource=datasets.sluicegate.io",
            "--resource-name=coco",
        )
        for sa in service_accounts:
            testbed.kubectl("create", "serviceaccount", sa, "-n", team_ns)
            testbed.kubectl(
                "create",
                "rolebinding",
                f"coco-stream-{sa}",
                "-n",
                data_ns,
                "--role=coco-stream",
                f"--serviceaccount={team_ns}:{sa}",
            )
        yield ControlPlane(
            testbed, s3, operator.url, operator.ca, data_ns, team_ns, log, records, uri, operator
        )
    finally:
        operator.stop(testbed)
        for ns in (data_ns, team_ns, operator.namespace):
            testbed.kubectl("delete", "namespace", ns, "--wait=false", check=False)
