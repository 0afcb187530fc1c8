"""Broker mode: the pod's shard plan and blob URLs come from the operator's broker, not from the store.

In a cluster the sidecar holds no storage credentials. It presents the pod's projected ServiceAccount
token (re-read on every request: the kubelet rotates it), receives its shard's manifest rows, and asks
for presigned blob URLs in windows ahead of the read position, renewing them before they expire or when
the store refuses one (a clock ahead of the broker's, a revoked signing key).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import httpx
import pyarrow as pa
from pydantic import BaseModel, ValidationError
from sluicegate import ConfigError, StoreError
from sluicegate.core.broker_protocol import (
    MAX_URLS_PER_REQUEST,
    BrokerError,
    BrokerPaths,
    LedgerReport,
    PlanRequest,
    PlanResponse,
    ProgressReport,
    UrlsRequest,
    UrlsResponse,
)
from sluicegate.core.engine import BlobRef, Limits, Outcome, Plan, UrlRefused, UrlUpstream, fetch_each
from sluicegate.core.flights import Flights
from sluicegate.core.manifest import BASE_SCHEMA, LABEL_PREFIX
from sluicegate.core.partition import Positions
from sluicegate.core.protocol import Info, WireRow

__all__ = ["BrokerClient", "BrokerRefused", "BrokerUpstream", "plan_of"]

log = logging.getLogger("sluicegate.sidecar.broker")
M = TypeVar("M", bound=BaseModel)
_MAX_CONSUMERS = 64  # announcements kept (stream readers, batch clients); the oldest are forgotten
_RATE_LIMIT_RETRIES = 3  # 429s a request waits out (Retry-After) before it reports the refusal
_RATE_LIMIT_MAX_WAIT_S = 5.0


class BrokerRefused(StoreError):
    """The broker answered with an error; ``message`` is the broker's own explanation."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"the broker refused (HTTP {status} {code}): {message}")
        self.status, self.code, self.message = status, code, message


