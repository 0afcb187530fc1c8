"""A sluicegate control plane on a testbed, shared by the e2e tests and ``make dev-cluster``.

The chart is installed for RBAC and the webhook configuration (``replicaCount=0``, ``webhook.url``
pointing here), and the operator runs as a local process under the chart's ServiceAccount, so the
API server calls it like an in-cluster webhook and every permission it uses comes from the chart.

:func:`install_in_cluster` instead installs the chart as a platform team would, with the project's image,
its operator running in a pod on the testbed's real node.

``python -m tests.operator.devcluster`` (after ``python -m tests.testbed up``) starts the real node, installs
the chart in the cluster, adds a loopback S3 server with a sample Dataset, and keeps running until Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sluicegate import Store
from sluicegate.core.broker_protocol import BrokerPaths
from sluicegate.core.manifest import ItemRecord, records_to_table

from tests.s3server import S3Server
from tests.testbed import WEBHOOK_CALLER, Testbed, stop_process_group, wait_for
from tests.testbed.image import Image, ensure_image
from tests.testbed.node import REAL_NODE_PLACEMENT, RealNode

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "sluicegate"


# The testbed's API server authenticates to webhooks as WEBHOOK_CALLER; only it may post AdmissionReviews.
ADMISSION_CALLER = {
    "enabled": True,
    "subjects": [{"kind": "User", "name": WEBHOOK_CALLER}],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sample_dataset(s3: S3Server, bucket: str, items: int = 40) -> tuple[str, list[ItemRecord]]:
    """A dataset of ``items`` small text blobs with labels and metadata, committed as version 1."""
    s3.create_bucket(bucket)
    uri = f"s3://{bucket}/coco"
    store = Store(
        uri,
        s3.options(),
    )
    records = []
    for i in range(items):
        data = f"item-{i}".encode()
        records.append(
            ItemRecord(
                id=f"i{i}",
                blob=store.put_blob(data),
                size=len(data),
                media_type="text/plain",
                labels={"car": i % 3, "dog": int(i % 5 == 0)},
                metadata={"split": "train" if i % 4 else "val", "open": i % 2 == 0},
            )
        )
    store.commit(lambda _: records_to_table(records))
    return uri, records


SOURCES_SELECTOR = "app.kubernetes.io/component=sources,app.kubernetes.io/part-of=sluicegate"


def allow_source(
    testbed: Testbed, namespace: str, uri: str, endpoint: str | None, *, ambient: bool = False
) -> None:
    """What a platform team's ``sources.rules`` entry does, for every sluicegate release on the testbed:
    the rule in the release's source-policy ConfigMap and the RoleBinding that lets its operator read
    Secrets in ``namespace`` (``Operator.set_sources`` does the same through ``helm upgrade``)."""
    found = json.loads(
        testbed.kubectl("get", "configmaps", "-A", "-l", SOURCES_SELECTOR, "-o", "json").stdout
    )
    rule: dict[str, Any] = {
        "namespaces": [namespace],
        "uris": [uri],
        "endpoints": [endpoint] if endpoint else [],
    }
    if ambient:
        rule["ambientCredentials"] = True
    for cm in found["items"]:
        policy = json.loads((cm.get("data") or {}).get("sources.json") or "{}")
        policy.setdefault("rules", []).append(rule)
        cm["data"] = {"sources.json": json.dumps(policy)}
        testbed.kubectl("replace", "-f", "-", input=json.dumps(cm))
        fullname = cm["metadata"]["name"].removesuffix("-sources")
        release = cm["metadata"]["annotations"]["meta.helm.sh/release-name"]
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {
                "name": f"{fullname}-credentials",
                "namespace": namespace,
                # Owned like the chart renders it, so a later `helm upgrade` with the rule adopts it.
                "labels": {"app.kubernetes.io/managed-by": "Helm"},
                "annotations": {
                    "meta.helm.sh/release-name": release,
                    "meta.helm.sh/release-namespace": cm["metadata"]["namespace"],
                },
            },
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": f"{fullname}-credentials",
            },
            "subjects": [
                {"kind": "ServiceAccount", "name": fullname, "namespace": cm["metadata"]["namespace"]}
            ],
        }
        testbed.apply(binding)


def credentials_secret(
    testbed: Testbed, namespace: str, name: str, s3: S3Server, *, opt_in: bool = True
) -> None:
    """A Secret with ``s3``'s keys, labelled for sluicegate unless ``opt_in`` is false."""
    testbed.kubectl(
        "create",
        "secret",
        "generic",
        name,
        "-n",
        namespace,
        f"--from-literal=AWS_ACCESS_KEY_ID={s3.access_key}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.secret_key}",
    )
    if opt_in:
        testbed.kubectl("label", "secret", name, "-n", namespace, "sluicegate.io/credentials=true")


