"""This process's place in a ``torchrun`` job, and the device it runs on: what the stages that
run as several processes (classifier, cams, prune, segment, deeplab) share."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    """This process's place in a ``torchrun`` job (rank 0 of 1 when run plainly)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def average(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over the job's processes (``tensor`` itself when run plainly)."""
        if not self.enabled:
            return tensor
        total = tensor.clone()
        dist.all_reduce(total)
        return total / self.world_size

    def barrier(self) -> None:
        """Wait for every process of the job (nothing to wait for when run plainly)."""
        if self.enabled:
            dist.barrier()


def init_distributed() -> Distributed:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    NCCL on CUDA, gloo on a CPU; a plain ``python`` run is rank 0 of 1 and starts nothing.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    return Distributed(rank, world_size, local_rank)


def default_device(ctx: Distributed) -> torch.device:
    return torch.device(f"cuda:{ctx.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
