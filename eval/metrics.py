"""Corpus BLEU and chrF++ with sacrebleu, the BLEU tokenizer chosen by target language.

Every score carries its sacrebleu signature so that two numbers are only ever compared
when they were computed the same way. Tokenizer policy (by target language):

- `zh` -> `zh` (sacrebleu's Chinese tokenizer: CJK characters split, the rest 13a).
- `ja` -> `ja-mecab`, `ko` -> `ko-mecab` when their optional dependencies are installed
  (`pip install "sacrebleu[ja]"` / `"sacrebleu[ko]"`), else `char`: BLEU on whitespace-free
  scripts with `13a` would score whole sentences as single tokens. The choice lands in
  the signature (`tok:...`), so a baseline made with MeCab never silently passes against
  a run scored with `char`.
- `th`, `my`, `km` (no word spacing, no sacrebleu tokenizer) -> `char`.
- anything else -> `13a`, sacrebleu's default (WMT standard).

chrF++ (`word_order=2`) needs no tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from sacrebleu.metrics import BLEU, CHRF

DEFAULT_TOKENIZER = "13a"
# target language -> (preferred tokenizer, fallback when its dependencies are missing)
TOKENIZERS: dict[str, tuple[str, str]] = {
    "zh": ("zh", "zh"),
    "ja": ("ja-mecab", "char"),
    "ko": ("ko-mecab", "char"),
    "th": ("char", "char"),
    "my": ("char", "char"),
    "km": ("char", "char"),
}
METRICS = ("bleu", "chrf")
METRIC_NAMES = {"bleu": "BLEU", "chrf": "chrF++"}


@cache
def tokenizer_available(name: str) -> bool:
    """Whether sacrebleu can build tokenizer `name` here (MeCab ones need extra packages)."""
    try:
        BLEU(tokenize=name)
    except (RuntimeError, ImportError, KeyError):
        return False
    return True


def bleu_tokenizer(tgt_lang: str, overrides: dict[str, str] | None = None) -> str:
    """The BLEU tokenizer for a target language: an explicit override, else the policy above."""
    if overrides and tgt_lang in overrides:
        return overrides[tgt_lang]
    preferred, fallback = TOKENIZERS.get(tgt_lang, (DEFAULT_TOKENIZER, DEFAULT_TOKENIZER))
    return preferred if tokenizer_available(preferred) else fallback


def make_metrics(tokenize: str) -> dict[str, BLEU | CHRF]:
    """Fresh sacrebleu metric objects, keyed like the JSON (`bleu`, `chrf`)."""
    return {"bleu": BLEU(tokenize=tokenize), "chrf": CHRF(word_order=2)}


@dataclass
class PairScore:
    """Scores of one system on one language pair, with what is needed to reproduce them."""

    bleu: float
    chrf: float
    signatures: dict[str, str]  # metric -> sacrebleu signature string
    tokenize: str
    bleu_line: str  # sacrebleu's full BLEU line (n-gram precisions, BP, lengths)


def score_corpus(hyps: list[str], refs: list[str], tokenize: str) -> PairScore:
    """Corpus BLEU and chrF++ of aligned hypotheses and (single) references."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
    metrics = make_metrics(tokenize)
    bleu = metrics["bleu"].corpus_score(hyps, [refs])
    chrf = metrics["chrf"].corpus_score(hyps, [refs])
    return PairScore(
        bleu=round(bleu.score, 4),
        chrf=round(chrf.score, 4),
        signatures={name: str(m.get_signature()) for name, m in metrics.items()},
        tokenize=tokenize,
        bleu_line=str(bleu),
    )


def parse_signature(signature: str) -> dict[str, str]:
    """`nrefs:1|tok:zh|version:2.6.0` -> {"nrefs": "1", "tok": "zh", "version": "2.6.0"}."""
    return dict(item.split(":", 1) for item in signature.split("|") if ":" in item)


def signature_differences(a: str, b: str) -> list[str]:
    """Fields in which two signatures differ, ignoring the sacrebleu version.

    The gate rescores both sides with the installed sacrebleu, so a version change
    cannot move a delta; any other field (tokenizer, case, n-gram orders) can.
    """
    pa, pb = parse_signature(a), parse_signature(b)
    keys = sorted((set(pa) | set(pb)) - {"version"})
    return [f"{k} {pa.get(k, '-')} vs {pb.get(k, '-')}" for k in keys if pa.get(k) != pb.get(k)]


@dataclass
class PairedResult:
    """Baseline and system scores recomputed from hypotheses, and the bootstrap p-value."""

    baseline: float
    system: float
    p_value: float


def paired_bootstrap(
    baseline_hyps: list[str], system_hyps: list[str], refs: list[str], tokenize: str, n_samples: int = 1000
) -> dict[str, PairedResult]:
    """sacrebleu's paired bootstrap resampling (Koehn 2004) of a system against a baseline.

    Seeded by `SACREBLEU_SEED` (sacrebleu's default 12345), so the gate is deterministic.
    """
    from sacrebleu.significance import PairedTest

    if not (len(baseline_hyps) == len(system_hyps) == len(refs)):
        raise ValueError("baseline, system and references differ in length")
    metrics = make_metrics(tokenize)
    test = PairedTest(
        [("baseline", baseline_hyps), ("system", system_hyps)],
        metrics,
        [refs],
        test_type="bs",
        n_samples=n_samples,
    )
    _, scores = test()
    # sacrebleu renames the metrics (`BLEU`, `chrF2++`) but keeps their order after `System`.
    columns = [scores[key] for key in scores if key != "System"]
    # sacrebleu counts resamples whose difference strictly exceeds the observed one, which gives
    # p = 1/(n+1) ("significant") when the scores are identical; no difference is no evidence.
    return {
        name: PairedResult(
            baseline=col[0].score,
            system=col[1].score,
            p_value=1.0 if abs(col[0].score - col[1].score) < 1e-9 else col[1].p_value,
        )
        for name, col in zip(metrics, columns, strict=True)
    }


def pair_mismatches(base: dict, other: dict) -> list[str]:
    """Why two results of one pair are not comparable: empty when they are.

    Sentence count, source/reference sha256 and the metric signatures (tokenizer, case,
    n-gram orders...; the sacrebleu version aside, since the gate rescores both) must agree.
    """
    problems = []
    if base.get("sentences") != other.get("sentences"):
        problems.append(f"sentences {base.get('sentences')} vs {other.get('sentences')}")
    for side in ("source", "reference"):
        a, b = base["data"][side]["sha256"], other["data"][side]["sha256"]
        if a != b:
            problems.append(f"{side} sha256 {a[:12]} vs {b[:12]}")
    for metric in METRICS:
        diffs = signature_differences(base["signatures"][metric], other["signatures"][metric])
        problems += [f"{METRIC_NAMES[metric]} {d}" for d in diffs]
    return problems
