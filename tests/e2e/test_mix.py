"""A DatasetStream that mixes two Datasets (spec.sources), end to end on a real API server.

The operator resolves each source (status.sources: versions, counts, each source's part of a rank's
epoch); admission checks the pod's ServiceAccount may stream every source and injects a sidecar per
source; each sidecar asks the broker for its own source's shard (``?source=``). The pods' processes run
here (tests/e2e/localpod.py). The trainer's ``sluicegate.connect()`` returns the mix, and it is exactly
the mix ``sluicegate.mix`` reads embedded from the stores with the same weights, seed and shard.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sluicegate
from sluicegate import Store
from sluicegate.core import ledger
from sluicegate.core import protocol as proto
from sluicegate.core.broker_protocol import BrokerPaths, MixEnv, PlanResponse, TrainerEnv
from sluicegate.core.ledger import Consumed, Order, Reading, View, Writer

from tests.e2e.conftest import ControlPlane, control_plane
from tests.e2e.localpod import LocalPod, env_of
from tests.operator import devcluster
from tests.s3server import S3Server
from tests.testbed import Testbed, wait_for

pytestmark = pytest.mark.e2e

SEED, WORLD = 11, 2
WEIGHTS = {"coco": 0.75, "web": 0.25}
QUERIES = {"coco": "labels.car > 0", "web": ""}
WEB_URI: dict[str, str] = {}  # the store of the Dataset "web", by the control plane's team namespace
TRAINER = """
import json, sluicegate
ds = sluicegate.connect(timeout=45)
epochs = []
for epoch in (0, 1):
    ds.set_epoch(epoch)
    epochs.append([[item.source, item.id, item.data.decode()] for item in ds])
print(json.dumps({"epochs": epochs, "len": len(ds), "counts": ds.counts()}))
"""


@pytest.fixture(scope="module")
def cp(testbed: Testbed, s3: S3Server) -> Iterator[ControlPlane]:
    with control_plane(
        testbed,
        s3,
        service_accounts=("trainer", "half"),
    ) as plane:
        # A second Dataset, "web"; only the ServiceAccount trainer may stream it.
        web_uri, _ = devcluster.sample_dataset(s3, f"web-{uuid.uuid4().hex[:6]}", 18)
        devcluster.publish_dataset(testbed, plane.data_ns, web_uri, s3, name="web")
        plane.kubectl(
            "create", "role", "web-stream", "-n", plane.data_ns, "--verb=stream",
            "--resource=datasets.sluicegate.io", "--resource-name=web",
        )  # fmt: skip
        plane.kubectl(
            "create", "rolebinding", "web-stream-trainer", "-n", plane.data_ns, "--role=web-stream",
            f"--serviceaccount={plane.team_ns}:trainer",
        )  # fmt: skip
        WEB_URI[plane.team_ns] = web_uri
        yield plane


def _mix_stream(cp: ControlPlane, name: str) -> dict[str, Any]:
    sources = [
        {"name": n, "dataset": {"namespace": cp.data_ns, "name": n}, "query": QUERIES[n], "weight": w}
        for n, w in WEIGHTS.items()
    ]
    return {
        "apiVersion": "sluicegate.io/v1alpha1",
        "kind": "DatasetStream",
        "metadata": {"name": name, "namespace": cp.team_ns},
        "spec": {"sources": sources, "sharding": {"seed": SEED}, "sidecar": {"metricsPort": 0}},
    }


def _embedded(cp: ControlPlane, rank: int) -> sluicegate.Mix:
    """The same mix read embedded, from the stores with the operator's keys."""
    uris = {"coco": cp.uri, "web": WEB_URI[cp.team_ns]}
    sources = {n: sluicegate.open(uris[n], query=QUERIES[n] or None, s3=cp.s3_options) for n in WEIGHTS}
    return sluicegate.mix(sources, WEIGHTS, seed=SEED).shard(rank, WORLD)


