"""Closed-loop load test: in-flight batching against a static-batching baseline, same model and load.

    python scripts/loadtest.py [--model tiny] [--levels 1,4,16,64] [--out out/loadtest] [--smoke]

Starts `python -m serve` on 127.0.0.1 twice: once as configured (in-flight batching) and once with
`--static-batching` (batches formed per burst and run to completion, nobody joins), and drives
each with N clients that each send one request, wait for it, and send the next (real NTREX
sentences over a mix of language pairs). Every level is bounded in requests and seconds, so the
run stops by itself. Per level: requests/s, generated tokens/s, p50/p95/p99 latency and
time-to-first-token (the server's X-Time-To-First-Token header), errors by status. Writes
`loadtest.json` and `loadtest.png` (throughput and p99 latency against concurrency) into --out;
the JSON's `gain` lists in-flight/static ratios per level. Localhost only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from eval.data import read_lines, test_pair_paths  # noqa: E402
from serve.app import TTFT_HEADER  # noqa: E402

PAIRS = ["en-de", "de-en", "en-zh", "zh-en", "ar-en", "ru-en", "hi-en", "en-fr", "sw-en", "en-ja"]
HOST = "127.0.0.1"


def sentence_pool(per_pair: int, seed: int = 0) -> list[dict]:
    """Request bodies: one real sentence each, source and target from the pair."""
    bodies = []
    for pair in PAIRS:
        src, tgt = pair.split("-")
        path = test_pair_paths(pair)[0]
        if not path.is_file():
            continue
        for line in read_lines(path, per_pair):
            bodies.append({"text": line, "source_lang": src, "target_lang": tgt})
    if not bodies:
        raise SystemExit(f"no test sentences found under {path.parent} (set MT_DATA_ROOT)")
    random.Random(seed).shuffle(bodies)
    return bodies


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """`python -m serve` in a subprocess on a free localhost port; its log goes to a file."""

    def __init__(self, args: argparse.Namespace, static: bool, log_path: Path):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        cmd = [sys.executable, "-m", "serve", "--host", HOST, "--port", str(self.port), "--model", args.model,
               "--max-batch-size", str(args.max_batch_size), "--max-queue", str(args.max_queue),
               "--log-level", "warning"]  # fmt: skip
        if args.device:
            cmd += ["--device", args.device]
        if static:
            cmd.append("--static-batching")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.log_path = log_path

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"server not ready after {timeout_s:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


async def run_level(url: str, clients: int, bodies: list[dict], max_requests: int, max_seconds: float,
                    max_new_tokens: int | None) -> dict:  # fmt: skip
    """`clients` closed loops until `max_requests` are sent or `max_seconds` pass."""
    latencies: list[float] = []
    ttfts: list[float] = []
    errors: dict[str, int] = {}
    tokens = 0
    sent = 0
    start = time.monotonic()
    deadline = start + max_seconds

    async def client_loop(client: httpx.AsyncClient, worker: int) -> None:
        nonlocal tokens, sent
        while sent < max_requests and time.monotonic() < deadline:
            body = dict(bodies[(sent * 7919 + worker) % len(bodies)])
            sent += 1
            if max_new_tokens:
                body["max_new_tokens"] = max_new_tokens
            t0 = time.monotonic()
            try:
                r = await client.post("/translate", json=body)
            except httpx.HTTPError as err:
                errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
                continue
            if r.status_code != 200:
                errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                if r.status_code in (429, 503):
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                continue
            latencies.append(time.monotonic() - t0)
            tokens += r.json()["usage"]["completion_tokens"]
            if TTFT_HEADER.lower() in r.headers:
                ttfts.append(float(r.headers[TTFT_HEADER]))

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=max_seconds + 120, limits=limits) as client:
        await asyncio.gather(*[client_loop(client, w) for w in range(clients)])
    elapsed = time.monotonic() - start
    ms = lambda v: None if v is None else round(1000 * v, 2)  # noqa: E731
    return {
        "concurrency": clients,
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 3),
        "requests_per_s": round(len(latencies) / elapsed, 3),
        "generated_tokens_per_s": round(tokens / elapsed, 2),
        "latency_ms": {f"p{q}": ms(percentile(latencies, q)) for q in (50, 95, 99)},
        "ttft_ms": {f"p{q}": ms(percentile(ttfts, q)) for q in (50, 95, 99)},
    }


def sweep(args: argparse.Namespace, static: bool, bodies: list[dict]) -> list[dict]:
    mode = "static" if static else "inflight"
    server = Server(args, static, args.out / f"server-{mode}.log")
    try:
        server.wait_ready(args.ready_timeout)
        results = []
        for level in args.levels:
            max_requests = max(level * args.requests_per_client, args.min_requests)
            res = asyncio.run(run_level(server.url, level, bodies, max_requests, args.seconds_per_level,
                                        args.max_new_tokens))  # fmt: skip
            print(f"{mode:8s} c={level:3d}  {res['requests_per_s']:8.2f} req/s  "
                  f"{res['generated_tokens_per_s']:9.1f} tok/s  p99 {res['latency_ms']['p99']} ms  "
                  f"errors {res['errors'] or 0}", flush=True)  # fmt: skip
            results.append(res)
        return results
    finally:
        server.stop()


def gains(inflight: list[dict], static: list[dict]) -> list[dict]:
    out = []
    for a, b in zip(inflight, static, strict=True):
        ratio = lambda x, y: round(x / y, 3) if x and y else None  # noqa: E731
        out.append({
            "concurrency": a["concurrency"],
            "throughput_ratio": ratio(a["requests_per_s"], b["requests_per_s"]),
            "tokens_per_s_ratio": ratio(a["generated_tokens_per_s"], b["generated_tokens_per_s"]),
            "p99_latency_ratio": ratio(a["latency_ms"]["p99"], b["latency_ms"]["p99"]),
        })  # fmt: skip
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode, results in report["modes"].items():
        xs = [r["concurrency"] for r in results]
        ax1.plot(xs, [r["generated_tokens_per_s"] for r in results], marker="o", label=mode)
        ax2.plot(xs, [r["latency_ms"]["p99"] or float("nan") for r in results], marker="o", label=mode)
    for ax, title, unit in ((ax1, "throughput", "generated tokens / s"), (ax2, "p99 latency", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{Path(report['config']['model']).name}: in-flight vs static batching")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="what `python -m serve --model` gets (default tiny)")
    p.add_argument("--levels", default="1,4,16,64", help="concurrency levels, comma separated")
    p.add_argument("--requests-per-client", type=int, default=8, help="requests per client per level")
    p.add_argument("--min-requests", type=int, default=16, help="at least this many requests per level")
    p.add_argument("--seconds-per-level", type=float, default=60.0, help="time bound of one level")
    p.add_argument("--max-new-tokens", type=int, default=None, help="per request (default: server default)")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-queue", type=int, default=4096)
    p.add_argument("--device", default=None, help="passed to the server (default: its auto)")
    p.add_argument("--ready-timeout", type=float, default=900.0, help="seconds to wait for each server")
    p.add_argument("--no-baseline", action="store_true", help="skip the static-batching server")
    p.add_argument("--out", type=Path, default=ROOT / "out" / "loadtest")
    p.add_argument("--smoke", action="store_true", help="tiny counts (levels 1,2; 2 requests each) for tests")
    args = p.parse_args(argv)
    if args.smoke:
        args.levels, args.requests_per_client, args.min_requests = "1,2", 2, 2
        args.seconds_per_level, args.max_new_tokens = (
            min(args.seconds_per_level, 30.0),
            args.max_new_tokens or 8,
        )
    args.levels = [int(x) for x in str(args.levels).split(",") if x.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    bodies = sentence_pool(per_pair=8 if args.smoke else 200)
    report: dict = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "modes": {"inflight": sweep(args, False, bodies)},
    }
    if not args.no_baseline:
        report["modes"]["static"] = sweep(args, True, bodies)
        report["gain"] = gains(report["modes"]["inflight"], report["modes"]["static"])
        for g in report["gain"]:
            print(f"gain c={g['concurrency']:3d}: throughput x{g['throughput_ratio']}, "
                  f"p99 latency x{g['p99_latency_ratio']}")  # fmt: skip
    (args.out / "loadtest.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "loadtest.png")
    print(f"wrote {args.out / 'loadtest.json'} and {args.out / 'loadtest.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