def apply_admitted(testbed: Testbed, obj: dict[str, Any], timeout_s: float = 30) -> None:
    """Apply ``obj`` once the operator's validating webhook admits it: right after a start or a policy
    change, the API server may not call the webhook with its CA yet, or the operator may still hold the
    previous source policy (it re-reads it every few seconds)."""
    last: list[str] = []

    def admitted() -> bool:
        result = testbed.kubectl("apply", "-f", "-", input=json.dumps(obj), check=False)
        last[:] = [result.stderr]
        return result.returncode == 0

    try:
        wait_for(admitted, timeout_s=timeout_s, what=f"{obj['kind']} {obj['metadata']['name']} admitted")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {last[0] if last else ''}") from exc


def dataset_with_keys(
    testbed: Testbed,
    namespace: str,
    uri: str,
    s3: S3Server,
    name: str = "coco",
    *,
    timeout_s: float = 30,
    endpoint: str | None = None,
) -> None:
    """The Dataset ``name`` in ``namespace`` on ``s3`` (reached at ``endpoint``, e.g. a fault proxy in
    front of it), its keys in an opted-in Secret beside it."""
    credentials_secret(testbed, namespace, f"{name}-keys", s3)
    apply_admitted(
        testbed,
        {
            "apiVersion": "sluicegate.io/v1alpha1",
            "kind": "Dataset",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "source": {"uri": uri, "endpoint": endpoint or s3.endpoint, "region": s3.region},
                "credentials": {"secretRef": {"name": f"{name}-keys"}},
            },
        },
        timeout_s=timeout_s,
    )


def publish_dataset(testbed: Testbed, namespace: str, uri: str, s3: S3Server, name: str = "coco") -> None:
    """:func:`dataset_with_keys`, its source first allowed to ``namespace`` by the platform's policy."""
    allow_source(testbed, namespace, uri, s3.endpoint)
    dataset_with_keys(testbed, namespace, uri, s3, name)


@dataclass
class Operator:
    """A local operator process registered with the testbed's API server."""

    process: subprocess.Popen[bytes]
    url: str
    namespace: str
    release: str
    log: Path
    ca: ssl.SSLContext

    @property
    def name(self) -> str:
        return f"{self.release}-sluicegate"

    def stop(self, testbed: Testbed) -> None:
        stop_process_group(self.process)
        testbed.helm("uninstall", self.release, "-n", self.namespace, check=False)

    def set_sources(self, testbed: Testbed, rules: list[dict[str, Any]]) -> None:
        """The platform team's move: ``helm upgrade`` the release with ``sources.rules`` (the namespaces
        named must exist, as the chart binds Secret access in each)."""
        testbed.helm(
            "upgrade",
            self.release,
            str(CHART),
            "-n",
            self.namespace,
            "--reuse-values",
            "--set-json",
            f"sources.rules={json.dumps(rules)}",
        )


def start(
    testbed: Testbed,
    namespace: str,
    release: str,
    log: Path,
    *,
    port: int = 0,
    extra_args: Sequence[str] = (),
) -> Operator:
    """CRDs, the chart (RBAC and webhook configuration) and the operator as the chart's ServiceAccount."""
    testbed.kubectl("apply", "-f", str(REPO / "crds"))
    testbed.kubectl(
        "wait",
        "--for=condition=Established",
        "crd/datasets.sluicegate.io",
        "crd/datasetstreams.sluicegate.io",
        "--timeout=60s",
    )
    testbed.kubectl("create", "namespace", namespace)
    url = f"https://127.0.0.1:{port or free_port()}"
    name = f"{release}-sluicegate"
    testbed.helm(
        "install",
        release,
        str(CHART),
        "-n",
        namespace,
        "--set",
        "crds.enabled=false",
        "--set",
        "replicaCount=0",
        "--set",
        f"webhook.url={url}/mutate",
        "--set-json",
        f"webhook.authentication={json.dumps(ADMISSION_CALLER)}",
    )
    kubeconfig = testbed.service_account_kubeconfig(namespace, name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SLUICEGATE_"))}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sluicegate_operator",
                f"--kubeconfig={kubeconfig}",
                f"--namespace={namespace}",
                f"--listen=127.0.0.1:{url.rsplit(':', 1)[1]}",
                f"--public-url={url}",
                f"--webhook-configuration={name}",
                f"--tls-secret={name}-tls",
                f"--sources-configmap={name}-sources",
                f"--leader-lease={name}",
                "--metrics-auth=false",  # the benchmarks scrape it directly; tests/security turns it on
                "--admission-auth=true",
                *extra_args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )

    def ca() -> str | None:
        if process.poll() is not None:
            raise AssertionError(f"operator exited {process.returncode}:\n{log.read_text()[-3000:]}")
        got = testbed.kubectl(
            "get", "secret", f"{name}-tls", "-n", namespace, "-o", "jsonpath={.data.ca\\.crt}", check=False
        )
        return base64.b64decode(got.stdout).decode() if got.returncode == 0 and got.stdout else None

    operator = Operator(process, url, namespace, release, log, ssl.create_default_context())
    try:
        operator.ca = ssl.create_default_context(cadata=wait_for(ca, timeout_s=60, what="the operator's CA"))

        def healthy() -> bool:
            try:
                return (
                    httpx.get(url + BrokerPaths.HEALTHZ, verify=operator.ca, trust_env=False).status_code
                    == 200
                )
            except httpx.TransportError:
                return False

        wait_for(healthy, timeout_s=30, what="the operator's HTTPS endpoint")

        def ca_published() -> bool:
            found = [
                testbed.kubectl(
                    "get", kind, name, "-o", "jsonpath={.webhooks[0].clientConfig.caBundle}", check=False
                ).stdout
                for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration")
            ]
            return all(found)

        wait_for(ca_published, timeout_s=30, what="the operator's CA in both webhook configurations")
    except BaseException:
        operator.stop(testbed)
        raise
    return operator


