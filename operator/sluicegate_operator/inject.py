"""Pure admission logic: a pod's rank, and the pod with the sluicegate sidecar injected.

``webhook`` does the I/O (reads the DatasetStream, the Job, asks for a SubjectAccessReview) and calls
these functions; they take plain objects and return plain objects, so every rule is unit-tested.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sluicegate.core.broker_protocol import (
    AUDIENCE,
    SOCKET_DIR,
    SOCKET_PATH,
    TOKEN_DIR,
    MixEnv,
    MixEnvSource,
    SidecarEnv,
    TrainerEnv,
)
from sluicegate.core.quantity import parse_bytes

from .grants import GRANT_ANNOTATION
from .models import DatasetStream, Part, RankSource, SidecarOverrides

STREAM_LABEL = "sluicegate.io/stream"
INJECTED_LABEL = "sluicegate.io/injected"
RANK_ANNOTATION = "sluicegate.io/rank"
WORLD_SIZE_ANNOTATION = "sluicegate.io/world-size"
RANK_SOURCE_ANNOTATION = "sluicegate.io/rank-source"
JOB_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
METRICS_PORT_NAME = "sg-metrics"  # the chart's PodMonitor scrapes the port of this name

SIDECAR_NAME = "sluicegate-sidecar"
SOCKET_VOLUME = "sluicegate-socket"
TOKEN_VOLUME = "sluicegate-token"
CACHE_VOLUME = "sluicegate-cache"
CACHE_DIR = "/var/cache/sluicegate"
TOKEN_EXPIRATION_S = 3600
DISK_HEADROOM_MIN = 64 * 1024 * 1024

JsonPatch = list[dict[str, Any]]


class AdmissionDenied(Exception):
    """The pod must be refused; the message is shown to whoever created it."""


@dataclass(frozen=True)
class SidecarTemplate:
    """What the operator's settings contribute to every injected sidecar."""

    image: str
    broker_url: str
    broker_ca_pem: str
    image_pull_policy: str = "IfNotPresent"
    # sha256 of the chart's scrape token; None: the sidecars get no metrics listener (nobody could scrape it)
    metrics_token_sha256: str | None = None


@dataclass(frozen=True)
class Rank:
    rank: int
    world_size: int
    source: RankSource


def _env_values(pod: Mapping[str, Any]) -> dict[str, str]:
    """Literal env values of the pod's containers (valueFrom is not knowable at admission)."""
    found: dict[str, str] = {}
    for container in pod.get("spec", {}).get("containers", []):
        for var in container.get("env") or []:
            if "value" in var:
                found.setdefault(var["name"], str(var["value"]))
    return found


