"""The Helm chart renders what the operator expects: its CRDs and webhook, restricted pods, closed values."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from sluicegate_operator import crdgen, webhook
from sluicegate_operator.__main__ import parse_args
from sluicegate_operator.settings import DEFAULT_IMAGE

pytestmark = pytest.mark.integration

CHART = Path(__file__).resolve().parents[2] / "charts" / "sluicegate"


@pytest.fixture(scope="module")
def helm() -> Path:
    from tests.testbed.build import GoUnavailable, ensure_binaries

    try:
        return ensure_binaries()["helm"]
    except GoUnavailable as error:
        pytest.skip(f"helm unavailable: {error}")


def render(
    helm: Path, *sets: str, set_json: bool = False, api_versions: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    args = [str(helm), "template", "sg", str(CHART), "-n", "sluicegate-system", "--kube-version", "1.36.0"]
    args += [f"--api-versions={v}" for v in api_versions]
    for value in sets:
        args += ["--set-json" if set_json else "--set", value]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def test_lint_strict(helm: Path) -> None:
    result = subprocess.run([str(helm), "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_crds_are_the_generated_ones_and_kept_on_uninstall(helm: Path) -> None:
    crds = {d["metadata"]["name"]: d for d in render(helm) if d["kind"] == "CustomResourceDefinition"}
    for kind in crdgen.KINDS:
        generated = yaml.safe_load(crdgen.render(kind))
        rendered = crds[generated["metadata"]["name"]]
        assert rendered["spec"] == generated["spec"]
        assert rendered["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert "CustomResourceDefinition" not in kinds(render(helm, "crds.enabled=false"))
    kept = render(helm, "crds.keep=false")
    assert all("annotations" not in d["metadata"] for d in kept if d["kind"] == "CustomResourceDefinition")


def test_webhook_matches_the_operators_definition(helm: Path) -> None:
    (rendered,) = [d for d in render(helm) if d["kind"] == "MutatingWebhookConfiguration"]
    expected = webhook.configuration("sg-sluicegate", {})
    (hook,) = rendered["webhooks"]
    (want,) = expected["webhooks"]
    assert {k: v for k, v in hook.items() if k != "clientConfig"} == {
        k: v for k, v in want.items() if k != "clientConfig"
    }
    assert hook["clientConfig"]["service"] == {
        "name": "sg-sluicegate",
        "namespace": "sluicegate-system",
        "path": webhook.PATH,
        "port": 443,
    }
    assert rendered["metadata"]["name"] == "sg-sluicegate"
    (validating,) = [d for d in render(helm) if d["kind"] == "ValidatingWebhookConfiguration"]
    (hook,) = validating["webhooks"]
    (want,) = webhook.validating_configuration("sg-sluicegate", {})["webhooks"]
    assert {k: v for k, v in hook.items() if k != "clientConfig"} == {
        k: v for k, v in want.items() if k != "clientConfig"
    }
    assert hook["clientConfig"]["service"]["path"] == webhook.VALIDATE_PATH
    (dev,) = [
        d
        for d in render(helm, "webhook.url=https://127.0.0.1:1/mutate")
        if d["kind"] == "ValidatingWebhookConfiguration"
    ]
    assert dev["webhooks"][0]["clientConfig"] == {"url": "https://127.0.0.1:1/validate"}


def test_every_replica_serves_and_they_elect_one_reconciler(helm: Path) -> None:
    docs = render(helm)
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    settings = parse_args(container["args"])
    assert settings.leader_lease == "sg-sluicegate"
    assert settings.identity == "$(POD_ID)", "the pod's name, expanded by the kubelet"
    assert "POD_ID" in {e["name"] for e in container["env"]}
    assert not settings.reuse_port
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    spread = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert spread[0]["podAffinityTerm"]["labelSelector"]["matchLabels"].items() <= labels.items()
    (pdb,) = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    (service,) = [d for d in docs if d["kind"] == "Service"]
    assert service["spec"]["selector"].items() <= labels.items(), "leader and standbys serve alike"
    role = next(d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == "sg-sluicegate")
    leases = [r for r in role["rules"] if r["apiGroups"] == ["coordination.k8s.io"]]
    assert {v: r.get("resourceNames") for r in leases for v in r["verbs"]} == {
        "create": None,
        "get": ["sg-sluicegate"],
        "update": ["sg-sluicegate"],
    }, "its own Lease, in its own namespace only"
    cluster_roles = [d for d in docs if d["kind"] == "ClusterRole"]
    assert "coordination.k8s.io" not in json.dumps([r["rules"] for r in cluster_roles])
    # On the node's network the replicas share the port: no hostPort for the scheduler to keep apart.
    (on_host,) = [d for d in render(helm, "hostNetwork=true") if d["kind"] == "Deployment"]
    (container,) = on_host["spec"]["template"]["spec"]["containers"]
    assert "ports" not in container
    assert parse_args(container["args"]).reuse_port
    assert container["readinessProbe"]["httpGet"]["port"] == 8443
    one = render(helm, "replicaCount=1")
    assert "PodDisruptionBudget" not in kinds(one), "a budget of 1 of 1 would block every drain"
    dev = render(helm, "replicaCount=0")
    assert [d["spec"]["replicas"] for d in dev if d["kind"] == "Deployment"] == [0]


def test_source_policy_and_credential_access_follow_the_rules(helm: Path) -> None:
    docs = render(helm)
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert cm["metadata"]["name"] == "sg-sluicegate-sources"
    assert json.loads(cm["data"]["sources.json"]) == {"rules": []}, "no rule: every source refused"
    assert not [
        d for d in docs if d["metadata"]["name"] == "sg-sluicegate-credentials" and "Binding" in d["kind"]
    ]
    rules = [
        {"namespaces": ["team-a", "team-b"], "uris": ["s3://bucket-a"]},
        {"namespaces": ["team-a"], "uris": ["s3://bucket-b"]},
    ]
    docs = render(helm, f"sources.rules={json.dumps(rules)}", set_json=True)
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert json.loads(cm["data"]["sources.json"]) == {"rules": rules}
    bindings = [
        d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["name"] == "sg-sluicegate-credentials"
    ]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    wide = render(helm, 'sources.rules=[{"namespaces": ["*"], "uris": ["s3://bucket-a"]}]', set_json=True)
    assert [d["kind"] for d in wide if d["metadata"]["name"] == "sg-sluicegate-credentials"] == [
        "ClusterRole",
        "ClusterRoleBinding",
    ]
    with pytest.raises(subprocess.CalledProcessError):
        render(helm, 'sources.rules=[{"namespaces": ["a"], "uris": ["http://x"]}]', set_json=True)


def test_operator_pod_is_restricted_and_wired(helm: Path) -> None:
    (deployment,) = [
        d for d in render(helm) if d["kind"] == "Deployment" and d["metadata"]["name"] == "sg-sluicegate"
    ]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    args = dict(a[2:].split("=", 1) for a in container["args"])
    assert args["webhook-configuration"] == "sg-sluicegate"
    assert args["tls-secret"] == "sg-sluicegate-tls"
    # The chart's appVersion is the package version (pyproject.toml states it; helm needs a literal).
    assert args["sidecar-image"] == DEFAULT_IMAGE
    rules = next(
        d for d in render(helm) if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "sg-sluicegate"
    )
    verbs = {(r["apiGroups"][0], res): set(r["verbs"]) for r in rules["rules"] for res in r["resources"]}
    assert ("", "secrets") not in verbs, "Secrets only where a source rule names the namespace"
    assert args["sources-configmap"] == "sg-sluicegate-sources"
    assert verbs[("authentication.k8s.io", "tokenreviews")] == {"create"}
    assert verbs[("authorization.k8s.io", "subjectaccessreviews")] == {"create"}


def test_optional_objects_are_gated(helm: Path) -> None:
    default = render(helm)
    assert "ServiceMonitor" not in kinds(default)
    assert [d["metadata"]["name"] for d in default if d["kind"] == "ConfigMap"] == ["sg-sluicegate-sources"]
    on = render(helm, "metrics.serviceMonitor.enabled=true", "grafana.dashboard.enabled=true")
    (dashboard,) = [
        d for d in on if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-dashboard")
    ]
    assert '"title": "sluicegate"' in dashboard["data"]["sluicegate.json"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    (monitor,) = [d for d in on if d["kind"] == "ServiceMonitor"]
    tls = monitor["spec"]["endpoints"][0]["tlsConfig"]
    assert tls["ca"] == {"configMap": {"name": "sg-sluicegate-tls-ca", "key": "ca.crt"}}, (
        "never the key's Secret"
    )
    assert monitor["spec"]["endpoints"][0]["bearerTokenFile"].endswith("/serviceaccount/token")


def test_every_flag_the_chart_passes_is_one_the_operator_takes(helm: Path) -> None:
    for docs in (render(helm), render(helm, "hostNetwork=true")):
        for d in docs:
            if d["kind"] == "Deployment":
                container = d["spec"]["template"]["spec"]["containers"][0]
                settings = parse_args(container["args"])
                assert settings.listen_port == 8443
                env = {e["name"] for e in container["env"]}
                assert "SLUICEGATE_NAMESPACE" in env, "the operator learns its namespace from the pod"


def test_admission_authentication_binds_only_the_named_caller(helm: Path) -> None:
    def args(docs: list[dict[str, Any]]) -> list[str]:
        (deployment,) = [
            d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "sg-sluicegate"
        ]
        return list(deployment["spec"]["template"]["spec"]["containers"][0]["args"])

    default = render(helm)
    assert "--admission-auth=false" in args(default)
    assert not [d for d in default if d["metadata"]["name"].endswith("-admission-caller")]
    caller = {"enabled": True, "subjects": [{"kind": "User", "name": "apiserver-webhook"}]}
    on = render(helm, f"webhook.authentication={json.dumps(caller)}", set_json=True)
    assert "--admission-auth=true" in args(on)
    (role,) = [
        d for d in on if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("-admission-caller")
    ]
    assert role["rules"] == [{"nonResourceURLs": ["/mutate", "/validate"], "verbs": ["post"]}]
    (binding,) = [
        d
        for d in on
        if d["kind"] == "ClusterRoleBinding" and d["metadata"]["name"] == role["metadata"]["name"]
    ]
    assert binding["subjects"] == [
        {"kind": "User", "name": "apiserver-webhook", "apiGroup": "rbac.authorization.k8s.io"}
    ]
    bad = {"enabled": True, "subjects": [{"kind": "Robot", "name": "x"}]}
    with pytest.raises(subprocess.CalledProcessError) as info:
        render(helm, f"webhook.authentication={json.dumps(bad)}", set_json=True)
    assert "values don't meet the specifications of the schema" in info.value.stderr


@pytest.mark.parametrize(
    "value",
    ["bogus=1", "webhook.failurePolicy=Sometimes", "replicaCount=11", "image.foo=x", "webhook.replicas=2"],
)
def test_values_schema_is_closed(helm: Path, value: str) -> None:
    with pytest.raises(subprocess.CalledProcessError) as info:
        render(helm, value)
    assert "values don't meet the specifications of the schema" in info.value.stderr


def test_every_value_is_documented_with_an_example() -> None:
    """Each leaf value has a comment with an example right above it or above an enclosing key."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    documented: list[tuple[int, bool]] = []  # (indent, has an example) of the enclosing keys
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w.]*):(.*)$", line)
        if not match:
            continue
        indent = len(match.group(1))
        while documented and documented[-1][0] >= indent:
            documented.pop()
        previous = lines[number - 1].strip()
        own = previous.startswith("#") and "e.g." in previous
        inherited = any(doc for _, doc in documented)
        if match.group(3).strip():
            assert own or inherited, f"values.yaml:{number + 1}: {line.strip()!r} has no documented example"
        documented.append((indent, own))
