"""kopf handlers: thin glue from watch events to the pure reconcilers in ``status``.

Reconciliation is level-triggered: every event of a Dataset or DatasetStream (including the initial
listing after a restart and the echo of our own status writes) recomputes the desired status from
scratch and writes only the difference, so repeating it or restarting mid-way changes nothing.

A periodic resync (one LIST per kind, not kopf timers, which would put finalizers on every object)
re-reads every Dataset's store and retries streams that are not Ready (e.g. created before their
Dataset). Pods are watched only through a server-side label selector on injected pods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import kopf
from sluicegate import ConfigError, NotFoundError, QueryError, StoreError

from . import status as st
from .catalog import Catalog, ManifestTooLarge
from .inject import INJECTED_LABEL, STREAM_LABEL, WORLD_SIZE_ANNOTATION
from .kube import Kube
from .metrics import RECONCILES, STREAM_READY
from .models import GROUP, ConditionStatus, Dataset, DatasetStatus, DatasetStream, DatasetStreamStatus, Part
from .pods import PodCounter
from .resolve import Sources, load_dataset, open_store
from .settings import Settings
from .sources import SourceRefused

log = logging.getLogger("sluicegate.operator")
COUNT_FLUSH_S = 1.0
STREAM_RETRY_S = 10.0


@dataclass
class Context:
    kube: Kube
    catalog: Catalog
    settings: Settings
    policies: Sources
    pods: PodCounter = field(default_factory=PodCounter)
    # The watch event and the retry timer of one object may fire together; one reconcile at a time per
    # object, and the last Ready condition announced per object, keep Events one per transition.
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    announced: dict[str, tuple[str, str, str]] = field(default_factory=dict)

    def lock(self, uid: str) -> asyncio.Lock:
        return self.locks.setdefault(uid, asyncio.Lock())


def _now() -> datetime:
    return datetime.now(UTC)


async def _write(
    ctx: Context,
    plural: str,
    body: dict[str, Any],
    before: DatasetStatus | DatasetStreamStatus,
    after: DatasetStatus | DatasetStreamStatus,
) -> None:
    patch = st.status_patch(before, after)
    meta = body["metadata"]
    old, new = st.ready_condition(before.conditions), st.ready_condition(after.conditions)
    assert new is not None
    RECONCILES.labels(plural, new.reason).inc()
    if plural == "datasetstreams":
        STREAM_READY.labels(meta["namespace"], meta["name"]).set(new.status is ConditionStatus.TRUE)
    if patch is None:
        return
    await ctx.kube.patch_status(plural, meta["namespace"], meta["name"], patch)
    seen = (new.status.value, new.reason, new.message)
    if ctx.announced.get(meta["uid"]) == seen:
        return
    ctx.announced[meta["uid"]] = seen
    if old is None or (old.status, old.reason, old.message) != (new.status, new.reason, new.message):
        ok = new.status is ConditionStatus.TRUE
        log.info(
            "%s %s/%s: %s %s: %s",
            plural,
            meta["namespace"],
            meta["name"],
            "Ready" if ok else "NotReady",
            new.reason,
            new.message,
        )
        await ctx.kube.event(
            body, type_="Normal" if ok else "Warning", reason=new.reason, message=new.message
        )


async def reconcile_dataset(ctx: Context, body: dict[str, Any]) -> None:
    ds = Dataset.model_validate(body)
    now = _now()
    catalog = ctx.catalog
    try:
        store = await open_store(ctx.kube, catalog, ctx.policies, ds)
        latest = await catalog.run(catalog.latest_version, store, store=store)
        if latest == 0:
            after = st.dataset_failed(
                ds,
                reason=st.Reason.STORE_EMPTY,
                message=f"{store.uri} has no versions yet: import data into it",
                now=now,
            )
        else:
            manifest = await catalog.run(catalog.manifest, store, latest, revalidate=True, store=store)
            labels = await catalog.run(st.label_summary, manifest.table)
            after = st.dataset_ready(
                ds, latest_version=latest, items=manifest.table.num_rows, labels=labels, now=now
            )
    except SourceRefused as exc:
        after = st.dataset_failed(ds, reason=st.Reason.SOURCE_NOT_ALLOWED, message=str(exc), now=now)
    except ConfigError as exc:
        after = st.dataset_failed(ds, reason=st.Reason.CREDENTIALS_INVALID, message=str(exc), now=now)
    except ManifestTooLarge as exc:
        after = st.dataset_failed(ds, reason=st.Reason.MANIFEST_TOO_LARGE, message=str(exc), now=now)
    except StoreError as exc:
        after = st.dataset_failed(ds, reason=st.Reason.STORE_UNREACHABLE, message=str(exc), now=now)
    await _write(ctx, "datasets", body, ds.status, after)


async def reconcile_stream(ctx: Context, body: dict[str, Any]) -> None:
    stream = DatasetStream.model_validate(body)
    now = _now()
    resolved: list[st.Resolved] = []
    failure: tuple[str, str] | None = None
    for part in stream.parts():
        found = await _resolve_part(ctx, stream, part)
        if isinstance(found, st.Resolved):
            resolved.append(found)
        else:
            failure = found
            break
    if failure is None:
        after = st.stream_ready(stream, resolved, now=now)
    else:
        after = st.stream_failed(stream, reason=failure[0], message=failure[1], now=now)
    await _write(ctx, "datasetstreams", body, stream.status, after)


async def _resolve_part(ctx: Context, stream: DatasetStream, part: Part) -> st.Resolved | tuple[str, str]:
    """What one part of ``stream`` resolves to, or the reason and message of why it does not."""
    where = part.label()
    dataset = await load_dataset(ctx.kube, part.namespace, part.dataset)
    catalog = ctx.catalog
    if dataset is None:
        return st.Reason.DATASET_NOT_FOUND, f"{where} does not exist"
    try:
        store = await open_store(ctx.kube, catalog, ctx.policies, dataset)
        version, pinned_from = await catalog.run(
            st.pin_version, part, partial(catalog.latest_version, store), store=store
        )
        await catalog.run(catalog.resolve, store, version, store=store)
        selected = await catalog.run(catalog.select, store, version, (part.query,), store=store)
        # Counts before row-level policies would tell a policy's subject how many rows it may not see
        # (and, query by query, their values): a Dataset with policies shows none.
        return st.Resolved(version, pinned_from, None if dataset.spec.policies else len(selected))
    except SourceRefused as exc:
        return st.Reason.SOURCE_NOT_ALLOWED, f"{where} cannot be read: {exc}"
    except ConfigError as exc:
        return st.Reason.CREDENTIALS_INVALID, f"{where}: {exc}" if stream.is_mix else str(exc)
    except QueryError as exc:
        field = f"spec.sources[{part.index}].query" if stream.is_mix else "spec.query"
        return st.Reason.INVALID_QUERY, f"{field} does not fit {where}: {exc}"
    except NotFoundError as exc:
        return st.Reason.VERSION_NOT_FOUND, f"{where}: {exc}" if stream.is_mix else str(exc)
    except StoreError as exc:
        return st.Reason.STORE_UNREACHABLE, f"{where}: {exc}" if stream.is_mix else str(exc)


def _needs_retry(body: dict[str, Any]) -> bool:
    status = body.get("status") or {}
    ready = any(
        c.get("type") == st.READY and c.get("status") == "True" for c in status.get("conditions") or []
    )
    return not ready or status.get("observedGeneration") != body["metadata"].get("generation")


async def resync(ctx: Context) -> None:
    """Re-read every Dataset's store each ``dataset_resync_s`` (new versions come without a Kubernetes
    event) and retry streams that are not Ready every few seconds; runs until cancelled."""
    tick = min(ctx.settings.dataset_resync_s, STREAM_RETRY_S)
    since_datasets = 0.0
    while True:
        await asyncio.sleep(tick)
        since_datasets += tick
        kinds: list[tuple[str, Callable[[Context, dict[str, Any]], Awaitable[None]], bool]] = [
            ("datasetstreams", reconcile_stream, True)
        ]
        if since_datasets >= ctx.settings.dataset_resync_s:
            since_datasets = 0.0
            kinds.insert(0, ("datasets", reconcile_dataset, False))
        for plural, fn, only_unready in kinds:
            try:
                bodies = await ctx.kube.list_custom(plural)
            except Exception:
                log.exception("periodic resync of %s failed; retrying in %.0f s", plural, tick)
                continue
            for body in bodies:
                # One object's failure is that object's: every other one is still resynced.
                try:
                    if only_unready and not _needs_retry(body):
                        continue
                    async with ctx.lock(body["metadata"]["uid"]):
                        await fn(ctx, body)
                except Exception:
                    meta = body.get("metadata") or {}
                    log.exception(
                        "periodic resync of %s %s/%s failed; the others go on",
                        plural,
                        meta.get("namespace"),
                        meta.get("name"),
                    )


async def flush_pod_counts(ctx: Context) -> None:
    """Write what the injected pods say (count, world size) to stream status, at most once a second."""
    while True:
        await asyncio.sleep(COUNT_FLUSH_S)
        for (namespace, name), (count, world) in ctx.pods.take_changes().items():
            try:
                raw = await ctx.kube.get_custom("datasetstreams", namespace, name)
                if raw is None:
                    continue  # deleted while its pods run
                stream = DatasetStream.model_validate(raw)
                async with ctx.lock(stream.metadata.uid):
                    patch = st.observed_pods(stream, injected=count, world_size=world)
                    if patch:
                        await ctx.kube.patch_status("datasetstreams", namespace, name, patch)
            except Exception:
                log.exception("cannot update the pod status of %s/%s", namespace, name)
                ctx.pods.mark_dirty(namespace, name)


def register(registry: kopf.OperatorRegistry, ctx: Context) -> None:
    """Register every handler on ``registry``, bound to ``ctx``."""

    def on_event(fn: Callable[[Context, dict[str, Any]], Awaitable[None]]) -> Any:
        async def handler(body: kopf.Body, type: str | None, uid: str, **_: Any) -> None:
            if type == "DELETED":
                ctx.locks.pop(uid, None)
                ctx.announced.pop(uid, None)
                if fn is reconcile_stream:
                    meta = body.get("metadata", {})
                    with contextlib.suppress(KeyError):
                        STREAM_READY.remove(meta.get("namespace", ""), meta.get("name", ""))
                return
            async with ctx.lock(uid):
                await fn(ctx, dict(body))

        return handler

    kopf.on.event(GROUP, "datasets", registry=registry, id="reconcile")(on_event(reconcile_dataset))
    kopf.on.event(GROUP, "datasetstreams", registry=registry, id="reconcile")(on_event(reconcile_stream))

    @kopf.on.event("v1", "pods", labels={INJECTED_LABEL: "true"}, registry=registry, id="count")
    async def count(body: kopf.Body, type: str | None, **_: Any) -> None:
        meta = body.get("metadata", {})
        stream = (meta.get("labels") or {}).get(STREAM_LABEL)
        if stream:
            phase = body.get("status", {}).get("phase")
            alive = type != "DELETED" and phase not in ("Succeeded", "Failed")
            world = (meta.get("annotations") or {}).get(WORLD_SIZE_ANNOTATION, "")
            ctx.pods.observe(
                meta["namespace"],
                stream,
                meta["uid"],
                alive=alive,
                world_size=int(world) if world.isdigit() else None,
            )


class EventsOnlyDiffBase(kopf.AnnotationsDiffBaseStorage):
    """The diff base for an operator whose handlers are all event handlers, which never read one.

    kopf builds it on every event regardless, as a deep copy of the whole object (status and
    managedFields included). During a burst of pod creations that copying of injected pods was most of
    the operator's CPU, and the admission reviews served on the same event loop queued behind it
    (bench/operator_scale.py). A change handler (on.create, on.update...) would need the real one back.
    """

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[kopf.FieldSpec] | None = None
    ) -> kopf.BodyEssence:
        return kopf.BodyEssence()


def configure_on_startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    """kopf settings: no finalizers, progress kept under our own annotations, pods filtered server-side."""
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = EventsOnlyDiffBase(prefix=GROUP)
    settings.watching.label_selectors["v1", "pods"] = f"{INJECTED_LABEL}=true"
    settings.posting.level = logging.WARNING
    # kopf logs every handler run at INFO; our own log lines say what changed.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    settings.execution.max_workers = 8
