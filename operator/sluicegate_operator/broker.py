"""The broker: turns a pod's projected token into that pod's shard plan and short-lived blob URLs.

Every step that can refuse raises :class:`access.Refused`; the decision (allowed or why not) is
logged and counted. Storage credentials stay in this process: pods get presigned URLs only.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pydantic_core
from pydantic import BaseModel, ValidationError
from sluicegate import ConfigError, ConflictError, IntegrityError, NotFoundError, QueryError, StoreError
from sluicegate.core import ledger
from sluicegate.core.broker_protocol import (
    AUDIENCE,
    BrokerPaths,
    LedgerReport,
    PlanRequest,
    PlanResponse,
    ProgressReport,
    UrlsRequest,
    UrlsResponse,
)
from sluicegate.core.mix import MixKeys, source_seed
from sluicegate.core.partition import Positions, Progress, ShardSpec, per_rank
from sluicegate.core.protocol import Resume
from sluicegate.core.store import blob_key

from . import access, grants
from . import progress as progress_rules
from .access import Identity, Refused
from .catalog import Catalog, Handle, Shard
from .events import Announcer, pod_ref
from .inject import STREAM_LABEL
from .kube import Kube
from .metrics import BROKER_DECISIONS, BROKER_ITEMS, BROKER_SECONDS, BROKER_URLS
from .models import Dataset, DatasetStream, Part, Policy, StreamProgress
from .resolve import Sources, load_dataset, load_stream, open_store
from .sources import SourceRefused
from .status import is_ready

log = logging.getLogger("sluicegate.broker")
T = TypeVar("T", bytes, UrlsResponse)
M = TypeVar("M", bound=BaseModel)
R = TypeVar("R")
_WRITE_TRIES = 5
MAX_TOKEN_BYTES = 16 * 1024
_JWT = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


def _parse(raw: bytes, model: type[M]) -> M:
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)[:5]
        raise Refused(400, "bad_request", f"malformed {model.__name__}: {errors}") from exc


def _join_arrays(first: bytes, second: bytes) -> bytes:
    """Two JSON arrays as one (the shard's rows, then a re-cut's)."""
    if second == b"[]":
        return first
    if first == b"[]":
        return second
    return first[:-1] + b"," + second[1:]


@dataclass(frozen=True)
class Grant:
    """Everything a request is allowed to see, established once per request."""

    who: Identity
    stream: DatasetStream
    part: Part  # what the pod's sidecar reads: the stream's Dataset, or one source of its mix
    dataset: Dataset
    store: Handle
    rank: int
    world_size: int
    policies: tuple[Policy, ...]

    def spec(self) -> ShardSpec:
        """The sealed rank and world size, cut and ordered as the stream says (a mix's source ``i`` with
        the seed a mix shuffled with the stream's seed gives it, as ``sluicegate.mix`` does)."""
        sharding = self.stream.spec.sharding
        seed = sharding.seed if self.part.name is None else source_seed(sharding.seed, self.part.index)
        return ShardSpec(
            rank=self.rank,
            world_size=self.world_size,
            seed=seed,
            shuffle=sharding.shuffle,
            remainder=sharding.remainder,
        )

    @property
    def version(self) -> int:
        version = self.part.status.resolved_version
        assert version is not None  # checked in _grant
        return version

    @property
    def queries(self) -> tuple[str, ...]:
        """The part's query and the pod's row-level policies: what its selection is."""
        return (self.part.query, *(p.query for p in self.policies))

    def basis(self) -> str:
        """What the stream's progress is of (see progress.basis); a mix's is of every source (MixCut)."""
        return progress_rules.basis(self.version, self.queries, self.spec())


@dataclass(frozen=True)
class MixCut:
    """A mix stream as one pod reads it: the grant of each of its sources, in the stream's order. Its
    epoch's progress is of the mix's order (one per rank, every source interleaved), so a re-cut of it
    needs what the pod selects of every source."""

    parts: tuple[Grant, ...]

    @property
    def stream(self) -> DatasetStream:
        return self.parts[0].stream

    def basis(self) -> str:
        spec = self.stream.spec
        return progress_rules.mix_basis(
            [g.basis() for g in self.parts], [g.part.weight for g in self.parts], spec.epoch_length
        )

    def keyed(self, lengths: Sequence[int]) -> MixKeys:
        """The mix's keys over ``lengths`` (what the pod selects of each source): the arithmetic of the
        pod's own ``sluicegate.mix``."""
        sharding = self.stream.spec.sharding
        return MixKeys(
            tuple(lengths),
            tuple(g.part.weight for g in self.parts),
            sharding.seed if sharding.shuffle else None,
            sharding.remainder,
            self.stream.spec.epoch_length,
        )


@dataclass(frozen=True)
class BrokerLimits:
    """What one pod may cost the broker."""

    rate_per_s: float = 50.0  # requests per pod per second, sustained
    burst: float = 100.0
    review_cache_s: float = 10.0  # a TokenReview's yes is reused this long for the same token
    concurrent_reviews: int = 16  # TokenReviews in flight at once, whoever asks
    failed_reviews_per_s: float = 5.0  # rejected tokens per client address before it is slowed down


BodyReader = Callable[[], Awaitable[bytes]]
BrokerCall = Callable[[str | None, BodyReader, str, str | None], Awaitable[bytes]]


class Broker:
    def __init__(
        self,
        kube: Kube,
        catalog: Catalog,
        presign_ttl: timedelta,
        *,
        policies: Sources,
        grant_key: bytes,
        limits: BrokerLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._kube = kube
        self._catalog = catalog
        self._ttl = presign_ttl
        self._policies = policies
        self.grant_key = grant_key
        self.limits = limits or BrokerLimits()
        self._clock = clock
        self._rate = access.RateLimit(self.limits.rate_per_s, self.limits.burst)
        self._failures = access.RateLimit(
            self.limits.failed_reviews_per_s, 4 * self.limits.failed_reviews_per_s
        )
        self._reviews: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._review_slots = asyncio.Semaphore(self.limits.concurrent_reviews)
        self._events = Announcer(kube, clock=clock)

    def endpoint(
        self, name: str, request: type[M], serve: Callable[[Grant, M], Awaitable[bytes]]
    ) -> BrokerCall:
        """The broker endpoint ``name``: the caller's grant is decided from its token first, then its body
        (read only once the caller is known) is parsed as ``request`` and ``serve`` answers it."""

        async def call(token: str | None, body: BodyReader, remote: str, source: str | None) -> bytes:
            async def then(grant: Grant) -> bytes:
                return await serve(grant, _parse(await body(), request))

            return await self._decide(name, token, remote, source, then)

        return call

    def endpoints(self) -> dict[str, BrokerCall]:
        """Every endpoint by its path: the plan (:class:`PlanResponse` JSON), URLs, a progress report and a
        ledger report (``{}`` once taken)."""
        return {
            BrokerPaths.PLAN: self.endpoint("plan", PlanRequest, self._plan),
            BrokerPaths.URLS: self.endpoint("urls", UrlsRequest, self._urls),
            BrokerPaths.PROGRESS: self.endpoint("progress", ProgressReport, self._progress),
            BrokerPaths.LEDGER: self.endpoint("ledger", LedgerReport, self._ledger),
        }

    async def _decide(
        self,
        endpoint: str,
        token: str | None,
        remote: str,
        source: str | None,
        then: Callable[[Grant], Awaitable[T]],
    ) -> T:
        started = time.perf_counter()
        who = "?"
        try:
            grant = await self._grant(token, remote, source)
            who = f"{grant.who.namespace}/{grant.who.pod_name}"
            result = await then(grant)
        except Refused as exc:
            BROKER_DECISIONS.labels(endpoint, "denied", exc.reason).inc()
            pod = exc.pod
            log.warning(
                "broker %s for %s: denied %s (%s): %s",
                endpoint,
                f"{pod.namespace}/{pod.pod_name}" if pod else who,
                exc.status,
                exc.reason,
                exc.message,
            )
            if pod is not None and exc.status != 429:  # a throttled pod is told when to come back
                self._events.warn(
                    pod_ref(pod.namespace, pod.pod_name, pod.pod_uid),
                    "BrokerRefused",
                    f"the sluicegate broker refused this pod's {endpoint} request ({exc.reason}): "
                    + exc.message,
                    about=exc.reason,
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

    def _reviewed(self, token: str) -> bool:
        """Whether ``token`` has a fresh, accepted TokenReview in the cache."""
        cached = self._reviews.get(hashlib.sha256(token.encode()).hexdigest())
        return cached is not None and cached[0] > self._clock()

    async def _review(self, token: str) -> dict[str, Any]:
        """The TokenReview of ``token``; a yes is reused for ``review_cache_s`` (keyed by a digest)."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = self._clock()
        cached = self._reviews.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        async with self._review_slots:
            status = await self._kube.token_review(token, [AUDIENCE])
        if status.get("authenticated"):
            self._reviews[digest] = (now + self.limits.review_cache_s, status)
            self._reviews.move_to_end(digest)
            while len(self._reviews) > 10_000:
                self._reviews.popitem(last=False)
        return status

    async def _grant(self, token: str | None, remote: str, source: str | None) -> Grant:
        if not token:
            raise Refused(
                401, "no_token", "no bearer token: send the pod's projected token (audience sluicegate.io)"
            )
        if len(token) > MAX_TOKEN_BYTES or not _JWT.fullmatch(token):
            raise Refused(401, "token_rejected", "the bearer token is not a ServiceAccount token (a JWT)")
        # Tokens that fail review cost the API server a TokenReview each: a client whose tokens keep
        # failing is slowed down before it asks for more.
        failing = f"failed:{remote}"
        if not self._reviewed(token) and self._failures.peek(failing, self._clock()) <= 0:
            raise access.rate_limited(
                f"too many rejected tokens from {remote}; retry later with the pod's projected token", 1.0
            )
        try:
            who = access.identity(await self._review(token), AUDIENCE)
        except Refused:
            self._failures.take(failing, self._clock())
            raise
        try:
            wait = self._rate.take(who.pod_uid, self._clock())
            if wait > 0:
                raise access.rate_limited(
                    f"pod {who.namespace}/{who.pod_name} sends more than {self.limits.rate_per_s:g} "
                    f"requests/s to the broker; retry in {wait:.1f} s",
                    wait,
                )
            return await self._grant_pod(who, source)
        except Refused as exc:
            exc.pod = who
            raise

    async def _grant_pod(self, who: Identity, source: str | None) -> Grant:
        pod = await self._kube.get_pod(who.namespace, who.pod_name)
        if pod is None or pod["metadata"].get("uid") != who.pod_uid:
            raise Refused(401, "pod_gone", f"the token's pod {who.namespace}/{who.pod_name} no longer exists")
        meta = pod["metadata"]
        labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
        stream_name = labels.get(STREAM_LABEL)
        if not stream_name:
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
        # Rank and world size are what admission decided and sealed, never what the pod's owner can edit.
        try:
            sealed = grants.open_grant(
                self.grant_key,
                annotations.get(grants.GRANT_ANNOTATION),
                namespace=who.namespace,
                service_account=who.service_account,
                stream=stream_name,
                stream_uid=stream.metadata.uid,
            )
        except grants.GrantInvalid as exc:
            raise Refused(
                403, "not_admitted", f"pod {who.namespace}/{who.pod_name} gets no plan: {exc}"
            ) from exc
        fixed = stream.spec.sharding.world_size
        if fixed is not None and fixed != sealed.world_size:
            raise Refused(
                409,
                "world_size_changed",
                f"pod {who.namespace}/{who.pod_name} was admitted for world size {sealed.world_size}, but "
                f"DatasetStream {stream_name} now says {fixed}: recreate the job's pods",
            )
        part = stream.part(source)
        if part is None:
            if source is None:
                raise Refused(
                    400,
                    "bad_request",
                    f"DatasetStream {who.namespace}/{stream_name} is a mix: ask for one of its sources "
                    f"(?source=NAME: {', '.join(p.name or '' for p in stream.parts())})",
                )
            raise Refused(
                404,
                "source_not_found",
                f"DatasetStream {who.namespace}/{stream_name} has no source {source!r}",
            )
        ds_ns, ds_name = part.namespace, part.dataset
        allowed, why = await self._kube.may_stream(
            user=who.username, groups=who.groups, uid=who.uid, extra=who.extra, namespace=ds_ns, name=ds_name
        )
        if not allowed:
            raise Refused(403, "rbac", access.missing_stream_permission(who.username, ds_ns, ds_name, why))
        dataset = await load_dataset(self._kube, ds_ns, ds_name)
        if dataset is None:
            raise Refused(404, "dataset_not_found", f"Dataset {ds_ns}/{ds_name} no longer exists")
        try:
            store = await open_store(self._kube, self._catalog, self._policies, dataset)
        except SourceRefused as exc:
            raise Refused(
                503, "source_not_allowed", f"Dataset {ds_ns}/{ds_name} cannot be read: {exc}"
            ) from exc
        except ConfigError as exc:
            raise Refused(503, "credentials", f"Dataset {ds_ns}/{ds_name} cannot be read: {exc}") from exc
        # After the source checks: a stream made not Ready by a revoked source says so, not "not Ready yet".
        if not is_ready(stream.status.conditions) or part.status.resolved_version is None:
            raise Refused(
                409, "stream_not_ready", f"DatasetStream {who.namespace}/{stream_name} is not Ready yet"
            )
        policies = access.applicable_policies(dataset.spec.policies, who.username, who.groups)
        blank = [p.name for p in policies if not p.query.strip()]
        if blank:  # a blank filter would select everything: fail closed
            raise Refused(
                503,
                "policy",
                f"Dataset {ds_ns}/{ds_name} cannot be read: its row-level policy {blank[0]} has a blank "
                "query; the Dataset's owner must give it a filter",
            )
        return Grant(who, stream, part, dataset, store, sealed.rank, sealed.world_size, tuple(policies))

    def _shard(self, grant: Grant) -> Shard:
        """The rank's shard (cached per stream, rank and policies); runs in a thread."""
        return self._read(
            grant, lambda version: self._catalog.shard(grant.store, version, grant.queries, grant.spec())
        )

    def _read(self, grant: Grant, read: Callable[[int], R]) -> R:
        """``read(version)`` of the stream's store, its faults as refusals; runs in a thread."""
        version = grant.version
        try:
            return read(version)
        except QueryError as exc:
            raise Refused(
                409,
                "query",
                f"the stream's query or a row-level policy does not fit version {version}: {exc}",
            ) from exc
        except (NotFoundError, StoreError) as exc:
            raise Refused(503, "store", f"the dataset store cannot be read: {exc}") from exc

    def _recut(self, grant: Grant, progress: Progress | None, mix: MixCut | None = None) -> Shard | None:
        """The rank's assignment in a re-cut epoch's current segment (None: the epoch was not re-cut); of a
        mix, this source's items of the rank's block, in block order."""
        if progress is None or not progress.segment or progress.current.world_size != grant.world_size:
            return None
        spec = grant.spec()
        if mix is None:
            return self._read(
                grant,
                lambda version: self._catalog.segment(grant.store, version, grant.queries, spec, progress),
            )
        mine = self._mix_block(grant, progress, mix)
        return self._read(
            grant, lambda version: self._catalog.rows(grant.store, version, grant.queries, mine)
        )

    def _mix_block(self, grant: Grant, progress: Progress, mix: MixCut) -> Positions:
        """Where the rank's block of a mix's re-cut epoch takes this source's items: positions in the pod's
        selection of it, in block order (what its sidecar serves after the shard's rows)."""
        keyed = mix.keyed(self._lengths(mix))
        sources, positions = keyed.split(keyed.recut(progress, grant.rank))
        mine: Positions = positions[sources == grant.part.index]
        return mine

    async def _recut_rows(self, grant: Grant, reported: Progress) -> Positions | None:
        """What a report of a mix's re-cut rows indexes: the pod's :meth:`_mix_block` of the re-cut the
        stream keeps, if the report is of that re-cut (None: of none the pod is served now)."""
        mix = await self._mix_cut(grant)
        stored = None if mix is None else self._stored(grant, mix)
        if (
            mix is None
            or stored is None
            or not stored.segment
            or stored.current.world_size != grant.world_size
            or not stored.cuts_as(reported)
        ):
            return None
        return await self._catalog.run(self._mix_block, grant, stored, mix, store=grant.store)

    def _lengths(self, mix: MixCut) -> list[int]:
        """What the pod selects of each source of the mix (its policies applied)."""

        def selected(g: Grant) -> int:
            return len(self._read(g, lambda version: self._catalog.select(g.store, version, g.queries)))

        return [selected(g) for g in mix.parts]

    async def _mix_cut(self, grant: Grant) -> MixCut | None:
        """Every source's grant when the stream is a mix (each checked as its own request would be)."""
        if not grant.stream.is_mix:
            return None
        parts = [
            grant if part.name == grant.part.name else await self._grant_pod(grant.who, part.name)
            for part in grant.stream.parts()
        ]
        return MixCut(tuple(parts))

    def _stored(self, grant: Grant, mix: MixCut | None = None) -> Progress | None:
        """The stream's epoch in progress as the last read of the stream has it, if of this pod's cut."""
        stored = grant.stream.status.progress
        if stored is None or stored.basis != (grant.basis() if mix is None else mix.basis()):
            return None
        return stored.core()

    async def _write_progress(
        self, grant: Grant, decide: Callable[[DatasetStream], Awaitable[StreamProgress | None]]
    ) -> DatasetStream:
        """Write what ``decide`` makes of the stream's progress, compare-and-swap on the stream's
        resourceVersion (the broker of every replica and the reconciler write the status): on a conflict
        the stream is read again and decided again. The stream as last read."""
        stream = grant.stream
        ns, name = stream.metadata.namespace, stream.metadata.name
        for _ in range(_WRITE_TRIES):
            write = await decide(stream)
            if write is None:
                return stream
            patch = {"progress": write.wire()}
            if await self._kube.patch_status_at(
                "datasetstreams", ns, name, stream.metadata.resource_version, patch
            ):
                return stream.model_copy(
                    update={"status": stream.status.model_copy(update={"progress": write})}
                )
            fresh = await load_stream(self._kube, ns, name)
            if fresh is None or fresh.metadata.uid != stream.metadata.uid:
                raise Refused(404, "stream_not_found", f"DatasetStream {ns}/{name} no longer exists")
            stream = fresh
        raise Refused(503, "busy", f"the progress of DatasetStream {ns}/{name} kept changing; retry")

    async def _plan_progress(self, grant: Grant, mix: MixCut | None) -> Progress | None:
        """The stream's progress this pod's plan continues, written first when the plan changes it (a
        re-cut for the pod's world size, the pod taking over its rank)."""
        decided: progress_rules.PlanProgress | None = None
        basis = grant.basis() if mix is None else mix.basis()

        async def decide(stream: DatasetStream) -> StreamProgress | None:
            nonlocal decided
            decided = progress_rules.for_plan(
                stream.status.progress,
                basis=basis,
                rank=grant.rank,
                world_size=grant.world_size,
                pod=grant.who.pod_uid,
            )
            return decided.write

        await self._write_progress(grant, decide)
        assert decided is not None
        return decided.progress

    async def _progress(self, grant: Grant, report: ProgressReport) -> bytes:
        spec = grant.spec()
        mix = await self._mix_cut(grant)
        basis = grant.basis() if mix is None else mix.basis()

        def length(progress: Progress) -> int:
            # The rank's count in the progress' current segment: every rank's is the same.
            if mix is not None:
                return mix.keyed(self._lengths(mix)).segment_length(progress)
            if not progress.segment:
                selected = self._read(
                    grant, lambda version: self._catalog.select(grant.store, version, grant.queries)
                )
                return per_rank(len(selected), spec.world_size, spec.remainder)
            rest = self._read(
                grant,
                lambda version: self._catalog.remainder(grant.store, version, grant.queries, spec, progress),
            )
            return per_rank(len(rest), spec.world_size, spec.remainder)

        async def decide(stream: DatasetStream) -> StreamProgress | None:
            def take() -> StreamProgress | None:
                return progress_rules.take_report(
                    stream.status.progress,
                    report,
                    basis=basis,
                    rank=grant.rank,
                    world_size=grant.world_size,
                    pod=grant.who.pod_uid,
                    length=length,
                )

            return await self._catalog.run(take, store=grant.store)

        await self._write_progress(grant, decide)
        return b"{}"

    async def _ledger(self, grant: Grant, report: LedgerReport) -> bytes:
        """Write the report as a record of the pod's own chain: who wrote it (namespace, stream, pod), the
        cut it was served (the stream's query, the pod's policies, its sealed shard), the dataset and
        version all come from the grant; only what the trainer did within that cut comes from the body.
        Any replica may take any report (each record is placed by its number, after the one before it)."""
        version = grant.version
        mine = ledger.View(queries=tuple(q for q in grant.queries if q.strip()), shard=grant.spec())
        reported = report.consumed.recut
        recut = None if reported is None else await self._recut_rows(grant, reported)
        try:
            consumed, who = report.recorded(
                mine,
                namespace=grant.who.namespace,
                stream=grant.stream.metadata.name,
                pod=grant.who.pod_name,
                recut=recut,
            )
        except ConfigError as exc:
            raise Refused(400, "bad_request", str(exc)) from exc
        # The pod's UID in the chain's name: no other pod's reports can land in (or squat on) its chain.
        chain = f"{report.chain}-{grant.who.pod_uid.replace('-', '')[:12]}"

        def write() -> None:
            digest = self._catalog.manifest(grant.store, version).digest
            ledger.append_at(
                grant.store.store,
                consumed,
                run=report.run,
                chain=chain,
                seq=report.number,
                writer=who,
                dataset=grant.store.store.uri,
                version=version,
                manifest=digest,
            )

        try:
            await self._catalog.run(write, store=grant.store)
        except ConfigError as exc:
            raise Refused(400, "ledger_conflict", str(exc)) from exc
        except ConflictError as exc:
            raise Refused(409, "ledger_order", str(exc)) from exc
        except IntegrityError as exc:
            raise Refused(409, "ledger_integrity", f"the pod's ledger chain is damaged: {exc}") from exc
        except (NotFoundError, StoreError) as exc:
            raise Refused(503, "store", f"the dataset store cannot be written: {exc}") from exc
        return b"{}"

    def _presign(self, grant: Grant, blobs: Sequence[str]) -> tuple[dict[str, str], datetime]:
        expires = datetime.now(UTC) + self._ttl
        if not blobs:
            return {}, expires
        try:
            urls = grant.store.store.presign_many([blob_key(b) for b in blobs], self._ttl)
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

        mix = await self._mix_cut(grant)
        progress = await self._plan_progress(grant, mix)

        def build() -> bytes:
            shard = self._shard(grant)
            recut = self._recut(grant, progress, mix)
            blobs = shard.blobs if recut is None else tuple(dict.fromkeys((*shard.blobs, *recut.blobs)))
            urls, expires = self._presign(grant, blobs if request.presign else ())
            BROKER_ITEMS.inc(shard.items + (recut.items if recut is not None else 0))
            resume = None
            if progress is not None:
                items = recut.items if recut is not None else 0
                resume = Resume(
                    progress=progress, first=shard.items, items=items, mix=stream.is_mix
                ).model_dump(mode="json")
            head = PlanResponse.model_validate(
                {
                    "namespace": stream.metadata.namespace,
                    "stream": stream.metadata.name,
                    "dataset": f"{grant.dataset.metadata.namespace}/{grant.dataset.metadata.name}",
                    "version": grant.version,
                    "query": grant.part.query,
                    "policies": [p.name for p in grant.policies],
                    "total": shard.total,
                    **grant.spec().model_dump(),
                    "rows": [],
                    "urls": {},
                    "expires_at": expires,
                    "resume": resume,
                }
            ).model_dump_json()
            # The rows are serialised once per shard and the URLs are plain strings: splicing them into the
            # validated head skips re-validating tens of thousands of rows per request. JSON escapes quotes
            # inside strings, so the two markers occur exactly once, as the members themselves (rows before
            # urls, the model's field order). Joining bytes copies the tens of MB once, not three times.
            start, rest = head.encode().split(b'"rows":[]', 1)
            middle, end = rest.split(b'"urls":{}', 1)
            urls_json = pydantic_core.to_json(urls)
            rows = shard.rows_json if recut is None else _join_arrays(shard.rows_json, recut.rows_json)
            return b"".join((start, b'"rows":', rows, middle, b'"urls":', urls_json, end))

        return await self._catalog.run(build, store=grant.store)

    async def _urls(self, grant: Grant, request: UrlsRequest) -> bytes:
        def outside(mix: MixCut | None) -> list[str]:
            """The requested blobs the pod is not served: neither in its shard nor in its re-cut rows."""
            shard = self._shard(grant)
            foreign = [b for b in request.blobs if b not in shard.blob_set]
            if foreign and (mix is not None or not grant.stream.is_mix):
                recut = self._recut(grant, self._stored(grant, mix), mix)
                if recut is not None:  # a re-cut epoch's rows are the pod's too
                    foreign = [b for b in foreign if b not in recut.blob_set]
            return foreign

        foreign = await self._catalog.run(lambda: outside(None), store=grant.store)
        if foreign and grant.stream.is_mix:  # a mix's re-cut takes every source: looked up only when needed
            mix = await self._mix_cut(grant)
            foreign = await self._catalog.run(lambda: outside(mix), store=grant.store)
        if foreign:
            raise Refused(
                403,
                "not_in_shard",
                f"{len(foreign)} requested blob(s) are not in this pod's shard, e.g. {foreign[0]}",
            )

        def build() -> UrlsResponse:
            urls, expires = self._presign(grant, list(dict.fromkeys(request.blobs)))
            return UrlsResponse(urls=urls, expires_at=expires)

        return (await self._catalog.run(build, store=grant.store)).model_dump_json().encode()