def test_a_job_over_a_mix_reads_each_source_through_its_own_sidecar(cp: ControlPlane) -> None:
    devcluster.apply_admitted(cp.testbed, _mix_stream(cp, "mixed"))
    ready = cp.wait_ready("datasetstreams", cp.team_ns, "mixed")
    coco = sum(1 for r in cp.records if r.labels.get("car", 0) > 0)
    sources = {s["name"]: s for s in ready["status"]["sources"]}
    assert {n: (s["resolvedVersion"], s["matchedItems"]) for n, s in sources.items()} == {
        "coco": (1, coco),
        "web": (1, 18),
    }
    assert ready["status"]["matchedItems"] == coco + 18

    pods = cp.indexed_job("mixjob", "mixed", completions=WORLD)
    # The stream leaves the world size open: it learns it from the pods it admitted.
    status = wait_for(
        lambda: (
            (s := cp.get("datasetstreams", "mixed", "-n", cp.team_ns)["status"]).get("itemsPerShard") and s
        ),
        what="the stream's shards cut for its pods' world size",
    )
    embedded = {rank: _embedded(cp, rank) for rank in range(WORLD)}
    assert status["itemsPerShard"] == len(embedded[0]), "the status says each rank's epoch of the mix"
    assert {s["name"]: s["itemsPerEpoch"] for s in status["sources"]} == embedded[0].counts()

    seen: Counter[tuple[str, str]] = Counter()
    with tempfile.TemporaryDirectory(prefix="sg-") as tmp, contextlib.ExitStack() as stack:
        for rank, pod in enumerate(pods):
            names = [c["name"] for c in pod["spec"]["initContainers"]]
            assert names == ["sluicegate-sidecar-coco", "sluicegate-sidecar-web"]
            mix = MixEnv.model_validate_json(env_of(pod["spec"]["containers"][0])[TrainerEnv.MIX])
            assert (mix.seed, [s.weight for s in mix.sources]) == (SEED, list(WEIGHTS.values()))
            got = _train(cp, pod, TRAINER, Path(tmp) / str(rank), stack)
            expected = embedded[rank]
            assert got["len"] == len(expected)
            assert got["counts"] == expected.counts()
            for epoch, items in enumerate(got["epochs"]):
                expected.set_epoch(epoch)
                assert items == [[i.source, i.id, i.data.decode()] for i in expected], (
                    f"rank {rank} epoch {epoch}"
                )
                if epoch == 0:
                    seen.update((source, item_id) for source, item_id, _ in items)
    # Together the ranks' first epoch: no item of a source twice beyond the pad, each source in its share.
    by_source = Counter(source for source, _ in seen.elements())
    assert by_source == {n: c * WORLD for n, c in embedded[0].counts().items()}

    # A sidecar asking for no source, or one the stream does not have, is refused by the broker.
    token = cp.pod_token(pods[0])
    no_source = cp.broker(BrokerPaths.PLAN, token, {})
    assert no_source.status_code == 400
    assert "is a mix" in no_source.text
    other = cp.broker(BrokerPaths.PLAN + "?source=other", token, {})
    assert other.status_code == 404, other.text


RUN = "elastic-mix-run"
RECORDED = f"ledger=sluicegate.Ledger(run={RUN!r}, flush_items=3)"
PARTLY = f"""
import json, sluicegate
ds = sluicegate.connect(timeout=45, {RECORDED})
got = []
for item in ds:
    got.append([item.source, item.id])
    if len(got) == TAKE:
        break
ds.close()  # the last progress report on its way to the sidecar
print(json.dumps(got))
"""


def _train(
    cp: ControlPlane, pod: dict[str, Any], script: str, root: Path, stack: contextlib.ExitStack
) -> Any:
    """``pod``'s two sidecars started here (stopped by ``stack``; left running until then) and its trainer
    run through them: what the trainer printed, as JSON."""
    token = cp.pod_token(pod)
    sidecars = []
    for name in ("sluicegate-sidecar-coco", "sluicegate-sidecar-web"):
        where = root.with_name(f"{root.name}{name[-4:]}")
        where.mkdir()
        local = LocalPod.of(pod, cp, where, container=name)
        stack.callback(local.stop)
        sidecars.append(local.start(token))
    for local in sidecars:
        wait_for(local.ready, timeout_s=40, what=f"sidecar {local.root.name} ready")
    env = env_of(pod["spec"]["containers"][0])
    for local in sidecars:  # the trainer's environment names both moved sockets
        env = local.moved(env)
    trainer = sidecars[0].train(script, env=env)
    out, err = trainer.communicate(timeout=90)
    assert trainer.returncode == 0, f"{err}\n{sidecars[0].logs()}\n{sidecars[1].logs()}"
    return json.loads(out)


def _run_job(
    cp: ControlPlane,
    job: str,
    stream: str,
    world: int,
    script: str,
    tmp: Path,
    then: Callable[[list[dict[str, Any]]], None] = lambda pods: None,
) -> list[Any]:
    """Each pod of an Indexed Job of ``world`` pods runs ``script`` through its two sidecars (left running:
    they pass the trainer's last progress report on); what each trainer printed, by rank. ``then(pods)``
    runs before the Job is deleted."""
    pods = cp.indexed_job(job, stream, completions=world)
    outputs = []
    with contextlib.ExitStack() as stack:
        for rank, pod in enumerate(pods):
            outputs.append(_train(cp, pod, script, tmp / f"{job}-{rank}", stack))
        # Every rank's report reached the stream (a sidecar passes the last one on within a second).
        wait_for(
            lambda: (
                (progress := cp.get("datasetstreams", stream, "-n", cp.team_ns)["status"].get("progress"))
                and all(c for c in progress["segments"][-1]["consumed"])
            ),
            timeout_s=30,
            what="the stream's progress from every rank",
        )
        then(pods)
    cp.kubectl("delete", "job", job, "-n", cp.team_ns, "--cascade=foreground", "--wait=true")
    return outputs


