"""A DatasetStream end to end: webhook-injected pods stream their shards through sidecars in broker mode.

A Dataset in ``data`` (storage on the SigV4-enforcing S3 server, keys in a Secret there), a DatasetStream in
``team-a`` with a query, a RoleBinding granting ``stream``, and an Indexed Job of 4 pods. Pods never run
containers on the testbed (kwok), so each pod's sidecar and trainer run here as processes, with exactly the
environment the webhook injected into that pod (only the socket and token paths moved to a temp dir) and a
real token from the TokenRequest API bound to that pod. No storage credentials reach those processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sluicegate
from sluicegate import Store
from sluicegate.core import ledger
from sluicegate.core import protocol as proto
from sluicegate.core.broker_protocol import SOCKET_PATH, BrokerPaths, PlanResponse, SidecarEnv, TrainerEnv

from tests.e2e.conftest import ControlPlane, control_plane
from tests.e2e.localpod import LocalPod, shard_of
from tests.s3server import S3Server
from tests.sidecar.helpers import metrics
from tests.testbed import Testbed, wait_for

pytestmark = pytest.mark.e2e

QUERY = "labels.car > 0"
WORLD = 4
PRESIGN_TTL_S = 6  # short, so the test sees URLs expire

# The trainer: what a training script does with the pod's shard.
TRAINER = """
import hashlib, json, sluicegate
ds = sluicegate.connect(timeout=45)
print(json.dumps([[item.id, item.blob, hashlib.sha256(item.data).hexdigest()] for item in ds]))
"""
# One that records the ledger of run RUN: the sidecar passes its reports on to the broker.
RUN = "e2e-run"
# It closes the dataset: the ledger's last records are written then, waiting up to 10 s (at exit, 4 s).
LEDGER_TRAINER = (
    TRAINER.replace("timeout=45)", f"timeout=45, ledger=sluicegate.Ledger(run={RUN!r}, flush_items=3))")
    + "ds.close()\n"
)


@pytest.fixture(scope="module")
def cp(testbed: Testbed, s3: S3Server) -> Iterator[ControlPlane]:
    with control_plane(
        testbed,
        s3,
        data_ns="data",
        team_ns="team-a",
        operator_args=(f"--presign-ttl-s={PRESIGN_TTL_S}",),
    ) as plane:
        yield plane


@pytest.fixture(scope="module")
def pods(cp: ControlPlane) -> list[dict[str, Any]]:
    cp.apply(cp.stream("train", query=QUERY, sharding={"seed": 7}))
    return cp.indexed_job("trainer", "train", completions=WORLD)


@pytest.fixture(scope="module")
def expected(cp: ControlPlane) -> dict[str, str]:
    """The query result read from the store directly (with the keys only the operator holds): id -> sha256."""
    ds = sluicegate.open(cp.uri, query=QUERY, s3=cp.s3_options)
    return {item.id: hashlib.sha256(item.data).hexdigest() for item in ds}


@pytest.fixture
def local_pods(cp: ControlPlane, pods: list[dict[str, Any]]) -> Iterator[list[LocalPod]]:
    # A short path: a unix socket's path must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="sg-") as tmp, contextlib.ExitStack() as stack:
        local = []
        for pod in pods:
            root = Path(tmp) / pod["metadata"]["name"][-8:]
            root.mkdir()
            local.append(LocalPod.of(pod, cp, root))
            stack.callback(local[-1].stop)
        yield local


def test_four_ranks_stream_disjoint_equal_shards_of_exactly_the_query(
    cp: ControlPlane, pods: list[dict[str, Any]], local_pods: list[LocalPod], expected: dict[str, str]
) -> None:
    for index, pod in enumerate(pods):
        annotations = pod["metadata"]["annotations"]
        ranks = (annotations["sluicegate.io/rank"], annotations["sluicegate.io/world-size"])
        assert ranks == (str(index), str(WORLD))
        assert local_pods[index].trainer_env[TrainerEnv.RANK] == str(index)
        injected = pod["spec"]["initContainers"][0]["env"]
        assert {"name": SidecarEnv.LISTEN, "value": f"unix://{SOCKET_PATH}"} in injected
        trainer = pod["spec"]["containers"][0]["env"]
        assert {"name": TrainerEnv.ADDRESS, "value": f"unix://{SOCKET_PATH}"} in trainer
        env_text = json.dumps(local_pods[index].sidecar_env)
        assert cp.s3.secret_key not in env_text
        assert cp.s3.access_key not in env_text
    for pod, local in zip(pods, local_pods, strict=True):
        local.start(cp.pod_token(pod))
    for local in local_pods:
        wait_for(local.ready, timeout_s=40, what=f"sidecar of {local.name} ready")

    # Rank 0 reads only after URLs issued with its plan would have expired (the store refuses them): its
    # sidecar asked for rows only and gets URLs in windows as it reads, so none it uses is stale.
    stale = PlanResponse.model_validate_json(
        cp.broker(BrokerPaths.PLAN, cp.pod_token(pods[0]), {"presign": True}).content
    )
    trainers = {rank: local_pods[rank].train(TRAINER) for rank in range(1, WORLD)}
    shards = {rank: shard_of(trainer, local_pods[rank]) for rank, trainer in trainers.items()}
    time.sleep(max(0.0, stale.expires_at.timestamp() - time.time()) + 1)
    with httpx.Client(trust_env=False) as http:
        refused = http.get(stale.urls[stale.rows[0].blob])
    assert refused.status_code == 403, "the storage server refuses a presigned URL past its expiry"
    shards[0] = shard_of(local_pods[0].train(TRAINER), local_pods[0])

    per_rank = -(-len(expected) // WORLD)
    assert {rank: len(shard) for rank, shard in shards.items()} == dict.fromkeys(range(WORLD), per_rank)
    for rank, shard in shards.items():
        for item_id, blob, sha in shard:
            assert sha == blob == expected[item_id], f"rank {rank}: bytes of {item_id} do not match the store"
    seen = Counter(item_id for shard in shards.values() for item_id, _, _ in shard)
    assert set(seen) == set(expected), "together the ranks serve exactly the query result"
    padding = WORLD * per_rank - len(expected)
    assert sum(seen.values()) - len(seen) == padding, "disjoint but for the padding that equalises counts"

    for rank, local in enumerate(local_pods):
        info = local.get("/v1/info")
        assert info is not None
        served = info.json()
        assert (served["rank"], served["world_size"], served["total"]) == (rank, WORLD, len(expected))
    counters = metrics(local_pods[0].get("/metrics").text)  # type: ignore[union-attr]
    assert counters["sluicegate_items_served_total"] == per_rank
    assert counters['sluicegate_url_renewals_total{reason="ahead"}'] >= 1, local_pods[0].logs()
    assert counters['sluicegate_url_renewals_total{reason="refused"}'] == 0, local_pods[0].logs()


def test_token_of_another_audience_is_refused_until_a_good_one_arrives(
    cp: ControlPlane, pods: list[dict[str, Any]], local_pods: list[LocalPod]
) -> None:
    local = local_pods[1].start(cp.pod_token(pods[1], audience="other.example.com"))

    def refusal() -> str | None:
        assert not local.ready(), "a sidecar with a foreign token must not become ready"
        response = local.get("/readyz")
        if response is None or "broker refused" not in response.text:
            return None
        return str(response.json()["message"])

    message = wait_for(refusal, timeout_s=30, what="the sidecar to report the broker's refusal")
    assert "HTTP 401" in message
    assert "audience" in message
    assert "the broker refused (HTTP 401 unauthenticated)" in local.logs()
    # The kubelet rotates the projected token in place: the sidecar re-reads it and recovers on its own.
    (local.root / "token").write_text(cp.pod_token(pods[1]))
    wait_for(local.ready, timeout_s=30, what="the sidecar to recover with a good token")


def test_the_broker_records_each_pods_ledger_as_that_pod(
    cp: ControlPlane, pods: list[dict[str, Any]], local_pods: list[LocalPod]
) -> None:
    """Two ranks train with the ledger on; their sidecars hold no store keys and pass the reports on to
    the broker, which writes them into the Dataset's ledger naming the pod its token is bound to. Then the
    attacker's moves against the broker's endpoint with a pod's own token."""
    for rank in (0, 1):
        local_pods[rank].start(cp.pod_token(pods[rank]))
    for rank in (0, 1):
        wait_for(local_pods[rank].ready, timeout_s=40, what=f"sidecar of {local_pods[rank].name} ready")
    shards = {rank: shard_of(local_pods[rank].train(LEDGER_TRAINER), local_pods[rank]) for rank in (0, 1)}
    store = Store(cp.uri, cp.s3_options)
    chains = ledger.read_run(store, RUN)
    told = "\n".join(f"{p.name}: trainer:\n{p.trainer_logs()}\nsidecar:\n{p.logs()}" for p in local_pods[:2])
    assert len(chains) == 2, f"{chains}\n{told}"
    assert all(c.broken is None for c in chains), chains
    by_pod = {c.records[0].writer.pod: c for c in chains}
    assert set(by_pod) == {pods[0]["metadata"]["name"], pods[1]["metadata"]["name"]}
    for rank in (0, 1):
        chain = by_pod[pods[rank]["metadata"]["name"]]
        for record in chain.records:
            assert (record.writer.namespace, record.writer.stream) == (cp.team_ns, "train")
            broker_view = record.reading.views[0]
            assert broker_view.queries == (QUERY,)
            assert broker_view.shard is not None
            assert (broker_view.shard.rank, broker_view.shard.world_size, broker_view.shard.seed) == (
                rank,
                WORLD,
                7,
            )
            assert record.manifest == ledger.Resolver(store).manifest(record.version).digest
        [passage] = ledger.run_items(store, RUN, rank=str(rank), epoch=0)
        assert passage.ids == [item_id for item_id, _, _ in shards[rank]], "the exact sequence, reproduced"
    some = shards[1][0][0]
    uses, broken, _ = ledger.item_uses(store, some)
    assert not broken
    assert [(u.run, u.rank, u.epoch) for u in uses if u.run == RUN] == [(RUN, "1", 0)]

    # The attacker holds rank 0's token and writes reports to the broker itself.
    token = cp.pod_token(pods[0])
    reading = ledger.Reading(views=(ledger.View(),), seed=None, rank=0, epoch=0, order=ledger.Order.EPOCH)

    def report(number: int, end: int, **writer: Any) -> httpx.Response:
        body = proto.LedgerReport(
            run="forged",
            chain="x",
            number=number,
            consumed=ledger.Consumed(reading=reading, ranges=((0, end),)),
            writer=ledger.Writer(host="h", pid=1, **writer),
        )
        return cp.broker(BrokerPaths.LEDGER, token, json.loads(body.model_dump_json()))

    # Claiming to be another pod, stream and namespace: recorded as what the token says, nothing else.
    assert report(0, 2, namespace=cp.data_ns, stream="other", pod="someone-else").status_code == 200
    [chain] = ledger.read_run(store, "forged")
    who = chain.records[0].writer
    assert (who.namespace, who.stream, who.pod) == (cp.team_ns, "train", pods[0]["metadata"]["name"])
    assert chain.records[0].reading.views[0].shard.rank == 0  # type: ignore[union-attr]
    # Rewriting a recorded report, or skipping ahead to leave a hole: refused, the chain intact.
    rewritten = report(0, 3)
    assert rewritten.status_code == 400, rewritten.text
    assert "other content" in rewritten.text
    ahead = report(5, 2)
    assert ahead.status_code == 409, ahead.text
    assert "not written yet" in ahead.text
    assert report(0, 2, namespace=cp.data_ns, stream="other", pod="someone-else").status_code == 200, (
        "a retry"
    )
    no_token = cp.broker(BrokerPaths.LEDGER, None, {})
    assert no_token.status_code == 401
    [chain] = ledger.read_run(store, "forged")
    assert chain.broken is None
    assert [r.ranges for r in chain.records] == [((0, 2),)]
