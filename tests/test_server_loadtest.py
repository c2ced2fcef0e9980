"""scripts/loadtest.py --smoke: both servers start, every level completes, JSON and PNG are written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_loadtest_smoke(tmp_path, tiny_ckpt):
    out = tmp_path / "lt"
    cmd = [sys.executable, "scripts/loadtest.py", "--smoke", "--model", str(tiny_ckpt), "--device", "cpu",
           "--out", str(out), "--ready-timeout", "300"]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((out / "loadtest.json").read_text())
    assert set(report["modes"]) == {"inflight", "static"}
    for results in report["modes"].values():
        assert [r["concurrency"] for r in results] == [1, 2]
        for r in results:
            assert r["requests"] >= 2 and not r["errors"], r
            assert r["generated_tokens_per_s"] > 0 and r["latency_ms"]["p99"] >= r["latency_ms"]["p50"] > 0
            assert r["ttft_ms"]["p50"] is not None
    assert [g["concurrency"] for g in report["gain"]] == [1, 2]
    assert (out / "loadtest.png").stat().st_size > 1000