TRAINER_REST = f"""
import json, sluicegate
ds = sluicegate.connect(timeout=45, {RECORDED})
epoch = ds.epoch
got = [[item.source, item.id] for item in ds]
ds.close()
print(json.dumps({{"epoch": epoch, "got": got}}))
"""


def test_a_mix_job_recreated_at_another_parallelism_continues_the_epoch(cp: ControlPlane) -> None:
    """2 pods read 7 items each of the mix's epoch 0 and stop; the stream keeps what they consumed. The
    Job re-created with 3 pods reads the rest of that epoch, each pod through its two sidecars: together
    every item the 2-rank epoch picked, once (but the re-cut's pad), and the 3 ranks read equal amounts."""
    devcluster.apply_admitted(cp.testbed, _mix_stream(cp, "elastic-mix"))
    cp.wait_ready("datasetstreams", cp.team_ns, "elastic-mix")
    take = 7
    with tempfile.TemporaryDirectory(prefix="sg-") as tmp:
        first = _run_job(cp, "first-mix", "elastic-mix", 2, PARTLY.replace("TAKE", str(take)), Path(tmp))
        assert [len(got) for got in first] == [take, take]
        progress = cp.get("datasetstreams", "elastic-mix", "-n", cp.team_ns)["status"]["progress"]
        assert progress["segments"] == [{"worldSize": 2, "consumed": [[[take]], [[take]]]}]
        second = _run_job(
            cp, "second-mix", "elastic-mix", 3, TRAINER_REST, Path(tmp), then=lambda pods: _attacks(cp, pods)
        )
    assert [out["epoch"] for out in second] == [0, 0, 0], "the re-created pods continue epoch 0"
    rest = [out["got"] for out in second]
    assert len({len(got) for got in rest}) == 1, "equal ranks in the re-cut"
    picked: set[tuple[str | None, str]] = set()
    for rank in range(WORLD):
        expected = _embedded(cp, rank)
        expected.set_epoch(0)
        picked |= {(i.source, i.id) for i in expected}
    done = {(s, i) for got in first for s, i in got}
    later = [(s, i) for got in rest for s, i in got]
    assert not done & set(later), "nothing read before is read again"
    assert done | set(later) == picked, "every item the epoch picked, and nothing else"
    assert len(later) - len(set(later)) == -len(picked - done) % 3, "repeats: the re-cut's pad only"
    progress = cp.get("datasetstreams", "elastic-mix", "-n", cp.team_ns)["status"]["progress"]
    assert [s["worldSize"] for s in progress["segments"]] == [2, 3]

    # The ledger of each source says what each pod read, re-cut rows included, as the pod's own rank.
    stores = {"coco": Store(cp.uri, cp.s3_options), "web": Store(WEB_URI[cp.team_ns], cp.s3_options)}
    for name, store in stores.items():
        recorded = Counter(i for p in ledger.run_items(store, RUN, epoch=0) for i in p.ids)
        assert recorded == Counter(i for s, i in [*done, *later] if s == name), name
        for rank, got in enumerate(rest):
            passages = ledger.run_items(store, RUN, rank=str(rank), epoch=0)
            before = [i for s, i in (first[rank] if rank < WORLD else []) if s == name]
            recut = [i for s, i in got if s == name]
            assert sorted(i for p in passages for i in p.ids) == sorted(before + recut), (name, rank)
            assert recut in [p.ids for p in passages], f"{name}: rank {rank}'s re-cut reads, in order"
        records = [r for c in ledger.read_run(store, RUN) for r in c.records]
        assert all(c.broken is None for c in ledger.read_run(store, RUN))
        recut_views = {r.reading.views for r in records if r.reading.views[0].shard is None}
        assert recut_views == {(View(queries=(QUERIES[name],) if QUERIES[name] else ()),)}, name


