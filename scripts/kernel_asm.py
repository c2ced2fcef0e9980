"""What a fused decode linear, the paged attention and the norm-first LayerNorm compile to on a GPU
architecture, on any machine (no GPU needed).

GPU time is scarce, and some costs can be read off the compiled kernel: a layout conversion is a
round trip through shared memory with barriers, and a load's width says how many trips a tile takes.
This calls `fused.linear_triton` with CPU tensors of a decoder layer's shape, as the runtime would
(the same tiles, split-K and specialization), but compiles for --arch instead of launching, and
prints per format the layout conversions, barriers, global loads, machine instructions after the wait
for the previous kernel, registers and spills of the result. The shapes `self attention`, `cross attention`
and `layer norm` compile the decode step's other kernels (fp16 only): an attention program's registers
decide how many fit an SM before their wait (at 64 rows, 1 024 programs of 163-237 registers did not).
It also catches what Triton's interpreter cannot: code that runs there but does not compile for the
GPU (the CPU tests compile every row variant of two shapes with it).

    python scripts/kernel_asm.py --shapes dense,"cross q" --formats fp16,int8 --rows 1,2
    python scripts/kernel_asm.py --shapes fc --formats int4 --out /tmp/asm  # + JSON, .ttgir, .ptx, .sass
    python scripts/kernel_asm.py --shapes "self attention,cross attention,layer norm" --formats fp16 --rows 64
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

os.environ.pop("TRITON_INTERPRET", None)  # compile, not interpret (the CPU test suite sets it)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.bench_kernels import HEADS, HIDDEN, SHAPES, weights  # noqa: E402
from serve.runtime import fused, kernels  # noqa: E402


class _CompileOnly:
    """A Triton driver for a GPU that is not here: the compiler's target, and nothing to launch on."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@contextlib.contextmanager
