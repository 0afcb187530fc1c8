"""Loading what a stream needs from the API: the stream, its Dataset, the platform's source policy and
the Dataset's store, opened only as far as that policy allows."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from pydantic import ValidationError
from sluicegate import ConfigError

from . import sources
from .catalog import Catalog, Handle, s3_options
from .kube import Kube, KubeError
from .models import Dataset, DatasetStream
from .sources import SourcePolicy, SourceRefused

log = logging.getLogger("sluicegate.operator")
POLICY_KEY = "sources.json"
POLICY_TTL_S = 5.0


async def load_stream(kube: Kube, namespace: str, name: str) -> DatasetStream | None:
    raw = await kube.get_custom("datasetstreams", namespace, name)
    return None if raw is None else DatasetStream.model_validate(raw)


async def load_dataset(kube: Kube, namespace: str, name: str) -> Dataset | None:
    raw = await kube.get_custom("datasets", namespace, name)
    return None if raw is None else Dataset.model_validate(raw)


def parse_policy(data: dict[str, str] | None, where: str) -> SourcePolicy:
    """The policy in a ConfigMap's data; :class:`SourceRefused` (fail closed) when it is malformed."""
    raw = (data or {}).get(POLICY_KEY)
    if raw is None:
        return SourcePolicy()
    try:
        return SourcePolicy.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        raise SourceRefused(
            f"the platform's source policy ({where}) is malformed, so every source is refused: {exc}"
        ) from exc


class Sources:
    """The platform's source policy, read from its ConfigMap at most every ``ttl_s`` (a missing
    ConfigMap is the empty policy: every source refused)."""

    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        *,
        ttl_s: float = POLICY_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._kube = kube
        self.namespace, self.name = namespace, name
        self._ttl, self._clock = ttl_s, clock
        self._cached: tuple[float, SourcePolicy | SourceRefused] | None = None

    @property
    def where(self) -> str:
        return f"ConfigMap {self.namespace}/{self.name}"

    async def current(self) -> SourcePolicy:
        now = self._clock()
        if self._cached is None or now >= self._cached[0]:
            found = await self._kube.get_configmap(self.namespace, self.name)
            try:
                value: SourcePolicy | SourceRefused = parse_policy(
                    None if found is None else found.get("data"), self.where
                )
            except SourceRefused as exc:
                log.error("%s", exc)
                value = exc
            self._cached = (now + self._ttl, value)
        value = self._cached[1]
        if isinstance(value, SourceRefused):
            raise value
        return value


async def open_store(kube: Kube, catalog: Catalog, policies: Sources, dataset: Dataset) -> Handle:
    """The Dataset's store, if the platform's source policy lets its namespace read it with the identity
    it asks for (:class:`SourceRefused` otherwise), with the keys of an opted-in Secret (ConfigError when
    they are missing or the Secret is not opted in)."""
    ns = dataset.metadata.namespace
    source = dataset.spec.source
    uri, endpoint = sources.authorise(
        await policies.current(),
        namespace=ns,
        uri=source.uri,
        endpoint=source.endpoint,
        has_credentials=dataset.spec.credentials is not None,
        where=policies.where,
    )
    secret = None
    if dataset.spec.credentials is not None:
        ref = dataset.spec.credentials.secret_ref.name
        try:
            raw = await kube.read_secret(ns, ref)
        except KubeError as exc:
            if exc.status != 403:
                raise
            raise ConfigError(
                f"the operator may not read Secrets in namespace {ns}: a rule of the chart value "
                "`sources.rules` must name the namespace (the chart then binds Secret access there)"
            ) from exc
        if raw is None:
            raise ConfigError(f"Secret {ns}/{ref} (spec.credentials.secretRef) does not exist")
        refusal = sources.secret_refusal(ns, ref, (raw.get("metadata") or {}).get("labels"))
        if refusal is not None:
            raise ConfigError(refusal)
        secret = kube.secret_data(raw)
    return catalog.open(uri, endpoint, s3_options(dataset, secret))
