"""Quantized `Linear` modules for TensorRT-LLM checkpoints, and the module surgery that installs them.

Each class registers buffers named exactly like the checkpoint tensors of its `quant_algo`
(TensorRT-LLM names and layouts, read from `tensorrt_llm/quantization/layers.py` and the
`preprocess_weights` step of `tensorrt_llm/models/modeling_utils.py`), so a rank file loads
with `load_state_dict(strict=True)`. Shapes are per rank, like every other runtime module:

| quant_algo | tensor | dtype | shape (this rank) |
|---|---|---|---|
| W8A16 | weight | int8 | [in, out] |
| | per_channel_scale | float | [out] |
| W4A16_AWQ | weight | int8, two int4 per byte | [out/2, in] (out rows 2j / 2j+1 in the low / high nibble) |
| | weights_scaling_factor | float | [out, in/group_size] |
| | prequant_scaling_factor | float | [1, in] |
| W8A8_SQ_PER_CHANNEL | weight | int8 | [out, in] |
| | weights_scaling_factor | float32 | [out] |
| | activation_scaling_factor | float32 | [1] |
| | prequant_scaling_factor | float | [in] |

Decode steps read W8A16 and W4A16_AWQ weights through `serve.runtime.fused`, which dequantizes
in registers (`kernel_weights` says how); `matmul` is the path for everything else (prefill,
CPU): it dequantizes on the fly (W8A16 on CPU float32 uses `torch._weight_int8pack_mm`).
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from serve.runtime.fused import INT4, INT8, Weights
from serve.runtime.layers import Linear

# TensorRT-LLM's own default when a checkpoint names no exclude_modules (quantization/quantize.py).
TRTLLM_DEFAULT_EXCLUDE = [
    "*lm_head",
    "*router",
    "*vocab_embedding",
    "*position_embedding",
    "*block_embedding",
    "*shared_expert_gate",
]


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Inverse of `serve.runtime.fused.unpack_int4`: int [out, in] in [-8, 7] (out even) -> int8 [out/2, in]."""
    if values.shape[0] % 2:
        raise ValueError(f"cannot pack {values.shape[0]} output rows two per byte")
    v = values.to(torch.int16) & 0xF
    return (v[0::2] | (v[1::2] << 4)).to(torch.uint8).view(torch.int8)


