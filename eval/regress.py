"""`python -m eval regress`: the quality gate of a run against a stored baseline.

Both sides are rescored from their hypotheses against the same (hash-checked) references,
and sacrebleu's paired bootstrap says whether a difference is more than resampling noise.
A pair fails when a metric drops by more than its tolerance (in points); a pair missing
from the run, or scored on different data or with a different signature, fails too —
an incomparable number is never a pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eval.errors import EvalError
from eval.metrics import METRIC_NAMES, METRICS, pair_mismatches, paired_bootstrap
from eval.provenance import quant_label
from eval.results import references

EPS = 1e-9


@dataclass
class GateRow:
    pair: str
    metric: str | None
    verdict: str  # ok | FAIL | MISSING | MISMATCH | new
    failed: bool
    baseline: float | None = None
    now: float | None = None
    p_value: float | None = None
    significant: bool | None = None
    tolerance: float | None = None
    note: str = ""

    @property
    def delta(self) -> float | None:
        return None if self.baseline is None or self.now is None else self.now - self.baseline


def gate(
    baseline: dict,
    run: dict,
    tolerance: float = 0.5,
    pair_tolerance: dict[str, float] | None = None,
    metrics: tuple[str, ...] = METRICS,
    alpha: float = 0.05,
    require_significant: bool = False,
    n_samples: int = 1000,
) -> list[GateRow]:
    """One row per (pair, metric) of the baseline, plus rows for pairs only the run has."""
    pair_tolerance = pair_tolerance or {}
    unknown = sorted(set(pair_tolerance) - set(baseline["pairs"]))
    if unknown:
        raise EvalError(
            f"--pair-tolerance names {', '.join(unknown)}, not in the baseline "
            f"(its pairs: {', '.join(baseline['pairs'])})"
        )
    rows: list[GateRow] = []
    test_set = run.get("settings", {}).get("test_set")
    for pair, base in baseline["pairs"].items():
        now = run["pairs"].get(pair)
        if now is None:
            rows.append(
                GateRow(pair, None, "MISSING", True, note=f"{pair} is in the baseline but not in the run")
            )
            continue
        problems = pair_mismatches(base, now)
        if problems:
            rows.append(
                GateRow(pair, None, "MISMATCH", True, note=f"{pair} not comparable: {'; '.join(problems)}")
            )
            continue
        refs = references(now, test_set, pair)
        tested = paired_bootstrap(base["hypotheses"], now["hypotheses"], refs, base["tokenize"], n_samples)
        tol = pair_tolerance.get(pair, tolerance)
        for metric in metrics:
            res = tested[metric]
            significant = res.p_value < alpha
            dropped = res.baseline - res.system > tol + EPS
            failed = dropped and (significant or not require_significant)
            verdict = "FAIL" if failed else ("ok (drop not significant)" if dropped else "ok")
            note = ""
            if abs(res.baseline - base[metric]) > 0.01:
                note = (
                    f"{pair} {METRIC_NAMES[metric]}: baseline rescored {res.baseline:.2f}, stored "
                    f"{base[metric]:.2f} (sacrebleu {baseline.get('environment', {}).get('sacrebleu')} then)"
                )
            rows.append(
                GateRow(
                    pair,
                    metric,
                    verdict,
                    failed,
                    res.baseline,
                    res.system,
                    res.p_value,
                    significant,
                    tol,
                    note,
                )
            )
    for pair in run["pairs"]:
        if pair not in baseline["pairs"]:
            rows.append(GateRow(pair, None, "new", False, note=f"{pair} is not in the baseline (not gated)"))
    return rows


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def gate_table(rows: list[GateRow]) -> str:
    """The gate as an aligned Markdown table (readable in a terminal, pastes into a PR)."""
    header = ["pair", "metric", "baseline", "now", "delta", "p-value", "significant", "tolerance", "verdict"]
    body = [
        [
            r.pair,
            METRIC_NAMES.get(r.metric or "", "-"),
            _num(r.baseline, ".2f"),
            _num(r.now, ".2f"),
            _num(r.delta, "+.2f"),
            _num(r.p_value, ".4f"),
            "-" if r.significant is None else ("yes" if r.significant else "no"),
            _num(r.tolerance, ".2f"),
            r.verdict,
        ]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    right = {2, 3, 4, 5, 7}

    def line(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    rule = (
        "|"
        + "|".join(("-" * (w + 1) + ":") if i in right else "-" * (w + 2) for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([line(header), rule, *(line(b) for b in body)]) + "\n"


def identity(doc: dict) -> dict[str, str]:
    """What was evaluated and how, as short strings (the name and the date aside)."""
    model, settings = doc.get("model", {}), doc.get("settings", {})
    return {
        "model": str(model.get("id") or "?"),
        "quant": quant_label(model.get("quant_algo"), model.get("dtype"))
        if model.get("source") != "url"
        else "?",
        "checkpoint": (model.get("checkpoint_sha256") or "-")[:12],
        "git": ((doc.get("environment", {}).get("git") or {}).get("revision") or "-")[:12],
        "beam": str(settings.get("beam_size", "?")),
    }


def describe(doc: dict) -> str:
    """One line saying which system a results document is."""
    fields = ", ".join(f"{k} {v}" for k, v in identity(doc).items())
    return f"{doc.get('name', '?')}: {fields}, {doc.get('created', '?')}"


def changes(old: dict | None, new: dict) -> list[str]:
    """What an update moves: scores per pair, pairs added or removed, and what was evaluated."""
    if old is None:
        return [f"created with pairs {', '.join(new['pairs'])}"]
    out = []
    for pair, entry in new["pairs"].items():
        prev = old["pairs"].get(pair)
        if prev is None:
            out.append(f"added {pair}: BLEU {entry['bleu']:.2f}, chrF++ {entry['chrf']:.2f}")
            continue
        moves = [
            f"{METRIC_NAMES[m]} {prev[m]:.2f} -> {entry[m]:.2f} ({entry[m] - prev[m]:+.2f})"
            for m in METRICS
            if abs(entry[m] - prev[m]) > EPS
        ]
        problems = pair_mismatches(prev, entry)
        if moves or problems:
            out.append(f"{pair}: " + ", ".join(moves + [f"changed {p}" for p in problems]))
    out += [f"removed {pair}" for pair in old["pairs"] if pair not in new["pairs"]]
    before, after = identity(old), identity(new)
    out += [f"{key} {before[key]} -> {after[key]}" for key in before if before[key] != after[key]]
    return out or ["no score changes"]


def parse_tolerances(assignments: dict[str, str]) -> dict[str, float]:
    out = {}
    for pair, value in assignments.items():
        try:
            out[pair] = float(value)
        except ValueError:
            raise EvalError(f"--pair-tolerance {pair}={value}: not a number") from None
        if out[pair] < 0:
            raise EvalError(f"--pair-tolerance {pair}={value}: must be >= 0")
    return out


def baseline_path(path: str) -> Path:
    """`--baseline` as given; a bare name means `eval/baselines/<name>.json`."""
    p = Path(path)
    if p.suffix != ".json" and len(p.parts) == 1:
        p = Path(__file__).resolve().parent / "baselines" / f"{path}.json"
    return p
