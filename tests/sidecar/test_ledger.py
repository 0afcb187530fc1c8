"""The ledger through a sidecar: trainers report what they consumed, a store-mode sidecar records it.
In broker mode the broker records it: tests/e2e/test_stream_e2e.py."""

from __future__ import annotations

from pathlib import Path

import httpx
import sluicegate
from sluicegate import Ledger, Store
from sluicegate.core import ledger
from sluicegate.core import protocol as proto
from sluicegate.core.ledger import Consumed, Order, Reading, View, Writer
from sluicegate.core.partition import Progress

from tests.sidecar.helpers import InProcessSidecar, make_dataset

N = 47


def _args(uri: str, tmp_path: Path, *extra: str) -> list[str]:
    sock = tmp_path / "sock" / "sidecar.sock"
    return [
        "--store", uri, "--rank", "1", "--world-size", "2", "--seed", "4", "--query", "labels.car >= 1",
        "--listen", f"127.0.0.1:0,unix://{sock}", *extra,
    ]  # fmt: skip


def test_a_store_mode_sidecar_records_what_its_trainer_consumed(tmp_path: Path) -> None:
    uri = str(tmp_path / "ds")
    make_dataset(uri, N, size=100)
    with InProcessSidecar(_args(uri, tmp_path, "--stream", "cars", "--namespace", "team-a")) as sc:
        unix = next(a for a in sc.addresses if a.startswith("unix://"))
        ds = sluicegate.connect(unix, ledger=Ledger(run="run-1", flush_items=5))
        local = ds.slice('meta.split = "train"').shard(0, 2)  # a trainer's own cut on top of the sidecar's
        seen = {}
        for epoch in (0, 1):
            local.set_epoch(epoch)
            seen[epoch] = [item.id for item in local]
        picked = [item.id for item in ds.get_many([2, 0])]
        local.close()
        ds.close()
    store = Store(uri)
    [chain] = ledger.read_run(store, "run-1")
    assert chain.broken is None
    first = chain.records[0]
    sidecar_view, trainer_view = first.reading.views
    assert sidecar_view.queries == ("labels.car >= 1",)
    assert sidecar_view.shard is not None
    assert (sidecar_view.shard.rank, sidecar_view.shard.world_size, sidecar_view.shard.seed) == (1, 2, 4)
    assert trainer_view.queries == ('meta.split = "train"',)
    assert first.reading.ranks == "1.0"
    assert (first.writer.namespace, first.writer.stream) == ("team-a", "cars")
    assert (first.dataset, first.version) == (store.uri, 1)
    assert first.manifest == ledger.Resolver(store).manifest(1).digest
    for epoch in (0, 1):
        [passage] = ledger.run_items(store, "run-1", rank="1.0", epoch=epoch)
        assert passage.ids == seen[epoch]
    [random] = [p for p in ledger.run_items(store, "run-1", rank="1") if p.order is Order.INDEX]
    assert random.ids == picked


def test_a_report_sent_again_is_recorded_once_and_one_out_of_order_refused(tmp_path: Path) -> None:
    uri = str(tmp_path / "ds")
    make_dataset(uri, N, size=100)
    reading = Reading(views=(View(),), seed=None, rank=1, epoch=0, order=Order.EPOCH)

    def report(number: int) -> str:
        consumed = Consumed(reading=reading, ranges=((number, number + 1),))
        return proto.LedgerReport(
            run="run-1", chain="trainer", number=number, consumed=consumed, writer=Writer(host="h", pid=1)
        ).model_dump_json()

    with InProcessSidecar(_args(uri, tmp_path)) as sc:
        sc.wait_ready()  # a report before the plan is loaded is answered 503, which the SDK retries
        post = lambda body: httpx.post(sc.tcp + proto.Paths.LEDGER, content=body, timeout=10)  # noqa: E731
        assert post(report(0)).status_code == 204
        assert post(report(0)).status_code == 204  # its answer was lost: the trainer sends it again
        assert post(report(1)).status_code == 204
        refused = post(report(3))
        assert refused.status_code == 400
        assert "came before report 2" in refused.json()["message"]
        assert post("{}").status_code == 400
        # A report of a mix's re-cut rows: this sidecar serves no mix, so there is nothing to record it as.
        recut = reading.model_copy(
            update={"order": Order.INDEX, "progress": Progress.start(0, 2).lockstep(((1,),)).recut(3)}
        )
        forged = proto.LedgerReport(
            run="run-1",
            chain="trainer",
            number=2,
            consumed=Consumed(reading=recut, ranges=((0, 1),)),
            writer=Writer(host="h", pid=1),
        )
        refused = post(forged.model_dump_json())
        assert refused.status_code == 400
        assert "serves no re-cut of a mix" in refused.json()["message"]
    [chain] = ledger.read_run(Store(uri), "run-1")
    assert [r.ranges for r in chain.records] == [((0, 1),), ((1, 2),)]
