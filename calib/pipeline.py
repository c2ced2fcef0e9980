"""`calibrate()`: HF mBART + per-language calibration text -> quantized TRT-LLM checkpoint + report.

Steps: validate everything that can be validated before loading weights (options, languages,
corpora, output path); load the model with the converter's loader; translate the calibration
sentences with the full-precision model (decoder inputs that look like serving traffic);
record per-language activation statistics; run ModelOpt over a forward loop that walks the
languages in turn; map the calibrated state onto TRT-LLM tensors and write the checkpoint with
the converter's writer; evaluate it against full precision on held-out sentences; write the
report. Everything goes to a staging directory that replaces `output` only at the very end,
so a failure leaves nothing behind.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from calib import hf as hfx
from calib import report as rep
from calib.data import (
    CalibError,
    Direction,
    calibration_directions,
    english_only_directions,
    heldout_directions,
    resolve_languages,
)
from calib.export import StagingDir, check_mapping, checkpoint_size, quantized_components, write_checkpoint
from calib.quantize import fuse_groups, quantize
from calib.stats import ActivationStats, LayerError, observe, run_batches
from calib.trtllm_quant import (
    AWQ_GROUP_SIZE,
    DEFAULT_EXCLUDE,
    QUANT_MODES,
    LinearGroup,
    check_tp_layout,
    is_excluded,
    mbart_linear_groups,
)
from convert.registry import DTYPES, Component
from eval.provenance import sha256_file

ARCHITECTURE = "MBartForConditionalGeneration"
EVAL_BACKENDS = ("auto", "runtime", "hf")


@dataclass
class Options:
    model: str
    output: Path
    langs: list[str]
    quant: str
    tp_size: int = 1
    samples: int = 512
    alpha: float = 0.5
    exclude: list[str] = field(default_factory=list)
    compare_english_only: bool = False
    overwrite: bool = False
    dtype: str = "float16"
    eval_samples: int = 50
    batch_size: int = 16
    eval_backend: str = "auto"
    max_new_tokens: int | None = None  # None: 2 * source length + 16, like the runtime
    progress: bool = True


def check_options(opts: Options) -> None:
    """Everything checkable without data or weights; CalibError on the first problem."""
    if opts.quant not in QUANT_MODES:
        raise CalibError(f"unknown --quant {opts.quant!r}; choose one of {', '.join(QUANT_MODES)}")
    if opts.dtype not in DTYPES:
        raise CalibError(f"unknown --dtype {opts.dtype!r}; choose one of {', '.join(DTYPES)}")
    if opts.tp_size < 1:
        raise CalibError(f"--tp-size must be >= 1, got {opts.tp_size}")
    if not 0.0 <= opts.alpha <= 1.0:
        raise CalibError(f"--alpha must be in [0, 1], got {opts.alpha}")
    if opts.max_new_tokens is not None and opts.max_new_tokens < 1:
        raise CalibError(f"--max-new-tokens must be >= 1, got {opts.max_new_tokens}")
    if opts.batch_size < 1:
        raise CalibError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if opts.eval_backend not in EVAL_BACKENDS:
        raise CalibError(
            f"unknown --eval-backend {opts.eval_backend!r}; choose one of {', '.join(EVAL_BACKENDS)}"
        )
    out = Path(opts.output).expanduser()
    if out.exists() and not opts.overwrite:
        raise CalibError(f"output {out} already exists; pass --overwrite to replace it")


def resolve_exclude(user: list[str], groups: list[LinearGroup]) -> list[str]:
    """DEFAULT_EXCLUDE + the user's patterns, each of which must name at least one linear layer."""
    names = sorted({g.module for g in groups})
    for pattern in user:
        if not any(is_excluded(n, [pattern]) for n in names):
            raise CalibError(
                f"--exclude {pattern!r} matches no linear layer (TRT-LLM names, fnmatch on the full name, "
                f"e.g. {names[0]!r} or '*cross_attention.qkv')"
            )
    return list(dict.fromkeys([*DEFAULT_EXCLUDE, *user]))


def _bar(opts: Options, total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="sent", disable=not opts.progress, leave=False)


