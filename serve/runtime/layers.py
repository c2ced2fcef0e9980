"""Building blocks named after TensorRT-LLM's modules, so a rank file loads with `load_state_dict`.

`Linear` is the single extension point for quantization: quantized variants (in
`serve.runtime.quant`) subclass it, register the checkpoint's extra tensors, and override
`matmul` and `kernel_weights` (how the fused decode kernels read them); tensor parallelism
only sets `reduce` on row-parallel layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serve.runtime import tp
from serve.runtime.fused import FLOAT, Weights


class Linear(nn.Module):
    """`y = x W^T (+ all-reduce) + b` with W in [out, in] layout, as TRT-LLM stores float weights."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, reduce: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.reduce = in_features, out_features, reduce
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def kernel_weights(self) -> Weights | None:
        """The weight as `serve.runtime.fused` reads it; None where its kernels cannot."""
        return Weights(FLOAT, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.reduce or tp.world_size() == 1:
            return self.matmul_bias(x)
        return tp.all_reduce(self.matmul_bias(x) if tp.rank() == 0 else self.matmul(x))  # the bias once

    def matmul_bias(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b, with the bias fused into the GEMM where the layer is a float one."""
        if type(self).matmul is Linear.matmul:
            return F.linear(x, self.weight, self.bias)
        y = self.matmul(x)
        return y if self.bias is None else y + self.bias

    def forward_rows(self, x: torch.Tensor, stop: int) -> torch.Tensor:
        """The first `stop` outputs only (cross-attention needs Q of its fused QKV each step)."""
        if type(self).matmul is not Linear.matmul:
            return self(x)[..., :stop]
        return F.linear(x, self.weight[:stop], None if self.bias is None else self.bias[:stop])


class LayerNorm(nn.LayerNorm):
    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps=eps)
        self.requires_grad_(False)


class Embedding(nn.Module):
    def __init__(self, num: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)
