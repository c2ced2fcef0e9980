"""Load a converted TensorRT-LLM enc-dec checkpoint into the PyTorch runtime, one TP rank.

Each rank reads only `rank{r}.safetensors` of each component. Quantized checkpoints get
their `Linear` modules swapped for the matching quantized ones before loading.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from serve.runtime import tp
from serve.runtime.model import Decoder, Encoder, ModelConfig

log = logging.getLogger(__name__)

# Written by TRT-LLM's converter as a second name of the token embedding; the runtime uses one.
DUPLICATE_NAMES = ("embedding.vocab_embedding.weight",)


def default_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def resolve_dtype(
    ckpt_dtype: torch.dtype, device: torch.device, dtype: str | torch.dtype | None
) -> torch.dtype:
    """The compute dtype: as asked, else the checkpoint's (fp16 on CPU runs as fp32: CPU fp16 GEMMs are slow)."""
    if dtype is not None:
        return getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if device.type == "cpu" and ckpt_dtype == torch.float16:
        return torch.float32
    return ckpt_dtype


def load_component(component_dir: Path, device: torch.device, dtype: str | torch.dtype | None = None):
    """Build the Encoder or Decoder of `component_dir` for this process's TP rank."""
    config = json.loads((component_dir / "config.json").read_text())
    cfg = ModelConfig.from_config(config)
    if cfg.tp_size != tp.world_size():
        raise ValueError(
            f"{component_dir} was converted for tp_size={cfg.tp_size}; this process group has "
            f"{tp.world_size()} rank(s)"
        )
    cfg = dataclasses.replace(cfg, dtype=resolve_dtype(cfg.dtype, device, dtype))
    with torch.device("meta"):
        module = Decoder(cfg) if cfg.is_decoder else Encoder(cfg)
    quant = config.get("quantization") or {}
    if quant.get("quant_algo"):
        from serve.runtime.quant import apply_quantization

        apply_quantization(module, quant)
    state = load_file(component_dir / f"rank{tp.rank()}.safetensors")
    for name in DUPLICATE_NAMES:
        state.pop(name, None)
    state = {k: v.to(cfg.dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(state, strict=True, assign=True)
    module = module.to(device).eval()
    if quant.get("quant_algo"):
        from serve.runtime.quant import kernel_layout

        kernel_layout(module)
    return module


def load_model(
    ckpt_dir: str | Path, device: torch.device | str | None = None, dtype: str | torch.dtype | None = None
) -> tuple[Encoder, Decoder]:
    ckpt_dir = Path(ckpt_dir)
    device = torch.device(device) if device is not None else default_device()
    encoder = load_component(ckpt_dir / "encoder", device, dtype)
    decoder = load_component(ckpt_dir / "decoder", device, dtype)
    return encoder, decoder