def teacher_forced(opts: Options, model: Any, tok: Any, directions: dict[str, list[Direction]],
                   translate: bool, what: str) -> dict[str, list[hfx.Sequences]]:  # fmt: skip
    """Per language, the sequences of each direction (own translations, or the source for en->en)."""
    out = {}
    for lang, dirs in directions.items():
        with _bar(opts, sum(len(d.texts) for d in dirs), f"{what} {lang}") as bar:
            out[lang] = [
                hfx.greedy_translate(model, tok, d, opts.batch_size, bar.update, opts.max_new_tokens)
                if translate
                else hfx.source_as_target(model, tok, d)
                for d in dirs
            ]
    return out


def language_batches(
    seqs: dict[str, list[hfx.Sequences]], pad_id: int, batch_size: int
) -> dict[str, list[hfx.Batch]]:
    return {lang: [b for s in ss for b in hfx.batches(s, pad_id, batch_size)] for lang, ss in seqs.items()}


def make_forward_loop(
    opts: Options, batches: dict[str, list[hfx.Batch]]
) -> Callable[[torch.nn.Module], None]:
    """ModelOpt's forward_loop: every language in turn, one progress bar each (called once per pass)."""
    passes = [0]

    def loop(model: torch.nn.Module) -> None:
        passes[0] += 1
        with torch.no_grad():
            for lang, bs in batches.items():
                with _bar(opts, _sentences(bs), f"calibrating {lang} (pass {passes[0]})") as bar:
                    for b in bs:
                        model(**b.kwargs())
                        bar.update(int(b.input_ids.shape[0]))

    return loop


def calibrated_components(opts: Options, hf_model: Any, batches: dict[str, list[hfx.Batch]],
                          groups: list[LinearGroup], exclude: list[str],
                          fp: dict[str, Component]) -> tuple[dict[str, Component], torch.nn.Module]:  # fmt: skip
    """Quantize a copy of `hf_model` with ModelOpt on `batches`: (quantized components, fake-quant model)."""
    algo = QUANT_MODES[opts.quant][0]
    disabled = [m for g in groups if is_excluded(g.module, exclude) for m in g.members]
    qmodel = copy.deepcopy(hf_model)
    quantize(qmodel, opts.quant, make_forward_loop(opts, batches), opts.alpha, AWQ_GROUP_SIZE, disabled,
             verbose=opts.progress)  # fmt: skip
    fuse_groups(qmodel, groups, algo)
    comps = quantized_components(fp, qmodel, groups, algo, exclude, AWQ_GROUP_SIZE, opts.alpha)
    return comps, qmodel.eval()


def activation_stats(opts: Options, model: Any, groups: list[LinearGroup],
                     batches: dict[str, list[hfx.Batch]]) -> dict[str, dict]:  # fmt: skip
    """Per language and layer, input statistics of the full-precision model on the calibration batches."""
    out = {}
    for lang, bs in batches.items():
        stats = ActivationStats()
        with (
            observe(model, groups, stats) as set_batch,
            _bar(opts, _sentences(bs), f"statistics {lang}") as bar,
        ):
            run_batches(model, set_batch, bs, bar.update)
        out[lang] = stats.summary()
    return out


def _sentences(batches: list[hfx.Batch]) -> int:
    return sum(int(b.input_ids.shape[0]) for b in batches)


def _files(dirs: dict[str, list[Direction]]) -> list[dict]:
    return [
        {
            "lang": d.lang,
            "pair": d.pair,
            "sentences": len(d.texts),
            "file": d.path,
            "sha256": sha256_file(Path(d.path)),
        }
        for ds in dirs.values()
        for d in ds
    ]


