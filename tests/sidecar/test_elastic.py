"""Elastic resume through sidecars (store mode): a checkpoint of 4 ranks is continued by 2 sidecars given
the epoch's progress, serving exactly what the embedded data path would, and trainers report progress."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import httpx
import pytest
import sluicegate
from sluicegate import Dataset, Store
from sluicegate.core import ledger
from sluicegate.core import protocol as proto
from sluicegate.core.partition import per_rank
from sluicegate.torch import IterDataset

from tests.sidecar.helpers import InProcessSidecar, make_dataset
from tests.testbed import wait_for

N = 45


def _args(uri: str, tmp_path: Path, rank: int, world: int, *extra: str) -> list[str]:
    sock = tmp_path / f"sock{world}-{rank}" / "sidecar.sock"
    return [
        "--store", uri, "--rank", str(rank), "--world-size", str(world), "--seed", "6",
        "--listen", f"127.0.0.1:0,unix://{sock}", *extra,
    ]  # fmt: skip


def _take(ds: Dataset, count: int) -> list[str]:
    taken = []
    for item in ds:
        taken.append(item.id)
        if len(taken) == count:
            break
    return taken


def test_four_sidecars_to_two_continue_the_epoch_exactly(tmp_path: Path) -> None:
    uri = str(tmp_path / "ds")
    make_dataset(uri, N, size=64)
    seen: Counter[str] = Counter()
    state = None
    for rank in range(4):
        with InProcessSidecar(_args(uri, tmp_path, rank, 4)) as sc:
            ds = sluicegate.connect(sc.tcp)
            ds.set_epoch(2)
            seen.update(_take(ds, 5))
            if rank == 0:
                state = ds.state_dict()
                assert (state["world_size"], state["rank"], state["position"]) == (4, 0, 5)
            # The trainer told its sidecar how far it got.
            report = wait_for(lambda sc=sc: sc.sidecar.progress, what="a progress report")
            assert (report.epoch, report.segment, report.world_size, report.rank) == (2, 0, 4, rank)
            assert report.consumed == ((5,),)
            ds.close()
    assert state is not None
    progress = Dataset.progress_of(state)
    assert progress is not None
    embedded = sluicegate.open(uri).shuffle(6).shard(1, 2)
    embedded.load_state_dict(state)
    want_rank1 = [i.id for i in embedded]
    for rank in range(2):
        with InProcessSidecar(_args(uri, tmp_path, rank, 2, "--progress", progress.model_dump_json())) as sc:
            ds = sluicegate.connect(sc.tcp, ledger="elastic-run" if rank == 1 else None)
            assert ds.epoch == 2, "a trainer without a checkpoint starts where the stream stands"
            assert ds._source.resume is not None
            if rank == 0:
                tds = ds.to_pytorch(iterable=True, fields=())
                assert isinstance(tds, IterDataset)
                got = [i for batch in tds.loader(batch_size=4, num_workers=1) for i in batch["id"]]
            else:
                got = [i.id for i in ds]
                assert got == want_rank1, "the sidecar serves what the embedded data path computes"
            assert len(got) == per_rank(N - 20, 2, sluicegate.Remainder.PAD)
            seen.update(got)
            report = wait_for(
                lambda sc=sc: (
                    sc.sidecar.progress if sc.sidecar.progress and sc.sidecar.progress.segment else None
                ),
                what="a progress report of segment 1",
            )
            assert report.consumed == ((len(got),),)
            # The re-cut's rows are read by epoch; slices see the shard's own rows only.
            assert all(p < len(ds) for p in ds._source.select([sluicegate.Query.parse("meta.index >= 0")]))
            ds.close()
    assert set(seen) == {f"item{i:06d}" for i in range(N)}
    assert sum(seen.values()) - N == -(N - 20) % 2
    # The ledger reproduces the re-cut reading from its record alone.
    [passage] = ledger.run_items(Store(uri), "elastic-run")
    assert (passage.epoch, passage.ids) == (2, want_rank1)


def test_a_report_for_another_rank_is_refused(tmp_path: Path) -> None:
    uri = str(tmp_path / "ds")
    make_dataset(uri, 10, size=16)
    with InProcessSidecar(_args(uri, tmp_path, 1, 2)) as sc, httpx.Client(base_url=sc.tcp) as client:
        sluicegate.connect(sc.tcp).close()  # ready
        body = proto.ProgressReport(epoch=0, segment=0, world_size=2, rank=0, consumed=((1,),))
        answer = client.post(proto.Paths.PROGRESS, content=body.model_dump_json())
        assert answer.status_code == 400
        assert "serves rank 1 of 2" in answer.json()["message"]


def test_a_bad_progress_is_a_config_error(tmp_path: Path) -> None:
    from sluicegate import ConfigError
    from sluicegate_sidecar.config import parse_args

    with pytest.raises(ConfigError, match="progress"):
        parse_args(["--store", str(tmp_path), "--progress", '{"epoch": -1}'], {})
    with pytest.raises(ConfigError, match="progress"):
        parse_args(["--broker-url", "https://x", "--progress", "{}"], {})
