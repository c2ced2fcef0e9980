"""Where a decode step's time goes: GPU kernels of the batch-1 graph, host time of an engine step.

Prints (and writes as JSON to --out) the kernels of one batch-1 decode graph replay grouped by
name with their GPU time, the graph's replay time at several row counts, and the host
functions that dominate an engine step at --rows concurrent requests (cProfile).

    python scripts/profile_step.py --out out/profile          # GPU machine, mBART-large shape
    python scripts/profile_step.py --smoke --out /tmp/prof    # tiny model on CPU
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from convert.__main__ import convert_checkpoint  # noqa: E402
from convert.tiny import LARGE_DIMS, build_tiny_mbart  # noqa: E402
from scripts.bench import graph_replay_ms, run_engine, sync, workload  # noqa: E402
from serve.runtime.translator import Translator  # noqa: E402


def kernel_table(tr: Translator, rows: int) -> list[dict]:
    """GPU kernels of one replay of the `rows` graph, grouped by name, slowest first."""
    from torch.profiler import ProfilerActivity, profile

    graph = tr.engine.runner.graphs[rows][0]
    graph.replay()
    sync(tr.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        sync(tr.device)
    groups: dict[str, dict] = {}
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        g = groups.setdefault(e.name[:90], {"name": e.name[:90], "count": 0, "us": 0.0})
        g["count"] += 1
        g["us"] += e.device_time
    return sorted(groups.values(), key=lambda g: -g["us"])


def host_profile(tr: Translator, items, rows: int, new_tokens: int) -> tuple[float, str]:
    """tokens/s of a closed loop at `rows` clients under cProfile, and its top functions."""
    prof = cProfile.Profile()
    prof.enable()
    res = run_engine(tr, items[: 2 * rows], rows, new_tokens)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
    return res["tokens_per_s"], s.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/profile"))
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU (no kernel table)")
    ap.add_argument("--ckpt", type=Path, help="a converted checkpoint (default: random mBART-large, fp16)")
    ap.add_argument("--rows", type=int, default=64, help="concurrent requests for the host profile")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    ckpt = args.ckpt
    if ckpt is None:
        work = Path(tempfile.mkdtemp(prefix="profile-"))
        hf = build_tiny_mbart(work / "hf", **({} if args.smoke else LARGE_DIMS))
        ckpt = work / "ckpt"
        convert_checkpoint(str(hf), ckpt, 1, "float32" if args.smoke else "float16", progress=False)
    tr = Translator.load(ckpt, device=device, max_batch_size=args.rows)
    items = workload(tr.tokenizer, 2 * args.rows)
    run_engine(tr, items[:4], 1, 8)
    report: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "rows": args.rows}
    run_engine(tr, items[: args.rows], args.rows, 4)  # capture the graphs this load uses
    if cuda:
        report["replay_ms"] = {r: graph_replay_ms(tr, r) for r in sorted(tr.engine.runner.graphs)}
        report["kernels_batch1"] = kernel_table(tr, 1)
    report["tokens_per_s"], report["host_profile"] = host_profile(tr, items, args.rows, args.new_tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    if cuda:
        ks = report["kernels_batch1"]
        print(
            f"batch-1 graph: {sum(k['count'] for k in ks)} kernels, {sum(k['us'] for k in ks):.0f} us of GPU time"
        )
        print("| kernel | count | us |\n|---|---|---|")
        for k in ks[:25]:
            print(f"| {k['name']} | {k['count']} | {k['us']:.1f} |")
        print("replay ms by rows:", {r: round(v, 3) for r, v in report["replay_ms"].items()})
    print(f"closed loop at {args.rows} clients: {report['tokens_per_s']:.0f} tok/s")
    print(report["host_profile"])


if __name__ == "__main__":
    main()
