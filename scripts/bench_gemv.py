"""Decode-shape matmuls at mBART-large-50 sizes: cuBLAS fp16 vs the Triton weight-streaming GEMV
(float, W8A16, W4A16) vs dequantize-then-cuBLAS, with achieved weight bandwidth. GPU only.

    python scripts/bench_gemv.py --rows 1 --out out/gemv
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serve.runtime import gemv  # noqa: E402

SHAPES = {
    "qkv": (3072, 1024),
    "dense": (1024, 1024),
    "fc": (4096, 1024),
    "proj": (1024, 4096),
    "lm_head": (250054, 1024),
}


def time_us(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("out/gemv"))
    args = ap.parse_args()
    rows = []
    for name, (n, k) in SHAPES.items():
        x = torch.randn(args.rows, k, device="cuda", dtype=torch.float16)
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) / 32
        w8 = torch.randint(-127, 128, (k, n), device="cuda", dtype=torch.int8)
        s8 = torch.rand(n, device="cuda", dtype=torch.float16) / 500
        w4 = torch.randint(-128, 128, (n // 2, k), device="cuda", dtype=torch.int8)
        s4 = torch.rand(n, k // 128, device="cuda", dtype=torch.float16) / 50
        pre = torch.ones(1, k, device="cuda", dtype=torch.float16)
        cases = {
            "cublas_fp16": (partial(F.linear, x, w), 2 * n * k),
            "triton_fp16": (partial(gemv.gemv, x, gemv.FLOAT, w), 2 * n * k),
            "triton_int8": (partial(gemv.gemv, x, gemv.INT8, w8, s8), n * k),
            "dequant_int8": (partial(gemv.gemv_reference, x, gemv.INT8, w8, s8), n * k),
            "triton_int4": (partial(gemv.gemv, x, gemv.INT4, w4, s4, pre), n * k // 2),
        }
        for case, (fn, nbytes) in cases.items():
            us = time_us(fn)
            rows.append({"shape": name, "n": n, "k": k, "case": case, "us": us, "GBps": nbytes / us / 1e3})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gemv.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| shape | case | us | weight GB/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} {r['n']}x{r['k']} | {r['case']} | {r['us']:.1f} | {r['GBps']:.0f} |")


if __name__ == "__main__":
    main()
