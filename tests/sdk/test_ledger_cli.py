"""``sluicegate ledger``: the runs that consumed an item, and the exact items of a run, from the ledger."""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pytest
import sluicegate
from sluicegate import Store

from tests.sdk.cli import fails, ok, run
from tests.sidecar.helpers import make_dataset

N = 12
GONE = "item000004"


def _train(uri: str, run: str, epochs: int, world: int = 2) -> dict[tuple[int, int], list[str]]:
    """A small distributed run in one process: ``world`` ranks, shuffled, ``epochs`` epochs."""
    seen = {}
    for rank in range(world):
        ds = sluicegate.open(uri, ledger=run).shard(rank, world).shuffle(7)
        for epoch in range(epochs):
            ds.set_epoch(epoch)
            seen[rank, epoch] = [item.id for item in ds]
        ds.close()
    return seen


@pytest.fixture
def store(tmp_path: Path) -> str:
    """A dataset of N items (version 1)."""
    uri = str(tmp_path / "store")
    make_dataset(uri, N, size=32)
    return uri


def test_every_ledger_command_has_help() -> None:
    for command in (["ledger"], ["ledger", "runs"], ["ledger", "items"]):
        assert "Usage" in ok(*command, "--help")


def test_runs_items_and_an_item_deleted_later(store: str) -> None:
    seen = _train(store, "run-a", epochs=2)
    Store(store).commit(lambda base: base.filter(pc.not_equal(base["id"], GONE)), message=f"remove {GONE}")
    _train(store, "run-b", epochs=1)

    lines = ok("ledger", "runs", store).splitlines()
    assert lines[0].split() == [
        "run",
        "ranks",
        "versions",
        "epochs",
        "items",
        "chains",
        "last",
        "record",
        "status",
    ]
    run_a, run_b = (line.split() for line in lines[1:])
    assert run_a[:6] == ["run-a", "0,1", "1", "0-1", str(2 * N), "2"]
    assert run_a[-1] == "ok"
    assert run_b[:6] == ["run-b", "0,1", "2", "0", str(N - 1 + 1), "2"]  # 11 items over 2 ranks: one pad

    out = ok("ledger", "items", store, "run-a", "--rank", "1", "--epoch", "1")
    assert out.splitlines() == seen[1, 1]
    everything = ok("ledger", "items", store, "run-a").splitlines()
    assert everything == [i for key in sorted(seen) for i in seen[key]]
    long = ok("ledger", "items", store, "run-a", "--epoch", "0", "--long").splitlines()
    assert long[0].split("\t") == ["rank", "epoch", "version", "place", "id"]
    assert long[1].split("\t") == ["0", "0", "1", "0", seen[0, 0][0]]

    code, out, err = run("ledger", "runs", store, "--item", GONE)
    assert code == 0, err
    rows = [line.split()[:5] for line in out.splitlines()[1:]]
    owner = next(rank for rank in (0, 1) if GONE in seen[rank, 0])
    assert rows == [["run-a", str(owner), "0", "1", "1"], ["run-a", str(owner), "1", "1", "1"]]
    assert "not in version 2, the latest" in err  # deleted since: the runs that trained on it remain

    kept = next(i for i in seen[0, 0] if i != GONE)
    runs_of_kept = {line.split()[0] for line in ok("ledger", "runs", store, "--item", kept).splitlines()[1:]}
    assert runs_of_kept == {"run-a", "run-b"}


def test_chains_list_their_heads(store: str) -> None:
    _train(store, "run-a", epochs=1, world=1)
    out = ok("ledger", "runs", store, "--chains").splitlines()
    assert out[0].split()[:4] == ["run", "chain", "records", "items"]
    cells = out[1].split()
    assert (cells[0], cells[2], cells[3], cells[-1]) == ("run-a", "1", str(N), "ok")
    assert len(cells[4]) == 64


def test_bad_input_is_one_line_and_exit_1(store: str, tmp_path: Path) -> None:
    assert "no runs recorded" in run("ledger", "runs", store)[2]
    _train(store, "run-a", epochs=1, world=1)
    assert "has no run 'nope' in its ledger; it has run-a" in fails("ledger", "items", store, "nope")[1]
    assert "letters, digits" in fails("ledger", "items", store, "../x")[1]
    assert (
        "no records of rank 3; it has ranks 0 and epochs 0"
        in fails("ledger", "items", store, "run-a", "--rank", "3")[1]
    )
    assert "has an item 'nothing-like-it'" in fails("ledger", "runs", store, "--item", "nothing-like-it")[1]
    assert "has no versions yet" in fails("ledger", "runs", str(tmp_path / "elsewhere"))[1]


def test_a_broken_chain_is_reported_never_skipped(store: str) -> None:
    ds = sluicegate.open(store, ledger=sluicegate.Ledger(run="run-a", flush_items=4)).shuffle(1)
    ids = [item.id for item in ds]
    ds.close()
    [chain] = (Path(store) / "ledger" / "run-a").iterdir()
    record = chain / "0000000001.json"
    record.write_bytes(record.read_bytes().replace(b'"epoch":0', b'"epoch":1'))

    out, err = fails("ledger", "runs", store)
    assert out.splitlines()[1].split()[-1] == "BROKEN"  # printed, then the error
    assert "record 1 was changed" in err
    assert "record 1 was changed" in fails("ledger", "items", store, "run-a")[1]
    out, err = fails("ledger", "runs", store, "--item", ids[0])
    assert "record 1 was changed" in err
    assert out.splitlines()[1].split()[:3] == ["run-a", "0", "0"]  # found in the records before the break

    record.write_text("{not json")
    assert "record 1 is not a ledger record" in fails("ledger", "items", store, "run-a")[1]
    record.unlink()
    assert "record 1 is missing (the next one is 2)" in fails("ledger", "items", store, "run-a")[1]
