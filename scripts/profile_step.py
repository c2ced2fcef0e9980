"""Where a decode step's time goes: GPU kernels of decode graphs, host time of an engine step.

Prints (and writes as JSON to --out) the kernels of one greedy decode graph replay at each of
--kernel-rows grouped by name with their share of the step's critical path and their summed GPU time
(`group_kernels`), every graph's replay time (by rows and K), the
time of the engine's encoder pass over 1 to 64 sources against one eager packed pass and the kernels of
its pass over 64, how
a closed loop at --rows concurrent requests splits its wall time between host work and waiting for
the device, where in that loop the device idles (each gap between its kernels attributed to the engine
phase the host was in; with a gzipped Chrome trace of the loop), and the host functions that dominate
an engine step there (cProfile).

    python scripts/profile_step.py --out out/profile          # GPU machine, mBART-large shape
    python scripts/profile_step.py --smoke --out /tmp/prof    # tiny model on CPU
    python scripts/profile_step.py --quant int4_awq --replay-only   # int4 graphs at every row bucket

--quant quantizes the random checkpoint weight-only by round-to-nearest (`calib.rtn`), as
`scripts/bench.py --variants int4_awq=rtn` does: the same kernels and bytes as a calibrated one.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import functools
import gzip
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from calib.rtn import quantize_checkpoint_rtn  # noqa: E402
from convert.__main__ import convert_checkpoint  # noqa: E402
from convert.checkpoint import read_config  # noqa: E402
from convert.tiny import LARGE_DIMS, build_tiny_mbart  # noqa: E402
from scripts.bench import graph_replay_ms, run_engine, scratch_dir, sync, workload  # noqa: E402
from serve.engine.core import Engine  # noqa: E402
from serve.runtime.decode_step import LaunchedStep  # noqa: E402
from serve.runtime.translator import Translator  # noqa: E402


def kernel_table(fn, device: torch.device) -> list[dict]:
    """GPU kernels of one call of `fn` (after one unprofiled call), grouped by name (`group_kernels`)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    cuda = [e for e in prof.events() if e.device_type.name == "CUDA"]
    return group_kernels([(e.name[:90], e.time_range.start, e.device_time) for e in cuda])


def group_kernels(spans: list[tuple[str, float, float]]) -> list[dict]:
    """(name, start, duration) of kernels, in µs, grouped by name, largest share of the critical path first:
    how many ran, their summed durations ("us"), and their share of the critical path ("path_us"), each
    kernel's end minus the latest end before it (the gap before it included, nothing if it ended earlier).
    With programmatic dependent launch a kernel starts while its predecessor runs, so durations overlap and
    their sum exceeds the span (the 64-row fp16 graph: 1.2-1.5 ms of durations in a 0.94-1.10 ms replay);
    the shares add up to the span."""
    groups: dict[str, dict] = {}
    ordered = sorted(spans, key=lambda s: s[1])
    latest = ordered[0][1] if ordered else 0.0
    for name, start, duration in ordered:
        end = start + duration
        g = groups.setdefault(name, {"name": name, "count": 0, "us": 0.0, "path_us": 0.0})
        g["count"] += 1
        g["us"] += duration
        g["path_us"] += max(0.0, end - latest)
        latest = max(latest, end)
    return sorted(groups.values(), key=lambda g: -g["path_us"])


def print_kernels(ks: list[dict]) -> None:
    print("| kernel | count | share of the critical path, us | summed durations, us |\n|---|---|---|---|")
    for k in ks:
        print(f"| {k['name']} | {k['count']} | {k['path_us']:.1f} | {k['us']:.1f} |")


def replay_times(tr: Translator, n: int = 50) -> dict[str, float]:
    """ms per replay of every captured decode graph, by rows bucket and K, on the inputs each graph last ran
    (after a closed loop, the 64-row bucket's are its last step's; a bucket no step used replays padding
    rows of one position)."""
    return {f"{r} rows, k={k}": graph_replay_ms(tr, r, k, n) for r, k in sorted(tr.engine.runner.graphs)}


@contextlib.contextmanager
def one_pass(tr: Translator, items, n: int):
    """(sources, slots): the first n sources, fewer where they exceed `max_num_tokens` (the engine admits
    no larger pass), with KV blocks for them, freed on exit."""
    eng = tr.engine
    sources = [enc for enc, _ in items[:n]]
    while sum(map(len, sources)) > eng.config.max_num_tokens:
        sources.pop()
    blocks = [eng.pool.allocator.allocate(eng.pool.blocks_for(len(s))) for s in sources]
    try:
        yield sources, [eng.pool.slots(b, 0, len(s)) for b, s in zip(blocks, sources, strict=True)]
    finally:
        for b in blocks:
            eng.pool.allocator.free(b)