@dataclass
class InCluster:
    """A release of the chart whose operator runs in a pod (see :func:`install_in_cluster`)."""

    testbed: Testbed
    namespace: str
    release: str
    values: Path

    @property
    def name(self) -> str:
        return f"{self.release}-sluicegate"

    def operator_pods(self) -> list[dict[str, Any]]:
        found = self.testbed.kubectl(
            "get", "pods", "-n", self.namespace, "-l", "app.kubernetes.io/component=operator", "-o", "json"
        )
        return list(json.loads(found.stdout)["items"])

    def wait_ready(self, timeout_s: float = 180) -> None:
        """Until the rollout is done; fails at the first crash of an operator container, with its log."""

        def rolled_out() -> bool:
            for pod in self.operator_pods():
                for status in pod["status"].get("containerStatuses", []):
                    if status["restartCount"]:
                        previous = self.testbed.kubectl(
                            "logs", "-n", self.namespace, pod["metadata"]["name"], "--previous", check=False
                        )
                        raise AssertionError(
                            f"the operator crashed:\n{previous.stdout[-3000:]}{previous.stderr}"
                        )
            deploy = json.loads(
                self.testbed.kubectl(
                    "get", "deployment", self.name, "-n", self.namespace, "-o", "json"
                ).stdout
            )
            status = deploy.get("status", {})
            return bool(
                status.get("observedGeneration") == deploy["metadata"]["generation"]
                and status.get("updatedReplicas") == status.get("readyReplicas") == deploy["spec"]["replicas"]
                and not status.get("unavailableReplicas")
            )

        try:
            wait_for(rolled_out, timeout_s=timeout_s, what=f"the operator of {self.release} rolled out")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; pods {self.pod_states()}") from exc

    def pod_states(self) -> dict[str, str]:
        """Each operator pod's phase, the reason the kubelet gave and its containers' states, by name."""
        states = {}
        for pod in self.operator_pods():
            status = pod["status"]
            words = [status.get("phase", "?"), status.get("reason", ""), status.get("message", "")]
            if pod["metadata"].get("deletionTimestamp"):
                words.append("deleting")
            words += [
                f"{c['name']}:{','.join(c.get('state', {}))}/restarts={c['restartCount']}"
                for c in status.get("containerStatuses", [])
            ]
            states[pod["metadata"]["name"]] = " ".join(w for w in words if w)
        return states

    def upgrade(self, *args: str) -> None:
        self.testbed.helm(
            "upgrade",
            self.release,
            str(CHART),
            "-n",
            self.namespace,
            "-f",
            str(self.values),
            *args,
            timeout_s=300,
        )

    def uninstall(self, *, check: bool = True) -> None:
        """``helm uninstall``; with ``check=False`` (a fixture's teardown) it also removes the release's
        webhook configurations itself should helm fail or time out: they are cluster-wide and fail
        closed, so one left behind would refuse every later test's Datasets and pods."""
        try:
            self.testbed.helm(
                "uninstall", self.release, "-n", self.namespace, "--wait", check=check, timeout_s=180
            )
        except subprocess.TimeoutExpired:
            if check:
                raise
        finally:
            if not check:
                self.testbed.kubectl(
                    "delete",
                    "validatingwebhookconfigurations,mutatingwebhookconfigurations",
                    "-l",
                    f"app.kubernetes.io/instance={self.release}",
                    "--ignore-not-found",
                    check=False,
                )

    def logs(self, lines: int = 60) -> str:
        got = self.testbed.kubectl(
            "logs", "-n", self.namespace, f"deployment/{self.name}", f"--tail={lines}", check=False
        )
        return str(got.stdout + got.stderr)


