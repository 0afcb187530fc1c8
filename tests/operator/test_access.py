"""Pure access rules: identities from TokenReview, row-level policies, refusal messages."""

from __future__ import annotations

from typing import Any

import pytest
from sluicegate_operator import access
from sluicegate_operator.access import Refused

from .conftest import dataset

SA = "system:serviceaccount:team-a:trainer"


def review(**user: Any) -> dict[str, Any]:
    return {
        "authenticated": True,
        "user": {
            "username": SA,
            "uid": "sa-uid",
            "groups": ["system:serviceaccounts"],
            "extra": {access.POD_NAME_EXTRA: ["job-0"], access.POD_UID_EXTRA: ["pod-uid"]},
            **user,
        },
    }


def test_identity_of_a_pod_bound_token() -> None:
    who = access.identity(review())
    assert (who.namespace, who.service_account, who.pod_name, who.pod_uid) == (
        "team-a",
        "trainer",
        "job-0",
        "pod-uid",
    )


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        ({"authenticated": False, "error": "token has expired"}, "token_rejected"),
        (review(username="alice"), "not_service_account"),
        (review(extra={}), "not_pod_bound"),
    ],
)
def test_identity_refusals(status: dict[str, Any], reason: str) -> None:
    with pytest.raises(Refused) as info:
        access.identity(status)
    assert info.value.status == 401
    assert info.value.reason == reason
    if reason == "token_rejected":
        assert "expired" in info.value.message


def test_policies_apply_by_service_account_group_or_user() -> None:
    ds = dataset(
        policies=[
            {
                "name": "sa",
                "subjects": [{"kind": "ServiceAccount", "namespace": "team-a", "name": "trainer"}],
                "query": "meta.open",
            },
            {
                "name": "other-sa",
                "subjects": [{"kind": "ServiceAccount", "namespace": "team-b", "name": "trainer"}],
                "query": "labels.car > 0",
            },
            {
                "name": "group",
                "subjects": [{"kind": "Group", "name": "system:serviceaccounts:team-a"}],
                "query": "file.width >= 10",
            },
            {"name": "user", "subjects": [{"kind": "User", "name": "alice"}], "query": "labels.dog > 0"},
        ]
    )
    found = access.applicable_policies(ds.spec.policies, SA, ["system:serviceaccounts:team-a"])
    assert [p.name for p in found] == ["sa", "group"]
    assert [p.name for p in access.applicable_policies(ds.spec.policies, "alice", [])] == ["user"]


def test_missing_permission_message_names_verb_resource_and_fix() -> None:
    message = access.missing_stream_permission(SA, "data", "coco", "no RBAC policy matched")
    assert "not allowed to stream datasets.sluicegate.io/coco in namespace data" in message
    assert "no RBAC policy matched" in message
    assert "--verb=stream" in message
    assert "--serviceaccount=team-a:trainer" in message