def encoder_kernels(tr: Translator, items, n: int = 64) -> dict:
    """GPU kernels of the engine's encoder pass over (up to) n sources: its bucket's graph on CUDA."""
    run = tr.engine.encode_runner
    with one_pass(tr, items, n) as (sources, slots), torch.inference_mode():
        kernels = kernel_table(lambda: run.run(sources, slots), tr.device)
    return {
        "sources": len(sources),
        "tokens": sum(map(len, sources)),
        "bucket": run.bucket(sources),
        "kernels": kernels,
    }


def encoder_passes(tr: Translator, items, counts=(1, 2, 4, 8, 16, 32, 64)) -> list[dict]:
    """ms (synchronized, median of 7) of the engine's encoder pass with its cross-attention K/V writes over
    the first n sources (fewer where they exceed `max_num_tokens`), for each n, and of one eager packed
    pass over them: what a step that admits n requests spends before its next decode step goes out."""
    from serve.runtime.encode_step import EncodeRunner

    eng = tr.engine
    run = eng.encode_runner
    eager = EncodeRunner(eng.encoder, eng.decoder, eng.pool, run.max_sources, 0, run.max_len, bucketed=False)

    def median_ms(fn, *args) -> float:
        times = []
        for _ in range(7):
            sync(tr.device)
            start = time.perf_counter()
            fn(*args)
            sync(tr.device)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    out = []
    for n in (c for c in counts if c <= len(items)):
        with one_pass(tr, items, n) as (sources, slots), torch.inference_mode():
            row = {"sources": len(sources), "tokens": sum(map(len, sources)), "bucket": run.bucket(sources)}
            row["engine_ms"] = median_ms(run.run, sources, slots)
            row["eager_ms"] = median_ms(eager.run, sources, slots)
        out.append(row)
    return out


def host_split(tr: Translator, items, rows: int, new_tokens: int) -> dict:
    """A closed loop at `rows` clients (no profiler): its wall time, the part the host spent waiting
    for decode steps, and the rest (host work) per engine step. Host-bound where waiting is small."""
    waited, wait = [0.0], LaunchedStep.wait

    def timed(step: LaunchedStep):
        start = time.perf_counter()
        try:
            return wait(step)
        finally:
            waited[0] += time.perf_counter() - start

    steps = tr.engine.steps
    LaunchedStep.wait = timed
    try:
        res = run_engine(tr, items[: 2 * rows], rows, new_tokens)
    finally:
        LaunchedStep.wait = wait
    steps = tr.engine.steps - steps
    return {"tokens_per_s": res["tokens_per_s"], "wall_s": res["wall_s"], "waiting_s": waited[0], "steps": steps,
            "host_ms_per_step": (res["wall_s"] - waited[0]) / steps * 1e3}  # fmt: skip


