"""Finding 4: one tenant cannot take the shared operator down, nor slow another's admission: a manifest
that decodes hundreds of times larger is refused before it is expanded, a tarpit endpoint holds only the
store threads, and a flood of broker requests meets rate limits, while a well-behaved namespace's pods
keep being admitted (their latency under attack is bench/admission_flood.py)."""

from __future__ import annotations

import httpx
import pyarrow as pa
import pytest
from sluicegate import Store
from sluicegate.core.broker_protocol import BrokerPaths
from sluicegate.core.manifest import ItemRecord, records_to_table

from bench import admission_flood
from tests.operator import devcluster
from tests.testbed import wait_for

from .tenants import Tenants, condition, dataset

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_manifest_bomb_is_refused_before_it_is_expanded(tenants: Tenants) -> None:
    cp, evil = tenants.cp, tenants.evil
    bucket = f"bomb-{tenants.suffix}"
    cp.s3.create_bucket(bucket)
    uri = f"s3://{bucket}/bomb"
    options = cp.s3.options()
    store = Store(uri, options)
    # 40 rows that each carry the same 1 MB string: a few KB compressed, 40 MB decoded, limit 16 MiB.
    blob = store.put_blob(b"x")
    big = "y" * 1_000_000
    records = [
        ItemRecord(id=f"b{i}", blob=blob, size=1, media_type="text/plain", metadata={"pad": big})
        for i in range(40)
    ]
    store.commit(lambda _: records_to_table(records))
    tenants.allow({"namespaces": [evil], "uris": [f"s3://{bucket}"], "endpoints": [cp.s3.endpoint]})
    devcluster.credentials_secret(cp.testbed, evil, "bomb-keys", cp.s3)
    source = {"uri": uri, "endpoint": cp.s3.endpoint, "region": cp.s3.region}
    assert tenants.apply_as(dataset("bomb", evil, source, "bomb-keys")).returncode == 0
    why = wait_for(lambda: condition(cp, "datasets", evil, "bomb"), timeout_s=60, what="bomb status")
    assert why[:2] == ("False", "ManifestTooLarge")
    assert "over the operator's limit" in why[2]
    assert httpx.get(cp.url + BrokerPaths.HEALTHZ, verify=cp.ca, trust_env=False).status_code == 200
    assert cp.wait_ready("datasets", cp.data_ns, "coco")["status"]["items"] == len(cp.records)
    tenants.allow()


def test_manifest_with_path_like_blobs_is_refused(tenants: Tenants) -> None:
    """Low finding: blob hashes become cache paths and store keys in every sidecar; a manifest whose blob
    is ``../../dev/zero`` is refused whole, so no pod ever receives such a row."""
    cp, evil = tenants.cp, tenants.evil
    bucket = f"paths-{tenants.suffix}"
    cp.s3.create_bucket(bucket)
    uri = f"s3://{bucket}/paths"
    options = cp.s3.options()
    store = Store(uri, options)
    good = records_to_table(
        [
            ItemRecord(id=i, blob=store.put_blob(i.encode()), size=1, media_type="text/plain")
            for i in ("a", "b")
        ]
    )
    at = good.column_names.index("blob")
    store.commit(
        lambda _: good.set_column(at, "blob", pa.array([good.column("blob")[0].as_py(), "../../dev/zero"]))
    )
    tenants.allow({"namespaces": [evil], "uris": [f"s3://{bucket}"], "endpoints": [cp.s3.endpoint]})
    devcluster.credentials_secret(cp.testbed, evil, "paths-keys", cp.s3)
    source = {"uri": uri, "endpoint": cp.s3.endpoint, "region": cp.s3.region}
    assert tenants.apply_as(dataset("paths", evil, source, "paths-keys")).returncode == 0
    why = wait_for(lambda: condition(cp, "datasets", evil, "paths"), timeout_s=60, what="paths status")
    assert why[0] == "False"
    assert "'../../dev/zero', which is not a sha256 hash" in why[2]
    tenants.allow()


def test_admission_holds_while_another_namespace_floods_and_tarpits(tenants: Tenants) -> None:
    """The attack of bench/admission_flood.py, small: whatever the timings, the flood meets rate limits
    and refusals, the victim keeps getting admitted (each sample checks its sidecar) and planned, and the
    tarpit's Dataset says its store is unreachable without copying the store's reply."""
    report = admission_flood.measure(tenants, samples=20)
    outcomes = report["flood_outcomes"]
    assert outcomes.get(429, 0) > 0, report
    assert outcomes.get(401, 0) > 0, report  # forged tokens: refused, most without a TokenReview
    assert report["victim_plan_status"] == 200, report
    assert report["victim_plan_ms"] < 5000, report  # not queued behind the tarpit (store timeout 2 s)
    why = report["tarpit_condition"]
    assert why is not None
    assert why[:2] == ["False", "StoreUnreachable"], why
    assert len(why[2]) < 400, "a store's reply is not copied wholesale into the status"
