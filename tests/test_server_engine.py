"""The HTTP layer on the real PytorchBackend with a tiny random model (CPU).

The conftest tiny model only ever repeats the target-language token (tied embeddings), which would
make "same output" checks vacuous; this module builds a variant with an untied, large-scale LM
head whose greedy output depends on the source, so batching mistakes show up as different text.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import real_sentences
from prometheus_client.parser import text_string_to_metric_families
from test_server import BAD_INPUTS
from test_server_support import make_app, running, wait_ready

from serve.app import create_app
from serve.model_store import ModelPlan
from serve.settings import Settings

pytest.importorskip("serve.engine.async_engine")
pytestmark = pytest.mark.anyio

LANGS = ["en", "zh", "ar", "ru", "hi", "de", "sw"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def varied_ckpt(tiny_mbart_dir, tmp_path_factory) -> Path:
    """The tiny mBART re-initialised so that its greedy output depends on the source sentence."""
    import torch
    from transformers import AutoTokenizer, MBartConfig, MBartForConditionalGeneration

    from convert.__main__ import convert_checkpoint

    root = tmp_path_factory.mktemp("varied")
    cfg = MBartConfig.from_pretrained(tiny_mbart_dir)
    cfg.tie_word_embeddings, cfg.init_std = False, 0.2
    torch.manual_seed(1)
    model = MBartForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)
    model.save_pretrained(root / "hf")
    AutoTokenizer.from_pretrained(tiny_mbart_dir).save_pretrained(root / "hf")
    return convert_checkpoint(str(root / "hf"), root / "ckpt", 1, "float32", progress=False)


def engine_app(ckpt: Path, **overrides):
    return make_app(ckpt, None, device="cpu", dtype="float32", **overrides)


def mixed_requests(n: int) -> list[dict]:
    """`n` requests over language pairs, 1-3 real sentences each, explicit and auto sources."""
    out = []
    for i in range(n):
        src, tgt = LANGS[i % len(LANGS)], LANGS[(i * 3 + 1) % len(LANGS)]
        sentences = real_sentences(src, 1 + i % 3, offset=10 + 3 * i)
        text = ("" if src in ("zh",) else " ").join(sentences)
        body = {"text": text, "target_lang": tgt if tgt != src else "fr", "max_new_tokens": 6 + i % 5}
        if i % 2:
            body["source_lang"] = src
        out.append(body)
    return out


async def test_concurrent_requests_match_one_by_one(varied_ckpt):
    requests = mixed_requests(32)
    async with running(engine_app(varied_ckpt, max_batch_size=16)) as client:
        alone = [(await client.post("/translate", json=body)) for body in requests]
        together = await asyncio.gather(*[client.post("/translate", json=body) for body in requests])
    assert all(r.status_code == 200 for r in alone + list(together))
    for body, a, b in zip(requests, alone, together, strict=True):
        assert a.json()["translations"] == b.json()["translations"], body
        assert a.json()["usage"] == b.json()["usage"], body
    assert len({r.json()["translatedText"] for r in alone}) > 16  # outputs really differ by source


async def test_long_multi_paragraph_text_keeps_its_layout(varied_ckpt):
    paragraphs = []
    for k, lang in enumerate(["en", "ru", "ar", "hi"]):
        paragraphs.append(" ".join(real_sentences(lang, 4, offset=40 + 4 * k)))
    text = "  " + "\n\n".join(paragraphs[:2]) + "\n\n\n" + "\n".join(paragraphs[2:]) + "\n"
    async with running(engine_app(varied_ckpt)) as client:
        r = await client.post(
            "/translate", json={"text": text, "source_lang": "en", "target_lang": "de", "max_new_tokens": 8}
        )
    assert r.status_code == 200, r.text
    out = r.json()["translatedText"]
    assert out.startswith("  ") and out.endswith("\n")
    assert [line == "" for line in out.split("\n")] == [line == "" for line in text.split("\n")]
    # each paragraph's sentences came back as that many translations separated by the source's spaces
    for src_line, out_line in zip(text.split("\n"), out.split("\n"), strict=True):
        assert bool(src_line.strip()) == bool(out_line.strip())


async def test_metrics_move_with_real_engine(varied_ckpt):
    async with running(engine_app(varied_ckpt)) as client:
        before = (await client.get("/metrics")).text
        body = {
            "text": "One sentence. Two sentences.",
            "source_lang": "en",
            "target_lang": "de",
            "max_new_tokens": 5,
        }
        assert (await client.post("/translate", json=body)).status_code == 200
        after = (await client.get("/metrics")).text

    def value(text: str, name: str) -> float:
        return sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == name and not s.labels
        )

    assert value(after, "mt_generated_tokens_total") - value(before, "mt_generated_tokens_total") == 10
    assert value(after, "mt_completion_tokens_total") - value(before, "mt_completion_tokens_total") == 10
    assert value(after, "mt_time_to_first_token_seconds_count") >= 1
    assert value(after, "mt_kv_blocks_free") > 0 and value(after, "mt_kv_blocks_used") == 0


async def test_bad_inputs_with_real_engine(tiny_ckpt):
    app = engine_app(tiny_ckpt, max_texts_per_request=4, max_tokens_per_text=100, max_body_bytes=4096)
    async with running(app) as client:
        for name, kwargs, status, fragment in BAD_INPUTS:
            if isinstance(kwargs.get("content"), list):
                continue  # chunked upload is covered with the fake backend
            r = await client.post("/translate", **kwargs)
            assert r.status_code == status and fragment in r.json()["error"], (name, r.text)
        ok = {"text": "Still serving.", "source_lang": "en", "target_lang": "de", "max_new_tokens": 4}
        assert (await client.post("/translate", json=ok)).status_code == 200


async def test_overload_gives_429_with_retry_after(tiny_ckpt):
    app = engine_app(tiny_ckpt, max_queue=2, max_batch_size=1)
    text = " ".join(real_sentences("en", 12, offset=100))
    async with running(app) as client:
        r = await client.post("/translate", json={"text": text, "source_lang": "en", "target_lang": "de"})
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) >= 1 and r.json()["type"] == "overloaded"
        # the rejected request's accepted sentences were cancelled; the engine is idle and serves again
        ok = {"text": "Small.", "source_lang": "en", "target_lang": "de", "max_new_tokens": 4}
        assert (await client.post("/translate", json=ok)).status_code == 200
        stats = app.state.service.backend.stats()
        assert stats.running == 0 and stats.waiting == 0 and stats.kv_blocks_used == 0


@dataclass
class GatedPlan(ModelPlan):
    """A plan whose checkpoint 'arrives' only when the test says so (a slow download, say)."""

    release: threading.Event = field(default_factory=threading.Event)

    def materialize(self, progress: bool = True) -> Path:
        self.release.wait(timeout=120)
        return super().materialize(progress)


async def test_ready_only_after_load_and_warmup(tiny_ckpt):
    plan = GatedPlan("tiny", tiny_ckpt)
    app = create_app(Settings(device="cpu", dtype="float32"), plan)
    async with running(app, ready=False) as client:
        r = await client.get("/health/ready")
        assert r.status_code == 503 and r.json()["status"] == "loading" and "retry-after" in r.headers
        r = await client.post("/translate", json={"text": "Early.", "source_lang": "en", "target_lang": "de"})
        assert r.status_code == 503 and "retry-after" in r.headers
        assert (await client.get("/health/live")).status_code == 200
        plan.release.set()
        await wait_ready(client)
        assert app.state.service.backend.stats().generated_tokens > 0  # the warm-up went through the engine
        r = await client.post("/translate", json={"text": "Now.", "source_lang": "en", "target_lang": "de"})
        assert r.status_code == 200


def test_tiny_model_store_roundtrip(tmp_path, tiny_mbart_dir):
    """A Hugging Face dir is converted once into the cache and then reused as is."""
    from serve.model_store import is_converted, plan

    first = plan(str(tiny_mbart_dir), tmp_path, "float32", 1)
    assert first.source is not None and not is_converted(first.ckpt_dir)
    ckpt = first.materialize(progress=False)
    assert is_converted(ckpt) and ckpt.parent == tmp_path and ckpt.name.endswith("-float32-tp1")
    again = plan(str(tiny_mbart_dir), tmp_path, "float32", 1)
    assert again.ckpt_dir == ckpt
    direct = plan(str(ckpt), tmp_path / "unused")
    assert direct.source is None and direct.ckpt_dir == ckpt
    shutil.rmtree(ckpt)
