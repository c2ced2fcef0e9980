"""Building blocks named after TensorRT-LLM's modules, so a rank file loads with `load_state_dict`.

`Linear` is the single extension point for quantization: quantized variants (in
`serve.runtime.quant`) subclass it, register the checkpoint's extra tensors, and override
`matmul`; tensor parallelism only sets `reduce` on row-parallel layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from serve.runtime import tp


class Linear(nn.Module):
    """`y = x W^T (+ all-reduce) + b` with W in [out, in] layout, as TRT-LLM stores float weights."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, reduce: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.reduce = in_features, out_features, reduce
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x)
        if self.reduce:
            y = tp.all_reduce(y)
        return y if self.bias is None else y + self.bias


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
