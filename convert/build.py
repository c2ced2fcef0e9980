"""Build the two TensorRT-LLM engines (encoder, decoder) from a converted or calibrated checkpoint.

    python -m convert.build --checkpoint <ckpt> --output <engine dir> [--dry-run] [overrides]

One `trtllm-build` run per component; each run builds every rank of that component from the
checkpoint's `mapping` (TensorRT-LLM's `tensorrt_llm/commands/build.py` loops over all
`world_size` ranks itself, `--workers` only parallelises that loop over GPUs), so there is no
per-rank handling here. Flag values come from the checkpoint's `config.json` files (dtype,
max_position_embeddings, mapping, quantization) with the defaults below; explicit flags and
`--set KEY=VALUE` override them, `--set` last.

The engine directory is made self-contained for serving: `encoder/` and `decoder/` (engines and
their config.json, written by trtllm-build), plus a copy of the checkpoint's `tokenizer/` and
`languages.json`, plus `build_info.json` recording the source checkpoint and the exact commands.

Quantized checkpoints need no extra trtllm-build flags (those plugins are not even CLI options):
`build()` in `tensorrt_llm/builder.py` reads the checkpoint's quant mode and sets
`weight_only_quant_matmul_plugin` (W8A16) or `weight_only_groupwise_quant_matmul_plugin`
(W4A16_AWQ) to the model dtype; W8A8_SQ_PER_CHANNEL is not in `W8A8_SQ_PLUGIN_LIST`
(`tensorrt_llm/quantization/mode.py`), so it builds through TensorRT's own INT8 layers, with the
builder's int8 flag set from the quant mode. `--gemm_plugin` only affects the unquantized GEMMs.
What does differ is weight layout:
TensorRT-LLM's loader (`PretrainedModel.from_checkpoint` -> `preprocess_weights` in
`tensorrt_llm/models/modeling_utils.py`) runs `preprocess_weights_for_mixed_gemm` on W4A16_AWQ
int4 weights itself, but for W8A16 it only quantizes *floating-point* weights
(`weight_only_quantize_dict` skips tensors that are already int8). Our W8A16 checkpoints hold plain
int8 [in, out] weights, so this tool stages a copy of the checkpoint in which each int8 weight that
has a `per_channel_scale` is passed through TensorRT-LLM's `preprocess_weights_for_mixed_gemm`
(row permutation, interleaving and the +128 bias for the target GPU's SM) before trtllm-build
reads it. That step imports tensorrt_llm and must run on the GPU model the engine is built for.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from convert.errors import ConvertError

COMPONENTS = ("encoder", "decoder")
ARCHITECTURES = {"encoder": "EncoderModel", "decoder": "DecoderModel"}
DTYPES = ("float16", "bfloat16", "float32")

DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_BEAM_WIDTH = 4
DEFAULT_MAX_NUM_TOKENS = 4096
# mBART-50's forced decoder prefix is [decoder_start, <tgt_lang>] (design doc section 4).
DEFAULT_DECODER_MAX_INPUT_LEN = 2

# quant_algo values this tool knows how to build. W8A16 needs the staging step (module docstring);
# the others load as written. FP8 follows the enc-dec README (plugins "auto").
SUPPORTED_QUANT = (None, "W8A16", "W4A16_AWQ", "W8A8_SQ_PER_CHANNEL", "FP8")
STAGED_QUANT = ("W8A16",)
STAGING_DIR = ".staging"

# trtllm-build flags that take no value (argparse store_true): `--set strip_plan=true` emits the
# bare flag, `=false` drops it.
STORE_TRUE_FLAGS = frozenset(
    {"strip_plan", "weight_sparsity", "weight_streaming", "fast_build", "enable_debug_output", "dry_run",
     "monitor_memory", "gather_context_logits", "gather_generation_logits", "gather_all_token_logits"}
)  # fmt: skip
_KEY_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# The limits that have explicit CLI flags (`--max-batch-size` ...), as resolve_settings names them.
CLI_LIMITS = ("max_batch_size", "max_beam_width", "max_num_tokens", "max_input_len", "max_encoder_input_len",
              "max_seq_len", "decoder_max_input_len", "workers")  # fmt: skip


class MissingToolError(ConvertError):
    """TensorRT-LLM (the trtllm-build CLI or the Python package) is not installed here: exit 2."""


@dataclass(frozen=True)
class Component:
    """One checkpoint component (`encoder` or `decoder`) as its config.json describes it."""

    name: str
    config: dict

    @property
    def dtype(self) -> str:
        return self.config["dtype"]

    @property
    def quantization(self) -> dict:
        return self.config.get("quantization") or {}

    @property
    def quant_algo(self) -> str | None:
        return self.quantization.get("quant_algo")

    @property
    def tp_size(self) -> int:
        return int(self.config["mapping"].get("tp_size", 1))

    @property
    def pp_size(self) -> int:
        return int(self.config["mapping"].get("pp_size", 1))

    @property
    def world_size(self) -> int:
        mapping = self.config["mapping"]
        return int(mapping.get("world_size", self.tp_size * self.pp_size))


@dataclass
class BuildPlan:
    """Everything needed to run (or print) the two trtllm-build commands."""

    checkpoint: Path
    output: Path
    components: dict[str, Component]
    flags: dict[str, dict[str, str | bool]]  # component -> flag -> value (True: bare flag), in order
    settings: dict[str, int | str | None]
    sets: list[str] = field(default_factory=list)
    trtllm_build: str = "trtllm-build"

    @property
    def staged(self) -> bool:
        """True when weights must be preprocessed into a staging copy before trtllm-build."""
        return any(c.quant_algo in STAGED_QUANT for c in self.components.values())

    def checkpoint_dir(self, name: str) -> Path:
        """The directory trtllm-build reads for a component (the staging copy when staged)."""
        if self.components[name].quant_algo in STAGED_QUANT:
            return self.output / STAGING_DIR / name
        return self.checkpoint / name

    def argv(self, name: str) -> list[str]:
        """The trtllm-build command line of one component."""
        argv = [self.trtllm_build, "--checkpoint_dir", str(self.checkpoint_dir(name)),
                "--output_dir", str(self.output / name)]  # fmt: skip
        for key, value in self.flags[name].items():
            argv.append(f"--{key}")
            if value is not True:
                argv.append(str(value))
        return argv

    def script(self) -> str:
        """The exact commands, shell-quoted, one per line, with `#` comments saying what they are."""
        lines = []
        for name in COMPONENTS:
            comp = self.components[name]
            lines.append(
                f"# {name}: {ARCHITECTURES[name]}, dtype={comp.dtype}, quant_algo={comp.quant_algo or 'none'}, "
                f"tp_size={comp.tp_size} (trtllm-build builds all {comp.world_size} rank(s))"
            )
            if comp.quant_algo in STAGED_QUANT:
                lines.append(
                    f"# stage {self.checkpoint / name} -> {self.checkpoint_dir(name)}: int8 weights through "
                    "tensorrt_llm preprocess_weights_for_mixed_gemm (on the target GPU)"
                )
            lines.append(shlex.join(self.argv(name)))
        return "\n".join(lines)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConvertError(f"{path} not found: not a TensorRT-LLM encoder-decoder checkpoint") from None
    except (OSError, ValueError) as e:
        raise ConvertError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path} is not a JSON object")
    return data


def read_checkpoint(checkpoint: Path) -> dict[str, Component]:
    """The two components of a TRT-LLM enc-dec checkpoint, validated enough to build from."""
    if not checkpoint.is_dir():
        raise ConvertError(f"checkpoint directory {checkpoint} does not exist")
    comps = {}
    for name in COMPONENTS:
        path = checkpoint / name / "config.json"
        cfg = _read_json(path)
        arch = cfg.get("architecture")
        if arch != ARCHITECTURES[name]:
            raise ConvertError(f"{path}: architecture is {arch!r}, expected {ARCHITECTURES[name]!r}")
        if cfg.get("dtype") not in DTYPES:
            raise ConvertError(f"{path}: dtype {cfg.get('dtype')!r} is not one of {', '.join(DTYPES)}")
        if not isinstance(cfg.get("mapping"), dict):
            raise ConvertError(f"{path}: no 'mapping' block")
        comp = Component(name, cfg)
        if comp.quant_algo not in SUPPORTED_QUANT:
            supported = ", ".join(str(q) for q in SUPPORTED_QUANT if q)
            raise ConvertError(
                f"{path}: quant_algo {comp.quant_algo} is not supported (supported: {supported})"
            )
        if comp.pp_size != 1:
            raise ConvertError(
                f"{path}: pp_size {comp.pp_size}; the C++ enc-dec runtime supports only pp_size 1"
            )
        comps[name] = comp
    enc, dec = comps["encoder"], comps["decoder"]
    if enc.tp_size != dec.tp_size:
        raise ConvertError(f"encoder tp_size {enc.tp_size} != decoder tp_size {dec.tp_size}")
    if enc.dtype != dec.dtype:
        raise ConvertError(f"encoder dtype {enc.dtype} != decoder dtype {dec.dtype}; convert them together")
    return comps


def parse_sets(items: Sequence[str]) -> dict[str | None, dict[str, str]]:
    """`--set [encoder.|decoder.]KEY=VALUE` items -> {component or None (both): {key: value}}."""
    out: dict[str | None, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        comp, dot, bare = key.strip().rpartition(".")
        bare = bare.lstrip("-").replace("-", "_")
        if not sep or (dot and comp not in COMPONENTS) or not _KEY_RE.match(bare):
            raise ConvertError(
                f"bad --set {item!r}: expected [encoder.|decoder.]KEY=VALUE, e.g. max_batch_size=32"
            )
        if bare in ("checkpoint_dir", "output_dir"):
            raise ConvertError(f"--set {bare} is not allowed: use --checkpoint / --output")
        out.setdefault(comp or None, {})[bare] = value.strip()
    return out


def _max_position_embeddings(comp: Component, flag: str) -> int:
    value = comp.config.get("max_position_embeddings")
    if not isinstance(value, int) or value <= 0:
        raise ConvertError(f"{comp.name}/config.json has no max_position_embeddings: pass {flag}")
    return value


def resolve_settings(comps: dict[str, Component], cli: dict[str, int | None]) -> dict[str, int | str | None]:
    """Build limits from config.json defaults and explicit CLI values (CLI wins)."""
    enc, dec = comps["encoder"], comps["decoder"]

    def pick(key: str, default: Callable[[], int]) -> int:
        value = cli.get(key)
        return default() if value is None else value

    max_input_len = pick("max_input_len", lambda: _max_position_embeddings(enc, "--max-input-len"))
    s = {
        "dtype": dec.dtype,
        "quant_algo": dec.quant_algo,
        "encoder_quant_algo": enc.quant_algo,
        "kv_cache_quant_algo": dec.quantization.get("kv_cache_quant_algo"),
        "tp_size": dec.tp_size,
        "max_batch_size": pick("max_batch_size", lambda: DEFAULT_MAX_BATCH_SIZE),
        "max_beam_width": pick("max_beam_width", lambda: DEFAULT_MAX_BEAM_WIDTH),
        "max_num_tokens": pick("max_num_tokens", lambda: DEFAULT_MAX_NUM_TOKENS),
        "max_input_len": max_input_len,
        "max_encoder_input_len": pick("max_encoder_input_len", lambda: max_input_len),
        "decoder_max_input_len": pick("decoder_max_input_len", lambda: DEFAULT_DECODER_MAX_INPUT_LEN),
        "max_seq_len": pick("max_seq_len", lambda: _max_position_embeddings(dec, "--max-seq-len")),
        "workers": pick("workers", lambda: dec.world_size),
    }
    for key in CLI_LIMITS:
        if int(s[key]) <= 0:
            raise ConvertError(f"{key} must be positive, got {s[key]}")
    if s["decoder_max_input_len"] >= s["max_seq_len"]:
        raise ConvertError(
            f"decoder max_input_len {s['decoder_max_input_len']} leaves no room to generate "
            f"within max_seq_len {s['max_seq_len']}"
        )
    return s


def default_flags(comp: Component, settings: dict) -> dict[str, str | bool]:
    """The flags of one component before --set, in the order they are printed."""
    # The enc-dec README's FP8 notes ask for "auto" plugins; otherwise the checkpoint dtype.
    plugin = "auto" if comp.quant_algo == "FP8" else comp.dtype
    # Context FMHA kernels exist for fp16/bf16 only (enc-dec README); fp32 builds run unfused attention.
    fmha = "disable" if comp.dtype == "float32" else "enable"
    encoder = comp.name == "encoder"
    flags: dict[str, str | bool] = {
        "max_batch_size": str(settings["max_batch_size"]),
        "max_beam_width": str(settings["max_beam_width"]),
        # EncoderModel requires max_seq_len == max_input_len (builder._init_max_seq_len asserts it).
        "max_input_len": str(settings["max_input_len"] if encoder else settings["decoder_max_input_len"]),
        "max_seq_len": str(settings["max_input_len"] if encoder else settings["max_seq_len"]),
    }
    if not encoder:
        flags["max_encoder_input_len"] = str(settings["max_encoder_input_len"])
    flags.update({
        "max_num_tokens": str(settings["max_num_tokens"]),
        "gemm_plugin": plugin,
        "bert_attention_plugin": plugin,
        "gpt_attention_plugin": plugin,
        "context_fmha": fmha,
        "remove_input_padding": "enable",
        # The encoder keeps no KV cache (README: --paged_kv_cache disable); the decoder's paged cache
        # is what the C++ Executor's in-flight batching needs.
        "paged_kv_cache": "disable" if encoder else "enable",
    })  # fmt: skip
    if int(settings["workers"]) > 1:
        flags["workers"] = str(settings["workers"])
    return flags


def _apply_sets(flags: dict[str, str | bool], sets: dict[str, str]) -> None:
    for key, value in sets.items():
        if value == "" or (key in STORE_TRUE_FLAGS and value.lower() in ("false", "0", "no")):
            flags.pop(key, None)
        elif key in STORE_TRUE_FLAGS and value.lower() in ("true", "1", "yes"):
            flags[key] = True
        else:
            flags[key] = value


def plan_build(
    checkpoint: Path,
    output: Path,
    cli: dict[str, int | None] | None = None,
    sets: Sequence[str] = (),
    trtllm_build: str = "trtllm-build",
) -> BuildPlan:
    """Read the checkpoint and derive both commands; raises ConvertError on bad input."""
    checkpoint, output = Path(checkpoint).resolve(), Path(output).resolve()
    comps = read_checkpoint(checkpoint)
    settings = resolve_settings(comps, cli or {})
    parsed = parse_sets(sets)
    flags = {}
    for name in COMPONENTS:
        f = default_flags(comps[name], settings)
        own = {**parsed.get(None, {}), **parsed.get(name, {})}
        _apply_sets(f, own)
        if name == "encoder" and "max_seq_len" not in own and "max_input_len" in f:
            f["max_seq_len"] = f["max_input_len"]  # keep the encoder's two lengths equal
        flags[name] = f
    return BuildPlan(checkpoint, output, comps, flags, settings, list(sets), trtllm_build)


def _trtllm_weight_preprocessor(dtype: str) -> Callable:
    """TensorRT-LLM's own int8 weight-only layout transform for the current GPU (needs tensorrt_llm)."""
    import torch
    from tensorrt_llm.quantization.functional import preprocess_weights_for_mixed_gemm

    act = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float16}[dtype]

    def preprocess(weight: torch.Tensor) -> torch.Tensor:
        return preprocess_weights_for_mixed_gemm(weight.contiguous(), torch.int8, act).contiguous()

    return preprocess


