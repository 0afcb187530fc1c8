"""Elastic resume on a real API server: an Indexed Job at parallelism 4 consumes part of an epoch and
reports it to the broker, is deleted, and re-created at parallelism 2 continues the epoch from the
stream's progress; together they visit exactly the epoch. Pods never run containers (kwok), so the test
plays the sidecars, with real pod-bound tokens, as tests/e2e/test_operator.py does."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from sluicegate.core.broker_protocol import BrokerPaths, PlanResponse
from sluicegate.core.partition import Pass, consumed, epoch_order

from tests.e2e.conftest import ControlPlane, control_plane
from tests.s3server import S3Server
from tests.testbed import Testbed, wait_for

pytestmark = pytest.mark.e2e

SEED = 5
# What each rank of the first Job consumed: rank 1 read with 2 DataLoader workers, one a batch ahead.
FIRST: dict[int, tuple[Pass, ...]] = {0: ((3,),), 1: ((3, 1),), 2: ((2,),), 3: ((1,),)}


@pytest.fixture(scope="module")
def cp(testbed: Testbed, s3: S3Server) -> Iterator[ControlPlane]:
    with control_plane(
        testbed,
        s3,
    ) as plane:
        yield plane


def _plan(cp: ControlPlane, pod: dict[str, Any], token: str | None = None) -> PlanResponse:
    response = cp.broker(BrokerPaths.PLAN, token or cp.pod_token(pod), {"stream": "elastic"})
    assert response.status_code == 200, response.text
    return PlanResponse.model_validate_json(response.content)


def _report(cp: ControlPlane, token: str, **report: Any) -> tuple[int, str]:
    response = cp.broker(BrokerPaths.PROGRESS, token, {"epoch": 0, "segment": 0, **report})
    return response.status_code, response.text


def test_a_job_recreated_at_another_parallelism_continues_the_epoch(cp: ControlPlane) -> None:
    cp.apply(cp.stream("elastic", query="labels.car > 0", sharding={"seed": SEED}))
    pods = cp.indexed_job("first", "elastic", completions=4)
    visited: Counter[str] = Counter()
    tokens, plans = {}, {}
    for rank, pod in enumerate(pods):
        tokens[rank] = cp.pod_token(pod)
        plans[rank] = _plan(cp, pod, tokens[rank])
        assert plans[rank].resume is None, "a fresh stream has no epoch in progress"
    for rank, plan in plans.items():
        ids = [row.id for row in plan.rows]
        order = epoch_order(len(ids), seed=SEED, epoch=0, rank=rank)
        mask = consumed(len(ids), FIRST[rank])
        visited.update(ids[i] for i in order[mask])
        status, text = _report(cp, tokens[rank], world_size=4, rank=rank, consumed=FIRST[rank])
        assert status == 200, text

    # The attacks: another rank's count, a lowered count, a count beyond the rank's plan.
    status, text = _report(cp, tokens[0], world_size=4, rank=1, consumed=((9,),))
    assert status == 403
    assert "reports for that rank only" in text
    status, text = _report(cp, tokens[0], world_size=4, rank=0, consumed=((1,),))
    assert status == 409
    assert "consumed less" in text
    status, _ = _report(cp, tokens[0], world_size=4, rank=0, consumed=((999,),))
    assert status == 400
    progress = cp.get("datasetstreams", "elastic", "-n", cp.team_ns)["status"]["progress"]
    assert progress["epoch"] == 0
    assert progress["segments"] == [
        {"worldSize": 4, "consumed": [[list(p) for p in FIRST[r]] for r in range(4)]}
    ]

    cp.kubectl("delete", "job", "first", "-n", cp.team_ns, "--cascade=foreground", "--wait=true")
    wait_for(
        lambda: not cp.get("pods", "-n", cp.team_ns, "-l", "batch.kubernetes.io/job-name=first")["items"],
        what="the first Job's pods gone",
    )
    pods = cp.indexed_job("second", "elastic", completions=2)
    second = []
    for rank, pod in enumerate(pods):
        token = cp.pod_token(pod)
        plan = _plan(cp, pod, token)
        assert plan.resume is not None
        assert (plan.rank, plan.world_size, plan.resume.progress.segment) == (rank, 2, 1)
        recut = plan.rows[plan.resume.first : plan.resume.first + plan.resume.items]
        second.append(len(recut))
        visited.update(row.id for row in recut)
        # The re-cut's blobs are the pod's: it may ask for their URLs.
        blob = recut[-1].blob
        assert cp.broker(BrokerPaths.URLS, token, {"blobs": [blob]}).status_code == 200
        status, text = _report(cp, token, segment=1, world_size=2, rank=rank, consumed=((len(recut),),))
        assert status == 200, text
    assert second[0] == second[1], "equal counts in the re-cut"
    matching = {r.id for r in cp.records if r.labels.get("car", 0) > 0}
    assert set(visited) == matching, "nothing skipped"
    # Repeats only where the first Job's pad and the re-cut's pad put them.
    first_pad = -len(matching) % 4
    left = len(matching) - sum(sum(consumed(-(-len(matching) // 4), FIRST[r])) for r in range(4))
    assert sum(visited.values()) - len(matching) <= first_pad + (-left % 2)

    # A pod of another world size reporting into the closed segment is refused.
    cp.apply(cp.pod("straggler", "trainer", "elastic"))
    straggler = cp.get("pod", "straggler", "-n", cp.team_ns)
    status, text = _report(cp, cp.pod_token(straggler), world_size=1, rank=0, consumed=((1,),))
    assert status == 409
    assert "closed" in text
    progress = cp.get("datasetstreams", "elastic", "-n", cp.team_ns)["status"]["progress"]
    assert [s["worldSize"] for s in progress["segments"]] == [4, 2]
    assert len(progress["owners"]) == 2
