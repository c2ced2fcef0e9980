"""Agreement of a quantized checkpoint with full precision, and the report files (JSON, Markdown, PNG).

Per held-out pair: BLEU of the quantized model's greedy output against the full-precision
output (sacrebleu, tokenizer chosen per target language by `eval.metrics`), and, teacher-forced
on the full-precision translation, the mean per-token KL(p_fp || p_quant) and the top-1 token
agreement over the positions that predict the translation (and its EOS). Per language and
quantized layer: relative output error on that language's held-out sentences.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from sacrebleu.metrics import BLEU, CHRF

from calib.data import Direction
from calib.hf import Sequences, max_new_tokens
from calib.trtllm_quant import LinearGroup, is_excluded
from convert.registry import Component
from eval.metrics import bleu_tokenizer
from serve.runtime.quant import QUANT_LINEARS


class RuntimeBackend:
    """The project's PyTorch runtime (`serve.runtime.translator.Translator`) on a checkpoint directory."""

    name = "runtime"

    def __init__(self, ckpt_dir: Path, limit: int | None = None):
        from serve.runtime.translator import Translator

        self.tr = Translator.load(ckpt_dir, device="cpu")
        self.limit = limit

    def translate(self, direction: Direction) -> Sequences:
        from serve.engine.request import SamplingParams

        tok = self.tr.tokenizer
        enc = tok.encode(list(direction.texts), tok.language(direction.src))
        prefix = tok.decoder_prefix(tok.language(direction.tgt))
        positions = self.tr.decoder.cfg.max_position_embeddings
        params = [
            SamplingParams(
                beam_size=1, max_new_tokens=max_new_tokens(len(e), len(prefix), positions, self.limit)
            )
            for e in enc
        ]
        out = self.tr.generate_ids(enc, [prefix] * len(enc), params)
        return Sequences(direction, enc, prefix, [list(ids) for ids in out])

    def decode(self, ids: list[int]) -> str:
        return self.tr.tokenizer.decode(ids)

    def teacher_forced_logits(
        self, encoder_ids: list[list[int]], decoder_ids: list[list[int]]
    ) -> list[torch.Tensor]:
        return self.tr.teacher_forced_logits(encoder_ids, decoder_ids)


def runtime_layers(components: dict[str, Component], groups: list[LinearGroup], quant_algo: str,
                   exclude: list[str], group_size: int) -> tuple[dict[str, torch.nn.Module], dict[str, list[int]]]:  # fmt: skip
    """The runtime's quantized module of every quantized layer (TP=1, float32), and member row offsets."""
    cls = QUANT_LINEARS[quant_algo]
    kwargs = {"group_size": group_size} if quant_algo == "W4A16_AWQ" else {}
    layers, offsets = {}, {}
    for g in groups:
        if is_excluded(g.module, exclude):
            continue
        tensors = components[g.component].tensors
        state = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == g.module}
        state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        out_f = _out_features(quant_algo, state)
        layer = cls(_in_features(quant_algo, state), out_f, bias="bias" in state, **kwargs)
        layer.load_state_dict(state, strict=True)
        layers[g.key] = layer.eval()
        rows = out_f // len(g.members)  # fused q, k and v have equal widths in mBART
        offsets[g.key] = [i * rows for i in range(len(g.members))]
    return layers, offsets


def _in_features(quant_algo: str, state: dict[str, torch.Tensor]) -> int:
    return state["weight"].shape[0] if quant_algo == "W8A16" else state["weight"].shape[1]


def _out_features(quant_algo: str, state: dict[str, torch.Tensor]) -> int:
    w = state["weight"]
    return {"W8A16": w.shape[1], "W4A16_AWQ": 2 * w.shape[0]}.get(quant_algo, w.shape[0])


