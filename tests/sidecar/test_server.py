"""The sidecar's HTTP API: shards over TCP and a unix socket, the ordered stream, errors, metrics, config."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import sluicegate
from sluicegate import ConfigError, ItemNotInShard, SidecarUnavailable
from sluicegate.core import partition as _partition
from sluicegate.core import protocol as proto
from sluicegate_sidecar.config import parse_args

from tests.sidecar.helpers import InProcessSidecar, SidecarProcess, make_dataset, metrics

N = 53


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[str, dict[str, bytes]]:
    uri = str(tmp_path / "ds")
    return uri, make_dataset(uri, N, size=500)


def _args(uri: str, tmp_path: Path, rank: int = 0, world: int = 1, *extra: str) -> list[str]:
    sock = tmp_path / f"sock{rank}" / "sidecar.sock"
    return [
        "--store", uri, "--rank", str(rank), "--world-size", str(world), "--seed", "4",
        "--listen", f"127.0.0.1:0,unix://{sock}", *extra,
    ]  # fmt: skip


def test_ranks_serve_disjoint_equal_shards_over_tcp_and_unix(
    dataset: tuple[str, dict[str, bytes]], tmp_path: Path
) -> None:
    uri, expected = dataset
    seen: Counter[str] = Counter()
    lengths = set()
    for rank in range(2):
        with InProcessSidecar(_args(uri, tmp_path, rank, 2)) as sc:
            assert len(sc.addresses) == 2
            tcp, unix = (sluicegate.connect(a) for a in sc.addresses)
            lengths.add(len(tcp))
            ids = [(i.id, i.data) for i in tcp]
            assert all(expected[i] == data for i, data in ids)
            assert [i for i, _ in ids] == [i.id for i in unix]
            seen.update(i for i, _ in ids)
            assert tcp.version == 1
            tcp.close()
            unix.close()
    assert lengths == {27}  # 53 items, 2 ranks, padded
    assert set(seen) == set(expected)
    assert sum(seen.values()) == 54


def test_multi_megabyte_items_arrive_intact_over_tcp_and_unix(tmp_path: Path) -> None:
    # Bigger than one write slice of the server, so an item goes out in several sends.
    uri = str(tmp_path / "big")
    expected = make_dataset(uri, 3, size=2_500_000)
    with InProcessSidecar(_args(uri, tmp_path)) as sc:
        for address in sc.addresses:
            ds = sluicegate.connect(address)
            assert {i.id: i.data for i in ds} == expected
            assert ds[1].data == expected[ds[1].id]
            ds.close()


def test_stream_endpoint_follows_the_epoch_order(
    dataset: tuple[str, dict[str, bytes]], tmp_path: Path
) -> None:
    uri, _ = dataset
    with InProcessSidecar(_args(uri, tmp_path, 1, 3)) as sc:
        ds = sluicegate.connect(sc.tcp)
        ds.set_epoch(2)
        want = [ds[int(p)].id for p in ds.epoch_positions(1, 2)]
        got: list[str] = []
        with httpx.Client(base_url=sc.tcp) as client:
            for start in range(0, len(want), 4):
                params = {"epoch": 2, "start": start, "count": 4, "worker": 1, "num_workers": 2}
                r = client.get(proto.Paths.STREAM, params=params)
                assert r.status_code == 200
                assert r.headers["content-type"] == proto.BATCH_CONTENT_TYPE
                header, _ = proto.decode_batch(r.content)
                got.extend(row.id for row in header.rows)
            info = proto.Info.model_validate_json(client.get(proto.Paths.INFO).content)
        assert got == want
        order = _partition.epoch_order(info.items, seed=4, epoch=2, rank=1)
        assert want == [ds[int(p)].id for p in _partition.worker_split(order, 1, 2)]
        ds.close()


def test_bad_requests_get_a_4xx_with_a_clear_message_and_serving_goes_on(
    dataset: tuple[str, dict[str, bytes]], tmp_path: Path
) -> None:
    uri, _ = dataset
    with InProcessSidecar(_args(uri, tmp_path, 0, 2)) as sc, httpx.Client(base_url=sc.tcp) as client:
        ds = sluicegate.connect(sc.tcp)
        mine = {i.id for i in ds}
        other = next(i for i in (f"item{n:06d}" for n in range(N)) if i not in mine)
        cases = [
            (client.get("/v1/items/27"), 404, "not_in_shard", "outside this sidecar's shard"),
            (client.get("/v1/items/-1"), 404, "not_in_shard", "outside"),
            (client.get("/v1/items/x"), 400, "bad_request", "must be an integer"),
            (client.get("/v1/items", params={"id": other}), 404, "not_in_shard", other),
            (client.get("/v1/items"), 400, "bad_request", "give the item's id"),
            (client.post("/v1/batch", content=b"{not json"), 400, "bad_request", "malformed request"),
            (client.post("/v1/batch", json={"indexes": [1], "bogus": 1}), 400, "bad_request", "bogus"),
            (client.post("/v1/batch", json={"indexes": [0, 99]}), 404, "not_in_shard", "index 99"),
            (client.get("/v1/stream", params={"count": 0}), 400, "bad_request", "count"),
            (client.get("/v1/stream", params={"worker": 3, "num_workers": 2}), 400, "bad_request", "worker"),
            (
                client.post("/v1/select", json={"queries": ["labels.x > 1"]}),
                400,
                "query_error",
                "unknown label",
            ),
            (client.get("/v2/info"), 404, "bad_request", "Not Found"),
            (client.delete("/v1/info"), 405, "bad_request", "Method Not Allowed"),
        ]
        for response, status, code, text in cases:
            assert response.status_code == status, response.text
            body = proto.ErrorBody.model_validate_json(response.content)
            assert body.code == code
            assert text in body.message
        with pytest.raises(ItemNotInShard, match="outside"):
            ds.source.fetch(np.array([1000]), np.array([], dtype=np.int64)).result()
        assert client.get("/v1/items/0").status_code == 200
        assert len(ds.slice('meta.split = "val"')) == sum(1 for i in ds if i.metadata["split"] == "val")
        ds.close()


def test_metrics_and_probes(dataset: tuple[str, dict[str, bytes]], tmp_path: Path) -> None:
    uri, _ = dataset
    with InProcessSidecar(_args(uri, tmp_path, 0, 1, "--cache-memory", "10000")) as sc:
        ds = sluicegate.connect(sc.tcp)
        with httpx.Client(base_url=sc.tcp) as client:
            assert client.get("/healthz").status_code == 200
            assert client.get("/readyz").json() == {"status": "ready", "items": N}
            assert len(list(ds)) == N
            m = metrics(client.get("/metrics").text)
        assert m["sluicegate_items_served_total"] == N
        assert m["sluicegate_bytes_served_total"] == N * 500
        assert m["sluicegate_upstream_fetches_total"] == N
        assert m['sluicegate_upstream_latency_seconds_bucket{le="+Inf"}'] == N
        assert m["sluicegate_cache_evictions_total"] > 0
        assert m['sluicegate_cache_bytes{tier="memory"}'] <= 10000
        assert m['sluicegate_requests_total{code="200",path="/v1/batch"}'] >= 1
        assert m["sluicegate_consumer_wait_seconds_total"] > 0
        ds.close()


def test_concurrent_requests_for_one_blob_fetch_it_once(
    dataset: tuple[str, dict[str, bytes]], tmp_path: Path
) -> None:
    uri, _ = dataset

    async def hammer(address: str) -> list[int]:
        async with httpx.AsyncClient(base_url=address) as client:
            responses = await asyncio.gather(*(client.get("/v1/items/5") for _ in range(20)))
            return [r.status_code for r in responses]

    with InProcessSidecar(_args(uri, tmp_path)) as sc:
        assert asyncio.run(hammer(sc.tcp)) == [200] * 20
        assert sc.sidecar is not None
        assert sc.sidecar.engine.stats.upstream_fetches == 1
        assert sc.sidecar.engine.stats.items_served == 20


def test_config_from_flags_and_environment() -> None:
    env = {"SLUICEGATE_STORE": "/data", "SLUICEGATE_CACHE_MEMORY": "512Mi", "JOB_COMPLETION_INDEX": "2"}
    env["SLUICEGATE_WORLD_SIZE"] = "4"
    cfg = parse_args(["--listen", "unix:///run/s.sock,127.0.0.1:9000", "--shuffle", "false"], env)
    assert (cfg.store, cfg.rank, cfg.world_size, cfg.shuffle) == ("/data", 2, 4, False)
    assert cfg.cache_memory == 512 * 2**20
    assert [str(x.path) for x in cfg.listen if x.path] == ["/run/s.sock"]
    assert [(x.host, x.port) for x in cfg.listen if x.port] == [("127.0.0.1", 9000)]
    with pytest.raises(ConfigError, match="only on loopback"):
        parse_args(["--store", "/d", "--listen", "0.0.0.0:80"], {})
    with pytest.raises(ConfigError, match="rank 4 is outside"):
        parse_args(["--store", "/d", "--rank", "4", "--world-size", "4"], {})
    with pytest.raises(ConfigError, match="512Q"):
        parse_args(["--store", "/d", "--cache-memory", "512Q"], {})
    with pytest.raises(ConfigError, match="store"):
        parse_args([], {})


def test_connect_needs_an_address_and_reports_an_absent_sidecar(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("SLUICEGATE_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="SLUICEGATE_ADDRESS"):
        sluicegate.connect()
    with pytest.raises(SidecarUnavailable, match="is the sidecar container running"):
        sluicegate.connect(f"unix://{tmp_path}/none.sock", timeout=0.5)
    with pytest.raises(sluicegate.StreamError, match="neither"):
        sluicegate.connect("ftp://x")


def test_sigterm_stops_gracefully_and_removes_the_socket(
    dataset: tuple[str, dict[str, bytes]], tmp_path: Path
) -> None:
    uri, _ = dataset
    sock = tmp_path / "p" / "sidecar.sock"
    with SidecarProcess(["--store", uri, "--listen", f"unix://{sock}"]) as proc:
        ds = sluicegate.connect(f"unix://{sock}")
        assert len([i.id for i in ds]) == N
        assert proc.terminate() == 0
        assert not sock.exists()
        ds.close()


def test_trainer_wait_reported_by_the_sdk_is_exported(
    dataset: tuple[str, dict[str, bytes]], tmp_path: Path
) -> None:
    uri, _ = dataset
    with InProcessSidecar(_args(uri, tmp_path)) as sc, httpx.Client(base_url=sc.tcp) as client:
        for waited in (0.25, 1.5):
            assert client.post(proto.Paths.WAIT, json={"waited_s": waited}).status_code == 204
        for bad in ({"waited_s": -1}, {"waited_s": "x"}, {"seconds": 1}):
            answer = client.post(proto.Paths.WAIT, json=bad)
            assert answer.status_code == 400
            assert answer.json()["code"] == "bad_request"
        assert metrics(client.get("/metrics").text)["sluicegate_trainer_data_wait_seconds_total"] == 1.75


def test_a_trainer_reading_through_the_sdk_reports_its_waits(
    dataset: tuple[str, dict[str, bytes]], tmp_path: Path
) -> None:
    from sluicegate.core.wait import METER

    uri, _ = dataset
    with InProcessSidecar(_args(uri, tmp_path)) as sc:
        before = sluicegate.data_wait()
        ds = sluicegate.connect(sc.tcp)
        try:
            assert len(list(ds)) == N
            after = sluicegate.data_wait()
            assert after.waits > before.waits
            assert after.waited_s > before.waited_s
            assert 0 < after.ratio <= 1
            METER._reported_at = 0.0  # the next wait is due for a report at once
            ds[0]

            def exported() -> float:
                with httpx.Client(base_url=sc.tcp) as client:
                    return metrics(client.get("/metrics").text)["sluicegate_trainer_data_wait_seconds_total"]

            deadline = time.monotonic() + 5  # the report is sent in the background
            while exported() == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert 0 < exported() <= sluicegate.data_wait().waited_s
        finally:
            ds.close()
            METER.report_to(None)


def test_metrics_listener_answers_only_the_scrape_token(
    dataset: tuple[str, dict[str, bytes]], tmp_path: Path
) -> None:
    import hashlib

    uri, _ = dataset
    token = "scrape-" + "x" * 40
    digest = hashlib.sha256(token.encode()).hexdigest()
    args = _args(uri, tmp_path, 0, 1, "--metrics-listen", "0.0.0.0:0", "--metrics-token-sha256", digest)
    with InProcessSidecar(args) as sc:
        (listener,) = [a.removeprefix("metrics=") for a in sc.addresses if a.startswith("metrics=")]
        port = listener.rpartition(":")[2]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {digest}"},
                            {"Authorization": f"Basic {token}"}):  # fmt: skip
                refused = client.get("/metrics", headers=headers)
                assert refused.status_code == 401, headers
                assert "scrape token" in refused.json()["message"]
                assert "sluicegate_" not in refused.text
            good = {"Authorization": f"Bearer {token}"}
            assert "sluicegate_trainer_data_wait_seconds_total" in client.get("/metrics", headers=good).text
            # Nothing but /metrics: the data stays on loopback and the pod's socket.
            for path in (proto.Paths.INFO, "/v1/items/0", proto.Paths.HEALTHZ):
                assert client.get(path, headers=good).status_code == 404
            assert client.post(proto.Paths.BATCH, headers=good, json={"indexes": [0]}).status_code == 404


def test_a_metrics_listener_off_loopback_needs_a_token(tmp_path: Path) -> None:
    base = ["--store", str(tmp_path), "--rank", "0", "--world-size", "1"]
    with pytest.raises(ConfigError, match="metrics-token-sha256"):
        parse_args([*base, "--metrics-listen", "0.0.0.0:9464"], {})
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_args([*base, "--metrics-listen", "nonsense"], {})
    with pytest.raises(ConfigError, match="--metrics-token-sha256: String should match"):
        parse_args([*base, "--metrics-listen", "0.0.0.0:9464", "--metrics-token-sha256", "abc"], {})
    assert parse_args([*base, "--metrics-listen", "127.0.0.1:9464"], {}).metrics_listen is not None
