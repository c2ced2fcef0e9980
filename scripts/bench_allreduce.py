"""All-reduce latency at the sizes a tensor-parallel decode step sums (rows x d_model): NCCL
against PyTorch's symmetric-memory one-shot all-reduce (`torch.ops.symm_mem`, peer-to-peer reads
over NVLink, no multicast), each timed eagerly and as CUDA-graph replays, as the decode step runs it.
At batch 1 a step of mBART-large at TP=2 sums 36 such tensors in sequence, so their latency, not
bandwidth, decides whether TP=2 is faster than TP=1. Needs 2+ GPUs.

    python scripts/bench_allreduce.py --out out/allreduce
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _time(fn, reps: int, graph: bool) -> float:
    """Microseconds per call: `reps` calls in one CUDA graph, replayed, or launched eagerly."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps):
                fn()
        run = g.replay
    else:

        def run() -> None:
            for _ in range(reps):
                fn()

    run()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * reps)


def _methods(world: int, numel_max: int, dtype: torch.dtype) -> dict:
    """name -> (make(x) -> a callable that returns the sum of x over ranks). Symmetric memory is left out where it fails to
    set up (no peer access between the GPUs, or a PyTorch without it)."""
    group = dist.group.WORLD.group_name
    out = {"nccl": lambda x: lambda: (dist.all_reduce(x), x)[1]}
    try:
        import torch.distributed._symmetric_memory as symm_mem

        buf = symm_mem.empty(numel_max, dtype=dtype, device="cuda")
        symm_mem.rendezvous(buf, group)
        ops = torch.ops.symm_mem

        def one_shot(x):
            y = torch.empty_like(x)
            return lambda: ops.one_shot_all_reduce_copy_out(buf[: x.numel()].view_as(x), x, "sum", group, y)

        out["symm one-shot"] = one_shot
    except Exception as e:  # reported, so the table says why the column is missing
        print(
            f"rank {dist.get_rank()}: symmetric memory unavailable: {type(e).__name__}: {e}", file=sys.stderr
        )
    return out


def _check(make, x: torch.Tensor, world: int) -> bool:
    """The sum of every rank's (rank + 1) is world (world + 1) / 2 in every element."""
    x.fill_(dist.get_rank() + 1)
    got = make(x)()
    torch.cuda.synchronize()
    return bool((got.float() == world * (world + 1) / 2).all())


def _worker(rank: int, world: int, init_file: str, args: argparse.Namespace) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))  # fmt: skip
    rows = [int(r) for r in args.rows.split(",")]
    dtype = getattr(torch, args.dtype)
    methods = _methods(world, max(rows) * args.hidden, dtype)
    report = {"world_size": world, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "hidden": args.hidden, "dtype": args.dtype, "reps": args.reps, "us": {}, "correct": {}}  # fmt: skip
    for name, make in methods.items():
        for r in rows:
            x = torch.empty(r, args.hidden, dtype=dtype, device="cuda")
            key = f"{name} rows={r}"
            try:  # the GPUs fail alike, so both ranks go on to the next case together
                report["correct"][key] = _check(make, x, world)
                for graph in (False, True):
                    report["us"][f"{key} {'graph' if graph else 'eager'}"] = _time(make(x), args.reps, graph)
            except Exception as e:
                report["correct"][key] = f"{type(e).__name__}: {e}"
    if rank == 0:
        print(f"{'method':<16}{'rows':>6}{'KB':>8}{'eager us':>10}{'graph us':>10}  correct")
        for name in methods:
            for r in rows:
                key = f"{name} rows={r}"
                eager, graph = (report["us"].get(f"{key} {m}", float("nan")) for m in ("eager", "graph"))
                print(f"{name:<16}{r:>6}{r * args.hidden * dtype.itemsize / 1024:>8.0f}{eager:>10.1f}{graph:>10.1f}  "
                      f"{report['correct'][key]}")  # fmt: skip
        args.out.mkdir(parents=True, exist_ok=True)
        report["command"] = " ".join(sys.argv)
        (args.out / "allreduce.json").write_text(json.dumps(report, indent=2) + "\n")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/allreduce"))
    ap.add_argument("--rows", default="1,8,64,128,512", help="rows of --hidden values per all-reduce")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16",
                    help="PyTorch's one-shot kernel takes float32 and bfloat16 only (not float16, as of 2.11)")  # fmt: skip
    ap.add_argument("--reps", type=int, default=50, help="all-reduces per timed graph or eager loop")
    ap.add_argument("--world-size", type=int, default=0, help="GPUs (default: all)")
    args = ap.parse_args()
    world = args.world_size or torch.cuda.device_count()
    if world < 2:
        sys.exit("bench_allreduce needs at least 2 GPUs")
    fd, init_file = tempfile.mkstemp(prefix="allreduce-")
    os.close(fd)
    os.unlink(init_file)
    mp.spawn(_worker, args=(world, init_file, args), nprocs=world)


if __name__ == "__main__":
    main()
