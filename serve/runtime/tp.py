"""Tensor parallelism: which rank this process is, and the collectives the model needs.

Each rank loads only its own `rank{r}.safetensors`; row-parallel layers (`dense`, `mlp.proj`)
sum their partial outputs with `all_reduce`, rank 0's partial carrying the unsplit bias.

At batch 1 a decode step sums 36 small tensors one after another, so the sum's latency decides
the step time. On CUDA, `use_peer_all_reduce` switches sums of up to `PEER_MAX_BYTES` to PyTorch's
symmetric-memory one-shot all-reduce, which reads the peers' buffers over NVLink: 6.5-9.5 us a sum
inside a CUDA graph against NCCL's 15-19 us on two H200s (`scripts/bench_allreduce.py`). Its
kernel takes bfloat16 and float32, not float16 (PyTorch 2.11): a float16 model's fused row-parallel
kernels write float32 partials straight into the peer buffer (`partial_out`), which also rounds the
sum once, as one rank would; its other sums keep NCCL.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
PEER_MAX_BYTES = 1 << 20  # above this NCCL's ring is as fast, and the buffer would be large
_peer: _PeerAllReduce | None = None
# the peer buffer's dtype for a model's: the one-shot kernel takes no float16, so those partials are float32
_PEER_DTYPE = {torch.float16: torch.float32, torch.float32: torch.float32, torch.bfloat16: torch.bfloat16}


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """The sum of `x` over ranks: a new tensor through peer memory where set up and `x` fits (or lies in
    the peer buffer already, from `partial_out`), else `x` summed in place by the process group."""
    if world_size() == 1:
        return x
    if _peer is not None and _peer.fits(x):
        return _peer(x)
    dist.all_reduce(x)
    return x


def all_gather(x: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `x`, in rank order."""
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x)
    return parts


def partial_out(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Where a fused row-parallel kernel of a `dtype` model should write its [rows, cols] partial sums
    so that `all_reduce` reads them in place: a view of the peer buffer (float32 for a float16 model),
    or None where the sum goes through NCCL."""
    if _peer is None or rows * cols > _peer.buffer.numel() or _PEER_DTYPE.get(dtype) != _peer.buffer.dtype:
        return None
    return _peer.buffer[: rows * cols].view(rows, cols)


class _PeerAllReduce:
    def __init__(self, dtype: torch.dtype, device: torch.device):
        import torch.distributed._symmetric_memory as symm_mem

        self.group = dist.group.WORLD.group_name
        self.buffer = symm_mem.empty(PEER_MAX_BYTES // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.group)

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype == self.buffer.dtype and x.numel() <= self.buffer.numel() and x.is_contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.data_ptr() == self.buffer.data_ptr():  # written there by the kernel that made it
            return torch.ops.symm_mem.one_shot_all_reduce(x, "sum", self.group)
        view = self.buffer[: x.numel()].view_as(x)
        return torch.ops.symm_mem.one_shot_all_reduce_copy(view, x, "sum", self.group)


def use_peer_all_reduce(dtype: torch.dtype, device: torch.device) -> bool:
    """Set up the peer-memory all-reduce for a `dtype` model on every rank (a collective call), or leave
    NCCL where any rank cannot (CPU, GPUs without peer access); True if in use. Opt-in with
    `MT_PEER_ALL_REDUCE=1` until it has been timed in the runtime on two GPUs."""
    global _peer
    _peer = None
    if world_size() == 1 or device.type != "cuda":
        return False
    peer = None
    if os.environ.get("MT_PEER_ALL_REDUCE", "0") == "1" and dtype in _PEER_DTYPE:
        try:
            peer = _PeerAllReduce(_PEER_DTYPE[dtype], device)
        except Exception as e:  # no symmetric memory here: every rank falls back together below
            log.warning("peer-memory all-reduce unavailable, using NCCL: %s: %s", type(e).__name__, e)
    if min_over_ranks(int(peer is not None), device) == 1:
        _peer = peer
    return _peer is not None


def min_over_ranks(n: int, device: torch.device) -> int:
    """The smallest of every rank's `n`, for what all ranks must agree on (the KV pool's size)."""
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