def compiling_for(arch: int, compiled: list):
    """Within: Triton launches compile for `arch` instead, appending each CompiledKernel to `compiled`,
    and kernels take programmatic dependent launch as on Hopper."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    driver = _CompileOnly(arch)

    def hook(*, fn, compile, **_) -> bool:
        src = ASTSource(fn.jit_function, compile["signature"], compile["constants"], compile["configs"][0])
        options = {k: compile[k] for k in ("num_warps", "num_ctas", "num_stages", "enable_fp_fusion")}
        compiled.append(triton.compile(src, target=driver.target, options=options))
        return True  # compiled: skip the launch

    saved = (knobs.runtime.jit_cache_hook, kernels.pdl_args, triton.runtime.driver._active)
    triton.runtime.driver.set_active(driver)
    knobs.runtime.jit_cache_hook = hook
    kernels.pdl_args = lambda x: {"PDL": True, "launch_pdl": True}
    try:
        yield
    finally:
        knobs.runtime.jit_cache_hook, kernels.pdl_args, previous = saved
        triton.runtime.driver.set_active(previous)  # reset_active() would look for a GPU


def summary(kernel, sass: str) -> dict:
    """Counts in the compiled kernel that cost latency: layout conversions, barriers, global loads by width,
    machine instructions after the wait (in its `sass`), and registers per thread and spilled bytes,
    from the cubin (Triton's bundled `cuobjdump`)."""
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    return {
        "layout conversions": ttgir.count("ttg.convert_layout"),
        "barriers": len(re.findall(r"\bbar\.sync\b", ptx)),
        "global loads": dict(Counter(re.findall(r"ld\.global[\w.]*", ptx))),
        "after the wait": after_wait(sass),
        **resources(kernel.asm["cubin"]),
    }


def after_wait(sass: str) -> int:
    """Machine instructions from the wait for the previous kernel (ACQBULK, `griddepcontrol.wait`) to the
    end, counted in the code (a K loop that one row never enters counts too): the decode step's critical
    path, which ptxas may lengthen by moving work across the wait. With one-pass LayerNorm statistics,
    int4's one-row QKV went from 1473 to 1662, and its chain from 2.5 to 2.7-2.8 us a launch."""
    lines = re.findall(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", sass)
    waits = [i for i, op in enumerate(lines) if "ACQBULK" in op]
    return len(lines) - waits[0] if waits else 0


def cuobjdump(cubin: bytes, flag: str) -> str:
    """What Triton's bundled `cuobjdump` prints for the cubin with `flag` (-res-usage, -sass)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True, check=True).stdout


def resources(cubin: bytes) -> dict:
    """Registers per thread and spilled bytes of the cubin's kernel: its stack frame and local memory. ptxas
    puts spills in the stack frame (a Triton kernel calls no function that would need one): int4's QKV at
    eight register rows reports 32 registers, LOCAL:0 and STACK:3512, and its SASS stores to it 1715 times."""
    usage = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", cuobjdump(cubin, "-res-usage")))
    return {"registers": int(usage["REG"]), "spilled bytes": int(usage["STACK"]) + int(usage["LOCAL"])}


OTHER_SHAPES = ("self attention", "cross attention", "layer norm")


def launch(name: str, fmt: str, rows: int) -> None:
    """Call what the decode step calls for this shape at `rows` rows, with CPU tensors (under `compiling_for`)."""
    if name in OTHER_SHAPES:
        if name == "layer norm":  # `fused.layer_norm` runs its kernel where Triton can (the CPU, here)
            saved, kernels.CPU_INTERPRETER = kernels.CPU_INTERPRETER, True
            try:
                fused.layer_norm(torch.randn(rows, HIDDEN, dtype=torch.float16),
                                 torch.nn.LayerNorm(HIDDEN, dtype=torch.float16))  # fmt: skip
            finally:
                kernels.CPU_INTERPRETER = saved
            return
        block, width = 16, 64  # cache blocks of 16 positions, 1 024 positions a row
        pool = torch.zeros(rows * width + 1, block, HEADS, HIDDEN // HEADS, dtype=torch.float16)
        tables = torch.zeros(rows, width, dtype=torch.int32)
        lens = torch.full((rows,), 300, dtype=torch.int32)
        early = {"static": True} if name == "cross attention" else {"fresh_from": lens - 1}
        q = torch.zeros(rows, HEADS, HIDDEN // HEADS, dtype=torch.float16)
        kernels.paged_attention_triton(q, pool, pool, tables, lens, 0.125, **early)
        return
    n, k, ln, has_bias, act, has_res = SHAPES[name]
    kw = dict(
        bias=torch.zeros(n, dtype=torch.float16) if has_bias else None,
        norm=torch.nn.LayerNorm(k, dtype=torch.float16) if ln else None,
        act=act,
        residual=torch.zeros(rows, n, dtype=torch.float16) if has_res else None,
    )
    fused.linear_triton(torch.randn(rows, k, dtype=torch.float16), weights(fmt, n, k, "cpu"), n, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    ap.add_argument("--shapes", default=",".join(SHAPES),
                    help=f"decoder linears, of {', '.join(SHAPES)}; or {', '.join(OTHER_SHAPES)} (fp16)")  # fmt: skip
    ap.add_argument("--formats", default="fp16,int8,int4")
    ap.add_argument("--rows", default="1", help="row counts, e.g. 1,2,20 (each picks its own kernel variant)")
    ap.add_argument(
        "--out", type=Path, help="also write kernel_asm.json and each kernel's .ttgir, .ptx and .sass here"
    )
    args = ap.parse_args()
    print(
        "| shape | fmt | rows | layout conversions | barriers | global loads | after the wait | registers | spilled bytes |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for name, rows in itertools.product(args.shapes.split(","), (int(r) for r in args.rows.split(","))):
        for fmt in args.formats.split(","):
            if name in OTHER_SHAPES and fmt != "fp16":
                continue
            compiled: list = []
            with compiling_for(args.arch, compiled):
                launch(name, fmt, rows)
            if not compiled:
                print(f"| {name} | {fmt} | {rows} | PyTorch runs it at this row count |")
                continue
            sass = cuobjdump(compiled[0].asm["cubin"], "-sass")
            s = summary(compiled[0], sass)
            results.append({"shape": name, "fmt": fmt, "rows": rows, "arch": args.arch, **s})
            loads = ", ".join(f"{v} {op}" for op, v in sorted(s["global loads"].items()))
            print(
                f"| {name} | {fmt} | {rows} | {s['layout conversions']} | {s['barriers']} | {loads} | "
                f"{s['after the wait']} | {s['registers']} | {s['spilled bytes']} |"
            )
            if args.out:
                args.out.mkdir(parents=True, exist_ok=True)
                stem = f"{name.replace(' ', '_')}-{fmt}-{rows}rows"
                for ext in ("ttgir", "ptx"):
                    (args.out / f"{stem}.{ext}").write_text(compiled[0].asm[ext])
                (args.out / f"{stem}.sass").write_text(sass)
    if args.out:
        (args.out / "kernel_asm.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