def _int(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise AdmissionDenied(f"{what} is {value!r}, not an integer") from None


def job_name_needed(pod: Mapping[str, Any], stream: DatasetStream) -> str | None:
    """The Indexed Job whose completions give the world size, when the rank comes from a Job and the
    stream does not fix the world size; ``None`` when no lookup is needed."""
    meta = pod.get("metadata", {})
    source = stream.spec.sharding.rank_source
    if stream.spec.sharding.world_size is not None or source not in (RankSource.AUTO, RankSource.INDEXED_JOB):
        return None
    if JOB_INDEX_ANNOTATION not in (meta.get("annotations") or {}):
        return None
    return (meta.get("labels") or {}).get(JOB_NAME_LABEL) or next(
        (o["name"] for o in meta.get("ownerReferences") or [] if o.get("kind") == "Job"), None
    )


def detect_rank(pod: Mapping[str, Any], stream: DatasetStream, job_completions: int | None = None) -> Rank:
    """Rank and world size of ``pod`` from where Kubernetes put them (see ``Sharding.rank_source``)."""
    sharding = stream.spec.sharding
    meta = pod.get("metadata", {})
    annotations = meta.get("annotations") or {}
    env = _env_values(pod)
    source = sharding.rank_source
    if source is RankSource.AUTO:
        if JOB_INDEX_ANNOTATION in annotations:
            source = RankSource.INDEXED_JOB
        elif {"PET_NODE_RANK", "RANK"} & env.keys():
            source = RankSource.TORCHRUN
        else:
            source = RankSource.SPEC

    if source is RankSource.INDEXED_JOB:
        if JOB_INDEX_ANNOTATION not in annotations:
            raise AdmissionDenied(
                f"DatasetStream {stream.metadata.name} takes ranks from an Indexed Job, but this pod has no "
                f"{JOB_INDEX_ANNOTATION} annotation: create it from a Job with completionMode: Indexed"
            )
        rank = _int(annotations[JOB_INDEX_ANNOTATION], f"annotation {JOB_INDEX_ANNOTATION}")
        world = sharding.world_size or job_completions
        if world is None:
            raise AdmissionDenied(
                "cannot tell the world size: set spec.sharding.worldSize on the DatasetStream or "
                "spec.completions on the Indexed Job"
            )
    elif source is RankSource.TORCHRUN:
        # One sidecar serves a pod, so a torchrun pod's rank is its node rank; processes within the pod
        # split the shard further like DataLoader workers.
        if "PET_NODE_RANK" in env:
            rank = _int(env["PET_NODE_RANK"], "env PET_NODE_RANK")
            world_raw = env.get("PET_NNODES")
            what = "env PET_NNODES"
        elif "RANK" in env:
            rank = _int(env["RANK"], "env RANK")
            world_raw = env.get("WORLD_SIZE")
            what = "env WORLD_SIZE"
        else:
            raise AdmissionDenied(
                f"DatasetStream {stream.metadata.name} takes ranks from torchrun, but no container of this "
                "pod sets PET_NODE_RANK or RANK"
            )
        if sharding.world_size is not None:
            world = sharding.world_size
        elif world_raw is None:
            raise AdmissionDenied(
                f"{what} is missing: set it or spec.sharding.worldSize on the DatasetStream"
            )
        else:
            # Elastic jobs write a range (MIN:MAX); the maximum is the number of shards.
            world = _int(world_raw.rsplit(":", 1)[-1], what)
    else:
        rank = _int(annotations.get(RANK_ANNOTATION, "0"), f"annotation {RANK_ANNOTATION}")
        world = sharding.world_size or 1
    if not 0 <= rank < world:
        raise AdmissionDenied(
            f"rank {rank} (from {source.value}) is outside the world size {world}; "
            "check spec.sharding.worldSize of the DatasetStream"
        )
    return Rank(rank=rank, world_size=world, source=source)


def _set_env(container: dict[str, Any], values: Mapping[str, str]) -> None:
    env = container.setdefault("env", [])
    present = {var["name"] for var in env}
    env.extend({"name": k, "value": v} for k, v in values.items() if k not in present)


def _mount(container: dict[str, Any], name: str, path: str, *, read_only: bool = False) -> None:
    mounts = container.setdefault("volumeMounts", [])
    if not any(m.get("name") == name for m in mounts):
        mounts.append({"name": name, "mountPath": path, **({"readOnly": True} if read_only else {})})


def sidecar_name(part: Part) -> str:
    """The container of ``part``'s sidecar: one per source of a mix, each serving its own socket."""
    return SIDECAR_NAME if part.name is None else f"{SIDECAR_NAME}-{part.name}"


def socket_path(part: Part) -> str:
    return SOCKET_PATH if part.name is None else f"{SOCKET_DIR}/{part.name}.sock"


def sidecar_container(
    stream: DatasetStream, namespace: str, config: SidecarTemplate, part: Part
) -> dict[str, Any]:
    cache = stream.spec.cache
    overrides = stream.spec.sidecar
    socket = socket_path(part)
    env = {
        SidecarEnv.BROKER_URL: config.broker_url,
        SidecarEnv.BROKER_CA: config.broker_ca_pem,
        SidecarEnv.TOKEN_FILE: f"{TOKEN_DIR}/token",
        SidecarEnv.LISTEN: f"unix://{socket}",
        SidecarEnv.STREAM: stream.metadata.name,
        SidecarEnv.NAMESPACE: namespace,
        SidecarEnv.CACHE_MEMORY: cache.memory,
        SidecarEnv.CACHE_DISK: cache.disk,
    }
    if part.name is not None:
        env[SidecarEnv.SOURCE] = part.name
    cache_dir = CACHE_DIR if part.name is None else f"{CACHE_DIR}/{part.name}"
    if cache.disk != "0":
        env[SidecarEnv.CACHE_DIR] = cache_dir
    metrics_port = (overrides or SidecarOverrides()).metrics_port
    if not config.metrics_token_sha256:
        metrics_port = 0
    if metrics_port:
        metrics_port += part.index  # a mix's sidecars share the pod's network: one port each
        env[SidecarEnv.METRICS_LISTEN] = f"0.0.0.0:{metrics_port}"
        env[SidecarEnv.METRICS_TOKEN_SHA256] = config.metrics_token_sha256 or ""
    container: dict[str, Any] = {
        "name": sidecar_name(part),
        "image": (overrides.image if overrides and overrides.image else None) or config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["sluicegate-sidecar"],
        # A native sidecar: an init container that keeps running, started before the trainer and
        # stopped after it, so Jobs still complete.
        "restartPolicy": "Always",
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "volumeMounts": [
            {"name": SOCKET_VOLUME, "mountPath": SOCKET_DIR},
            {"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
        ],
        "startupProbe": {
            "exec": {"command": ["test", "-S", socket]},
            "periodSeconds": 1,
            "failureThreshold": 600,
        },
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}},
    }
    if metrics_port:
        # A mix's sidecars all name theirs so, for the PodMonitor to scrape each (the API server warns that
        # Services selecting the name would use the first; none does).
        container["ports"] = [{"name": METRICS_PORT_NAME, "containerPort": metrics_port, "protocol": "TCP"}]
    if overrides and overrides.resources:
        container["resources"] = overrides.resources.wire()
    if cache.disk != "0":
        container["volumeMounts"].append({"name": CACHE_VOLUME, "mountPath": CACHE_DIR})
    return container


