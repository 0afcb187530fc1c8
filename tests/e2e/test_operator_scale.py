"""The operator scale benchmark (bench/operator_scale.py) at a tiny scale, so `make test` keeps its
harness working: every phase runs against the real control plane and every count it reports adds up."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.operator_scale import Scale, markdown, measure
from tests.s3server import S3Server
from tests.s3server.fixtures import s3_server  # noqa: F401  (the SigV4 server, not the root conftest's moto)
from tests.testbed import Testbed

pytestmark = pytest.mark.e2e


def test_benchmark_runs_at_tiny_scale(testbed: Testbed, s3_server: S3Server, tmp_path: Path) -> None:  # noqa: F811
    scale = Scale(pods=20, streams=10, items=2000, ranks=2, concurrency=4, rounds=2, repeats=2, queries=5)
    result = measure(testbed, s3_server, scale, tmp_path / "operator.log")

    admission = result["admission"]
    assert admission["webhook_handler_ms"]["n"] == scale.pods, "one logged admission per labelled pod"
    assert {k: v["n"] for k, v in admission["client_create_ms"].items()} == {
        "labelled": scale.pods,
        "unlabelled": scale.pods,
    }
    # Both histograms saw exactly the measured pods: the baseline pods never reached the webhook.
    assert admission["operator_histogram"]["count"] == scale.pods
    assert admission["apiserver_webhook_call"]["count"] == scale.pods
    assert 0 < admission["webhook_handler_ms"]["p50"] <= admission["webhook_handler_ms"]["p99"]
    assert admission["after_pause"]["webhook_handler_ms"]["n"] == scale.concurrency

    streams = result["streams"]
    assert streams["ready"] == scale.streams
    assert streams["distinct_queries"] == 5
    assert 0 < streams["seconds_to_all_ready"] < 60

    broker = result["broker"]
    assert broker["items_per_rank"] == scale.items / scale.ranks
    assert (broker["first_ms"]["n"], broker["cached_ms"]["n"], broker["concurrent_ranks_ms"]["n"]) == (
        2,
        4,
        2,
    )
    assert broker["cached_items_per_second"] > 0
    assert broker["baseline_presign_many_urls_per_second"] > 0
    # Every request passed through the broker's histogram, and took part of the client's time.
    assert 0 < broker["cached_broker_mean_ms"] <= broker["cached_ms"]["max"]
    assert broker["url_window_ms"]["n"] == broker["presigned_ms"]["n"] == 4
    assert 0 < broker["url_window_broker_mean_ms"] <= broker["url_window_ms"]["max"]
    assert 0 < broker["presigned_broker_mean_ms"] <= broker["presigned_ms"]["max"]
    assert broker["presigned_response_mb"] > broker["response_mb"], "the rows-only plan carries no URLs"

    text = markdown(
        {"machine": {"date_utc": "-", "cpus": 2, "load_average_1m": 0.0}, "machine_after": 0.0}
        | {"testbed_start_seconds": 0.0, **result}
    )
    assert f"## Admission: {scale.pods} labelled pods vs {scale.pods} unlabelled" in text
    assert f"{scale.streams} of {scale.streams} Ready" in text
