"""`python -m serve` as a process: one-line startup errors, and SIGTERM draining to exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from conftest import real_sentences
from test_server_support import free_port

ROOT = Path(__file__).resolve().parent.parent


def serve_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MT_") or k == "MT_DATA_ROOT"}
    return {**env, "MT_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT), **extra}


def run_serve(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_unobtainable_model_fails_fast_with_one_clear_line(tmp_path):
    out = run_serve([], serve_env(tmp_path, HF_HUB_OFFLINE="1"))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "MODEL=tiny" in lines[0] and "MODEL=<path" in lines[0], out.stderr


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--backend", "trtllm"], "--engine-dir"),
        (["--model", "/no/such/dir"], "not found"),
        (["--max-batch-size", "0"], "max_batch_size"),
    ],
)
def test_bad_startup_settings(tmp_path, args, fragment):
    out = run_serve(args, serve_env(tmp_path))
    assert out.returncode == 2 and fragment in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_env_and_help(tmp_path):
    out = run_serve(["--help"], serve_env(tmp_path))
    assert out.returncode == 0 and "--max-queue" in out.stdout and "MT_<NAME>" in out.stdout
    out = run_serve([], serve_env(tmp_path, MT_BACKEND="trtllm"))  # the environment is read too
    assert out.returncode == 2 and "--engine-dir" in out.stderr


def test_sigterm_drains_running_requests_and_exits_zero(tmp_path, tiny_ckpt):
    port = free_port()
    args = ["--model", str(tiny_ckpt), "--port", str(port), "--device", "cpu", "--max-batch-size", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "serve", *args], cwd=ROOT, env=serve_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            for _ in range(1200):
                try:
                    if client.get("/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                threading.Event().wait(0.1)
            assert client.get("/health/ready").status_code == 200

            long_text = " ".join(real_sentences("en", 24, offset=300))
            body = {"text": long_text, "source_lang": "en", "target_lang": "de", "max_new_tokens": 32}
            result: dict = {}
            worker = threading.Thread(target=lambda: result.update(r=client.post("/translate", json=body)))
            worker.start()
            for _ in range(600):
                if "mt_http_requests_in_flight 1.0" in client.get("/metrics").text:
                    break
                threading.Event().wait(0.02)
            proc.send_signal(signal.SIGTERM)
            try:  # a new request during the drain is refused with 503, or finds the port closed
                late = client.post(
                    "/translate", json={"text": "Late.", "source_lang": "en", "target_lang": "de"}
                )
                assert late.status_code == 503 and "retry-after" in late.headers
            except httpx.TransportError:
                pass
            worker.join(timeout=300)
        assert result["r"].status_code == 200, result["r"].text
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read() if proc.stdout else ""
    assert "draining: 1 request(s) in flight" in log, log
