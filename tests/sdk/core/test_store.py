"""The versioned store on a local directory and on a real S3-compatible server (moto, loopback)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import boto3
import httpx
import obstore
import pyarrow as pa
import pytest
from botocore.exceptions import ClientError
from obstore.exceptions import AlreadyExistsError
from obstore.store import S3Store
from sluicegate import (
    ConfigError,
    IntegrityError,
    ItemRecord,
    NotFoundError,
    S3Options,
    Store,
    StoreError,
)
from sluicegate.core import manifest as _manifest
from sluicegate.core.store import blob_key, sha256_hex

from tests.conftest import Backend, S3Server


def _table(*ids: str, label: str = "cat") -> pa.Table:
    return _manifest.records_to_table(
        [
            ItemRecord(
                id=i, blob=sha256_hex(i.encode()), size=len(i), media_type="text/plain", labels={label: 1}
            )
            for i in ids
        ]
    )


def _add(*ids: str) -> Callable[[pa.Table | None], pa.Table]:
    new = _table(*ids)
    return lambda base: _manifest.merge(base, new)


def _raw(backend: Backend, key: str) -> bytes:
    store = backend.store()
    return bytes(obstore.get(store._backend, key).bytes())


# -- the server itself ------------------------------------------------------------------------------


@pytest.mark.integration
def test_server_enforces_create_only_and_compare_and_swap(s3_server: S3Server) -> None:
    """The guarantees commits rely on: If-None-Match: * and If-Match on PutObject."""
    bucket = s3_server.create_bucket()
    client = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3_server.env["AWS_SECRET_ACCESS_KEY"],
        region_name=s3_server.env["AWS_REGION"],
    )
    client.put_object(Bucket=bucket, Key="k", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as err:
        client.put_object(Bucket=bucket, Key="k", Body=b"second", IfNoneMatch="*")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"first"

    opts = s3_server.options
    store = S3Store(
        bucket,
        config={
            "endpoint": s3_server.endpoint,
            "region": opts.region or "",
            "access_key_id": opts.access_key_id or "",
            "secret_access_key": opts.secret_access_key or "",
            "conditional_put": "etag",
        },
        client_options={"allow_http": True},
    )
    with pytest.raises(AlreadyExistsError):
        obstore.put(store, "k", b"third", mode="create")
    etag = obstore.head(store, "k")["e_tag"]
    obstore.put(store, "k", b"fourth", mode={"e_tag": etag})
    with pytest.raises(Exception, match=r"(?i)precondition"):
        obstore.put(store, "k", b"fifth", mode={"e_tag": etag})  # stale etag
    assert bytes(obstore.get(store, "k").bytes()) == b"fourth"


# -- blobs -----------------------------------------------------------------------------------------


def test_blobs_are_content_addressed_and_stored_once(store_backend: Backend) -> None:
    store = store_backend.store()
    sha = store.put_blob(b"hello")
    assert sha == sha256_hex(b"hello")
    assert store.put_blob(b"hello") == sha
    assert store.existing_blobs() == {sha}
    assert store.get_blob(sha) == b"hello"
    with pytest.raises(NotFoundError, match="missing"):
        store.get_blob(sha256_hex(b"nope"))


def test_corrupt_blob_is_detected(store_backend: Backend) -> None:
    store = store_backend.store()
    sha = store.put_blob(b"genuine")
    obstore.put(store._backend, blob_key(sha), b"tampered")
    with pytest.raises(IntegrityError, match=sha):
        store.get_blob(sha)


def test_put_blobs_async_uploads_each_file_once(store_backend: Backend, tmp_path: Path) -> None:
    files = []
    for i in range(12):
        path = tmp_path / f"f{i}.bin"
        path.write_bytes(f"payload {i % 6}".encode())  # six distinct contents, each twice
        files.append((sha256_hex(path.read_bytes()), path))
    store = store_backend.store()
    done: list[int] = []
    assert asyncio.run(store.put_blobs_async(files, concurrency=4, on_done=lambda: done.append(1))) == 12
    assert len(done) == 12
    assert store.existing_blobs() == {sha for sha, _ in files}
    assert all(store.get_blob(sha) == path.read_bytes() for sha, path in files)


@pytest.mark.integration
def test_presigned_urls_serve_blobs(s3_server: S3Server) -> None:
    store = Store(f"s3://{s3_server.create_bucket()}/p", s3_server.options)
    sha = store.put_blob(b"signed bytes")
    url = store.presign(blob_key(sha), timedelta(minutes=5))
    assert httpx.get(url).content == b"signed bytes"
    assert [httpx.get(u).content for u in store.presign_many([blob_key(sha)], timedelta(minutes=5))] == [
        b"signed bytes"
    ]


def test_local_store_refuses_presigning(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="object store"):
        Store(tmp_path).presign("blobs/x", timedelta(minutes=1))


# -- versions --------------------------------------------------------------------------------------


def test_empty_store_has_no_versions(store_backend: Backend) -> None:
    store = store_backend.store()
    assert store.latest_version() == 0
    assert store.log() == []
    with pytest.raises(NotFoundError, match="no versions yet"):
        store.manifest()


def test_versions_are_immutable(store_backend: Backend) -> None:
    store = store_backend.store()
    assert store.commit(_add("a", "b"), message="first") == 1
    v1_bytes = _raw(store_backend, "versions/1.parquet")
    v1_table = store.manifest(1)[0]
    assert store.commit(_add("c")) == 2
    assert store.commit(_add("a")) == 3  # replaces item a
    assert _raw(store_backend, "versions/1.parquet") == v1_bytes
    fresh = store_backend.store()  # no cache: read back from the backend
    assert fresh.manifest(1)[0].equals(v1_table)
    assert fresh.manifest(1)[0].column("id").to_pylist() == ["a", "b"]
    assert fresh.manifest()[0].column("id").to_pylist() == ["a", "b", "c"]
    assert [(i.version, i.parent, i.items, i.message) for i in fresh.log()] == [
        (1, None, 2, "first"),
        (2, 1, 3, ""),
        (3, 2, 3, ""),
    ]


def test_commit_of_an_unchanged_base_writes_nothing(store_backend: Backend) -> None:
    store = store_backend.store()
    store.commit(_add("a"))
    assert store.commit(lambda base: base if base is not None else _table("x")) == 1
    assert store.latest_version() == 1


def test_readers_probe_past_a_stale_latest_ref(store_backend: Backend) -> None:
    store = store_backend.store()
    store.commit(_add("a"))
    store.commit(_add("b"))
    obstore.put(store._backend, "refs/latest", b"1")  # as if the writer died before advancing it
    assert store_backend.store().latest_version() == 2
    assert store_backend.store().commit(_add("c")) == 3
    assert _raw(store_backend, "refs/latest") == b"3"


def test_missing_versions_and_garbage_refs_are_clear_errors(store_backend: Backend) -> None:
    store = store_backend.store()
    store.commit(_add("a"))
    with pytest.raises(NotFoundError, match="no version 7 \\(latest is 1\\)"):
        store.manifest(7)
    with pytest.raises(NotFoundError, match="numbered from 1"):
        store.manifest(0)
    obstore.put(store._backend, "refs/latest", b"banana")
    with pytest.raises(StoreError, match="not a version number"):
        store_backend.store().latest_version()


def test_unreadable_manifest_is_a_store_error(store_backend: Backend) -> None:
    store = store_backend.store()
    store._writable()
    obstore.put(store._backend, "versions/1.parquet", b"not parquet")
    with pytest.raises(StoreError, match="not a readable Parquet manifest"):
        store.manifest(1)


def test_reading_a_missing_local_store_creates_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path / "typo")
    assert store.latest_version() == 0
    assert store.existing_blobs() == set()
    with pytest.raises(NotFoundError, match="no versions yet"):
        store.manifest()
    assert not (tmp_path / "typo").exists()


def test_bad_uris_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unsupported store URI"):
        Store("ftp://host/x")
    with pytest.raises(ConfigError, match="names no bucket"):
        Store("s3:///prefix", S3Options(endpoint="http://127.0.0.1:1"))


# -- concurrent writers ----------------------------------------------------------------------------

_WRITER = """
import sys, time
from pathlib import Path
from sluicegate import ItemRecord, S3Options, Store
from sluicegate.core import manifest as _manifest
from sluicegate.core.store import sha256_hex

