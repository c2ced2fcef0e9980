"""The TensorRT-LLM checkpoint format: the tensor-parallel split rule, the shard writer and the readers.

A component directory (`<out>/encoder`, `<out>/decoder`, or a BERT-family checkpoint root) holds
`config.json` and `rank{r}.safetensors` for r < tp_size, rank r holding only its own shards.

The whole TP rule is two tables:

* `MODULE_ROLES` says how a module (the TRT-LLM name without its last component) is parallel:
  fused `qkv` (per-rank heads), `column` (output features split), `row` (input features split),
  `vocab` (like column, after zero-padding the vocabulary to a multiple of tp_size), or
  `replicated` (the default: embeddings, layer norms, classifier heads, row-parallel biases).
* `Axes` tables say, per tensor suffix (`weight`, `bias`, ...), which axis of the stored tensor
  holds the module's output features and which its input features. Float rules live in
  `FLOAT_AXES`; quantized layouts differ (W8A16 stores `weight` as int8 [in, out] plus
  `per_channel_scale` [out]) and are added per `quant_algo` with `register_quant_axes`, which
  is the one extension point for calib/: the role table and `shard` stay untouched.

`shard` and `unshard` are exact inverses, so `load_merged` gives back the full tensors bit for bit.
"""

from __future__ import annotations

import enum
import fnmatch
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"


class Role(str, enum.Enum):
    QKV = "qkv"
    COLUMN = "column"
    ROW = "row"
    VOCAB = "vocab"
    REPLICATED = "replicated"


# First match wins; a module that matches nothing is replicated on every rank.
MODULE_ROLES: list[tuple[re.Pattern[str], Role]] = [
    (re.compile(r"(^|\.)(attention|self_attention|cross_attention)\.qkv$"), Role.QKV),
    (re.compile(r"(^|\.)(attention|self_attention|cross_attention)\.dense$"), Role.ROW),
    (re.compile(r"(^|\.)mlp\.(fc|gate)$"), Role.COLUMN),
    (re.compile(r"(^|\.)mlp\.proj$"), Role.ROW),
    (re.compile(r"^lm_head$"), Role.VOCAB),
]


@dataclass(frozen=True)
class Axes:
    """Which axis of a stored tensor holds the module's output / input features (None: no such axis).

    A column/qkv/vocab module splits the `out` axis, a row module the `inp` axis; a tensor
    without the split axis (e.g. a row-parallel bias) is replicated.
    """

    out: int | None
    inp: int | None


# nn.Linear layout: weight [out, in], bias [out].
FLOAT_AXES: dict[str, Axes] = {"weight": Axes(out=0, inp=1), "bias": Axes(out=0, inp=None)}

# quant_algo -> suffix -> Axes, filled by the quantization code (calib/) via register_quant_axes.
QUANT_AXES: dict[str, dict[str, Axes]] = {}


def register_quant_axes(quant_algo: str, suffix: str, out: int | None, inp: int | None) -> None:
    """Declare the layout of `<module>.<suffix>` in checkpoints quantized with `quant_algo`.

    Example (W8A16): `register_quant_axes("W8A16", "weight", out=1, inp=0)` for the int8 [in, out]
    weight and `register_quant_axes("W8A16", "per_channel_scale", out=0, inp=None)` for its [out]
    scales. Suffixes not registered for an algorithm fall back to `FLOAT_AXES` (biases stay float).
    """
    QUANT_AXES.setdefault(quant_algo, {})[suffix] = Axes(out=out, inp=inp)


def module_role(module: str) -> Role:
    """The parallel role of a TRT-LLM module name such as `transformer.layers.0.attention.qkv`."""
    for pattern, role in MODULE_ROLES:
        if pattern.search(module):
            return role
    return Role.REPLICATED


def _is_excluded(module: str, quantization: Mapping | None) -> bool:
    patterns = (quantization or {}).get("exclude_modules") or []
    return any(fnmatch.fnmatch(module, p) or fnmatch.fnmatch(module.rsplit(".", 1)[-1], p) for p in patterns)


def plan(name: str, quantization: Mapping | None = None) -> tuple[Role, Axes | None]:
    """(role, axes) of tensor `name` under the config's `quantization` block.

    Axes is None for replicated tensors. Raises ValueError when a split tensor has no axis rule,
    rather than guessing a layout.
    """
    module, _, suffix = name.rpartition(".")
    role = module_role(module)
    if role is Role.REPLICATED:
        return role, None
    algo = (quantization or {}).get("quant_algo")
    table = FLOAT_AXES
    if algo and not _is_excluded(module, quantization):
        if algo not in QUANT_AXES:
            raise ValueError(f"no TP layout registered for quant_algo {algo} (see register_quant_axes)")
        table = {**FLOAT_AXES, **QUANT_AXES[algo]}
    if suffix not in table:
        raise ValueError(f"no TP layout for tensor suffix '{suffix}' of {name} (see register_quant_axes)")
    return role, table[suffix]