def calibrate(opts: Options) -> Path:
    """Run the whole pipeline; returns the checkpoint directory. CalibError (nothing written) on user errors."""
    from convert.__main__ import load_hf, resolve_source

    check_options(opts)
    langs = resolve_languages(opts.langs)
    cal_dirs = calibration_directions(langs, opts.samples)
    held_dirs = heldout_directions(langs, opts.eval_samples)
    en_dirs = english_only_directions(langs, opts.samples) if opts.compare_english_only else None
    source = resolve_source(opts.model)
    loader, hf_model, tok = load_hf(source, opts.tp_size)
    if loader.architecture != ARCHITECTURE:
        raise CalibError(f"calibration supports {ARCHITECTURE} only, not {loader.architecture}")
    cfg = hf_model.config
    for lang in langs:
        try:
            hfx.lang_token_id(tok, lang)
        except ValueError as err:
            raise CalibError(f"{err} (model {opts.model})") from None
    groups = mbart_linear_groups(cfg.encoder_layers, cfg.decoder_layers)
    exclude = resolve_exclude(opts.exclude, groups)
    algo = QUANT_MODES[opts.quant][0]
    with torch.no_grad():
        fp = loader.convert(cfg, hf_model.state_dict(), DTYPES[opts.dtype])
    check_mapping(fp, hf_model, groups)
    shapes = {g.key: tuple(fp[g.component].tensors[f"{g.module}.weight"].shape) for g in groups}
    quantized_groups = [g for g in groups if not is_excluded(g.module, exclude)]
    try:
        check_tp_layout(algo, quantized_groups, shapes, opts.tp_size, AWQ_GROUP_SIZE)
    except ValueError as err:
        raise CalibError(str(err)) from None

    pad = cfg.pad_token_id
    cal_seqs = teacher_forced(opts, hf_model, tok, cal_dirs, True, "translating")
    cal_batches = language_batches(cal_seqs, pad, opts.batch_size)
    activations = activation_stats(opts, hf_model, quantized_groups, cal_batches)

    variants, qmodels = {}, {}
    variants["per_language"], qmodels["per_language"] = calibrated_components(
        opts, hf_model, cal_batches, groups, exclude, fp
    )
    if en_dirs is not None:
        en_seqs = teacher_forced(opts, hf_model, tok, en_dirs, False, "english")
        en_batches = language_batches(en_seqs, pad, opts.batch_size)
        variants["english_only"], qmodels["english_only"] = calibrated_components(
            opts, hf_model, en_batches, groups, exclude, fp
        )

    calibration = {"quant": opts.quant, "langs": langs, "samples_per_direction": opts.samples}
    if opts.quant == "w8a8_sq":
        calibration["alpha"] = opts.alpha
    record = {
        "source": opts.model,
        "source_path": source if Path(source).is_dir() else None,
        "source_revision": getattr(cfg, "_commit_hash", None),
        "calibration": {**calibration, "files": _files(cal_dirs)},
    }
    out = Path(opts.output).expanduser().resolve()
    stage = StagingDir(out)
    try:
        total = sum(len(c.tensors) for c in variants["per_language"].values()) * opts.tp_size
        with tqdm(total=total, unit="tensor", desc=f"writing TP={opts.tp_size}", disable=not opts.progress,
                  leave=False) as bar:  # fmt: skip
            write_checkpoint(
                stage.path, variants["per_language"], opts.tp_size, loader, tok, record, bar.update
            )
        report = evaluate(opts, langs, held_dirs, hf_model, tok, fp, variants, qmodels, groups, exclude, loader,
                          stage.path)  # fmt: skip
        report.update(
            {
                "activations": activations,
                "calibration_files": _files(cal_dirs),
                "heldout_files": _files(held_dirs),
            }
        )
        if en_dirs is not None:
            report["variants"]["english_only"]["calibration_sentences"] = len(en_dirs["en"][0].texts)
        rep.write(report, stage.path)
        stage.commit()
    except BaseException:
        stage.discard()
        raise
    if opts.progress:
        print(rep.stdout_table(report))
    return out