def stage_weight_only(src: Path, dst: Path, dtype: str, preprocess: Callable) -> list[str]:
    """Copy component `src` to `dst`, passing each int8 `<linear>.weight` that has a
    `<linear>.per_channel_scale` through `preprocess` and casting its scales to `dtype`.

    Returns the preprocessed tensor names (of rank 0). Tensors kept in floating point
    (`exclude_modules`, biases, norms) are copied unchanged.
    """
    import torch
    from safetensors.torch import load_file, save_file

    scale_dtype = getattr(torch, dtype)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / "config.json", dst / "config.json")
    done: list[str] = []
    for rank_file in sorted(src.glob("rank*.safetensors")):
        tensors = load_file(str(rank_file))
        names = []
        for name, t in list(tensors.items()):
            scale = name[: -len("weight")] + "per_channel_scale"
            if name.endswith(".weight") and t.dtype == torch.int8 and scale in tensors:
                tensors[name] = preprocess(t)
                tensors[scale] = tensors[scale].to(scale_dtype).contiguous()
                names.append(name)
        save_file(tensors, str(dst / rank_file.name))
        if rank_file.name == "rank0.safetensors":
            done = names
    return done


def _check_build_inputs(plan: BuildPlan) -> None:
    for name, comp in plan.components.items():
        missing = [
            r
            for r in range(comp.world_size)
            if not (plan.checkpoint / name / f"rank{r}.safetensors").is_file()
        ]
        if missing:
            raise ConvertError(
                f"{plan.checkpoint / name} lacks rank{missing[0]}.safetensors (world_size {comp.world_size})"
            )
    for extra in ("tokenizer", "languages.json"):
        if not (plan.checkpoint / extra).exists():
            raise ConvertError(f"{plan.checkpoint} has no {extra}: the engine dir could not be served")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _trtllm_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("tensorrt_llm", "tensorrt-llm"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def build_info(plan: BuildPlan, preprocessed: dict[str, list[str]]) -> dict:
    """What build_info.json records: the source checkpoint, the settings and the exact commands."""
    dec = plan.components["decoder"].config
    files = {}
    for name in COMPONENTS:
        for f in sorted((plan.checkpoint / name).glob("rank*.safetensors")):
            files[f"{name}/{f.name}"] = f.stat().st_size
    return {
        "checkpoint": str(plan.checkpoint),
        "checkpoint_config_sha256": {n: _sha256(plan.checkpoint / n / "config.json") for n in COMPONENTS},
        "checkpoint_files": files,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tensorrt_llm_version": _trtllm_version(),
        "settings": plan.settings,
        "set": plan.sets,
        "commands": {n: plan.argv(n) for n in COMPONENTS},
        "weight_preprocessing": (
            {
                "op": "tensorrt_llm.quantization.functional.preprocess_weights_for_mixed_gemm",
                "tensors": preprocessed,
            }
            if preprocessed
            else None
        ),
        "special_tokens": {
            k: dec.get(k) for k in ("decoder_start_token_id", "eos_token_id", "bos_token_id", "pad_token_id")
        },
    }


def run_build(
    plan: BuildPlan, exe: str, preprocessor_factory: Callable = _trtllm_weight_preprocessor
) -> None:
    """Stage (if needed), run both trtllm-build commands, then make the engine dir self-contained."""
    _check_build_inputs(plan)
    plan.output.mkdir(parents=True, exist_ok=True)
    preprocessed: dict[str, list[str]] = {}
    if plan.staged:
        try:
            preprocess = preprocessor_factory(str(plan.settings["dtype"]))
        except ImportError as e:
            raise MissingToolError(
                f"{', '.join(STAGED_QUANT)} weights need tensorrt_llm to preprocess ({e})"
            ) from None
        for name in COMPONENTS:
            if plan.components[name].quant_algo in STAGED_QUANT:
                preprocessed[name] = stage_weight_only(
                    plan.checkpoint / name, plan.checkpoint_dir(name), str(plan.settings["dtype"]), preprocess
                )
    for name in COMPONENTS:
        argv = plan.argv(name)
        print(f"[convert.build] {name}: {shlex.join(argv)}", flush=True)
        rc = subprocess.run([exe, *argv[1:]], check=False).returncode
        if rc != 0:
            raise ConvertError(f"trtllm-build failed for the {name} (exit {rc}); its log is above")
    for extra in ("tokenizer", "languages.json"):
        src, dst = plan.checkpoint / extra, plan.output / extra
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst)
    (plan.output / "build_info.json").write_text(json.dumps(build_info(plan, preprocessed), indent=2) + "\n")
    shutil.rmtree(plan.output / STAGING_DIR, ignore_errors=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m convert.build",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Build the TensorRT-LLM encoder and decoder engines of a converted (or calibrated) mBART checkpoint.\n"
            "Runs `trtllm-build` once per component; it builds all tensor-parallel ranks from the checkpoint.\n"
            "Values come from <checkpoint>/{encoder,decoder}/config.json; flags below and --set override them."
        ),
        epilog=(
            "examples:\n"
            "  python -m convert.build --checkpoint ckpt/ --output engines/ --dry-run\n"
            "  python -m convert.build --checkpoint ckpt/ --output engines/ --max-batch-size 32 \\\n"
            "      --set decoder.max_num_tokens=8192 --set multiple_profiles=enable\n\n"
            "The engine dir gets encoder/, decoder/, tokenizer/, languages.json and build_info.json.\n"
            "W8A16 checkpoints (plain int8 [in, out] weights) are first staged through TensorRT-LLM's\n"
            "preprocess_weights_for_mixed_gemm, which needs tensorrt_llm and the target GPU.\n"
            "exit status: 0 ok, 1 bad input or failed build, 2 trtllm-build/tensorrt_llm missing."
        ),
    )
    p.add_argument(
        "--checkpoint", required=True, type=Path, help="TRT-LLM checkpoint dir with encoder/ and decoder/"
    )
    p.add_argument("--output", required=True, type=Path, help="engine dir to write")
    p.add_argument("--dry-run", action="store_true", help="print the exact commands and exit; runs nothing")
    p.add_argument(
        "--trtllm-build", default="trtllm-build", help="trtllm-build executable (default: from PATH)"
    )
    g = p.add_argument_group("limits (defaults derive from config.json)")
    g.add_argument(
        "--max-batch-size", type=int, help=f"requests per engine step (default {DEFAULT_MAX_BATCH_SIZE})"
    )
    g.add_argument(
        "--max-beam-width",
        type=int,
        help=f"largest beam a request may use (default {DEFAULT_MAX_BEAM_WIDTH})",
    )
    g.add_argument(
        "--max-num-tokens",
        type=int,
        help=f"tokens per step after padding removal, both engines (default {DEFAULT_MAX_NUM_TOKENS})",
    )
    g.add_argument(
        "--max-input-len",
        type=int,
        help="longest source: encoder max_input_len = max_seq_len (default: encoder max_position_embeddings)",
    )
    g.add_argument(
        "--max-encoder-input-len",
        type=int,
        help="decoder's cross-attention length (default: --max-input-len)",
    )
    g.add_argument(
        "--max-seq-len",
        type=int,
        help="decoder prefix + generated tokens (default: decoder max_position_embeddings)",
    )
    g.add_argument(
        "--decoder-max-input-len",
        type=int,
        help=f"forced decoder prefix length (default {DEFAULT_DECODER_MAX_INPUT_LEN}: [decoder_start, <tgt_lang>])",
    )
    g.add_argument("--workers", type=int, help="ranks built in parallel, one GPU each (default: world_size)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="[encoder.|decoder.]KEY=VALUE",
        help="raw trtllm-build flag for both engines or one; wins over everything; KEY= drops a flag; repeatable",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cli = {k: getattr(args, k) for k in CLI_LIMITS}
    try:
        plan = plan_build(args.checkpoint, args.output, cli, args.set, args.trtllm_build)
        if args.dry_run:
            print(plan.script())
            return 0
        exe = shutil.which(plan.trtllm_build)
        if exe is None:
            raise MissingToolError(
                f"{plan.trtllm_build} not found on PATH (install TensorRT-LLM, or use --dry-run)"
            )
        run_build(plan, exe)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, MissingToolError) else 1
    print(f"[convert.build] engines written to {plan.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
