"""Is training starved? Answered on real parts: a real Prometheus scrapes the in-cluster operator and the
sidecars of real pods (through the chart's PodMonitor, as the Prometheus Operator would configure it), the
chart's rules fire the starved alert for a trainer behind a slow store and not for a healthy one, and every
query of the chart's Grafana dashboard returns the series its panel expects.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml  # type: ignore[import-untyped]
from sluicegate.core.broker_protocol import SidecarEnv
from sluicegate.core.wait import REPORT_EVERY_S
from sluicegate_operator.inject import METRICS_PORT_NAME, SIDECAR_NAME

from tests.e2e.conftest import wait_ready
from tests.e2e.prometheus import Prometheus, pod_monitor_job
from tests.operator import devcluster
from tests.s3server import S3Server
from tests.sidecar.helpers import FaultProxy
from tests.testbed import Testbed, wait_for
from tests.testbed.cluster import free_ports
from tests.testbed.image import Image
from tests.testbed.node import REAL_NODE_PLACEMENT, RealNode

pytestmark = pytest.mark.e2e

RELEASE = "mon"
FULLNAME = f"{RELEASE}-sluicegate"
DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "sluicegate" / "files" / "dashboard.json"
RUN_S = 75  # how long each trainer reads: long enough for the rates, the window and the alert's `for`
SLOW_S = 0.5  # every blob GET of the slow store takes this long
# Rules as the chart renders them, with windows short enough for a test (the defaults are minutes).
RULE_VALUES = {
    "metrics": {
        "podMonitor": {"enabled": True, "interval": "2s"},
        "prometheusRule": {
            "enabled": True,
            "rateWindow": "20s",
            "starved": {"ratio": 0.5, "for": "10s"},
            "streamNotReady": {"for": "10s"},
        },
    }
}
MONITORING_APIS = ("monitoring.coreos.com/v1/PodMonitor", "monitoring.coreos.com/v1/PrometheusRule")

# The trainer: read the pod's shard epoch after epoch for RUN_S seconds, STEP_S of "training" per item.
TRAINER = """
import json, os, time
import sluicegate
ds = sluicegate.connect(timeout=120)
end, step, n = time.monotonic() + float(os.environ["RUN_S"]), float(os.environ["STEP_S"]), 0
while time.monotonic() < end:
    for item in ds:
        n += 1
        time.sleep(step)
        if time.monotonic() >= end:
            break
