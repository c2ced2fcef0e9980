"""The ModelOpt algorithms earn their keep on activations with outlier channels, through our export.

A linear layer sees inputs where a few channels are ~30x larger than the rest (the pattern that
makes LLM/MT activations hard to quantize). AWQ must beat round-to-nearest INT4 with the same
group size, and SmoothQuant must beat naive per-tensor W8A8; AWQ and SmoothQuant are measured
through our exported TRT-LLM tensors and the runtime's quantized layers.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from calib.quantize import export_group, quantize
from calib.trtllm_quant import LinearGroup
from serve.runtime.quant import QUANT_LINEARS

IN, OUT, GROUP = 256, 64, 128
OUTLIERS = [3, 77, 140, 201]
GROUP_OF_ONE = LinearGroup("encoder", "transformer.layers.0.mlp.fc", ("proj",))


class _One(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(IN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _inputs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, IN, generator=g)
    x[..., OUTLIERS] *= 30.0
    return x


@pytest.fixture(scope="module")
def layer() -> _One:
    torch.manual_seed(0)
    return _One().eval()


def _calibrated(model: nn.Module, cfg_or_mode, **kwargs) -> nn.Module:
    import modelopt.torch.quantization as mtq

    calib = _inputs(8, seed=1)

    def loop(m: nn.Module) -> None:
        with torch.no_grad():
            for x in calib:
                m(x[None])

    if isinstance(cfg_or_mode, str):
        return quantize(copy.deepcopy(model), cfg_or_mode, loop, **kwargs)
    return mtq.quantize(copy.deepcopy(model), cfg_or_mode, forward_loop=loop)


def _rel_err(fn, ref: nn.Module) -> float:
    x = _inputs(4, seed=2)
    with torch.no_grad():
        y, yq = ref(x), fn(x)
    return float((yq - y).norm() / y.norm())


def _runtime_layer(qmodel: nn.Module, algo: str) -> nn.Module:
    tensors = export_group(qmodel, GROUP_OF_ONE, algo, torch.float32, GROUP)
    kwargs = {"group_size": GROUP} if algo == "W4A16_AWQ" else {}
    layer = QUANT_LINEARS[algo](IN, OUT, bias=True, **kwargs)
    layer.load_state_dict({**tensors, "bias": qmodel.proj.bias.detach()}, strict=True)
    return layer


def test_awq_beats_round_to_nearest_int4(layer):
    import modelopt.torch.quantization as mtq

    awq = _calibrated(layer, "int4_awq", group_size=GROUP)
    rtn_cfg = copy.deepcopy(mtq.INT4_AWQ_CFG)
    rtn_cfg["algorithm"] = "max"  # same int4 block-128 weight quantizer, no activation-aware scaling
    rtn = _calibrated(layer, rtn_cfg)
    runtime = _runtime_layer(awq, "W4A16_AWQ")
    err_awq, err_rtn = _rel_err(runtime, layer), _rel_err(rtn, layer)
    assert err_awq < 0.8 * err_rtn, (err_awq, err_rtn)
    assert abs(_rel_err(awq, layer) - err_awq) < 1e-4  # the export reproduces ModelOpt's fake-quant layer


def test_smoothquant_beats_naive_w8a8(layer):
    import modelopt.torch.quantization as mtq

    sq = _calibrated(layer, "w8a8_sq", alpha=0.5)
    naive = _calibrated(layer, mtq.INT8_DEFAULT_CFG)  # per-channel weights, per-tensor activations, max
    runtime = _runtime_layer(sq, "W8A8_SQ_PER_CHANNEL")
    err_sq, err_naive = _rel_err(runtime, layer), _rel_err(naive, layer)
    assert err_sq < 0.9 * err_naive, (err_sq, err_naive)
    assert abs(_rel_err(sq, layer) - err_sq) < 1e-4


def test_smoothquant_alpha_reaches_modelopt():
    from calib.quantize import modelopt_config

    assert modelopt_config("w8a8_sq", alpha=0.8)["algorithm"] == {"method": "smoothquant", "alpha": 0.8}
    cfg = modelopt_config("int4_awq", group_size=64, disabled_modules=["model.encoder.layers.0.fc1"])
    blocks = [
        e["cfg"]["block_sizes"] for e in cfg["quant_cfg"] if e.get("quantizer_name") == "*weight_quantizer"
    ]
    assert blocks == [{-1: 64, "type": "static"}]
    assert cfg["quant_cfg"][-1] == {"quantizer_name": "model.encoder.layers.0.fc1.*", "enable": False}
