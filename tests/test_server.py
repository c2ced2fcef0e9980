"""HTTP layer against a fake backend: validation, auth, overload, failures, readiness, disconnects.

The fake echoes source ids, so every assertion about text is exact; the real engine has its own
file (test_server_engine.py).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from conftest import real_sentences
from prometheus_client.parser import text_string_to_metric_families
from test_server_support import FakeBackend, make_app, running, uvicorn_server, wait_ready

from serve.tokenizer import TranslationTokenizer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def tok(tiny_ckpt) -> TranslationTokenizer:
    return TranslationTokenizer(tiny_ckpt)


def marker(tok: TranslationTokenizer, word: str, avoid: list[str]) -> int:
    """A token id of `word` that none of `avoid` (nor the warm-up text) contains."""
    from serve.app import WARMUP_TEXT

    taken = {i for ids in tok.text_ids([*avoid, WARMUP_TEXT]) for i in ids}
    return next(i for i in tok.text_ids([word])[0] if i not in taken)


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


async def test_translate_roundtrip_and_both_dialects(tiny_ckpt):
    async with running(make_app(tiny_ckpt, FakeBackend())) as client:
        r = await client.post(
            "/translate", json={"text": "The cat sleeps. The dog barks.", "target_lang": "de"}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        # the fake echoes the source, so the output is the source, split and reassembled
        assert body["translations"] == [
            {"text": "The cat sleeps. The dog barks.", "detected_source_lang": "en"}
        ]
        assert body["translatedText"] == "The cat sleeps. The dog barks."
        assert (
            body["detectedLanguage"]["language"] == "en" and 0 < body["detectedLanguage"]["confidence"] <= 100
        )
        assert body["model"] == "test-model"
        assert body["usage"]["prompt_tokens"] > body["usage"]["completion_tokens"] > 0
        assert "x-time-to-first-token" in r.headers

        r = await client.post(
            "/translate", json={"q": ["Hello.", "Good night."], "source": "EN", "target": "zh_cn"}
        )
        body = r.json()
        assert r.status_code == 200 and body["translatedText"] == ["Hello.", "Good night."]
        assert "detectedLanguage" not in body  # only when the source was auto
        assert [t["detected_source_lang"] for t in body["translations"]] == [None, None]

        # LibreTranslate clients post forms
        r = await client.post(
            "/translate", data={"q": "Hello.", "source": "en", "target": "fr", "format": "text"}
        )
        assert r.status_code == 200 and r.json()["translatedText"] == "Hello."


async def test_layout_is_kept_exactly(tiny_ckpt):
    paras = [" ".join(real_sentences("en", 3, offset=k * 3)) for k in range(4)]
    text = "\n\n".join(paras[:2]) + "\n\n\n  " + paras[2] + "\n" + paras[3] + "\n"
    fake = FakeBackend()
    async with running(make_app(tiny_ckpt, fake)) as client:
        r = await client.post("/translate", json={"text": text, "source_lang": "en", "target_lang": "de"})
        assert r.status_code == 200, r.text
        assert r.json()["translatedText"] == text
    assert fake.completed >= 12  # sentences went to the engine one by one (plus warm-up)


async def test_auto_detects_each_text(tiny_ckpt):
    texts = {lang: real_sentences(lang, 1, offset=5)[0] for lang in ("zh", "ar", "ru", "hi", "de")}
    async with running(make_app(tiny_ckpt, FakeBackend())) as client:
        r = await client.post("/translate", json={"text": list(texts.values()), "target_lang": "en"})
        assert r.status_code == 200, r.text
        detected = [t["detected_source_lang"] for t in r.json()["translations"]]
        assert detected == list(texts)
        assert [d["language"] for d in r.json()["detectedLanguage"]] == list(texts)
        r = await client.post("/detect", json={"q": texts["ru"]})
        assert r.status_code == 200 and r.json()[0]["language"] == "ru"


async def test_source_equal_target_returns_text_unchanged(tiny_ckpt):
    fake = FakeBackend()
    async with running(make_app(tiny_ckpt, fake, warmup=False)) as client:
        text = "  Unchanged,  exactly.\n"
        r = await client.post("/translate", json={"text": text, "source_lang": "en_XX", "target_lang": "en"})
        assert r.status_code == 200 and r.json()["translatedText"] == text
        assert r.json()["usage"] == {"prompt_tokens": 0, "completion_tokens": 0}
    assert fake.admitted == 0


async def test_languages_health_docs(tiny_ckpt):
    async with running(make_app(tiny_ckpt, FakeBackend())) as client:
        langs = {entry["code"]: entry for entry in (await client.get("/languages")).json()}
        assert langs["zh"]["mbart_code"] == "zh_CN" and langs["zh"]["name"] == "Chinese"
        assert "en" in langs["zh"]["targets"] and "zh" not in langs["zh"]["targets"]
        assert (await client.get("/health/live")).json() == {"status": "live", "detail": None}
        assert (await client.get("/health/ready")).status_code == 200
        schema = (await client.get("/openapi.json")).json()
        assert "TranslateRequest" in schema["components"]["schemas"]


BAD_INPUTS = [
    # (name, request kwargs, status, fragment of the error message)
    (
        "invalid json",
        {"content": b'{"text": "hi", ', "headers": {"content-type": "application/json"}},
        400,
        "JSON",
    ),
    (
        "invalid utf-8",
        {
            "content": b'{"text": "\xff\xfe", "target_lang": "de"}',
            "headers": {"content-type": "application/json"},
        },
        400,
        "UTF-8",
    ),  # fmt: skip
    (
        "lone surrogate",
        {
            "content": b'{"text": "a\\ud800b", "target_lang": "de"}',
            "headers": {"content-type": "application/json"},
        },
        400,
        "surrogate",
    ),  # fmt: skip
    ("text not a string", {"json": {"text": 12, "target_lang": "de"}}, 422, "text"),
    ("list of numbers", {"json": {"text": [1, 2], "target_lang": "de"}}, 422, "text"),
    ("beam not an int", {"json": {"text": "hi", "target_lang": "de", "beam_size": "wide"}}, 422, "beam_size"),
    ("body not an object", {"json": ["hi"]}, 422, "object"),
    ("missing target", {"json": {"text": "hi"}}, 422, "target_lang is required"),
    ("missing text", {"json": {"target_lang": "de"}}, 422, "text is required"),
    ("html format", {"json": {"q": "hi", "target": "de", "format": "html"}}, 422, "format"),
    ("unknown target", {"json": {"text": "hi", "target_lang": "xx"}}, 400, "supported: af, ar"),
    (
        "unknown source",
        {"json": {"text": "hi", "source_lang": "klingon", "target_lang": "de"}},
        400,
        "'klingon'",
    ),
    ("empty text", {"json": {"text": "", "target_lang": "de"}}, 400, "empty"),
    ("blank text", {"json": {"text": " \n\t", "target_lang": "de"}}, 400, "empty"),
    ("empty list", {"json": {"text": [], "target_lang": "de"}}, 400, "empty"),
    ("one empty in list", {"json": {"text": ["ok", ""], "target_lang": "de"}}, 400, "text[1]"),
    ("too many texts", {"json": {"text": ["a"] * 5, "target_lang": "de"}}, 413, "limit is 4"),
    ("text over token limit", {"json": {"text": "word " * 300, "target_lang": "de"}}, 413, "limit is 100"),
    ("beam over limit", {"json": {"text": "hi", "target_lang": "de", "beam_size": 99}}, 400, "limit 8"),
    ("beam zero", {"json": {"text": "hi", "target_lang": "de", "beam_size": 0}}, 422, "beam_size"),
    (
        "max_new_tokens over cap",
        {"json": {"text": "hi", "target_lang": "de", "max_new_tokens": 10**6}},
        400,
        "512",
    ),
    ("body over limit", {"json": {"text": "x" * 5000, "target_lang": "de"}}, 413, "4096 bytes"),
    (
        "streamed body over limit",
        {
            "content": [b'{"text": "' + b"x" * 3000, b"y" * 3000 + b'"}'],
            "headers": {"content-type": "application/json"},
        },
        413,
        "4096 bytes",
    ),  # fmt: skip
]


@pytest.mark.parametrize("name,kwargs,status,fragment", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
async def test_bad_input_is_a_clear_4xx(tiny_ckpt, name, kwargs, status, fragment):
    app = make_app(
        tiny_ckpt, FakeBackend(), max_texts_per_request=4, max_tokens_per_text=100, max_body_bytes=4096
    )
    if isinstance(kwargs.get("content"), list):  # chunked upload, no Content-Length
        chunks = kwargs["content"]

        async def stream():
            for chunk in chunks:
                yield chunk

        kwargs = {**kwargs, "content": stream()}
    async with running(app) as client:
        r = await client.post("/translate", **kwargs)
        assert r.status_code == status, r.text
        body = r.json()
        assert fragment in body["error"], body
        assert body["type"]
        # the server still works afterwards
        ok = await client.post(
            "/translate", json={"text": "Still fine.", "source_lang": "en", "target_lang": "de"}
        )
        assert ok.status_code == 200


async def test_unknown_path_and_method_are_json(tiny_ckpt):
    async with running(make_app(tiny_ckpt, FakeBackend())) as client:
        r = await client.get("/nope")
        assert r.status_code == 404 and r.json()["error"]
        r = await client.get("/translate")
        assert r.status_code == 405 and r.json()["error"]


@pytest.mark.parametrize(
    "headers,body_key,status",
    [
        ({}, None, 401),
        ({"Authorization": "Bearer wrong"}, None, 401),
        ({"X-API-Key": "wrong"}, "s3cret", 401),  # a wrong header is not rescued by the body
        ({"Authorization": "Bearer s3cret"}, None, 200),
        ({"X-API-Key": "s3cret"}, None, 200),
        ({}, "s3cret", 200),
        ({}, "nope", 401),
    ],
)
async def test_api_key(tiny_ckpt, headers, body_key, status):
    async with running(make_app(tiny_ckpt, FakeBackend(), api_key="s3cret")) as client:
        payload = {
            "q": "Hello.",
            "source": "en",
            "target": "de",
            **({"api_key": body_key} if body_key else {}),
        }
        r = await client.post("/translate", json=payload, headers=headers)
        assert r.status_code == status, r.text
        if status == 401:
            assert "API key" in r.json()["error"] and r.headers["www-authenticate"] == "Bearer"
        # a bad body is still a 401 without the key: auth comes first
        r = await client.post("/translate", json={"nonsense": 1}, headers=headers)
        assert r.status_code == (422 if status == 200 and body_key is None else 401)
        # open endpoints stay open
        assert (await client.get("/health/ready")).status_code == 200
        assert (await client.get("/languages")).status_code == 200


async def test_overload_is_429_with_retry_after_and_spares_others(tiny_ckpt, tok):
    doomed = {"text": "Fine sentence. Overload now. Another one.", "source_lang": "en", "target_lang": "de"}
    fine = {"text": "A fine sentence.", "source_lang": "en", "target_lang": "de"}
    fake = FakeBackend(
        overload_id=marker(tok, "Overload", [fine["text"], "Fine sentence. Another one."]), delay=0.01
    )
    async with running(make_app(tiny_ckpt, fake)) as client:
        results = await asyncio.gather(
            *[client.post("/translate", json=doomed if i % 2 else fine) for i in range(8)]
        )
        for i, r in enumerate(results):
            if i % 2:
                assert r.status_code == 429 and r.headers["retry-after"] == "3", r.text
                assert r.json()["type"] == "overloaded"
            else:
                assert r.status_code == 200 and r.json()["translatedText"] == fine["text"]
    assert fake.active == 0


async def test_one_failure_fails_only_its_request_and_cancels_its_siblings(tiny_ckpt, tok):
    good = {"text": "Healthy text.", "source_lang": "en", "target_lang": "de"}
    bad = {"text": ["Poison pill.", "Slow one. Slow two."], "source_lang": "en", "target_lang": "de"}
    fake = FakeBackend(fail_id=marker(tok, "Poison", ["Slow one. Slow two.", "Healthy text."]), hold=True)
    async with running(make_app(tiny_ckpt, fake, warmup=False)) as client:
        pending = asyncio.ensure_future(client.post("/translate", json=good))
        for _ in range(400):
            if fake.active == 1:
                break
            await asyncio.sleep(0.01)
        r_bad = await client.post("/translate", json=bad)
        assert r_bad.status_code == 500 and r_bad.json()["type"] == "translation_failed"
        assert "injected failure" in r_bad.json()["error"]
        assert fake.cancelled == 2  # the two held sentences of the failed request were aborted
        assert fake.active == 1 and not pending.done()  # the other request is untouched
        fake.release.set()
        r_good = await pending
        assert r_good.status_code == 200 and r_good.json()["translatedText"] == "Healthy text."
    assert fake.active == 0


async def test_readiness_gates_traffic_until_loaded_and_warmed(tiny_ckpt):
    fake = FakeBackend(block_start=True)
    app = make_app(tiny_ckpt, fake)
    async with running(app, ready=False) as client:
        assert (await client.get("/health/live")).status_code == 200
        r = await client.get("/health/ready")
        assert r.status_code == 503 and r.json()["status"] == "loading" and int(r.headers["retry-after"]) > 0
        r = await client.post("/translate", json={"text": "Too early.", "target_lang": "de"})
        assert r.status_code == 503 and r.json()["type"] == "not_ready" and "retry-after" in r.headers
        fake.release_start.set()
        await wait_ready(client)
        assert fake.completed >= 1  # the warm-up translation ran before ready
        r = await client.post("/translate", json={"text": "Now.", "source_lang": "en", "target_lang": "de"})
        assert r.status_code == 200
        app.state.service.begin_drain()  # what SIGTERM does first
        r = await client.post("/translate", json={"text": "Late.", "source_lang": "en", "target_lang": "de"})
        assert r.status_code == 503 and r.json()["type"] == "shutting_down" and "retry-after" in r.headers
        assert (await client.get("/health/ready")).status_code == 503
    assert fake.shutdown_called is True


async def test_failed_load_reports_not_ready(tmp_path):
    (tmp_path / "languages.json").write_text("{}")
    app = make_app(tmp_path, FakeBackend())
    async with running(app, ready=False) as client:
        for _ in range(200):
            r = await client.get("/health/ready")
            if r.json()["status"] == "failed":
                break
            await asyncio.sleep(0.05)
        assert r.status_code == 503 and r.json()["status"] == "failed" and r.json()["detail"]
        r = await client.post("/translate", json={"text": "x", "target_lang": "de"})
        assert r.status_code == 503 and "failed to load" in r.json()["error"]


async def test_metrics_parse_and_move(tiny_ckpt):
    async with running(make_app(tiny_ckpt, FakeBackend())) as client:
        before = metric_samples((await client.get("/metrics")).text)
        for _ in range(3):
            await client.post(
                "/translate", json={"text": "One. Two.", "source_lang": "en", "target_lang": "de"}
            )
        await client.post("/translate", json={"text": "x", "target_lang": "xx"})
        r = await client.get("/metrics")
        assert r.headers["content-type"].startswith("text/plain")
        after = metric_samples(r.text)
    ok = ("mt_requests_total", (("endpoint", "translate"), ("source_lang", "en"), ("status", "200"),
                                ("target_lang", "de")))  # fmt: skip
    assert after[ok] - before.get(ok, 0) == 3
    bad = ("mt_requests_total", (("endpoint", "translate"), ("source_lang", "auto"), ("status", "400"),
                                 ("target_lang", "invalid")))  # fmt: skip
    assert after[bad] == 1
    assert after["mt_segments_total", ()] - before["mt_segments_total", ()] == 6
    assert after["mt_generated_tokens_total", ()] > before["mt_generated_tokens_total", ()]
    assert after["mt_request_latency_seconds_count", (("endpoint", "translate"),)] >= 4
    assert after["mt_time_to_first_token_seconds_count", ()] >= 3
    for name in (
        "mt_queue_depth",
        "mt_running_sequences",
        "mt_kv_blocks_used",
        "mt_kv_blocks_free",
        "mt_ready",
    ):
        assert (name, ()) in after
    assert after["mt_ready", ()] == 1


async def test_client_disconnect_cancels_engine_work(tiny_ckpt):
    fake = FakeBackend(hold=True)
    app = make_app(tiny_ckpt, fake, warmup=False)
    async with uvicorn_server(app) as url, httpx.AsyncClient(base_url=url, timeout=60) as client:
        await wait_ready(client)
        text = "First sentence. Second sentence. Third sentence."
        call = asyncio.ensure_future(
            client.post("/translate", json={"text": text, "source_lang": "en", "target_lang": "de"})
        )
        for _ in range(400):
            if fake.active == 3:
                break
            await asyncio.sleep(0.02)
        assert fake.active == 3
        call.cancel()  # the client goes away mid-request
        with pytest.raises(asyncio.CancelledError):
            await call
        for _ in range(400):
            if fake.cancelled == 3:
                break
            await asyncio.sleep(0.02)
        assert fake.cancelled == 3 and fake.active == 0 and fake.completed == 0
        # the server carries on
        fake.hold = False
        r = await client.post("/translate", json={"text": "Next.", "source_lang": "en", "target_lang": "de"})
        assert r.status_code == 200 and r.json()["translatedText"] == "Next."


async def test_detect_validates_and_answers_per_text(tiny_ckpt):
    async with running(make_app(tiny_ckpt, FakeBackend())) as client:
        texts = [real_sentences("hi", 1)[0], real_sentences("sw", 1)[0]]
        r = await client.post("/detect", json={"text": texts})
        assert r.status_code == 200 and [d["language"] for d in r.json()] == ["hi", "sw"]
        assert (await client.post("/detect", json={"text": ""})).status_code == 400
        assert (
            await client.post("/detect", content=b"nope", headers={"content-type": "application/json"})
        ).status_code == 400


async def test_request_json_has_no_500_for_odd_shapes(tiny_ckpt):
    odd = [None, 1, "s", [], {}, {"text": None, "target_lang": "de"}, {"text": {"a": 1}, "target_lang": "de"},
           {"text": "hi", "target_lang": ["de"]}, {"text": "hi", "target_lang": "de", "source_lang": 5},
           {"text": "hi", "target_lang": "de", "max_new_tokens": -1}, {"text": "hi", "target": "de", "target_lang": "fr"}]  # fmt: skip
    async with running(make_app(tiny_ckpt, FakeBackend())) as client:
        for body in odd:
            r = await client.post(
                "/translate", content=json.dumps(body), headers={"content-type": "application/json"}
            )
            assert 400 <= r.status_code < 500, (body, r.text)
            assert r.json()["error"]


async def test_xlmr_classifier_is_used_when_configured(tiny_ckpt, tmp_path, monkeypatch):
    class FakeClassifier:
        def classify(self, texts: list[str]) -> list[tuple[str, float]]:
            return [("de_DE", 0.9) if "Hallo" in t else ("tlh", 0.99) for t in texts]

    import serve.runtime.bert as bert

    monkeypatch.setattr(bert, "load_classifier", lambda ckpt_dir: FakeClassifier())
    async with running(make_app(tiny_ckpt, FakeBackend(), langid_model=tmp_path)) as client:
        r = await client.post("/detect", json={"text": ["Hallo zusammen", "Привет, как дела?"]})
        # the classifier's label where the model serves it; py3langid where it does not (tlh)
        assert r.status_code == 200 and r.json() == [
            {"language": "de", "confidence": 90.0},
            {"language": "ru", "confidence": r.json()[1]["confidence"]},
        ]
