"""Multi-process (DistributedDataParallel) training under ``torchrun``.

``torchrun --nproc-per-node N dmae-certify train ...`` starts N copies of the command with
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` set; :func:`training_world` turns them into a
process group (NCCL on CUDA, gloo on CPU) and one device per process. Each optimiser step
then covers a global batch of N x ``batch_size`` x ``accum_iter`` images: every global
micro-batch of N x ``batch_size`` consecutive keys of the epoch's seeded order is dealt out
rank by rank (rank r takes every N-th key from position r), which is exactly the sharding of
``torch.utils.data.DistributedSampler`` (``drop_last``) over that order, and DDP averages the
gradients, so a step equals one process's step on the whole global batch. Random noise and
masks are drawn per process from per-rank seeds. Without ``torchrun`` (or with N = 1)
nothing here changes a run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from models.runtime import pick_device

T = TypeVar("T")
# Ranks wait for rank 0 while it evaluates and saves: allow that much time per collective.
COLLECTIVE_TIMEOUT = timedelta(hours=1)


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes, ``local_rank`` on its host."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the only process that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env(env: dict[str, str] | None = None) -> World:
    """The world ``torchrun`` describes in ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (else one)."""
    env = dict(os.environ) if env is None else env
    try:
        size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ValueError(f"unreadable torchrun environment ({exc})") from None
    if size < 1 or not 0 <= rank < size or local < 0:
        raise ValueError(f"inconsistent torchrun environment: RANK {rank}, WORLD_SIZE {size}")
    return World(rank, size, local)


def process_device(name: str, world: World) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` for ``auto``/``cuda`` under torchrun."""
    if not world.distributed:
        return pick_device(name)
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if name not in ("auto", "cuda"):
        raise ValueError(
            f"--device {name} names one device, but torchrun started {world.size} processes: "
            "use --device cuda (each process takes the GPU of its LOCAL_RANK) or cpu"
        )
    if not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    count = torch.cuda.device_count()
    if world.local_rank >= count:
        raise ValueError(
            f"process with LOCAL_RANK {world.local_rank} has no GPU: this host has {count}; "
            "start at most that many processes per host (--nproc-per-node)"
        )
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


@contextmanager
def training_world(device_name: str) -> Iterator[tuple[World, torch.device]]:
    """Join the torchrun process group for the duration of a run (a no-op for one process)."""
    world = world_from_env()
    device = process_device(device_name, world)
    started = False
    if world.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, **kwargs)
        started = True
    try:
        yield world, device
    finally:
        if started:
            dist.destroy_process_group()


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of rank ``rank``'s random streams: ``seed`` itself for rank 0 at step 0."""
    if rank == 0 and step == 0:
        return seed
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % 2**62


def shard_micro_batches(
    keys: Sequence[T], batch_size: int, count: int, world: World
) -> list[list[T]]:
    """This rank's ``count`` micro-batches of ``batch_size`` keys from the epoch order ``keys``.

    Global micro-batch i is ``keys[i*N*B : (i+1)*N*B]`` (N processes, B = ``batch_size``) and
    rank r takes every N-th key of it from position r; with N = 1 that is ``keys[i*B:(i+1)*B]``.
    """
    span = batch_size * world.size
    if count * span > len(keys):
        raise ValueError(f"{count} micro-batches of {span} keys do not fit {len(keys)} keys")
    return [list(keys[i * span : (i + 1) * span][world.rank :: world.size]) for i in range(count)]


def all_gather(obj: T, world: World) -> list[T]:
    """``obj`` from every rank, in rank order (a one-element list for one process)."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def all_sum(values: dict[str, float], world: World, device: torch.device) -> dict[str, float]:
    """Element-wise sums of ``values`` over the ranks (all ranks pass the same keys)."""
    if not world.distributed or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
