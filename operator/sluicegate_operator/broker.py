"""The broker: turns a pod's projected token into that pod's shard plan and short-lived blob URLs.

Every step that can refuse raises :class:`access.Refused`; the decision (allowed or why not) is
logged and counted. Storage credentials stay in this process: pods get presigned URLs only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pydantic_core
from sluicegate._broker_protocol import AUDIENCE, PlanRequest, PlanResponse, UrlsRequest, UrlsResponse
from sluicegate._exceptions import ConfigError, NotFoundError, QueryError, StoreError
from sluicegate._store import Store, blob_key

from . import access
from .access import Identity, Refused
from .catalog import Catalog, Shard
from .inject import INJECTED_LABEL, RANK_ANNOTATION, STREAM_LABEL, WORLD_SIZE_ANNOTATION
from .kube import Kube
from .metrics import BROKER_DECISIONS, BROKER_ITEMS, BROKER_SECONDS, BROKER_URLS
from .models import Dataset, DatasetStream, Policy
from .resolve import load_dataset, load_stream, open_store
from .status import is_ready

log = logging.getLogger("sluicegate.broker")
T = TypeVar("T", bytes, UrlsResponse)


@dataclass(frozen=True)
class Grant:
    """Everything a request is allowed to see, established once per request."""

    who: Identity
    stream: DatasetStream
    dataset: Dataset
    store: Store
    rank: int
    world_size: int
    policies: tuple[Policy, ...]


class Broker:
    def __init__(self, kube: Kube, catalog: Catalog, presign_ttl: timedelta) -> None:
        self._kube = kube
        self._catalog = catalog
        self._ttl = presign_ttl

    async def plan(self, token: str | None, request: PlanRequest) -> bytes:
        """The JSON of the caller's :class:`PlanResponse`."""
        return await self._decide("plan", token, lambda g: self._plan(g, request))

    async def urls(self, token: str | None, request: UrlsRequest) -> UrlsResponse:
        return await self._decide("urls", token, lambda g: self._urls(g, request))

    async def _decide(self, endpoint: str, token: str | None, then: Callable[[Grant], Awaitable[T]]) -> T:
        started = time.perf_counter()
        who = "?"
        try:
            grant = await self._grant(token)
            who = f"{grant.who.namespace}/{grant.who.pod_name}"
            result = await then(grant)
        except Refused as exc:
            BROKER_DECISIONS.labels(endpoint, "denied", exc.reason).inc()
            log.warning(
                "broker %s for %s: denied %s (%s): %s",
                endpoint,
                exc.who or who,
                exc.status,
                exc.reason,
                exc.message,
            )
            raise
        except Exception:
            BROKER_DECISIONS.labels(endpoint, "error", "internal").inc()
            log.exception("broker %s for %s failed", endpoint, who)
            raise
        finally:
            BROKER_SECONDS.labels(endpoint).observe(time.perf_counter() - started)
        BROKER_DECISIONS.labels(endpoint, "allowed", "ok").inc()
        log.info(
            "broker %s for %s: allowed (stream %s, rank %d/%d, policies %s)",
            endpoint,
            who,
            grant.stream.metadata.name,
            grant.rank,
            grant.world_size,
            [p.name for p in grant.policies],
        )
        return result

    async def _grant(self, token: str | None) -> Grant:
        if not token:
            raise Refused(
                401, "no_token", "no bearer token: send the pod's projected token (audience sluicegate.io)"
            )
        who = access.identity(await self._kube.token_review(token, [AUDIENCE]))
        try:
            return await self._grant_pod(who)
        except Refused as exc:
            exc.who = f"{who.namespace}/{who.pod_name}"
            raise

    async def _grant_pod(self, who: Identity) -> Grant:
        pod = await self._kube.get_pod(who.namespace, who.pod_name)
        if pod is None or pod["metadata"].get("uid") != who.pod_uid:
            raise Refused(401, "pod_gone", f"the token's pod {who.namespace}/{who.pod_name} no longer exists")
        meta = pod["metadata"]
        labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
        stream_name = labels.get(STREAM_LABEL)
        if not stream_name or labels.get(INJECTED_LABEL) != "true":
            raise Refused(
                403,
                "pod_not_injected",
                f"pod {who.namespace}/{who.pod_name} is not an injected pod of a DatasetStream "
                f"(label {STREAM_LABEL})",
            )
        stream = await load_stream(self._kube, who.namespace, stream_name)
        if stream is None:
            raise Refused(
                404, "stream_not_found", f"DatasetStream {who.namespace}/{stream_name} no longer exists"
            )
        if not is_ready(stream.status.conditions) or stream.status.resolved_version is None:
            raise Refused(
                409, "stream_not_ready", f"DatasetStream {who.namespace}/{stream_name} is not Ready yet"
            )
        ds_ns, ds_name = stream.dataset_namespace(), stream.spec.dataset.name
        allowed, why = await self._kube.may_stream(
            user=who.username, groups=who.groups, uid=who.uid, extra=who.extra, namespace=ds_ns, name=ds_name
        )
        if not allowed:
            raise Refused(403, "rbac", access.missing_stream_permission(who.username, ds_ns, ds_name, why))
        dataset = await load_dataset(self._kube, ds_ns, ds_name)
        if dataset is None:
            raise Refused(404, "dataset_not_found", f"Dataset {ds_ns}/{ds_name} no longer exists")
        try:
            store = await open_store(self._kube, self._catalog, dataset)
        except ConfigError as exc:
            raise Refused(503, "credentials", f"Dataset {ds_ns}/{ds_name} cannot be read: {exc}") from exc
        try:
            rank, world = int(annotations[RANK_ANNOTATION]), int(annotations[WORLD_SIZE_ANNOTATION])
        except (KeyError, ValueError) as exc:
            raise Refused(
                403, "no_rank", f"pod {who.namespace}/{who.pod_name} carries no rank annotations"
            ) from exc
        policies = access.applicable_policies(dataset.spec.policies, who.username, who.groups)
        return Grant(who, stream, dataset, store, rank, world, tuple(policies))

    def _shard(self, grant: Grant) -> Shard:
        """The rank's shard (cached per stream, rank and policies); runs in a thread."""
        stream = grant.stream
        version = stream.status.resolved_version
        assert version is not None  # checked in _grant
        sharding = stream.spec.sharding
        try:
            return self._catalog.shard(
                grant.store,
                version,
                (stream.spec.query, *(p.query for p in grant.policies)),
                rank=grant.rank,
                world_size=grant.world_size,
                seed=sharding.seed,
                shuffle=sharding.shuffle,
                remainder=sharding.remainder,
            )
        except QueryError as exc:
            raise Refused(
                409,
                "query",
                f"the stream's query or a row-level policy does not fit version {version}: {exc}",
            ) from exc
        except (NotFoundError, StoreError) as exc:
            raise Refused(503, "store", f"the dataset store cannot be read: {exc}") from exc

    def _presign(self, grant: Grant, blobs: Sequence[str]) -> tuple[dict[str, str], datetime]:
        expires = datetime.now(UTC) + self._ttl
        if not blobs:
            return {}, expires
        try:
            urls = grant.store.presign_many([blob_key(b) for b in blobs], self._ttl)
        except ConfigError as exc:
            raise Refused(503, "not_object_store", str(exc)) from exc
        BROKER_URLS.inc(len(urls))
        return dict(zip(blobs, urls, strict=True)), expires

    async def _plan(self, grant: Grant, request: PlanRequest) -> bytes:
        stream = grant.stream
        if request.stream is not None and request.stream != stream.metadata.name:
            raise Refused(
                400, "stream_mismatch", f"this pod streams {stream.metadata.name}, not {request.stream}"
            )

        def build() -> bytes:
            shard = self._shard(grant)
            urls, expires = self._presign(grant, shard.blobs if request.presign else ())
            BROKER_ITEMS.inc(shard.items)
            sharding = stream.spec.sharding
            head = PlanResponse.model_validate(
                {
                    "namespace": stream.metadata.namespace,
                    "stream": stream.metadata.name,
                    "dataset": f"{grant.dataset.metadata.namespace}/{grant.dataset.metadata.name}",
                    "version": stream.status.resolved_version,
                    "query": stream.spec.query,
                    "policies": [p.name for p in grant.policies],
                    "total": shard.total,
                    "rank": grant.rank,
                    "world_size": grant.world_size,
                    "seed": sharding.seed,
                    "shuffle": sharding.shuffle,
                    "remainder": sharding.remainder,
                    "rows": [],
                    "urls": {},
                    "expires_at": expires,
                }
            ).model_dump_json()
            # The rows are serialised once per shard and the URLs are plain strings: splicing them into the
            # validated head skips re-validating tens of thousands of rows per request. JSON escapes quotes
            # inside strings, so the two markers occur exactly once, as the members themselves (rows before
            # urls, the model's field order). Joining bytes copies the tens of MB once, not three times.
            start, rest = head.encode().split(b'"rows":[]', 1)
            middle, end = rest.split(b'"urls":{}', 1)
            urls_json = pydantic_core.to_json(urls)
            return b"".join((start, b'"rows":', shard.rows_json, middle, b'"urls":', urls_json, end))

        return await asyncio.to_thread(build)

    async def _urls(self, grant: Grant, request: UrlsRequest) -> UrlsResponse:
        def build() -> UrlsResponse:
            shard = self._shard(grant)
            foreign = [b for b in request.blobs if b not in shard.blob_set]
            if foreign:
                raise Refused(
                    403,
                    "not_in_shard",
                    f"{len(foreign)} requested blob(s) are not in this pod's shard, e.g. {foreign[0]}",
                )
            urls, expires = self._presign(grant, list(dict.fromkeys(request.blobs)))
            return UrlsResponse(urls=urls, expires_at=expires)

        return await asyncio.to_thread(build)
