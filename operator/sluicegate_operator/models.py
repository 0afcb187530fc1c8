"""The custom resources as pydantic models: the single source of truth for the CRDs.

``crdgen`` turns these models into the OpenAPI schemas of ``crds/*.yaml`` (descriptions included, so
``kubectl explain`` is useful); CEL rules for what a schema alone cannot say ride along in
``json_schema_extra`` under ``x-kubernetes-validations``. The operator parses objects it reads with
the same models, so a field the CRD accepts is a field the operator understands.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, JsonValue, WithJsonSchema, model_validator
from pydantic.alias_generators import to_camel
from sluicegate.core.broker_protocol import SOURCE_NAME_PATTERN
from sluicegate.core.engine import EngineConfig
from sluicegate.core.mix import Stop
from sluicegate.core.partition import MAX_PASSES, MAX_SEGMENTS, MAX_WORKERS, Progress, Remainder, Segment
from sluicegate.core.quantity import QUANTITY_PATTERN
from sluicegate.core.query import MAX_QUERY_CHARS

GROUP = "sluicegate.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
# The custom RBAC verb that grants a ServiceAccount the right to stream a Dataset.
STREAM_VERB = "stream"

# Bounds on what a tenant may write into a spec (the API server enforces them; CEL cost stays bounded).
MAX_QUERY = MAX_QUERY_CHARS  # the query language's own bound, stated once
MAX_K8S_NAME = 253
MAX_NAME = 256
MAX_URI = 1024
MAX_MESSAGE = 2048
MAX_QUANTITY = 32
# A container resource quantity (cpu 500m, memory 2Gi, ...); the API server checks it in full later.
_RESOURCE = Annotated[str, Field(min_length=1, max_length=MAX_QUANTITY)]


def _clip(value: object) -> object:
    """A message cut to MAX_MESSAGE characters (what the operator reports must fit its own schema)."""
    if isinstance(value, str) and len(value) > MAX_MESSAGE:
        return value[: MAX_MESSAGE - 3] + "..."
    return value


def _cel(rule: str, message: str) -> dict[str, JsonValue]:
    return {"rule": rule, "message": message}


class _Model(BaseModel):
    """camelCase on the wire (Kubernetes conventions), snake_case in Python; unknown fields ignored
    because the API server already prunes what the schema does not declare."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    def wire(self) -> dict[str, Any]:
        """The object as the API server stores it (camelCase, unset optionals left out)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# -- shared ---------------------------------------------------------------------------------------


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(_Model):
    """One aspect of the object's state, following the Kubernetes API conventions."""

    type: str = Field(description="Kind of condition, e.g. Ready.", min_length=1, max_length=64)
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        description="One CamelCase word saying why, for machines.", min_length=1, max_length=64
    )
    message: Annotated[str, BeforeValidator(_clip)] = Field(
        default="", description="What happened and what to do about it, for humans.", max_length=MAX_MESSAGE
    )
    last_transition_time: datetime = Field(description="When status last changed.")
    observed_generation: int | None = Field(
        default=None, description="The metadata.generation this condition was computed from."
    )