def install_in_cluster(
    testbed: Testbed,
    image: Image,
    namespace: str,
    release: str,
    *,
    port: int,
    rules: Sequence[dict[str, Any]] = (),
    values: Mapping[str, Any] | None = None,
) -> InCluster:
    """``helm install`` of the chart with ``image`` on the real node, with what a platform team on a
    cluster without a pod network or kube-proxy sets, and no more privilege than the chart grants."""
    values = {
        "image": {"repository": image.name.rpartition(":")[0], "pullPolicy": "Never"},
        # More (values={"replicaCount": 2}) share the one node and its port (hostNetwork, SO_REUSEPORT).
        "replicaCount": 1,
        "webhook": {"authentication": ADMISSION_CALLER},
        "hostNetwork": True,
        "port": port,
        "publicURL": f"https://127.0.0.1:{port}",
        # No kube-proxy on the testbed: the API server is reached where it listens.
        "env": [
            {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
            {"name": "KUBERNETES_SERVICE_PORT", "value": str(testbed.ports.apiserver)},
        ],
        "sources": {"rules": list(rules)},
        "datasetResyncSeconds": 5,
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
        **REAL_NODE_PLACEMENT,
        **(values or {}),
    }
    # CRDs applied earlier with kubectl (by `start`) are adopted, as a platform team moving them under Helm
    # would; `crds.keep` leaves them in place on uninstall either way.
    for crd in ("datasets.sluicegate.io", "datasetstreams.sluicegate.io"):
        if testbed.kubectl("get", "crd", crd, check=False).returncode == 0:
            testbed.kubectl("label", "crd", crd, "app.kubernetes.io/managed-by=Helm", "--overwrite")
            testbed.kubectl(
                "annotate",
                "crd",
                crd,
                f"meta.helm.sh/release-name={release}",
                f"meta.helm.sh/release-namespace={namespace}",
                "--overwrite",
            )
    path = testbed.workdir / f"values-{release}-{namespace}.json"
    path.write_text(json.dumps(values, indent=2))
    installed = InCluster(testbed, namespace, release, path)
    try:
        args = ["install", release, str(CHART), "-n", namespace, "--create-namespace", "-f", str(path)]
        testbed.helm(*args, timeout_s=300)
        installed.wait_ready()
    except BaseException:
        installed.uninstall(check=False)  # its fail-closed webhooks must not outlive a failed install
        raise
    return installed


def _attach(state_dir: Path) -> Testbed:
    """The testbed `python -m tests.testbed up` recorded in ``state_dir``."""
    from tests.testbed.build import ensure_binaries
    from tests.testbed.cluster import Ports

    state = json.loads((state_dir / "state.json").read_text())
    port = int(state["server"].rsplit(":", 1)[1])
    return Testbed(state_dir / "run", ensure_binaries(), ports=Ports(0, 0, port, 0, 0, 0), pids=state["pids"])


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.operator.devcluster", description=__doc__)
    parser.add_argument("--state-dir", type=Path, default=REPO / ".testbed")
    parser.add_argument("--port", type=int, default=8443, help="operator port on the node")
    args = parser.parse_args(argv)
    if not (args.state_dir / "state.json").exists():
        print("no testbed running: start one with `python -m tests.testbed up`", file=sys.stderr)
        return 1
    testbed = _attach(args.state_dir)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` cleans up like Ctrl-C
    image = ensure_image()
    node = RealNode(testbed, tainted=False)
    release: InCluster | None = None
    try:
        node.start(images=(image.archive,))
        # Pods of the quick start run on the real node, not on a kwok node that only pretends to.
        for kwok in testbed.kubectl("get", "nodes", "-l", "type=kwok", "-o", "name").stdout.split():
            testbed.kubectl("cordon", kwok)
        with S3Server() as s3:
            uri, records = sample_dataset(s3, "datasets")
            testbed.kubectl("create", "namespace", "data")
            release = install_in_cluster(testbed, image, "sluicegate-system", "dev", port=args.port)
            publish_dataset(testbed, "data", uri, s3)
            print(
                f"""sluicegate dev cluster: the operator ({release.name}, image {image.name}) runs
in sluicegate-system on the real node {node.name}; S3 {s3.endpoint}
Dataset data/coco: {len(records)} items on {uri}

  export KUBECONFIG={args.state_dir / "kubeconfig"} PATH={args.state_dir / "bin"}:$PATH
  kubectl get datasets -A

Ctrl-C uninstalls the chart and stops the node and the S3 server; `make testbed-down` stops the cluster.""",
                flush=True,
            )
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        if release is not None:
            release.uninstall(check=False)
        node.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