wait = sluicegate.data_wait()
print("WAIT " + json.dumps({"items": n, "ratio": wait.ratio, "waited_s": wait.waited_s}), flush=True)
"""


@dataclass
class Monitored:
    testbed: Testbed
    ns: str
    system_ns: str
    prometheus: Prometheus
    pods: dict[str, str]  # stream -> its pod's name


def _render(testbed: Testbed, values: Path, overlay: Path) -> list[dict[str, Any]]:
    args = ["template", RELEASE, str(devcluster.CHART), "-n", "x", "--kube-version", "1.36.0"]
    args += ["-f", str(values), "-f", str(overlay)]
    args += [f"--api-versions={api}" for api in MONITORING_APIS]
    return [d for d in yaml.safe_load_all(testbed.helm(*args).stdout) if d]


def _job(name: str, stream: str, image: Image, namespace: str, step_s: float) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "completions": 1,
            "completionMode": "Indexed",
            "backoffLimit": 0,
            "template": {
                "metadata": {"labels": {"sluicegate.io/stream": stream}},
                "spec": {
                    "serviceAccountName": "trainer",
                    "restartPolicy": "Never",
                    "hostNetwork": True,
                    **REAL_NODE_PLACEMENT,
                    "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [
                        {
                            "name": "trainer",
                            "image": image.name,
                            "imagePullPolicy": "Never",
                            "command": ["python", "-c", TRAINER],
                            "env": [
                                {"name": "RUN_S", "value": str(RUN_S)},
                                {"name": "STEP_S", "value": str(step_s)},
                            ],
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


def _stream(name: str, namespace: str, dataset: str, metrics_port: int, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "sluicegate.io/v1alpha1",
        "kind": "DatasetStream",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"dataset": {"name": dataset}, "sidecar": {"metricsPort": metrics_port}, **spec},
    }


@pytest.fixture(scope="module")
def monitored(
    testbed: Testbed,
    real_node: RealNode,
    image: Image,
    s3: S3Server,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Monitored]:
    work = tmp_path_factory.mktemp("monitoring")
    suffix = uuid.uuid4().hex[:6]
    ns, system_ns = f"train-{suffix}", f"sg-mon-{suffix}"
    fast_uri, _ = devcluster.sample_dataset(s3, f"mon-fast-{suffix}", 40)
    slow_uri, _ = devcluster.sample_dataset(s3, f"mon-slow-{suffix}", 40)
    testbed.kubectl("create", "namespace", ns)
    release: devcluster.InCluster | None = None
    with FaultProxy(s3.endpoint, ["slow"], slow_s=SLOW_S) as proxy:
        rules = [
            {"namespaces": [ns], "uris": [fast_uri], "endpoints": [s3.endpoint]},
            {"namespaces": [ns], "uris": [slow_uri], "endpoints": [proxy.endpoint]},
        ]
        try:
            port = free_ports(1)[0]
            release = devcluster.install_in_cluster(
                testbed, image, system_ns, RELEASE, port=port, rules=rules, values=RULE_VALUES
            )
            overlay = work / "overlay.json"
            overlay.write_text(json.dumps(RULE_VALUES))
            docs = _render(testbed, release.values, overlay)
            (monitor,) = [d for d in docs if d["kind"] == "PodMonitor"]
            (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
            scrape_token = work / "scrape.token"
            secret = json.loads(
                testbed.kubectl(
                    "get", "secret", f"{FULLNAME}-scrape-token", "-n", system_ns, "-o", "json"
                ).stdout
            )
            scrape_token.write_bytes(base64.b64decode(secret["data"]["token"]))
            operator_token = work / "operator.token"
            operator_token.write_text(_metrics_reader_token(testbed, system_ns))
            ca = work / "ca.crt"
            ca.write_text(
                testbed.kubectl(
                    "get",
                    "configmap",
                    f"{FULLNAME}-tls-ca",
                    "-n",
                    system_ns,
                    "-o",
                    "jsonpath={.data.ca\\.crt}",
                ).stdout
            )
            operator_job = {
                "job_name": "sluicegate-operator",
                "kubernetes_sd_configs": [
                    {
                        "role": "pod",
                        "kubeconfig_file": str(testbed.kubeconfig),
                        "namespaces": {"names": [system_ns]},
                    }
                ],
                "scheme": "https",
                "tls_config": {"ca_file": str(ca), "server_name": f"{FULLNAME}.{system_ns}.svc"},
                "authorization": {"type": "Bearer", "credentials_file": str(operator_token)},
                "relabel_configs": [
                    # hostNetwork pods on one node share the port and declare none (see the chart).
                    {
                        "source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"],
                        "regex": RELEASE,
                        "action": "keep",
                    },
                    {
                        "source_labels": ["__meta_kubernetes_pod_ip"],
                        "target_label": "__address__",
                        "replacement": f"$1:{port}",
                    },
                    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                ],
            }
            sidecars_job = pod_monitor_job(monitor, testbed.kubeconfig, scrape_token, "2s")
            prometheus = Prometheus(
                testbed.binaries["prometheus"],
                work / "prometheus",
                [operator_job, sidecars_job],
                rule["spec"],
            )
            with prometheus:
                pods = _run_scenario(testbed, ns, image, fast_uri, slow_uri, s3, proxy.endpoint)
                yield Monitored(testbed, ns, system_ns, prometheus, pods)
        finally:
            if release is not None:
                release.uninstall(check=False)
            for namespace in (ns, system_ns):
                testbed.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def _metrics_reader_token(testbed: Testbed, ns: str) -> str:
    """A token of a ServiceAccount allowed `get /metrics`, as Prometheus' own ClusterRole grants."""
    testbed.kubectl("create", "serviceaccount", "prometheus", "-n", ns)
    name = f"{ns}-metrics-reader"
    testbed.kubectl("create", "clusterrole", name, "--verb=get", "--non-resource-url=/metrics")
    testbed.kubectl(
        "create", "clusterrolebinding", name, f"--clusterrole={name}", f"--serviceaccount={ns}:prometheus"
    )
    return testbed.kubectl("create", "token", "prometheus", "-n", ns, "--duration=2h").stdout.strip()


