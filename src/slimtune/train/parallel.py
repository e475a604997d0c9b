"""Data-parallel training under torchrun: DDP (the frozen base replicated) or FSDP2
(`fully_shard`: every transformer block and the rest of the model sharded across ranks).

    torchrun --standalone --nproc_per_node N -m slimtune.cli train [--parallel fsdp]

gloo and one thread per process on CPU, NCCL on GPU. Under FSDP2 adapter tensors are
DTensors, gathered before rank 0 writes and scattered back on load (formats/sharding.py).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import Problems
from ..models.load import resolve_device


def init_distributed(device_choice: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); a single process unless launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(device_choice)
    cuda = torch.cuda.is_available() and device_choice != "cpu"
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    else:
        torch.set_num_threads(1)  # two threads per process on two cores is several times slower
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if dist.get_world_size() != world:  # e.g. a launcher that silently ran one process
        raise RuntimeError(f"launched with WORLD_SIZE={world} but the process group has {dist.get_world_size()}")
    return dist.get_rank(), world, torch.device(f"cuda:{local}" if cuda else "cpu")


def wrap(loss_model: nn.Module, model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """DDP around the loss module, or FSDP2 on each block and then on the loss module."""
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(loss_model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        p = Problems("cannot shard")
        p.add(f"parallel='fsdp' with {type(model).__name__}", "the model names no transformer block class "
              "(_no_split_modules)", "use --parallel ddp")
        p.raise_if_any()
    for block in blocks:
        fully_shard(block)
    fully_shard(loss_model)
    return loss_model


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Wait for every rank, then tear the process group down (an exiting process that still
    holds a gloo group can abort with 'terminate called without an active exception')."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
