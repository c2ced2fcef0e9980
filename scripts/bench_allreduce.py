"""All-reduce latency at the sizes a tensor-parallel decode step sums (rows x d_model): NCCL against
the runtime's peer-memory path (`serve.runtime.tp`: PyTorch's symmetric-memory one-shot all-reduce,
peer-to-peer reads over NVLink, no multicast), each timed eagerly and as CUDA-graph replays, as the
decode step runs it. At batch 1 a step of mBART-large at TP=2 sums 36 such tensors in sequence, so their
latency, not bandwidth, decides whether TP=2 can be faster than TP=1. Needs 2+ GPUs.

    python scripts/bench_allreduce.py --dtype float16 --out out/allreduce
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from serve.runtime import tp  # noqa: E402


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


def _cases(dtype: torch.dtype, rows: int, hidden: int) -> dict:
    """name -> (x, a callable that returns the sum of x over ranks), for a `dtype` model's [rows, hidden]
    partial sums: NCCL, and the runtime's peer-memory path as its fused kernels use it (x is their output
    in the peer buffer, `tp.partial_out`; float32 for a float16 model, cast back after the sum)."""
    x = torch.empty(rows, hidden, dtype=dtype, device="cuda")
    cases = {"nccl": (x, lambda: (dist.all_reduce(x), x)[1])}
    partial = tp.partial_out(rows, hidden, dtype)
    if partial is not None:
        cases["peer one-shot"] = (partial, lambda: tp.all_reduce(partial).to(dtype))
    return cases


def _worker(rank: int, world: int, init_file: str, args: argparse.Namespace) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))  # fmt: skip
    dtype, device = getattr(torch, args.dtype), torch.device("cuda", rank)
    os.environ["MT_PEER_ALL_REDUCE"] = "1"
    peer = tp.use_peer_all_reduce(dtype, device)
    report = {"world_size": world, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "hidden": args.hidden, "dtype": args.dtype, "reps": args.reps, "peer": peer, "us": {}, "correct": {}}  # fmt: skip
    for r in (int(r) for r in args.rows.split(",")):
        for name, (x, fn) in _cases(dtype, r, args.hidden).items():
            key = f"{name} rows={r}"
            try:  # the GPUs fail alike, so both ranks go on to the next case together
                x.fill_(rank + 1)
                got = fn()
                torch.cuda.synchronize()
                report["correct"][key] = bool((got.float() == world * (world + 1) / 2).all())
                for graph in (False, True):
                    report["us"][f"{key} {'graph' if graph else 'eager'}"] = _time(fn, args.reps, graph)
            except Exception as e:
                report["correct"][key] = f"{type(e).__name__}: {e}"
    if rank == 0:
        print(f"{'case':<28}{'eager us':>10}{'graph us':>10}  correct")
        for key, ok in report["correct"].items():
            eager, graph = (report["us"].get(f"{key} {m}", float("nan")) for m in ("eager", "graph"))
            print(f"{key:<28}{eager:>10.1f}{graph:>10.1f}  {ok}")
        args.out.mkdir(parents=True, exist_ok=True)
        report["command"] = " ".join(sys.argv)
        (args.out / "allreduce.json").write_text(json.dumps(report, indent=2) + "\n")
    tp.leave()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/allreduce"))
    ap.add_argument("--rows", default="1,8,64,128,512", help="rows of --hidden values per all-reduce")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--dtype", default="float16", help="the model's dtype (float16 sums float32 partials)")
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
