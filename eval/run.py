"""`python -m eval run`: translate test sets, score them, write JSON, Markdown, a chart and hypotheses.

A test set is a directory `<data root>/test/<set>/` of aligned files `<src>-<tgt>.<src>` (source)
and `<src>-<tgt>.<tgt>` (reference), so a user's own set in that layout needs no code.
"""

from __future__ import annotations

import json
import platform
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import sacrebleu
from tqdm import tqdm

from eval import provenance, report
from eval.backends import Backend
from eval.data import data_root, read_lines, test_pair_paths
from eval.errors import EvalError
from eval.metrics import bleu_tokenizer, score_corpus

SCHEMA = 1
RESULTS_JSON, RESULTS_MD, CHART_PNG, HYP_DIR = "results.json", "results.md", "scores.png", "hypotheses"
PAIR_RE = re.compile(r"^[A-Za-z_]+-[A-Za-z_]+$")


@dataclass
class TestPair:
    pair: str
    src: str
    tgt: str
    src_path: Path
    ref_path: Path
    sources: list[str]
    references: list[str]


def parse_pairs(text: str) -> list[str]:
    """`"zh-en, en-zh"` -> ["zh-en", "en-zh"], rejecting anything that is not `<src>-<tgt>`."""
    pairs = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in pairs if not PAIR_RE.match(p)]
    if bad or not pairs:
        raise EvalError(f"--pairs takes comma-separated <src>-<tgt> pairs such as zh-en,en-zh; got {text!r}")
    return list(dict.fromkeys(pairs))


def parse_assignments(text: str | None, option: str) -> dict[str, str]:
    """`"zh-en=1.0,ja=char"` -> {"zh-en": "1.0", "ja": "char"}."""
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise EvalError(f"{option} takes KEY=VALUE[,KEY=VALUE...]; got {item.strip()!r}")
        out[key.strip()] = value.strip()
    return out


def available_sets(root: Path | None = None) -> list[str]:
    base = (root or data_root()) / "test"
    return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []


def available_pairs(test_set: str = "ntrex", root: Path | None = None) -> list[str]:
    """Pairs of the set that have both their source and their reference file."""
    base = (root or data_root()) / "test" / test_set
    pairs = {p.stem for p in base.glob("*-*.*") if PAIR_RE.match(p.stem)} if base.is_dir() else set()
    return sorted(p for p in pairs if all(f.is_file() for f in test_pair_paths(p, test_set, root)))


def load_pair(
    pair: str, test_set: str = "ntrex", limit: int | None = None, root: Path | None = None
) -> TestPair:
    """Source and reference sentences of one pair (the first `limit` of them), checked aligned."""
    root = root or data_root()
    if not (root / "test" / test_set).is_dir():
        sets = ", ".join(available_sets(root)) or "none"
        raise EvalError(f"test set {test_set!r} not found under {root / 'test'}; available sets: {sets}")
    src_path, ref_path = test_pair_paths(pair, test_set, root)
    if not (src_path.is_file() and ref_path.is_file()):
        missing = ", ".join(str(p) for p in (src_path, ref_path) if not p.is_file())
        pairs = ", ".join(available_pairs(test_set, root)) or "none"
        raise EvalError(
            f"no test data for {pair} in set {test_set!r} (missing {missing}); available pairs: {pairs}"
        )
    sources, references = read_lines(src_path), read_lines(ref_path)
    if len(sources) != len(references):
        raise EvalError(
            f"{pair}: {src_path.name} has {len(sources)} lines but {ref_path.name} {len(references)}"
        )
    if limit is not None:
        sources, references = sources[:limit], references[:limit]
    if not sources:
        raise EvalError(f"{pair}: no sentences in {src_path}")
    src, tgt = pair.split("-")
    return TestPair(pair, src, tgt, src_path.resolve(), ref_path.resolve(), sources, references)


