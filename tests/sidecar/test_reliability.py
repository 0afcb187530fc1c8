"""The data path under faults, against the real S3-compatible server: flaky upstream, a sidecar killed
mid-epoch, a corrupted object. Each must end with every item delivered exactly once or a clear error."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import boto3
import httpx
import pytest
import sluicegate
from sluicegate import IntegrityError, Store

from tests.conftest import S3Server
from tests.sidecar.helpers import FaultProxy, InProcessSidecar, SidecarProcess, make_dataset, metrics

pytestmark = pytest.mark.integration

N = 60


@pytest.fixture
def s3_dataset(s3_server: S3Server) -> tuple[str, dict[str, bytes]]:
    uri = f"s3://{s3_server.create_bucket()}/ds"
    return uri, make_dataset(uri, N, size=2000, s3=s3_server.options)


def test_flaky_upstream_still_delivers_every_item_exactly_once(
    s3_env: S3Server, s3_dataset: tuple[str, dict[str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    uri, expected = s3_dataset
    faults = ["ok", "500", "ok", "503", "reset", "ok", "ok", "slow", "ok", "ok"]
    with FaultProxy(s3_env.endpoint, faults, slow_s=2.0) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # the in-process sidecar's store reads AWS_*
        argv = ["--store", uri, "--listen", "127.0.0.1:0", "--timeout-s", "0.5", "--attempts", "8"]
        with InProcessSidecar(argv) as sc:
            ds = sluicegate.connect(sc.tcp)
            got: Counter[str] = Counter()
            for item in ds:
                assert item.data == expected[item.id]
                got[item.id] += 1
            m = metrics(httpx.get(f"{sc.tcp}/metrics").text)
            ds.close()
    assert got == Counter(list(expected))
    assert {"500", "503", "reset", "slow"} <= set(proxy.counts)
    # Every injected fault cost one retry; the engine counted them all.
    assert m["sluicegate_upstream_retries_total"] == sum(n for f, n in proxy.counts.items() if f != "ok")
    assert m["sluicegate_upstream_fetches_total"] == N


def test_sidecar_killed_mid_epoch_resumes_without_loss_or_repeat(
    s3_server: S3Server, s3_dataset: tuple[str, dict[str, bytes]], tmp_path: Path
) -> None:
    uri, expected = s3_dataset
    sock = tmp_path / "run" / "sidecar.sock"
    argv = ["--store", uri, "--listen", f"unix://{sock}", "--seed", "8"]
    address = f"unix://{sock}"
    with SidecarProcess(argv, s3_server.env) as first:
        ds = sluicegate.connect(address)
        ds.set_epoch(1)
        it = iter(ds)
        before = [next(it).id for _ in range(25)]
        state = ds.state_dict()
        first.kill()  # SIGKILL: no goodbye, the socket file is left behind
    with SidecarProcess(argv, s3_server.env):
        resumed = sluicegate.connect(address)
        resumed.load_state_dict(state)
        after = [i.id for i in resumed]
        resumed.close()
    assert Counter(before + after) == Counter(list(expected))
    # The same client also rides out a restart transparently: requests retry until the sidecar is back.
    with SidecarProcess(argv, s3_server.env) as second:
        ds = sluicegate.connect(address, timeout=30)
        it = iter(ds)
        head = [next(it).id for _ in range(5)]
        second.kill()
        restarted = threading.Event()

        def restart() -> None:
            second.start()
            restarted.set()

        threading.Thread(target=restart).start()
        tail = [i.id for i in it]
        assert restarted.wait(30)
        ds.close()
    assert Counter(head + tail) == Counter(list(expected))


def test_corrupted_object_is_never_delivered(
    s3_env: S3Server, s3_dataset: tuple[str, dict[str, bytes]]
) -> None:
    uri, expected = s3_dataset
    bucket = uri.removeprefix("s3://").split("/")[0]
    table, _ = Store(uri, s3_env.options).manifest(1)
    blob = table.column("blob")[10].as_py()
    client = boto3.client("s3", endpoint_url=s3_env.endpoint, **_creds(s3_env))
    client.put_object(Bucket=bucket, Key=f"ds/blobs/{blob}", Body=b"tampered bytes")
    with InProcessSidecar(["--store", uri, "--listen", "127.0.0.1:0", "--shuffle", "false"]) as sc:
        assert sc.sidecar is not None
        ds = sluicegate.connect(sc.tcp)
        with pytest.raises(IntegrityError, match=rf"item 'item000010'.*{blob}.*not delivered"):
            ds[10]
        assert sc.sidecar.engine.stats.integrity_failures == 2
        # Everything else is still served, verified, and the sidecar answers the bad item again clearly.
        assert all(i.data == expected[i.id] for i in ds.get_many([n for n in range(N) if n != 10]))
        response = httpx.get(f"{sc.tcp}/v1/items/10")
        assert response.status_code == 502
        assert response.json()["code"] == "integrity_error"
        ds.close()


def _creds(server: S3Server) -> dict[str, str]:
    env = server.env
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_REGION"],
    }
