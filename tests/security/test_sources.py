"""Findings 1, 2 and 8: a tenant's Dataset reaches only storage the platform allowed its namespace,
with credentials their owner opted in and its author can read; shared caches never cross identities."""

from __future__ import annotations

import time

import pytest
from sluicegate.core.broker_protocol import BrokerPaths

from tests.operator import devcluster
from tests.s3server import S3Server
from tests.testbed import wait_for

from .tenants import Tarpit, Tenants, condition, dataset, stream

pytestmark = pytest.mark.e2e


def _refused(result: object) -> str:
    assert getattr(result, "returncode", 0) != 0, f"expected a refusal, got {getattr(result, 'stdout', '')}"
    return str(getattr(result, "stderr", ""))


def test_foreign_bucket_file_paths_and_internal_endpoints_are_refused_at_apply(tenants: Tenants) -> None:
    """Finding 2: no rule for the attacker's namespace, so nothing is reached, nothing is echoed."""
    cp, evil = tenants.cp, tenants.evil
    pit = Tarpit()
    try:
        attempts = [
            {"uri": cp.uri, "endpoint": cp.s3.endpoint, "region": cp.s3.region},  # the victim's bucket
            {"uri": cp.uri},  # ... with the operator's own identity
            {"uri": "file:///var/run/secrets/kubernetes.io/serviceaccount"},
            {"uri": "file:///etc"},
            {"uri": "s3://metadata/x", "endpoint": pit.endpoint},  # an internal host
            {"uri": "s3://api/x", "endpoint": cp.testbed.server},
        ]
        for i, source in enumerate(attempts):
            message = _refused(tenants.apply_as(dataset(f"steal-{i}", evil, source)))
            assert f"namespace {evil} may not read" in message
            assert "no rule of the platform's source policy" in message
            assert f"namespaces: [{evil}]" in message, "the refusal says what to ask the platform team for"
            assert cp.data_ns not in message, "nothing about other namespaces' rules"
        time.sleep(1)
        assert pit.connections == 0, "the operator never contacted an endpoint it was not allowed"
        names = cp.kubectl("get", "datasets", "-n", evil, "-o", "name").stdout.split()
        assert not [n for n in names if "steal-" in n], "none of them was stored"
    finally:
        pit.close()


def test_source_rule_in_the_chart_lets_a_namespace_in_and_revoking_it_shuts_it_out(tenants: Tenants) -> None:
    """Finding 2: the rule lives in the chart values; taken away, the operator stops reading at once."""
    cp, evil = tenants.cp, tenants.evil
    bucket = f"evil-{tenants.suffix}"
    uri, _ = devcluster.sample_dataset(cp.s3, bucket, items=5)
    tenants.allow({"namespaces": [evil], "uris": [f"s3://{bucket}"], "endpoints": [cp.s3.endpoint]})
    devcluster.credentials_secret(cp.testbed, evil, "own-keys", cp.s3)
    source = {"uri": uri, "endpoint": cp.s3.endpoint, "region": cp.s3.region}
    assert tenants.apply_as(dataset("own", evil, source, "own-keys")).returncode == 0
    ready = cp.wait_ready("datasets", evil, "own")
    assert ready["status"]["items"] == 5
    # A path outside the allowed root, even in the same bucket's neighbour, stays refused.
    _refused(tenants.apply_as(dataset("near", evil, {**source, "uri": f"s3://{bucket}-2/x"}, "own-keys")))
    tenants.allow()  # the platform team takes the rule away
    found = wait_for(
        lambda: (c := condition(cp, "datasets", evil, "own")) and c[1] == "SourceNotAllowed" and c,
        timeout_s=90,
        what="Dataset own refused after the rule is gone",
    )
    assert found[0] == "False"
    assert "no rule of the platform's source policy" in found[2]


def test_caches_never_cross_store_identities(tenants: Tenants) -> None:
    """Finding 1: a Dataset with the victim's URI on the attacker's own endpoint neither reads the victim's
    cached rows nor plants its own in the victim's streams."""
    cp, evil = tenants.cp, tenants.evil
    bucket = cp.uri.removeprefix("s3://").split("/")[0]
    with S3Server(access_key="evil-access", secret_key="evil-secret") as own:
        uri, _ = devcluster.sample_dataset(own, bucket, items=7)  # the same s3://BUCKET/coco, other bytes
        assert uri == cp.uri
        tenants.allow({"namespaces": [evil], "uris": [cp.uri], "endpoints": [own.endpoint]})
        devcluster.credentials_secret(cp.testbed, evil, "mirror-keys", own)
        source = {"uri": cp.uri, "endpoint": own.endpoint, "region": own.region}
        assert tenants.apply_as(dataset("mirror", evil, source, "mirror-keys")).returncode == 0
        assert cp.wait_ready("datasets", evil, "mirror")["status"]["items"] == 7

        # Poisoning: the attacker's selection is computed first...
        assert (
            tenants.apply_as(stream("poison", evil, evil, "mirror", query="labels.car >= 0")).returncode == 0
        )
        assert cp.wait_ready("datasetstreams", evil, "poison", 60)["status"]["matchedItems"] == 7
        # ... and the victim's stream with the same query still sees the victim's rows.
        cp.apply(stream("victim-q", cp.team_ns, cp.data_ns, "coco", query="labels.car >= 0"))
        victim = cp.wait_ready("datasetstreams", cp.team_ns, "victim-q", 60)
        assert victim["status"]["matchedItems"] == len(cp.records)

        # Reading: the victim's selection first, then the attacker's over its own store.
        cp.apply(stream("victim-r", cp.team_ns, cp.data_ns, "coco", query="labels.dog >= 0"))
        victim = cp.wait_ready("datasetstreams", cp.team_ns, "victim-r", 60)
        assert victim["status"]["matchedItems"] == len(cp.records)
        assert tenants.apply_as(stream("read", evil, evil, "mirror", query="labels.dog >= 0")).returncode == 0
        assert cp.wait_ready("datasetstreams", evil, "read", 60)["status"]["matchedItems"] == 7
        assert cp.wait_ready("datasets", cp.data_ns, "coco")["status"]["items"] == len(cp.records)
    tenants.allow()


