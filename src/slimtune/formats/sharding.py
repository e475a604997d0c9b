"""Tensors in and out of files under FSDP2, where adapter tensors are sharded DTensors:
`full_tensors` gathers them before a write (a collective: every rank calls it, in the same
order) and `shard_like` lays a tensor read from a file out as a parameter is laid out."""

from __future__ import annotations

import torch


def is_sharded(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor")


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain tensors; DTensors are all-gathered (every rank must call this, in the same order)."""
    return {k: (v.full_tensor() if is_sharded(v) else v).detach() for k, v in tensors.items()}


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `like` (a DTensor parameter), or moved to its device."""
    if not is_sharded(like):
        return full.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device_mesh.device_type), like.device_mesh, like.placements)
