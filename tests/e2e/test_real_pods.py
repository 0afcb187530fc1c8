"""The whole shape in real pods: the chart installed with the project's image, an Indexed Job on a kubelet.

The operator runs in the cluster as the chart deploys it, under the chart's ServiceAccount and RBAC. The
webhook injects its native sidecar into 4 pods of an Indexed Job; each sidecar starts before its trainer,
authenticates to the in-cluster broker with the pod's projected token, fetches the shard from the loopback
S3 server through presigned URLs and serves it on the pod's unix socket, where the trainer (the same image,
`sluicegate.connect()`) reads it. Pods use the node's network because the control plane and the S3 server
listen on loopback (tests/testbed/node.py).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sluicegate
from sluicegate_operator.inject import SIDECAR_NAME

from tests.e2e.conftest import wait_ready
from tests.operator import devcluster
from tests.s3server import S3Server
from tests.testbed import CommandError, Testbed, wait_for
from tests.testbed.cluster import free_ports
from tests.testbed.image import Image
from tests.testbed.node import REAL_NODE_PLACEMENT, RealNode

pytestmark = pytest.mark.e2e

RELEASE = "sg"
FULLNAME = f"{RELEASE}-sluicegate"
QUERY = "labels.car > 0"
WORLD = 4
ITEMS = 80
SLOW_RANK_DELAY_S = 0.5  # rank 0 reads slowly, so its sidecar can be killed mid-stream

# The trainer container's script: stream the pod's shard, print (id, sha256) of every item in order.
TRAINER = f"""
import hashlib, json, os, sys, time
import sluicegate
slow = os.environ["JOB_COMPLETION_INDEX"] == "0"
seen = []
for item in sluicegate.connect(timeout=120):
    seen.append([item.id, hashlib.sha256(item.data).hexdigest()])
    if slow:
        print("read", len(seen), flush=True)
        time.sleep({SLOW_RANK_DELAY_S})
