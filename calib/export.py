"""Write a quantized checkpoint exactly the way `python -m convert` writes a float one.

The float tensors come from the converter's own loader (`Loader.convert`); only the weights of
quantized modules are replaced by their quantized tensors, and the components' `quantization`
block is filled in. Sharding is the converter's `write_component` with the quantized layouts
registered by `calib.trtllm_quant`, so TP rules live in one table for both.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from calib.quantize import export_group, is_quantized
from calib.trtllm_quant import LinearGroup, is_excluded, quantization_block
from convert.__main__ import project_version, sha256
from convert.checkpoint import write_component
from convert.registry import Component


def check_mapping(
    components: dict[str, Component], hf_model: torch.nn.Module, groups: list[LinearGroup]
) -> None:
    """Fail loudly if the HF -> TRT-LLM linear mapping disagrees with the converter's output."""
    for g in groups:
        tensors = components[g.component].tensors
        name = f"{g.module}.weight"
        want = torch.cat([hf_model.get_submodule(m).weight for m in g.members])
        if name not in tensors or not torch.equal(tensors[name], want.to(tensors[name].dtype)):
            raise RuntimeError(
                f"converter layout changed: {g.component}/{name} is not {' + '.join(g.members)}"
            )


def quantized_components(
    fp_components: dict[str, Component], qmodel: torch.nn.Module, groups: list[LinearGroup], quant_algo: str,
    exclude: list[str], group_size: int, alpha: float | None = None,
) -> dict[str, Component]:  # fmt: skip
    """Copies of the float components with every non-excluded linear quantized from `qmodel`'s state."""
    block = quantization_block(quant_algo, exclude, group_size, alpha)
    out = {
        name: Component({**c.config, "quantization": dict(block)}, dict(c.tensors))
        for name, c in fp_components.items()
    }
    for g in groups:
        if is_excluded(g.module, exclude):
            continue
        if not all(is_quantized(qmodel.get_submodule(m)) for m in g.members):
            raise RuntimeError(f"ModelOpt left {g.module} unquantized but it is not in exclude_modules")
        comp = out[g.component]
        dtype = comp.tensors[f"{g.module}.weight"].dtype
        del comp.tensors[f"{g.module}.weight"]
        for suffix, tensor in export_group(qmodel, g, quant_algo, dtype, group_size).items():
            comp.tensors[f"{g.module}.{suffix}"] = tensor
    return out


def checkpoint_size(ckpt_dir: Path) -> int:
    """Bytes of all component rank files (what a TP deployment loads)."""
    return sum(p.stat().st_size for p in Path(ckpt_dir).glob("*/rank*.safetensors"))


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def write_checkpoint(
    out: Path, components: dict[str, Component], tp_size: int, loader: Any, tokenizer: Any, record: dict,
    progress: Any = None,
) -> dict[str, str]:  # fmt: skip
    """Components + tokenizer/ + languages.json + conversion.json into `out` (a fresh directory).

    `record` is merged into conversion.json next to the converter's own fields; returns the
    sha256 of every rank file by relative path.
    """
    files: dict[str, str] = {}
    for name, comp in components.items():
        for path in write_component(out / name, comp.config, comp.tensors, tp_size, progress):
            files[path.relative_to(out).as_posix()] = sha256(path)
    tokenizer.save_pretrained(out / "tokenizer")
    loader.write_extras(out, tokenizer, components)
    first = next(iter(components.values())).config
    conversion = {
        "architecture": loader.architecture,
        "trtllm_architecture": {n or ".": c.config["architecture"] for n, c in components.items()},
        "dtype": first["dtype"],
        "tp_size": tp_size,
        "quantization": first["quantization"],
        "project_version": project_version(),
        "transformers_version": _version("transformers"),
        "modelopt_version": _version("nvidia-modelopt"),
        "torch_version": torch.__version__,
        **record,
        "sha256": files,
    }
    (out / "conversion.json").write_text(json.dumps(conversion, indent=2) + "\n")
    return files


class StagingDir:
    """A temporary sibling of `out` that becomes `out` only on `commit()`; removed on any failure."""

    def __init__(self, out: Path):
        self.out = out
        out.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        self.path.chmod(0o777 & ~umask)

    def commit(self) -> Path:
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            self.out.rename(old)
        self.path.rename(self.out)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        return self.out

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
