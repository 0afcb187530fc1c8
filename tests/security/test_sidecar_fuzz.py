"""Hypothesis fuzzing of the sidecar's HTTP request bodies and parameters: whatever a process in the pod
sends, the sidecar answers with a clear 4xx ``ErrorBody`` (or data of its own shard), never a 500, and
keeps serving. (The broker's bodies are fuzzed in ``test_pods.py`` against the real control plane.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sluicegate.core import protocol as proto

from tests.sidecar.helpers import InProcessSidecar, make_dataset

N = 30
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=10), inner, max_size=6),
    max_leaves=25,
)
_BATCH = st.fixed_dictionaries(
    {"indexes": st.lists(st.integers(-5, 2 * N) | _JSON, max_size=8)},
    optional={"readahead": st.lists(st.integers(-(2**40), 2**40), max_size=8) | _JSON},
)
_SELECT = st.fixed_dictionaries({"queries": st.lists(st.text(max_size=60) | _JSON, max_size=4)})
_QUERY = st.dictionaries(
    st.sampled_from(["count", "worker", "num_workers", "epoch", "start", "id", "seed"]),
    st.text(max_size=12) | st.integers(-(2**40), 2**40).map(str),
    max_size=4,
)


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    tmp = tmp_path_factory.mktemp("fuzz")
    uri = str(tmp / "ds")
    make_dataset(uri, N, size=200)
    sock = tmp / "s" / "sidecar.sock"
    args = ["--store", uri, "--rank", "0", "--world-size", "2", "--listen", f"127.0.0.1:0,unix://{sock}"]
    with InProcessSidecar(args) as sc, httpx.Client(base_url=sc.tcp, timeout=30) as client:
        yield client


def _check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        body = proto.ErrorBody.model_validate_json(response.content)
        assert body.message


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    kind=st.sampled_from(["batch", "select", "raw-batch", "raw-select"]),
    body=_BATCH | _SELECT | _JSON,
    raw=st.binary(max_size=300),
)
def test_fuzzed_post_bodies_get_clear_answers(
    sidecar: httpx.Client, kind: str, body: Any, raw: bytes
) -> None:
    path = proto.Paths.BATCH if "batch" in kind else proto.Paths.SELECT
    content = raw if kind.startswith("raw") else json.dumps(body, allow_nan=True).encode()
    _check(sidecar.post(path, content=content, headers={"Content-Type": "application/json"}))


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(params=_QUERY, path=st.sampled_from([proto.Paths.STREAM, proto.Paths.ITEM_BY_ID, proto.Paths.INFO]))
def test_fuzzed_query_parameters_get_clear_answers(
    sidecar: httpx.Client, params: dict[str, str], path: str
) -> None:
    _check(sidecar.get(path, params=params))


def test_sidecar_still_serves_after_the_fuzzing(sidecar: httpx.Client) -> None:
    assert sidecar.get(proto.Paths.HEALTHZ).status_code == 200
    assert sidecar.get("/v1/items/0").status_code == 200