print("SHARD " + json.dumps({{"rank": os.environ["SLUICEGATE_RANK"], "items": seen}}), flush=True)
"""


@dataclass
class Cluster:
    testbed: Testbed
    node: RealNode
    image: Image
    s3: S3Server
    system_ns: str
    data_ns: str
    team_ns: str
    uri: str
    release: devcluster.InCluster | None = None

    def kubectl(self, *args: str, **kw: Any) -> Any:
        return self.testbed.kubectl(*args, **kw)

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def wait_ready(self, kind: str, ns: str, name: str, timeout_s: float = 60) -> dict[str, Any]:
        logs = self.release.logs if self.release else str
        return wait_ready(self.testbed, kind, ns, name, timeout_s=timeout_s, logs=logs)

    def job(self, name: str, service_account: str, stream: str) -> dict[str, Any]:
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name, "namespace": self.team_ns},
            "spec": {
                "completions": WORLD,
                "parallelism": WORLD,
                "completionMode": "Indexed",
                "backoffLimit": 0,
                "template": {
                    "metadata": {"labels": {"sluicegate.io/stream": stream}},
                    "spec": {
                        "serviceAccountName": service_account,
                        "restartPolicy": "Never",
                        "hostNetwork": True,
                        **REAL_NODE_PLACEMENT,
                        "securityContext": {
                            "runAsNonRoot": True,
                            "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "containers": [
                            {
                                "name": "trainer",
                                "image": self.image.name,
                                "imagePullPolicy": "Never",
                                "command": ["python", "-c", TRAINER],
                                "securityContext": {
                                    "allowPrivilegeEscalation": False,
                                    "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]},
                                },
                            }
                        ],
                    },
                },
            },
        }

    def job_pods(self, job: str) -> list[dict[str, Any]]:
        pods = self.get("pods", "-n", self.team_ns, "-l", f"batch.kubernetes.io/job-name={job}")["items"]
        return sorted(
            pods, key=lambda p: int(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"])
        )


@pytest.fixture(scope="module")
def cluster(testbed: Testbed, real_node: RealNode, image: Image, s3: S3Server) -> Iterator[Cluster]:
    suffix = uuid.uuid4().hex[:6]
    uri, _ = devcluster.sample_dataset(s3, f"realpods-{suffix}", ITEMS)
    c = Cluster(testbed, real_node, image, s3, f"sg-system-{suffix}", f"data-{suffix}", f"team-{suffix}", uri)
    for ns in (c.data_ns, c.team_ns):
        testbed.kubectl("create", "namespace", ns)
    started = time.monotonic()
    rule = {"namespaces": [c.data_ns], "uris": [uri], "endpoints": [s3.endpoint]}
    try:
        c.release = devcluster.install_in_cluster(
            testbed, image, c.system_ns, RELEASE, port=free_ports(1)[0], rules=[rule]
        )
        print(f"[real pods] helm install to operator Ready: {time.monotonic() - started:.1f}s")
        yield c
    finally:
        if c.release is not None:
            c.release.uninstall(check=False)
        for ns in (c.data_ns, c.team_ns, c.system_ns):
            testbed.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture(scope="module")
def published(cluster: Cluster) -> Cluster:
    """The Dataset in data_ns (keys in an opted-in Secret), `stream` granted to team_ns:trainer, and the
    DatasetStream `train` Ready."""
    c = cluster
    # Its source is allowed by the chart's sources.rules (see `cluster`), not patched in afterwards.
    devcluster.dataset_with_keys(c.testbed, c.data_ns, c.uri, c.s3, timeout_s=60)
    c.kubectl(
        "create",
        "role",
        "coco-stream",
        "-n",
        c.data_ns,
        "--verb=stream",
        "--resource=datasets.sluicegate.io",
        "--resource-name=coco",
    )
    for sa in ("trainer", "intruder"):
        c.kubectl("create", "serviceaccount", sa, "-n", c.team_ns)
    c.kubectl(
        "create",
        "rolebinding",
        "coco-stream-trainer",
        "-n",
        c.data_ns,
        "--role=coco-stream",
        f"--serviceaccount={c.team_ns}:trainer",
    )
    devcluster.apply_admitted(
        c.testbed,
        {
            "apiVersion": "sluicegate.io/v1alpha1",
            "kind": "DatasetStream",
            "metadata": {"name": "train", "namespace": c.team_ns},
            "spec": {
                "dataset": {"namespace": c.data_ns, "name": "coco"},
                "query": QUERY,
                "sharding": {"seed": 7},
                # Its 4 pods share the node's network, so they cannot all bind one metrics port.
                "sidecar": {"metricsPort": 0},
            },
        },
        timeout_s=60,
    )
    c.wait_ready("datasets", c.data_ns, "coco")
    c.wait_ready("datasetstreams", c.team_ns, "train")
    return c


def _expected(c: Cluster) -> dict[str, str]:
    """The query result read from the store directly, with the keys only the operator holds."""
    s3 = c.s3
    options = s3.options()
    return {
        item.id: hashlib.sha256(item.data).hexdigest()
        for item in sluicegate.open(c.uri, query=QUERY, s3=options)
    }


def _shard(c: Cluster, pod: dict[str, Any]) -> tuple[int, list[tuple[str, str]]]:
    logs = c.kubectl("logs", "-n", c.team_ns, pod["metadata"]["name"], "-c", "trainer").stdout
    line = next(line for line in logs.splitlines() if line.startswith("SHARD "))
    shard = json.loads(line.removeprefix("SHARD "))
    return int(shard["rank"]), [(i, sha) for i, sha in shard["items"]]


def _sidecar_status(pod: dict[str, Any]) -> dict[str, Any]:
    return next(s for s in pod["status"].get("initContainerStatuses", []) if s["name"] == SIDECAR_NAME)


def test_operator_runs_in_cluster_with_the_charts_identity_only(cluster: Cluster) -> None:
    c = cluster
    assert c.release is not None
    release = c.release
    (pod,) = release.operator_pods()
    assert pod["spec"]["serviceAccountName"] == FULLNAME
    assert pod["spec"]["nodeName"] == c.node.name
    status = pod["status"]["containerStatuses"][0]
    assert status["ready"], status
    # Least privilege: with the operator's own token, Secrets outside what the chart grants stay closed.
    c.kubectl("create", "secret", "generic", "victim", "-n", c.team_ns, "--from-literal=key=hunter2")
    as_operator = c.testbed.service_account_kubeconfig(c.system_ns, FULLNAME)
    for args in (
        ("get", "secret", "victim", "-n", c.team_ns),
        ("get", "secrets", "-n", "kube-system"),
        ("get", "secrets", "--all-namespaces"),
        ("create", "secret", "generic", "planted", "-n", c.team_ns, "--from-literal=a=b"),
    ):
        result = c.kubectl(*args, kubeconfig=as_operator, check=False)
        assert result.returncode != 0, args
        assert "forbidden" in result.stderr.lower(), (args, result.stderr)


def test_indexed_job_streams_disjoint_equal_shards_through_injected_sidecars(published: Cluster) -> None:
    c = published
    expected = _expected(c)
    started = time.monotonic()
    c.testbed.apply(c.job("train", "trainer", "train"))

    def slow_pod_reading() -> dict[str, Any] | None:
        pods = c.job_pods("train")
        if len(pods) != WORLD or pods[0]["status"].get("phase") != "Running":
            return None
        logs = c.kubectl(
            "logs", "-n", c.team_ns, pods[0]["metadata"]["name"], "-c", "trainer", check=False
        ).stdout
        return pods[0] if "read 3\n" in logs else None

    slow = wait_for(slow_pod_reading, timeout_s=180, what="rank 0 streaming")
    # The sidecar dies mid-stream (its process, through the runtime): the kubelet restarts it, and the
    # trainer carries on from where it was.
    c.node.kill_container(_sidecar_status(slow)["containerID"])

    def finished() -> list[dict[str, Any]] | None:
        pods = c.job_pods("train")
        phases = [p["status"].get("phase") for p in pods]
        assert "Failed" not in phases, json.dumps([p["status"] for p in pods], indent=1)[-4000:]
        return pods if len(pods) == WORLD and phases == ["Succeeded"] * WORLD else None

    pods = wait_for(finished, timeout_s=240, what=f"{WORLD} pods Succeeded")
    elapsed = time.monotonic() - started
    print(f"[real pods] kubectl apply of the Job to {WORLD} pods Succeeded: {elapsed:.1f}s")

    def complete() -> bool:
        # The Job controller marks the Job a moment after its last pod succeeds.
        conditions = c.get("job", "train", "-n", c.team_ns)["status"].get("conditions") or []
        return any(cond["type"] == "Complete" and cond["status"] == "True" for cond in conditions)

    wait_for(complete, timeout_s=30, what="the Job Complete")

    assert _sidecar_status(pods[0])["restartCount"] >= 1, "the killed sidecar was restarted by the kubelet"
    shards = dict(_shard(c, pod) for pod in pods)
    assert sorted(shards) == list(range(WORLD))
    per_rank = -(-len(expected) // WORLD)
    assert {rank: len(items) for rank, items in shards.items()} == dict.fromkeys(range(WORLD), per_rank)
    for rank, items in shards.items():
        assert len({i for i, _ in items}) == len(items), f"rank {rank} saw an item twice"
        for item_id, sha in items:
            assert expected[item_id] == sha, f"rank {rank}: bytes of {item_id} differ from the store"
    seen = Counter(i for items in shards.values() for i, _ in items)
    assert set(seen) == set(expected), "together the ranks read exactly the query result"
    assert sum(seen.values()) - len(seen) == WORLD * per_rank - len(expected), "disjoint but for padding"

    for pod in pods:
        spec = json.dumps(pod["spec"])
        assert c.s3.access_key not in spec, "no storage credential in a pod"
        assert c.s3.secret_key not in spec, "no storage credential in a pod"
        sidecar = pod["spec"]["initContainers"][0]
        assert sidecar["name"] == SIDECAR_NAME, "the sidecar starts first"
        assert sidecar["restartPolicy"] == "Always", "a native sidecar, which does not hold the Job open"


def test_pod_whose_service_account_may_not_stream_is_refused_at_admission(published: Cluster) -> None:
    c = published
    with pytest.raises(CommandError) as refused:
        c.testbed.apply(
            c.job("intruder", "intruder", "train")["spec"]["template"]
            | {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": "intruder",
                    "namespace": c.team_ns,
                    "labels": {"sluicegate.io/stream": "train"},
                },
            }
        )
    message = refused.value.result.stderr
    assert f"{c.team_ns}:intruder" in message, message
    assert "kubectl create rolebinding" in message, message
    assert c.kubectl("get", "pod", "intruder", "-n", c.team_ns, check=False).returncode != 0


def test_helm_upgrade_rolls_the_operator_and_uninstall_keeps_the_crds(published: Cluster) -> None:
    c = published
    assert c.release is not None
    release = c.release
    (before,) = release.operator_pods()
    release.upgrade("--set", "logLevel=DEBUG")
    release.wait_ready()
    (after,) = wait_for(
        lambda: (
            [
                p
                for p in release.operator_pods()
                if p["metadata"]["uid"] != before["metadata"]["uid"] and p["status"].get("phase") == "Running"
            ]
            or None
        ),
        timeout_s=120,
        what="the upgraded operator pod",
    )
    assert "--log-level=DEBUG" in after["spec"]["containers"][0]["args"]
    c.wait_ready("datasetstreams", c.team_ns, "train")

    release.uninstall()
    for crd in ("datasets.sluicegate.io", "datasetstreams.sluicegate.io"):
        assert c.kubectl("get", "crd", crd, check=False).returncode == 0, f"{crd} kept on uninstall"
    assert c.get("datasets", "coco", "-n", c.data_ns)["spec"]["source"]["uri"] == c.uri
    wait_for(lambda: not release.operator_pods(), timeout_s=60, what="the operator pod gone")
    webhooks = c.kubectl("get", "mutatingwebhookconfigurations", "-o", "name").stdout
    assert FULLNAME not in webhooks