class BrokerClient:
    """Calls the broker over HTTPS, verifying its certificate against ``ca`` (PEM text or a PEM file)."""

    def __init__(
        self,
        url: str,
        ca: str | None,
        token_file: Path,
        stream: str | None,
        timeout_s: float = 30.0,
        source: str | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._ca = ca
        self._token_file = token_file
        self._stream = stream
        self._timeout_s = timeout_s
        # A mix's sidecar serves one source: every request says which (the broker checks it is the stream's).
        self._params = {"source": source} if source else {}
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
        for attempt in range(_RATE_LIMIT_RETRIES + 1):
            try:
                response = await self._client.post(
                    self.url + path,
                    params=self._params,
                    content=body.model_dump_json(),
                    headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
                )
            except httpx.HTTPError as exc:
                raise StoreError(f"cannot reach the broker at {self.url}: {exc!r}") from exc
            if response.status_code != 429 or attempt == _RATE_LIMIT_RETRIES:
                break
            # The broker limits requests per pod: wait as long as it says (bounded), then ask again.
            try:
                wait = float(response.headers.get("Retry-After", "1"))
            except ValueError:
                wait = 1.0
            await asyncio.sleep(min(max(wait, 0.1), _RATE_LIMIT_MAX_WAIT_S))
        if response.status_code != 200:
            try:
                error = BrokerError.model_validate_json(response.content)
                code, message = error.code.value, error.message
            except ValidationError:
                code, message = "unexpected", response.text[:300]
            raise BrokerRefused(response.status_code, code, message)
        return response.content

    async def plan(self) -> PlanResponse:
        # Rows only: the URLs come in windows as the reads reach them (BrokerUpstream).
        raw = await self._post(BrokerPaths.PLAN, PlanRequest(stream=self._stream, presign=False))
        return _parse(PlanResponse, raw)

    async def progress(self, report: ProgressReport) -> None:
        """Report how far this pod's rank got; the broker keeps it in the stream's progress."""
        await self._post(BrokerPaths.PROGRESS, report)

    async def ledger(self, report: LedgerReport) -> None:
        """Pass a trainer's report on; the broker records it in the Dataset's ledger for this pod."""
        await self._post(BrokerPaths.LEDGER, report)

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
    """The engine plan and the served info of a broker's answer (rows are in assignment order: the shard,
    then the rows of an epoch's re-cut assignment when the stream keeps one)."""
    resume = response.resume
    shard = len(response.rows) if resume is None or not resume.items else resume.first
    if resume is not None and resume.items and resume.first + resume.items != len(response.rows):
        raise StoreError(
            f"the broker's plan has {len(response.rows)} rows, but its resume says {resume.first} + "
            f"{resume.items}"
        )
    info = Info(
        dataset=response.dataset,
        version=response.version,
        query=response.query or None,
        total=response.total,
        items=shard,
        resume=resume,
        **response.shard_spec().model_dump(),
    )
    try:
        table = _table(response.rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise StoreError(f"the broker's plan rows do not fit the manifest schema: {exc}") from exc
    return Plan(response.version, table), info


@dataclass(frozen=True, slots=True)
class _Url:
    url: str
    renew_at: float  # time.time() after which it is not handed to a fetch any more
    window: int  # the request that brought it: a store refusal discards its whole window


class BrokerUpstream:
    """Fetches blobs through presigned URLs that it asks the broker for in windows, ahead of the reads.

    The plan carries no URLs (it is asked for with ``presign=false``, so it costs the broker no signing).
    The server announces, per consumer, the plan positions it reads next (:meth:`expect`); when one of
    the next ``lead`` of them (or of those the engine fetches now, if more) has no usable URL, one
    request asks for up to ``window`` URLs of the announced blobs that lack one. So the broker signs at
    the rate data is consumed, and no URL is asked for long before its use, so few lapse unused.

    A URL counts as usable until three quarters of its lifetime (at most a minute before expiry); a
    fetch that finds none asks for its own window; a 403 from the store discards the refused URL's whole
    window and renews it once (concurrent refusals share the renewal). A URL is dropped once its blob is
    fetched: the engine caches the bytes, and blobs it holds get no URL.
    """

    def __init__(
        self,
        broker: BrokerClient,
        timeout_s: float = 30.0,
        window: int = 1000,
        lead: int = 500,
        cached: Callable[[str], bool] = lambda sha: False,
    ) -> None:
        if not 1 <= window <= MAX_URLS_PER_REQUEST:
            raise ConfigError(f"the URL window must be in [1, {MAX_URLS_PER_REQUEST}], got {window}")
        self.broker = broker
        self.window, self.lead = window, max(1, lead)
        self._cached = cached  # blobs the engine holds need no URL
        self._http = UrlUpstream(timeout_s)
        self._blob_at: list[str] = []  # blob hash of each plan position
        self._urls: dict[str, _Url] = {}
        self._pending: Flights[str, None] = Flights()  # blob -> the request bringing its URL
        self._ahead: OrderedDict[str, Sequence[int] | Positions] = (
            OrderedDict()
        )  # consumer -> positions it reads next
        self._windows = 0
        self.renewals: Counter[str] = Counter()  # URL requests by reason: "ahead", "missing", "refused"

    def adopt(self, plan: PlanResponse) -> None:
        """Serve a fresh plan (and use its URLs, if the broker sent any)."""
        self._blob_at = [row.blob for row in plan.rows]
        self._urls.clear()
        self._ahead.clear()
        if plan.urls:
            self._store(plan.urls, plan.expires_at)

    def expect(self, consumer: str, positions: Sequence[int] | Positions, fetching: int) -> None:
        """``consumer`` reads these plan positions next, in order (replaces its last announcement); the
        engine fetches the first ``fetching`` of them now (the request and its read-ahead)."""
        lead = max(self.lead, fetching)
        upcoming = positions[: lead + self.window]
        self._ahead[consumer] = upcoming
        self._ahead.move_to_end(consumer)
        while len(self._ahead) > _MAX_CONSUMERS:
            self._ahead.popitem(last=False)
        now = time.time()
        if any(self._needs_url(self._blob_at[p], now) for p in upcoming[:lead]):
            self._request(self._lacking([consumer], now), "ahead")  # not awaited: fetches wait for it

    async def fetch_many(self, refs: Sequence[BlobRef], limits: Limits) -> list[Outcome]:
        return await fetch_each(self.fetch_one, refs, limits)

    async def fetch_one(self, ref: BlobRef) -> bytes:
        url = await self._url(ref.sha, "missing")
        try:
            data = await self._http.fetch_one(self._located(ref, url))
        except UrlRefused as exc:
            if exc.status != 403:
                raise
            log.warning("the store refused the URL of blob %s (%s); renewing its window", ref.sha, exc)
            self._discard_window_of(ref.sha, url)
            url = await self._url(ref.sha, "refused")
            data = await self._http.fetch_one(self._located(ref, url))
        self._urls.pop(ref.sha, None)
        return data

    @staticmethod
    def _located(ref: BlobRef, url: str) -> BlobRef:
        return BlobRef(ref.sha, ref.size, ref.item_id, url)

    def _needs_url(self, sha: str, now: float) -> bool:
        entry = self._urls.get(sha)
        fresh = entry is not None and now < entry.renew_at
        return not fresh and sha not in self._pending and not self._cached(sha)

    def _lacking(self, consumers: Sequence[str], now: float, first: str | None = None) -> list[str]:
        """Up to ``window`` blobs (``first``, then the consumers' upcoming ones) that need a URL."""
        found = dict.fromkeys([first] if first is not None else [])
        for consumer in consumers:
            for position in self._ahead.get(consumer, ()):
                if len(found) >= self.window:
                    return list(found)
                sha = self._blob_at[position]
                if sha not in found and self._needs_url(sha, now):
                    found[sha] = None
        return list(found)

    async def _url(self, sha: str, reason: str) -> str:
        entry = self._urls.get(sha)
        if entry is None or time.time() >= entry.renew_at:
            task = self._pending.get(sha)
            if task is None:
                # The most recent consumers' upcoming blobs ride along: their URLs are needed soon too.
                consumers = list(reversed(self._ahead))
                task = self._request(self._lacking(consumers, time.time(), first=sha), reason)
            # Shielded: a cancelled fetch must not cancel a request other fetches wait for.
            await asyncio.shield(task)
            entry = self._urls.get(sha)
            if entry is None:
                raise StoreError(f"the broker sent no URL for blob {sha} although it was asked for one")
        return entry.url

    def _request(self, blobs: list[str], reason: str) -> asyncio.Future[None]:
        task = self._pending.start(blobs, self._ask(blobs, reason))

        def done(_: asyncio.Future[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                # Fetches waiting on it raise it themselves (and the engine retries); this is for the log.
                log.warning("asking the broker for %d blob URLs failed: %s", len(blobs), task.exception())

        task.add_done_callback(done)
        return task

    async def _ask(self, blobs: list[str], reason: str) -> None:
        fresh = await self.broker.urls(blobs)
        self._store(fresh.urls, fresh.expires_at)
        self.renewals[reason] += 1
        log.debug("got %d blob URLs (%s); valid until %s", len(fresh.urls), reason, fresh.expires_at)

    def _store(self, urls: Mapping[str, str], expires_at: datetime) -> None:
        expires, now = expires_at.timestamp(), time.time()
        renew_at = expires - min(60.0, max(0.0, expires - now) / 4)
        self._windows += 1
        if len(self._urls) > _MAX_CONSUMERS * self.window:  # announced but never read: forget the stale
            self._urls = {sha: u for sha, u in self._urls.items() if now < u.renew_at}
        for sha, url in urls.items():
            self._urls[sha] = _Url(url, renew_at, self._windows)

    def _discard_window_of(self, sha: str, refused_url: str) -> None:
        """Forget every URL of the refused one's window (a clock skew or a rotated key spoils them all),
        unless a renewal already replaced it."""
        entry = self._urls.get(sha)
        if entry is None or entry.url != refused_url:
            return
        self._urls = {s: u for s, u in self._urls.items() if u.window != entry.window}

    async def aclose(self) -> None:
        await self._http.aclose()
        await self.broker.aclose()
