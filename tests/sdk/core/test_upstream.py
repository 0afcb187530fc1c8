"""The local-store read (``_read_files``), natively built and in Python: the same bytes, digests and errors
for whole, missing, short, long, empty, large and unreadable blobs, mixed in one batch."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sluicegate import NotFoundError, StoreError
from sluicegate.core.engine import BlobRef, Fetched, Outcome, upstream
from sluicegate.core.manifest import blake3_hex
from sluicegate.core.store import blob_key

PATHS = ["native", "python"]


@pytest.fixture(params=PATHS)
def read(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "python":
        monkeypatch.setattr(upstream, "_native", None)
    elif upstream._native is None:
        # CI builds the extension (a C compiler is there): its absence there is a failed build, not a skip.
        if os.environ.get("CI"):
            pytest.fail("the native reader was not built (see hatch_build.py; SLUICEGATE_NATIVE=1 says why)")
        pytest.skip("the native reader is not built here (no C compiler at install)")
    return str(request.param)


def _put(root: Path, data: bytes, *, blake3: bool = True, stored: bytes | None = None) -> BlobRef:
    """A ref for ``data``, whose file holds ``stored`` (default: ``data``)."""
    sha = hashlib.sha256(data).hexdigest()
    path = root / blob_key(sha)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if stored is None else stored)
    return BlobRef(sha, len(data), f"item-{sha[:8]}", blake3=blake3_hex(data) if blake3 else None)


def _fetched(outcome: Outcome) -> Fetched:
    assert isinstance(outcome, Fetched), outcome
    return outcome


@pytest.mark.usefixtures("read")
def test_whole_blobs_read_with_their_digest_of_the_kind_the_ref_checks(tmp_path: Path) -> None:
    refs = [
        _put(tmp_path, os.urandom(100_000)),
        _put(tmp_path, os.urandom(3_000_000)),  # more than one read's worth on some kernels
        _put(tmp_path, b""),
        _put(tmp_path, os.urandom(5_000), blake3=False),  # an older manifest: sha256 only
    ]
    outcomes = upstream._read_files(str(tmp_path), refs)
    for ref, outcome in zip(refs, outcomes, strict=True):
        got = _fetched(outcome)
        assert got.digest == ref.check
        assert len(got.data) == ref.size
        assert got.seconds >= 0
    assert _fetched(outcomes[3]).digest == hashlib.sha256(_fetched(outcomes[3]).data).hexdigest()


@pytest.mark.usefixtures("read")
def test_a_short_or_long_file_reads_as_it_is_so_its_digest_fails(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    short = _put(tmp_path, data, stored=data[:-1])
    long = _put(tmp_path, data + b"x", stored=data + b"xy")
    long = BlobRef(long.sha, len(data), long.item_id, blake3=blake3_hex(data))
    got_short, got_long = map(_fetched, upstream._read_files(str(tmp_path), [short, long]))
    assert got_short.data == data[:-1]
    assert got_short.digest != short.check
    # One byte past the expected size is read, so a longer file is not cut down to a matching prefix.
    assert got_long.data == (data + b"xy")[: len(data) + 1]
    assert got_long.digest != long.check


@pytest.mark.usefixtures("read")
def test_missing_and_unreadable_blobs_fail_alone_in_their_batch(tmp_path: Path) -> None:
    good = _put(tmp_path, os.urandom(1_000))
    missing = BlobRef("0" * 64, 10, "item-missing", blake3="1" * 64)
    unreadable = BlobRef("a" * 64, 10, "item-dir", blake3="1" * 64)
    (tmp_path / blob_key(unreadable.sha)).mkdir(parents=True)  # opens, but reading it fails (EISDIR)
    outcomes = upstream._read_files(str(tmp_path), [missing, good, unreadable])
    assert isinstance(outcomes[0], NotFoundError)
    assert "item-missing" in str(outcomes[0])
    assert "is missing" in str(outcomes[0])
    assert _fetched(outcomes[1]).digest == good.check
    assert isinstance(outcomes[2], StoreError)
    assert not isinstance(outcomes[2], NotFoundError)
    assert "item-dir" in str(outcomes[2])
    assert "Is a directory" in str(outcomes[2])


def test_the_native_and_python_reads_agree(tmp_path: Path) -> None:
    if upstream._native is None:
        pytest.skip("the native reader is not built here")
    refs = [_put(tmp_path, os.urandom(n)) for n in (0, 1, 1023, 1024, 1025, 65_536, 200_001)]

    def summary(outcomes: list[Outcome]) -> list[tuple[bytes, str]]:
        return [(_fetched(o).data, _fetched(o).digest) for o in outcomes]

    native = summary(upstream._read_files(str(tmp_path), refs))
    saved, upstream._native = upstream._native, None
    try:
        python = summary(upstream._read_files(str(tmp_path), refs))
    finally:
        upstream._native = saved
    assert native == python


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 70_000), min_size=1, max_size=6), cut=st.integers(-2, 2))
def test_every_size_digests_as_blake3_of_what_the_file_holds(
    tmp_path_factory: pytest.TempPathFactory, sizes: list[int], cut: int
) -> None:
    root = tmp_path_factory.mktemp("blobs")
    refs, held = [], []
    for n in sizes:
        data = os.urandom(n)
        stored = data[: max(0, n + cut)] if cut < 0 else data + os.urandom(cut)
        refs.append(_put(root, data, stored=stored))
        held.append(stored[: n + 1])
    for outcome, stored in zip(upstream._read_files(str(root), refs), held, strict=True):
        got = _fetched(outcome)
        assert got.data == stored
        assert got.digest == blake3_hex(stored)


@pytest.mark.usefixtures("read")
def test_fetched_bytes_are_hashed_by_the_kind_each_ref_checks_errors_kept_in_place() -> None:
    blobs = [os.urandom(n) for n in (0, 1, 70_000, 3_000)]
    refs = [
        BlobRef(hashlib.sha256(b).hexdigest(), len(b), f"i{i}", blake3=blake3_hex(b) if i != 1 else None)
        for i, b in enumerate(blobs)
    ]
    failed = StoreError("a fault upstream")
    raws: list[tuple[bytes, float] | BaseException] = [
        (blobs[0], 0.1),
        (blobs[1], 0.2),
        failed,
        (blobs[3], 0.3),
    ]
    outcomes = upstream._hash_all(list(zip(refs, raws, strict=True)))
    assert outcomes[2] is failed
    for i in (0, 1, 3):
        got = _fetched(outcomes[i])
        assert (got.data, got.digest) == (blobs[i], refs[i].check)
    # A buffer that is not bytes (a remote client's own type) hashes the same.
    if upstream._native is not None:
        assert upstream._native.hash_blobs([bytearray(blobs[2]), memoryview(blobs[3])]) == [
            refs[2].check,
            refs[3].check,
        ]
