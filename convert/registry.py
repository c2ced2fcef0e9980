"""One loader class per Hugging Face architecture, registered by name (CTranslate2-converter style).

A loader maps an HF state dict to full (unsharded) TRT-LLM tensors with small per-module helpers
(`set_linear`, `set_layernorm`, `set_attention`, ...); sharding is `convert.checkpoint`'s job.
`convert_hf_model` is the entry point other code (calib/) reuses:

    components = convert_hf_model(hf_model, torch.float16)
    for name, comp in components.items():  # "encoder"/"decoder" for mBART, "" for BERT-family
        write_component(out / name, comp.config, comp.tensors, tp_size)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from convert.errors import ConvertError

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}

# HF activation_function -> TRT-LLM hidden_act (TRT-LLM's ACT2FN names).
HIDDEN_ACTS = {
    "gelu": "gelu",
    "relu": "relu",
    "gelu_new": "gelu_new",
    "gelu_fast": "gelu_fast",
    "gelu_pytorch_tanh": "gelu_pytorch_tanh",
    "silu": "silu",
    "swish": "silu",
}

NO_QUANTIZATION = {"quant_algo": None, "kv_cache_quant_algo": None}

_LOADERS: dict[str, type[Loader]] = {}


@dataclass
class Component:
    """One TRT-LLM checkpoint component: its config.json dict and full tensors by TRT-LLM name."""

    config: dict
    tensors: dict[str, torch.Tensor]


def register_loader(*architectures: str) -> Callable[[type[Loader]], type[Loader]]:
    """Class decorator: make `cls` the loader of the given HF `architectures` names."""

    def wrap(cls: type[Loader]) -> type[Loader]:
        for arch in architectures:
            _LOADERS[arch] = cls
        return cls

    return wrap


def supported_architectures() -> list[str]:
    _import_loaders()
    return sorted(_LOADERS)


def get_loader(architecture: str | None) -> Loader:
    """A fresh loader for an HF architecture name; ConvertError listing the supported ones otherwise."""
    _import_loaders()
    if architecture not in _LOADERS:
        raise ConvertError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(supported_architectures())}"
        )
    loader = _LOADERS[architecture]()
    loader.architecture = architecture
    return loader


def _import_loaders() -> None:
    import convert.loaders  # noqa: F401  (registers the loaders)


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def hidden_act(activation: str) -> str:
    if activation not in HIDDEN_ACTS:
        raise ConvertError(f"unsupported activation function {activation!r}")
    return HIDDEN_ACTS[activation]


class Loader:
    """Base class: HF config + state dict -> `{component: Component}` of full tensors.

    Subclasses set `hf_class` (the transformers class to load weights with, `hf_kwargs` for its
    from_pretrained) and implement
    `check_tp`, `build` and optionally `write_extras`. The `set_*` helpers read `self.sd` and
    write `self.dtype`-cast, independent copies into the `out` dict they are given.
    """

    hf_class: str = ""
    hf_kwargs: dict = {}  # extra from_pretrained arguments (e.g. skip a pooler that is not converted)
    architecture: str = ""

    def __init__(self) -> None:
        self.sd: Mapping[str, torch.Tensor] = {}
        self.dtype: torch.dtype = torch.float32

    def convert(self, hf_config: Any, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict:
        """Full TRT-LLM tensors (cast to `dtype`) and configs, keyed by component sub-directory."""
        self.sd, self.dtype = state_dict, dtype
        return self.build(hf_config)

    def build(self, hf_config: Any) -> dict[str, Component]:
        raise NotImplementedError

    def check_tp(self, hf_config: Any, tp_size: int) -> None:
        """Raise ConvertError when `tp_size` cannot split this model (heads, FFN width)."""
        raise NotImplementedError

    def write_extras(self, out_dir: Path, tokenizer: Any, components: Mapping[str, Component]) -> None:
        """Project metadata next to the components (e.g. languages.json); nothing by default."""

    # -- helpers: one HF module -> one TRT-LLM module --------------------------------------------
    def get(self, key: str) -> torch.Tensor:
        if key not in self.sd:
            raise ConvertError(f"tensor {key} missing from the checkpoint")
        return self.sd[key]

    def has(self, key: str) -> bool:
        return key in self.sd

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        """A `self.dtype` copy that shares no storage with the source or any other output tensor."""
        return t.detach().to(self.dtype, copy=True).contiguous()

    def set_tensor(self, out: dict, dst: str, src: str) -> None:
        out[dst] = self.cast(self.get(src))

    def set_linear(self, out: dict, dst: str, src: str) -> None:
        """`src.{weight,bias}` ([out, in], [out]) -> `dst.{weight,bias}`; bias only if present."""
        self.set_tensor(out, f"{dst}.weight", f"{src}.weight")
        if self.has(f"{src}.bias"):
            self.set_tensor(out, f"{dst}.bias", f"{src}.bias")

    def set_layernorm(self, out: dict, dst: str, src: str) -> None:
        self.set_tensor(out, f"{dst}.weight", f"{src}.weight")
        self.set_tensor(out, f"{dst}.bias", f"{src}.bias")

    def set_qkv(self, out: dict, dst: str, q: str, k: str, v: str) -> None:
        """Fuse three linears into `dst.qkv` as [q; k; v] along the output axis (full, unsharded)."""
        out[f"{dst}.weight"] = self.cast(torch.cat([self.get(f"{m}.weight") for m in (q, k, v)], dim=0))
        if self.has(f"{q}.bias"):
            out[f"{dst}.bias"] = self.cast(torch.cat([self.get(f"{m}.bias") for m in (q, k, v)], dim=0))


def require_divisible(what: str, size: int, tp_size: int) -> None:
    if size % tp_size:
        raise ConvertError(f"--tp-size {tp_size} does not divide the {what} ({size})")


def convert_hf_model(hf_model: Any, dtype: torch.dtype | str, architecture: str | None = None) -> dict:
    """`{component: Component}` for a loaded transformers model (what calib/ reuses before quantizing).

    `architecture` defaults to the model's class name.
    """
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    loader = get_loader(architecture or type(hf_model).__name__)
    return loader.convert(hf_model.config, hf_model.state_dict(), dtype)