def padded_vocab(vocab_size: int, tp_size: int) -> int:
    """Vp = ceil(V / T) * T: lm_head rows are padded with zeros so that every rank gets V/T rows."""
    return -(-vocab_size // tp_size) * tp_size


def _split_axis(role: Role, axes: Axes) -> int | None:
    return axes.inp if role is Role.ROW else axes.out


def _chunk(name: str, t: torch.Tensor, dim: int, rank: int, tp_size: int) -> torch.Tensor:
    if t.shape[dim] % tp_size:
        raise ValueError(f"{name}: dim {dim} of size {t.shape[dim]} is not divisible by tp_size {tp_size}")
    return t.chunk(tp_size, dim=dim)[rank]


def shard(
    name: str, tensor: torch.Tensor, rank: int, tp_size: int, quantization: Mapping | None = None
) -> torch.Tensor:
    """Rank `rank`'s part of the full tensor `name` (a view where possible; callers copy).

    qkv: the output axis is [q; k; v] stacked; each rank takes its heads' rows of each of the three,
    so a rank holds q_r, k_r, v_r. vocab: the output axis is zero-padded to `padded_vocab` first.
    """
    role, axes = plan(name, quantization)
    dim = None if axes is None else _split_axis(role, axes)
    if dim is None or tp_size == 1:
        return tensor
    if role is Role.QKV:
        t = tensor.movedim(dim, 0)
        if t.shape[0] % 3:
            raise ValueError(f"{name}: fused qkv axis of size {t.shape[0]} is not a multiple of 3")
        t = t.reshape(3, t.shape[0] // 3, *t.shape[1:])
        t = _chunk(name, t, 1, rank, tp_size)
        return t.reshape(-1, *t.shape[2:]).movedim(0, dim)
    if role is Role.VOCAB:
        pad = padded_vocab(tensor.shape[dim], tp_size) - tensor.shape[dim]
        if pad:
            shape = list(tensor.shape)
            shape[dim] = pad
            tensor = torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)
    return _chunk(name, tensor, dim, rank, tp_size)


def unshard(
    name: str,
    pieces: list[torch.Tensor],
    vocab_size: int | None = None,
    quantization: Mapping | None = None,
) -> torch.Tensor:
    """The full tensor from every rank's piece (inverse of `shard`); vocab padding is cut to `vocab_size`."""
    role, axes = plan(name, quantization)
    dim = None if axes is None else _split_axis(role, axes)
    if dim is None:
        return pieces[0]
    if role is Role.QKV:
        parts = [p.movedim(dim, 0) for p in pieces]
        parts = [p.reshape(3, p.shape[0] // 3, *p.shape[1:]) for p in parts]
        full = torch.cat(parts, dim=1)
        return full.reshape(-1, *full.shape[2:]).movedim(0, dim)
    full = torch.cat(pieces, dim=dim)
    if role is Role.VOCAB and vocab_size is not None:
        full = full.narrow(dim, 0, vocab_size)
    return full


def rank_path(component_dir: Path | str, rank: int) -> Path:
    return Path(component_dir) / f"rank{rank}.safetensors"


def mapping(tp_size: int) -> dict:
    """The config `mapping` block (pipeline parallelism is not used)."""
    return {"world_size": tp_size, "tp_size": tp_size, "pp_size": 1}


def write_component(
    component_dir: Path | str,
    config: Mapping,
    tensors_full: Mapping[str, torch.Tensor],
    tp_size: int,
    progress: Callable[[int], object] | None = None,
) -> list[Path]:
    """Write `config.json` (with `mapping` set for `tp_size`) and one safetensors file per rank.

    Tensors are written as given (dtype is the caller's business); each shard is copied into its
    own storage because safetensors refuses tensors that share memory. `progress(1)` is called
    for each (tensor, rank) shard (e.g. `tqdm.update`). Returns the rank files written.
    """
    component_dir = Path(component_dir)
    component_dir.mkdir(parents=True, exist_ok=True)
    config = {**config, "mapping": mapping(tp_size)}
    quantization = config.get("quantization")
    for name in tensors_full:  # fail before writing anything if a tensor has no rule
        plan(name, quantization)
    (component_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    paths = []
    for rank in range(tp_size):
        shards = {}
        for name, full in tensors_full.items():
            shards[name] = shard(name, full, rank, tp_size, quantization).clone(
                memory_format=torch.contiguous_format
            )
            if progress is not None:
                progress(1)
        path = rank_path(component_dir, rank)
        save_file(shards, str(path), metadata={"format": "pt"})
        path.chmod(_file_mode())
        paths.append(path)
    return paths


def _file_mode() -> int:
    """rw for everyone the umask allows (safetensors creates files 0600, too tight for a serving user)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def read_config(component_dir: Path | str) -> dict:
    """The component's `config.json` as a dict."""
    return json.loads((Path(component_dir) / CONFIG_NAME).read_text())


def tp_size_of(config: Mapping) -> int:
    return int(config.get("mapping", {}).get("tp_size", 1))


def load_rank(component_dir: Path | str, rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s tensors exactly as stored (TRT-LLM names, sharded shapes)."""
    path = rank_path(component_dir, rank)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return load_file(str(path))


def load_merged(component_dir: Path | str) -> dict[str, torch.Tensor]:
    """Every tensor reassembled from all TP ranks to its full shape, vocabulary padding removed."""
    config = read_config(component_dir)
    ranks = [load_rank(component_dir, r) for r in range(tp_size_of(config))]
    quantization = config.get("quantization")
    vocab_size = config.get("vocab_size")
    return {name: unshard(name, [r[name] for r in ranks], vocab_size, quantization) for name in ranks[0]}