def translate_pair(
    backend: Backend, tp: TestPair, batch_size: int, progress: bool = True
) -> tuple[list[str], float, int | None]:
    """(hypotheses, wall seconds, output tokens or None) for one pair, batch by batch."""
    batches = [tp.sources[i : i + batch_size] for i in range(0, len(tp.sources), batch_size)]
    results: list[tuple[list[str], int | None]] = []
    with tqdm(total=len(tp.sources), desc=tp.pair, unit="sent", disable=not progress, file=sys.stderr) as bar:
        start = time.perf_counter()
        if backend.max_concurrency > 1:
            with ThreadPoolExecutor(backend.max_concurrency) as pool:
                futures = [pool.submit(backend.translate, b, tp.src, tp.tgt) for b in batches]
                for fut in futures:  # in order, so hypotheses stay aligned
                    results.append(fut.result())
                    bar.update(len(results[-1][0]))
        else:
            for batch in batches:
                results.append(backend.translate(batch, tp.src, tp.tgt))
                bar.update(len(batch))
        wall = time.perf_counter() - start
    hyps = [h for batch_hyps, _ in results for h in batch_hyps]
    counts = [n for _, n in results]
    tokens = None if any(n is None for n in counts) else sum(counts)
    return [one_line(h) for h in hyps], wall, tokens


def one_line(text: str) -> str:
    """A hypothesis as it is stored, one per line: inner line breaks become spaces."""
    return " ".join(text.splitlines()).strip()


def hyp_filename(pair: str) -> str:
    """`zh-en` -> `hypotheses/zh-en.en`: the data layout, so a hypothesis file sits like a reference."""
    return f"{HYP_DIR}/{pair}.{pair.split('-')[1]}"


def evaluate(
    backend: Backend,
    pairs: list[TestPair],
    out_dir: Path,
    settings: dict,
    name: str | None = None,
    tokenize_overrides: dict[str, str] | None = None,
    progress: bool = True,
) -> dict:
    """Translate and score every pair, write all outputs to `out_dir`, return the results document."""
    out_dir = Path(out_dir)
    backend.check_languages(sorted({lang for tp in pairs for lang in (tp.src, tp.tgt)}))
    (out_dir / HYP_DIR).mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    if pairs:  # untimed: the first call pays for allocation and kernel selection, not translation
        backend.translate(pairs[0].sources[:1], pairs[0].src, pairs[0].tgt)
    entries: dict[str, dict] = {}
    for tp in pairs:
        hyps, wall, tokens = translate_pair(backend, tp, settings.get("batch_size", 32), progress)
        score = score_corpus(hyps, tp.references, bleu_tokenizer(tp.tgt, tokenize_overrides))
        hyp_file = hyp_filename(tp.pair)
        (out_dir / hyp_file).write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
        entries[tp.pair] = {
            "src": tp.src,
            "tgt": tp.tgt,
            "sentences": len(hyps),
            "bleu": score.bleu,
            "chrf": score.chrf,
            "tokenize": score.tokenize,
            "signatures": score.signatures,
            "bleu_line": score.bleu_line,
            "data": {
                "source": {"path": str(tp.src_path), "sha256": provenance.sha256_file(tp.src_path)},
                "reference": {"path": str(tp.ref_path), "sha256": provenance.sha256_file(tp.ref_path)},
            },
            "hypotheses_file": hyp_file,
            "hypotheses_sha256": provenance.sha256_lines(hyps),
            "throughput": {
                "wall_s": round(wall, 3),
                "sentences_per_s": round(len(hyps) / wall, 3) if wall > 0 else None,
                "output_tokens": tokens,
                "tokens_per_s": round(tokens / wall, 3) if tokens is not None and wall > 0 else None,
            },
        }
    model = backend.info()
    results = {
        "schema": SCHEMA,
        "kind": "mt-eval-run",
        "name": name or _default_name(model),
        "created": started.isoformat(timespec="seconds"),
        "model": model,
        "settings": {
            **settings,
            "tokenize_overrides": tokenize_overrides or {},
            "tokens_counted": backend.tokens_source,
        },
        "environment": {
            "git": provenance.git_revision(),
            "sacrebleu": sacrebleu.__version__,
            "python": platform.python_version(),
            "host": platform.node(),
        },
        "pairs": entries,
        "wall_s": round((datetime.now(timezone.utc) - started).total_seconds(), 3),
    }
    write_outputs(results, out_dir)
    return results


def _default_name(model: dict) -> str:
    if model.get("checkpoint"):
        return Path(model["checkpoint"]).name
    return model.get("id") or "server"


def write_outputs(results: dict, out_dir: Path) -> None:
    """results.json, results.md and scores.png (hypothesis files are written as pairs finish)."""
    (out_dir / RESULTS_JSON).write_text(
        json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out_dir / RESULTS_MD).write_text(report.run_markdown(results), encoding="utf-8")
    report.bar_chart(
        [results], out_dir / CHART_PNG, title=f"{results['name']} on {results['settings'].get('test_set')}"
    )
