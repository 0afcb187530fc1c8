"""Sharding and shuffling as pure functions of (item count, seed, epoch, rank, world size, worker).

No I/O and no environment here: :func:`sluicegate.core.env.detect` reads ranks from the environment,
these functions do the arithmetic, and tests check their invariants directly.

The plan, for ``n`` items in query order:

1. *Assignment.* Positions ``0..n-1`` are permuted once with ``seed`` (if shuffling) and cut into
   ``world_size`` contiguous blocks, one per rank; a rank keeps its block for every epoch, so its
   sidecar caches only that block.
2. *Equal length.* Every rank gets the same count: ``ceil(n / world_size)`` with ``pad`` (short
   blocks repeat items from the start of the assignment), ``floor(n / world_size)`` with ``drop``
   (the last ``n mod world_size`` items of the assignment are left out).
3. *Epoch order.* Each epoch, a rank visits its block in an order permuted by ``(seed, epoch, rank)``.
4. *Workers.* DataLoader worker ``w`` of ``k`` takes every ``k``-th position of the rank's epoch
   order starting at ``w``: disjoint, and together exactly the rank's order.
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sluicegate._exceptions import ConfigError

Positions = npt.NDArray[np.int64]


class Remainder(StrEnum):
    """What to do when items do not divide evenly among ranks."""

    PAD = "pad"
    DROP = "drop"


class ShardSpec(BaseModel):
    """Which part of a selection one rank reads and in which order: stated here once and carried whole
    (the sidecar's configuration, the broker's plan and the sidecar's Info extend it)."""

    model_config = ConfigDict(frozen=True)

    rank: int = Field(default=0, ge=0, description="this rank, in [0, world_size)")
    world_size: int = Field(default=1, ge=1, description="number of ranks the selection is cut for")
    seed: int = Field(default=0, description="shuffle seed")
    shuffle: bool = Field(default=True, description="permute the selection before cutting it")
    remainder: Remainder = Field(default=Remainder.PAD, description="pad or drop, to give ranks equal counts")

    @model_validator(mode="after")
    def _rank_in_world(self) -> ShardSpec:
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, {self.world_size})")
        return self

    def shard_spec(self) -> ShardSpec:
        """The spec alone, out of a model that extends it."""
        return ShardSpec(**{name: getattr(self, name) for name in ShardSpec.model_fields})

    def positions(self, n: int) -> Positions:
        """:func:`shard` of ``n`` items for this spec."""
        return shard(
            n, self.rank, self.world_size, seed=self.seed, shuffle=self.shuffle, remainder=self.remainder
        )

    def seeded(self, seed: int | None) -> ShardSpec:
        """This spec shuffled with ``seed`` (``None``: not shuffled), as a dataset view applies its seed."""
        return self.model_copy(update={"seed": seed or 0, "shuffle": seed is not None})


def _check(rank: int, world_size: int) -> None:
    if world_size < 1:
        raise ConfigError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in [0, {world_size}), got {rank}")


def permutation(n: int, seed: int, *stream: int) -> Positions:
    """A permutation of ``0..n-1`` determined by ``seed`` and the ``stream`` integers."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed & (2**63 - 1), *stream])))
    return rng.permutation(n).astype(np.int64)


def per_rank(n: int, world_size: int, remainder: Remainder) -> int:
    """How many items each rank gets per epoch."""
    return -(-n // world_size) if remainder is Remainder.PAD else n // world_size


def shard(
    n: int,
    rank: int,
    world_size: int,
    *,
    seed: int = 0,
    shuffle: bool = True,
    remainder: Remainder = Remainder.PAD,
) -> Positions:
    """The positions (into the ``n`` query results) that ``rank`` owns, in assignment order."""
    _check(rank, world_size)
    order = permutation(n, seed) if shuffle else np.arange(n, dtype=np.int64)
    count = per_rank(n, world_size, remainder)
    if n == 0 or count == 0:
        return np.empty(0, dtype=np.int64)
    # Blocks are as even as they can be: the first n % world_size ranks hold one more item.
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    block = order[start : start + base + (rank < extra)]
    if len(block) >= count:
        return block[:count]
    pad = np.resize(order, count - len(block))  # wraps around the assignment when n < world_size
    return np.concatenate([block, pad])


def epoch_order(count: int, *, seed: int, epoch: int, rank: int = 0, shuffle: bool = True) -> Positions:
    """The order in which a rank visits its ``count`` items in ``epoch`` (indexes into its shard)."""
    if epoch < 0:
        raise ConfigError(f"epoch must be >= 0, got {epoch}")
    return permutation(count, seed, epoch, rank) if shuffle else np.arange(count, dtype=np.int64)


def assign(selected: Positions, spec: ShardSpec | None) -> Positions:
    """``selected`` (positions in query order) cut to ``spec``'s shard, in assignment order; all of it when
    not sharded. A dataset view and the ledger's reader both go through here."""
    return selected if spec is None else selected[spec.positions(len(selected))]


def visit_order(
    count: int, *, seed: int | None, epoch: int, rank: int = 0, worker: int = 0, num_workers: int = 1
) -> Positions:
    """Indexes ``0..count-1`` of a view in the order it visits them in ``epoch`` (shuffled by ``seed``, in
    order when ``None``), worker ``worker``'s part of it. A dataset view and the ledger's reader both go
    through here."""
    order = epoch_order(count, seed=seed or 0, epoch=epoch, rank=rank, shuffle=seed is not None)
    return worker_split(order, worker, num_workers)


def worker_split(order: Positions, worker: int, num_workers: int) -> Positions:
    """The part of ``order`` that DataLoader worker ``worker`` of ``num_workers`` reads."""
    if num_workers < 1 or not 0 <= worker < num_workers:
        raise ConfigError(f"worker must be in [0, {num_workers}), got {worker}")
    return order[worker::num_workers]
