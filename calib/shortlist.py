"""`python -m calib.shortlist`: per-target-language output vocabularies for a converted checkpoint.

Writes `shortlist.safetensors` (format in `serve.runtime.shortlist`) into the checkpoint and a
report beside it (`shortlist_report.json/.md/.png`). A language's list holds every token that its
corpus (`$MT_DATA_ROOT/calib/<lang>.txt`, or `--corpus`) uses at least `--min-count` times, every
piece without letters (digits, punctuation and symbols pass through any language), and EOS/UNK;
at serving time each request may also emit its own source's tokens.

The report measures what the list costs, per language:
- size: tokens in the list and their share of the vocabulary (the share of lm_head rows read);
- coverage: of the test set's real reference translations (`en-<lang>`), the share of tokens the list
  plus the source allows, and the share of sentences wholly reachable. This needs no trained model;
  a sentence outside the list is one the shortlisted model cannot produce;
- agreement: greedy translations of `--agreement-samples` test sentences with and without the list on
  this checkpoint: identical sentences, and the share of tokens before the first difference. It says
  something only about a trained model (on a random one it measures noise).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from calib.data import CalibError
from convert.cli import OneLineParser, run_cli
from eval.data import calib_languages, calib_path, read_lines, test_pair_paths
from serve.runtime import shortlist as shortlist_file
from serve.tokenizer import TranslationTokenizer


def base_tokens(tok: TranslationTokenizer, vocab_size: int) -> set[int]:
    """EOS, UNK and every piece without a letter: allowed in every language."""
    hf = tok.tokenizer
    pieces = hf.convert_ids_to_tokens(list(range(vocab_size)))
    base = {i for i, piece in enumerate(pieces) if piece is not None and not any(c.isalpha() for c in piece)}
    return base | {tok.eos_token_id} | ({hf.unk_token_id} if hf.unk_token_id is not None else set())


def build_lists(tok: TranslationTokenizer, corpora: dict[str, list[str]], vocab_size: int,
                min_count: int = 1) -> dict[str, list[int]]:  # fmt: skip
    """{language: sorted token ids} from each language's corpus."""
    base = base_tokens(tok, vocab_size)
    lists = {}
    for lang, lines in corpora.items():
        counts = Counter(t for ids in tok.text_ids(lines) for t in ids)
        lists[lang] = sorted(base | {t for t, c in counts.items() if c >= min_count and t < vocab_size})
    return lists


def coverage(tok: TranslationTokenizer, allowed: set[int], sources: list[str],
             references: list[str]) -> dict[str, float]:  # fmt: skip
    """Share of reference tokens, and of whole references, inside `allowed` plus their source's tokens."""
    covered = total = whole = 0
    for src, ref in zip(tok.text_ids(sources), tok.text_ids(references), strict=True):
        ok = sum(t in allowed or t in src for t in ref)
        covered, total, whole = covered + ok, total + len(ref), whole + (ok == len(ref))
    return {"tokens": covered / max(1, total), "sentences": whole / max(1, len(references))}


def agreement(translator, pair: str, sources: list[str], max_new_tokens: int = 128) -> dict[str, float]:
    """Greedy translations of `pair` (`src-tgt`) with and without the target's shortlist, on the same
    engine: identical outputs, and the share of full-vocabulary tokens before the first difference."""
    from serve.engine.request import SamplingParams

    tok = translator.tokenizer
    src, tgt = (tok.language(code) for code in pair.split("-"))
    enc = [tok.encoder_ids(ids, src) for ids in tok.text_ids(sources)]
    prefix = [tok.decoder_prefix(tgt)] * len(enc)
    params = SamplingParams(max_new_tokens=max_new_tokens)
    full = translator.generate_ids(enc, prefix, params, target_lang=None)
    short = translator.generate_ids(enc, prefix, params, target_lang=tgt.code)
    same, before_diff, tokens = 0, 0, 0
    for a, b in zip(full, short, strict=True):
        same += a == b
        first = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        before_diff, tokens = before_diff + (len(a) if a == b else first), tokens + len(a)
    return {"identical": same / max(1, len(full)), "prefix_tokens": before_diff / max(1, tokens)}


def test_pair(lang: str, test_set: str) -> str | None:
    """The test pair whose references are in `lang`: en-<lang>, or for English the first <X>-en."""
    candidates = [f"en-{lang}"] if lang != "en" else [f"{x}-en" for x in calib_languages() if x != "en"]
    return next((p for p in candidates if all(f.is_file() for f in test_pair_paths(p, test_set))), None)


