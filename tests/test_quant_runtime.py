"""serve.runtime.quant: int4 packing, the quantized Linear classes and the module surgery."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from serve.runtime.fused import unpack_int4
from serve.runtime.layers import Linear
from serve.runtime.quant import (
    AWQInt4Linear,
    SmoothQuantLinear,
    WeightOnlyInt8Linear,
    apply_quantization,
    pack_int4,
)


def test_int4_packing_roundtrip_and_matches_modelopt_nibble_order():
    from modelopt.torch.export.quant_utils import pack_int4_in_uint8

    torch.manual_seed(0)
    q = torch.randint(-8, 8, (6, 256), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    # ModelOpt quantizes w / scale; with unit scales its packing of q must equal ours byte for byte.
    ones = torch.ones(6, 2)
    theirs = pack_int4_in_uint8(q.float(), ones, 128).view(torch.int8)
    assert torch.equal(theirs, pack_int4(q))
    assert int(pack_int4(torch.tensor([[-1], [2]]))[0, 0].view(torch.uint8)) == 0x2F  # row 0 low, row 1 high


def _state(layer: nn.Module, **tensors) -> None:
    layer.load_state_dict({**{k: v for k, v in layer.state_dict().items()}, **tensors}, strict=True)


def test_weight_only_int8_matches_dequantized_reference():
    torch.manual_seed(0)
    layer = WeightOnlyInt8Linear(32, 24)
    w = torch.randint(-127, 128, (32, 24), dtype=torch.int8)  # [in, out]
    scale, bias = torch.rand(24) / 100, torch.randn(24)
    _state(layer, weight=w, per_channel_scale=scale, bias=bias)
    x = torch.randn(3, 5, 32)
    ref = x @ (w.float() * scale) + bias
    torch.testing.assert_close(layer(x), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer(x.double()), ref.double(), rtol=1e-4, atol=1e-4)  # the dequantize path


def test_awq_int4_matches_dequantized_reference():
    torch.manual_seed(0)
    layer = AWQInt4Linear(256, 8, bias=False, group_size=128)
    q = torch.randint(-8, 8, (8, 256), dtype=torch.int8)
    scales, pqs = torch.rand(8, 2) / 10, torch.rand(1, 256) + 0.5
    _state(layer, weight=pack_int4(q), weights_scaling_factor=scales, prequant_scaling_factor=pqs)
    x = torch.randn(4, 256)
    w = q.float() * scales.repeat_interleave(128, dim=1)
    torch.testing.assert_close(layer(x), (x * pqs) @ w.t(), rtol=1e-5, atol=1e-5)


def test_smoothquant_quantizes_the_smoothed_input_per_tensor():
    torch.manual_seed(0)
    layer = SmoothQuantLinear(16, 4)
    w = torch.randint(-127, 128, (4, 16), dtype=torch.int8)
    wsf, act, pqs, bias = torch.rand(4) / 50, torch.tensor([0.02]), torch.rand(16) + 0.5, torch.randn(4)
    _state(layer, weight=w, weights_scaling_factor=wsf, activation_scaling_factor=act, prequant_scaling_factor=pqs,
           bias=bias)  # fmt: skip
    x = torch.randn(5, 16)
    xq = torch.clamp(torch.round(x * pqs / 0.02), -128, 127) * 0.02
    torch.testing.assert_close(layer(x), xq @ (w.float() * wsf[:, None]).t() + bias)
    big = torch.full((1, 16), 100.0)  # saturates at 127 * scale instead of overflowing
    assert torch.all(layer.quantize_input(big) <= 127 * 0.02 + 1e-6)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.Module()
        self.attention.qkv = Linear(256, 768)
        self.attention.dense = Linear(256, 256, reduce=True)
        self.mlp = nn.Module()
        self.mlp.fc = Linear(256, 512)
        self.lm_head = Linear(256, 100, bias=False)


@pytest.mark.parametrize("algo", ["W8A16", "W4A16_AWQ", "W8A8_SQ_PER_CHANNEL"])
def test_apply_quantization_swaps_linears_and_keeps_excluded_ones(algo):
    with torch.device("meta"):
        model = _Block()
    quant = {"quant_algo": algo, "group_size": 128, "exclude_modules": ["*lm_head", "mlp.fc"]}
    apply_quantization(model, quant)
    qkv, dense = model.attention.qkv, model.attention.dense
    assert type(qkv).quant_algo == algo and type(dense).quant_algo == algo
    assert (qkv.in_features, qkv.out_features, qkv.reduce) == (256, 768, False)
    assert (dense.in_features, dense.out_features, dense.reduce) == (256, 256, True)
    assert type(model.mlp.fc) is Linear and type(model.lm_head) is Linear
    assert qkv.weight.device.type == "meta" and qkv.weight.dtype == torch.int8
    # a state dict with the checkpoint's names loads strictly
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}
    model.load_state_dict(state, strict=True, assign=True)


def test_apply_quantization_defaults_and_errors():
    with torch.device("meta"):
        model = _Block()
    apply_quantization(model, {"quant_algo": "W8A16", "exclude_modules": None})  # TRT-LLM's default list
    assert type(model.lm_head) is Linear and isinstance(model.mlp.fc, WeightOnlyInt8Linear)
    with pytest.raises(ValueError, match="unsupported quant_algo 'FP8'"):
        apply_quantization(_Block(), {"quant_algo": "FP8"})
    with pytest.raises(ValueError, match="kv_cache_quant_algo"):
        apply_quantization(_Block(), {"quant_algo": "W8A16", "kv_cache_quant_algo": "INT8"})
    with pytest.raises(ValueError, match="group_size"):
        AWQInt4Linear(64, 8, group_size=128)
