"""The wire protocol between a sidecar and the operator's broker, and the injection contract.

The one definition both sides import: the operator (``sluicegate_operator.broker``) serves it, the
sidecar in *broker mode* calls it. Every request carries the pod's projected ServiceAccount token
(audience :data:`AUDIENCE`) as ``Authorization: Bearer <token>``. The broker derives the stream,
the rank and the world size from the pod the token is bound to, never from the request body, so a
pod can only ever obtain its own shard.

Errors are JSON :class:`BrokerError` with status 400 (bad request), 401 (token not accepted),
403 (authenticated but not allowed), 404 (stream or dataset gone), 409 (stream not Ready yet; a
ledger report out of order or differing from the one recorded under its number),
413 (body too large), 429 (too many requests from this pod: wait ``Retry-After`` seconds), 503 (storage
unreachable). The broker authenticates the token before it reads the body.

The injection contract (:class:`SidecarEnv`, :class:`TrainerEnv`, :data:`SOCKET_DIR`...) names the
environment and paths the admission webhook puts into a labelled pod, so the sidecar and the SDK
read exactly what the webhook writes.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from sluicegate.core.env import ADDRESS_VAR, MIX_VAR
from sluicegate.core.mix import Stop
from sluicegate.core.partition import ShardSpec
from sluicegate.core.protocol import LedgerReport, ProgressReport, Resume, WireRow

__all__ = [
    "AUDIENCE",
    "MAX_URLS_PER_REQUEST",
    "SOCKET_DIR",
    "SOCKET_PATH",
    "SOURCE_NAME_PATTERN",
    "TOKEN_DIR",
    "TOKEN_PATH",
    "BrokerError",
    "BrokerErrorCode",
    "BrokerPaths",
    "LedgerReport",
    "MixEnv",
    "MixEnvSource",
    "PlanRequest",
    "PlanResponse",
    "ProgressReport",
    "SidecarEnv",
    "TrainerEnv",
    "UrlsRequest",
    "UrlsResponse",
]

AUDIENCE = "sluicegate.io"
"""The audience of the projected ServiceAccount token the sidecar presents; the broker accepts no other."""

MAX_URLS_PER_REQUEST = 4096
"""The most blob URLs one ``/v1/urls`` request may ask for (a sidecar asks in windows well below it)."""

SOURCE_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$"
"""A source of a mix (``spec.sources[].name``): a DNS label, since it names the source's sidecar container."""

# Paths inside an injected pod.
TOKEN_DIR = "/var/run/secrets/sluicegate.io"
TOKEN_PATH = f"{TOKEN_DIR}/token"
SOCKET_DIR = "/var/run/sluicegate"
SOCKET_PATH = f"{SOCKET_DIR}/sidecar.sock"


# Every setting of the daemons is a flag and the environment variable ENV_PREFIX + its name in capitals
# (the operator's and the sidecar's settings models derive both from their field names).
ENV_PREFIX = "SLUICEGATE_"


def env_var(setting: str) -> str:
    """The environment variable of a daemon setting: ``broker_url`` -> ``SLUICEGATE_BROKER_URL``."""
    return ENV_PREFIX + setting.upper()


class SidecarEnv:
    """Environment of the injected sidecar container: the sidecar's settings the webhook sets."""

    BROKER_URL = env_var("broker_url")  # https://... of the operator's broker
    BROKER_CA = env_var("broker_ca")  # PEM of the CA that signed the broker's certificate
    TOKEN_FILE = env_var("token_file")  # projected token, re-read on every request (the kubelet rotates it)
    LISTEN = env_var("listen")  # unix:///var/run/sluicegate/sidecar.sock
    STREAM = env_var("stream")  # name of the DatasetStream
    SOURCE = env_var("source")  # in a pod of a mix: the source this sidecar serves (its name in spec.sources)
    NAMESPACE = env_var("namespace")  # namespace of the pod and the stream
    CACHE_MEMORY = env_var("cache_memory")  # Kubernetes quantity, e.g. 512Mi
    CACHE_DISK = env_var("cache_disk")  # Kubernetes quantity, 0 for none
    CACHE_DIR = env_var("cache_dir")  # set when CACHE_DISK is not 0
    METRICS_LISTEN = env_var("metrics_listen")  # 0.0.0.0:PORT, set when the stream's metrics port is not 0
    METRICS_TOKEN_SHA256 = env_var("metrics_token_sha256")  # digest of the scrape token the chart keeps


