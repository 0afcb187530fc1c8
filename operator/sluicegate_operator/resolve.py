"""Loading what a stream needs from the API: the stream, its Dataset, and the Dataset's store."""

from __future__ import annotations

from sluicegate._exceptions import ConfigError
from sluicegate._store import Store

from .catalog import Catalog, s3_options
from .kube import Kube
from .models import Dataset, DatasetStream


async def load_stream(kube: Kube, namespace: str, name: str) -> DatasetStream | None:
    raw = await kube.get_custom("datasetstreams", namespace, name)
    return None if raw is None else DatasetStream.model_validate(raw)


async def load_dataset(kube: Kube, namespace: str, name: str) -> Dataset | None:
    raw = await kube.get_custom("datasets", namespace, name)
    return None if raw is None else Dataset.model_validate(raw)


async def open_store(kube: Kube, catalog: Catalog, dataset: Dataset) -> Store:
    """The Dataset's store with the credentials of its Secret (raises ConfigError when they are missing)."""
    secret = None
    if dataset.spec.credentials is not None:
        ref = dataset.spec.credentials.secret_ref.name
        secret = await kube.get_secret_data(dataset.metadata.namespace, ref)
        if secret is None:
            raise ConfigError(
                f"Secret {dataset.metadata.namespace}/{ref} (spec.credentials.secretRef) does not exist"
            )
    return catalog.store(dataset.spec.source.uri, s3_options(dataset, secret))
