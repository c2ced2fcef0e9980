"""CLI behaviour on bad input (one line, non-zero, no traceback), --help, and the HTTP client."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from eval.__main__ import main
from eval.backends import HttpBackend, retry_after_seconds
from eval.errors import EvalError


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse: --help and usage errors
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize("command", ["run", "regress", "compare"])
def test_help_explains_each_command(capsys, command):
    code, out = run_cli(capsys, command, "--help")
    assert code == 0
    assert {"run": "chrF++", "regress": "paired bootstrap", "compare": "side-by-side"}[command] in out


def test_missing_pair_lists_available_pairs(capsys, tmp_path):
    code, out = run_cli(
        capsys, "run", "--model", str(tmp_path), "--pairs", "zh-en,xx-en", "--out", str(tmp_path / "o")
    )
    assert code == 2 and len(out.strip().splitlines()) == 1
    assert "no test data for xx-en" in out and "available pairs: ar-en, de-en" in out and "zh-en" in out


def test_missing_set_lists_available_sets(capsys, tmp_path):
    code, out = run_cli(capsys, "run", "--url", "http://x", "--set", "flores", "--out", str(tmp_path))
    assert code == 2 and "available sets: ntrex" in out and len(out.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["run", "--model", "/no/such/ckpt", "--pairs", "zh-en", "--out", "o"],
            "checkpoint directory not found",
        ),
        (["run", "--url", "http://x", "--pairs", "zh_en", "--out", "o"], "--pairs takes"),
        (["run", "--url", "http://x", "--pairs", "zh-en", "--limit", "0", "--out", "o"], "must be >= 1"),
        (["run", "--url", "ftp://x", "--pairs", "zh-en", "--out", "o"], "http:// or https://"),
        (
            ["run", "--url", "http://x", "--pairs", "zh-en", "--tokenize", "en=nope", "--out", "o"],
            "no such tokenizer",
        ),
        (["run", "--pairs", "zh-en", "--out", "o"], "one of the arguments --model --url is required"),
        (["regress", "--baseline", "b.json", "--run", "/no/run"], "no results found at /no/run"),
        (["regress", "--baseline", "b.json", "--run", "/no/run", "--metrics", "ter"], "--metrics takes"),
        (["compare", "/no/a.json"], "no results found"),
    ],
)
def test_bad_input_is_one_line(capsys, argv, message):
    code, out = run_cli(capsys, *argv)
    assert code == 2 and message in out
    assert len(out.strip().splitlines()) == 1 and "Traceback" not in out


def test_entry_point_exits_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "eval",
            "run",
            "--url",
            "http://x",
            "--pairs",
            "zh-xx",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("python -m eval run: error: no test data for zh-xx")


def server(responses: list[httpx.Response], seen: list[dict]) -> httpx.MockTransport:
    """A fake /translate answering `responses` in order (then echoing uppercase) and recording requests."""

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append({"path": request.url.path, **body})
        if responses:
            return responses.pop(0)
        return httpx.Response(
            200,
            json={
                "translations": [{"text": t.upper(), "detected_source_lang": None} for t in body["text"]],
                "model": "fake-model",
                "usage": {"prompt_tokens": 1, "completion_tokens": 3 * len(body["text"])},
            },
        )

    return httpx.MockTransport(handler)


def test_http_client_honours_retry_after_then_succeeds():
    seen, slept = [], []
    busy = [
        httpx.Response(429, headers={"Retry-After": "3"}),
        httpx.Response(503, headers={"Retry-After": "120"}),
    ]
    backend = HttpBackend(
        "http://srv:8000/", beam_size=2, max_new_tokens=50, transport=server(busy, seen), sleep=slept.append
    )
    hyps, tokens = backend.translate(["a b", "c"], "zh", "en")
    assert hyps == ["A B", "C"] and tokens == 6 and backend.model_id == "fake-model"
    assert slept == [3.0, 60.0]  # Retry-After honoured, capped at max_wait
    assert len(seen) == 3 and seen[0]["path"] == "/translate"
    assert seen[-1] == {
        "path": "/translate",
        "text": ["a b", "c"],
        "source_lang": "zh",
        "target_lang": "en",
        "beam_size": 2,
        "max_new_tokens": 50,
    }


def test_http_client_gives_up_after_bounded_retries():
    seen, slept = [], []
    busy = [httpx.Response(429, headers={"Retry-After": "1"}) for _ in range(10)]
    backend = HttpBackend("http://srv", max_retries=3, transport=server(busy, seen), sleep=slept.append)
    with pytest.raises(EvalError, match="answered 429"):
        backend.translate(["x"], "zh", "en")
    assert len(seen) == 4 and slept == [1.0, 1.0, 1.0]


def test_http_client_reports_server_errors_in_one_line():
    backend = HttpBackend(
        "http://srv",
        transport=server([httpx.Response(422, json={"detail": "unsupported language 'xx'"})], []),
    )
    with pytest.raises(EvalError, match="answered 422: unsupported language 'xx'"):
        backend.translate(["x"], "xx", "en")


def test_url_run_sends_batches_of_the_requested_size(capsys, tmp_path, monkeypatch):
    seen: list[dict] = []
    transport = server([], seen)
    real_init = HttpBackend.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs, transport=transport)

    monkeypatch.setattr(HttpBackend, "__init__", init)
    out = tmp_path / "run"
    argv = [
        "run",
        "--url",
        "http://srv",
        "--pairs",
        "zh-en",
        "--limit",
        "5",
        "--batch-size",
        "2",
        "--out",
        str(out),
    ]
    code, text = run_cli(capsys, *argv, "--no-progress")
    assert code == 0, text
    assert [len(r["text"]) for r in seen] == [1, 2, 2, 1]  # an untimed warm-up, then the batches
    doc = json.loads((out / "results.json").read_text())
    assert doc["model"] == {"source": "url", "id": "fake-model", "url": "http://srv"}
    assert doc["pairs"]["zh-en"]["throughput"]["output_tokens"] == 15


def test_retry_after_parsing():
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds(None) == 1.0 and retry_after_seconds("soon") == 1.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past


def test_a_users_own_set_in_the_same_layout_works(capsys, tmp_path, monkeypatch):
    root = tmp_path / "data"
    (root / "test" / "mine").mkdir(parents=True)
    (root / "test" / "mine" / "en-de.en").write_text("Good morning.\nThank you.\n", encoding="utf-8")
    (root / "test" / "mine" / "en-de.de").write_text("Guten Morgen.\nDanke.\n", encoding="utf-8")
    monkeypatch.setenv("MT_DATA_ROOT", str(root))
    transport = server([], [])
    real_init = HttpBackend.__init__
    monkeypatch.setattr(
        HttpBackend, "__init__", lambda self, *a, **k: real_init(self, *a, **k, transport=transport)
    )
    out = tmp_path / "run"
    code, text = run_cli(
        capsys, "run", "--url", "http://srv", "--set", "mine", "--out", str(out), "--no-progress"
    )
    assert code == 0, text
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["pairs"]) == ["en-de"] and doc["pairs"]["en-de"]["sentences"] == 2
    assert (out / "hypotheses" / "en-de.de").read_text() == "GOOD MORNING.\nTHANK YOU.\n"