class TrainerEnv:
    """Environment added to every other container of an injected pod (what ``sluicegate.connect()`` reads)."""

    ADDRESS = ADDRESS_VAR  # unix:///var/run/sluicegate/sidecar.sock
    STREAM = "SLUICEGATE_STREAM"
    RANK = "SLUICEGATE_RANK"  # informational: the sidecar's plan is authoritative
    WORLD_SIZE = "SLUICEGATE_WORLD_SIZE"
    MIX = MIX_VAR  # in a pod of a mix, instead of ADDRESS: MixEnv as JSON


class MixEnvSource(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    address: str = Field(description="where this source's sidecar listens, unix:///PATH")
    weight: float = Field(gt=0)


class MixEnv(BaseModel):
    """What a pod of a mix's trainer reads (``TrainerEnv.MIX``): each source's sidecar and weight, and how
    ``sluicegate.connect()`` interleaves them (the epoch rule, the interleave's seed: the stream's)."""

    model_config = ConfigDict(extra="forbid")

    sources: list[MixEnvSource] = Field(min_length=2)
    epoch_length: Stop = Stop.FIRST_EXHAUSTED
    seed: int | None = Field(default=None, description="None: the stream does not shuffle")


class BrokerPaths:
    PLAN = "/v1/plan"  # POST PlanRequest -> PlanResponse
    URLS = "/v1/urls"  # POST UrlsRequest -> UrlsResponse (fresh URLs for blobs of the pod's own shard)
    PROGRESS = "/v1/progress"  # POST ProgressReport -> {} (what the pod's rank consumed of its epoch)
    LEDGER = "/v1/ledger"  # POST LedgerReport -> {} (a stretch the pod's trainer consumed, for the ledger)
    HEALTHZ = "/healthz"
    METRICS = "/metrics"


class BrokerErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    NOT_READY = "not_ready"
    UNAVAILABLE = "unavailable"
    TOO_LARGE = "too_large"  # 413: the request body exceeds what the endpoint reads
    RATE_LIMITED = "rate_limited"  # 429: the pod sent too many requests; wait for Retry-After
    INTERNAL = "internal_error"


class BrokerError(BaseModel):
    code: BrokerErrorCode
    message: str = Field(description="what was refused and what to do about it")


class PlanRequest(BaseModel):
    """Asks for the calling pod's shard plan. ``stream`` is a consistency check only: the broker answers
    400 when it differs from the stream the pod is labelled with."""

    model_config = ConfigDict(extra="forbid")

    stream: str | None = None
    presign: bool = Field(
        default=False,
        description="include a URL for every blob of the shard (costly for large shards, and every URL "
        "outlives a revoked grant for up to its TTL); false, the default: none (fetch them in windows with "
        "BrokerPaths.URLS as the epoch order reaches them, so none expires unused)",
    )


class PlanResponse(ShardSpec):
    """One pod's shard of one pinned dataset version, with short-lived read access to its blobs.

    ``rows`` are in *assignment* order (shard index ``i`` is ``rows[i]``; padding may repeat rows);
    the epoch order is :func:`sluicegate.core.partition.epoch_order` of ``(seed, epoch, rank)``. When the
    stream keeps an epoch in progress, ``resume`` says so; re-cut for this pod's world size, this rank's
    re-cut assignment follows the shard's rows (``resume.items`` rows from index ``resume.first``).
    ``urls`` maps each distinct blob hash in ``rows`` to a presigned GET URL valid until ``expires_at``;
    ask :data:`BrokerPaths.URLS` for fresh ones before then.
    """

    namespace: str
    stream: str
    dataset: str = Field(description="NAMESPACE/NAME of the Dataset")
    version: int
    query: str = Field(description="the stream's query")
    policies: list[str] = Field(description="names of the row-level policies AND-ed in for this pod")
    total: int = Field(description="items selected (query and policies), before sharding")
    rows: list[WireRow]
    urls: dict[str, str]
    expires_at: datetime
    resume: Resume | None = Field(default=None, description="the stream's epoch in progress, if any")


class UrlsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    blobs: list[str] = Field(min_length=1, max_length=MAX_URLS_PER_REQUEST)


class UrlsResponse(BaseModel):
    urls: dict[str, str]
    expires_at: datetime
