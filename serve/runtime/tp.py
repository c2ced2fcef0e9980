"""Tensor parallelism: which rank this process is, and the collectives the model needs.

Each rank loads only its own `rank{r}.safetensors`; row-parallel layers (`dense`, `mlp.proj`)
sum their partial outputs with `all_reduce` before adding their unsplit bias.

At batch 1 a decode step sums 36 small tensors one after another, so the sum's latency decides
the step time. On CUDA, `use_peer_all_reduce` switches sums of up to `PEER_MAX_BYTES` to PyTorch's
symmetric-memory one-shot all-reduce, which reads the peers' buffers over NVLink: 6.5-9.5 us a sum
inside a CUDA graph against NCCL's 15-19 us on two H200s (`scripts/bench_allreduce.py`). Its
kernel takes bfloat16 and float32 only (PyTorch 2.11), so float16 models keep NCCL.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
PEER_MAX_BYTES = 1 << 20  # above this NCCL's ring is as fast, and the buffer would be large
_peer: _PeerAllReduce | None = None


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over ranks: a new tensor through peer memory where set up and `x` fits, else `x`
    summed in place by the process group."""
    if world_size() == 1:
        return x
    if _peer is not None and _peer.fits(x):
        return _peer(x)
    dist.all_reduce(x)
    return x


class _PeerAllReduce:
    def __init__(self, dtype: torch.dtype, device: torch.device):
        import torch.distributed._symmetric_memory as symm_mem

        self.group = dist.group.WORLD.group_name
        self.buffer = symm_mem.empty(PEER_MAX_BYTES // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group)

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype == self.buffer.dtype and x.numel() <= self.buffer.numel() and x.is_contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        view = self.buffer[: x.numel()].view_as(x)
        return torch.ops.symm_mem.one_shot_all_reduce_copy(view, x, "sum", self.group)


def use_peer_all_reduce(dtype: torch.dtype, device: torch.device) -> bool:
    """Set up the peer-memory all-reduce for `dtype` on every rank (a collective call), or leave NCCL
    where any rank cannot (CPU, float16, GPUs without peer access); True if in use. `MT_PEER_ALL_REDUCE=0`
    keeps NCCL."""
    global _peer
    _peer = None
    if world_size() == 1 or device.type != "cuda":
        return False
    peer = None
    wanted = os.environ.get("MT_PEER_ALL_REDUCE", "1") != "0" and dtype in (torch.bfloat16, torch.float32)
    if wanted:
        try:
            peer = _PeerAllReduce(dtype, device)
        except Exception as e:  # no symmetric memory here: every rank falls back together below
            log.warning("peer-memory all-reduce unavailable, using NCCL: %s: %s", type(e).__name__, e)
    if min_over_ranks(int(peer is not None), device) == 1:
        _peer = peer
    return _peer is not None


def min_over_ranks(n: int, device: torch.device) -> int:
    """The smallest of every rank's `n` (each rank must size its KV pool alike)."""
    if world_size() == 1:
        return n
    t = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def leave() -> None:
    """Drop the peer buffer and destroy the process group (after the CUDA graphs that use them)."""
    global _peer
    _peer = None
    dist.destroy_process_group()