def trainer_env(stream: DatasetStream, rank: Rank) -> dict[str, str]:
    """What the trainer containers get: where the sidecar listens, or for a mix where each source's does
    (with the weights and epoch rule ``sluicegate.connect()`` mixes them by)."""
    env = {
        TrainerEnv.STREAM: stream.metadata.name,
        TrainerEnv.RANK: str(rank.rank),
        TrainerEnv.WORLD_SIZE: str(rank.world_size),
    }
    if not stream.is_mix:
        return {TrainerEnv.ADDRESS: f"unix://{SOCKET_PATH}", **env}
    sharding = stream.spec.sharding
    mix = MixEnv(
        sources=[
            MixEnvSource(name=p.name or "", address=f"unix://{socket_path(p)}", weight=p.weight)
            for p in stream.parts()
        ],
        epoch_length=stream.spec.epoch_length,
        seed=sharding.seed if sharding.shuffle else None,
    )
    return {TrainerEnv.MIX: mix.model_dump_json(), **env}


def _volumes(stream: DatasetStream) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        # Pod-private: only this pod's containers reach the socket.
        {"name": SOCKET_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        {
            "name": TOKEN_VOLUME,
            "projected": {
                "sources": [
                    {
                        "serviceAccountToken": {
                            "audience": AUDIENCE,
                            "expirationSeconds": TOKEN_EXPIRATION_S,
                            "path": "token",
                        }
                    }
                ]
            },
        },
    ]
    if stream.spec.cache.disk != "0":
        limit = disk_size_limit(stream.spec.cache.disk, len(stream.parts()))
        volumes.append({"name": CACHE_VOLUME, "emptyDir": {"sizeLimit": limit}})
    return volumes