Conditions = Annotated[
    list[Condition],
    Field(
        description="The latest observations of the object's state.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    ),
]


class SubjectKind(StrEnum):
    SERVICE_ACCOUNT = "ServiceAccount"
    GROUP = "Group"
    USER = "User"


class Subject(_Model):
    """Who a policy applies to, spelled like a RoleBinding subject."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "self.kind != 'ServiceAccount' || has(self.namespace)",
                    "a ServiceAccount subject needs a namespace",
                )
            ]
        }
    )

    kind: SubjectKind = Field(description="ServiceAccount, Group or User.")
    name: str = Field(
        description="Name of the ServiceAccount, group or user.", min_length=1, max_length=MAX_NAME
    )
    namespace: str | None = Field(
        default=None, description="Namespace of a ServiceAccount subject.", max_length=MAX_K8S_NAME
    )

    def username(self) -> str | None:
        """The authenticated username this subject denotes (``None`` for a group)."""
        if self.kind is SubjectKind.SERVICE_ACCOUNT:
            return f"system:serviceaccount:{self.namespace}:{self.name}"
        return self.name if self.kind is SubjectKind.USER else None


# -- Dataset ----------------------------------------------------------------------------------------


class Source(_Model):
    """Where the dataset store lives."""

    uri: str = Field(
        description="Store root: s3://BUCKET/PREFIX for an object store, file:///PATH for a volume "
        "the operator mounts (file stores cannot be streamed through presigned URLs).",
        pattern=r"^(s3://[a-z0-9][a-z0-9.\-]{1,62}(/.*)?|file:///.+)$",
        max_length=MAX_URI,
    )
    endpoint: str | None = Field(
        default=None,
        description="S3 endpoint URL for S3-compatible stores (MinIO, Ceph, ...); omit for AWS S3.",
        pattern=r"^https?://.+",
        max_length=MAX_URI,
    )
    region: str | None = Field(
        default=None,
        description="Object-store region, e.g. eu-west-1.",
        max_length=64,
        pattern=r"^[a-z0-9-]*$",
    )


class SecretRef(_Model):
    """A Secret in the Dataset's own namespace."""

    name: str = Field(description="Name of the Secret.", min_length=1, max_length=MAX_K8S_NAME)


class Credentials(_Model):
    """Storage credentials; only the operator reads them, training pods never see them."""

    secret_ref: SecretRef = Field(
        description="Secret with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and optionally "
        "AWS_SESSION_TOKEN) in the Dataset's namespace."
    )


class Policy(_Model):
    """A row-level filter: its query is AND-ed into every stream read by one of its subjects."""

    name: str = Field(
        description="Name of the policy, shown in broker decisions and logs.",
        min_length=1,
        max_length=MAX_NAME,
    )
    subjects: list[Subject] = Field(description="Who the policy applies to.", min_length=1, max_length=256)
    query: str = Field(
        description='Slice query the subjects are limited to, e.g. meta.license = "open" (never blank: '
        "a blank filter would select everything).",
        min_length=1,
        max_length=MAX_QUERY,
        pattern=r"\S",
    )


class DatasetSpec(_Model):
    """A published, versioned dataset store."""

    source: Source = Field(description="Where the store lives.")
    credentials: Credentials | None = Field(
        default=None, description="Storage credentials; omit for stores the operator can read without."
    )
    policies: list[Policy] = Field(
        default_factory=list,
        max_length=64,
        description="Row-level policies AND-ed into the queries of their subjects' streams.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )


class DatasetStatus(_Model):
    """What the operator last observed about the store."""

    observed_generation: int | None = Field(default=None, description="The generation last reconciled.")
    latest_version: int | None = Field(default=None, description="Newest committed version of the store.")
    items: int | None = Field(default=None, description="Items in the latest version.")
    labels: dict[str, int] | None = Field(
        default=None, description="Items per label in the latest version (the most common labels)."
    )
    conditions: Conditions = Field(default_factory=list)


# -- DatasetStream ----------------------------------------------------------------------------------


class DatasetRef(_Model):
    """Which Dataset to stream."""

    namespace: str | None = Field(
        default=None,
        description="Namespace of the Dataset; defaults to the stream's namespace.",
        max_length=MAX_K8S_NAME,
    )
    name: str = Field(description="Name of the Dataset.", min_length=1, max_length=MAX_K8S_NAME)


class RankSource(StrEnum):
    AUTO = "auto"
    INDEXED_JOB = "indexedJob"
    TORCHRUN = "torchrun"
    SPEC = "spec"


class Sharding(_Model):
    """How the query result is split among the pods (ranks) of a training job."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "!has(self.rankSource) || self.rankSource != 'spec' || has(self.worldSize)",
                    "sharding.rankSource 'spec' needs sharding.worldSize",
                )
            ]
        }
    )

    rank_source: RankSource = Field(
        default=RankSource.AUTO,
        description="Where a pod's rank and world size come from: indexedJob (completion index and "
        "completions), torchrun (RANK/WORLD_SIZE or PET_NODE_RANK/PET_NNODES in the pod's env), spec "
        "(annotation sluicegate.io/rank, default 0, and worldSize), or auto (the first that applies).",
    )
    world_size: int | None = Field(
        default=None, ge=1, description="Number of ranks; overrides the world size a rank source reports."
    )
    seed: int = Field(default=0, ge=0, description="Seed of the deterministic shuffle.")
    shuffle: bool = Field(default=True, description="Shuffle before cutting shards and every epoch.")
    remainder: Remainder = Field(
        default=Remainder.PAD,
        description="pad: every rank gets ceil(n/worldSize) items, short ranks repeat items; "
        "drop: every rank gets floor(n/worldSize) items.",
    )


class Cache(_Model):
    """Byte budgets of each sidecar's read-ahead cache."""

    memory: str = Field(
        default=f"{EngineConfig.model_fields['memory_bytes'].default // 2**20}Mi",  # the engine's
        pattern=QUANTITY_PATTERN,
        description="Memory budget, e.g. 2Gi.",
        max_length=MAX_QUANTITY,
    )
    disk: str = Field(
        default="0",
        pattern=QUANTITY_PATTERN,
        description="Disk budget (emptyDir), e.g. 20Gi; 0 for none.",
        max_length=MAX_QUANTITY,
    )


class Resources(_Model):
    """Container resources, as in a Pod spec."""

    requests: dict[str, _RESOURCE] | None = Field(
        default=None, max_length=16, description="Minimum resources, e.g. cpu: 500m."
    )
    limits: dict[str, _RESOURCE] | None = Field(
        default=None, max_length=16, description="Maximum resources, e.g. memory: 2Gi."
    )


class SidecarOverrides(_Model):
    """Per-stream changes to the injected sidecar."""

    image: str | None = Field(
        default=None, description="Sidecar image; defaults to the operator's.", max_length=MAX_URI
    )
    resources: Resources | None = Field(default=None, description="Sidecar container resources.")
    metrics_port: int = Field(
        default=9464,
        ge=0,
        le=65535,
        description="Port of the sidecar's /metrics listener (the chart's PodMonitor scrapes it with its "
        "scrape token); 0: none. Pods with hostNetwork share the node's ports: give each stream its own.",
    )


VersionSpec = Annotated[
    int | Literal["latest"],
    WithJsonSchema(
        {
            "x-kubernetes-int-or-string": True,
            "description": 'Manifest version to stream: a number, or "latest" (pinned when first '
            "resolved and moved only by editing this field).",
            "x-kubernetes-validations": [
                _cel(
                    "type(self) == int ? self >= 1 : self == 'latest'",
                    'version must be a positive integer or "latest"',
                )
            ],
        }
    ),
]


MAX_SOURCES = 8  # sources of one mix: each is a sidecar in every pod of the stream


class StreamSource(_Model):
    """One source of a mix: a slice of one Dataset version, read in proportion to its weight."""

    name: str = Field(
        pattern=SOURCE_NAME_PATTERN,
        max_length=40,
        description="What each sample's source says, e.g. coco; names the source's sidecar container.",
    )
    dataset: DatasetRef = Field(description="The Dataset this source reads.")
    version: VersionSpec = "latest"
    query: str = Field(
        default="",
        description="Slice query of this source, e.g. labels.car > 3; empty: every item.",
        max_length=MAX_QUERY,
    )
    weight: float = Field(
        gt=0, le=1_000_000, description="Share of every stretch of the epoch, e.g. 0.7; only ratios count."
    )


class DatasetStreamSpec(_Model):
    """A Dataset slice (dataset) or a weighted mix (sources), sharded over the pods labelled with it."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel(
                    "has(self.dataset) != has(self.sources)",
                    "set exactly one of spec.dataset and spec.sources",
                ),
                _cel(
                    "!has(self.sources) || (self.query == '' && string(self.version) == 'latest')",
                    "with spec.sources, each source has its own query and version: leave spec.query and "
                    "spec.version unset",
                ),
            ]
        }
    )

    dataset: DatasetRef | None = Field(
        default=None,
        description="The Dataset to stream (or spec.sources for a mix).",
        json_schema_extra={
            "x-kubernetes-validations": [
                _cel("self == oldSelf", "spec.dataset is immutable: create a new DatasetStream instead")
            ]
        },
    )
    version: VersionSpec = "latest"
    query: str = Field(
        default="",
        description='Slice query, e.g. labels.car > 3 and meta.split = "train"; empty: every item.',
        max_length=MAX_QUERY,
    )
    sources: list[StreamSource] | None = Field(
        default=None,
        min_length=2,
        max_length=MAX_SOURCES,
        description="A weighted mix of Datasets (instead of spec.dataset): every pod reads its shard of each "
        "source, interleaved by weight; every sample says which source it came from.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
            "x-kubernetes-validations": [
                _cel("self == oldSelf", "spec.sources is immutable: create a new DatasetStream instead")
            ],
        },
    )
    epoch_length: Stop = Field(
        default=Stop.FIRST_EXHAUSTED,
        description="Where a mix's epoch ends: first_exhausted (when the first source, relative to its "
        "weight, is read through: nothing repeats) or all_exhausted (when the last is: the others repeat).",
    )
    # A schema default {} makes the API server fill in the nested defaults (shown by `kubectl get -o yaml`).
    sharding: Sharding = Field(
        default_factory=Sharding,
        description="How items are split among ranks.",
        json_schema_extra={"default": {}},
    )
    cache: Cache = Field(
        default_factory=Cache,
        description="Read-ahead cache budgets of each sidecar.",
        json_schema_extra={"default": {}},
    )
    sidecar: SidecarOverrides | None = Field(default=None, description="Overrides for the injected sidecar.")

    @model_validator(mode="after")
    def _one_kind(self) -> DatasetStreamSpec:
        # The CRD's rules, for objects that reach the operator without the API server's checks.
        if (self.dataset is None) == (self.sources is None):
            raise ValueError("set exactly one of spec.dataset and spec.sources")
        if self.sources is not None:
            if self.query or self.version != "latest":
                raise ValueError(
                    "with spec.sources, each source has its own query and version: leave spec.query and "
                    "spec.version unset"
                )
            names = [s.name for s in self.sources]
            if len(set(names)) != len(names):
                raise ValueError(f"spec.sources names must be unique, got {names}")
        return self


MAX_PROGRESS_WORLD = 4096  # ranks whose progress a stream keeps


_Count = Annotated[int, Field(ge=0, description="Items one DataLoader worker consumed of its part.")]
_Pass = Annotated[
    list[_Count], Field(max_length=MAX_WORKERS, description="One pass: a count per DataLoader worker.")
]
_RankPasses = Annotated[
    list[_Pass], Field(max_length=MAX_PASSES, description="One rank's passes over the stretch, in order.")
]


class SegmentProgress(_Model):
    """One stretch of the epoch at one world size (sluicegate.core.partition.Segment)."""

    world_size: int = Field(ge=1, le=MAX_PROGRESS_WORLD, description="Ranks the stretch was cut for.")
    consumed: list[_RankPasses] = Field(
        max_length=MAX_PROGRESS_WORLD,
        description="Per rank, its passes over the stretch; per pass, how many items each of its DataLoader "
        "workers consumed.",
    )


class StreamProgress(_Model):
    """The epoch in progress, kept by the broker from what the pods' sidecars report, so pods of a Job
    re-created at another parallelism (or restarted) continue the epoch instead of repeating it."""

    basis: str = Field(
        max_length=64, description="Digest of what the cut depends on (version, query, policies, sharding)."
    )
    epoch: int = Field(ge=0, description="The epoch in progress (the newest any rank reported).")
    segments: list[SegmentProgress] = Field(
        min_length=1, max_length=MAX_SEGMENTS, description="Its stretches at one world size, oldest first."
    )
    owners: list[
        Annotated[str, Field(max_length=64, description="A pod's UID, or empty: no reader yet.")]
    ] = Field(
        default_factory=list,
        max_length=MAX_PROGRESS_WORLD,
        description="UID of the pod reading each rank of the current stretch (the one whose reports count).",
    )

    def core(self) -> Progress:
        """As the SDK's arithmetic takes it."""
        segments = tuple(
            Segment(
                world_size=seg.world_size,
                consumed=tuple(tuple(tuple(counts) for counts in passes) for passes in seg.consumed),
            )
            for seg in self.segments
        )
        return Progress(epoch=self.epoch, segments=segments)

    @classmethod
    def of(cls, progress: Progress, basis: str, owners: list[str]) -> StreamProgress:
        segments = [
            SegmentProgress(
                world_size=seg.world_size,
                consumed=[[list(counts) for counts in passes] for passes in seg.consumed],
            )
            for seg in progress.segments
        ]
        return cls(basis=basis, epoch=progress.epoch, segments=segments, owners=owners)


class SourceStatus(_Model):
    """What the operator resolved for one source of a mix."""

    name: str = Field(max_length=40, description="The source's name in spec.sources.")
    resolved_version: int | None = Field(default=None, description="The manifest version it is pinned to.")
    pinned_from: str | None = Field(
        default=None, max_length=32, description="The version it was pinned from."
    )
    matched_items: int | None = Field(
        default=None,
        description="Items matching its query (withheld when its Dataset has row-level policies).",
    )
    items_per_shard: int | None = Field(default=None, description="Its items in each rank's shard.")
    items_per_epoch: int | None = Field(
        default=None, description="Its items in each rank's epoch of the mix."
    )


class DatasetStreamStatus(_Model):
    """What the operator resolved for the stream."""

    observed_generation: int | None = Field(default=None, description="The generation last reconciled.")
    resolved_version: int | None = Field(
        default=None, description="The manifest version the stream is pinned to."
    )
    pinned_from: str | None = Field(
        default=None,
        description="The spec.version the pin was resolved from; re-pinned when that changes.",
        max_length=32,
    )
    matched_items: int | None = Field(
        default=None, description="Items matching spec.query (before per-subject row-level policies)."
    )
    world_size: int | None = Field(default=None, description="Ranks the shards were cut for, when known.")
    shards: int | None = Field(default=None, description="Number of shards (the world size), when known.")
    items_per_shard: int | None = Field(default=None, description="Items each rank reads per epoch.")
    injected_pods: int | None = Field(default=None, description="Live pods the sidecar was injected into.")
    sources: list[SourceStatus] | None = Field(
        default=None, max_length=MAX_SOURCES, description="Per source of a mix: what it was resolved to."
    )
    progress: StreamProgress | None = Field(
        default=None, description="The epoch in progress, as the pods reported it (written by the broker)."
    )
    conditions: Conditions = Field(default_factory=list)


# -- whole objects ------------------------------------------------------------------------------------


class ObjectMeta(_Model):
    name: str
    namespace: str = ""
    uid: str = ""
    generation: int = 0
    resource_version: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Dataset(_Model):
    metadata: ObjectMeta
    spec: DatasetSpec
    status: DatasetStatus = Field(default_factory=DatasetStatus)


@dataclass(frozen=True)
class Part:
    """One Dataset slice a stream reads: the stream's one, or one source of its mix (index, name)."""

    index: int
    name: str | None  # the source's name; None: a stream of one Dataset
    namespace: str  # of the Dataset
    dataset: str
    version: int | Literal["latest"]
    query: str
    weight: float
    status: SourceStatus  # what the operator last resolved for it

    def label(self) -> str:
        """How messages name it: ``Dataset ns/name``, prefixed by the source in a mix."""
        where = f"Dataset {self.namespace}/{self.dataset}"
        return where if self.name is None else f"source {self.name} ({where})"


class DatasetStream(_Model):
    metadata: ObjectMeta
    spec: DatasetStreamSpec
    status: DatasetStreamStatus = Field(default_factory=DatasetStreamStatus)

    @property
    def is_mix(self) -> bool:
        return self.spec.sources is not None

    def parts(self) -> list[Part]:
        """What the stream reads, each with the status resolved for it."""
        ns, spec, status = self.metadata.namespace, self.spec, self.status
        if spec.sources is None:
            assert spec.dataset is not None  # exactly one of the two (the spec's own check)
            resolved = SourceStatus(
                name="",
                resolved_version=status.resolved_version,
                pinned_from=status.pinned_from,
                matched_items=status.matched_items,
                items_per_shard=status.items_per_shard,
            )
            return [
                Part(
                    0,
                    None,
                    spec.dataset.namespace or ns,
                    spec.dataset.name,
                    spec.version,
                    spec.query,
                    1.0,
                    resolved,
                )
            ]
        known = {s.name: s for s in status.sources or []}
        return [
            Part(
                i,
                src.name,
                src.dataset.namespace or ns,
                src.dataset.name,
                src.version,
                src.query,
                src.weight,
                known.get(src.name) or SourceStatus(name=src.name),
            )
            for i, src in enumerate(spec.sources)
        ]

    def part(self, source: str | None) -> Part | None:
        """The part a sidecar of ``source`` reads (None: the stream's one Dataset); None if there is none."""
        return next((p for p in self.parts() if p.name == source), None)