@contextlib.contextmanager
def engine_phases_labelled(phases=("_admit", "_encode", "_launch_ahead", "_launch", "_collect")):
    """Name the engine's phases in profiler traces (`engine.admit`, ...), without touching its code."""
    from torch.profiler import record_function

    def labelled(name, fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with record_function(f"engine.{name.lstrip('_')}"):
                return fn(*args, **kwargs)

        return run

    saved = {name: getattr(Engine, name) for name in phases}
    for name, fn in saved.items():
        setattr(Engine, name, labelled(name, fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(Engine, name, fn)


def device_timeline(tr: Translator, items, rows: int, new_tokens: int, out: Path) -> dict:
    """Where the device idles in a closed loop at `rows` clients (under the profiler, which slows the
    host a little): the gaps between its kernels and copies, each attributed to the innermost engine
    phase the host was in when the gap began. Writes the loop's Chrome trace to `out`/trace.json.gz."""
    from torch.profiler import ProfilerActivity, profile

    with engine_phases_labelled(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        res = run_engine(tr, items[: 2 * rows], rows, new_tokens)
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))
    with trace.open("rb") as src, gzip.open(out / "trace.json.gz", "wb") as dst:
        dst.write(src.read())
    trace.unlink()
    events = prof.events()
    device = [(e.time_range.start, e.time_range.end) for e in events if e.device_type.name == "CUDA"]
    phases = [(e.time_range.start, e.time_range.end, e.name) for e in events if e.name.startswith("engine.")]
    return {"tokens_per_s": res["tokens_per_s"], **idle_gaps(device, phases)}


def idle_gaps(device: list[tuple[float, float]], phases: list[tuple[float, float, str]]) -> dict:
    """Device busy time, and its idle gaps (µs ranges in, ms out) by the innermost host phase that was
    running when each gap began."""
    device, phases = sorted(device), sorted(phases)
    idle: dict[str, float] = {}
    gaps, end = [], device[0][1]
    for start, stop in device[1:]:
        if start > end:
            inside = [p for p in phases if p[0] <= end < p[1]]
            phase = max(inside)[2] if inside else "outside the engine"
            idle[phase] = idle.get(phase, 0.0) + (start - end) / 1e3
            gaps.append({"at_ms": (end - device[0][0]) / 1e3, "ms": (start - end) / 1e3, "phase": phase})
        end = max(end, stop)
    span = (end - device[0][0]) / 1e3
    return {"span_ms": span, "device_busy_ms": span - sum(idle.values()),
            "idle_ms_by_host_phase": dict(sorted(idle.items(), key=lambda kv: -kv[1])),
            "largest_gaps": sorted(gaps, key=lambda g: -g["ms"])[:20]}  # fmt: skip


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
    ap.add_argument("--quant", choices=["int8_wo", "int4_awq"], help="quantize the random checkpoint (RTN)")
    ap.add_argument("--rows", type=int, default=64, help="concurrent requests for the host profile")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--kernel-rows", default="1,64", help="row buckets whose graphs' kernels are listed")
    ap.add_argument(
        "--replay-only",
        action="store_true",
        help="print every graph's replay time after warm-up, then stop. The graphs then replay the inputs "
        "they were captured with, padding rows of one position, so attention is nearly free; the full run times "
        "them after a closed loop",
    )
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    ckpt = args.ckpt
    if ckpt is None:
        work = scratch_dir("profile-")
        hf = build_tiny_mbart(work / "hf", **({} if args.smoke else LARGE_DIMS))
        ckpt = work / "ckpt"
        convert_checkpoint(str(hf), ckpt, 1, "float32" if args.smoke else "float16", progress=False)
        if args.quant:
            ckpt = quantize_checkpoint_rtn(ckpt, work / args.quant, args.quant)
    elif args.quant:
        ap.error("--quant applies to the random checkpoint; give --ckpt a quantized checkpoint instead")
    tr = Translator.load(ckpt, device=device, max_batch_size=args.rows)
    tr.engine.warm_up()  # every graph and encoder kernel, so that the host profile compiles nothing
    if args.replay_only and cuda:
        print({g: round(ms, 4) for g, ms in replay_times(tr, n=200).items()})
        return
    items = workload(tr.tokenizer, 2 * args.rows)
    run_engine(tr, items[: args.rows], args.rows, 4)
    quant_algo = (read_config(ckpt / "decoder").get("quantization") or {}).get("quant_algo")
    report: dict = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "rows": args.rows,
        "quant_algo": quant_algo,
    }
    if cuda:
        report["replay_ms"] = replay_times(tr)
        rows = [r for r in map(int, args.kernel_rows.split(",")) if (r, 1) in tr.engine.runner.graphs]
        report["kernels"] = {
            r: kernel_table(tr.engine.runner.graphs[r, 1][0].replay, tr.device) for r in rows
        }
        report["encoder_kernels"] = encoder_kernels(tr, items)
    report["encoder_passes"] = encoder_passes(tr, items)
    report["host_split"] = host_split(tr, items, args.rows, args.new_tokens)
    report["tokens_per_s"], report["host_profile"] = host_profile(tr, items, args.rows, args.new_tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    if cuda:
        report["device_timeline"] = device_timeline(tr, items, args.rows, args.new_tokens, args.out)
    (args.out / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    if cuda:
        for rows, ks in report["kernels"].items():
            print(f"{rows}-row greedy graph: {sum(k['count'] for k in ks)} kernels, "
                  f"{sum(k['path_us'] for k in ks):.0f} us from the first start to the last end")  # fmt: skip
            print_kernels(ks[:25])
        enc = report["encoder_kernels"]
        print(f"encoder pass over {enc['sources']} sources, {enc['tokens']} tokens (bucket {enc['bucket']}): "
              f"{sum(k['count'] for k in enc['kernels'])} kernels, {sum(k['path_us'] for k in enc['kernels']):.0f} us")  # fmt: skip
        print_kernels(enc["kernels"][:12])
        print("replay ms:", {g: round(v, 3) for g, v in report["replay_ms"].items()})
        t = report["device_timeline"]
        print(f"device timeline at {args.rows} clients (profiled, {t['tokens_per_s']:.0f} tok/s): busy "
              f"{t['device_busy_ms']:.1f} of {t['span_ms']:.1f} ms; idle ms by host phase:",
              {k: round(v, 2) for k, v in t["idle_ms_by_host_phase"].items()})  # fmt: skip
    print("| sources | tokens | bucket | engine's pass ms | eager packed ms |\n|---|---|---|---|---|")
    for r in report["encoder_passes"]:
        print(
            f"| {r['sources']} | {r['tokens']} | {r['bucket'] or 'eager'} | {r['engine_ms']:.2f} | {r['eager_ms']:.2f} |"
        )
    split = report["host_split"]
    print(f"closed loop at {args.rows} clients: {split['tokens_per_s']:.0f} tok/s, {split['steps']} steps in "
          f"{split['wall_s'] * 1e3:.0f} ms, {split['waiting_s'] * 1e3:.0f} ms of them waiting for the device, "
          f"host work {split['host_ms_per_step']:.2f} ms per step; under cProfile {report['tokens_per_s']:.0f} tok/s")  # fmt: skip
    print(report["host_profile"])


if __name__ == "__main__":
    main()
