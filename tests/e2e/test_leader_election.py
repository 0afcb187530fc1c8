"""High availability in real pods: two replicas of the chart's operator, the leader killed mid-run.

Both replicas serve the webhooks and the broker; the one holding the Lease reconciles. The leader's
container is killed (SIGKILL: no clean shutdown, no release) and its pod force-deleted, so the Deployment
replaces it with a pod of another name. While the survivor waits out the dead leader's Lease, labelled
pods and a Job keep being admitted with their sidecar and a new DatasetStream is admitted; once the Lease
has expired the survivor takes it and reconciles the stream to Ready, and no object is reconciled by two
replicas (one Ready Event per object, reconcile lines only in the leader's log). Then the new leader is
deleted gracefully: it hands the Lease back and the replacement takes over within a poll.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
from sluicegate_operator.inject import SIDECAR_NAME

from tests.e2e.conftest import wait_ready
from tests.operator import devcluster
from tests.s3server import S3Server
from tests.testbed import Testbed, wait_for
from tests.testbed.cluster import free_ports
from tests.testbed.image import Image
from tests.testbed.node import RealNode

pytestmark = pytest.mark.e2e

RELEASE = "ha"
FULLNAME = f"{RELEASE}-sluicegate"
# The operator's log line for a Ready transition it wrote (handlers._write); only a reconciler writes one.
RECONCILED = re.compile(r"sluicegate\.operator: (datasets|datasetstreams) (\S+): (Ready|NotReady) ")
LEASE_S, RENEW_S, RETRY_S = 15, 5, 2  # the operator's defaults


@dataclass
class HA:
    testbed: Testbed
    node: RealNode
    system_ns: str
    data_ns: str
    team_ns: str
    release: devcluster.InCluster

    def kubectl(self, *args: str, **kw: Any) -> Any:
        return self.testbed.kubectl(*args, **kw)

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def lease(self) -> dict[str, Any]:
        return dict(self.get("lease", FULLNAME, "-n", self.system_ns)["spec"])

    def pods(self) -> dict[str, dict[str, Any]]:
        """The operator pods not being deleted, by name."""
        return {
            p["metadata"]["name"]: p
            for p in self.release.operator_pods()
            if not p["metadata"].get("deletionTimestamp")
        }

    def ready_pods(self) -> list[str]:
        return sorted(
            name
            for name, pod in self.pods().items()
            if any(
                c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", [])
            )
        )

    def log(self, pod: str) -> str:
        got = self.kubectl("logs", "-n", self.system_ns, pod, check=False)
        return str(got.stdout if got.returncode == 0 else f"(kubectl logs failed: {got.stderr.strip()})")

    def standing_by(self, pod: str) -> None:
        """Until ``pod``'s own process has seen the Lease held by another. Its Ready condition does not
        say so: replicas on one node share the port, so the kubelet's probe may be answered by another."""
        try:
            wait_for(lambda: "standing by" in self.log(pod), timeout_s=120, what=f"{pod} standing by")
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; Lease {self.lease()}; pods {self.release.pod_states()}\n{self.node.health()}\n"
                f"{self.all_logs()}"
            ) from exc

    def all_logs(self) -> str:
        return "\n".join(f"--- {name}\n{self.log(name)[-3000:]}" for name in self.pods())

    def wait_ready(self, kind: str, ns: str, name: str, timeout_s: float = 60) -> dict[str, Any]:
        return wait_ready(self.testbed, kind, ns, name, timeout_s=timeout_s, logs=self.all_logs)

    def ready_events(self, ns: str, name: str) -> list[str]:
        """The messages of the Ready transitions announced for ``name``, oldest first. Each transition
        is announced once, by the replica that wrote it: two reconcilers would both announce it."""
        events = self.get("events", "-n", ns, "--field-selector", f"involvedObject.name={name}")["items"]
        ready = sorted(
            (e["metadata"]["creationTimestamp"], e["message"]) for e in events if e["reason"] == "Ready"
        )
        return [message for _, message in ready]

    def stream(self, name: str) -> dict[str, Any]:
        return {
            "apiVersion": "sluicegate.io/v1alpha1",
            "kind": "DatasetStream",
            "metadata": {"name": name, "namespace": self.team_ns},
            "spec": {"dataset": {"namespace": self.data_ns, "name": "coco"}, "query": "labels.car > 0"},
        }

    def labelled_pod(self, name: str) -> dict[str, Any]:
        """A pod for the stream ``before``, on a kwok node (admission is what is tested, not running it)."""
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": self.team_ns,
                "labels": {"sluicegate.io/stream": "before"},
            },
            "spec": {"serviceAccountName": "trainer", "containers": [{"name": "main", "image": "x"}]},
        }


