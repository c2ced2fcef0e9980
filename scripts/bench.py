"""Benchmark: HF `generate` vs this runtime's in-flight engine, same GPU, same run, same work.

Model: mBART-large-50 shape with random weights, converted by `convert/`. Inputs: real
sentences of several languages from the shared data. Every contender generates exactly
`--new-tokens` tokens per request (min_new_tokens = max_new_tokens), so work is identical.

Reported per contender: decode step time at batch 1 next to the memory-bandwidth floor
(decoder weight bytes read per step / measured copy bandwidth), generated tokens/s and
p50/p99 latency and time to first token at each concurrency (closed loop), peak GPU memory,
weight memory, and KV-pool capacity. Each level and the batch-1 step are measured --repeats times:
a level of a few hundred requests runs for under a second, and one run's tokens/s can be 20% off
the next one's, so the report gives the median run and every run's tokens/s beside it.
Writes bench.json and bench.png to --out.

    python scripts/bench.py --out out/bench                 # GPU machine
    python scripts/bench.py --smoke --out /tmp/bench        # tiny model on CPU (a test runs this)
    python scripts/bench.py --tp-size 2 --variants float16 --no-hf --concurrency 1,64   # two GPUs

With --tp-size N > 1, each variant is served as the server serves it (`PytorchBackend`, one process
and GPU per rank) at TP=1 and at TP=N on the same machine, and the report says whether TP=N
generated exactly TP=1's tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import gc
import itertools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn.attention import sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from convert.__main__ import convert_checkpoint  # noqa: E402
from convert.tiny import LARGE_DIMS, build_tiny_mbart  # noqa: E402
from eval.data import read_lines, test_pair_paths  # noqa: E402
from serve.engine.request import GenerationRequest, SamplingParams  # noqa: E402
from serve.runtime import shortlist  # noqa: E402
from serve.runtime.kv_cache import KVPool  # noqa: E402
from serve.runtime.model import MASKED_SDPA_BACKENDS  # noqa: E402
from serve.runtime.translator import Translator  # noqa: E402
from serve.tokenizer import TranslationTokenizer  # noqa: E402

LANGS = ["zh", "ar", "ru", "de", "fr", "hi", "sw", "vi"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read and written."""
    if device.type != "cuda":
        return float("nan")
    a = torch.empty(2**29, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync(device)
    return 2 * a.numel() * 10 / (time.perf_counter() - t)


def decoder_step_bytes(decoder: torch.nn.Module, lm_head_share: float = 1.0) -> int:
    """Weight bytes one decode step must read: everything but embedding tables and cross K/V weights,
    and of the lm_head only the share of rows a shortlist lets it read."""
    total = 0
    for name, t in list(decoder.named_parameters()) + list(decoder.named_buffers()):
        if "embedding" in name:
            continue
        n = t.numel() * t.element_size()
        if "cross_attention.qkv" in name:
            n = n // 3  # only the Q third is needed per step; K/V of the source are cached
        if name.startswith("lm_head"):
            n = int(n * lm_head_share)
        total += n
    return total


def synthetic_shortlist(ckpt: Path, vocab: int, size: int, seed: int = 0) -> None:
    """Random per-language lists of `size` tokens (random weights have no language to build them from):
    the lm_head reads the same number of scattered rows a real list of that size makes it read."""
    g = torch.Generator().manual_seed(seed)
    eos = json.loads((ckpt / "languages.json").read_text())["eos_token_id"]
    lists = {lang: torch.randperm(vocab, generator=g)[:size].tolist() + [eos] for lang in [*LANGS, "en"]}
    shortlist.write(ckpt, lists, vocab, {"source": f"synthetic, {size} random tokens per language"})


def level_requests(concurrency: int, rounds: int) -> int:
    """Requests a closed loop at this concurrency serves: `rounds` per client, and at least 8. At 2, a runtime
    level runs for well under a second, and its tokens/s varies by about 10% between runs; more rounds run it
    longer, with more latencies behind its percentiles."""
    return max(rounds * concurrency, 8)


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (the upper one of an even count), with every run's tokens/s,
    ascending, as `tokens_per_s_runs`: the spread says how far one run's numbers can be trusted."""
    runs = sorted(runs, key=lambda r: r["tokens_per_s"])
    return runs[len(runs) // 2] | {"tokens_per_s_runs": [r["tokens_per_s"] for r in runs]}


def spread(c: dict) -> float:
    """The widest (max - min) / median of a contender's tokens/s over its levels."""
    return max(
        (max(lv["tokens_per_s_runs"]) - min(lv["tokens_per_s_runs"])) / lv["tokens_per_s"]
        for lv in c["levels"].values()
    )


def workload(tok, n: int) -> list[tuple[list[int], list[int]]]:
    """n requests (encoder ids, decoder prefix) of real sentences, the same number from each language of LANGS."""
    per = -(-n // len(LANGS))
    items = []
    for lang in LANGS:
        lines = read_lines(test_pair_paths(f"{lang}-en")[0], per)
        if len(lines) < per:
            raise SystemExit(
                f"{n} requests need {per} sentences per language; the {lang}-en test set has {len(lines)}"
            )
        items += [
            (tok.encode([s], tok.language(lang))[0], tok.decoder_prefix(tok.language("en"))) for s in lines
        ]
    return items[:n]


def run_engine(tr: Translator, items, concurrency: int, new_tokens: int) -> dict:
    """Closed loop: `concurrency` requests outstanding until every item is served."""
    engine, device = tr.engine, tr.device
    params = SamplingParams(min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    pending = list(enumerate(items))
    arrival, lat, ttft, tokens = {}, [], [], 0
    sync(device)
    start = time.perf_counter()
    while pending or engine.has_work():
        while pending and len(engine.running) + len(engine.waiting) < concurrency:
            i, (enc, prefix) = pending.pop(0)
            req = GenerationRequest(f"b{i}", enc, prefix, params, target_lang="en")
            arrival[req.request_id] = req.arrival_time
            engine.add(req)
        out = engine.step()
        for r in out.results:
            lat.append(r.finish_time - arrival[r.request_id])
            ttft.append(r.first_token_time - arrival[r.request_id])
            tokens += len(r.token_ids)
    sync(device)
    return loop_stats(tokens, time.perf_counter() - start, lat, ttft, len(items))


def loop_stats(tokens: int, wall: float, latencies: list[float], ttfts: list[float], requests: int) -> dict:
    """What every contender reports for one closed loop (no time to first token: NaN)."""
    return {"tokens_per_s": tokens / wall, "requests": requests, "p50_latency_s": pct(latencies, 50),
            "p99_latency_s": pct(latencies, 99), "p50_ttft_s": pct(ttfts, 50), "wall_s": wall}  # fmt: skip


def step_time_batch1(tr: Translator, item, new_tokens: int) -> float:
    """Seconds per decode step of one request in steady state: the wall time of its decode steps
    after the first few, divided by their number (so host work the engine overlaps with the
    device's counts only where it is not hidden)."""
    engine, device = tr.engine, tr.device
    engine.add(
        GenerationRequest(
            "s", *item, SamplingParams(min_new_tokens=new_tokens, max_new_tokens=new_tokens), "en"
        )
    )
    for _ in range(4):  # encoder, prefix, and the first steps
        engine.step()
    sync(device)
    start, steps = time.perf_counter(), 0
    while engine.has_work():
        engine.step()
        steps += 1
    sync(device)
    return (time.perf_counter() - start) / max(steps, 1)


def lone_ms_per_token(levels: dict) -> float:
    """HF's "step" at batch 1: a lone request's ms per generated token, its encoder included, from the level of
    one client; NaN where the run had none (1 / tokens/s of 64 clients is no step time)."""
    one = levels.get("1")
    return 1e3 / one["tokens_per_s"] if one else float("nan")


def graph_replay_ms(tr: Translator, rows: int = 1, k: int = 1, n: int = 50) -> float:
    """GPU time of the `rows` decode graph alone (the step minus host-side scheduling), top-`k` (1:
    greedy steps, as measured)."""
    graph = tr.engine.runner.graphs.get((rows, k))
    if graph is None:
        return float("nan")
    for _ in range(3):
        graph[0].replay()
    sync(tr.device)
    t = time.perf_counter()
    for _ in range(n):
        graph[0].replay()
    sync(tr.device)
    return (time.perf_counter() - t) / n * 1e3


def run_hf(model, pad_id: int, items, concurrency: int, new_tokens: int, device: torch.device) -> dict:
    """Static padded batches of `concurrency` requests, HF generate (forced BOS = target language)."""
    lat, tokens = [], 0
    sync(device)
    start = time.perf_counter()
    for b in range(0, len(items), concurrency):
        chunk = items[b : b + concurrency]
        width = max(len(e) for e, _ in chunk)
        ids = torch.tensor([e + [pad_id] * (width - len(e)) for e, _ in chunk], device=device)
        out = model.generate(input_ids=ids, attention_mask=(ids != pad_id).long(), do_sample=False, num_beams=1,
                             forced_bos_token_id=chunk[0][1][-1], forced_eos_token_id=None,
                             min_new_tokens=new_tokens + 1, max_new_tokens=new_tokens + 1)  # fmt: skip
        sync(device)
        lat += [time.perf_counter() - start] * len(chunk)  # all arrived at start of the run
        tokens += (out.shape[1] - 2) * len(chunk)
    return loop_stats(tokens, time.perf_counter() - start, lat, [], len(items))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, c in report["contenders"].items():
        if "error" in c:
            continue
        xs = sorted(int(k) for k in c["levels"])
        levels = [c["levels"][str(x)] for x in xs]
        mid = [lv["tokens_per_s"] for lv in levels]
        low = [m - min(lv["tokens_per_s_runs"]) for lv, m in zip(levels, mid, strict=True)]
        high = [max(lv["tokens_per_s_runs"]) - m for lv, m in zip(levels, mid, strict=True)]
        a.errorbar(xs, mid, yerr=[low, high], marker="o", capsize=3, label=name)
    a.set(xscale="log", yscale="log", xlabel="concurrent requests", ylabel="generated tokens/s",
          title="Throughput vs concurrency (median, bars: min-max of runs)")  # fmt: skip
    a.legend()
    names = [n for n, c in report["contenders"].items() if "error" not in c]
    b.bar(
        names, [report["contenders"][n]["step_ms_batch1"] for n in names], color="tab:blue", label="measured"
    )
    b.bar(names, [report["contenders"][n].get("floor_ms", 0) for n in names], color="tab:orange", alpha=0.6,
          label="bandwidth floor")  # fmt: skip
    b.set(ylabel="ms per decode step (batch 1)", title="Decode step vs bandwidth floor")
    b.tick_params(axis="x", rotation=30)
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def checkpoint(variant: str, hf_dir: Path, work: Path, tp_size: int, args: argparse.Namespace):
    """(checkpoint dir, flags, dtype to load in, shortlist size) of a --variants entry, converted or
    quantized here at `tp_size` ranks unless it names a directory."""
    name, _, path = variant.partition("=")
    name, *flags = name.split("+")
    ckpt = work / f"{variant.replace('=', '-').replace('+', '-')}-tp{tp_size}"
    if path not in ("", "rtn"):
        ckpt = Path(path)
        ranks = json.loads((ckpt / "decoder" / "config.json").read_text())["mapping"]["tp_size"]
        if ranks != tp_size:
            raise ValueError(
                f"{ckpt} has {ranks} TP rank(s), not {tp_size}: give a dtype or =rtn to convert here"
            )
    elif not path:
        convert_checkpoint(str(hf_dir), ckpt, tp_size, name, progress=False)
    else:  # =rtn: weight-only RTN from the fp16 checkpoint (ModelOpt may be absent here)
        from calib.rtn import quantize_checkpoint_rtn

        src = work / f"float16-src-tp{tp_size}"
        if not src.exists():
            convert_checkpoint(str(hf_dir), src, tp_size, "float16", progress=False)
        quantize_checkpoint_rtn(src, ckpt, name, lm_head="lm_head" in flags)
    dtype = None if args.smoke else (torch.float16 if path else getattr(torch, name))
    vocab = json.loads((ckpt / "decoder" / "config.json").read_text())["vocab_size"]
    size = min(args.shortlist_size, vocab // 4)
    if "shortlist" in flags:
        synthetic_shortlist(ckpt, vocab, size)
    return ckpt, flags, dtype, size


def run_backend(ckpt: Path, tp_size: int, device: torch.device, dtype: torch.dtype | None, shortlist: bool,
                items, levels: list[int], new_tokens: int, rounds: int, repeats: int) -> dict:  # fmt: skip
    """A contender served as the server serves it (`PytorchBackend`: the engine on its own thread, ranks
    past the first in worker processes, one GPU each, NCCL; gloo on CPU), in closed loops of asyncio
    clients. The batch-1 step time is a lone request's time between its first and last token over its
    steps. `tokens` are every request's ids (by item, one list a run), to compare across TP degrees."""
    from serve.engine.async_engine import PytorchBackend

    params = SamplingParams(min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    backend = PytorchBackend(ckpt, device=device.type, dtype=str(dtype).removeprefix("torch.") if dtype else None,
                             tp_size=tp_size, max_batch_size=max(levels), shortlist=shortlist)  # fmt: skip
    ids = itertools.count()

    async def loop(batch: list, concurrency: int) -> tuple[dict, dict]:
        pending, results, arrival = list(enumerate(batch)), {}, {}

        async def client() -> None:
            while pending:
                i, (enc, prefix) = pending.pop(0)
                req = GenerationRequest(f"t{next(ids)}", enc, prefix, params, target_lang="en")
                arrival[i] = req.arrival_time
                results[i] = await backend.generate(req)

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        lat = [r.finish_time - arrival[i] for i, r in results.items()]
        ttft = [r.first_token_time - arrival[i] for i, r in results.items()]
        tokens = sum(len(r.token_ids) for r in results.values())
        return loop_stats(tokens, wall, lat, ttft, len(batch)), {i: r.token_ids for i, r in results.items()}

    async def run() -> dict:
        backend.start()
        try:
            await loop(items[:2], 1)  # warm-up
            steps = []
            for item in items[:3]:
                r = await backend.generate(
                    GenerationRequest(f"t{next(ids)}", *item, params, target_lang="en")
                )
                steps.append((r.finish_time - r.first_token_time) / max(len(r.token_ids) - 1, 1))
            c = {"step_ms_batch1": 1e3 * statistics.median(steps), "levels": {}, "tokens": {}}
            for level in levels:
                await loop(items[:level], level)  # warm up at this concurrency
                runs = [await loop(items[: level_requests(level, rounds)], level) for _ in range(repeats)]
                c["levels"][str(level)] = median_run([stats for stats, _ in runs])
                for _, tokens in runs:  # every run's, in order: the other TP degree's must be the same
                    c["tokens"] |= {i: [*c["tokens"].get(i, []), t] for i, t in tokens.items()}
            return c
        finally:
            await backend.shutdown()

    return asyncio.run(run())


def tp_contenders(args: argparse.Namespace, hf_dir: Path, work: Path, device: torch.device, levels: list[int],
                  n_items: int, report: dict, save) -> list:  # fmt: skip
    """Each variant through the server's backend at TP=1 and TP=--tp-size, on the same machine, with
    whether the TP run's tokens equal TP=1's; `n_items` requests, enough for the largest level."""
    items: list = []
    for variant in args.variants.split(","):
        runs = {}
        for tp_size in (1, args.tp_size):
            label = f"runtime {variant.partition('=')[0]}, TP={tp_size}"
            try:
                ckpt, flags, dtype, _ = checkpoint(variant, hf_dir, work, tp_size, args)
                items = workload(TranslationTokenizer(ckpt), n_items)
                runs[tp_size] = run_backend(ckpt, tp_size, device, dtype, "shortlist" in flags, items, levels,
                                            args.new_tokens, args.rounds, args.repeats)  # fmt: skip
                report["contenders"][label] = {k: v for k, v in runs[tp_size].items() if k != "tokens"}
            except Exception as e:  # one failing contender must not lose the others' numbers
                print(f"contender {label} failed: {type(e).__name__}: {e}", file=sys.stderr)
                report["contenders"][label] = {"error": f"{type(e).__name__}: {e}"}
            save()
        if len(runs) == 2:
            report["contenders"][label]["tokens_identical_to_tp1"] = (
                runs[1]["tokens"] == runs[args.tp_size]["tokens"]
            )
    return items


def scratch_dir(prefix: str) -> Path:
    """A temporary directory removed when the process exits: at mBART-large shape a run writes several GB of
    checkpoints, and a few runs left behind filled the GPU machine's 64 GiB disk."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    ap.add_argument("--smoke", action="store_true", help="tiny model, CPU, small counts")
    ap.add_argument("--device", default=None)
    ap.add_argument("--concurrency", default="1,8,32,64,128")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument(
        "--variants",
        default="float16,bfloat16,int8_wo=rtn,int4_awq=rtn,int8_wo+lm_head=rtn,int4_awq+lm_head=rtn",
        help="runtime contenders: a dtype (converted here), NAME=CKPT_DIR, or int8_wo|int4_awq[+lm_head]=rtn "
        "(round-to-nearest from the fp16 checkpoint); a dtype may add +compile; any may add +shortlist "
        "(serve synthetic per-language output vocabularies of --shortlist-size tokens) and +no_look_ahead "
        "(collect every step before launching the next, to measure what the overlap gains)",
    )
    ap.add_argument("--shortlist-size", type=int, default=32000,
                    help="tokens per language of +shortlist contenders (the full vocabulary is 250054)")  # fmt: skip
    ap.add_argument("--no-hf", action="store_true", help="skip the HF generate contender")
    ap.add_argument("--rounds", type=int, default=2,
                    help="requests per client at each concurrency level (at least 8 a level); README's table "
                    "used 4")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=3,
                    help="closed loops per level (and lone requests timed for the batch-1 step); the median "
                    "is reported, with every run's tokens/s beside it")  # fmt: skip
    ap.add_argument("--tp-size", type=int, default=1,
                    help="above 1: run each variant through the server's backend at TP=1 and at this many ranks "
                    "(one GPU each), reporting whether their tokens are identical")  # fmt: skip
    args = ap.parse_args()
    if args.smoke:
        args.concurrency, args.new_tokens = "1,4", 8
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    levels = [int(c) for c in args.concurrency.split(",")]
    work = scratch_dir("bench-")
    hf_dir = build_tiny_mbart(work / "hf", **({} if args.smoke else LARGE_DIMS))
    bandwidth = copy_bandwidth(device)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "new_tokens": args.new_tokens, "copy_bandwidth_GBps": bandwidth / 1e9,
              "command": " ".join(sys.argv), "contenders": {},
              "env": {k: v for k, v in os.environ.items() if k.startswith("MT_")}}  # fmt: skip
    n_items = max(level_requests(level, args.rounds) for level in levels)

    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every contender, so a cut-short run keeps what it measured
        (args.out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")

    items: list = []
    for variant in args.variants.split(",") if args.tp_size == 1 else []:
        try:
            ckpt, flags, dtype, size = checkpoint(variant, hf_dir, work, 1, args)
            tr = Translator.load(ckpt, device=device, dtype=dtype, max_batch_size=max(levels),
                                 compile="compile" in flags, shortlist="shortlist" in flags,
                                 look_ahead="no_look_ahead" not in flags)  # fmt: skip
            tr.engine.warm_up()
            items = workload(tr.tokenizer, n_items)
            steps = sorted(step_time_batch1(tr, items[0], args.new_tokens) for _ in range(args.repeats))
            step = steps[len(steps) // 2]
            share = (size + len(items[0][0])) / tr.decoder.cfg.vocab_size if "shortlist" in flags else 1.0
            step_bytes = decoder_step_bytes(tr.decoder, share)
            c = {"step_ms_batch1": step * 1e3, "step_ms_batch1_runs": [s * 1e3 for s in steps],
                 "graph_ms_batch1": graph_replay_ms(tr), "weight_bytes_per_step": step_bytes,
                 "floor_ms": step_bytes / bandwidth * 1e3, "levels": {}}  # fmt: skip
            for level in levels:
                run_engine(tr, items[:level], level, 4)  # warm up at this concurrency
                batch = items[: level_requests(level, args.rounds)]
                c["levels"][str(level)] = median_run(
                    [run_engine(tr, batch, level, args.new_tokens) for _ in range(args.repeats)]
                )
            d = tr.decoder.cfg
            per_seq = tr.engine.pool.blocks_for(256) + tr.engine.pool.blocks_for(32)
            per_block = KVPool.bytes_per_block(
                d.num_layers, tr.engine.pool.block_size, d.num_heads, d.head_size, d.dtype
            )
            weights = sum(t.numel() * t.element_size() for m in (tr.encoder, tr.decoder)
                          for t in list(m.parameters()) + list(m.buffers()))  # fmt: skip
            c["weight_bytes"] = weights
            if device.type == "cuda":
                free = torch.cuda.mem_get_info(device)[0] + tr.engine.pool.num_blocks * per_block
                c["kv_capacity_seqs_256"] = int(free * 0.9 // per_block // per_seq)
                c["peak_gpu_mem_GB"] = torch.cuda.max_memory_allocated(device) / 1e9
            report["contenders"][f"runtime {variant.partition('=')[0]}"] = c
            del tr
            gc.collect()  # the engine and its runner reference each other
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
        except Exception as e:  # one failing contender must not lose the others' numbers
            print(f"contender {variant} failed: {type(e).__name__}: {e}", file=sys.stderr)
            report["contenders"][f"runtime {variant.partition('=')[0]}"] = {
                "error": f"{type(e).__name__}: {e}"
            }
        save()
    if args.tp_size > 1:
        items = tp_contenders(args, hf_dir, work, device, levels, n_items, report, save)

    if not args.no_hf:
        from transformers import AutoTokenizer, MBartForConditionalGeneration

        dtype = torch.float32 if args.smoke else torch.float16
        model = MBartForConditionalGeneration.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
        pad = AutoTokenizer.from_pretrained(hf_dir).pad_token_id
        # HF as installed, and with the attention backends the runtime's encoder uses (no cuDNN,
        # which plans every new shape; padded batches bring one per decode step).
        for name, backends in (
            ("HF generate fp16", None),
            ("HF generate fp16, no cuDNN SDPA", MASKED_SDPA_BACKENDS),
        ):
            c = {"levels": {}}
            with sdpa_kernel(backends) if backends else contextlib.nullcontext():
                run_hf(model, pad, items[:2], 2, 4, device)  # warm-up
                for level in levels:
                    batch = items[: level_requests(level, args.rounds)]
                    runs = [
                        run_hf(model, pad, batch, level, args.new_tokens, device) for _ in range(args.repeats)
                    ]
                    c["levels"][str(level)] = median_run(runs)
            c["step_ms_batch1"] = lone_ms_per_token(c["levels"])
            if device.type == "cuda":
                c["peak_gpu_mem_GB"] = torch.cuda.max_memory_allocated(device) / 1e9
            report["contenders"][name] = c

    save()
    plot(report, args.out / "bench.png")
    print(f"device {report['device']}  copy bandwidth {report['copy_bandwidth_GBps']:.0f} GB/s  "
          f"new tokens {args.new_tokens}")  # fmt: skip
    nan = float("nan")
    cols = ["contender", "step ms b=1", "GPU ms b=1", "GB read/step", "floor ms"]
    cols += [f"tok/s @{lv}" for lv in levels] + ["tok/s spread", "p50 / p99 s @64", "TTFT p50 s @64"]
    cols += ["weights GB", "peak GB", "KV seqs of 256"]
    print("| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|")
    for name, c in report["contenders"].items():
        if "error" in c:
            print(f"| {name} | failed: {c['error'][:80]} |")
            continue
        at64 = c["levels"].get("64", {})
        cells = [name, c["step_ms_batch1"], c.get("graph_ms_batch1", nan), c.get("weight_bytes_per_step", nan) / 1e9,
                 c.get("floor_ms", nan)]  # fmt: skip
        cells += [c["levels"][str(lv)]["tokens_per_s"] for lv in levels] + [f"{spread(c):.0%}"]
        cells += [f"{at64.get('p50_latency_s', nan):.3g} / {at64.get('p99_latency_s', nan):.3g}",
                  at64.get("p50_ttft_s", nan), c.get("weight_bytes", nan) / 1e9, c.get("peak_gpu_mem_GB", nan),
                  c.get("kv_capacity_seqs_256", nan)]  # fmt: skip
        print("| " + " | ".join(f"{x:.3g}" if isinstance(x, float) else str(x) for x in cells) + " |")
    for name, c in report["contenders"].items():
        if "tokens_identical_to_tp1" in c:
            print(f"{name}: tokens identical to TP=1: {c['tokens_identical_to_tp1']}")


if __name__ == "__main__":
    main()
