"""Tensor parallelism: which rank this process is, and the one collective the model needs.

Each rank loads only its own `rank{r}.safetensors`; row-parallel layers (`dense`, `mlp.proj`)
sum their partial outputs with `all_reduce` before adding their unsplit bias.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(x)
    return x


def broadcast_object(obj):
    """Rank 0's value on every rank (rank 0 schedules; the others follow)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
