"""Broker mode: the pod's shard plan and blob URLs come from the operator's broker, not from the store.

In a cluster the sidecar holds no storage credentials. It presents the pod's projected ServiceAccount
token (re-read on every request: the kubelet rotates it), receives its shard's manifest rows and one
presigned URL per blob, and renews the URLs before they expire, or when the store refuses one (a clock
ahead of the broker's, a revoked signing key).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import httpx
import pyarrow as pa
from pydantic import BaseModel, ValidationError
from sluicegate._broker_protocol import (
    MAX_URLS_PER_REQUEST,
    BrokerError,
    BrokerPaths,
    PlanRequest,
    PlanResponse,
    UrlsRequest,
    UrlsResponse,
)
from sluicegate._engine import BlobRef, Plan, UrlRefused, UrlUpstream
from sluicegate._exceptions import ConfigError, StoreError
from sluicegate._manifest import BASE_SCHEMA, LABEL_PREFIX
from sluicegate._protocol import Info, WireRow

__all__ = ["BrokerClient", "BrokerRefused", "BrokerUpstream", "plan_of"]

log = logging.getLogger("sluicegate.sidecar.broker")
M = TypeVar("M", bound=BaseModel)


class BrokerRefused(StoreError):
    """The broker answered with an error; ``message`` is the broker's own explanation."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"the broker refused (HTTP {status} {code}): {message}")
        self.status, self.code, self.message = status, code, message