def _run_scenario(
    testbed: Testbed, ns: str, image: Image, fast_uri: str, slow_uri: str, s3: S3Server, proxy: str
) -> dict[str, str]:
    """Two trainers, one per stream: `healthy` reads a plain store and trains 50 ms per item; `starved`
    reads through a proxy that delays every blob by SLOW_S, with no cache, and trains at once. A third
    stream names a Dataset that does not exist, so it stays not Ready."""
    devcluster.dataset_with_keys(testbed, ns, fast_uri, s3, "fast", timeout_s=60)
    devcluster.dataset_with_keys(testbed, ns, slow_uri, s3, "slow", timeout_s=60, endpoint=proxy)
    testbed.kubectl("create", "serviceaccount", "trainer", "-n", ns)
    testbed.kubectl(
        "create", "role", "stream", "-n", ns, "--verb=stream", "--resource=datasets.sluicegate.io"
    )
    testbed.kubectl(
        "create", "rolebinding", "stream", "-n", ns, "--role=stream", f"--serviceaccount={ns}:trainer"
    )
    healthy_port, starved_port = free_ports(2)
    for stream in (
        _stream("healthy", ns, "fast", healthy_port),
        _stream("starved", ns, "slow", starved_port, cache={"memory": "0"}),
        _stream("orphan", ns, "missing", 0),
    ):
        devcluster.apply_admitted(testbed, stream, timeout_s=60)
    for kind, name in (("datasets", "fast"), ("datasets", "slow"), ("datasetstreams", "healthy")):
        wait_ready(testbed, kind, ns, name, timeout_s=60, logs=str)
    wait_ready(testbed, "datasetstreams", ns, "starved", timeout_s=60, logs=str)
    testbed.kubectl("apply", "-f", "-", input=json.dumps(_job("healthy", "healthy", image, ns, 0.05)))
    testbed.kubectl("apply", "-f", "-", input=json.dumps(_job("starved", "starved", image, ns, 0.0)))
    pods: dict[str, str] = {}

    def running() -> bool:
        for job in ("healthy", "starved"):
            found = json.loads(
                testbed.kubectl(
                    "get", "pods", "-n", ns, "-l", f"batch.kubernetes.io/job-name={job}", "-o", "json"
                ).stdout
            )["items"]
            if found and found[0]["status"].get("phase") == "Running":
                pods[job] = found[0]["metadata"]["name"]
        return len(pods) == 2

    wait_for(running, timeout_s=120, what="both trainers running")
    return pods


def _firing(m: Monitored, alert: str) -> list[dict[str, Any]]:
    return [a for a in m.prometheus.alerts() if a["labels"]["alertname"] == alert and a["state"] == "firing"]


def test_prometheus_scrapes_the_operator_and_each_sidecar_with_its_labels(monitored: Monitored) -> None:
    m = monitored

    def all_up() -> bool:
        up = {(t["labels"]["job"], t["labels"].get("pod")): t["health"] for t in m.prometheus.targets()}
        sidecars = [
            pod for (job, pod), health in up.items() if job.startswith("podMonitor/") and health == "up"
        ]
        operator = [
            pod for (job, pod), health in up.items() if job == "sluicegate-operator" and health == "up"
        ]
        return set(m.pods.values()) <= set(sidecars) and bool(operator)

    try:
        wait_for(all_up, timeout_s=60, what="the operator and both sidecars scraped")
    except AssertionError as exc:
        seen = [(t["labels"], t["health"], t.get("lastError")) for t in m.prometheus.targets()]
        raise AssertionError(f"{exc}; targets: {seen}; prometheus: {m.prometheus.log_tail()}") from None
    (series,) = m.prometheus.query(f'sluicegate_trainer_data_wait_seconds_total{{pod="{m.pods["starved"]}"}}')
    labels = series["metric"]
    assert labels["namespace"] == m.ns
    assert labels["stream"] == "starved"
    assert labels["job_name"] == "starved"
    assert labels["rank"] == "0"
    assert m.prometheus.query('sluicegate_admission_total{result="injected"}'), "the operator is scraped"


def test_a_tenant_cannot_scrape_a_sidecar(monitored: Monitored) -> None:
    """Another tenant's pod reaches the sidecar's metrics port; what it can learn is the digest in the pod's
    environment (its owner can read that), never the token."""
    m = monitored
    pod = json.loads(m.testbed.kubectl("get", "pod", m.pods["starved"], "-n", m.ns, "-o", "json").stdout)
    (sidecar,) = [c for c in pod["spec"]["initContainers"] if c["name"] == SIDECAR_NAME]
    env = {e["name"]: e.get("value", "") for e in sidecar["env"]}
    digest = env[SidecarEnv.METRICS_TOKEN_SHA256]
    (port,) = [p["containerPort"] for p in sidecar["ports"] if p["name"] == METRICS_PORT_NAME]
    url = f"http://{pod['status']['podIP']}:{port}/metrics"
    for headers in ({}, {"Authorization": f"Bearer {digest}"}, {"Authorization": "Bearer guess"}):
        answer = httpx.get(url, headers=headers, trust_env=False)
        assert answer.status_code == 401, headers
        assert "sluicegate_shard_items" not in answer.text
    for path in ("/v1/info", "/v1/items/0"):
        assert httpx.get(url.replace("/metrics", path), trust_env=False).status_code in (401, 404)