def build(ckpt: Path, langs: list[str] | None = None, corpora: dict[str, Path] | None = None, min_count: int = 1,
          agreement_samples: int = 32, test_set: str = "ntrex", device: str | None = None,
          overwrite: bool = False, progress: bool = True) -> dict:  # fmt: skip
    """Write the shortlist and its report into `ckpt`; returns the report."""
    ckpt = Path(ckpt)
    if not (ckpt / "decoder" / "config.json").is_file():
        raise CalibError(f"{ckpt} is not a converted checkpoint (no decoder/config.json)")
    tok = TranslationTokenizer(ckpt)
    vocab_size = json.loads((ckpt / "decoder" / "config.json").read_text())["vocab_size"]
    corpora = dict(corpora or {})
    for lang in langs or sorted({x for x in calib_languages() if x in tok.codes} | set(corpora)):
        if lang not in tok.codes:
            raise CalibError(f"the model has no language {lang!r}; it has: {', '.join(tok.codes)}")
        corpora.setdefault(lang, calib_path(lang))
        if not corpora[lang].is_file():
            raise CalibError(f"no corpus for {lang!r} at {corpora[lang]}; pass --corpus {lang}=PATH")
    if (ckpt / shortlist_file.FILENAME).exists() and not overwrite:
        raise CalibError(f"{ckpt / shortlist_file.FILENAME} exists (use --overwrite to replace it)")
    texts = {lang: read_lines(path) for lang, path in corpora.items()}
    lists = build_lists(tok, texts, vocab_size, min_count)
    source = ", ".join(f"{lang}={path}" for lang, path in sorted(corpora.items()))
    shortlist_file.write(ckpt, lists, vocab_size, {"source": source, "min_count": str(min_count)})

    translator = None
    if agreement_samples > 0:
        from serve.runtime.translator import Translator

        translator = Translator.load(ckpt, device=device, shortlist=True)
    report = {"checkpoint": str(ckpt), "vocab_size": vocab_size, "min_count": min_count, "test_set": test_set,
              "agreement_samples": agreement_samples, "languages": {}}  # fmt: skip
    for lang in tqdm(sorted(lists), desc="shortlist report", disable=not progress):
        entry = {"corpus": str(corpora[lang]), "corpus_lines": len(texts[lang]), "size": len(lists[lang]),
                 "vocab_share": len(lists[lang]) / vocab_size}  # fmt: skip
        pair = test_pair(lang, test_set)
        if pair is not None:
            sources, refs = (read_lines(path) for path in test_pair_paths(pair, test_set))
            entry["test_pair"] = pair
            entry["coverage"] = coverage(tok, set(lists[lang]), sources, refs)
            if translator is not None:
                entry["agreement"] = agreement(translator, pair, sources[:agreement_samples])
        report["languages"][lang] = entry
    (ckpt / "shortlist_report.json").write_text(json.dumps(report, indent=2))
    (ckpt / "shortlist_report.md").write_text(markdown(report))
    plot(report, ckpt / "shortlist_report.png")
    return report


def markdown(report: dict) -> str:
    rows = ["| language | tokens | share of vocab | ref. tokens covered | ref. sentences covered | "
            "identical outputs | tokens before first difference |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    pct = lambda d, k: f"{100 * d[k]:.1f}%" if d and k in d else "–"  # noqa: E731
    for lang, e in report["languages"].items():
        cov, agr = e.get("coverage"), e.get("agreement")
        rows.append(f"| {lang} | {e['size']} | {pct(e, 'vocab_share')} | {pct(cov, 'tokens')} | "
                    f"{pct(cov, 'sentences')} | {pct(agr, 'identical')} | {pct(agr, 'prefix_tokens')} |")  # fmt: skip
    return (f"# Output-vocabulary shortlists of `{report['checkpoint']}`\n\nCoverage: references of the "
            f"`{report['test_set']}` test set, into each language. Agreement: greedy en->X on "
            f"{report['agreement_samples']} sentences, with and without the list.\n\n" + "\n".join(rows) + "\n")  # fmt: skip


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = list(report["languages"])
    e = report["languages"]
    series = [("share of vocabulary", [e[x]["vocab_share"] for x in langs]),
              ("reference tokens covered", [e[x].get("coverage", {}).get("tokens", 0) for x in langs]),
              ("reference sentences covered", [e[x].get("coverage", {}).get("sentences", 0) for x in langs]),
              ("identical greedy outputs", [e[x].get("agreement", {}).get("identical", 0) for x in langs])]  # fmt: skip
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(langs) + 2), 4))
    width = 0.8 / len(series)
    for j, (label, vals) in enumerate(series):
        ax.bar([i + j * width for i in range(len(langs))], [100 * v for v in vals], width, label=label)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(langs))], langs)
    ax.set_ylabel("%")
    ax.set_title("output-vocabulary shortlists: size, coverage of references, agreement")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="python -m calib.shortlist",
        description="Write per-target-language output vocabularies (shortlist.safetensors) into a converted "
        "checkpoint, with a report of their size, their coverage of real reference translations and their "
        "agreement with the full vocabulary. Serve them with `python -m serve --shortlist`.",
        epilog="Example: python -m calib.shortlist --checkpoint out/mbart50 --langs en,zh,ar,ru",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="converted checkpoint directory")
    p.add_argument("--langs", help="comma-separated ISO codes (default: every language with a corpus)")
    p.add_argument("--corpus", action="append", default=[], metavar="LANG=PATH",
                   help="target-language text for LANG instead of $MT_DATA_ROOT/calib/LANG.txt; repeatable")  # fmt: skip
    p.add_argument("--min-count", type=int, default=1, help="corpus uses a token needs to enter the list")
    p.add_argument("--agreement-samples", type=int, default=32,
                   help="test sentences per language decoded with and without the list (0: skip)")  # fmt: skip
    p.add_argument("--test-set", default="ntrex", help="test set under $MT_DATA_ROOT/test for coverage")
    p.add_argument(
        "--device", default=None, help="torch device for the agreement run (default: cuda if present)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing shortlist")
    p.add_argument("--quiet", action="store_true", help="no progress bar or table")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        corpora = {lang: Path(path) for lang, path in (item.split("=", 1) for item in args.corpus)}
    except ValueError:
        parser.error("--corpus takes LANG=PATH")

    def work() -> None:
        report = build(args.checkpoint, args.langs.split(",") if args.langs else None, corpora, args.min_count,
                       args.agreement_samples, args.test_set, args.device, args.overwrite,
                       progress=not args.quiet)  # fmt: skip
        if not args.quiet:
            print(markdown(report))

    return run_cli("calib.shortlist", work, (CalibError,), "the shortlist may be written without its report")


if __name__ == "__main__":
    sys.exit(main())