class QuantLinear(Linear):
    """Base of the quantized linears: same `in/out_features`, `bias` and `reduce` as the `Linear` it replaces."""

    quant_algo: str = ""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, reduce: bool = False,
                 device: torch.device | str | None = None):  # fmt: skip
        with torch.device(device) if device is not None else contextlib.nullcontext():
            super().__init__(in_features, out_features, bias=bias, reduce=reduce)
        del self.weight  # replaced by quantized buffers named like the checkpoint tensors

    @classmethod
    def from_linear(cls, linear: Linear, quantization: Mapping) -> QuantLinear:
        device = linear.bias.device if linear.bias is not None else linear.weight.device
        return cls(linear.in_features, linear.out_features, linear.bias is not None, linear.reduce, device)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The float [out, in] weight this layer multiplies by (after any input scaling)."""
        return self.kernel_weights().dequantized(dtype)


class WeightOnlyInt8Linear(QuantLinear):
    """W8A16: int8 weight [in, out] with one scale per output channel."""

    quant_algo = "W8A16"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, reduce: bool = False,
                 device: torch.device | str | None = None):  # fmt: skip
        super().__init__(in_features, out_features, bias, reduce, device)
        self.register_buffer(
            "weight", torch.empty(in_features, out_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("per_channel_scale", torch.empty(out_features, device=device))

    def kernel_weights(self) -> Weights:
        return Weights(INT8, self.weight, self.per_channel_scale)

    def relayout(self) -> None:
        """Keep the [in, out] weight but store it K-contiguous (out-major): a decode step's kernel then
        reads each output channel as one run of bytes, not 16-byte pieces of many rows (TRT-LLM also
        re-lays out weight-only weights for its kernels at load)."""
        self.weight = self.weight.t().contiguous().t()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.float32:
            y = torch._weight_int8pack_mm(
                x.reshape(-1, x.shape[-1]).contiguous(), self.weight.t().contiguous(), self.per_channel_scale
            )
            return y.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dequantized_weight(x.dtype))


class AWQInt4Linear(QuantLinear):
    """W4A16_AWQ: x * prequant_scaling_factor, then a group-wise int4 weight (symmetric, no zero point)."""

    quant_algo = "W4A16_AWQ"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, reduce: bool = False,
                 device: torch.device | str | None = None, group_size: int = 128):  # fmt: skip
        if out_features % 2 or in_features % group_size:
            raise ValueError(f"W4A16_AWQ needs an even out_features and in_features divisible by group_size "
                             f"{group_size}; got [{out_features}, {in_features}]")  # fmt: skip
        super().__init__(in_features, out_features, bias, reduce, device)
        self.group_size = group_size
        self.register_buffer(
            "weight", torch.empty(out_features // 2, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer(
            "weights_scaling_factor", torch.empty(out_features, in_features // group_size, device=device)
        )
        self.register_buffer("prequant_scaling_factor", torch.empty(1, in_features, device=device))

    @classmethod
    def from_linear(cls, linear: Linear, quantization: Mapping) -> QuantLinear:
        if quantization.get("has_zero_point"):
            raise ValueError("W4A16_AWQ with zero points is not supported (ModelOpt AWQ is symmetric)")
        device = linear.bias.device if linear.bias is not None else linear.weight.device
        return cls(linear.in_features, linear.out_features, linear.bias is not None, linear.reduce, device,
                   group_size=int(quantization.get("group_size") or 128))  # fmt: skip

    def kernel_weights(self) -> Weights:
        pre = self.prequant_scaling_factor.reshape(-1)
        return Weights(INT4, self.weight, self.weights_scaling_factor, pre, self.group_size)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.prequant_scaling_factor.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype))


class SmoothQuantLinear(QuantLinear):
    """W8A8_SQ_PER_CHANNEL: smoothed input quantized per tensor (static scale), int8 weight per channel.

    Matches TensorRT-LLM's `Int8SmoothQuantLinear`: x * prequant_scaling_factor, quantize/dequantize
    with `activation_scaling_factor`, times the dequantized int8 weight.
    """

    quant_algo = "W8A8_SQ_PER_CHANNEL"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, reduce: bool = False,
                 device: torch.device | str | None = None):  # fmt: skip
        super().__init__(in_features, out_features, bias, reduce, device)
        self.register_buffer(
            "weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("weights_scaling_factor", torch.empty(out_features, device=device))
        self.register_buffer("activation_scaling_factor", torch.empty(1, device=device))
        self.register_buffer("prequant_scaling_factor", torch.empty(in_features, device=device))

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype) * self.weights_scaling_factor.to(dtype)[:, None]

    def kernel_weights(self) -> None:
        return None  # int8 activations: the reference path

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The smoothed input after its int8 round trip (what the int8 GEMM effectively sees)."""
        x = x * self.prequant_scaling_factor.to(x.dtype)
        scale = self.activation_scaling_factor.to(x.dtype)
        return torch.clamp(torch.round(x / scale), -128, 127) * scale

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.dequantized_weight(x.dtype))


QUANT_LINEARS: dict[str, type[QuantLinear]] = {
    cls.quant_algo: cls for cls in (WeightOnlyInt8Linear, AWQInt4Linear, SmoothQuantLinear)
}


def is_excluded(name: str, patterns: list[str]) -> bool:
    """TensorRT-LLM's rule: a module stays in floating point when a pattern fnmatches its full name."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def exclude_patterns(quantization: Mapping) -> list[str]:
    """The checkpoint's `exclude_modules`, or TensorRT-LLM's default list when it names none."""
    return list(quantization.get("exclude_modules") or TRTLLM_DEFAULT_EXCLUDE)


def apply_quantization(model: torch.nn.Module, quantization: Mapping) -> None:
    """Swap every `Linear` not matched by `exclude_modules` for the quantized class of `quant_algo`.

    In place; in/out features, bias and the row-parallel `reduce` flag are kept, and the new
    buffers live on the replaced module's device (`meta` while the loader builds the model).
    """
    algo = quantization.get("quant_algo")
    if algo not in QUANT_LINEARS:
        raise ValueError(f"unsupported quant_algo {algo!r}; supported: {', '.join(QUANT_LINEARS)}")
    if quantization.get("kv_cache_quant_algo"):
        raise ValueError(f"kv_cache_quant_algo {quantization['kv_cache_quant_algo']!r} is not supported")
    cls, patterns = QUANT_LINEARS[algo], exclude_patterns(quantization)
    for name, module in list(model.named_modules()):
        if type(module) is not Linear or is_excluded(name, patterns):
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, cls.from_linear(module, quantization))


def kernel_layout(model: torch.nn.Module) -> None:
    """Re-lay out loaded quantized weights in memory for the decode kernels (shapes unchanged)."""
    for module in model.modules():
        if isinstance(module, WeightOnlyInt8Linear):
            module.relayout()