def test_starved_training_fires_the_alert_and_healthy_training_does_not(monitored: Monitored) -> None:
    m = monitored

    def starved_fires() -> list[dict[str, Any]] | None:
        return _firing(m, "SluicegateTrainingStarved") or None

    (alert,) = wait_for(starved_fires, timeout_s=RUN_S, what="SluicegateTrainingStarved firing")
    assert alert["labels"]["pod"] == m.pods["starved"]
    assert alert["labels"]["stream"] == "starved"
    assert "waits for data" in alert["annotations"]["summary"]
    ratios = {
        s["metric"]["stream"]: float(s["value"][1])
        for s in m.prometheus.query(f'sluicegate:trainer_data_wait:ratio{{namespace="{m.ns}"}}')
    }
    assert ratios["starved"] > 0.5
    assert ratios["healthy"] < 0.2, ratios
    every = [a for a in m.prometheus.alerts() if a["labels"]["alertname"] == "SluicegateTrainingStarved"]
    assert all(a["labels"]["pod"] != m.pods["healthy"] for a in every), every
    (not_ready,) = wait_for(
        lambda: _firing(m, "SluicegateStreamNotReady") or None, timeout_s=60, what="SluicegateStreamNotReady"
    )
    assert (not_ready["labels"]["stream_namespace"], not_ready["labels"]["stream"]) == (m.ns, "orphan")


def _dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, expr with the variables set to All, legend) of every dashboard target."""
    board = json.loads(DASHBOARD.read_text())
    found = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "20s")
            expr = re.sub(r"\$(namespace|stream|pod)\b", ".*", expr)
            found.append((panel["title"], expr, target.get("legendFormat", "")))
    return found


def test_every_dashboard_query_returns_the_series_its_panel_shows(monitored: Monitored) -> None:
    m = monitored
    wait_for(
        lambda: _firing(m, "SluicegateTrainingStarved") or None, timeout_s=RUN_S, what="a starved trainer"
    )
    results = {}
    for title, expr, legend in _dashboard_queries():
        series = m.prometheus.query(expr)
        assert series, f"{title!r}: {expr} returned nothing"
        wanted = set(re.findall(r"\{\{(\w+)\}\}", legend))
        for s in series:
            assert wanted <= set(s["metric"]), f"{title!r}: {s['metric']} lacks {wanted} for its legend"
        results[title] = series
    pods = {s["metric"]["pod"] for s in results["Data-wait ratio by pod"]}
    assert set(m.pods.values()) <= pods
    (starved_count,) = results["Starved trainers (waiting > 50%)"]
    assert float(starved_count["value"][1]) >= 1
    not_ready = {s["metric"]["stream"] for s in results["Streams not Ready"]}
    assert not_ready == {"orphan"}
    print("[monitoring] dashboard queries:")
    for title, series in results.items():
        print(f"  {title}: {len(series)} series, e.g. {series[0]['metric']}")


def test_the_trainers_own_reading_matches_what_prometheus_saw(monitored: Monitored) -> None:
    m = monitored

    def finished() -> dict[str, dict[str, Any]] | None:
        out = {}
        for stream, pod in m.pods.items():
            logs = m.testbed.kubectl("logs", "-n", m.ns, pod, "-c", "trainer", check=False).stdout
            line = next((x for x in logs.splitlines() if x.startswith("WAIT ")), None)
            if line is None:
                return None
            out[stream] = json.loads(line.removeprefix("WAIT "))
        return out

    seen = wait_for(finished, timeout_s=RUN_S + 60, what="trainers done")
    assert seen["starved"]["ratio"] > 0.8, seen
    assert seen["healthy"]["ratio"] < 0.2, seen
    exported = {
        s["metric"]["stream"]: float(s["value"][1])
        for s in m.prometheus.query(
            f'max_over_time(sluicegate_trainer_data_wait_seconds_total{{namespace="{m.ns}"}}[5m])'
        )
    }
    # The SDK reports at most once a second and Prometheus scrapes every 2 s: the last sample may miss up to
    # a report's and a scrape's worth of the trainer's waiting, never more, and never exceeds it.
    lag_s = REPORT_EVERY_S + 2.0 + 1.0
    assert seen["starved"]["waited_s"] - lag_s <= exported["starved"] <= seen["starved"]["waited_s"] + 0.01