class BrokerClient:
    """Calls the broker over HTTPS, verifying its certificate against ``ca`` (PEM text or a PEM file)."""

    def __init__(
        self, url: str, ca: str | None, token_file: Path, stream: str | None, timeout_s: float = 30.0
    ) -> None:
        self.url = url.rstrip("/")
        self._ca = ca
        self._token_file = token_file
        self._stream = stream
        self._timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None  # created on the loop that uses it

    def _tls(self) -> ssl.SSLContext:
        if self._ca is None:
            return ssl.create_default_context()
        pem = self._ca if "-----BEGIN" in self._ca else None
        try:
            if pem is not None:
                return ssl.create_default_context(cadata=pem)
            return ssl.create_default_context(cafile=self._ca)
        except (ssl.SSLError, OSError) as exc:
            what = "the broker CA PEM" if pem is not None else f"the broker CA file {self._ca}"
            raise ConfigError(f"{what} is not a usable certificate: {exc}") from exc

    def _token(self) -> str:
        try:
            token = self._token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the pod's token at {self._token_file}: {exc.strerror or exc}; in a pod the "
                "webhook mounts it, elsewhere point --token-file at a token of audience sluicegate.io"
            ) from exc
        if not token:
            raise ConfigError(f"the token file {self._token_file} is empty")
        return token

    async def _post(self, path: str, body: BaseModel) -> bytes:
        token = self._token()
        if self._client is None:
            self._client = httpx.AsyncClient(verify=self._tls(), timeout=self._timeout_s, trust_env=False)
        try:
            response = await self._client.post(
                self.url + path,
                content=body.model_dump_json(),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise StoreError(f"cannot reach the broker at {self.url}: {exc!r}") from exc
        if response.status_code != 200:
            try:
                error = BrokerError.model_validate_json(response.content)
                code, message = error.code.value, error.message
            except ValidationError:
                code, message = "unexpected", response.text[:300]
            raise BrokerRefused(response.status_code, code, message)
        return response.content

    async def plan(self) -> PlanResponse:
        raw = await self._post(BrokerPaths.PLAN, PlanRequest(stream=self._stream))
        return _parse(PlanResponse, raw)

    async def urls(self, blobs: Sequence[str]) -> UrlsResponse:
        return _parse(UrlsResponse, await self._post(BrokerPaths.URLS, UrlsRequest(blobs=list(blobs))))

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


def _parse(model: type[M], raw: bytes) -> M:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise StoreError(f"the broker sent a malformed {model.__name__}: {exc}") from exc


def _table(rows: Sequence[WireRow]) -> pa.Table:
    """The shard's rows as a manifest table with the manifest's column types, so queries on the
    sidecar (``/v1/select``) see the same fields as on the store."""
    dicts = [row.model_dump() for row in rows]
    fields = list(BASE_SCHEMA)
    for name in sorted({k for row in rows for k in row.model_extra or {}}):
        if name.startswith(LABEL_PREFIX):
            kind = pa.int32()
        else:  # meta.*: bool, int64, float64 or string, which is what JSON values infer to
            kind = pa.array([d.get(name) for d in dicts]).type
            kind = pa.string() if pa.types.is_null(kind) else kind
        fields.append(pa.field(name, kind))
    return pa.Table.from_pylist(dicts, schema=pa.schema(fields))


def plan_of(response: PlanResponse) -> tuple[Plan, Info]:
    """The engine plan and the served info of a broker's answer (rows are in assignment order)."""
    info = Info(
        dataset=response.dataset,
        version=response.version,
        query=response.query or None,
        total=response.total,
        items=len(response.rows),
        rank=response.rank,
        world_size=response.world_size,
        seed=response.seed,
        shuffle=response.shuffle,
        remainder=response.remainder,
    )
    try:
        table = _table(response.rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise StoreError(f"the broker's plan rows do not fit the manifest schema: {exc}") from exc
    return Plan(response.version, table), info


class BrokerUpstream:
    """Fetches blobs through the broker's presigned URLs, renewing them in time.

    A renewal asks for fresh URLs for every blob of the shard once three quarters of their lifetime has
    passed (at most a minute before expiry), so no fetch starts on a URL about to lapse; a 403 from the
    store triggers one renewal and one retry. Concurrent fetches share one renewal.
    """

    def __init__(self, broker: BrokerClient, timeout_s: float = 30.0) -> None:
        self.broker = broker
        self._http = UrlUpstream(timeout_s)
        self._urls: dict[str, str] = {}
        self._blobs: list[str] = []
        self._renew_at = 0.0
        self._generation = 0  # bumped by every renewal, so a stale 403 does not renew twice
        self._renewing: asyncio.Task[None] | None = None
        self.renewals: Counter[str] = Counter()  # by reason: "expiring" or "refused"

    def adopt(self, plan: PlanResponse) -> None:
        """Use the URLs of a fresh plan."""
        self._blobs = list(dict.fromkeys(row.blob for row in plan.rows))
        self._urls = dict(plan.urls)
        self._schedule(plan.expires_at)

    def _schedule(self, expires_at: datetime) -> None:
        expires = expires_at.timestamp()
        now = time.time()
        self._renew_at = expires - min(60.0, max(0.0, expires - now) / 4)

    async def fetch(self, ref: BlobRef) -> bytes:
        if time.time() >= self._renew_at:
            await self._renew("expiring", self._generation)
        generation = self._generation
        try:
            return await self._http.fetch(self._located(ref))
        except UrlRefused as exc:
            if exc.status != 403:
                raise
            log.warning("the store refused the URL of blob %s (%s); renewing the URLs", ref.sha, exc)
            await self._renew("refused", generation)
            return await self._http.fetch(self._located(ref))

    def _located(self, ref: BlobRef) -> BlobRef:
        return BlobRef(ref.sha, ref.size, ref.item_id, self._urls.get(ref.sha))

    async def _renew(self, reason: str, generation: int) -> None:
        task = self._renewing
        if task is None:
            if generation != self._generation:
                return  # renewed since the caller took its URL
            task = self._renewing = asyncio.get_running_loop().create_task(self._renew_all(reason))
            task.add_done_callback(self._renewed)
        # Shielded: a cancelled request must not cancel the renewal other fetches wait for.
        await asyncio.shield(task)

    def _renewed(self, _: asyncio.Task[None]) -> None:
        self._renewing = None

    async def _renew_all(self, reason: str) -> None:
        earliest: datetime | None = None
        for start in range(0, len(self._blobs), MAX_URLS_PER_REQUEST):
            fresh = await self.broker.urls(self._blobs[start : start + MAX_URLS_PER_REQUEST])
            self._urls.update(fresh.urls)
            earliest = fresh.expires_at if earliest is None else min(earliest, fresh.expires_at)
        if earliest is not None:
            self._schedule(earliest)
        self._generation += 1
        self.renewals[reason] += 1
        log.info("renewed %d blob URLs (%s); valid until %s", len(self._blobs), reason, earliest)

    async def aclose(self) -> None:
        await self._http.aclose()
        await self.broker.aclose()
