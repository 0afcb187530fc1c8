"""Smoke tests proving the testbed behaves like a real cluster in the ways sluicegate relies on."""

from __future__ import annotations

import base64
import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.testbed import CommandError, Testbed, wait_for
from tests.testbed.cluster import write_kubeconfig

pytestmark = pytest.mark.e2e


def _get_json(testbed: Testbed, *args: str) -> Any:
    return json.loads(testbed.kubectl("get", *args, "-o", "json").stdout)


def _create_json(testbed: Testbed, manifest: dict[str, Any]) -> Any:
    return json.loads(testbed.kubectl("create", "-f", "-", "-o", "json", input=json.dumps(manifest)).stdout)


def test_all_components_healthy(testbed: Testbed) -> None:
    readyz = testbed.kubectl("get", "--raw", "/readyz?verbose").stdout
    assert "readyz check passed" in readyz
    assert "[+]poststarthook/rbac/bootstrap-roles ok" in readyz
    # The real node (tests/testbed/node.py) may have joined too, if an earlier test asked for it.
    nodes = _get_json(testbed, "nodes", "-l", "type=kwok")["items"]
    assert sorted(n["metadata"]["name"] for n in nodes) == ["kwok-node-0", "kwok-node-1", "kwok-node-2"]
    leases = _get_json(testbed, "leases", "-n", "kube-node-lease")["items"]
    assert {lease["metadata"]["name"] for lease in leases} >= {n["metadata"]["name"] for n in nodes}
    assert testbed.server.startswith("https://127.0.0.1:")


def test_crd_with_status_subresource_and_printer_columns(testbed: Testbed, namespace: str) -> None:
    group = "testbed.sluicegate.io"
    testbed.apply(
        {
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": f"widgets.{group}"},
            "spec": {
                "group": group,
                "scope": "Namespaced",
                "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
                "versions": [
                    {
                        "name": "v1alpha1",
                        "served": True,
                        "storage": True,
                        "subresources": {"status": {}},
                        "additionalPrinterColumns": [
                            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                            {"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
                        ],
                        "schema": {
                            "openAPIV3Schema": {
                                "type": "object",
                                "properties": {
                                    "spec": {"type": "object", "properties": {"size": {"type": "integer"}}},
                                    "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
                                },
                            }
                        },
                    }
                ],
            },
        }
    )
    testbed.kubectl("wait", "--for=condition=Established", f"crd/widgets.{group}", "--timeout=30s")
    widget = f"widgets.{group}"
    testbed.apply(
        {
            "apiVersion": f"{group}/v1alpha1",
            "kind": "Widget",
            "metadata": {"name": "w1", "namespace": namespace},
            "spec": {"size": 3},
        }
    )

    testbed.kubectl(
        "patch",
        widget,
        "w1",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status": {"phase": "Streaming"}}',
    )
    # With a status subresource, writes to the main resource must not change status.
    testbed.kubectl(
        "patch", widget, "w1", "-n", namespace, "--type=merge", "-p", '{"status": {"phase": "Bogus"}}'
    )
    assert _get_json(testbed, widget, "w1", "-n", namespace)["status"] == {"phase": "Streaming"}

    header, row = testbed.kubectl("get", widget, "-n", namespace).stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "SIZE"]
    assert row.split()[:3] == ["w1", "Streaming", "3"]


def test_indexed_job_pods_run_on_kwok_nodes(testbed: Testbed, namespace: str) -> None:
    testbed.apply(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "indexed", "namespace": namespace},
            "spec": {
                "completions": 4,
                "parallelism": 4,
                "completionMode": "Indexed",
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        # A native sidecar: an init container that keeps running beside the main container.
                        "initContainers": [
                            {"name": "sidecar", "image": "sluicegate/sidecar:test", "restartPolicy": "Always"}
                        ],
                        "containers": [{"name": "main", "image": "busybox"}],
                    }
                },
            },
        }
    )
    selector = "batch.kubernetes.io/job-name=indexed"

    def running_pods() -> list[dict[str, Any]] | None:
        pods = _get_json(testbed, "pods", "-n", namespace, "-l", selector)["items"]
        return pods if len(pods) == 4 and all(p["status"].get("phase") == "Running" for p in pods) else None

    pods = wait_for(running_pods, timeout_s=60, what="4 Running pods of the Indexed Job")
    indexes = sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods)
    assert indexes == ["0", "1", "2", "3"]
    assert {p["spec"]["nodeName"] for p in pods} <= {"kwok-node-0", "kwok-node-1", "kwok-node-2"}
    for pod in pods:
        assert pod["spec"]["initContainers"][0]["restartPolicy"] == "Always"
        assert pod["status"]["initContainerStatuses"][0]["started"] is True
        # The ServiceAccount admission plugin mounts a projected, bound token into every pod.
        sources = [s for v in pod["spec"]["volumes"] for s in v.get("projected", {}).get("sources", [])]
        assert any("serviceAccountToken" in s for s in sources)

    # kwok completes Job pods only when asked, which lets the Job controller finish the Job.
    testbed.kubectl(
        "annotate", "pods", "-n", namespace, "-l", selector, "testbed.sluicegate.io/complete=true"
    )
    testbed.kubectl("wait", "--for=condition=Complete", "job/indexed", "-n", namespace, "--timeout=60s")
    assert _get_json(testbed, "job", "indexed", "-n", namespace)["status"]["succeeded"] == 4


