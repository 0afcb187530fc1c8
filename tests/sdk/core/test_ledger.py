"""The ledger's format and chains: ranges, records, create-only appends, verification and tampering."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sluicegate import ConfigError, ConflictError, IntegrityError, NotFoundError, Store, StoreError
from sluicegate.core import ledger
from sluicegate.core.ledger import ChainWriter, Consumed, Order, Reading, Resolver, View, Writer
from sluicegate.core.partition import Progress, ShardSpec, assign, visit_order
from sluicegate.core.query import Query, select_rows

from tests.conftest import Backend
from tests.sidecar.helpers import make_dataset

WRITER = Writer(host="test", pid=1)


def _reading(epoch: int = 0, **changes: object) -> Reading:
    fields: dict[str, object] = {
        "views": (View(),),
        "seed": 7,
        "rank": 0,
        "epoch": epoch,
        "order": Order.EPOCH,
    }
    fields.update(changes)
    return Reading.model_validate(fields)


def _consumed(*ranges: tuple[int, int], epoch: int = 0) -> Consumed:
    return Consumed(reading=_reading(epoch), ranges=ranges)


# -- ranges ------------------------------------------------------------------------------------------


@given(st.lists(st.integers(0, 60), max_size=200))
def test_ranges_keep_a_sequence_exactly_in_as_few_ranges_as_it_allows(sequence: list[int]) -> None:
    ranges = ledger.to_ranges(sequence)
    assert ledger.expand(ranges).tolist() == sequence
    breaks = sum(1 for a, b in itertools.pairwise(sequence) if b != a + 1)
    assert len(ranges) == (breaks + 1 if sequence else 0)
    assert all(start < end for start, end in ranges)


@given(st.lists(st.lists(st.integers(0, 40), max_size=30), max_size=8))
def test_extending_ranges_piecewise_equals_ranging_the_whole(pieces: list[list[int]]) -> None:
    ranges: list[tuple[int, int]] = []
    for piece in pieces:
        ledger.extend_ranges(ranges, piece)
    assert ranges == ledger.to_ranges([x for piece in pieces for x in piece])


@given(st.lists(st.tuples(st.integers(0, 100), st.integers(0, 30)), max_size=40))
def test_merged_ranges_cover_the_same_positions_sorted_disjoint_and_apart(
    spans: list[tuple[int, int]],
) -> None:
    ranges = [(start, start + length) for start, length in spans]
    merged = ledger.merge_ranges(ranges)
    covered = {x for start, end in ranges for x in range(start, end)}
    assert set(ledger.expand(merged).tolist()) == covered
    assert ledger.expand(merged).tolist() == sorted(covered)  # each position once, in order
    assert all(a[1] < b[0] for a, b in itertools.pairwise(merged))  # apart: fewest ranges
    assert ledger.merge_ranges(merged) == merged


def test_a_sequential_pass_is_one_range() -> None:
    assert ledger.to_ranges(range(1000)) == [(0, 1000)]
    assert ledger.to_ranges([5, 6, 7, 0, 1]) == [(5, 8), (0, 2)]


def test_consumed_refuses_empty_or_negative_ranges_and_readings_bad_workers() -> None:
    with pytest.raises(ValueError, match="empty or negative"):
        _consumed((3, 3))
    with pytest.raises(ValueError, match="empty or negative"):
        _consumed((-1, 2))
    with pytest.raises(ValueError, match="outside"):
        _reading(worker=2, num_workers=2)


# -- chains ------------------------------------------------------------------------------------------


def _write(store: Store, run: str = "run-1", chain: str = "c0", count: int = 3) -> ChainWriter:
    writer = ChainWriter(store, run, chain)
    for i in range(count):
        writer.append(
            _consumed((10 * i, 10 * i + 5)), writer=WRITER, dataset=store.uri, version=1, manifest=None
        )
    return writer


def test_a_chain_reads_back_verified_in_order(store_backend: Backend) -> None:
    store = store_backend.store()
    _write(store)
    _write(store, chain="c1", count=1)
    [c0, c1] = ledger.read_run(store, "run-1")
    assert (c0.name, c0.broken, [r.seq for r in c0.records]) == ("c0", None, [0, 1, 2])
    assert [r.ranges for r in c0.records] == [((0, 5),), ((10, 15),), ((20, 25),)]
    assert c0.records[0].prev == ""
    raw = [store.read_object(ledger.record_key("run-1", "c0", i)) for i in range(3)]
    assert [r.prev for r in c0.records[1:]] == [ledger._sha256(b) for b in raw[:2]]
    assert c0.head == ledger._sha256(raw[2])
    assert c1.broken is None
    assert ledger.runs(store) == ["run-1"]
    record = json.loads(raw[0])
    assert record["reading"]["order"] == "epoch"
    assert record["items"] == 5


def test_a_stateless_writer_places_records_by_number_in_order_and_recognises_retries(
    store_backend: Backend,
) -> None:
    """append_at, as the broker writes (any replica, any report): each record after the one before it."""
    store = store_backend.store()

    def at(seq: int, consumed: Consumed, writer: Writer = WRITER) -> ledger.Record:
        return ledger.append_at(
            store, consumed, run="r", chain="c", seq=seq, writer=writer, dataset=store.uri, version=1,
            manifest=None,
        )  # fmt: skip

    with pytest.raises(ConflictError, match=r"record 0 .* is not written yet"):
        at(1, _consumed((5, 9)))
    first = at(0, _consumed((0, 5)))
    assert at(0, _consumed((0, 5))) == first, "a retry whose answer was lost: the record written"
    with pytest.raises(ConfigError, match="sent before with other content"):
        at(0, _consumed((0, 6)))
    with pytest.raises(ConfigError, match="sent before with other content"):
        at(0, _consumed((0, 5)), Writer(host="other", pid=2))
    at(1, _consumed((5, 9)))
    # Read back, it verifies like any chain: the same format, the same hashes.
    [chain] = ledger.read_run(store, "r")
    assert chain.broken is None
    assert [r.ranges for r in chain.records] == [((0, 5),), ((5, 9),)]
    assert chain.records[1].prev == ledger._sha256(store.read_object(ledger.record_key("r", "c", 0)))
    with pytest.raises(ConfigError, match="chain"):
        ledger.append_at(
            store, _consumed((0, 1)), run="r", chain="../x", seq=0, writer=WRITER, dataset="", version=1,
            manifest=None,
        )  # fmt: skip


def test_a_cut_in_front_of_a_reading_keeps_it_within_what_a_record_holds() -> None:
    consumed = _consumed((0, 5))
    cut = View(queries=("labels.car > 0",), shard=ShardSpec(rank=1, world_size=2))
    assert consumed.under(cut).reading.views == (cut, View())
    full = Consumed(reading=_reading(views=(View(),) * ledger.MAX_VIEWS), ranges=((0, 1),))
    with pytest.raises(ConfigError, match="report at most 3"):
        full.under(cut)


def test_a_report_of_recut_mix_rows_is_recorded_as_the_selection_positions_served() -> None:
    progress = Progress.start(0, 2).lockstep(((4,),)).recut(3)
    reading = Reading(views=(View(),), seed=None, rank=0, epoch=0, order=Order.INDEX, progress=progress)
    consumed = Consumed(reading=reading, ranges=((0, 2), (3, 4)))
    assert consumed.recut == progress
    assert Consumed(reading=_reading(), ranges=((0, 1),)).recut is None, "iteration is not of re-cut rows"
    cut = View(queries=("labels.car > 0",), shard=ShardSpec(rank=2, world_size=3, seed=1))
    rows = np.asarray([17, 4, 5, 9, 10], dtype=np.int64)  # row k of the re-cut block is selection rows[k]
    recorded = consumed.recut_as(cut, rows)
    assert recorded.reading == Reading(
        views=(View(queries=cut.queries),), seed=None, rank=2, epoch=0, order=Order.INDEX
    )
    assert recorded.ranges == ((17, 18), (4, 5), (9, 10))
    with pytest.raises(ConfigError, match=r"\[3, 6\) is outside the 5 re-cut rows"):
        Consumed(reading=reading, ranges=((3, 6),)).recut_as(cut, rows)
    with pytest.raises(ConfigError, match="outside"):  # refused before any range is expanded
        Consumed(reading=reading, ranges=((0, 10**15),)).recut_as(cut, rows)
    cut_again = reading.model_copy(update={"views": (View(queries=("labels.car > 1",)),)})
    with pytest.raises(ConfigError, match="one plain view"):
        Consumed(reading=cut_again, ranges=((0, 1),)).recut_as(cut, rows)


def test_records_are_written_create_only_and_a_landed_retry_is_recognised(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    writer = ChainWriter(store, "run-1", "c0")
    first = _consumed((0, 5))
    real = store.create_object
    calls = []

    def lost_answer(key: str, data: bytes) -> bool:
        calls.append(key)
        real(key, data)
        if len(calls) == 1:
            raise StoreError("connection reset")  # it landed, but the writer never heard
        return real(key, data)

    store.create_object = lost_answer  # type: ignore[method-assign]
    with pytest.raises(StoreError):
        writer.append(first, writer=WRITER, dataset=store.uri, version=1, manifest=None)
    writer.append(first, writer=WRITER, dataset=store.uri, version=1, manifest=None)  # same bytes: adopted
    store.create_object = real  # type: ignore[method-assign]
    writer.append(_consumed((5, 9)), writer=WRITER, dataset=store.uri, version=1, manifest=None)
    [chain] = ledger.read_run(store, "run-1")
    assert chain.broken is None
    assert [r.ranges for r in chain.records] == [((0, 5),), ((5, 9),)]

    other = ChainWriter(store, "run-1", "c0")  # a second writer on the same chain is refused, not merged
    with pytest.raises(ConflictError, match="another writer"):
        other.append(_consumed((0, 1)), writer=WRITER, dataset=store.uri, version=1, manifest=None)


def test_names_must_be_path_segments(tmp_path: Path) -> None:
    store = Store(tmp_path)
    for bad in ("../x", "a/b", "", ".hidden", "x" * 129):
        with pytest.raises(ConfigError, match="letters, digits"):
            ChainWriter(store, bad, "c")
    with pytest.raises(ConfigError):
        ledger.read_run(store, "a/b")


def test_an_unknown_run_is_not_found(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(NotFoundError, match="no ledger yet"):
        ledger.read_run(store, "run-1")
    _write(store)
    with pytest.raises(NotFoundError, match="it has run-1"):
        ledger.read_run(store, "run-2")


# -- tampering ---------------------------------------------------------------------------------------


def _chain_dir(store: Store) -> Path:
    assert store.local_root is not None
    return store.local_root / "ledger" / "run-1" / "c0"


def _broken(store: Store) -> str:
    [chain] = ledger.read_run(store, "run-1")
    assert chain.broken is not None
    return chain.broken


@pytest.mark.parametrize("seq", [0, 1, 2])
def test_a_changed_byte_is_detected_in_any_record(tmp_path: Path, seq: int) -> None:
    store = Store(tmp_path)
    _write(store)
    path = _chain_dir(store) / f"{seq:010d}.json"
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"pid":1', b'"pid":2', 1))  # one byte: still a valid record, other content
    assert f"record {seq} was changed" in _broken(store)
    [chain] = ledger.read_run(store, "run-1")
    assert len(chain.records) == seq  # what precedes the change still verifies

    path.write_bytes(data.replace(b'"items":5', b'"items": 5'))  # same content, other bytes
    assert f"record {seq} was changed" in _broken(store)
    path.write_bytes(data[:-3])
    assert f"record {seq} is not a ledger record" in _broken(store)


def test_a_record_rewritten_whole_breaks_the_next_records_link(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _write(store)
    path = _chain_dir(store) / "0000000001.json"
    forged = ledger.parse(path.read_bytes(), "record 1").model_copy(
        update={"ranges": ((99, 100),), "items": 1}
    )
    forged = forged.model_copy(update={"digest": forged.own_digest()})  # a careful forger fixes the digest
    path.write_bytes(forged.model_dump_json().encode())
    assert "record 2 does not follow record 1" in _broken(store)


def test_a_removed_record_is_detected(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _write(store, count=4)
    (_chain_dir(store) / "0000000001.json").unlink()
    assert "record 1 is missing (the next one is 2)" in _broken(store)
    (_chain_dir(store) / "0000000000.json").unlink()
    assert "record 0 is missing" in _broken(store)


def test_a_reordered_record_is_detected(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _write(store)
    one, two = _chain_dir(store) / "0000000001.json", _chain_dir(store) / "0000000002.json"
    a, b = one.read_bytes(), two.read_bytes()
    one.write_bytes(b)
    two.write_bytes(a)
    assert "record 1 says it is record 2" in _broken(store)


def test_a_record_moved_to_another_chain_and_stray_objects_are_detected(tmp_path: Path) -> None:
    store = Store(tmp_path)
    _write(store, count=1)
    _write(store, chain="c1", count=2)
    c1 = _chain_dir(store).parent / "c1"
    (c1 / "0000000001.json").write_bytes((_chain_dir(store) / "0000000000.json").read_bytes())
    chains = {c.name: c for c in ledger.read_run(store, "run-1")}
    assert "record 1 says it is record 0 of chain c0" in str(chains["c1"].broken)
    (c1 / "notes.txt").write_text("x")
    chains = {c.name: c for c in ledger.read_run(store, "run-1")}
    assert "notes.txt is not a record file" in str(chains["c1"].broken)
    (c1 / ".0000000002.json.1-2.tmp").write_text("half")  # a local writer's temporary file: not a record
    (c1 / "notes.txt").unlink()
    assert {c.name: c.broken for c in ledger.read_run(store, "run-1")}["c0"] is None


# -- reproducing ---------------------------------------------------------------------------------------


def test_the_resolver_recomputes_a_two_level_view_with_the_data_paths_functions(tmp_path: Path) -> None:
    make_dataset(str(tmp_path), 200, size=20)
    store = Store(tmp_path)
    outer = View(queries=("labels.car >= 1",), shard=ShardSpec(rank=1, world_size=2, seed=3))
    inner = View(queries=('meta.split = "train"',), shard=ShardSpec(rank=0, world_size=2, seed=5))
    reading = Reading(
        views=(outer, inner), seed=5, rank=0, epoch=2, order=Order.EPOCH, worker=1, num_workers=2
    )
    writer = ChainWriter(store, "run-1", "c0")
    writer.append(
        Consumed(reading=reading, ranges=((0, 3), (4, 5))),
        writer=WRITER,
        dataset=store.uri,
        version=1,
        manifest=None,
    )
    [chain] = ledger.read_run(store, "run-1")
    rows, places = Resolver(store).consumed(chain.records[0])

    table, _ = store.manifest(1)  # the same cut, step by step, as a sidecar then a trainer make it
    first = assign(np.asarray(select_rows(table, ["labels.car >= 1"])), outer.shard)
    second = first[assign(np.asarray(select_rows(table.take(first), ['meta.split = "train"'])), inner.shard)]
    order = visit_order(len(second), seed=5, epoch=2, rank=0, worker=1, num_workers=2)
    assert rows.tolist() == second[order[[0, 1, 2, 4]]].tolist()
    assert places.tolist() == [1, 3, 5, 9]  # worker 1 of 2 reads every other place of the epoch order
    assert Query.parse("labels.car >= 1").text == "labels.car >= 1"


def test_the_resolver_refuses_ranges_past_the_view_and_a_replaced_manifest(tmp_path: Path) -> None:
    make_dataset(str(tmp_path), 10, size=20)
    store = Store(tmp_path)
    resolver = Resolver(store)
    writer = ChainWriter(store, "run-1", "c0")
    digest = resolver.manifest(1).digest
    writer.append(_consumed((5, 11)), writer=WRITER, dataset=store.uri, version=1, manifest=digest)
    [chain] = ledger.read_run(store, "run-1")
    record = chain.records[0]
    resolver.check(record)
    with pytest.raises(StoreError, match="consumed position 10 of a sequence of 10"):
        resolver.consumed(record)
    with pytest.raises(IntegrityError, match="now hashes to"):
        resolver.check(record.model_copy(update={"manifest": "0" * 64}))
    assert np.array_equal(ledger.expand([(2, 4)]), [2, 3])
