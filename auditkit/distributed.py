"""Running under ``torchrun``: one process group, sharded work, results gathered to every rank.

auditkit uses PyTorch's own machinery (torch.distributed, gloo on CPU, NCCL on GPU) and nothing
home-made. A command started by ``torchrun --nproc_per_node N`` sees WORLD_SIZE, RANK and
LOCAL_RANK in its environment; without them everything runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_from_environment(device: str | torch.device = "cpu") -> Context:
    """Joins the torchrun process group when there is one (gloo for CPU, NCCL for CUDA).

    ``device`` is this rank's device as auditkit.device.resolve_device gives it (under torchrun,
    'auto' and 'cuda' already mean cuda:LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return Context(rank, world_size, local_rank)


def gather(context: Context, items: list) -> list:
    """Every rank's ``items`` concatenated, in rank order, on every rank."""
    if not context.active:
        return list(items)
    gathered: list = [None] * context.world_size
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]


def finish(context: Context) -> None:
    if context.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
