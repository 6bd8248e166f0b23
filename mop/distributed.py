"""Process setup: torchrun environment, device selection, the default process group."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ProcessInfo:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(option: str, local_rank: int) -> torch.device:
    if option == "cpu" or (option == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("training.device=cuda but no CUDA device is visible; use training.device=cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_process(device_option: str = "auto") -> ProcessInfo:
    """Read torchrun's environment (or default to one process) and initialise the process group.

    NCCL on GPUs, gloo on CPU. Multi-node works through torchrun's rendezvous: every node runs the
    same command with its own --node-rank and a shared --rdzv-endpoint.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    device = pick_device(device_option, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30), **kwargs)
    elif dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return ProcessInfo(rank, world, local_rank, local_world, device)


# The *_tensor collectives are being renamed *_single (torch 2.13 has both; 2.11 only the old names).
all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_into = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of `t`: the local tensor of a DTensor, `t` itself otherwise."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t