def evaluate(opts: Options, langs: list[str], held: dict[str, list[Direction]], hf_model: Any, tok: Any,
             fp: dict[str, Component], variants: dict[str, dict[str, Component]], qmodels: dict[str, Any],
             groups: list[LinearGroup], exclude: list[str], loader: Any, ckpt: Path) -> dict:  # fmt: skip
    """Held-out agreement of each calibrated variant with full precision, plus per-layer errors.

    The runtime backend compares the runtime on the quantized checkpoint with the runtime on the
    float checkpoint of the same dtype, so only quantization differs; TP>1 checkpoints are
    evaluated from the same tensors written at TP=1 (one process). Without a working runtime
    (`auto`), the HF model is compared with ModelOpt's fake-quant model instead.
    """
    algo = QUANT_MODES[opts.quant][0]
    report: dict = {
        "model": opts.model, "quant": opts.quant, "quant_algo": algo, "dtype": opts.dtype, "tp_size": opts.tp_size,
        "langs": langs, "samples": opts.samples, "eval_samples": opts.eval_samples,
        "alpha": opts.alpha if opts.quant == "w8a8_sq" else None,
        "group_size": AWQ_GROUP_SIZE if opts.quant == "int4_awq" else None,
        "modelopt_config": QUANT_MODES[opts.quant][1], "exclude_modules": exclude,
        "pairs": {}, "variants": {v: {"layer_error": {}} for v in variants},
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="calib-eval-") as tmp:
        tmp = Path(tmp)
        write_checkpoint(tmp / "float", fp, 1, loader, tok, {"source": opts.model})
        sized = tmp / "float"
        if opts.tp_size > 1:  # compare sizes at the deployed TP size: replicated tensors count once per rank
            sized = tmp / f"float-tp{opts.tp_size}"
            write_checkpoint(sized, fp, opts.tp_size, loader, tok, {"source": opts.model})
        report["size_bytes"] = {"float": checkpoint_size(sized), "quantized": checkpoint_size(ckpt)}
        kind = opts.eval_backend
        if kind in ("auto", "runtime"):
            try:
                reference = rep.RuntimeBackend(tmp / "float", opts.max_new_tokens)
                kind = "runtime"
            except Exception as err:
                if opts.eval_backend == "runtime":
                    raise
                report["eval_backend_note"] = f"runtime unavailable ({type(err).__name__}: {err})"
                kind = "hf"
        if kind == "runtime":
            backends = {}
            for name, comps in variants.items():
                path = ckpt
                if name != "per_language" or opts.tp_size != 1:
                    path = tmp / name
                    write_checkpoint(path, comps, 1, loader, tok, {"source": opts.model})
                backends[name] = rep.RuntimeBackend(path, opts.max_new_tokens)
        else:
            reference = hfx.HFBackend(hf_model, tok, opts.batch_size, opts.max_new_tokens)
            backends = {
                name: hfx.HFBackend(m, tok, opts.batch_size, opts.max_new_tokens)
                for name, m in qmodels.items()
            }
        report["eval_backend"] = kind
        layer_sets = {
            name: rep.runtime_layers(comps, groups, algo, exclude, AWQ_GROUP_SIZE)
            for name, comps in variants.items()
        }
        pad = hf_model.config.pad_token_id
        for lang in langs:
            errors = {name: LayerError(*layer_sets[name]) for name in variants}
            with _bar(opts, sum(len(d.texts) for d in held[lang]), f"evaluating {lang}") as bar:
                for d in held[lang]:
                    ref = reference.translate(d)
                    ref_texts = [reference.decode(c) for c in ref.continuations]
                    ref_logits = reference.teacher_forced_logits(ref.encoder_ids, ref.decoder_ids)
                    entry = report["pairs"].setdefault(d.pair, {})
                    for name in variants:
                        entry[name] = rep.agreement(ref, ref_texts, ref_logits, backends[name])
                    if len(variants) == 2:
                        a, b = entry["per_language"]["kl"], entry["english_only"]["kl"]
                        entry["better"] = "per-language" if a < b else "english-only" if b < a else "tie"
                    for err in errors.values():
                        quantized = [g for g in groups if g.key in err.layers]
                        with observe(hf_model, quantized, err) as set_batch:
                            run_batches(hf_model, set_batch, hfx.batches(ref, pad, opts.batch_size))
                    bar.update(len(d.texts))
            for name, err in errors.items():
                report["variants"][name]["layer_error"][lang] = err.summary()
    return report
