"""Findings 3 and 5 (and the blank policy): a DatasetStream says nothing about a Dataset to someone who may
not stream it, and no spec can stop the operator for anyone else."""

from __future__ import annotations

import json

import pytest

from tests.testbed import wait_for

from .tenants import Tenants, condition, stream

pytestmark = pytest.mark.e2e


def test_stream_of_another_namespaces_dataset_is_refused_to_who_may_not_stream_it(tenants: Tenants) -> None:
    """Finding 3: mallory cannot point a stream at the victim's Dataset, so she learns no count, no field
    name, no version."""
    cp, evil = tenants.cp, tenants.evil
    result = tenants.apply_as(stream("spy", evil, cp.data_ns, "coco", query="meta.open"))
    assert result.returncode != 0
    assert (
        f"{tenants.user} is not allowed to stream datasets.sluicegate.io/coco in namespace {cp.data_ns}"
        in (result.stderr)
    )
    assert "Grant it with: kubectl create role" in result.stderr
    assert cp.kubectl("get", "datasetstreams", "-n", evil, "spy", check=False).returncode != 0


def test_editing_the_query_needs_the_stream_permission_too(tenants: Tenants) -> None:
    """Finding 3: a mutable spec.query is the binary-search oracle; every edit is checked, not only create."""
    cp = tenants.cp
    cp.apply(stream("oracle", cp.team_ns, cp.data_ns, "coco", query="labels.car > 0"))
    cp.wait_ready("datasetstreams", cp.team_ns, "oracle")
    # bob edits team_ns (he may create streams there) but may not stream the data team's Dataset.
    cp.kubectl("create", "rolebinding", "bob-edit", "-n", cp.team_ns, "--clusterrole=edit", "--user=bob")
    patch = json.dumps({"spec": {"query": 'meta.split = "val"'}})
    result = tenants.as_user(
        "patch", "datasetstream", "oracle", "-n", cp.team_ns, "--type=merge", "-p", patch, user="bob"
    )
    assert result.returncode != 0
    assert "bob is not allowed to stream" in result.stderr
    assert cp.get("datasetstream", "oracle", "-n", cp.team_ns)["spec"]["query"] == "labels.car > 0"
    # Labels and annotations are not what the operator reads: they stay editable.
    labelled = tenants.as_user("label", "datasetstream", "oracle", "-n", cp.team_ns, "team=a", user="bob")
    assert labelled.returncode == 0, labelled.stderr


def test_counts_are_withheld_when_row_level_policies_apply(tenants: Tenants) -> None:
    """Finding 3: a count before row-level policies would tell a policy's subject what it may not see."""
    cp = tenants.cp
    cp.apply(stream("counted", cp.team_ns, cp.data_ns, "coco", query="labels.car > 0"))
    assert cp.wait_ready("datasetstreams", cp.team_ns, "counted")["status"]["matchedItems"] > 0
    policy = {
        "name": "open-only",
        "query": "meta.open",
        "subjects": [{"kind": "ServiceAccount", "namespace": cp.team_ns, "name": "trainer"}],
    }
    patch = json.dumps({"spec": {"policies": [policy]}})
    cp.kubectl("patch", "dataset", "coco", "-n", cp.data_ns, "--type=merge", "-p", patch)
    try:
        cp.apply(stream("uncounted", cp.team_ns, cp.data_ns, "coco", query="labels.car > 0"))
        status = cp.wait_ready("datasetstreams", cp.team_ns, "uncounted")["status"]
        assert "matchedItems" not in status
        assert "counts are withheld" in next(
            c["message"] for c in status["conditions"] if c["type"] == "Ready"
        )
        # A blank row-level policy would fail open (select everything): the API server refuses it.
        blank = json.dumps({"spec": {"policies": [{**policy, "query": "   "}]}})
        result = cp.kubectl(
            "patch", "dataset", "coco", "-n", cp.data_ns, "--type=merge", "-p", blank, check=False
        )
        assert result.returncode != 0
        assert "spec.policies[0].query" in result.stderr
    finally:
        cp.kubectl(
            "patch", "dataset", "coco", "-n", cp.data_ns, "--type=json", "-p",
            '[{"op": "remove", "path": "/spec/policies"}]',
        )  # fmt: skip


def test_hostile_queries_are_refused_and_do_not_stop_others(tenants: Tenants) -> None:
    """Finding 5: a query nested 250 deep is an InvalidQuery (not a RecursionError that stops the resync),
    a 600 KB query never reaches the operator, and the streams after them still reconcile."""
    cp = tenants.cp
    deep = "(" * 250 + "labels.car > 0" + ")" * 250
    cp.apply(stream("deep", cp.team_ns, cp.data_ns, "coco", query=deep))
    why = wait_for(lambda: condition(cp, "datasetstreams", cp.team_ns, "deep"), timeout_s=60, what="deep")
    assert why[:2] == ("False", "InvalidQuery")
    assert "nests parentheses more than 32 deep" in why[2]
    huge = " or ".join(["labels.car > 0"] * 40_000)
    body = json.dumps(stream("huge", cp.team_ns, cp.data_ns, "coco", query=huge))
    result = cp.kubectl("create", "-f", "-", input=body, check=False)
    assert result.returncode != 0
    assert "spec.query" in result.stderr
    assert "Too long" in result.stderr
    cp.apply(stream("after", cp.team_ns, cp.data_ns, "coco", query="labels.dog > 0"))
    cp.wait_ready("datasetstreams", cp.team_ns, "after")
