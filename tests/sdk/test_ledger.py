"""The ledger in embedded mode: what a dataset hands out is recorded off the hot path and reproducible."""

from __future__ import annotations

import multiprocessing
import pickle
import time
from pathlib import Path

import pytest
import sluicegate
from sluicegate import ConfigError, Dataset, Ledger, Store, StoreError
from sluicegate import _ledger as recording
from sluicegate.core import ledger
from sluicegate.core.ledger import Order

from tests.conftest import Backend
from tests.sidecar.helpers import make_dataset

N = 61


@pytest.fixture
def uri(store_backend: Backend) -> str:
    make_dataset(store_backend.uri, N, size=64, s3=store_backend.s3)
    return store_backend.uri


def _open(backend: Backend, run: str = "run-1", **options: object) -> Dataset:
    return sluicegate.open(backend.uri, s3=backend.s3, ledger=Ledger(run=run, **options))  # type: ignore[arg-type]


def _ids(passages: list[ledger.Passage]) -> list[str]:
    return [i for p in passages for i in p.ids]


def test_iteration_is_recorded_in_ranges_and_reproduced_exactly(store_backend: Backend, uri: str) -> None:
    ds = _open(store_backend, flush_items=7).slice("labels.car >= 1").shard(1, 3).shuffle(5)
    seen = {}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        seen[epoch] = [item.id for item in ds]
    ds.close()
    store = store_backend.store()
    [chain] = ledger.read_run(store, "run-1")
    assert chain.broken is None
    records = chain.records
    assert all(r.items <= 7 and len(r.ranges) == 1 for r in records)  # counted, never one row per item
    assert [r.reading.epoch for r in records] == sorted(r.reading.epoch for r in records)
    first = records[0]
    assert (first.dataset, first.version, first.manifest) == (
        store.uri,
        1,
        ledger.Resolver(store).manifest(1).digest,
    )
    assert first.reading.views[0].queries == ("labels.car >= 1",)
    assert first.reading.views[0].shard is not None
    assert first.reading.views[0].shard.rank == 1
    assert (first.reading.seed, first.reading.ranks, first.reading.order) == (5, "1", Order.EPOCH)
    for epoch in (0, 1):
        [passage] = ledger.run_items(store, "run-1", epoch=epoch)
        assert passage.ids == seen[epoch]
        assert passage.places.tolist() == list(range(len(seen[epoch])))


def test_a_pass_stopped_early_then_resumed_records_exactly_what_was_handed_out(tmp_path: Path) -> None:
    make_dataset(str(tmp_path), N, size=32)
    ds = sluicegate.open(tmp_path, ledger="run-1").shuffle(2)
    taken = []
    for item in ds:
        taken.append(item.id)
        if len(taken) == 10:
            break
    state = ds.state_dict()
    again = sluicegate.open(tmp_path, ledger="run-1").shuffle(2)
    again.load_state_dict(state)
    taken += [item.id for item in again]
    ds.close()
    again.close()
    records = [r for c in ledger.read_run(Store(tmp_path), "run-1") for r in c.records]
    assert sorted(r.ranges for r in records) == [((0, 10),), ((10, N),)]
    [passage] = ledger.run_items(Store(tmp_path), "run-1")
    assert passage.ids == taken == [f"item{p:06d}" for p in ds.epoch_positions()]


def test_random_access_is_recorded_in_the_order_asked(tmp_path: Path) -> None:
    make_dataset(str(tmp_path), N, size=32)
    ds = sluicegate.open(tmp_path, ledger="run-1").slice('meta.split = "val"')
    asked = [ds[3].id, *(i.id for i in ds.get_many([5, 6, 7, -1, 1]))]
    ds.close()
    [chain] = ledger.read_run(Store(tmp_path), "run-1")
    [record] = chain.records
    assert record.reading.order is Order.INDEX
    assert record.ranges == ((3, 4), (5, 8), (12, 13), (1, 2))
    [passage] = ledger.run_items(Store(tmp_path), "run-1")
    assert passage.ids == asked


def test_a_slow_pass_is_recorded_every_flush_s_before_it_ends(tmp_path: Path) -> None:
    make_dataset(str(tmp_path), N, size=32)
    ds = sluicegate.open(tmp_path, ledger=Ledger(run="run-1", flush_s=0.1))
    items = iter(ds)
    for _ in range(3):
        next(items)
    deadline = time.monotonic() + 10
    while not (Path(tmp_path) / "ledger" / "run-1").exists():
        assert time.monotonic() < deadline, "no record within 10 s of flush_s=0.1"
        time.sleep(0.05)
    time.sleep(0.3)  # a second tick with nothing new writes nothing
    [chain] = ledger.read_run(Store(tmp_path), "run-1")
    assert [r.ranges for r in chain.records] == [((0, 3),)]
    items.close()  # the consumer stops: the pass ends, nothing more was handed out
    ds.close()
    [chain] = ledger.read_run(Store(tmp_path), "run-1")
    assert [r.ranges for r in chain.records] == [((0, 3),)]


