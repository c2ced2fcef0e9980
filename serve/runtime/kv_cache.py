"""The paged KV pool: fixed-size blocks shared by decoder self-attention and cross-attention.

The allocator only hands out and takes back block ids; which sequence owns which blocks is
the engine's business (its block tables). One pool serves both kinds of K/V, so there is no
self/cross split to tune.
"""

from __future__ import annotations

import numpy as np
import torch

from serve.runtime.kernels import write_kv
from serve.runtime.transfer import upload


class OutOfBlocks(RuntimeError):
    pass


class BlockAllocator:
    """A free list of block ids with O(1) allocate and free."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} KV blocks, {len(self._free)} free")
        out = self._free[-n:] if n else []
        del self._free[len(self._free) - n :]
        return out[::-1]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


class KVPool:
    """Per decoder layer K and V tensors of shape [num_blocks, block_size, heads, head_size]."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        heads: int,
        head_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.block_size, self.num_blocks = block_size, num_blocks
        # One extra block that no sequence owns: padding rows of a CUDA-graph batch write there.
        self.scratch_block = num_blocks
        shape = (num_blocks + 1, block_size, heads, head_size)
        self.layers = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]
        self.allocator = BlockAllocator(num_blocks)

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, heads: int, head_size: int, dtype: torch.dtype
    ) -> int:
        return 2 * num_layers * block_size * heads * head_size * torch.finfo(dtype).bits // 8

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def slots(self, blocks: list[int], start: int, count: int) -> np.ndarray:
        """Flat slot indices (int64) of token positions start..start+count-1 in a block table."""
        positions, bs = np.arange(start, start + count), self.block_size
        return np.asarray(blocks, dtype=np.int64)[positions // bs] * bs + positions % bs

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        write_kv(*self.layers[layer], slots, k, v)

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """dst[i] <- src[i] in every layer (beam search forks a beam into another's blocks)."""
        if not src:
            return
        s = upload(src, self.layers[0][0].device)
        d = upload(dst, s.device)
        for k_pool, v_pool in self.layers:
            k_pool[d] = k_pool[s]
            v_pool[d] = v_pool[s]
