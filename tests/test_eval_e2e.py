"""End to end with the real runtime: the tiny converted mBART over a few real sentences per pair.

Scores of a random model are meaningless; what is checked is the machinery: outputs, provenance,
that every score can be recomputed, that the gate round-trips, and that a run through the
server's HTTP API gives the same hypotheses as the in-process run.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from sacrebleu.metrics import BLEU, CHRF

from eval import data as eval_data
from eval.__main__ import main
from eval.provenance import checkpoint_hash, sha256_file
from eval.results import read_hypotheses

PAIRS = ["zh-en", "en-zh", "ar-en"]
LIMIT = 4
COMMON = ["--pairs", ",".join(PAIRS), "--limit", str(LIMIT), "--batch-size", "3", "--max-new-tokens", "12"]
COMMON += ["--no-progress"]
SERVER_APP = Path(__file__).resolve().parent.parent / "serve" / "app.py"


@pytest.fixture(scope="module")
def inproc(tiny_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval_e2e") / "inproc"
    assert main(["run", "--model", str(tiny_ckpt), "--device", "cpu", *COMMON, "--out", str(out)]) == 0
    return out


def test_in_process_run_writes_everything(inproc, tiny_ckpt):
    doc = json.loads((inproc / "results.json").read_text())
    assert list(doc["pairs"]) == PAIRS
    model = doc["model"]
    assert model["source"] == "checkpoint" and model["id"]
    assert model["checkpoint_sha256"] == checkpoint_hash(tiny_ckpt)["sha256"]
    assert model["quant_algo"] is None and model["dtype"] == "float32"
    assert doc["settings"]["limit"] == LIMIT and doc["settings"]["beam_size"] == 1
    for pair, e in doc["pairs"].items():
        src_path, ref_path = eval_data.test_pair_paths(pair)
        assert e["data"]["source"]["sha256"] == sha256_file(src_path)
        assert e["data"]["reference"]["sha256"] == sha256_file(ref_path)
        hyps = read_hypotheses(inproc / e["hypotheses_file"])
        refs = eval_data.read_lines(ref_path)[:LIMIT]
        assert len(hyps) == e["sentences"] == LIMIT
        assert e["bleu"] == pytest.approx(
            BLEU(tokenize=e["tokenize"]).corpus_score(hyps, [refs]).score, abs=1e-3
        )
        assert e["chrf"] == pytest.approx(CHRF(word_order=2).corpus_score(hyps, [refs]).score, abs=1e-3)
        assert e["tokenize"] == ("zh" if pair == "en-zh" else "13a")
        assert e["throughput"]["output_tokens"] > 0 and e["throughput"]["sentences_per_s"] > 0
    md = (inproc / "results.md").read_text()
    assert all(f"| {pair} | {LIMIT} |" in md for pair in PAIRS)
    assert (inproc / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_hash_does_not_depend_on_conversion_json(tiny_ckpt, tmp_path):
    """Recorded rank digests are a shortcut, not a different hash: rehashing every file agrees."""
    copy = shutil.copytree(tiny_ckpt, tmp_path / "ckpt")
    (copy / "conversion.json").unlink()
    assert checkpoint_hash(copy)["sha256"] == checkpoint_hash(tiny_ckpt)["sha256"]
    assert "conversion.json" in checkpoint_hash(tiny_ckpt)["method"]


def test_gate_round_trip_on_real_output(inproc, tmp_path, capsys):
    baseline = tmp_path / "tiny.json"
    assert main(["regress", "--baseline", str(baseline), "--run", str(inproc), "--update"]) == 0
    assert (
        main(["regress", "--baseline", str(baseline), "--run", str(inproc), "--bootstrap-samples", "100"])
        == 0
    )
    assert "PASS" in capsys.readouterr().out


@pytest.mark.skipif(not SERVER_APP.exists(), reason="serve/app.py (the HTTP server) has not landed yet")
def test_url_run_matches_in_process_run(inproc, tiny_ckpt, tmp_path, monkeypatch):
    """The real app in process (fastapi TestClient, injected into the URL client): same hypotheses."""
    from fastapi.testclient import TestClient

    from eval.backends import HttpBackend
    from serve.app import create_app
    from serve.model_store import ModelPlan
    from serve.settings import Settings

    settings = Settings(model=str(tiny_ckpt), backend="pytorch", device="cpu", dtype="float32", warmup=False)
    app = create_app(settings, ModelPlan("tiny", tiny_ckpt))
    with TestClient(app) as client:
        for _ in range(600):  # bounded by a count, not a clock
            if client.get("/health/ready").status_code == 200:
                break
            time.sleep(0.05)
        real_init = HttpBackend.__init__

        def init(self, *args, **kwargs):
            real_init(self, *args, **kwargs, client=client)

        monkeypatch.setattr(HttpBackend, "__init__", init)
        out = tmp_path / "url"
        assert main(["run", "--url", str(client.base_url), *COMMON, "--out", str(out)]) == 0
    a = json.loads((inproc / "results.json").read_text())["pairs"]
    b = json.loads((out / "results.json").read_text())["pairs"]
    for pair in PAIRS:
        assert read_hypotheses(out / b[pair]["hypotheses_file"]) == read_hypotheses(
            inproc / a[pair]["hypotheses_file"]
        )
        assert (b[pair]["bleu"], b[pair]["chrf"], b[pair]["signatures"]) == (
            a[pair]["bleu"],
            a[pair]["chrf"],
            a[pair]["signatures"],
        )
