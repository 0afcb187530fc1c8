"""The mutating admission webhook: gathers facts for ``inject`` and answers the AdmissionReview."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from functools import partial
from typing import Any, Generic, TypeVar

from pydantic import ValidationError
from sluicegate.core.flights import Flights

from . import access, grants, inject, sources
from .events import Announcer, object_ref
from .inject import AdmissionDenied, SidecarTemplate
from .kube import Kube, KubeError
from .metrics import ADMISSION_SECONDS, ADMISSIONS
from .models import API_VERSION, GROUP, STREAM_VERB, Dataset, DatasetStream
from .resolve import Sources, load_stream
from .sources import SourceRefused

log = logging.getLogger("sluicegate.webhook")
PATH = "/mutate"
VALIDATE_PATH = "/validate"
# How long a yes (the stream exists, the ServiceAccount may stream its Dataset) is reused for the next pods.
DECISION_TTL_S = 5.0
K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def configuration(
    name: str, client_config: Mapping[str, Any], *, failure_policy: str = "Fail", timeout_s: int = 10
) -> dict[str, Any]:
    """The MutatingWebhookConfiguration: CREATE of pods labelled ``sluicegate.io/stream`` only.

    The Helm chart renders the same webhook (``tests/operator/test_chart.py`` compares them).
    """
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "sluicegate"}},
        "webhooks": [
            {
                "name": "inject.sluicegate.io",
                "clientConfig": dict(client_config),
                "rules": [
                    {
                        "operations": ["CREATE"],
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "resources": ["pods"],
                        "scope": "Namespaced",
                    }
                ],
                "objectSelector": {"matchExpressions": [{"key": inject.STREAM_LABEL, "operator": "Exists"}]},
                "failurePolicy": failure_policy,
                "matchPolicy": "Equivalent",
                "sideEffects": "None",
                "reinvocationPolicy": "Never",
                "timeoutSeconds": timeout_s,
                "admissionReviewVersions": ["v1"],
            }
        ],
    }


def validating_configuration(
    name: str, client_config: Mapping[str, Any], *, timeout_s: int = 10
) -> dict[str, Any]:
    """The ValidatingWebhookConfiguration: every CREATE and UPDATE of a Dataset or DatasetStream.

    It always fails closed: a stream or a Dataset that could not be checked is not admitted. The Helm
    chart renders the same webhook (``tests/operator/test_chart.py`` compares them).
    """
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "sluicegate"}},
        "webhooks": [
            {
                "name": "validate.sluicegate.io",
                "clientConfig": dict(client_config),
                "rules": [
                    {
                        "operations": ["CREATE", "UPDATE"],
                        "apiGroups": [GROUP],
                        "apiVersions": ["*"],
                        "resources": ["datasets", "datasetstreams"],
                        "scope": "Namespaced",
                    }
                ],
                "failurePolicy": "Fail",
                "matchPolicy": "Equivalent",
                "sideEffects": "None",
                "timeoutSeconds": timeout_s,
                "admissionReviewVersions": ["v1"],
            }
        ],
    }


def review_response(
    uid: str, *, patch: inject.JsonPatch | None = None, denied: str | None = None, code: int = 403
) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": denied is None}
    if denied is not None:
        response["status"] = {
            "code": code,
            "reason": "Forbidden" if code == 403 else "BadRequest",
            "message": denied,
        }
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


class Recent(Generic[K, V]):
    """Answers of an async lookup, kept for ``ttl_s`` when ``keep`` approves them; concurrent lookups of
    one key share one call.

    Every pod of a job asks the API server the same questions (does its stream exist, may its
    ServiceAccount stream the Dataset); under a burst of pod creations those calls queue behind the
    creations themselves. A yes is reused for a few seconds, a no never, so creating the missing stream
    or RoleBinding takes effect at once. Revoking access reaches admission within ``ttl_s``; the broker
    checks RBAC on every request regardless. A key in use is looked up again in the background during
    the last ``REFRESH_AHEAD`` of its time, so a steady stream of pods never waits on the API server.
    """

    REFRESH_AHEAD = 0.4

    def __init__(
        self,
        ttl_s: float,
        keep: Callable[[V], bool],
        *,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl_s
        self._keep = keep
        self._max = max_entries
        self._clock = clock
        self._entries: dict[K, tuple[float, V]] = {}
        self._flights: Flights[K, V] = Flights()

    async def get(self, key: K, load: Callable[[], Awaitable[V]]) -> V:
        entry = self._entries.get(key)
        if entry is not None:
            left = entry[0] - self._clock()
            if left > 0:
                if left < self._ttl * self.REFRESH_AHEAD:
                    self._lookup(key, load)
                return entry[1]
            del self._entries[key]
        # Shielded: one caller giving up (the API server timed out its request) must not fail the others.
        return await asyncio.shield(self._lookup(key, load))

    def _lookup(self, key: K, load: Callable[[], Awaitable[V]]) -> asyncio.Future[V]:
        """The lookup of ``key`` in flight, started if there is none."""
        pending = self._flights.get(key)
        if pending is None:
            pending = self._flights.start((key,), load())
            pending.add_done_callback(partial(self._settle, key))
        return pending

    def _settle(self, key: K, done: asyncio.Future[V]) -> None:
        if done.cancelled() or done.exception() is not None:
            return  # a failed refresh leaves the current answer to expire in its time
        if self._ttl <= 0 or not self._keep(done.result()):
            self._entries.pop(key, None)  # e.g. revoked while remembered: forget the yes at once
            return
        self._entries.pop(key, None)  # re-inserted last, so eviction takes the least recently renewed
        self._entries[key] = (self._clock() + self._ttl, done.result())
        while len(self._entries) > self._max:
            del self._entries[next(iter(self._entries))]


class Webhook:
    def __init__(
        self,
        kube: Kube,
        sidecar: SidecarTemplate,
        decision_ttl_s: float = DECISION_TTL_S,
        *,
        grant_key: bytes = b"",
        policies: Sources | None = None,
    ) -> None:
        self._kube = kube
        self.sidecar = sidecar
        self.grant_key = grant_key
        self._policies = policies
        self._events = Announcer(kube)
        self._streams: Recent[tuple[str, str], DatasetStream | None] = Recent(
            decision_ttl_s, lambda found: found is not None
        )
        self._access: Recent[tuple[str, str, str], tuple[bool, str]] = Recent(
            decision_ttl_s, lambda answer: answer[0]
        )
        self._jobs: Recent[tuple[str, str], int | None] = Recent(
            decision_ttl_s, lambda completions: completions is not None
        )

    async def review(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Answer one AdmissionReview (the API server sends only labelled pods on CREATE)."""
        started = time.perf_counter()
        request = body.get("request") or {}
        uid = str(request.get("uid", ""))
        result, reason = "error", "internal"
        try:
            answer, result, reason = await self._decide(request)
            return review_response(uid, **answer)
        except AdmissionDenied as exc:
            result, reason = "denied", "refused"
            return review_response(uid, denied=str(exc))
        except KubeError as exc:
            log.error("admission of a pod failed on an API call: %s", exc)
            return review_response(uid, denied=f"sluicegate could not check the pod: {exc}", code=500)
        finally:
            elapsed = time.perf_counter() - started
            ADMISSIONS.labels(result, reason).inc()
            ADMISSION_SECONDS.observe(elapsed)
            log.info(
                "admission %s/%s: %s (%s) in %.1f ms",
                request.get("namespace"),
                request.get("name")
                or (request.get("object") or {}).get("metadata", {}).get("generateName", "?"),
                result,
                reason,
                elapsed * 1000,
            )

    async def _decide(self, request: Mapping[str, Any]) -> tuple[dict[str, Any], str, str]:
        pod = request.get("object") or {}
        if request.get("operation") != "CREATE" or request.get("kind", {}).get("kind") != "Pod":
            return {}, "skipped", "not_pod_create"
        namespace = str(request.get("namespace") or pod.get("metadata", {}).get("namespace", ""))
        labels = pod.get("metadata", {}).get("labels") or {}
        stream_name = labels.get(inject.STREAM_LABEL, "")
        if not stream_name:
            return {}, "skipped", "unlabelled"
        stream = await self._streams.get(
            (namespace, stream_name), partial(load_stream, self._kube, namespace, stream_name)
        )
        if stream is None:
            raise AdmissionDenied(
                f"DatasetStream {namespace}/{stream_name} (from label {inject.STREAM_LABEL}) does not exist: "
                "create it first, or fix the label"
            )
        sa = pod.get("spec", {}).get("serviceAccountName") or "default"
        try:
            return await self._admit(pod, stream, namespace, sa)
        except AdmissionDenied as exc:
            meta = pod.get("metadata") or {}
            name = meta.get("name") or f"{meta.get('generateName', '')}*"
            self._events.warn(
                object_ref(
                    API_VERSION, "DatasetStream", namespace, stream.metadata.name, stream.metadata.uid
                ),
                "PodRefused",
                f"pod {name} (ServiceAccount {sa}) was refused at admission: {exc}",
                about=sa,
            )
            raise

    async def _admit(
        self, pod: Mapping[str, Any], stream: DatasetStream, namespace: str, sa: str
    ) -> tuple[dict[str, Any], str, str]:
        inject.refuse_preinjected(pod)
        user = f"system:serviceaccount:{namespace}:{sa}"
        for part in stream.parts():  # a mix's pod reads every source: it must be allowed to stream each
            allowed, why = await self._access.get(
                (user, part.namespace, part.dataset),
                partial(
                    self._kube.may_stream,
                    user=user,
                    groups=[
                        "system:serviceaccounts",
                        f"system:serviceaccounts:{namespace}",
                        "system:authenticated",
                    ],
                    namespace=part.namespace,
                    name=part.dataset,
                ),
            )
            if not allowed:
                raise AdmissionDenied(
                    access.missing_stream_permission(user, part.namespace, part.dataset, why)
                )
        job = inject.job_name_needed(pod, stream)
        completions = None
        if job is not None:
            completions = await self._jobs.get((namespace, job), partial(self._completions, namespace, job))
        rank = inject.detect_rank(pod, stream, completions)
        grant = grants.seal(
            self.grant_key,
            namespace=namespace,
            service_account=sa,
            stream=stream.metadata.name,
            stream_uid=stream.metadata.uid,
            rank=rank.rank,
            world_size=rank.world_size,
        )
        mutated = inject.inject(pod, stream, namespace, rank, self.sidecar, grant=grant)
        patch = inject.json_patch(pod, mutated)
        return {"patch": patch}, ("injected" if patch else "skipped"), ("ok" if patch else "already_injected")

    async def _completions(self, namespace: str, job: str) -> int | None:
        found = await self._kube.get_job(namespace, job)
        completions = (found or {}).get("spec", {}).get("completions")
        return None if completions is None else int(completions)

    # -- validation of Datasets and DatasetStreams -------------------------------------------------------

    async def validate(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Answer one AdmissionReview of a Dataset or DatasetStream CREATE/UPDATE."""
        started = time.perf_counter()
        request = body.get("request") or {}
        uid = str(request.get("uid", ""))
        kind = (request.get("kind") or {}).get("kind", "")
        result, reason = "error", "internal"
        try:
            reason = await self._validate(request, kind)
            result = "allowed"
            return review_response(uid)
        except AdmissionDenied as exc:
            result, reason = "denied", "refused"
            return review_response(uid, denied=str(exc))
        except ValidationError as exc:  # the API server checked the schema; this is a newer field, say
            result, reason = "denied", "malformed"
            errors = exc.errors(include_url=False, include_input=False)[:3]
            return review_response(uid, denied=f"sluicegate cannot read this {kind}: {errors}", code=400)
        except KubeError as exc:
            log.error("validation of a %s failed on an API call: %s", kind, exc)
            return review_response(uid, denied=f"sluicegate could not check the {kind}: {exc}", code=500)
        finally:
            ADMISSIONS.labels(result, reason).inc()
            log.info(
                "validation of %s %s/%s by %s: %s (%s) in %.1f ms",
                kind,
                request.get("namespace"),
                request.get("name"),
                (request.get("userInfo") or {}).get("username"),
                result,
                reason,
                (time.perf_counter() - started) * 1000,
            )

    async def _validate(self, request: Mapping[str, Any], kind: str) -> str:
        if request.get("operation") not in ("CREATE", "UPDATE"):
            return "not_create_or_update"
        obj, old = dict(request.get("object") or {}), request.get("oldObject") or {}
        if request.get("operation") == "UPDATE" and obj.get("spec") == old.get("spec"):
            return "spec_unchanged"  # metadata-only edits change nothing the operator reads
        user = request.get("userInfo") or {}
        meta = obj.setdefault("metadata", {}) if isinstance(obj, dict) else {}
        meta.setdefault("namespace", str(request.get("namespace") or ""))
        meta.setdefault("name", str(request.get("name") or ""))
        if kind == "DatasetStream":
            await self._validate_stream(DatasetStream.model_validate(obj), user)
            return "stream_ok"
        if kind == "Dataset":
            await self._validate_dataset(Dataset.model_validate(obj), user)
            return "dataset_ok"
        return "other_kind"

    async def _user_may(self, user: Mapping[str, Any], **attrs: str) -> tuple[bool, str]:
        return await self._kube.may(
            user=str(user.get("username", "")),
            groups=list(user.get("groups") or []),
            uid=str(user.get("uid", "")),
            extra={k: list(v) for k, v in (user.get("extra") or {}).items()},
            **attrs,
        )

    async def _validate_stream(self, stream: DatasetStream, user: Mapping[str, Any]) -> None:
        """Whoever creates or edits a stream must be allowed to stream its Dataset: the stream's status
        (counts, query errors, versions) says things about the Dataset."""
        for part in stream.parts():
            allowed, why = await self._user_may(
                user,
                verb=STREAM_VERB,
                group=GROUP,
                resource="datasets",
                namespace=part.namespace,
                name=part.dataset,
            )
            if not allowed:
                who = str(user.get("username", "?"))
                raise AdmissionDenied(
                    f"DatasetStream {stream.metadata.namespace}/{stream.metadata.name} refused: "
                    + access.missing_stream_permission(who, part.namespace, part.dataset, why)
                )

    async def _validate_dataset(self, dataset: Dataset, user: Mapping[str, Any]) -> None:
        """A Dataset's source must be one the platform allows its namespace, and its author must be able
        to read the credentials Secret it names (no using a Secret one cannot read)."""
        ns = dataset.metadata.namespace or ""
        if self._policies is not None:
            try:
                sources.authorise(
                    await self._policies.current(),
                    namespace=ns,
                    uri=dataset.spec.source.uri,
                    endpoint=dataset.spec.source.endpoint,
                    has_credentials=dataset.spec.credentials is not None,
                    where=self._policies.where,
                )
            except SourceRefused as exc:
                raise AdmissionDenied(f"Dataset {ns}/{dataset.metadata.name} refused: {exc}") from None
        if dataset.spec.credentials is not None:
            ref = dataset.spec.credentials.secret_ref.name
            allowed, _ = await self._user_may(
                user, verb="get", group="", resource="secrets", namespace=ns, name=ref
            )
            if not allowed:
                raise AdmissionDenied(
                    f"Dataset {ns}/{dataset.metadata.name} refused: {user.get('username', '?')} may not read "
                    f"Secret {ns}/{ref} (spec.credentials.secretRef), so may not lend it to a Dataset; name "
                    f"a Secret you can read and that is labelled {sources.CREDENTIALS_LABEL}=true"
                )