uri, writer, commits, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
store = Store(uri)
Path(str(go) + "." + writer).touch()  # ready: imports done
while not go.exists():
    time.sleep(0.005)
for k in range(commits):
    item = f"{writer}-{k}"
    new = _manifest.records_to_table(
        [ItemRecord(id=item, blob=sha256_hex(item.encode()), size=1, media_type="x/y", labels={writer: 1})]
    )
    print(store.commit(lambda base: _manifest.merge(base, new)), flush=True)
"""


@pytest.mark.slow
def test_concurrent_writers_lose_no_commit(store_backend: Backend, tmp_path: Path) -> None:
    """4 processes x 5 commits at once: versions 1..20, every item present, refs/latest at 20."""
    writers, commits = 4, 5
    go = tmp_path / "go"
    env = {**os.environ, **store_backend.env}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, store_backend.uri, f"w{w}", str(commits), str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(writers)
    ]
    deadline = time.monotonic() + 120
    while not all(Path(f"{go}.w{w}").exists() for w in range(writers)):
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs if p.poll() is not None]
        assert time.monotonic() < deadline, "writers did not start"
        time.sleep(0.02)
    go.touch()
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * writers, [err for _, err in outputs]
    won = sorted(int(v) for out, _ in outputs for v in out.split())
    assert won == list(range(1, writers * commits + 1))  # every commit got its own version

    store = store_backend.store()
    assert store.latest_version() == writers * commits
    assert _raw(store_backend, "refs/latest") == str(writers * commits).encode()
    table, _ = store.manifest()
    expected = {f"w{w}-{k}" for w in range(writers) for k in range(commits)}
    assert set(table.column("id").to_pylist()) == expected
    for n, info in enumerate(store.log(), 1):
        assert (info.version, info.parent, info.items) == (n, n - 1 or None, n)
    # Each writer's own commits appear in its order: a retried change never reordered them.
    ids = table.column("id").to_pylist()
    for w in range(writers):
        mine = [i for i in ids if i.startswith(f"w{w}-")]
        assert mine == [f"w{w}-{k}" for k in range(commits)]


def test_local_uploads_stage_outside_blobs(tmp_path: Path) -> None:
    """A crash mid-copy leaves a stray staging file, never a partial blob; the next upload works."""
    store = Store(tmp_path / "s")
    src = tmp_path / "f.bin"
    src.write_bytes(b"payload")
    sha = sha256_hex(b"payload")
    (tmp_path / "s" / "staging").mkdir(parents=True)
    (tmp_path / "s" / "staging" / f"{sha}.999-1").write_bytes(b"pay")  # what a killed copy leaves
    assert store.existing_blobs() == set()
    assert asyncio.run(store.put_blobs_async([(sha, src)])) == 1
    assert store.existing_blobs() == {sha}
    assert store.get_blob(sha) == b"payload"
    assert [p.name for p in (tmp_path / "s" / "staging").iterdir()] == [f"{sha}.999-1"]


def test_blob_writer_from_many_threads_stores_each_blob_once_and_whole(store_backend: Backend) -> None:
    """Threads racing to store the same blobs: every blob appears once, whole; none is replaced."""
    payloads = [f"payload {i}".encode() * 1000 for i in range(8)]
    store = store_backend.store()
    kept = sha256_hex(payloads[0])
    store.put_blob(payloads[0])
    with store.blob_writer() as writer, ThreadPoolExecutor(8) as pool:
        # Every thread stores every payload; payload 0 is there already and must stay as it is.
        list(pool.map(lambda _: [writer.put(sha256_hex(p), p) for p in payloads], range(8)))
        writer.put(kept, b"other bytes under a taken name")  # create-only: refused quietly
    assert store.existing_blobs() == {sha256_hex(p) for p in payloads}
    for p in payloads:
        assert store.get_blob(sha256_hex(p)) == p  # verified against its hash
    if store.local_root is not None:
        assert list((store.local_root / "staging").iterdir()) == []
        assert sorted(os.listdir(store.local_root / "blobs")) == sorted(sha256_hex(p) for p in payloads)


def test_blob_writer_copies_files_and_reports_failures(tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"from a file")
    store = Store(tmp_path / "s")
    with store.blob_writer() as writer:
        writer.put(sha256_hex(b"from a file"), src)
        with pytest.raises(StoreError, match=r"cannot store .*gone\.bin in .*No such file"):
            writer.put(sha256_hex(b"x"), tmp_path / "gone.bin")
    assert store.get_blob(sha256_hex(b"from a file")) == b"from a file"
    assert store.existing_blobs() == {sha256_hex(b"from a file")}
