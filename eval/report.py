"""Markdown tables and PNG bar charts of one run or of several side by side."""

from __future__ import annotations

from pathlib import Path

from eval.metrics import METRIC_NAMES, METRICS, pair_mismatches
from eval.provenance import quant_label


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def model_summary(doc: dict) -> dict[str, str]:
    """The few facts that identify what was evaluated, as short strings."""
    model, settings = doc.get("model", {}), doc.get("settings", {})
    git = doc.get("environment", {}).get("git") or {}
    sha = model.get("checkpoint_sha256")
    limit = settings.get("limit")
    return {
        "model": str(model.get("id") or "?"),
        "source": str(model.get("checkpoint") or model.get("url") or "?"),
        "checkpoint sha256": f"`{sha[:16]}`" if sha else "-",
        "quantization": quant_label(model.get("quant_algo"), model.get("dtype"))
        if model.get("source") != "url"
        else "?",
        "test set": f"{settings.get('test_set', '?')}" + (f" (first {limit} sentences)" if limit else ""),
        "decoding": f"beam {settings.get('beam_size', '?')}, batch {settings.get('batch_size', '?')}",
        "git": f"`{(git.get('revision') or '-')[:12]}`"
        + (" (uncommitted changes)" if git.get("dirty") else ""),
        "sacrebleu": str(doc.get("environment", {}).get("sacrebleu", "?")),
    }


def signature_lines(doc: dict) -> list[str]:
    """Each distinct signature once, with the pairs it applies to."""
    by_sig: dict[tuple[str, str], list[str]] = {}
    for pair, entry in doc["pairs"].items():
        for metric in METRICS:
            by_sig.setdefault((metric, entry["signatures"][metric]), []).append(pair)
    return [f"- {METRIC_NAMES[m]} ({', '.join(pairs)}): `{sig}`" for (m, sig), pairs in by_sig.items()]


def run_markdown(doc: dict) -> str:
    """One run: what was evaluated, scores and throughput per pair, and the signatures."""
    info = _table(["", ""], [[k, v] for k, v in model_summary(doc).items()])
    rows = []
    for pair, e in doc["pairs"].items():
        t = e.get("throughput", {})
        rows.append([
            pair, str(e["sentences"]), _fmt(e["bleu"]), _fmt(e["chrf"]), e["tokenize"],
            _fmt(t.get("sentences_per_s"), 1), _fmt(t.get("tokens_per_s"), 0), _fmt(t.get("wall_s"), 1),
        ])  # fmt: skip
    scores = _table(
        ["pair", "sentences", "BLEU", "chrF++", "BLEU tok", "sent/s", "tok/s", "wall s"],
        rows,
        ["---", "---:", "---:", "---:", "---", "---:", "---:", "---:"],
    )
    return (
        f"# Evaluation: {doc.get('name', '?')}\n\n{info}\n{scores}\n"
        "Signatures:\n" + "\n".join(signature_lines(doc)) + "\n"
    )


def compare_markdown(docs: list[dict], labels: list[str]) -> str:
    """Systems side by side per pair; later systems show their delta to the first one."""
    summaries = [model_summary(d) for d in docs]
    keys = ["model", "quantization", "checkpoint sha256", "test set", "decoding", "git"]
    systems = _table(
        ["system", *keys], [[lab, *(s[k] for k in keys)] for lab, s in zip(labels, summaries, strict=True)]
    )
    pairs = list(dict.fromkeys(p for d in docs for p in d["pairs"]))
    header = ["pair"] + [f"{METRIC_NAMES[m]} {lab}" for m in METRICS for lab in labels]
    rows, notes = [], []
    for pair in pairs:
        row = [pair]
        first = docs[0]["pairs"].get(pair)
        for metric in METRICS:
            for doc in docs:
                entry = doc["pairs"].get(pair)
                if entry is None:
                    row.append("-")
                elif first is None or doc is docs[0]:
                    row.append(_fmt(entry[metric]))
                else:
                    row.append(f"{_fmt(entry[metric])} ({entry[metric] - first[metric]:+.2f})")
        rows.append(row)
        for lab, doc in zip(labels[1:], docs[1:], strict=True):
            entry = doc["pairs"].get(pair)
            if first is not None and entry is not None and (problems := pair_mismatches(first, entry)):
                notes.append(f"- {pair}: {lab} is not comparable to {labels[0]}: {'; '.join(problems)}")
    table = _table(header, rows, ["---"] + ["---:"] * (len(header) - 1))
    text = f"# Comparison\n\n{systems}\n{table}"
    return text + ("\nNot comparable:\n" + "\n".join(notes) + "\n" if notes else "")


def bar_chart(docs: list[dict], path: Path, labels: list[str] | None = None, title: str = "") -> Path:
    """Grouped bars per pair, one panel per metric, one bar colour per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = labels or [str(d.get("name", i)) for i, d in enumerate(docs)]
    pairs = list(dict.fromkeys(p for d in docs for p in d["pairs"]))
    x = np.arange(len(pairs))
    width = 0.8 / len(docs)
    fig, axes = plt.subplots(
        len(METRICS), 1, figsize=(max(6.0, 0.9 * len(pairs) * max(1, len(docs) / 2) + 2), 7)
    )
    for ax, metric in zip(axes, METRICS, strict=True):
        for i, (doc, lab) in enumerate(zip(docs, labels, strict=True)):
            values = [doc["pairs"][p][metric] if p in doc["pairs"] else np.nan for p in pairs]
            bars = ax.bar(x + (i - (len(docs) - 1) / 2) * width, values, width, label=lab)
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
        ax.set_ylabel(METRIC_NAMES[metric])
        ax.set_xticks(x, pairs)
        ax.margins(y=0.15)
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
    if len(docs) > 1:
        axes[0].legend(fontsize=8, ncols=min(len(docs), 4))
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
