"""Process-group setup under torchrun: NCCL on GPUs, gloo on the CPU; one process without
torchrun needs no group at all."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: str = "auto") -> Dist:
    """Read torchrun's environment; init the process group when there are several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local, dev)


def teardown(info: Dist, wait: bool = True) -> None:
    """End the process group; wait=False skips the final barrier (after Ctrl-C, when the
    other ranks may already be gone and a barrier would wait for them forever)."""
    if info.enabled and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def all_sum(values: torch.Tensor, info: Dist) -> torch.Tensor:
    """Element-wise sum over ranks of a float64 CPU tensor, returned on the CPU.

    The one reduction of the training step, shape-stable by design: every rank passes a
    tensor of the same length and layout whatever its batch drew (a term it lacks is a
    zero with count 0). A dict of only the terms present gives gloo a size mismatch and
    NCCL a hang or wrong numbers.
    """
    if not info.enabled:
        return values
    t = values.to(device=info.device, dtype=torch.float64)
    dist.all_reduce(t)
    return t.cpu()


def barrier(info: Dist) -> None:
    if info.enabled:
        dist.barrier()
