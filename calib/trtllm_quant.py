"""The quantized half of the TensorRT-LLM checkpoint contract: config block, tensor layouts, TP rules.

Verified against NVIDIA/TensorRT-LLM (`tensorrt_llm/quantization/layers.py`, `quantize.py`,
`mode.py`, and `preprocess_weights` in `tensorrt_llm/models/modeling_utils.py`, which runs inside
`from_checkpoint` before the weights are loaded) and ModelOpt's TRT-LLM export
(`modelopt/torch/export/quant_utils.py`: `to_quantized_weight`, `pack_int4_in_uint8`):

* W8A16 -> `WeightOnlyQuantLinear`: `weight` int8 [in, out], `per_channel_scale` [out] (model
  dtype) = amax / 127 per output channel. TensorRT-LLM loads int8 weights as they are (its
  `weight_only_quantize_dict` only quantizes float ones), and its GEMM wants them interleaved by
  `preprocess_weights_for_mixed_gemm`: that step needs TensorRT-LLM and runs at engine build.
* W4A16_AWQ -> `WeightOnlyGroupwiseQuantLinear` (ModelOpt format; `preprocess_weights` transposes,
  interleaves and casts it): `weight` int8 [out/2, in] (two signed int4 per byte, output rows 2j
  low nibble, 2j+1 high nibble), `weights_scaling_factor` [out, in/group] = block amax / 7,
  `prequant_scaling_factor` [1, in] (the AWQ scale multiplied into the input).
* W8A8_SQ_PER_CHANNEL -> `Int8SmoothQuantLinear` (not a plugin algo, so TensorRT-LLM's
  out-of-the-box path): `weight` int8 [out, in], `weights_scaling_factor` float32 [out],
  `activation_scaling_factor` float32 [1] (static per-tensor), `prequant_scaling_factor` [in].

`exclude_modules` uses TensorRT-LLM's rule (fnmatch on the full module name) and, when given,
replaces TensorRT-LLM's default list, so it always carries embeddings and `lm_head` itself.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from convert.checkpoint import Role, module_role, register_quant_axes

# CLI name -> (TensorRT-LLM quant_algo, ModelOpt config attribute)
QUANT_MODES: dict[str, tuple[str, str]] = {
    "int8_wo": ("W8A16", "INT8_WEIGHT_ONLY_CFG"),
    "int4_awq": ("W4A16_AWQ", "INT4_AWQ_CFG"),
    "w8a8_sq": ("W8A8_SQ_PER_CHANNEL", "INT8_SMOOTHQUANT_CFG"),
}
AWQ_GROUP_SIZE = 128
# Kept in floating point by default: embeddings, layer norms and the output projection.
DEFAULT_EXCLUDE = [
    "*lm_head",
    "*vocab_embedding",
    "*position_embedding",
    "*ln_embed",
    "*ln_f",
    "*layernorm",
]

# suffix -> (axis of output features, axis of input features) of the stored tensor.
TENSOR_AXES: dict[str, dict[str, tuple[int | None, int | None]]] = {
    "W8A16": {"weight": (1, 0), "per_channel_scale": (0, None)},
    "W4A16_AWQ": {"weight": (0, 1), "weights_scaling_factor": (0, 1), "prequant_scaling_factor": (None, 1)},
    "W8A8_SQ_PER_CHANNEL": {
        "weight": (0, 1),
        "weights_scaling_factor": (0, None),
        "activation_scaling_factor": (None, None),
        "prequant_scaling_factor": (None, 0),
    },
}


def register_layouts() -> None:
    """Teach the converter's shard/unshard the quantized layouts (idempotent)."""
    for algo, suffixes in TENSOR_AXES.items():
        for suffix, (out, inp) in suffixes.items():
            register_quant_axes(algo, suffix, out=out, inp=inp)


register_layouts()