def _jwt_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


def _token_review(testbed: Testbed, token: str, audiences: list[str]) -> dict[str, Any]:
    review = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": audiences},
    }
    status: dict[str, Any] = _create_json(testbed, review)["status"]
    return status


def test_projected_token_is_audience_bound(testbed: Testbed, namespace: str, tmp_path: Path) -> None:
    testbed.kubectl("create", "serviceaccount", "reader", "-n", namespace)
    token = testbed.service_account_token(namespace, "reader", audiences=["sluicegate.io"], duration_s=600)

    claims = _jwt_claims(token)
    assert claims["aud"] == ["sluicegate.io"]
    assert claims["iss"] == testbed.server
    assert claims["sub"] == f"system:serviceaccount:{namespace}:reader"

    accepted = _token_review(testbed, token, ["sluicegate.io"])
    assert accepted["authenticated"] is True
    assert accepted["audiences"] == ["sluicegate.io"]
    assert accepted["user"]["username"] == f"system:serviceaccount:{namespace}:reader"

    rejected = _token_review(testbed, token, ["other.example.com"])
    assert not rejected.get("authenticated")
    assert "audience" in rejected["error"]

    # Nor is a sluicegate.io token good for the API server itself, whose audience is its issuer URL.
    token_only = write_kubeconfig(
        tmp_path / "token.kubeconfig", testbed.server, testbed.ca_bundle, user="reader", token=token
    )
    whoami = testbed.kubectl("auth", "whoami", kubeconfig=token_only, check=False)
    assert whoami.returncode != 0
    assert "Unauthorized" in whoami.stderr


def _dataset_access(namespace: str, verb: str) -> dict[str, str]:
    return {"namespace": namespace, "verb": verb, "group": "sluicegate.io", "resource": "datasets"}


def _access_review(testbed: Testbed, user: str, namespace: str, verb: str) -> bool:
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": user,
            "groups": [
                "system:serviceaccounts",
                f"system:serviceaccounts:{namespace}",
                "system:authenticated",
            ],
            "resourceAttributes": _dataset_access(namespace, verb),
        },
    }
    return bool(_create_json(testbed, review)["status"].get("allowed"))


def test_subject_access_review_follows_custom_verb_role_binding(testbed: Testbed, namespace: str) -> None:
    testbed.kubectl("create", "serviceaccount", "streamer", "-n", namespace)
    testbed.kubectl("create", "serviceaccount", "bystander", "-n", namespace)
    # Applied as manifests: `kubectl create role` refuses resources the server does not (yet) serve.
    testbed.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "dataset-streamer", "namespace": namespace},
            "rules": [{"apiGroups": ["sluicegate.io"], "resources": ["datasets"], "verbs": ["stream"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "dataset-streamer", "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "dataset-streamer"},
            "subjects": [{"kind": "ServiceAccount", "name": "streamer", "namespace": namespace}],
        },
    )
    streamer = f"system:serviceaccount:{namespace}:streamer"

    assert _access_review(testbed, streamer, namespace, "stream") is True
    assert _access_review(testbed, streamer, namespace, "get") is False
    assert _access_review(testbed, streamer, "default", "stream") is False
    assert (
        _access_review(testbed, f"system:serviceaccount:{namespace}:bystander", namespace, "stream") is False
    )

    # The same decision reached with the ServiceAccount's own TokenRequest-issued credentials.
    kubeconfig = testbed.service_account_kubeconfig(namespace, "streamer")
    # A SelfSubjectAccessReview rather than `kubectl auth can-i`, which drops the group of unserved resources.
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": _dataset_access(namespace, "stream")},
    }
    # --validate=false: client-side validation would list CRDs, which this ServiceAccount may not.
    allowed = testbed.kubectl(
        "create",
        "--validate=false",
        "-f",
        "-",
        "-o",
        "jsonpath={.status.allowed}",
        input=json.dumps(review),
        kubeconfig=kubeconfig,
    )
    assert allowed.stdout == "true"
    with pytest.raises(CommandError, match=r"[Ff]orbidden"):
        testbed.kubectl("get", "pods", "-n", namespace, kubeconfig=kubeconfig)