def test_credentials_need_an_opted_in_secret_the_author_can_read(tenants: Tenants) -> None:
    """Finding 8: a Secret is used only when its owner labelled it, and only by someone who may read it."""
    cp, evil = tenants.cp, tenants.evil
    bucket = f"evil8-{tenants.suffix}"
    uri, _ = devcluster.sample_dataset(cp.s3, bucket, items=3)
    tenants.allow({"namespaces": [evil], "uris": [f"s3://{bucket}"], "endpoints": [cp.s3.endpoint]})
    source = {"uri": uri, "endpoint": cp.s3.endpoint, "region": cp.s3.region}

    # An app's Secret in the namespace, never meant for sluicegate.
    devcluster.credentials_secret(cp.testbed, evil, "app-keys", cp.s3, opt_in=False)
    assert tenants.apply_as(dataset("borrowed", evil, source, "app-keys")).returncode == 0
    why = wait_for(lambda: condition(cp, "datasets", evil, "borrowed"), timeout_s=60, what="borrowed status")
    assert why[:2] == ("False", "CredentialsInvalid")
    assert "kubectl label secret app-keys" in why[2]

    # Someone who may create Datasets but not read Secrets cannot lend one to a Dataset.
    cp.kubectl(
        "create",
        "rolebinding",
        "intern",
        "-n",
        evil,
        f"--clusterrole={cp.operator.name}-edit",
        "--user=intern",
    )
    devcluster.credentials_secret(cp.testbed, evil, "payroll-keys", cp.s3)
    message = _refused(tenants.apply_as(dataset("payroll", evil, source, "payroll-keys"), user="intern"))
    assert "intern may not read Secret" in message

    # The operator itself reads Secrets only where a source rule names the namespace.
    sa = f"system:serviceaccount:{cp.operator.namespace}:{cp.operator.name}"
    can = cp.kubectl("auth", "can-i", "get", "secrets", "-n", cp.team_ns, f"--as={sa}", check=False)
    assert can.stdout.strip() == "no"
    can = cp.kubectl("auth", "can-i", "get", "secrets", "-n", cp.data_ns, f"--as={sa}", check=False)
    assert can.stdout.strip() == "yes"
    tenants.allow()


def test_broker_refuses_a_dataset_whose_source_was_revoked(tenants: Tenants) -> None:
    """Finding 2, at the broker: a revoked source serves no plan even to an admitted pod."""
    cp, evil = tenants.cp, tenants.evil
    bucket = f"evilb-{tenants.suffix}"
    uri, _ = devcluster.sample_dataset(cp.s3, bucket, items=4)
    rule = {"namespaces": [evil], "uris": [f"s3://{bucket}"], "endpoints": [cp.s3.endpoint]}
    tenants.allow(rule)
    devcluster.credentials_secret(cp.testbed, evil, "b-keys", cp.s3)
    source = {"uri": uri, "endpoint": cp.s3.endpoint, "region": cp.s3.region}
    assert tenants.apply_as(dataset("brk", evil, source, "b-keys")).returncode == 0
    cp.wait_ready("datasets", evil, "brk")
    cp.kubectl("create", "serviceaccount", "reader", "-n", evil)
    tenants.grant_stream(evil, "reader", evil)
    assert tenants.apply_as(stream("brk", evil, evil, "brk")).returncode == 0
    cp.wait_ready("datasetstreams", evil, "brk", 60)
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "brk", "namespace": evil, "labels": {"sluicegate.io/stream": "brk"}},
        "spec": {"serviceAccountName": "reader", "containers": [{"name": "main", "image": "x"}]},
    }
    assert tenants.apply_as(pod).returncode == 0
    token = cp.pod_token(cp.get("pod", "brk", "-n", evil))
    assert cp.broker(BrokerPaths.PLAN, token).status_code == 200
    tenants.allow()

    def refused() -> str | None:
        response = cp.broker(BrokerPaths.PLAN, token)
        return response.json()["message"] if response.status_code == 503 else None

    assert "no rule of the platform's source policy" in wait_for(refused, timeout_s=30, what="503")