def quantization_block(quant_algo: str, exclude_modules: list[str], group_size: int = AWQ_GROUP_SIZE,
                       alpha: float | None = None) -> dict:  # fmt: skip
    """The config.json `quantization` object for one component.

    Only fields of TensorRT-LLM's `QuantConfig` (a strict pydantic model in current releases):
    `group_size` for AWQ, `smoothquant_val` (the alpha used) for SmoothQuant.
    """
    block: dict = {"quant_algo": quant_algo, "kv_cache_quant_algo": None}
    if quant_algo == "W4A16_AWQ":
        block["group_size"] = group_size
    if quant_algo == "W8A8_SQ_PER_CHANNEL" and alpha is not None:
        block["smoothquant_val"] = alpha
    block |= {
        "has_zero_point": False,
        "pre_quant_scale": quant_algo == "W4A16_AWQ",
        "exclude_modules": list(exclude_modules),
    }
    return block


def is_excluded(module: str, patterns: list[str]) -> bool:
    """TensorRT-LLM's rule (fnmatchcase on the full module name), as the runtime applies it."""
    return any(fnmatch.fnmatchcase(module, p) for p in patterns)


@dataclass(frozen=True)
class LinearGroup:
    """One TRT-LLM linear module and the HF linears fused into it, in output-row order."""

    component: str  # "encoder" / "decoder"
    module: str  # TRT-LLM module name, e.g. transformer.layers.0.attention.qkv
    members: tuple[str, ...]  # HF module names, e.g. model.encoder.layers.0.self_attn.q_proj

    @property
    def role(self) -> Role:
        return module_role(self.module)

    @property
    def key(self) -> str:
        return f"{self.component}/{self.module}"


def mbart_linear_groups(encoder_layers: int, decoder_layers: int) -> list[LinearGroup]:
    """Every linear of an HF mBART and the TRT-LLM module it becomes (the converter's mbart loader names)."""
    groups = []
    for comp, n in (("encoder", encoder_layers), ("decoder", decoder_layers)):
        attentions = [("self_attention" if comp == "decoder" else "attention", "self_attn")]
        if comp == "decoder":
            attentions.append(("cross_attention", "encoder_attn"))
        for i in range(n):
            dst, src = f"transformer.layers.{i}", f"model.{comp}.layers.{i}"
            for trt, hf in attentions:
                qkv = tuple(f"{src}.{hf}.{p}_proj" for p in "qkv")
                groups.append(LinearGroup(comp, f"{dst}.{trt}.qkv", qkv))
                groups.append(LinearGroup(comp, f"{dst}.{trt}.dense", (f"{src}.{hf}.out_proj",)))
            groups.append(LinearGroup(comp, f"{dst}.mlp.fc", (f"{src}.fc1",)))
            groups.append(LinearGroup(comp, f"{dst}.mlp.proj", (f"{src}.fc2",)))
    groups.append(LinearGroup("decoder", "lm_head", ("lm_head",)))
    return groups


def check_tp_layout(quant_algo: str, groups: list[LinearGroup], shapes: dict[str, tuple[int, int]],
                    tp_size: int, group_size: int) -> None:  # fmt: skip
    """Raise ValueError when a quantized layer cannot be split `tp_size` ways in its stored layout.

    `shapes` maps TRT-LLM module keys to their full [out, in]. Only W4A16_AWQ adds constraints
    beyond the converter's: each rank's input slice must hold whole groups, and each rank's output
    rows (per q/k/v for qkv) must pair up into bytes.
    """
    if quant_algo != "W4A16_AWQ":
        return
    for g in groups:
        out, inp = shapes[g.key]
        if g.role is Role.ROW:
            if inp % (tp_size * group_size):
                raise ValueError(
                    f"{g.module}: input width {inp} split {tp_size} ways is not a multiple of the AWQ "
                    f"group size {group_size}"
                )
        elif inp % group_size:
            raise ValueError(
                f"{g.module}: input width {inp} is not a multiple of the AWQ group size {group_size}"
            )
        per_rank = out // (3 * tp_size) if g.role is Role.QKV else out // tp_size
        if per_rank % 2:
            raise ValueError(
                f"{g.module}: {per_rank} output rows per rank cannot be packed two int4 per byte"
            )