def agreement(ref: Sequences, ref_texts: list[str], ref_logits: list[torch.Tensor], backend: Any) -> dict:
    """BLEU / KL / top-1 of `backend` against the full-precision run `ref` on the same direction."""
    d = ref.direction
    hyp = backend.translate(d)
    hyp_texts = [backend.decode(c) for c in hyp.continuations]
    bleu = BLEU(tokenize=bleu_tokenizer(d.tgt))
    score = bleu.corpus_score(hyp_texts, [ref_texts])
    chrf = CHRF(word_order=2).corpus_score(hyp_texts, [ref_texts]).score
    q_logits = backend.teacher_forced_logits(ref.encoder_ids, ref.decoder_ids)
    kl_sum, agree, tokens = 0.0, 0, 0
    start = len(ref.prefix) - 1  # the position that predicts the first generated token
    for p, q in zip(ref_logits, q_logits, strict=True):
        lp, lq = F.log_softmax(p[start:].float(), -1), F.log_softmax(q[start:].float(), -1)
        kl_sum += float((lp.exp() * (lp - lq)).sum())
        agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
        tokens += lp.shape[0]
    return {
        "bleu": round(score.score, 2) if any(ref_texts) else None,  # undefined on empty references
        "bleu_signature": str(bleu.get_signature()),
        "chrf": round(chrf, 2) if any(ref_texts) else None,
        "kl": kl_sum / max(tokens, 1),
        "top1": agree / max(tokens, 1),
        "tokens": tokens,
        "exact_match": sum(a == b for a, b in zip(hyp_texts, ref_texts, strict=True))
        / max(len(ref_texts), 1),
    }


# -- rendering --------------------------------------------------------------------------------------


