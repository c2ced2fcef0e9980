"""Data-free round-to-nearest weight-only quantization of a converted float checkpoint.

Writes the same TRT-LLM tensors as `python -m calib` (W8A16, or W4A16_AWQ with unit pre-quant
scales), without ModelOpt or calibration data. For W8A16 this is what calibration computes
anyway (weight-only max scales ignore activations); for INT4 it is plain RTN, not AWQ. Used
where ModelOpt is unavailable (the GPU benchmark machine) and for smoke tests: kernel speed
depends on the format, not on the scales.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from calib.trtllm_quant import AWQ_GROUP_SIZE, DEFAULT_EXCLUDE, QUANT_MODES, is_excluded, quantization_block
from convert.checkpoint import load_merged, read_config, write_component
from serve.runtime.quant import pack_int4

LINEAR_SUFFIXES = ("qkv", "dense", "mlp.fc", "mlp.proj")


def quantize_weight(w: torch.Tensor, quant_algo: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """TRT-LLM tensors of one float [out, in] weight (bias excluded); on the GPU when there is one."""
    w = w.to("cuda" if torch.cuda.is_available() else "cpu").float()
    if quant_algo == "W8A16":
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8)
        q = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
        return {"weight": q.t().contiguous().cpu(), "per_channel_scale": scale.to(dtype).cpu()}
    if quant_algo == "W4A16_AWQ":
        groups = w.reshape(w.shape[0], -1, AWQ_GROUP_SIZE)
        scale = (groups.abs().amax(dim=2) / 7).clamp(min=1e-8)
        q = torch.round(groups / scale[:, :, None]).clamp(-8, 7).reshape(w.shape)
        return {
            "weight": pack_int4(q).cpu(),
            "weights_scaling_factor": scale.to(dtype).cpu(),
            "prequant_scaling_factor": torch.ones(1, w.shape[1], dtype=dtype),
        }
    raise ValueError(f"RTN supports W8A16 and W4A16_AWQ, not {quant_algo}")


def quantize_checkpoint_rtn(src: Path, out: Path, mode: str, exclude: list[str] | None = None,
                            lm_head: bool = False) -> Path:  # fmt: skip
    """Quantize every linear of `src` (a converted enc-dec checkpoint) not matched by `exclude`.

    `lm_head=True` quantizes the output projection too (half or more of the bytes a decode step
    reads at mBART-50's vocabulary), at a quality cost to measure before deploying it.
    """
    quant_algo = QUANT_MODES[mode][0]
    patterns = [p for p in DEFAULT_EXCLUDE if not (lm_head and p == "*lm_head")] + list(exclude or [])
    out.mkdir(parents=True)
    for comp in ("encoder", "decoder"):
        config = read_config(src / comp)
        dtype = getattr(torch, config["dtype"])
        tensors = {}
        for name, t in load_merged(src / comp).items():
            module, _, suffix = name.rpartition(".")
            linear = module.endswith(LINEAR_SUFFIXES) or module == "lm_head"
            if suffix == "weight" and linear and not is_excluded(module, patterns):
                tensors |= {f"{module}.{k}": v for k, v in quantize_weight(t, quant_algo, dtype).items()}
            else:
                tensors[name] = t
        config["quantization"] = quantization_block(quant_algo, patterns)
        write_component(out / comp, config, tensors, config["mapping"]["tp_size"])
    for extra in ("tokenizer", "languages.json"):
        (shutil.copytree if (src / extra).is_dir() else shutil.copy)(src / extra, out / extra)
    (out / "conversion.json").write_text(
        json.dumps({"source": str(src), "quantization": f"{mode} (RTN)"}) + "\n"
    )
    return out