def disk_size_limit(budget: str, sidecars: int = 1) -> str:
    """The cache volume's ``sizeLimit`` for ``sidecars`` disk budgets: the budgets plus headroom (10 %, at
    least 64 MiB), because the kubelet counts allocated blocks and files being written, while the cache
    counts the bytes it keeps; a limit equal to the budget gets the pod evicted at a full cache."""
    size = parse_bytes(budget) * sidecars
    return str(size + max(size // 10, DISK_HEADROOM_MIN))


def _is_sidecar(name: object) -> bool:
    return isinstance(name, str) and (name == SIDECAR_NAME or name.startswith(f"{SIDECAR_NAME}-"))


def refuse_preinjected(pod: Mapping[str, Any]) -> None:
    """:class:`AdmissionDenied` for a new pod that already carries what only the webhook may add (its own
    ``sluicegate-sidecar`` container, a grant, the injected label): it would bypass injection."""
    spec, meta = pod.get("spec") or {}, pod.get("metadata") or {}
    names = {c.get("name") for c in (spec.get("initContainers") or []) + (spec.get("containers") or [])}
    taken = sorted(n for n in names if _is_sidecar(n))
    if taken:
        raise AdmissionDenied(
            f"the pod already has a container named {taken[0]}, which only the sluicegate webhook adds "
            f"({SIDECAR_NAME} and {SIDECAR_NAME}-*): rename or remove it"
        )
    own = [k for k in (meta.get("annotations") or {}) if k == GRANT_ANNOTATION]
    if INJECTED_LABEL in (meta.get("labels") or {}):
        own.append(f"label {INJECTED_LABEL}")
    if own:
        raise AdmissionDenied(
            f"the pod sets {', '.join(own)}, which only the sluicegate webhook sets: remove it"
        )


def inject(
    pod: Mapping[str, Any],
    stream: DatasetStream,
    namespace: str,
    rank: Rank,
    config: SidecarTemplate,
    *,
    grant: str | None = None,
) -> dict[str, Any]:
    """``pod`` with the sidecar, its volumes, the trainer environment and the rank annotations added.

    Idempotent: injecting an injected pod returns it unchanged.
    """
    out = copy.deepcopy(dict(pod))
    spec = out.setdefault("spec", {})
    meta = out.setdefault("metadata", {})
    init = spec.setdefault("initContainers", [])
    if any(_is_sidecar(c.get("name")) for c in init):
        return out
    init[:0] = [sidecar_container(stream, namespace, config, part) for part in stream.parts()]
    volumes = spec.setdefault("volumes", [])
    names = {v["name"] for v in volumes}
    clash = names & {v["name"] for v in _volumes(stream)}
    if clash:
        raise AdmissionDenied(f"the pod already has volumes named {sorted(clash)}, which sluicegate injects")
    volumes.extend(_volumes(stream))
    env = trainer_env(stream, rank)
    for container in spec.get("containers", []):
        _set_env(container, env)
        _mount(container, SOCKET_VOLUME, SOCKET_DIR, read_only=True)
    meta.setdefault("labels", {})[INJECTED_LABEL] = "true"
    meta.setdefault("annotations", {}).update(
        {
            RANK_ANNOTATION: str(rank.rank),
            WORLD_SIZE_ANNOTATION: str(rank.world_size),
            RANK_SOURCE_ANNOTATION: rank.source.value,
            **({GRANT_ANNOTATION: grant} if grant else {}),
        }
    )
    return out


def json_patch(before: Mapping[str, Any], after: Mapping[str, Any]) -> JsonPatch:
    """RFC 6902 ops turning ``before`` into ``after`` for the fields injection touches ("add" replaces
    a member that exists, so one op per changed field covers both cases)."""
    ops: JsonPatch = []
    for section, keys in (
        ("metadata", ("labels", "annotations")),
        ("spec", ("initContainers", "containers", "volumes")),
    ):
        old, new = before.get(section) or {}, after.get(section) or {}
        for key in keys:
            if key in new and old.get(key) != new[key]:
                ops.append({"op": "add", "path": f"/{section}/{key}", "value": new[key]})
    return ops
