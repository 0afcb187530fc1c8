"""The one module that talks to the Kubernetes API (besides kopf's own watching).

Everything returns plain JSON objects (camelCase, as the API serves them) so the pure modules never
see client classes. The official client is synchronous; calls run in worker threads.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from typing import Any

import kopf
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from .models import GROUP, STREAM_VERB, VERSION

Json = dict[str, Any]
# The API server rejects a request it waits on longer than this; a webhook's own timeout is longer.
REQUEST_TIMEOUT_S = 10
API_THREADS = 32


class KubeError(RuntimeError):
    """An API call failed for a reason other than 'not found'; ``status`` is the HTTP status, if any."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _raw(response: Any) -> Json:
    data: Json = json.loads(response.data)
    return data


class Kube:
    """Typed-enough access to the few API calls the operator makes. Build with :meth:`connect`."""

    def __init__(self, api: client.ApiClient) -> None:
        self._api = api
        self._core = client.CoreV1Api(api)
        self._batch = client.BatchV1Api(api)
        self._custom = client.CustomObjectsApi(api)
        self._authn = client.AuthenticationV1Api(api)
        self._authz = client.AuthorizationV1Api(api)
        self._admission = client.AdmissionregistrationV1Api(api)
        self._coordination = client.CoordinationV1Api(api)
        # API calls get threads of their own: nothing else the operator runs (store reads, query work)
        # can hold the threads that admission reviews and broker checks need.
        self._pool = ThreadPoolExecutor(API_THREADS, thread_name_prefix="sluicegate-kube")

    async def _run(self, call: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def connection_info(self) -> kopf.ConnectionInfo:
        """The same credentials for kopf's own watch connections."""
        c = self._api.configuration
        header = c.get_api_key_with_prefix("BearerToken") or c.get_api_key_with_prefix("authorization") or ""
        scheme, _, token = header.rpartition(" ")
        return kopf.ConnectionInfo(
            server=c.host,
            ca_path=c.ssl_ca_cert,
            insecure=not c.verify_ssl,
            scheme=scheme or None,
            token=token or None,
            certificate_path=c.cert_file,
            private_key_path=c.key_file,
        )

    @classmethod
    def connect(cls, kubeconfig: str | None = None) -> Kube:
        """In-cluster credentials when running in a pod, else ``kubeconfig`` (or $KUBECONFIG)."""
        configuration = client.Configuration()
        in_cluster = False
        if kubeconfig is None:
            try:
                config.load_incluster_config(client_configuration=configuration)
                in_cluster = True
            except config.ConfigException:
                pass
        if not in_cluster:
            try:
                config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
            except (config.ConfigException, OSError) as exc:
                raise KubeError(
                    "no cluster to connect to: not in a pod (no KUBERNETES_SERVICE_HOST and ServiceAccount "
                    f"token) and no usable kubeconfig ({exc}); pass --kubeconfig or set KUBECONFIG"
                ) from exc
        # Webhook and broker requests run concurrently; the default pool would serialise them.
        configuration.connection_pool_maxsize = 32
        return cls(client.ApiClient(configuration))

    async def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Json | None:
        """Run a client call in a thread; ``None`` on 404, :class:`KubeError` on other failures."""
        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT_S)
        kwargs.setdefault("_preload_content", False)
        try:
            return _raw(await self._run(partial(fn, *args, **kwargs)))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise KubeError(
                f"{getattr(fn, '__name__', fn)}: {exc.status} {exc.reason}: {exc.body}", exc.status
            ) from exc

    async def _must(self, fn: Any, *args: Any, **kwargs: Any) -> Json:
        result = await self._call(fn, *args, **kwargs)
        if result is None:
            raise KubeError(f"{getattr(fn, '__name__', fn)}: not found")
        return result

    # -- reads -------------------------------------------------------------------------------------

    async def get_custom(self, plural: str, namespace: str, name: str) -> Json | None:
        return await self._call(
            self._custom.get_namespaced_custom_object, GROUP, VERSION, namespace, plural, name
        )

    async def list_custom(self, plural: str, namespace: str | None = None) -> list[Json]:
        if namespace is None:
            found = await self._must(self._custom.list_cluster_custom_object, GROUP, VERSION, plural)
        else:
            found = await self._must(
                self._custom.list_namespaced_custom_object, GROUP, VERSION, namespace, plural
            )
        items: list[Json] = found.get("items", [])
        return items

    async def get_secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        secret = await self._call(self._core.read_namespaced_secret, name, namespace)
        return None if secret is None else self.secret_data(secret)

    @staticmethod
    def secret_data(secret: Json) -> dict[str, str]:
        """The decoded ``data`` of a Secret as the API serves it."""
        return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}

    @staticmethod
    def secret_data_bytes(secret: Json) -> dict[str, bytes]:
        return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}

    async def get_configmap(self, namespace: str, name: str) -> Json | None:
        return await self._call(self._core.read_namespaced_config_map, name, namespace)

    async def get_pod(self, namespace: str, name: str) -> Json | None:
        return await self._call(self._core.read_namespaced_pod, name, namespace)

    async def get_job(self, namespace: str, name: str) -> Json | None:
        return await self._call(self._batch.read_namespaced_job, name, namespace)

    # -- reviews -----------------------------------------------------------------------------------

    async def token_review(self, token: str, audiences: Sequence[str]) -> Json:
        """The ``status`` of a TokenReview of ``token`` for ``audiences``."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": list(audiences)},
        }
        review = await self._must(self._authn.create_token_review, body)
        status: Json = review.get("status") or {}
        return status

    async def may_stream(
        self,
        *,
        user: str,
        groups: Sequence[str],
        namespace: str,
        name: str,
        uid: str = "",
        extra: Mapping[str, Sequence[str]] | None = None,
    ) -> tuple[bool, str]:
        """SubjectAccessReview: may ``user`` use the verb ``stream`` on Dataset ``namespace/name``?"""
        return await self.may(
            user=user,
            groups=groups,
            uid=uid,
            extra=extra,
            verb=STREAM_VERB,
            group=GROUP,
            resource="datasets",
            namespace=namespace,
            name=name,
        )

    async def may(
        self,
        *,
        user: str,
        groups: Sequence[str],
        verb: str,
        group: str,
        resource: str,
        namespace: str,
        name: str,
        uid: str = "",
        extra: Mapping[str, Sequence[str]] | None = None,
    ) -> tuple[bool, str]:
        """SubjectAccessReview: may ``user`` (with ``groups``, ``extra``) ``verb`` the object?"""
        spec: Json = {
            "user": user,
            "groups": list(groups),
            "resourceAttributes": {
                "namespace": namespace,
                "verb": verb,
                "group": group,
                "resource": resource,
                "name": name,
            },
        }
        if uid:
            spec["uid"] = uid
        if extra:
            spec["extra"] = {k: list(v) for k, v in extra.items()}
        body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec}
        review = await self._must(self._authz.create_subject_access_review, body)
        status = review.get("status") or {}
        return bool(status.get("allowed")), str(status.get("reason") or status.get("evaluationError") or "")

    async def may_use_path(self, *, user: str, groups: Sequence[str], path: str, verb: str) -> bool:
        """SubjectAccessReview: may ``user`` ``verb`` (``get``, ``post``) the non-resource URL ``path``?"""
        spec: Json = {
            "user": user,
            "groups": list(groups),
            "nonResourceAttributes": {"path": path, "verb": verb},
        }
        body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec}
        review = await self._must(self._authz.create_subject_access_review, body)
        return bool((review.get("status") or {}).get("allowed"))

    # -- writes ------------------------------------------------------------------------------------

    async def patch_status(self, plural: str, namespace: str, name: str, patch: Json) -> None:
        await self._call(
            self._custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            plural,
            name,
            {"status": patch},
        )

    async def patch_status_at(
        self, plural: str, namespace: str, name: str, resource_version: str, patch: Json
    ) -> bool:
        """Merge ``patch`` into the status if the object is still at ``resource_version``; ``False`` when
        someone wrote it since (a compare-and-swap: the API server answers 409)."""
        body = {"metadata": {"resourceVersion": resource_version}, "status": patch}
        return await self._write_unless_conflict(
            partial(
                self._custom.patch_namespaced_custom_object_status,
                GROUP,
                VERSION,
                namespace,
                plural,
                name,
                body,
            ),
            f"patch the status of {plural} {namespace}/{name}",
        )

    async def event(self, obj: Json, *, type_: str, reason: str, message: str) -> None:
        """Record an Event on ``obj`` (best effort: an event that cannot be written is not an error)."""
        meta = obj["metadata"]
        now = datetime.now(UTC).isoformat()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj["apiVersion"],
                "kind": obj["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid", ""),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "sluicegate-operator"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        with contextlib.suppress(KubeError):
            await self._call(self._core.create_namespaced_event, meta["namespace"], body)

    async def read_secret(self, namespace: str, name: str) -> Json | None:
        return await self._call(self._core.read_namespaced_secret, name, namespace)

    async def create_secret(self, namespace: str, name: str, data: Mapping[str, bytes]) -> bool:
        """Create a Secret; ``False`` when one of that name exists already (another replica won)."""
        body = _secret(namespace, name, data)
        return await self._write_unless_conflict(
            partial(self._core.create_namespaced_secret, namespace, body), f"create Secret {namespace}/{name}"
        )

    async def replace_secret(
        self, namespace: str, name: str, data: Mapping[str, bytes], resource_version: str
    ) -> bool:
        """Replace a Secret if it still is at ``resource_version``; ``False`` when someone else changed it."""
        body = _secret(namespace, name, data)
        body["metadata"]["resourceVersion"] = resource_version
        return await self._write_unless_conflict(
            partial(self._core.replace_namespaced_secret, name, namespace, body),
            f"replace Secret {namespace}/{name}",
        )

    async def _write_unless_conflict(self, call: Callable[..., Any], what: str) -> bool:
        """Run a write; ``False`` on 409 Conflict (someone else wrote first)."""
        try:
            await self._run(partial(call, _request_timeout=REQUEST_TIMEOUT_S, _preload_content=False))
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise KubeError(f"{what}: {exc.status} {exc.reason}") from exc
        return True

    async def put_configmap(self, namespace: str, name: str, data: Mapping[str, str]) -> None:
        """Create the ConfigMap ``name`` with ``data``, or replace its data if it differs."""
        existing = await self._call(self._core.read_namespaced_config_map, name, namespace)
        body: Json = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {"app.kubernetes.io/part-of": "sluicegate"},
            },
            "data": dict(data),
        }
        if existing is None:
            await self._write_unless_conflict(
                partial(self._core.create_namespaced_config_map, namespace, body), f"create ConfigMap {name}"
            )
        elif existing.get("data") != dict(data):
            body["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
            await self._write_unless_conflict(
                partial(self._core.replace_namespaced_config_map, name, namespace, body),
                f"replace ConfigMap {name}",
            )

    # -- leader election (see leader.py) -----------------------------------------------------------

    async def get_lease(self, namespace: str, name: str) -> Json | None:
        return await self._call(self._coordination.read_namespaced_lease, name, namespace)

    async def create_lease(self, namespace: str, body: Json) -> bool:
        """Create a Lease; ``False`` when one of that name exists already (another replica was first)."""
        return await self._write_unless_conflict(
            partial(self._coordination.create_namespaced_lease, namespace, body),
            f"create Lease {namespace}/{body['metadata']['name']}",
        )

    async def replace_lease(self, namespace: str, name: str, body: Json) -> bool:
        """Replace a Lease at the resourceVersion ``body`` carries; ``False`` when someone else wrote it
        since (the election's compare-and-swap)."""
        return await self._write_unless_conflict(
            partial(self._coordination.replace_namespaced_lease, name, namespace, body),
            f"replace Lease {namespace}/{name}",
        )

    async def get_webhook_configuration(self, name: str) -> Json | None:
        return await self._call(self._admission.read_mutating_webhook_configuration, name)

    async def apply_webhook_configuration(self, body: Json) -> None:
        """Create or replace the MutatingWebhookConfiguration ``body`` (dev mode: no Helm release owns it)."""
        name = body["metadata"]["name"]
        existing = await self.get_webhook_configuration(name)
        if existing is None:
            await self._must(self._admission.create_mutating_webhook_configuration, body)
            return
        body = {
            **body,
            "metadata": {**body["metadata"], "resourceVersion": existing["metadata"]["resourceVersion"]},
        }
        await self._must(self._admission.replace_mutating_webhook_configuration, name, body)

    async def get_validating_configuration(self, name: str) -> Json | None:
        return await self._call(self._admission.read_validating_webhook_configuration, name)

    async def apply_validating_configuration(self, body: Json) -> None:
        """Create or replace the ValidatingWebhookConfiguration ``body`` (dev mode)."""
        name = body["metadata"]["name"]
        existing = await self.get_validating_configuration(name)
        if existing is None:
            await self._must(self._admission.create_validating_webhook_configuration, body)
            return
        body = {
            **body,
            "metadata": {**body["metadata"], "resourceVersion": existing["metadata"]["resourceVersion"]},
        }
        await self._must(self._admission.replace_validating_webhook_configuration, name, body)

    async def patch_webhook_ca(self, name: str, ca_bundle_b64: str) -> bool:
        """Set caBundle on every webhook of the mutating and the validating configuration ``name``;
        ``False`` if either does not exist."""
        found = True
        for read, patch in (
            (
                self._admission.read_mutating_webhook_configuration,
                self._admission.patch_mutating_webhook_configuration,
            ),
            (
                self._admission.read_validating_webhook_configuration,
                self._admission.patch_validating_webhook_configuration,
            ),
        ):
            existing = await self._call(read, name)
            if existing is None:
                found = False
                continue
            ops = [
                {"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": ca_bundle_b64}
                for i, hook in enumerate(existing.get("webhooks") or [])
                if hook.get("clientConfig", {}).get("caBundle") != ca_bundle_b64
            ]
            if ops:
                await self._must(patch, name, ops)
        return found


def _secret(namespace: str, name: str, data: Mapping[str, bytes]) -> Json:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "sluicegate"},
        },
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }
