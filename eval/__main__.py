"""`python -m eval {run,regress,compare}`: BLEU/chrF++ per language pair, baselines and a regression gate.

Exit status: 0 success / gate passed, 1 gate failed, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import httpx

from convert.cli import OneLineParser
from eval.errors import EvalError

DATA_NOTE = (
    "Test data: $MT_DATA_ROOT/test/<set>/<src>-<tgt>.<src> (source) and .<tgt> (reference); "
    "MT_DATA_ROOT defaults to ../shared/data beside the project."
)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1: {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = OneLineParser(prog="python -m eval", description=__doc__, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    run = sub.add_parser(
        "run",
        help="translate test sets and score them",
        description=(
            "Translate the test sets of the given pairs with a converted checkpoint (in this process) or a "
            "running server (POST /translate), and score them with sacrebleu: corpus BLEU (tokenizer zh for "
            "Chinese targets, ja-mecab/ko-mecab if installed else char for Japanese/Korean, char for th/my/km, "
            "13a otherwise) and chrF++. Writes results.json (scores, signatures, settings, checkpoint sha256, "
            "quantization, data sha256, git revision, throughput), results.md, scores.png and "
            "hypotheses/<pair>.<tgt> to --out."
        ),
        epilog=DATA_NOTE,
    )
    src = run.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="converted checkpoint directory (python -m convert output)")
    src.add_argument("--url", help="base URL of a running server, e.g. http://127.0.0.1:8000")
    run.add_argument(
        "--pairs", help="comma-separated pairs, e.g. zh-en,en-zh,ar-en (default: all in the set)"
    )
    run.add_argument(
        "--set", dest="test_set", default="ntrex", help="test set under $MT_DATA_ROOT/test (ntrex)"
    )
    run.add_argument("--limit", type=positive_int, help="only the first N sentences of each pair")
    run.add_argument("--beam-size", type=positive_int, default=1)
    run.add_argument("--batch-size", type=positive_int, default=32, help="sentences per call / request (32)")
    run.add_argument("--max-new-tokens", type=positive_int, help="cap on generated tokens (runtime default)")
    run.add_argument("--out", type=Path, required=True, help="output directory (created; files overwritten)")
    run.add_argument("--name", help="label of this run in reports (default: checkpoint dir name / model id)")
    run.add_argument("--tokenize", help="BLEU tokenizer per target language, e.g. ja=char,ko=char")
    run.add_argument("--device", help="--model only: cuda or cpu (default: cuda if available)")
    run.add_argument("--dtype", help="--model only: compute dtype override (default: the checkpoint's)")
    run.add_argument("--concurrency", type=positive_int, default=1, help="--url only: requests in flight (1)")
    run.add_argument(
        "--timeout", type=non_negative_float, default=600.0, help="--url only: seconds per request"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    reg = sub.add_parser(
        "regress",
        help="gate a run against a stored baseline",
        description=(
            "Compare a run with a baseline pair by pair. Both are rescored from their hypotheses against the "
            "same references (sha256-checked), and sacrebleu's paired bootstrap resampling gives a p-value for "
            "each difference. Exit 1 when any metric of any pair drops by more than its tolerance (points), when "
            "a baseline pair is missing from the run, or when a pair is not comparable (different tokenizer or "
            "other signature field, test data sha256 or sentence count). The baseline is only written with "
            "--update, which makes the run the new baseline (hypotheses embedded) and prints what changed."
        ),
        epilog="A bare --baseline NAME means eval/baselines/NAME.json. " + DATA_NOTE,
    )
    reg.add_argument("--baseline", required=True, help="baseline JSON (or a NAME in eval/baselines)")
    reg.add_argument("--run", required=True, type=Path, help="run directory or its results.json")
    reg.add_argument("--tolerance", type=non_negative_float, default=0.5, help="allowed drop in points (0.5)")
    reg.add_argument("--pair-tolerance", help="per-pair tolerance, e.g. zh-en=1.0,sw-en=2")
    reg.add_argument("--metrics", default="bleu,chrf", help="metrics to gate: bleu, chrf or both (default)")
    reg.add_argument("--alpha", type=non_negative_float, default=0.05, help="significance level (0.05)")
    reg.add_argument(
        "--require-significant", action="store_true", help="fail a drop past tolerance only if significant"
    )
    reg.add_argument("--bootstrap-samples", type=positive_int, default=1000, help="resamples (1000)")
    reg.add_argument("--report", type=Path, help="also write the table as Markdown to this file")
    reg.add_argument("--update", action="store_true", help="write the run as the new baseline")

    cmp_ = sub.add_parser(
        "compare",
        help="runs side by side (e.g. fp16 vs int8_wo vs int4_awq)",
        description=(
            "Print a side-by-side table of BLEU and chrF++ per pair (later runs with their delta to the first) "
            "and, with --out, write compare.md and a grouped bar chart compare.png. Pairs scored on different "
            "data or with different signatures are listed as not comparable."
        ),
    )
    cmp_.add_argument("results", nargs="+", type=Path, help="run directories, results.json or baseline JSONs")
    cmp_.add_argument("--labels", help="comma-separated labels, one per result (default: run names)")
    cmp_.add_argument("--out", type=Path, help="directory for compare.md and compare.png")
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    from eval.backends import HttpBackend, RuntimeBackend
    from eval.data import data_root
    from eval.metrics import tokenizer_available
    from eval.report import run_markdown
    from eval.run import available_pairs, available_sets, evaluate, load_pair, parse_assignments, parse_pairs

    if args.url and (args.device or args.dtype):
        raise EvalError("--device and --dtype apply to --model only")
    pair_names = parse_pairs(args.pairs) if args.pairs else available_pairs(args.test_set)
    if not pair_names:
        sets = ", ".join(available_sets()) or "none"
        raise EvalError(
            f"no pairs in test set {args.test_set!r} under {data_root() / 'test'}; available sets: {sets}"
        )
    pairs = [load_pair(p, args.test_set, args.limit) for p in pair_names]
    tokenize = parse_assignments(args.tokenize, "--tokenize")
    for lang, name in tokenize.items():
        if not tokenizer_available(name):
            raise EvalError(
                f"--tokenize {lang}={name}: sacrebleu has no such tokenizer here (or lacks its extras)"
            )
    if args.model is not None:
        backend = RuntimeBackend(args.model, args.beam_size, args.max_new_tokens, args.device, args.dtype)
    else:
        backend = HttpBackend(
            args.url, args.beam_size, args.max_new_tokens, args.timeout, concurrency=args.concurrency
        )
    settings = {
        "test_set": args.test_set,
        "data_root": str(data_root().resolve()),
        "limit": args.limit,
        "beam_size": args.beam_size,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "concurrency": backend.max_concurrency,
    }
    results = evaluate(backend, pairs, args.out, settings, args.name, tokenize, progress=not args.no_progress)
    print(run_markdown(results))
    print(f"wrote {args.out}/results.json, results.md, scores.png, hypotheses/")
    return 0


def cmd_regress(args: argparse.Namespace) -> int:
    from eval.metrics import METRICS
    from eval.regress import baseline_path, changes, describe, gate, gate_table, parse_tolerances
    from eval.results import load_results, make_baseline, write_json
    from eval.run import parse_assignments

    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    if not metrics or any(m not in METRICS for m in metrics):
        raise EvalError(f"--metrics takes {', '.join(METRICS)} (comma-separated); got {args.metrics!r}")
    pair_tol = parse_tolerances(parse_assignments(args.pair_tolerance, "--pair-tolerance"))
    run = load_results(args.run)
    path = baseline_path(args.baseline)
    if not path.is_file():
        if not args.update:
            raise EvalError(f"baseline {path} not found (create it from this run with --update)")
        write_json(make_baseline(run), path)
        print(f"baseline created: {path}\n  " + "\n  ".join(changes(None, run)))
        return 0
    baseline = load_results(path)
    rows = gate(
        baseline,
        run,
        args.tolerance,
        pair_tol,
        metrics,
        args.alpha,
        args.require_significant,
        args.bootstrap_samples,
    )
    table = gate_table(rows)
    notes = [r.note for r in rows if r.note]
    failed = [r for r in rows if r.failed]
    verdict = (
        f"FAIL: {len(failed)} of {len(rows)} checks failed"
        if failed
        else f"PASS: {len(rows)} checks within tolerance"
    )
    text = (
        f"baseline  {describe(baseline)}\nrun       {describe(run)}\n\n{table}"
        + ("\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else "")
        + f"\n{verdict}\n"
    )
    print(text, end="")
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text, encoding="utf-8")
    if args.update:
        write_json(make_baseline(run, baseline), path)
        print(f"\nbaseline updated: {path}\n  " + "\n  ".join(changes(baseline, run)))
        return 0
    return 1 if failed else 0


def cmd_compare(args: argparse.Namespace) -> int:
    from eval.report import bar_chart, compare_markdown
    from eval.results import label, load_results

    docs = [load_results(p) for p in args.results]
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else [label(d) for d in docs]
    if len(labels) != len(docs):
        raise EvalError(f"--labels has {len(labels)} labels for {len(docs)} results")
    seen: dict[str, int] = {}
    for i, lab in enumerate(labels):  # keep labels unique so chart legends stay readable
        seen[lab] = seen.get(lab, 0) + 1
        if seen[lab] > 1:
            labels[i] = f"{lab} ({seen[lab]})"
    text = compare_markdown(docs, labels)
    print(text, end="")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compare.md").write_text(text, encoding="utf-8")
        bar_chart(docs, args.out / "compare.png", labels, title="BLEU / chrF++ per pair")
        print(f"\nwrote {args.out}/compare.md, compare.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"run": cmd_run, "regress": cmd_regress, "compare": cmd_compare}
    try:
        return commands[args.command](args)
    except (EvalError, OSError, ValueError, httpx.HTTPError) as err:
        message = " ".join(str(err).split()) or err.__class__.__name__
        print(f"python -m eval {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
