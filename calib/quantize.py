"""ModelOpt glue: configure and run `mtq.quantize` on the HF mBART, then read the calibrated state back
as TensorRT-LLM tensors.

What comes from ModelOpt: the calibration algorithms (max for INT8 weight-only, AWQ-lite search,
SmoothQuant smoothing with `alpha`), the resmoothing of fused q/k/v (`preprocess_linear_fusion`),
the scale read-out (`get_*_scaling_factor`) and the integer quantization and int4 packing
(`to_quantized_weight`). What is ours: the per-language forward loop, the HF -> TRT-LLM name
mapping and fusion order, the TensorRT-LLM layouts (`calib.trtllm_quant`), and one fix-up:
after resmoothing a fused SmoothQuant qkv to a shared pre-quant scale, the shared activation
amax is recomputed from ModelOpt's per-channel statistics (`_amax_for_smoothing`) instead of
taking the maximum of the members' stale ones, so no member's input is clipped.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from calib.trtllm_quant import QUANT_MODES, LinearGroup

Loop = Callable[[Any], None]


def _mtq():
    with warnings.catch_warnings():  # modelopt warns about untested transformers versions on import
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq
    return mtq


def modelopt_config(mode: str, alpha: float = 0.5, group_size: int = 128,
                    disabled_modules: Iterable[str] = ()) -> dict:  # fmt: skip
    """The ModelOpt config for a CLI mode, with `alpha` / `group_size` set and some HF linears left alone.

    Handles both `quant_cfg` forms: the ordered list of `{"quantizer_name": ...}` entries (ModelOpt
    >= 0.40, later entries win) and the older `{pattern: cfg}` dict.
    """
    mtq = _mtq()
    cfg = copy.deepcopy(getattr(mtq, QUANT_MODES[mode][1]))
    entries = cfg["quant_cfg"]
    if isinstance(entries, dict):
        weight = [entries["*weight_quantizer"]]
    else:
        weight = [e.get("cfg") or {} for e in entries if e.get("quantizer_name") == "*weight_quantizer"]
    if mode == "int4_awq":
        for w in weight:
            w["block_sizes"][-1] = group_size
    if mode == "w8a8_sq":
        cfg["algorithm"] = {"method": "smoothquant", "alpha": alpha}
    for name in disabled_modules:
        if isinstance(entries, dict):
            entries[f"{name}.*"] = {"enable": False}
        else:
            entries.append({"quantizer_name": f"{name}.*", "enable": False})
    return cfg


def quantize(model: torch.nn.Module, mode: str, forward_loop: Loop, alpha: float = 0.5, group_size: int = 128,
             disabled_modules: Iterable[str] = (), verbose: bool = True) -> torch.nn.Module:  # fmt: skip
    """Calibrate and fake-quantize `model` in place with ModelOpt (its progress lines hidden unless `verbose`)."""
    mtq = _mtq()
    cfg = modelopt_config(mode, alpha, group_size, disabled_modules)
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with warnings.catch_warnings(), quiet:
        warnings.simplefilter("ignore")
        return mtq.quantize(model, cfg, forward_loop=forward_loop)


def _members(model: torch.nn.Module, group: LinearGroup) -> list[torch.nn.Module]:
    return [model.get_submodule(name) for name in group.members]


def is_quantized(module: torch.nn.Module) -> bool:
    wq = getattr(module, "weight_quantizer", None)
    return wq is not None and wq.is_enabled


@torch.no_grad()
def fuse_groups(model: torch.nn.Module, groups: list[LinearGroup], quant_algo: str) -> None:
    """Give the members of each fused TRT-LLM module (q/k/v) one shared pre-quant scale and input amax."""
    from modelopt.torch.export.quant_utils import preprocess_linear_fusion

    for group in groups:
        mods = _members(model, group)
        if len(mods) < 2 or not all(is_quantized(m) for m in mods):
            continue
        if quant_algo == "W8A16":
            continue  # per-output-channel scales: concatenating the members is already exact
        preprocess_linear_fusion(mods)
        if quant_algo == "W8A8_SQ_PER_CHANNEL":
            pqs = mods[0].input_quantizer.pre_quant_scale.float()
            amax = max((m.input_quantizer._amax_for_smoothing.float() * pqs).amax() for m in mods)
            for m in mods:
                m.input_quantizer.amax = amax.to(m.input_quantizer.amax.dtype)


@torch.no_grad()
def export_group(model: torch.nn.Module, group: LinearGroup, quant_algo: str, dtype: torch.dtype,
                 group_size: int = 128) -> dict[str, torch.Tensor]:  # fmt: skip
    """Full (unsharded) TRT-LLM tensors `<suffix>: tensor` of one quantized module, bias excluded.

    The members are concatenated along the output axis in TRT-LLM's fused order (q, k, v).
    """
    from modelopt.torch.export import quant_utils as qu
    from modelopt.torch.export.model_config import (
        QUANTIZATION_INT4_AWQ,
        QUANTIZATION_INT8_SQ,
        QUANTIZATION_INT8_WO,
    )

    mods = _members(model, group)
    weights = [m.weight.float() for m in mods]
    scales = [qu.get_weight_scaling_factor(m).float() for m in mods]
    if quant_algo == "W8A16":
        scale = torch.cat([s.reshape(-1) for s in scales])
        q = qu.to_quantized_weight(torch.cat(weights), scale, QUANTIZATION_INT8_WO)
        return {"weight": q.t().contiguous(), "per_channel_scale": scale.to(dtype)}
    if quant_algo == "W4A16_AWQ":
        w = torch.cat(weights)
        scale = torch.cat([s.reshape(wm.shape[0], -1) for s, wm in zip(scales, weights, strict=True)])
        packed = qu.to_quantized_weight(w, scale, QUANTIZATION_INT4_AWQ, block_size=group_size).view(
            torch.int8
        )
        return {
            "weight": packed.contiguous(),
            "weights_scaling_factor": scale.to(dtype),
            "prequant_scaling_factor": _shared_prequant(mods).reshape(1, -1).to(dtype),
        }
    if quant_algo == "W8A8_SQ_PER_CHANNEL":
        scale = torch.cat([s.reshape(-1) for s in scales])
        q = qu.to_quantized_weight(torch.cat(weights), scale, QUANTIZATION_INT8_SQ)
        act = torch.stack([qu.get_activation_scaling_factor(m).float().reshape(()) for m in mods])
        if not torch.equal(act, act[:1].expand_as(act)):
            raise RuntimeError(f"{group.module}: fused members disagree on the activation scale")
        return {
            "weight": q.contiguous(),
            "weights_scaling_factor": scale,
            "activation_scaling_factor": act[:1].clone(),
            "prequant_scaling_factor": _shared_prequant(mods).reshape(-1).to(dtype),
        }
    raise ValueError(f"unsupported quant_algo {quant_algo}")


def _shared_prequant(mods: list[torch.nn.Module]) -> torch.Tensor:
    from modelopt.torch.export.quant_utils import get_prequant_scaling_factor

    pqs = [get_prequant_scaling_factor(m).float() for m in mods]
    if any(not torch.equal(p, pqs[0]) for p in pqs[1:]):
        raise RuntimeError("fused members have different pre-quant scales (fuse_groups not applied)")
    return pqs[0]