def _fmt_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def pair_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-pair table (shared by Markdown and stdout)."""
    variants = [v for v in ("per_language", "english_only") if v in report["variants"]]
    header = ["pair"]
    for v in variants:
        tag = "" if len(variants) == 1 else (" (per-lang)" if v == "per_language" else " (en-only)")
        header += [f"BLEU vs fp{tag}", f"chrF++ vs fp{tag}", f"KL{tag}", f"top-1{tag}"]
    if len(variants) == 2:
        header.append("better (lower KL)")
    rows = []
    for pair, by_variant in report["pairs"].items():
        row = [pair]
        for v in variants:
            m = by_variant[v]
            bleu, chrf = ("n/a" if m[k] is None else f"{m[k]:.1f}" for k in ("bleu", "chrf"))
            row += [bleu, chrf, f"{m['kl']:.4f}", f"{m['top1']:.3f}"]
        if len(variants) == 2:
            row.append(by_variant["better"])
        rows.append(row)
    return header, rows


def layer_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    variants = [v for v in ("per_language", "english_only") if v in report["variants"]]
    header = ["language"]
    for v in variants:
        tag = "" if len(variants) == 1 else (" (per-lang)" if v == "per_language" else " (en-only)")
        header += [f"mean rel. err{tag}", f"max rel. err{tag}", f"worst layer{tag}"]
    rows = []
    for lang in report["langs"]:
        row = [lang]
        for v in variants:
            errs = report["variants"][v]["layer_error"][lang]
            worst = max(errs, key=errs.get)
            row += [f"{sum(errs.values()) / len(errs):.4f}", f"{errs[worst]:.4f}", worst]
        rows.append(row)
    return header, rows


def size_line(report: dict) -> str:
    s = report["size_bytes"]
    return (f"checkpoint size: {s['float'] / 2**20:.2f} MiB float ({report['dtype']}) -> "
            f"{s['quantized'] / 2**20:.2f} MiB {report['quant_algo']} ({s['quantized'] / s['float']:.2f}x)")  # fmt: skip


def markdown(report: dict) -> str:
    lines = [
        f"# Calibration report: {report['quant_algo']} ({report['quant']})",
        "",
        f"- model: `{report['model']}`; dtype {report['dtype']}; TP={report['tp_size']}",
        f"- languages: {', '.join(report['langs'])}; {report['samples']} sentences per language and direction "
        f"(X->en and en->X), decoder inputs = the full-precision model's greedy translations (teacher forced)",
        f"- ModelOpt config: `{report['modelopt_config']}`"
        + (f", alpha={report['alpha']}" if report.get("alpha") is not None else "")
        + (f", group_size={report['group_size']}" if report.get("group_size") else ""),
        f"- exclude_modules: `{report['exclude_modules']}`",
        f"- evaluated with the `{report['eval_backend']}` backend on {report['eval_samples']} held-out test "
        "sentences per direction, against the same backend in full precision",
        f"- {size_line(report)}",
        "",
        "## Agreement with full precision, per pair",
        "",
    ]
    header, rows = pair_rows(report)
    lines += [_fmt_row(header), _fmt_row(["---"] * len(header)), *(_fmt_row(r) for r in rows), ""]
    lines += ["BLEU / chrF++: the quantized model's greedy output scored against the full-precision output "
              "(100 = identical). KL: mean per-token KL(p_fp || p_quant) in nats, teacher-forced on the "
              "full-precision translation; top-1: share of those positions where both pick the same token.",
              ""]  # fmt: skip
    if "english_only" in report["variants"]:
        lines += [f"English-only calibration: {report['variants']['english_only']['calibration_sentences']} "
                  "English sentences on both sides (en->en teacher-forced on the source).", ""]  # fmt: skip
    lines += ["## Relative output error per layer (held-out sentences of each language)", ""]
    header, rows = layer_rows(report)
    lines += [_fmt_row(header), _fmt_row(["---"] * len(header)), *(_fmt_row(r) for r in rows), ""]
    lines += ["## Input activations per language (full precision)", ""]
    header = ["language", "max amax", "median outlier ratio", "layer with most outlying channels"]
    lines += [_fmt_row(header), _fmt_row(["---"] * len(header))]
    for lang, layers in report["activations"].items():
        ratios = sorted(v["outlier_ratio"] for v in layers.values())
        worst = max(layers, key=lambda k: layers[k]["outlier_ratio"])
        amax = max(v["amax"] for v in layers.values())
        lines.append(_fmt_row([lang, f"{amax:.2f}", f"{ratios[len(ratios) // 2]:.1f}",
                               f"{worst} ({layers[worst]['outlier_ratio']:.1f})"]))  # fmt: skip
    lines += ["", "![report](report.png)", ""]
    return "\n".join(lines)


def stdout_table(report: dict) -> str:
    header, rows = pair_rows(report)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*r) for r in rows]
    out.append(size_line(report))
    return "\n".join(out)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v in ("per_language", "english_only") if v in report["variants"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4.8))
    keys = list(next(iter(report["variants"][variants[0]]["layer_error"].values())))
    for i, lang in enumerate(report["langs"]):
        for v in variants:
            errs = report["variants"][v]["layer_error"][lang]
            style = "-" if v == "per_language" else "--"
            label = (
                lang if len(variants) == 1 else f"{lang} ({'per-lang' if v == 'per_language' else 'en-only'})"
            )
            ax1.plot(range(len(keys)), [errs[k] for k in keys], style, color=f"C{i}", label=label, marker=".")
    ax1.set_xticks(range(len(keys)), [k.replace("transformer.layers.", "L").replace("/", ":") for k in keys],
                   rotation=90, fontsize=6)  # fmt: skip
    ax1.set_ylabel("relative output error")
    ax1.set_title("per-layer error on held-out sentences")
    ax1.legend(fontsize=7)
    pairs = list(report["pairs"])
    width = 0.8 / len(variants)
    for j, v in enumerate(variants):
        vals = [report["pairs"][p][v]["kl"] for p in pairs]
        label = "per-language calibration" if v == "per_language" else "English-only calibration"
        ax2.bar([i + j * width for i in range(len(pairs))], vals, width, label=label)
    ax2.set_xticks([i + width * (len(variants) - 1) / 2 for i in range(len(pairs))], pairs)
    ax2.set_ylabel("KL(fp || quant), nats/token")
    ax2.set_title(f"{report['quant_algo']}: agreement with full precision")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(report: dict, out_dir: Path) -> list[Path]:
    paths = [out_dir / "report.json", out_dir / "report.md", out_dir / "report.png"]
    paths[0].write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    paths[1].write_text(markdown(report))
    plot(report, paths[2])
    return paths
