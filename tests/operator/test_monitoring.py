"""The chart's monitoring: the sidecars' PodMonitor, the PrometheusRule checked and unit-tested by promtool.

The e2e half (Prometheus scraping a real run, the dashboard's queries, the starved alert firing) is
tests/e2e/test_monitoring.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from sluicegate_operator.inject import INJECTED_LABEL, METRICS_PORT_NAME, SIDECAR_NAME, STREAM_LABEL

from tests.operator.test_chart import CHART, helm, render  # noqa: F401 - helm is a fixture

pytestmark = pytest.mark.integration

MONITORING = ("monitoring.coreos.com/v1/PodMonitor", "monitoring.coreos.com/v1/PrometheusRule")
ON = ("metrics.podMonitor.enabled=true", "metrics.prometheusRule.enabled=true")
ALERT_TESTS = Path(__file__).with_name("alerts_test.yaml")
RUNBOOKS = CHART.parents[1] / "docs" / "operator.md"


@pytest.fixture(scope="module")
def promtool() -> Path:
    from tests.testbed.build import GoUnavailable, ensure_binaries

    try:
        return ensure_binaries()["promtool"]
    except GoUnavailable as error:
        pytest.skip(f"promtool unavailable: {error}")


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def rule_groups(helm: Path, *sets: str) -> dict[str, Any]:  # noqa: F811
    spec: dict[str, Any] = one(
        render(helm, *ON, *sets, set_json=True, api_versions=MONITORING), "PrometheusRule"
    )["spec"]
    return spec


def alerts(groups: dict[str, Any]) -> list[str]:
    return [r["alert"] for g in groups["groups"] for r in g["rules"] if "alert" in r]


def test_monitors_and_rules_need_the_monitoring_api(helm: Path) -> None:  # noqa: F811
    without = render(helm, *ON)
    assert {"PodMonitor", "PrometheusRule"}.isdisjoint(d["kind"] for d in without), (
        "a cluster without the Prometheus Operator's CRDs would refuse the install"
    )
    off = render(helm, api_versions=MONITORING)
    assert {"PodMonitor", "PrometheusRule"}.isdisjoint(d["kind"] for d in off)
    on = render(helm, *ON, api_versions=MONITORING)
    assert {"PodMonitor", "PrometheusRule"} <= {d["kind"] for d in on}


def test_pod_monitor_scrapes_injected_sidecars_with_the_scrape_token(helm: Path) -> None:  # noqa: F811
    docs = render(helm, *ON, api_versions=MONITORING)
    monitor = one(docs, "PodMonitor")["spec"]
    assert monitor["namespaceSelector"] == {"any": True}
    assert monitor["selector"] == {"matchLabels": {INJECTED_LABEL: "true"}}
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["port"] == METRICS_PORT_NAME, "the port name the webhook gives the sidecar"
    secret_ref = endpoint["authorization"]["credentials"]
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    assert secret_ref["key"] in secrets[secret_ref["name"]]["data"]
    targets = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
    label = STREAM_LABEL.replace(".", "_").replace("/", "_")
    assert targets["stream"] == [f"__meta_kubernetes_pod_label_{label}"]
    assert set(targets) == {"stream", "job_name", "rank", "source"}
    # A mix's sidecars: the source from the container's name, as the webhook names it.
    (source,) = [r for r in endpoint["relabelings"] if r["targetLabel"] == "source"]
    assert source["sourceLabels"] == ["__meta_kubernetes_pod_container_name"]
    named = re.fullmatch(source["regex"], "sluicegate-sidecar-web")
    assert named is not None
    assert named.group(1) == "web"
    assert re.fullmatch(source["regex"], SIDECAR_NAME) is None, "a one-Dataset stream's sidecar: no source"
    # The operator reads the same Secret (a file) to give sidecars its digest.
    (deployment,) = [
        d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "sg-sluicegate"
    ]
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["scrape-token"]["secret"]["secretName"] == secret_ref["name"]
    assert "--scrape-token-file=/var/run/sluicegate/scrape/token" in pod["containers"][0]["args"]


def test_rules_pass_promtool_and_each_alert_its_unit_tests(
    helm: Path,  # noqa: F811
    promtool: Path,
    tmp_path: Path,
) -> None:
    groups = rule_groups(helm)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(groups))
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    check = subprocess.run(
        [promtool, "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run(
        [promtool, "test", "rules", ALERT_TESTS.name], cwd=tmp_path, capture_output=True, text=True
    )
    assert test.returncode == 0, test.stdout + test.stderr
    # Every alert is made to fire by some test (and, for all but one-shot ones, shown quiet too).
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check_ in case.get("alert_rule_test", []):
            (fired if check_["exp_alerts"] else quiet).add(check_["alertname"])
    assert fired == set(alerts(groups))
    assert quiet == set(alerts(groups))


def test_thresholds_come_from_the_values(helm: Path) -> None:  # noqa: F811
    groups = rule_groups(
        helm, "metrics.prometheusRule.starved.ratio=0.8", 'metrics.prometheusRule.starved.for="3m"'
    )
    (starved,) = [
        r for g in groups["groups"] for r in g["rules"] if r.get("alert") == "SluicegateTrainingStarved"
    ]
    assert starved["expr"].endswith("> 0.8")
    assert starved["for"] == "3m"


def test_every_alert_has_a_runbook(helm: Path) -> None:  # noqa: F811
    text = RUNBOOKS.read_text()
    headings = set(re.findall(r"^#{3,4} (Sluicegate\w+)$", text, re.M))
    for group in rule_groups(helm)["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["alert"] in headings, f"docs/operator.md has no runbook for {rule['alert']}"
                anchor = rule["annotations"]["runbook_url"].rpartition("#")[2]
                assert anchor == rule["alert"].lower()
