"""Decode-shape kernels at mBART-large-50 sizes: the fused Triton linear / lm_head top-K against the
unfused PyTorch composition they replace, and paged attention, timed as CUDA-graph replays (as the
decode step runs them) over rotating weight copies (so weights come from HBM, not L2); and, with
`--shapes chain`, what a launch costs in a chain of dependent ones. GPU only.

    python scripts/bench_kernels.py --out out/kernels
    python scripts/bench_kernels.py --rows 1 --shapes chain --out out/chain
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serve.runtime import fused, kernels  # noqa: E402
from serve.runtime.quant import pack_int4  # noqa: E402

# name: (N, K, LayerNorm prologue, bias, activation, residual) as the decoder layer uses them
SHAPES = {
    "qkv": (3072, 1024, True, True, None, False),
    "dense": (1024, 1024, False, True, None, True),
    "cross q": (1024, 1024, True, True, None, False),
    "fc": (4096, 1024, True, True, "gelu", False),
    "proj": (1024, 4096, False, True, None, True),
}
VOCAB, HIDDEN, HEADS = 250054, 1024, 16
L2_BYTES = 50 * 2**20


def weights(fmt: str, n: int, k: int, dev: str = "cuda") -> fused.Weights:
    if fmt == "fp16":
        return fused.Weights(fused.FLOAT, torch.randn(n, k, device=dev, dtype=torch.float16) / 32)
    if fmt == "int8":  # [K, N] stored K-contiguous, as the runtime lays it out at load
        w = torch.randint(-127, 128, (k, n), device=dev, dtype=torch.int8).t().contiguous().t()
        return fused.Weights(fused.INT8, w, torch.rand(n, device=dev, dtype=torch.float16) / 500)
    q = pack_int4(torch.randint(-8, 8, (n, k), device=dev))
    s = torch.rand(n, k // 128, device=dev, dtype=torch.float16) / 50
    return fused.Weights(fused.INT4, q, s, torch.ones(k, device=dev, dtype=torch.float16), 128)


def nbytes(w: fused.Weights) -> int:
    return sum(t.numel() * t.element_size() for t in (w.weight, w.scale) if t is not None)


def torch_path(x, w, bias, norm, act, residual):
    h = F.linear(norm(x) if norm is not None else x, w.weight, bias)
    h = F.gelu(h) if act else h
    return h + residual if residual is not None else h


def attention(m: int, ctx: int, chunks: list[int], warps: list[int | None], block: int = 16) -> list[dict]:
    """Paged attention of m query rows over ctx cached positions each (16 heads of 64), per chunk size and
    warps (None: the runtime's choice); chunk 16 reads one cache block per iteration, as the kernel did
    before it gathered chunks."""
    per_row = -(-ctx // block)
    kv_bytes = 2 * m * ctx * HIDDEN * 2
    pools = []
    for _ in range(max(2, 2 * L2_BYTES // kv_bytes)):
        shape = (m * per_row + 1, block, HEADS, HIDDEN // HEADS)
        k, v = (torch.randn(shape, device="cuda", dtype=torch.float16) for _ in range(2))
        pools.append((k, v, torch.randperm(m * per_row, device="cuda").view(m, per_row).int()))
    q = torch.randn(m, HEADS, HIDDEN // HEADS, device="cuda", dtype=torch.float16)
    lens = torch.full((m,), ctx, device="cuda", dtype=torch.int32)
    out = []
    early = {"": {}, " static": {"static": True}, " fresh_from": {"fresh_from": lens - 1}}  # fmt: skip
    for chunk, nw, (name, kw) in itertools.product(chunks, warps, early.items()):
        us = graph_us([partial(kernels.paged_attention_triton, q, k, v, t, lens, 0.125, chunk=chunk, num_warps=nw,
                               **kw) for k, v, t in pools])  # fmt: skip
        out.append({"rows": m, "shape": f"attention, context {ctx}", "fmt": "fp16", "us": us,
                    "impl": f"triton chunk={chunk} warps={nw or 'auto'}{name}", "GBps": kv_bytes / us / 1e3})  # fmt: skip
    return out


def chain(args: argparse.Namespace, length: int = 72) -> list[dict]:
    """What a dependent one-row launch costs: `length` linears, each taking the previous one's output as a
    decode step does, SHAPES in turn, timed per launch. Their weights are read from HBM (a copy each) or,
    all launches sharing one copy per shape, from L2, which leaves the chain's latency; then without
    programmatic dependent launch, without the norm, bias and activation or with the norm only, and as
    128 x 128 layers (a few programs: the launch and the wait alone)."""
    results = []
    norm = torch.nn.LayerNorm(HIDDEN, device="cuda", dtype=torch.float16)
    for fmt in args.formats.split(","):
        layers = [(n, k, dict(norm=norm if ln else None, act=act,
                              bias=torch.randn(n, device="cuda", dtype=torch.float16) if has_bias else None))
                  for n, k, ln, has_bias, act, _ in SHAPES.values()]  # fmt: skip
        reps = length // len(layers)
        shared = [weights(fmt, n, k) for n, k, _ in layers]
        own = [weights(fmt, n, k) for _ in range(reps) for n, k, _ in layers]
        x = torch.randn(1, HIDDEN, device="cuda", dtype=torch.float16)

        def run(ws: list, layers: list, x: torch.Tensor = x) -> None:
            h = x
            for i, w in enumerate(ws):
                n, k, kw = layers[i % len(layers)]
                h = fused.linear_triton(h[:, :k], w, n, **kw)  # K <= the previous layer's N

        plain = [(n, k, {}) for n, k, _ in layers]
        norm_only = [(n, k, {"norm": kw["norm"]}) for n, k, kw in layers]
        tiny = [(128, 128, {})] * len(layers)
        cases = [("same weights (L2)", shared * reps, True, layers), ("own weights (HBM)", own, True, layers),
                 ("own weights (HBM), no PDL", own, False, layers),
                 ("same weights (L2), no norm, bias or activation", shared * reps, True, plain),
                 ("same weights (L2), norm only", shared * reps, True, norm_only),
                 ("128 x 128 layers, no norm, bias or activation", [weights(fmt, 128, 128)] * len(own), True, tiny)]  # fmt: skip
        for name, ws, pdl, shapes in cases:
            saved, kernels.PDL = kernels.PDL, pdl
            try:
                us = graph_us([partial(run, ws, shapes)]) / len(ws)
            finally:
                kernels.PDL = saved
            results.append({"rows": 1, "shape": f"chain of {len(ws)} linears", "fmt": fmt, "impl": name, "us": us,
                            "GBps": sum(nbytes(w) for w in ws) / len(ws) / us / 1e3})  # fmt: skip
    return results


def graph_us(calls: list, reps: int = 20) -> float:
    """Median GPU time of one call, from replays of a graph that runs every call once."""
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        for c in calls:
            c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(calls))
    return statistics.median(times)


def try_graph_us(calls: list) -> float | None:
    """`graph_us`, or None (reported) for a tile that does not fit the GPU's resources."""
    try:
        return graph_us(calls)
    except Exception as e:  # triton.runtime.errors.OutOfResources and the like
        print(f"skipped: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
        return None


def linears(args: argparse.Namespace, m: int) -> list[dict]:
    """Each decoder linear of SHAPES at m rows, fused (with the sweep's tiles at one row) and unfused."""
    results = []
    norm = torch.nn.LayerNorm(HIDDEN, device="cuda", dtype=torch.float16)
    for name, (n, k, ln, has_bias, act, has_res) in SHAPES.items():
        if name not in args.shapes.split(","):
            continue
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        bias = torch.randn(n, device="cuda", dtype=torch.float16) if has_bias else None
        res = torch.randn(m, n, device="cuda", dtype=torch.float16) if has_res else None
        kw = dict(bias=bias, norm=norm if ln else None, act=act, residual=res)
        for fmt in args.formats.split(","):
            copies = [weights(fmt, n, k) for _ in range(max(2, 2 * L2_BYTES // nbytes(weights(fmt, n, k))))]
            rows = []
            configs = [(None, None, None, None)]
            if args.sweep and m == 1:  # one-row tiles, and the 16-row tile tl.dot would need
                tiles = itertools.product((4, 8, 16), (b for b in (1024, 2048, 4096) if b <= k), (2, 4, 8))
                configs += [(bn, bk, warps, 1) for bn, bk, warps in tiles] + [(None, None, None, 16)]
            elif args.sweep:  # tl.dot tiles
                tiles = itertools.product((32, 64, 128), (64, 128, 256), (4, 8))
                configs += [(bn, bk, warps, None) for bn, bk, warps in tiles]
            splits = [None if sk == "auto" else int(sk) for sk in args.split_k.split(",")]
            for (bn, bk, warps, bm), sk in itertools.product(configs, splits):
                calls = [partial(fused.linear_triton, x, w, n, block_n=bn, block_k=bk, num_warps=warps,
                                 split_k=sk, block_m=bm, **kw) for w in copies]  # fmt: skip
                us = try_graph_us(calls)
                if us is not None:
                    impl = f"fused bm={bm or 'auto'} bn={bn} bk={bk} warps={warps} split={sk or 'auto'}"
                    rows.append({"impl": impl, "us": us})
            if fmt == "fp16":  # what runs without the fused kernels: LN, cuBLAS with bias, GELU, add
                us = graph_us([partial(torch_path, x, w, **kw) for w in copies])
                rows.append({"impl": "torch (cuBLAS)", "us": us})
            else:  # above fused.MAX_ROWS: the whole weight dequantized, then the same composition
                us = graph_us([partial(fused.linear_reference, x, w, n, **kw) for w in copies])
                rows.append({"impl": "dequantize + cuBLAS", "us": us})
            results += [{"rows": m, "shape": name, "fmt": fmt, **r, "GBps": nbytes(copies[0]) / r["us"] / 1e3}
                        for r in rows]  # fmt: skip
    return results


def lm_heads(args: argparse.Namespace, m: int) -> list[dict]:
    """The lm_head top-K at m rows over the vocabulary and over a shortlist, fused and unfused, and over the
    shortlist's number of rows stored contiguously (what reading them costs without the gather)."""
    results = []
    norm = torch.nn.LayerNorm(HIDDEN, device="cuda", dtype=torch.float16)
    blocked = torch.zeros(m, dtype=torch.long, device="cuda")
    x = torch.randn(m, HIDDEN, device="cuda", dtype=torch.float16)
    allowed = torch.zeros(m + 1, VOCAB, dtype=torch.uint8, device="cuda")
    allowed[:m, torch.randperm(VOCAB, device="cuda")[: args.shortlist]] = 1
    short = fused.Shortlist.of(allowed, torch.arange(m, device="cuda"))
    topks = [int(t) for t in args.topk.split(",")]
    configs = [(None, None, None)]
    if args.sweep:
        configs += list(itertools.product((32, 64, 128, 256), (64, 128), (4, 8)))
    for fmt in args.formats.split(","):
        copies = [weights(fmt, VOCAB, HIDDEN) for _ in range(2)]  # a shortlist's rows of one would stay in L2
        w = copies[0]
        for (bn, bk, warps), sl, topk in itertools.product(configs, (None, short), topks):
            us = try_graph_us([partial(fused.lm_head_topk_triton, x, c, VOCAB, topk, 2, blocked, norm, sl,
                                       block_n=bn, block_k=bk, num_warps=warps) for c in copies])  # fmt: skip
            name = f"lm_head+top{topk}" + ("" if sl is None else f", shortlist {args.shortlist}")
            if us is not None:
                read = nbytes(w) * (1 if sl is None else args.shortlist / VOCAB)
                results.append({"rows": m, "shape": name, "fmt": fmt, "us": us, "GBps": read / us / 1e3,
                                "impl": f"fused bn={bn} bk={bk} warps={warps}"})  # fmt: skip
        contiguous = [weights(fmt, args.shortlist, HIDDEN) for _ in range(4)]  # as many rows as the shortlist
        for topk in topks:
            us = graph_us([partial(fused.lm_head_topk_triton, x, c, args.shortlist, topk, 2, blocked, norm)
                           for c in contiguous])  # fmt: skip
            results.append({"rows": m, "shape": f"lm_head+top{topk}, {args.shortlist} contiguous rows", "fmt": fmt,
                            "us": us, "GBps": nbytes(contiguous[0]) / us / 1e3, "impl": "fused"})  # fmt: skip
        if fmt == "fp16":
            us = graph_us([partial(fused.lm_head_topk_reference, x, w, VOCAB, 8, 2, blocked, norm)])
            results.append({"rows": m, "shape": "lm_head+topk", "fmt": fmt, "impl": "torch (cuBLAS)",
                            "us": us, "GBps": nbytes(w) / us / 1e3})  # fmt: skip
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/kernels"))
    ap.add_argument("--rows", default="1,16,64")
    ap.add_argument("--sweep", action="store_true", help="also try other tile shapes (one-row ones at 1 row)")
    ap.add_argument(
        "--topk", default="1,8", help="K of the lm_head top-K timings (1: greedy steps, 8: beams)"
    )
    ap.add_argument("--formats", default="fp16,int8,int4", help="weight formats to time")
    ap.add_argument("--shapes", default=",".join([*SHAPES, "lm_head", "attention"]),
                    help="kernels to time (also: chain, a chain of dependent one-row linears)")  # fmt: skip
    ap.add_argument("--shortlist", type=int, default=32000, help="tokens of the shortlisted lm_head case")
    ap.add_argument("--split-k", default="auto",
                    help="K slabs to time for each linear, e.g. auto,1,2,4 (auto: the runtime's own choice)")  # fmt: skip
    ap.add_argument("--contexts", default="32,64,128", help="context lengths of the paged attention timings")
    ap.add_argument("--chunks", default=f"16,{kernels.CHUNK}", help="attention chunk sizes to time")
    ap.add_argument("--attention-warps", default="auto",
                    help="attention warps per program to time, e.g. auto,2,4 (auto: the runtime's choice)")  # fmt: skip
    args = ap.parse_args()
    shapes = args.shapes.split(",")
    results = []
    for m in (int(r) for r in args.rows.split(",")):
        results += linears(args, m)
        if "lm_head" in shapes:
            results += lm_heads(args, m)
        if "attention" in shapes:
            for ctx in (int(c) for c in args.contexts.split(",")):
                results += attention(m, ctx, [int(c) for c in args.chunks.split(",")],
                                     [None if w == "auto" else int(w) for w in args.attention_warps.split(",")])  # fmt: skip
    if "chain" in shapes:
        results += chain(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels.json").write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"{torch.cuda.get_device_name()}\n| rows | shape | fmt | impl | us | weight GB/s |\n|---|---|---|---|---|---|"
    )
    for r in results:
        print(f"| {r['rows']} | {r['shape']} | {r['fmt']} | {r['impl']} | {r['us']:.1f} | {r['GBps']:.0f} |")


if __name__ == "__main__":
    main()
