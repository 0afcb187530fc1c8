"""Findings 6 and 7: a pod gets the rank admission sealed for it and nothing its owner wrote; the broker
authenticates before it reads, caps what it reads and limits each pod; no request body breaks it."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sluicegate.core.broker_protocol import MAX_URLS_PER_REQUEST, BrokerPaths, PlanResponse

from tests.testbed import wait_for

from .tenants import Tenants, stream

pytestmark = pytest.mark.e2e
WORLD = 4


def _pod(cp: Any, name: str, labels: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": cp.team_ns, "labels": labels},
        "spec": {"serviceAccountName": "trainer", "containers": [{"name": "main", "image": "x"}], **spec},
    }


@pytest.fixture(scope="module")
def ranked(tenants: Tenants) -> str:
    """A stream cut into WORLD shards, ranks from the pod spec (annotation sluicegate.io/rank)."""
    cp = tenants.cp
    cp.apply(
        stream("ranked", cp.team_ns, cp.data_ns, "coco", sharding={"worldSize": WORLD, "rankSource": "spec"})
    )
    cp.wait_ready("datasetstreams", cp.team_ns, "ranked")
    probe = _pod(cp, "probe", {"sluicegate.io/stream": "ranked"})
    wait_for(
        lambda: (
            "initContainers"
            in json.loads(
                cp.kubectl(
                    "create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(probe)
                ).stdout
            )["spec"]
        ),
        timeout_s=30,
        what="the webhook to inject",
    )
    return "ranked"


def _plan(tenants: Tenants, name: str, body: dict[str, Any] | None = None) -> httpx.Response:
    cp = tenants.cp
    return cp.broker(BrokerPaths.PLAN, cp.pod_token(cp.get("pod", name, "-n", cp.team_ns)), body)


def test_own_sidecar_container_is_refused_at_admission(tenants: Tenants, ranked: str) -> None:
    cp = tenants.cp
    fake = {"name": "sluicegate-sidecar", "image": "evil", "restartPolicy": "Always"}
    pod = _pod(cp, "own-sidecar", {"sluicegate.io/stream": ranked}, initContainers=[fake])
    result = cp.kubectl("apply", "-f", "-", input=json.dumps(pod), check=False)
    assert result.returncode != 0
    assert "only the sluicegate webhook adds" in result.stderr


def test_labelling_after_creation_gets_no_plan(tenants: Tenants, ranked: str) -> None:
    """The webhook sees CREATE only; a pod labelled later, with hand-written rank annotations and the
    injected label, is refused by the broker because admission never sealed a grant for it."""
    cp = tenants.cp
    cp.apply(_pod(cp, "late", {}))
    cp.kubectl(
        "label",
        "pod",
        "late",
        "-n",
        cp.team_ns,
        f"sluicegate.io/stream={ranked}",
        "sluicegate.io/injected=true",
    )
    cp.kubectl(
        "annotate", "pod", "late", "-n", cp.team_ns, "sluicegate.io/rank=0", "sluicegate.io/world-size=1"
    )
    response = _plan(tenants, "late")
    assert response.status_code == 403
    assert "not admitted by sluicegate" in response.json()["message"]


def test_edited_rank_annotations_get_no_plan_and_world_size_comes_from_the_stream(
    tenants: Tenants, ranked: str
) -> None:
    cp = tenants.cp
    # The pod's own env claims a world of one (the whole selection): the stream's worldSize wins.
    env = [{"name": "RANK", "value": "0"}, {"name": "WORLD_SIZE", "value": "1"}]
    pod = _pod(cp, "honest", {"sluicegate.io/stream": ranked})
    pod["metadata"]["annotations"] = {"sluicegate.io/rank": "2"}
    pod["spec"]["containers"][0]["env"] = env
    cp.apply(pod)
    plan = PlanResponse.model_validate_json(_plan(tenants, "honest").content)
    assert (plan.rank, plan.world_size) == (2, WORLD)
    assert len(plan.rows) == -(-len(cp.records) // WORLD)
    # The owner rewrites what admission decided: the broker refuses instead of serving another shard.
    annotations = cp.get("pod", "honest", "-n", cp.team_ns)["metadata"]["annotations"]
    grant = annotations["sluicegate.io/grant"]
    forged = grant.replace(":2:4:", ":0:1:")
    for edit in ("sluicegate.io/world-size=1", "sluicegate.io/rank=0", f"sluicegate.io/grant={forged}"):
        cp.kubectl("annotate", "--overwrite", "pod", "honest", "-n", cp.team_ns, edit)
        response = _plan(tenants, "honest")
        if edit.startswith("sluicegate.io/grant"):
            assert response.status_code == 403
            assert "edited" in response.json()["message"]
        else:  # the plain annotations are informational: the sealed grant still decides
            assert PlanResponse.model_validate_json(response.content).rank == 2
    # Another pod's valid grant, copied: it is a grant for the same ServiceAccount and stream only.
    cp.kubectl("annotate", "--overwrite", "pod", "honest", "-n", cp.team_ns, f"sluicegate.io/grant={grant}")
    assert _plan(tenants, "honest").status_code == 200


def test_broker_authenticates_before_it_reads_and_caps_what_it_reads(tenants: Tenants, ranked: str) -> None:
    cp = tenants.cp
    # No token: refused before the (malformed, oversized) body is even read.
    with httpx.Client(verify=cp.ca, trust_env=False, timeout=30) as http:
        response = http.post(cp.url + BrokerPaths.PLAN, content=b"{" * 100_000)
        assert response.status_code == 401
        response = http.post(
            cp.url + BrokerPaths.URLS,
            content=b"x" * 1000,
            headers={"Authorization": "Bearer " + "a" * 4_000},
        )
        assert response.status_code == 401
        # A header past the HTTP server's own limit never gets as far as a TokenReview.
        response = http.post(cp.url + BrokerPaths.URLS, headers={"Authorization": "Bearer " + "a" * 20_000})
        assert response.status_code == 400
    cp.apply(_pod(cp, "greedy", {"sluicegate.io/stream": ranked}))
    token = cp.pod_token(cp.get("pod", "greedy", "-n", cp.team_ns))
    plan = PlanResponse.model_validate_json(cp.broker(BrokerPaths.PLAN, token).content)
    assert plan.urls == {}, "plans carry no URLs unless asked: sidecars ask in windows"
    many = cp.broker(BrokerPaths.URLS, token, {"blobs": [plan.rows[0].blob] * (MAX_URLS_PER_REQUEST + 1)})
    assert many.status_code == 400
    assert "at most 4096" in many.text or "too_long" in many.text
    with httpx.Client(verify=cp.ca, trust_env=False, timeout=30) as http:
        big = http.post(
            cp.url + BrokerPaths.URLS,
            content=b'{"blobs": ["' + b"a" * 1_000_000 + b'"]}',
            headers={"Authorization": f"Bearer {token}"},
        )
    assert big.status_code == 413


def test_one_pod_cannot_flood_the_broker(tenants: Tenants, ranked: str) -> None:
    cp = tenants.cp
    cp.apply(
        _pod(cp, "flood", {"sluicegate.io/stream": ranked}),
        _pod(cp, "calm", {"sluicegate.io/stream": ranked}),
    )
    flood = cp.pod_token(cp.get("pod", "flood", "-n", cp.team_ns))
    calm = cp.pod_token(cp.get("pod", "calm", "-n", cp.team_ns))
    statuses = []
    with httpx.Client(verify=cp.ca, trust_env=False, timeout=30) as http:
        for _ in range(30):
            r = http.post(cp.url + BrokerPaths.PLAN, json={}, headers={"Authorization": f"Bearer {flood}"})
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1
                assert "requests/s" in r.json()["message"]
    assert 429 in statuses
    assert statuses[0] == 200
    assert cp.broker(BrokerPaths.PLAN, calm).status_code == 200, "other pods are not limited by it"


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
_BODIES = (
    _JSON
    | st.fixed_dictionaries({"blobs": st.lists(st.text(max_size=70), max_size=5)})
    | st.fixed_dictionaries({"stream": st.text(max_size=20) | st.none(), "presign": _JSON})
    | st.fixed_dictionaries(
        {"run": st.text(max_size=20), "chain": _JSON, "number": _JSON, "consumed": _JSON, "writer": _JSON}
    )
)
_ENDPOINTS = {"p": BrokerPaths.PLAN, "u": BrokerPaths.URLS, "l": BrokerPaths.LEDGER}


def test_fuzzed_broker_bodies_get_clear_answers(tenants: Tenants, ranked: str) -> None:
    """Hypothesis: whatever JSON (or not-JSON) an authenticated pod sends, the broker answers 200/400/413
    with a BrokerError, never a 500, and stays healthy."""
    cp = tenants.cp
    cp.apply(_pod(cp, "fuzz", {"sluicegate.io/stream": ranked}))
    token = cp.pod_token(cp.get("pod", "fuzz", "-n", cp.team_ns))
    http = httpx.Client(
        verify=cp.ca, trust_env=False, timeout=30, headers={"Authorization": f"Bearer {token}"}
    )

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(
        body=_BODIES | st.binary(max_size=200).map(lambda b: {"raw": b.hex()}),
        path=st.sampled_from(sorted(_ENDPOINTS)),
    )
    def probe(body: Any, path: str) -> None:
        url = cp.url + _ENDPOINTS[path]
        while True:
            response = http.post(url, content=json.dumps(body))
            if response.status_code != 429:
                break
            time.sleep(float(response.headers["Retry-After"]) / 2)
        assert response.status_code in (200, 400, 403, 413), response.text
        if response.status_code != 200:
            assert response.json()["code"] in ("bad_request", "forbidden", "too_large")

    try:
        probe()
    finally:
        http.close()
    assert httpx.get(cp.url + BrokerPaths.HEALTHZ, verify=cp.ca, trust_env=False).status_code == 200


def test_metrics_answer_only_who_may_get_them(tenants: Tenants, ranked: str) -> None:
    """Low finding: /metrics names streams and refusal reasons, so a pod on the broker's port may not
    read it; a scraper needs a token allowed to get the non-resource URL /metrics."""
    cp = tenants.cp
    cp.apply(_pod(cp, "probe-metrics", {"sluicegate.io/stream": ranked}))
    pod_token = cp.pod_token(cp.get("pod", "probe-metrics", "-n", cp.team_ns))

    def scrape(token: str | None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(
            cp.url + BrokerPaths.METRICS, verify=cp.ca, trust_env=False, headers=headers
        ).status_code

    assert scrape(None) == 401
    assert scrape(pod_token) == 401, "a pod's sluicegate.io token is not one for the API server"
    cp.kubectl("create", "serviceaccount", "scraper", "-n", cp.team_ns)
    plain = cp.kubectl("create", "token", "scraper", "-n", cp.team_ns).stdout.strip()
    assert scrape(plain) == 403
    name = f"metrics-{tenants.suffix}"
    cp.kubectl("create", "clusterrole", name, "--verb=get", "--non-resource-url=/metrics")
    cp.kubectl(
        "create",
        "clusterrolebinding",
        name,
        f"--clusterrole={name}",
        f"--serviceaccount={cp.team_ns}:scraper",
    )
    try:
        assert wait_for(lambda: scrape(plain) == 200, timeout_s=20, what="the scraper allowed")
    finally:
        cp.kubectl("delete", "clusterrolebinding,clusterrole", name, check=False)
    # A scraper trusts the operator through the published bundle, never through the Secret with the CA key.
    bundle = cp.get("configmap", f"{cp.operator.name}-tls-ca", "-n", cp.operator.namespace)["data"]["ca.crt"]
    assert "BEGIN CERTIFICATE" in bundle
    assert "PRIVATE KEY" not in bundle


def test_forged_admission_reviews_are_refused(tenants: Tenants, ranked: str) -> None:
    """Low finding: a pod that reaches the operator's port posts crafted AdmissionReviews to learn
    whether a stream exists or a ServiceAccount may stream. Only the API server (the identity its
    AdmissionConfiguration gives it, bound by the chart's webhook.authentication) may post them; the
    `ranked` fixture has just had a real pod injected through the same gate."""
    cp = tenants.cp
    cp.apply(_pod(cp, "probe-admission", {"sluicegate.io/stream": ranked}))
    pod_token = cp.pod_token(cp.get("pod", "probe-admission", "-n", cp.team_ns))
    cp.kubectl("create", "serviceaccount", "prober", "-n", cp.team_ns)
    plain = cp.kubectl("create", "token", "prober", "-n", cp.team_ns).stdout.strip()
    pod = _pod(cp, "forged", {"sluicegate.io/stream": ranked})
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "00000000-0000-0000-0000-000000000001",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": cp.team_ns,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
        },
    }
    for path in ("/mutate", "/validate"):
        for token, status in ((None, 401), (pod_token, 401), (plain, 403)):
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            got = httpx.post(cp.url + path, json=review, verify=cp.ca, trust_env=False, headers=headers)
            assert got.status_code == status, (path, token is not None, got.text)
            assert "response" not in got.json(), "a refused caller learns nothing of the review"
            assert ranked not in got.text