def _attacks(cp: ControlPlane, pods: list[dict[str, Any]]) -> None:
    """A pod of the re-cut Job, with its own token: it may fetch its re-cut rows, and nothing of another
    rank's; it cannot report for another rank, for the closed segment, or less than it reported."""
    tokens = [cp.pod_token(pod) for pod in pods]
    plans = [
        PlanResponse.model_validate_json(cp.broker(BrokerPaths.PLAN + "?source=coco", t, {}).content)
        for t in tokens[:2]
    ]
    resume = plans[0].resume
    assert resume is not None
    assert (resume.mix, resume.progress.segment) == (True, 1)
    mine = {row.blob for row in plans[0].rows}
    recut = plans[0].rows[resume.first : resume.first + resume.items]
    assert recut, "rank 0 has coco items in its block"
    urls = BrokerPaths.URLS + "?source=coco"
    assert cp.broker(urls, tokens[0], {"blobs": [recut[0].blob]}).status_code == 200
    theirs = [row.blob for row in plans[1].rows if row.blob not in mine]
    assert theirs, "rank 1 has coco rows rank 0 has not"
    refused = cp.broker(urls, tokens[0], {"blobs": [theirs[0]]})
    assert refused.status_code == 403, refused.text
    progress = BrokerPaths.PROGRESS + "?source=coco"
    report = {"epoch": 0, "segment": 1, "world_size": 3, "rank": 1, "consumed": [[1]]}
    assert cp.broker(progress, tokens[0], report).status_code == 403  # another rank
    closed = cp.broker(progress, tokens[0], {**report, "rank": 0, "segment": 0, "world_size": 2})
    assert closed.status_code == 403, closed.text  # not its grant's world size either
    lowered = cp.broker(progress, tokens[0], {**report, "rank": 0, "consumed": [[1]]})
    assert lowered.status_code == 409, lowered.text
    assert "consumed less" in lowered.text
    _ledger_attacks(cp, tokens[0], plans[0])


def _ledger_attacks(cp: ControlPlane, token: str, plan: PlanResponse) -> None:
    """Reports of re-cut rows, written to the broker with the pod's own token: what is recorded is the
    selection the broker serves that pod in its block, whatever the body claims; rows past the block, or
    a re-cut the stream does not keep, are refused and nothing is written."""
    resume = plan.resume
    assert resume is not None
    recut_rows = plan.rows[resume.first : resume.first + resume.items]
    ledger_path = BrokerPaths.LEDGER + "?source=coco"

    def report(number: int, ranges: tuple[tuple[int, int], ...], progress: Any = resume.progress) -> Any:
        reading = Reading(views=(View(),), seed=None, rank=0, epoch=0, order=Order.INDEX, progress=progress)
        body = proto.LedgerReport(
            run="forged-recut",
            chain="x",
            number=number,
            consumed=Consumed(reading=reading, ranges=ranges),
            writer=Writer(host="h", pid=1),
        )
        return cp.broker(ledger_path, token, json.loads(body.model_dump_json()))

    past = report(0, ((0, resume.items + 1),))
    assert past.status_code == 400, past.text
    assert "outside" in past.text
    stale = report(0, ((0, 1),), progress=resume.progress.recut(2))  # a re-cut the stream does not keep
    assert stale.status_code == 400, stale.text
    assert "serves no re-cut" in stale.text
    assert report(0, ((0, 1),), progress=resume.progress.lockstep(((5,),))).status_code == 200
    store = Store(cp.uri, cp.s3_options)
    [chain] = ledger.read_run(store, "forged-recut")
    [record] = chain.records
    assert record.reading.views == (View(queries=(QUERIES["coco"],)),)
    assert record.reading.ranks == "0"
    [passage] = ledger.run_items(store, "forged-recut")
    assert passage.ids == [recut_rows[0].id], "recorded as the row the broker serves the pod"


def test_a_pod_that_may_not_stream_every_source_is_refused(cp: ControlPlane) -> None:
    """ServiceAccount half may stream coco but not web: its pod is refused at admission, naming web."""
    devcluster.apply_admitted(cp.testbed, _mix_stream(cp, "halfway"))
    cp.wait_ready("datasetstreams", cp.team_ns, "halfway")
    refused = cp.kubectl(
        "create", "-f", "-", input=json.dumps(cp.pod("half-pod", "half", "halfway")), check=False
    )
    assert refused.returncode != 0
    assert "web" in refused.stderr
    assert "stream" in refused.stderr


def test_a_mix_that_says_something_impossible_is_refused_by_the_api_server(cp: ControlPlane) -> None:
    bad = _mix_stream(cp, "bad")
    bad["spec"]["dataset"] = {"name": "coco"}
    result = cp.kubectl("apply", "-f", "-", input=json.dumps(bad), check=False)
    assert result.returncode != 0
    assert "exactly one of spec.dataset and spec.sources" in result.stderr
    bad = _mix_stream(cp, "bad")
    bad["spec"]["query"] = "labels.car > 0"
    result = cp.kubectl("apply", "-f", "-", input=json.dumps(bad), check=False)
    assert "each source has its own query" in result.stderr
    bad = _mix_stream(cp, "bad")
    bad["spec"]["sources"][1]["name"] = "coco"
    result = cp.kubectl("apply", "-f", "-", input=json.dumps(bad), check=False)
    assert result.returncode != 0
    assert "Duplicate value" in result.stderr
