"""``sluicegate.connect()``: the pod's data, served by its sidecar, or in a pod of a DatasetStream that
mixes Datasets (``spec.sources``) by one sidecar per source, mixed here."""

from __future__ import annotations

from pydantic import ValidationError

from sluicegate import _ledger
from sluicegate._dataset import Dataset
from sluicegate._exceptions import ConfigError
from sluicegate._ledger import Ledger
from sluicegate._mix import Mix
from sluicegate._remote import BATCH_TIMEOUT_S, RemoteSource
from sluicegate.core.broker_protocol import MixEnv
from sluicegate.core.env import Environment, detect
from sluicegate.core.mix import MixSpec
from sluicegate.core.partition import ShardSpec
from sluicegate.core.wait import METER

__all__ = ["connect"]


def connect(
    address: str | None = None,
    *,
    timeout: float = 60.0,
    batch_timeout: float = BATCH_TIMEOUT_S,
    prefetch: int = 64 * 2**20,
    ledger: Ledger | str | bool | None = None,
) -> Dataset | Mix:
    """The pod's shard, served by its sidecar at ``address`` (default: ``$SLUICEGATE_ADDRESS``); in a pod
    of a DatasetStream that mixes Datasets (``spec.sources``), the :class:`~sluicegate.Mix` of each
    source's shard, each served by that source's sidecar (``$SLUICEGATE_MIX`` says where, and the weights).

    Waits up to ``timeout`` seconds for the sidecar to be ready (and for one that restarts); a batch that
    takes longer than ``batch_timeout`` seconds to arrive raises :class:`SidecarUnavailable` instead of
    hanging the trainer. When several trainer processes share the pod (torchrun ``LOCAL_WORLD_SIZE`` > 1),
    each gets its ``LOCAL_RANK``'s part of the shard. ``ledger``: as for :func:`open`; the sidecar writes
    the records (in store mode) or passes them on to the operator's broker, which does.
    """
    recording = _ledger.ledger_of(ledger)
    env = detect()
    if address is None and env.mix is not None:
        return _connect_mix(env, timeout, batch_timeout, prefetch, recording)
    target = address or env.address
    if not target:
        raise ConfigError(
            "no sidecar address: pass connect(address) or set SLUICEGATE_ADDRESS (unix:///PATH or "
            "http://127.0.0.1:PORT); without a sidecar use sluicegate.open(URI)"
        )
    source = _ready(target, timeout, batch_timeout)
    ds = Dataset(source, seed=source.seed, prefetch=prefetch, ledger=recording)
    if env.local_world_size > 1:
        ds = ds.shard(env.local_rank, env.local_world_size)
    elif source.resume is not None and not source.resume.mix:
        # The stream kept its epoch's progress: start where it stands (ds.epoch), nothing repeated.
        ds._epoch = source.resume.progress.epoch
    return ds


def _ready(address: str, timeout: float, batch_timeout: float) -> RemoteSource:
    """The sidecar at ``address``, once it is ready; it hears how long the trainer waits."""
    source = RemoteSource(address, timeout=timeout, batch_timeout=batch_timeout)
    source.wait_ready()
    METER.report_to(source.report_wait)
    return source


def _connect_mix(
    env: Environment, timeout: float, batch_timeout: float, prefetch: int, ledger: Ledger | None
) -> Mix:
    """Each source's shard from its own sidecar, mixed as the stream says. Each sidecar serves its source
    cut for the pod's rank and shuffled with the seed a mix shuffled with the stream's seed gives that
    source: this is the mix ``sluicegate.mix(sources, weights, seed=seed).shard(rank, world_size)`` reads
    embedded."""
    assert env.mix is not None
    try:
        wanted = MixEnv.model_validate_json(env.mix)
    except ValidationError as exc:
        raise ConfigError(f"$SLUICEGATE_MIX is not what the sluicegate webhook writes: {exc}") from None
    spec = MixSpec.checked(
        names=[s.name for s in wanted.sources],
        weights=[s.weight for s in wanted.sources],
        epoch_length=wanted.epoch_length,
    )
    share = max(1, prefetch // len(wanted.sources))
    sources = [_ready(s.address, timeout, batch_timeout) for s in wanted.sources]
    views = tuple(Dataset(s, seed=s.seed, prefetch=share, ledger=ledger) for s in sources)
    if env.local_world_size > 1:  # trainer processes sharing the pod split each source further
        return Mix(views, spec, seed=wanted.seed).shard(env.local_rank, env.local_world_size)
    first = sources[0].shard_spec
    shard = ShardSpec(rank=first.rank, world_size=first.world_size, remainder=first.remainder)
    mixed = Mix(views, spec, seed=wanted.seed, shard=shard)
    progress = {s.resume.progress for s in sources if s.resume is not None}
    if len(progress) > 1 or (progress and None in (s.resume for s in sources)):
        raise ConfigError(
            "the sidecars of this mix's sources continue different epochs: restart the pod (each asks "
            "the broker for the stream's progress again)"
        )
    if progress:
        # The stream kept its epoch's progress: the mix starts where it stands, nothing repeated.
        mixed._epoch, mixed._progress = next(iter(progress)).epoch, next(iter(progress))
    return mixed