@pytest.fixture(scope="module")
def ha(testbed: Testbed, real_node: RealNode, image: Image, s3: S3Server) -> Iterator[HA]:
    """Two replicas on the real node, the Dataset ``coco`` and the stream ``before`` Ready, ``trainer``
    allowed to stream it."""
    suffix = uuid.uuid4().hex[:6]
    system_ns, data_ns, team_ns = f"ha-system-{suffix}", f"ha-data-{suffix}", f"ha-team-{suffix}"
    uri, _ = devcluster.sample_dataset(s3, f"ha-{suffix}", 12)
    for ns in (data_ns, team_ns):
        testbed.kubectl("create", "namespace", ns)
    release: devcluster.InCluster | None = None
    try:
        started = time.monotonic()
        release = devcluster.install_in_cluster(
            testbed,
            image,
            system_ns,
            RELEASE,
            port=free_ports(1)[0],
            rules=[{"namespaces": [data_ns], "uris": [uri], "endpoints": [s3.endpoint]}],
            values={"replicaCount": 2},
        )
        print(f"[leader] helm install to 2 replicas Ready: {time.monotonic() - started:.1f}s")
        c = HA(testbed, real_node, system_ns, data_ns, team_ns, release)
        devcluster.dataset_with_keys(testbed, data_ns, uri, s3, timeout_s=60)
        c.kubectl(
            "create", "role", "coco-stream", "-n", data_ns, "--verb=stream",
            "--resource=datasets.sluicegate.io", "--resource-name=coco",
        )  # fmt: skip
        c.kubectl("create", "serviceaccount", "trainer", "-n", team_ns)
        c.kubectl(
            "create", "rolebinding", "coco-stream-trainer", "-n", data_ns, "--role=coco-stream",
            f"--serviceaccount={team_ns}:trainer",
        )  # fmt: skip
        devcluster.apply_admitted(testbed, c.stream("before"), timeout_s=60)
        c.wait_ready("datasets", data_ns, "coco")
        c.wait_ready("datasetstreams", team_ns, "before")
        yield c
    finally:
        if release is not None:
            release.uninstall(check=False)
        for ns in (data_ns, team_ns, system_ns):
            testbed.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _admitted_with_sidecar(c: HA, name: str) -> None:
    """Create a labelled pod (the API server calls whichever replica is up): it must get its sidecar."""
    created = json.loads(
        c.kubectl("create", "-f", "-", "-o", "json", input=json.dumps(c.labelled_pod(name))).stdout
    )
    names = [s["name"] for s in created["spec"].get("initContainers", [])]
    assert SIDECAR_NAME in names, f"{name} admitted without its sidecar: {names}"


def _reconciled(log: str) -> set[str]:
    return {f"{m.group(1)} {m.group(2)}" for m in RECONCILED.finditer(log)}