class _MutatingWebhook(BaseHTTPRequestHandler):
    """Adds a label to every pod it is asked about and records the pods' names."""

    seen: list[str]

    def do_POST(self) -> None:
        review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        request = review["request"]
        self.seen.append(request["object"]["metadata"]["name"])
        patch = [{"op": "add", "path": "/metadata/labels/sluicegate.io~1mutated", "value": "true"}]
        body = json.dumps(
            {
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "response": {
                    "uid": request["uid"],
                    "allowed": True,
                    "patchType": "JSONPatch",
                    "patch": base64.b64encode(json.dumps(patch).encode()).decode(),
                },
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def webhook_server(testbed: Testbed) -> Iterator[tuple[int, list[str]]]:
    cert = testbed.issue_serving_cert("e2e-webhook")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert.cert, cert.key)
    seen: list[str] = []
    handler = type("Handler", (_MutatingWebhook,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], seen
    server.shutdown()
    server.server_close()


def _pod(name: str, namespace: str, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
    }


def test_mutating_webhook_patches_only_selected_pods(
    testbed: Testbed, namespace: str, webhook_server: tuple[int, list[str]]
) -> None:
    port, seen = webhook_server
    config_name = f"e2e-{namespace}"
    inject = {"sluicegate.io/inject": "true"}
    testbed.apply(
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": config_name},
            "webhooks": [
                {
                    "name": "inject.testbed.sluicegate.io",
                    "clientConfig": testbed.webhook_client_config(port, "/mutate"),
                    "rules": [
                        {
                            "operations": ["CREATE"],
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "resources": ["pods"],
                        }
                    ],
                    "objectSelector": {"matchLabels": inject},
                    # Confines the webhook to this test's namespace so other tests' pods never reach it.
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                    "failurePolicy": "Fail",
                    "timeoutSeconds": 5,
                }
            ],
        }
    )
    try:
        # The API server picks up webhook configurations asynchronously; a server-side dry run shows when.
        wait_for(
            lambda: (
                "sluicegate.io/mutated"
                in json.loads(
                    testbed.kubectl(
                        "create",
                        "--dry-run=server",
                        "-o",
                        "json",
                        "-f",
                        "-",
                        input=json.dumps(_pod("probe", namespace, inject)),
                    ).stdout
                )["metadata"]["labels"]
            ),
            what="the webhook configuration to take effect",
        )
        labelled = _create_json(testbed, _pod("labelled", namespace, inject))
        plain = _create_json(testbed, _pod("plain", namespace, {"app": "plain"}))
    finally:
        testbed.kubectl("delete", "mutatingwebhookconfiguration", config_name)

    assert labelled["metadata"]["labels"] == {**inject, "sluicegate.io/mutated": "true"}
    assert plain["metadata"]["labels"] == {"app": "plain"}
    assert "labelled" in seen
    assert "plain" not in seen


def test_helm_installs_a_chart(testbed: Testbed, namespace: str, tmp_path: Path) -> None:
    chart = tmp_path / "demo"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: demo\nversion: 0.1.0\n")
    (chart / "templates" / "configmap.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: demo\n"
        "data:\n  greeting: {{ .Values.greeting | quote }}\n"
    )
    testbed.helm("install", "demo", str(chart), "-n", namespace, "--set", "greeting=hello")
    releases = json.loads(testbed.helm("list", "-n", namespace, "-o", "json").stdout)
    assert [(r["name"], r["status"]) for r in releases] == [("demo", "deployed")]
    assert _get_json(testbed, "configmap", "demo", "-n", namespace)["data"] == {"greeting": "hello"}
