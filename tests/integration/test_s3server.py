"""The versitygw test server enforces what AWS S3 enforces and moto's server does not.

Our store relies on refused signatures, expiring presigned URLs and conditional writes, so these tests pin
down that the server used by the integration suite really refuses what it should.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import obstore
import pytest
from botocore.exceptions import ClientError
from obstore.exceptions import AlreadyExistsError, PermissionDeniedError, PreconditionError

from tests.s3server import S3Server
from tests.s3server.fixtures import s3_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bucket(s3_server: S3Server) -> str:  # noqa: F811
    name = f"sluicegate-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    return name


@pytest.fixture
def key() -> str:
    return f"data/{uuid.uuid4().hex}.bin"


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    # trust_env=False: proxy variables must not route requests for 127.0.0.1 elsewhere.
    with httpx.Client(trust_env=False) as client:
        yield client


def _error(error: ClientError) -> tuple[int, str]:
    return error.response["ResponseMetadata"]["HTTPStatusCode"], error.response["Error"]["Code"]


def _with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query)) | changes
    return urlunsplit(parts._replace(query=urlencode(query)))


def _with_path(url: str, path: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=path))


def _sleep_until_expired(url: str) -> None:
    # Expiry counts from X-Amz-Date (whole seconds), so wait for that instant plus a margin, not a fixed time.
    query = dict(parse_qsl(urlsplit(url).query))
    signed_at = datetime.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    expires_at = signed_at + timedelta(seconds=int(query["X-Amz-Expires"]) + 1)
    time.sleep(max(0.0, (expires_at - datetime.now(UTC)).total_seconds()))


def test_boto3_signed_requests_work(s3_server: S3Server, bucket: str, key: str) -> None:  # noqa: F811
    client = s3_server.boto3_client()
    client.put_object(Bucket=bucket, Key=key, Body=b"boto3 payload")
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"boto3 payload"
    listed = client.list_objects_v2(Bucket=bucket, Prefix=key)
    assert [entry["Key"] for entry in listed["Contents"]] == [key]


def test_obstore_signed_requests_work(s3_server: S3Server, bucket: str, key: str) -> None:  # noqa: F811
    store = s3_server.s3_store(bucket)
    obstore.put(store, key, b"obstore payload")
    assert bytes(obstore.get(store, key).bytes()) == b"obstore payload"
    # obstore lists by path segment, so the prefix must be the "directory", not the key itself.
    assert key in [meta["path"] for batch in obstore.list(store, prefix="data") for meta in batch]


def test_wrong_secret_is_refused_boto3(s3_server: S3Server, bucket: str, key: str) -> None:  # noqa: F811
    s3_server.boto3_client().put_object(Bucket=bucket, Key=key, Body=b"x")
    with pytest.raises(ClientError) as refused:
        s3_server.boto3_client(secret_key="not-the-secret").get_object(Bucket=bucket, Key=key)
    assert _error(refused.value) == (403, "SignatureDoesNotMatch")


def test_wrong_secret_is_refused_obstore(s3_server: S3Server, bucket: str, key: str) -> None:  # noqa: F811
    obstore.put(s3_server.s3_store(bucket), key, b"x")
    with pytest.raises(PermissionDeniedError, match="403"):
        obstore.get(s3_server.s3_store(bucket, secret_key="not-the-secret"), key)


def test_unknown_access_key_is_refused(s3_server: S3Server, bucket: str) -> None:  # noqa: F811
    with pytest.raises(ClientError) as refused:
        s3_server.boto3_client(access_key="AKIDUNKNOWN").list_objects_v2(Bucket=bucket)
    # AWS answers 403 InvalidAccessKeyId; versitygw refuses too, only with its own code.
    assert _error(refused.value) == (404, "XAdminUserNotFound")


def test_unsigned_request_is_refused(
    s3_server: S3Server,  # noqa: F811
    bucket: str,
    key: str,
    http: httpx.Client,
) -> None:
    s3_server.boto3_client().put_object(Bucket=bucket, Key=key, Body=b"private")
    response = http.get(f"{s3_server.endpoint}/{bucket}/{key}")
    assert response.status_code == 403
    assert "<Code>AccessDenied</Code>" in response.text


def test_presigned_get_works_until_it_expires(
    s3_server: S3Server,  # noqa: F811
    bucket: str,
    key: str,
    http: httpx.Client,
) -> None:
    client = s3_server.boto3_client()
    client.put_object(Bucket=bucket, Key=key, Body=b"shared")
    url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=3)
    fresh = http.get(url)
    assert (fresh.status_code, fresh.content) == (200, b"shared")
    _sleep_until_expired(url)
    expired = http.get(url)
    assert expired.status_code == 403
    assert "Request has expired" in expired.text


@pytest.mark.parametrize("tamper", ["signature", "path", "expires"])
def test_tampered_presigned_get_is_refused(
    s3_server: S3Server,  # noqa: F811
    bucket: str,
    key: str,
    http: httpx.Client,
    tamper: str,
) -> None:
    client = s3_server.boto3_client()
    other = f"{key}.other"
    for name in (key, other):
        client.put_object(Bucket=bucket, Key=name, Body=b"secret")
    url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=600)
    assert http.get(url).status_code == 200
    signature = dict(parse_qsl(urlsplit(url).query))["X-Amz-Signature"]
    flipped = signature[:-1] + ("1" if signature.endswith("0") else "0")
    tampered = {
        "signature": _with_query(url, **{"X-Amz-Signature": flipped}),
        # Another object that exists: the URL must not grant access to anything but the signed key.
        "path": _with_path(url, f"/{bucket}/{other}"),
        # Stretching the lifetime must invalidate the URL, since X-Amz-Expires is part of what is signed.
        "expires": _with_query(url, **{"X-Amz-Expires": "604800"}),
    }[tamper]
    response = http.get(tampered)
    assert response.status_code == 403
    assert "<Code>SignatureDoesNotMatch</Code>" in response.text


def test_obstore_signed_url_works_until_it_expires(
    s3_server: S3Server,  # noqa: F811
    bucket: str,
    key: str,
    http: httpx.Client,
) -> None:
    store = s3_server.s3_store(bucket)
    obstore.put(store, key, b"signed by obstore")
    url = obstore.sign(store, "GET", key, expires_in=timedelta(seconds=3))
    fresh = http.get(url)
    assert (fresh.status_code, fresh.content) == (200, b"signed by obstore")
    _sleep_until_expired(url)
    assert http.get(url).status_code == 403


def test_obstore_signed_url_with_wrong_secret_is_refused(
    s3_server: S3Server,  # noqa: F811
    bucket: str,
    key: str,
    http: httpx.Client,
) -> None:
    obstore.put(s3_server.s3_store(bucket), key, b"x")
    bad_store = s3_server.s3_store(bucket, secret_key="not-the-secret")
    url = obstore.sign(bad_store, "GET", key, expires_in=timedelta(minutes=5))
    response = http.get(url)
    assert response.status_code == 403
    assert "<Code>SignatureDoesNotMatch</Code>" in response.text


def test_put_if_none_match_refuses_existing_key_boto3(
    s3_server: S3Server,  # noqa: F811
    bucket: str,
    key: str,
) -> None:
    client = s3_server.boto3_client()
    client.put_object(Bucket=bucket, Key=key, Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as refused:
        client.put_object(Bucket=bucket, Key=key, Body=b"second", IfNoneMatch="*")
    assert _error(refused.value) == (412, "PreconditionFailed")
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"first"


def test_obstore_create_mode_refuses_existing_key(s3_server: S3Server, bucket: str, key: str) -> None:  # noqa: F811
    store = s3_server.s3_store(bucket)
    # Bodies stay small: versitygw answers 412 before reading a multi-MB body and drops the connection,
    # which obstore (it sends no Expect: 100-continue) may report as GenericError, not AlreadyExistsError.
    obstore.put(store, key, b"first", mode="create")
    with pytest.raises(AlreadyExistsError):
        obstore.put(store, key, b"second", mode="create")
    assert bytes(obstore.get(store, key).bytes()) == b"first"


def test_put_if_match_boto3(s3_server: S3Server, bucket: str, key: str) -> None:  # noqa: F811
    client = s3_server.boto3_client()
    first = client.put_object(Bucket=bucket, Key=key, Body=b"v1")["ETag"]
    second = client.put_object(Bucket=bucket, Key=key, Body=b"v2", IfMatch=first)["ETag"]
    assert second != first
    with pytest.raises(ClientError) as stale:
        client.put_object(Bucket=bucket, Key=key, Body=b"v3", IfMatch=first)
    assert _error(stale.value) == (412, "PreconditionFailed")
    with pytest.raises(ClientError) as missing:
        client.put_object(Bucket=bucket, Key=f"{key}.missing", Body=b"v1", IfMatch=first)
    assert _error(missing.value) == (404, "NoSuchKey")
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"v2"


def test_obstore_update_version_mode(s3_server: S3Server, bucket: str, key: str) -> None:  # noqa: F811
    store = s3_server.s3_store(bucket)
    first = obstore.put(store, key, b"v1")["e_tag"]
    assert first is not None
    # The posix backend has no object versions, so the ETag alone identifies what is replaced.
    assert obstore.head(store, key)["version"] is None
    obstore.put(store, key, b"v2", mode={"e_tag": first})
    with pytest.raises(PreconditionError):
        obstore.put(store, key, b"v3", mode={"e_tag": first})
    assert bytes(obstore.get(store, key).bytes()) == b"v2"