def _lease_time(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def test_killing_the_leader_pauses_no_admission_and_a_standby_takes_over_reconciling(ha: HA) -> None:
    c = ha
    pods = c.pods()
    assert len(pods) == 2, list(pods)
    lease = c.lease()
    leader = lease["holderIdentity"]
    (standby,) = set(pods) - {leader}
    assert lease["leaseDurationSeconds"] == LEASE_S
    # Only the leader reconciled: the standby serves but wrote nothing.
    c.standing_by(standby)
    leader_log, standby_log = c.log(leader), c.log(standby)
    assert f"acquired the Lease {c.system_ns}/{FULLNAME} as {leader}" in leader_log
    assert {f"datasets {c.data_ns}/coco", f"datasetstreams {c.team_ns}/before"} <= _reconciled(leader_log)
    restarts = {n: p["status"]["containerStatuses"][0]["restartCount"] for n, p in pods.items()}
    assert not any(restarts.values()), restarts
    assert not _reconciled(standby_log), standby_log[-3000:]
    assert c.ready_pods() == sorted(pods), "a standby is Ready: it counts for the webhook Service"
    assert len(c.ready_events(c.team_ns, "before")) == 1
    _admitted_with_sidecar(c, "warm")

    # The leader crashes (no release), and its pod is gone for good: the Deployment replaces it.
    container = pods[leader]["status"]["containerStatuses"][0]["containerID"]
    killed, killed_wall = time.monotonic(), time.time()
    c.node.kill_container(container)
    c.kubectl("delete", "pod", leader, "-n", c.system_ns, "--grace-period=0", "--force", "--wait=false")

    # The gap: the survivor admits everything while nobody reconciles.
    c.testbed.apply(c.stream("after"))  # the validating webhook, which fails closed, answers
    c.testbed.apply(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "gap", "namespace": c.team_ns},
            "spec": {
                "completions": 2,
                "parallelism": 2,
                "completionMode": "Indexed",
                "template": {
                    "metadata": {"labels": {"sluicegate.io/stream": "before"}},
                    "spec": {
                        "serviceAccountName": "trainer",
                        "restartPolicy": "Never",
                        "containers": [{"name": "main", "image": "x"}],
                    },
                },
            },
        }
    )
    admitted = 0
    while True:
        _admitted_with_sidecar(c, f"gap-{admitted}")
        admitted += 1
        status = c.get("datasetstreams", "after", "-n", c.team_ns).get("status") or {}
        if any(x["type"] == "Ready" and x["status"] == "True" for x in status.get("conditions", [])):
            break
        assert time.monotonic() - killed < LEASE_S + 3 * RETRY_S + 30, f"no takeover:\n{c.all_logs()}"
        time.sleep(0.5)
    ready_after = time.monotonic() - killed
    lease = c.lease()
    acquired_after = _lease_time(lease["acquireTime"]) - killed_wall
    print(
        f"[leader] leader killed to the Lease taken over: {acquired_after:.1f}s; to a stream created after "
        f"the kill Ready: {ready_after:.1f}s; {admitted} labelled pods admitted with sidecars meanwhile"
    )
    assert lease["holderIdentity"] == standby, lease
    # Not before the dead leader's Lease ran out: at least a lease less a renew period after the kill.
    assert acquired_after >= LEASE_S - RENEW_S - 1, lease
    assert status["observedGeneration"] == 1

    def both_job_pods() -> list[dict[str, Any]] | None:
        found = c.get("pods", "-n", c.team_ns, "-l", "batch.kubernetes.io/job-name=gap")["items"]
        return list(found) if len(found) == 2 else None

    job_pods = wait_for(both_job_pods, timeout_s=30, what="the Job's 2 pods")
    for pod in job_pods:
        assert SIDECAR_NAME in [s["name"] for s in pod["spec"].get("initContainers", [])]

    # One reconciler at a time: the new leader reconciled "after" once and found the rest as it was.
    new_log = c.log(standby)
    assert f"acquired the Lease {c.system_ns}/{FULLNAME} as {standby} (held by {leader} before)" in new_log
    assert f"datasetstreams {c.team_ns}/after" in _reconciled(new_log)
    assert len(c.ready_events(c.team_ns, "after")) == 1, "one transition, one Event"
    # "before" may have moved on (the Job's pods gave it a world size), but no transition came twice.
    for ns, name in ((c.team_ns, "before"), (c.data_ns, "coco")):
        messages = c.ready_events(ns, name)
        assert len(set(messages)) == len(messages), (name, messages)
    for name in set(c.pods()) - {standby}:
        assert not _reconciled(c.log(name)), f"the replacement {name} stands by"

    # A clean stop hands the Lease back: the replacement takes over at its next look, not after expiry.
    replacement = wait_for(
        lambda: next((p for p in c.ready_pods() if p not in (leader, standby)), None),
        timeout_s=60,
        what="the replacement pod Ready",
    )
    c.standing_by(replacement)
    stopped = time.monotonic()
    c.kubectl("delete", "pod", standby, "-n", c.system_ns, "--wait=false")
    wait_for(
        lambda: c.lease().get("holderIdentity") == replacement,
        timeout_s=LEASE_S,
        what=f"{replacement} holding the Lease",
    )
    handed_over = time.monotonic() - stopped
    print(f"[leader] graceful delete of the leader to the Lease taken over: {handed_over:.1f}s")
    assert handed_over < RENEW_S + RETRY_S, "released, not expired"
    c.testbed.apply(c.stream("later"))
    c.wait_ready("datasetstreams", c.team_ns, "later", timeout_s=30)
    assert len(c.ready_events(c.team_ns, "later")) == 1
