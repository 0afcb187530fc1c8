"""A real Prometheus for the e2e tests: built from Go modules with the testbed, scraping the testbed's pods.

There is no Prometheus Operator on the testbed, so :func:`pod_monitor_job` turns the chart's rendered
PodMonitor into the scrape job the Prometheus Operator would generate from it (Kubernetes pod discovery, the
selector and port kept, namespace/pod/container labels, then the PodMonitor's own relabelings). The alerting
rules are the chart's PrometheusRule's groups, as rendered.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from tests.testbed import stop_process_group, wait_for
from tests.testbed.cluster import free_ports

_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


def _snake(key: str) -> str:
    return _CAMEL.sub("_", key).lower()


def _meta_label(prefix: str, key: str) -> str:
    return prefix + re.sub(r"[^a-zA-Z0-9_]", "_", key)


def pod_monitor_job(
    monitor: Mapping[str, Any], kubeconfig: Path, token_file: Path, scrape_interval: str
) -> dict[str, Any]:
    """The scrape job for the first endpoint of ``monitor`` (a PodMonitor), as the Prometheus Operator
    generates it."""
    spec = monitor["spec"]
    (endpoint,) = spec["podMetricsEndpoints"]
    keep = [
        {
            "source_labels": [_meta_label("__meta_kubernetes_pod_label_", key)],
            "regex": value,
            "action": "keep",
        }
        for key, value in spec["selector"]["matchLabels"].items()
    ]
    keep.append(
        {
            "source_labels": ["__meta_kubernetes_pod_container_port_name"],
            "regex": endpoint["port"],
            "action": "keep",
        }
    )
    standard = [
        {"source_labels": [f"__meta_kubernetes_{source}"], "target_label": target}
        for source, target in (
            ("namespace", "namespace"),
            ("pod_name", "pod"),
            ("pod_container_name", "container"),
        )
    ]
    own = [{_snake(k): v for k, v in r.items()} for r in endpoint.get("relabelings", [])]
    assert endpoint["authorization"]["type"] == "Bearer"
    return {
        "job_name": f"podMonitor/{monitor['metadata']['namespace']}/{monitor['metadata']['name']}/0",
        "kubernetes_sd_configs": [{"role": "pod", "kubeconfig_file": str(kubeconfig)}],
        "scrape_interval": scrape_interval,
        "metrics_path": endpoint["path"],
        "authorization": {"type": "Bearer", "credentials_file": str(token_file)},
        "relabel_configs": keep + standard + own,
    }


class Prometheus:
    """``prometheus`` on a free loopback port with ``scrape_configs`` and ``rule_groups``."""

    def __init__(
        self,
        binary: Path,
        workdir: Path,
        scrape_configs: Sequence[Mapping[str, Any]],
        rule_groups: Mapping[str, Any],
        interval: str = "2s",
    ) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "rules.json").write_text(json.dumps(rule_groups))
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(workdir / "rules.json")],
            "scrape_configs": list(scrape_configs),
        }
        # Prometheus reads YAML, and JSON is YAML.
        (workdir / "prometheus.yml").write_text(json.dumps(config, indent=2))
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        log = (self.workdir / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                str(self.binary),
                f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as answer:
                    return bool(answer.status == 200)
            except OSError:
                return False

        wait_for(ready, timeout_s=60, what="prometheus ready")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            stop_process_group(self.process)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join((self.workdir / "prometheus.log").read_text(errors="replace").splitlines()[-lines:])

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as answer:
            body = json.loads(answer.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now: [{"metric": labels, "value": [t, v]}, ...]."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        active: list[dict[str, Any]] = self.api("targets", state="active")["activeTargets"]
        return active

    def alerts(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return found
