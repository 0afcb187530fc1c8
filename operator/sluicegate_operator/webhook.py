"""The mutating admission webhook: gathers facts for ``inject`` and answers the AdmissionReview."""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from . import access, inject
from .inject import AdmissionDenied, SidecarConfig
from .kube import Kube, KubeError
from .metrics import ADMISSION_SECONDS, ADMISSIONS
from .models import DatasetStream

log = logging.getLogger("sluicegate.webhook")
PATH = "/mutate"


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


class Webhook:
    def __init__(self, kube: Kube, sidecar: SidecarConfig) -> None:
        self._kube = kube
        self.sidecar = sidecar

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
        raw = await self._kube.get_custom("datasetstreams", namespace, stream_name)
        if raw is None:
            raise AdmissionDenied(
                f"DatasetStream {namespace}/{stream_name} (from label {inject.STREAM_LABEL}) does not exist: "
                "create it first, or fix the label"
            )
        stream = DatasetStream.model_validate(raw)
        sa = pod.get("spec", {}).get("serviceAccountName") or "default"
        user = f"system:serviceaccount:{namespace}:{sa}"
        ds_ns, ds_name = stream.dataset_namespace(), stream.spec.dataset.name
        allowed, why = await self._kube.may_stream(
            user=user,
            groups=["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
            namespace=ds_ns,
            name=ds_name,
        )
        if not allowed:
            raise AdmissionDenied(access.missing_stream_permission(user, ds_ns, ds_name, why))
        job = inject.job_name_needed(pod, stream)
        completions = None
        if job is not None:
            found = await self._kube.get_job(namespace, job)
            completions = (found or {}).get("spec", {}).get("completions")
        rank = inject.detect_rank(pod, stream, completions)
        mutated = inject.inject(pod, stream, namespace, rank, self.sidecar)
        patch = inject.json_patch(pod, mutated)
        return {"patch": patch}, ("injected" if patch else "skipped"), ("ok" if patch else "already_injected")
