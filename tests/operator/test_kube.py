"""Kube.connect: the client configuration is the same in a pod and with a kubeconfig."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubernetes.config import incluster_config
from sluicegate_operator.kube import Kube


def _pool_size(kube: Kube) -> int:
    return int(kube._api.configuration.connection_pool_maxsize)


def test_in_cluster_connection_gets_the_large_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a pod sees: the service host in the environment, the ServiceAccount token and CA as files."""
    (tmp_path / "token").write_text("a-token")
    (tmp_path / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(tmp_path / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(tmp_path / "ca.crt"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    kube = Kube.connect()
    assert kube._api.configuration.host == "https://10.96.0.1:443"
    # Webhook and broker calls run concurrently; urllib3's default of 4 would serialise them.
    assert _pool_size(kube) == 32


def test_kubeconfig_connection_gets_the_large_pool(tmp_path: Path) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))
    assert _pool_size(Kube.connect(str(path))) == 32