def test_failed_writes_are_retried_in_order_and_nothing_is_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_dataset(str(tmp_path), N, size=32)
    monkeypatch.setattr(recording, "_RETRY_S", 0.05)
    real = Store.create_object
    failures = iter(range(4))

    def flaky(self: Store, key: str, data: bytes) -> bool:
        if next(failures, None) is not None:
            raise StoreError("the store is away")
        return real(self, key, data)

    monkeypatch.setattr(Store, "create_object", flaky)
    ds = sluicegate.open(tmp_path, ledger=Ledger(run="run-1", flush_items=10)).shuffle(1)
    ids = [item.id for item in ds]  # never blocked by the failing writes
    ds.close()
    [chain] = ledger.read_run(Store(tmp_path), "run-1")
    assert chain.broken is None
    assert [r.ranges for r in chain.records] == [((s, min(s + 10, N)),) for s in range(0, N, 10)]
    assert ledger.run_items(Store(tmp_path), "run-1")[0].ids == ids


def test_without_a_ledger_nothing_is_written(tmp_path: Path) -> None:
    make_dataset(str(tmp_path), N, size=32)
    ds = sluicegate.open(tmp_path)
    assert ds.ledger is None
    assert len(list(ds)) == N
    ds[0]
    ds.close()
    assert not (tmp_path / "ledger").exists()


def test_ledger_options_are_checked_and_the_run_defaults_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_dataset(str(tmp_path), 3, size=32)
    with pytest.raises(ConfigError, match="letters, digits"):
        sluicegate.open(tmp_path, ledger="../escape")
    with pytest.raises(ConfigError, match="run id, True"):
        sluicegate.open(tmp_path, ledger=3)  # type: ignore[arg-type]
    monkeypatch.setenv("SLUICEGATE_RUN", "from-env")
    ds = sluicegate.open(tmp_path, ledger=True)
    assert ds.ledger is not None
    assert ds.ledger.run == "from-env"
    assert ds.slice("labels.car >= 1").shard(0, 2).ledger == ds.ledger  # every view of it records too
    monkeypatch.delenv("SLUICEGATE_RUN")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "torchrun-7")
    assert Ledger().run == "torchrun-7"
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    assert Ledger().run != Ledger().run  # a new id each time


def _consume_copy(blob: bytes) -> None:
    ds = pickle.loads(blob)
    for _ in ds:
        pass
    ds.close()


def test_each_process_writes_its_own_chain(tmp_path: Path) -> None:
    make_dataset(str(tmp_path), N, size=32)
    ds = sluicegate.open(tmp_path, ledger="run-1").shard(0, 2).shuffle(3)
    blob = pickle.dumps(ds)
    for method in ("fork", "spawn"):
        process = multiprocessing.get_context(method).Process(target=_consume_copy, args=(blob,))
        process.start()
        process.join(60)
        assert process.exitcode == 0
    list(ds)
    ds.close()
    chains = ledger.read_run(Store(tmp_path), "run-1")
    assert len(chains) == 3
    assert len({r.writer.pid for c in chains for r in c.records}) == 3
    assert all(c.broken is None and sum(r.items for r in c.records) == len(ds) for c in chains)


@pytest.mark.parametrize("iterable", [True, False])
def test_dataloader_workers_each_record_their_part_and_together_the_epoch(
    store_backend: Backend, uri: str, iterable: bool
) -> None:
    from torch.utils.data import DataLoader

    ds = _open(store_backend, flush_items=5).shard(0, 2).shuffle(9)
    tds = ds.to_pytorch(iterable=iterable, fields=())
    loader = DataLoader(tds, batch_size=4, num_workers=2, collate_fn=lambda batch: [s["id"] for s in batch])
    got = [i for batch in loader for i in batch]
    del loader  # the workers exit, having written what they handed out
    store = store_backend.store()
    chains = ledger.read_run(store, "run-1")
    assert sorted(r.writer.worker for c in chains for r in c.records[:1]) == [0, 1]
    assert all(c.broken is None for c in chains)
    [passage] = ledger.run_items(store, "run-1")
    if iterable:
        assert passage.ids == [f"item{p:06d}" for p in ds._positions()[ds.epoch_positions()]]
        assert sorted(passage.ids) == sorted(got)
    else:
        assert passage.order is Order.INDEX
        assert sorted(passage.ids) == sorted(got)


class _Refusing(recording.Sink):
    def __init__(self) -> None:
        self.calls = 0

    def write(self, consumed: ledger.Consumed, writer: ledger.Writer) -> None:
        self.calls += 1
        raise ConfigError("this sidecar runs in broker mode")


def test_a_sink_that_cannot_record_stops_recording_loudly_without_stopping_the_reader(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = _Refusing()
    rec = recording.Recorder("run-1", lambda: sink)
    reading = ledger.Reading(views=(ledger.View(),), seed=None, rank=0, epoch=0, order=Order.EPOCH)
    counted = rec.begin(reading, 0, Ledger(run="run-1"))
    counted.pos = 10
    rec.end(counted)
    with caplog.at_level("ERROR", logger="sluicegate.ledger"):
        assert rec.flush(timeout=10)
        deadline = time.monotonic() + 10
        while "recording of run run-1 stopped" not in caplog.text:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    assert "10 consumed items unrecorded: this sidecar runs in broker mode" in caplog.text
    again = rec.begin(reading, 10, Ledger(run="run-1"))
    again.pos = 5
    rec.end(again)
    assert rec.flush(timeout=1)
    assert sink.calls == 1  # nothing more is tried
