"""Pure rules of the multi-tenant boundary: source authorisation, rank grants, query and manifest bounds."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa
import pytest
from sluicegate._exceptions import QueryError, StoreError
from sluicegate.core.manifest import ItemRecord, VersionInfo, records_to_table, to_parquet
from sluicegate.core.query import guard_query
from sluicegate_operator import grants, sources
from sluicegate_operator.catalog import Limits, ManifestTooLarge, decode_manifest
from sluicegate_operator.sources import SourcePolicy, SourceRefused

POLICY = SourcePolicy.model_validate(
    {
        "rules": [
            {"namespaces": ["team-a"], "uris": ["s3://team-a-data"], "endpoints": ["https://minio.a.svc"]},
            {"namespaces": ["team-a"], "uris": ["s3://public/coco"], "ambientCredentials": True},
            {"namespaces": ["team-b"], "uris": ["file:///mnt/team-b"]},
        ]
    }
)


def allow(ns: str, uri: str, endpoint: str | None = None, creds: bool = True) -> tuple[str, str]:
    return sources.authorise(
        POLICY, namespace=ns, uri=uri, endpoint=endpoint, has_credentials=creds, where="ConfigMap x/y"
    )


def test_rules_allow_their_roots_and_below_in_canonical_form() -> None:
    assert allow("team-a", "s3://team-a-data/coco", "https://MINIO.a.svc:443/") == (
        "s3://team-a-data/coco",
        "https://minio.a.svc:443",
    )
    assert allow("team-a", "s3://public/coco/", creds=False) == ("s3://public/coco", "")
    assert allow("team-b", "file:///mnt/team-b/x") == ("file:///mnt/team-b/x", "")


@pytest.mark.parametrize(
    ("ns", "uri", "endpoint", "creds", "why"),
    [
        ("team-b", "s3://team-a-data/coco", "https://minio.a.svc", True, "no rule"),  # another namespace's
        ("team-a", "s3://team-a-data-2/x", "https://minio.a.svc", True, "no rule"),  # a prefix, not a root
        ("team-a", "s3://team-a-data/x", "http://169.254.169.254", True, "no rule"),  # metadata service
        ("team-a", "s3://team-a-data/x", None, True, "no rule"),  # the operator's default endpoint
        ("team-a", "s3://team-a-data/x", "https://minio.a.svc", False, "ambientCredentials"),
        ("team-a", "s3://public/coco2", None, False, "no rule"),
        ("team-b", "file:///mnt/team-b/../../etc", None, True, "'..'"),
        ("team-b", "file:///mnt/team-b-other", None, True, "no rule"),
        ("team-b", "file:///etc/kubernetes", None, True, "no rule"),
        ("team-a", "s3://team-a-data//x", "https://minio.a.svc", True, "empty"),
        ("team-a", "s3://team-a-data/x", "https://u:p@minio.a.svc", True, "more than scheme"),
    ],
)
def test_everything_else_is_refused_with_what_to_ask_for(
    ns: str, uri: str, endpoint: str | None, creds: bool, why: str
) -> None:
    with pytest.raises(SourceRefused, match=why) as info:
        allow(ns, uri, endpoint, creds)
    if "no rule" in str(info.value):
        assert f"namespaces: [{ns}]" in str(info.value), "the refusal says which rule would allow it"
        text = str(info.value).replace(uri, "")  # what was asked for is echoed; no rule is
        text = text.replace(sources.canonical_endpoint(endpoint), "") if endpoint else text
        assert not any(o in text for o in ("s3://public", "file:///mnt", "minio.a.svc")), "no rule leaks"


def test_empty_policy_refuses_everything() -> None:
    with pytest.raises(SourceRefused, match="no rule"):
        sources.authorise(
            SourcePolicy(), namespace="a", uri="s3://b/c", endpoint=None, has_credentials=True, where="x"
        )


def test_malformed_rules_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"'\.\.'"):
        SourcePolicy.model_validate({"rules": [{"namespaces": ["a"], "uris": ["file:///a/../"]}]})
    with pytest.raises(ValueError, match="root"):
        SourcePolicy.model_validate({"rules": [{"namespaces": ["a"], "uris": ["file:///"]}]})


def test_secret_needs_the_opt_in_label() -> None:
    assert sources.secret_refusal("a", "keys", {"sluicegate.io/credentials": "true"}) is None
    refusal = sources.secret_refusal("a", "keys", {})
    assert refusal is not None
    assert "kubectl label secret keys -n a sluicegate.io/credentials=true" in refusal


def test_grant_is_bound_to_its_decision() -> None:
    facts = {"namespace": "t", "service_account": "trainer", "stream": "s", "stream_uid": "u1"}
    value = grants.seal(b"k" * 32, rank=2, world_size=4, **facts)
    assert grants.open_grant(b"k" * 32, value, **facts) == grants.Grant(2, 4)
    rank, _world, mac = value.split(":")[1:]
    for forged in (f"v1:0:1:{mac}", f"v1:{rank}:1:{mac}", value.replace(mac, "0" * 64)):
        with pytest.raises(grants.GrantInvalid, match="edited"):
            grants.open_grant(b"k" * 32, forged, **facts)
    for other in ({"stream_uid": "u2"}, {"service_account": "x"}, {"namespace": "u"}):
        with pytest.raises(grants.GrantInvalid):
            grants.open_grant(b"k" * 32, value, **{**facts, **other})
    with pytest.raises(grants.GrantInvalid, match="not admitted"):
        grants.open_grant(b"k" * 32, None, **facts)
    with pytest.raises(grants.GrantInvalid):
        grants.open_grant(b"other-key" * 4, value, **facts)


def test_query_bounds() -> None:
    guard_query("(" * 32 + "labels.a > 1" + ")" * 32)
    guard_query('meta.x = "' + "(" * 100 + '"')  # parentheses inside a string do not nest
    with pytest.raises(QueryError, match="nests parentheses more than 32"):
        guard_query("(" * 250 + "labels.a > 1" + ")" * 250)
    with pytest.raises(QueryError, match="at most 4096"):
        guard_query("labels.a > 1 or " * 1000 + "labels.a > 1")


def _parquet(table: pa.Table) -> bytes:
    info = VersionInfo(version=1, parent=None, items=table.num_rows, created_at=datetime.now(UTC))
    return to_parquet(table, info)


def test_manifest_bounds_refuse_before_decoding() -> None:
    records = [ItemRecord(id=f"i{i}", blob="0" * 64, size=1, media_type="text/plain") for i in range(100)]
    table = records_to_table(records)
    data = _parquet(table)
    assert decode_manifest(data, "m", Limits()).num_rows == 100
    with pytest.raises(ManifestTooLarge, match="100 rows, over the operator's limit of 10"):
        decode_manifest(data, "m", Limits(manifest_rows=10))
    # A "zip bomb": one 8 MB metadata string repeated in every row compresses to a few KB.
    bomb = table.append_column("meta.x", pa.array(["x" * 8_000_000] * 100))
    data = _parquet(bomb)
    assert len(data) < 100_000
    with pytest.raises(ManifestTooLarge, match="over the operator's limit"):
        decode_manifest(data, "m", Limits(decoded_bytes=64 * 1024 * 1024))
    # Lists multiply values without rows: 100 rows with a million list elements each.
    lists = table.append_column("meta.l", pa.array([[0] * 1_000_000] * 100, pa.list_(pa.int8())))
    with pytest.raises(ManifestTooLarge, match="values"):
        decode_manifest(_parquet(lists), "m", Limits(decoded_bytes=64 * 1024 * 1024))


def test_manifest_blobs_must_be_sha256_hashes() -> None:
    """Low finding: sidecars join blob hashes into local paths; a poisoned manifest is refused whole."""
    table = records_to_table(
        [ItemRecord(id=i, blob="0" * 64, size=1, media_type="text/plain") for i in ("a", "b")]
    )
    assert decode_manifest(_parquet(table), "m", Limits()).num_rows == 2
    at = table.column_names.index("blob")
    for blob in ("../../dev/zero", "A" * 64, "0" * 63, "/etc/passwd"):
        # Written by hand (the SDK's own records refuse such a blob): what a hostile store could hold.
        poisoned = table.set_column(at, "blob", pa.array(["0" * 64, blob]))
        with pytest.raises(StoreError, match=r"row 1 has blob .* not a sha256 hash"):
            decode_manifest(_parquet(poisoned), "m", Limits())
