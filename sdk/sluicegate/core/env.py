"""Where this process sits in a training job, read from the environment in one place.

Sources, first match wins for rank and world size:

1. ``SLUICEGATE_RANK`` / ``SLUICEGATE_WORLD_SIZE``: what the operator injects into a pod;
2. ``JOB_COMPLETION_INDEX`` with ``SLUICEGATE_WORLD_SIZE``: an Indexed Job's pod index;
3. ``RANK`` / ``WORLD_SIZE``: torchrun, PyTorchJob and JobSet set these;
4. otherwise rank 0 of 1.

``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` (torchrun) say how many trainer processes share one pod's sidecar.
DataLoader worker info cannot come from the environment; adapters pass it in. The arithmetic on these
numbers lives in :mod:`sluicegate.core.partition`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict

from sluicegate._exceptions import ConfigError

__all__ = ["ADDRESS_VAR", "MIX_VAR", "Environment", "detect"]

ADDRESS_VAR = "SLUICEGATE_ADDRESS"
MIX_VAR = "SLUICEGATE_MIX"  # in a pod of a mix: each source's sidecar and weight (broker_protocol.MixEnv)


class Environment(BaseModel):
    model_config = ConfigDict(frozen=True)

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    worker: int = 0
    num_workers: int = 1
    pod: str | None = None
    address: str | None = None
    mix: str | None = None  # MixEnv JSON, parsed where it is used
    source: str = "default"  # which variables rank and world size came from


def _int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < 0:
        raise ConfigError(f"environment variable {name}={raw!r} must be >= 0")
    return value


def detect(environ: Mapping[str, str] | None = None, *, worker: int = 0, num_workers: int = 1) -> Environment:
    """Rank, world size, pod and sidecar address from ``environ`` (default ``os.environ``).

    ``worker``/``num_workers`` come from the caller (``torch.utils.data.get_worker_info()``).
    """
    env = os.environ if environ is None else environ
    rank, source = _int(env, "SLUICEGATE_RANK"), "SLUICEGATE_RANK"
    if rank is None:
        rank, source = _int(env, "JOB_COMPLETION_INDEX"), "JOB_COMPLETION_INDEX"
    world = _int(env, "SLUICEGATE_WORLD_SIZE")
    if rank is None and world is None:
        rank, world, source = _int(env, "RANK"), _int(env, "WORLD_SIZE"), "RANK"
        if (rank is None) != (world is None):
            raise ConfigError("RANK and WORLD_SIZE go together, but only one of them is set")
    elif rank is None:
        raise ConfigError(
            "SLUICEGATE_WORLD_SIZE is set but neither SLUICEGATE_RANK nor JOB_COMPLETION_INDEX is"
        )
    elif world is None:
        raise ConfigError(
            f"{source} is set but the world size is not: set SLUICEGATE_WORLD_SIZE (for an Indexed Job, "
            "its completions)"
        )
    if rank is None or world is None:
        rank, world, source = 0, 1, "default"
    local_rank, local_world = _int(env, "LOCAL_RANK") or 0, _int(env, "LOCAL_WORLD_SIZE") or 1
    for name, value, size in (
        ("rank", rank, world),
        ("local rank", local_rank, local_world),
        ("worker", worker, num_workers),
    ):
        if size < 1 or not 0 <= value < size:
            raise ConfigError(f"{name} {value} is outside [0, {size})")
    return Environment(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        worker=worker,
        num_workers=num_workers,
        pod=env.get("SLUICEGATE_POD") or env.get("POD_NAME") or env.get("HOSTNAME"),
        address=env.get(ADDRESS_VAR) or None,
        mix=env.get(MIX_VAR) or None,
        source=source,
    )
