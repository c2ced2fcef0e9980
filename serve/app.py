"""The HTTP service: FastAPI app, request validation, sentence batching and the backend's lifecycle.

The app only talks to a `Backend` (serve/engine/backend.py): every sentence of every text in a
request becomes one `GenerationRequest`, all submitted at once so the engine batches them with
everybody else's; a client that disconnects gets its generate tasks cancelled, which aborts them
in the engine. The model loads in a thread after the server is up, so /health/live answers from
the first second and /health/ready turns 200 only after a warm-up translation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import segment
from serve.api import (
    DetectedLanguage,
    DetectRequest,
    ErrorResponse,
    HealthResponse,
    LanguageInfo,
    TranslateRequest,
    TranslateResponse,
    Translation,
    Usage,
)
from serve.engine.backend import Backend, EngineStats
from serve.engine.errors import EngineError, NotAccepting, QueueFull, RequestTooLarge
from serve.engine.request import GenerationRequest, GenerationResult, SamplingParams, default_max_new_tokens
from serve.langid import LanguageDetector
from serve.metrics import CONTENT_TYPE, Metrics
from serve.model_store import ModelPlan
from serve.settings import Settings
from serve.tokenizer import Language, TranslationTokenizer, UnknownLanguage

log = logging.getLogger("serve")

RETRY_LOADING_S = 10
TTFT_HEADER = "X-Time-To-First-Token"
WARMUP_TEXT = "Hello world. This is a warm-up."


class ApiError(Exception):
    """An error answered as `{"error": message, "type": kind}` with `status`."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers = status, kind, message, headers or {}


class ConfigError(RuntimeError):
    """A startup setting that cannot work (e.g. --backend trtllm without TensorRT-LLM)."""


def _retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def _error_body(kind: str, message: str, detail: list | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"error": message, "type": kind}
    if detail:
        body["detail"] = detail
    return body


def trtllm_usable() -> bool:
    """Whether the TensorRT-LLM backend imports and finds TensorRT-LLM on this machine."""
    try:
        from serve.backends.trtllm import trtllm_available
    except ImportError:
        return False
    return bool(trtllm_available())


def choose_backend(settings: Settings) -> str:
    """`pytorch` or `trtllm` for these settings; raises ConfigError for an impossible explicit choice."""
    if settings.backend == "pytorch":
        return "pytorch"
    if settings.backend == "trtllm":
        if settings.engine_dir is None:
            raise ConfigError("--backend trtllm needs --engine-dir (MT_ENGINE_DIR): the built engines")
        if not trtllm_usable():
            raise ConfigError(
                "--backend trtllm: TensorRT-LLM is not installed here; install it on a GPU machine "
                "or use --backend pytorch"
            )
        return "trtllm"
    return "trtllm" if settings.engine_dir is not None and trtllm_usable() else "pytorch"


def build_backend(settings: Settings, ckpt_dir: Path) -> Backend:
    """The backend `choose_backend` picks, configured from `settings` (engine-side limits)."""
    limits = dict(
        max_batch_size=settings.max_batch_size,
        max_num_tokens=settings.max_num_tokens,
        kv_memory_fraction=settings.kv_memory_fraction,
        max_queue=settings.max_queue,
    )
    if choose_backend(settings) == "trtllm":
        from serve.backends.trtllm import create_backend

        return create_backend(settings.engine_dir, **limits)
    from serve.engine.async_engine import PytorchBackend

    return PytorchBackend(
        ckpt_dir, device=settings.resolved_device(), dtype=settings.resolved_dtype(), tp_size=settings.tp_size,
        kv_block_size=settings.kv_block_size, static_batching=settings.static_batching,
        cpu_threads=settings.cpu_threads, shortlist=settings.shortlist, **limits,
    )  # fmt: skip


@dataclass
class _Text:
    """One input text on its way through the pipeline."""

    src: Language
    detected: tuple[str, float] | None
    layout: segment.Layout | None  # None: source == target, returned unchanged


class Service:
    """State shared by all requests: settings, model pieces, readiness, in-flight count, metrics."""

    def __init__(
        self,
        settings: Settings,
        plan: ModelPlan,
        backend: Backend | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ):
        self.settings = settings
        self.plan = plan
        self.backend = backend
        self.on_fatal = on_fatal
        self.state = "starting"
        self.error: str | None = None
        self.tokenizer: TranslationTokenizer | None = None
        self.detector: LanguageDetector | None = None
        self.in_flight = 0
        self.max_segment_tokens = settings.max_segment_tokens
        self.max_positions = 1024
        self.metrics = Metrics(self._engine_stats)
        self._tok_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loader: threading.Thread | None = None
        self._backend_started = False

    # ---- lifecycle ----

    def start_loading(self) -> None:
        """Load in a thread: the event loop keeps answering /health/live meanwhile."""
        self._loop = asyncio.get_running_loop()
        self.state = "loading"
        self._loader = threading.Thread(target=self._load, name="model-loader", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        try:
            t0 = time.monotonic()
            ckpt = self.plan.materialize()
            if self.plan.tiny:
                log.warning("=" * 72)
                log.warning(
                    "MODEL=tiny: a tiny RANDOM model. Translations are MEANINGLESS (smoke tests only)."
                )
                log.warning("=" * 72)
            self.tokenizer = TranslationTokenizer(ckpt)
            self._read_limits(ckpt)
            self.detector = LanguageDetector(self.tokenizer.codes, self.settings.langid_model)
            if self.backend is None:
                self.backend = build_backend(self.settings, ckpt)
            log.info("starting backend %s for %s", getattr(self.backend, "name", "?"), ckpt)
            self.backend.start()
            self._backend_started = True
            if self.settings.warmup:
                assert self._loop is not None
                asyncio.run_coroutine_threadsafe(self._warmup(), self._loop).result()
            if self.state == "loading":
                self.state = "ready"
                self.metrics.ready.set(1)
                log.info("ready in %.1f s: model %s, %d languages", time.monotonic() - t0, self.plan.model_id,
                         len(self.tokenizer.languages))  # fmt: skip
        except Exception as err:
            self.state, self.error = "failed", f"{type(err).__name__}: {err}"
            log.exception("model loading failed")
            if self.on_fatal is not None:
                self.on_fatal(self.error)

    def _read_limits(self, ckpt: Path) -> None:
        """Sentence and generation limits from the checkpoint's position-embedding size."""
        positions = []
        for part in ("encoder", "decoder"):
            cfg = ckpt / part / "config.json"
            if cfg.is_file():
                value = json.loads(cfg.read_text()).get("max_position_embeddings")
                if value:
                    positions.append(int(value))
        if positions:
            self.max_positions = min(positions)
        assert self.tokenizer is not None
        specials = len(self.tokenizer.source_template) - 1
        self.max_segment_tokens = max(1, min(self.settings.max_segment_tokens, self.max_positions - specials))

    async def _warmup(self) -> None:
        assert self.tokenizer is not None
        codes = self.tokenizer.codes
        src = "en" if "en" in codes else codes[0]
        tgt = next(c for c in ("de", "fr", *codes) if c != src and c in codes)
        new_tokens = min(8, self.settings.max_new_tokens)
        body = TranslateRequest(text=WARMUP_TEXT, source_lang=src, target_lang=tgt, max_new_tokens=new_tokens)
        await self.translate(body)
        log.info("warm-up translation %s->%s done", src, tgt)

    def begin_drain(self) -> None:
        """Stop taking translations (503); requests already running finish."""
        if self.state in ("loading", "ready", "starting"):
            self.state = "draining"
            self.metrics.ready.set(0)
            log.info("draining: %d request(s) in flight", self.in_flight)

    def idle(self) -> bool:
        return self.in_flight == 0

    async def shutdown(self) -> None:
        """Lifespan end: drain the backend (uvicorn has already finished the HTTP requests)."""
        failed = self.state == "failed"
        self.begin_drain()
        if self.backend is not None and self._backend_started:
            try:
                await asyncio.wait_for(
                    self.backend.shutdown(drain=not failed), self.settings.drain_timeout or None
                )
            except Exception:
                log.exception("backend shutdown")

    def _engine_stats(self) -> EngineStats | None:
        if self.backend is None or self.state in ("starting", "loading", "failed"):
            return None
        try:
            return self.backend.stats()
        except Exception:
            log.exception("backend stats")
            return None

    # ---- checks ----

    def check_auth(self, request: Request, body_key: str | None = None) -> None:
        expected = self.settings.api_key
        if expected is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        given = given or request.headers.get("x-api-key") or body_key
        if not given or not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
            raise ApiError(
                401, "unauthorized",
                "missing or wrong API key (Authorization: Bearer <key>, X-API-Key or api_key)",
                {"WWW-Authenticate": "Bearer"},
            )  # fmt: skip

    def require_ready(self) -> None:
        if self.state == "ready":
            return
        if self.state == "draining":
            raise ApiError(503, "shutting_down", "the server is shutting down; retry on another replica",
                           _retry_after(RETRY_LOADING_S))  # fmt: skip
        if self.state == "failed":
            raise ApiError(503, "not_ready", f"model failed to load: {self.error}", _retry_after(60))
        raise ApiError(503, "not_ready", "the model is still loading", _retry_after(RETRY_LOADING_S))

    def language(self, code: str, field: str) -> Language:
        assert self.tokenizer is not None
        try:
            return self.tokenizer.language(code)
        except UnknownLanguage as err:
            raise ApiError(400, "unsupported_language", f"{field}: {err}") from None

    def _check_texts(self, texts: list[str]) -> None:
        if not texts:
            raise ApiError(400, "empty_text", "no text given: text is an empty list")
        limit = self.settings.max_texts_per_request
        if len(texts) > limit:
            raise ApiError(413, "too_many_texts", f"{len(texts)} texts in one request; the limit is {limit}")
        for i, text in enumerate(texts):
            where = f"text[{i}]" if len(texts) > 1 else "text"
            if not text.strip():
                raise ApiError(400, "empty_text", f"{where} is empty or only whitespace")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(
                    400, "invalid_text", f"{where} is not valid Unicode (lone surrogate)"
                ) from None

    # ---- translation ----

    def _text_ids(self, texts: list[str]) -> list[list[int]]:
        assert self.tokenizer is not None
        with self._tok_lock:
            return self.tokenizer.text_ids(texts)

    def _decode(self, ids: list[list[int]]) -> list[str]:
        assert self.tokenizer is not None
        with self._tok_lock:
            return [self.tokenizer.decode(x) for x in ids]

    def _prepare(self, texts: list[str], src: Language | None, tgt: Language) -> list[_Text]:
        """Language ID, sentence split and tokenization of every text (CPU work, run in a thread)."""
        detections = self.detector.detect(texts) if src is None and self.detector is not None else None
        out = []
        for i, text in enumerate(texts):
            detected = detections[i] if detections is not None else None
            lang = self.language(detected[0], "detected language") if detected is not None else src
            assert lang is not None
            if lang.code == tgt.code:
                out.append(_Text(lang, detected, None))
                continue
            layout = segment.split(text, lang.code, self._text_ids, self.max_segment_tokens)
            n_tokens = sum(len(ids) for ids in layout.token_ids)
            if n_tokens > self.settings.max_tokens_per_text:
                where = f"text[{i}]" if len(texts) > 1 else "text"
                raise ApiError(
                    413,
                    "text_too_long",
                    f"{where} has {n_tokens} tokens; the limit is {self.settings.max_tokens_per_text}",
                )
            out.append(_Text(lang, detected, layout))
        return out

    def _sampling(self, body: TranslateRequest) -> tuple[int, int | None]:
        beam = body.beam_size or 1
        if beam > self.settings.max_beam_size:
            raise ApiError(
                400, "invalid_parameter", f"beam_size {beam} is over the limit {self.settings.max_beam_size}"
            )
        cap = self.settings.max_new_tokens
        if body.max_new_tokens is not None and body.max_new_tokens > cap:
            raise ApiError(
                400, "invalid_parameter", f"max_new_tokens {body.max_new_tokens} is over the limit {cap}"
            )
        return beam, body.max_new_tokens

    def _max_new(self, requested: int | None, n_src: int, prefix_len: int) -> int:
        room = max(1, self.max_positions - prefix_len)
        return max(1, min(requested or default_max_new_tokens(n_src), self.settings.max_new_tokens, room))

    async def translate(
        self, body: TranslateRequest, stats: dict[str, Any] | None = None
    ) -> TranslateResponse:
        """Translate every sentence of every text as one concurrent batch through the backend."""
        assert self.tokenizer is not None and self.backend is not None
        t0 = time.monotonic()
        texts = body.texts
        self._check_texts(texts)
        tgt = self.language(str(body.target_lang), "target_lang")
        src = None if body.auto_source else self.language(str(body.source_lang), "source_lang")
        if stats is not None:
            stats["pair"] = (src.code if src else "auto", tgt.code)
        beam, requested = self._sampling(body)
        items = await asyncio.to_thread(self._prepare, texts, src, tgt)
        if stats is not None:
            codes = {item.src.code for item in items}
            stats["pair"] = (codes.pop() if len(codes) == 1 else "mixed", tgt.code)

        prefix = self.tokenizer.decoder_prefix(tgt)
        requests: list[GenerationRequest] = []
        for item in items:
            for ids in item.layout.token_ids if item.layout else []:
                params = SamplingParams(
                    beam_size=beam, max_new_tokens=self._max_new(requested, len(ids), len(prefix))
                )
                requests.append(GenerationRequest(
                    request_id=uuid.uuid4().hex, encoder_ids=self.tokenizer.encoder_ids(ids, item.src),
                    decoder_prefix=prefix, params=params, target_lang=tgt.code,
                ))  # fmt: skip
        results = await self._generate_all(requests)
        self.metrics.segments.inc(len(requests))

        decoded = await asyncio.to_thread(self._decode, [r.token_ids for r in results]) if results else []
        translations, k = [], 0
        for text, item in zip(texts, items, strict=True):
            if item.layout is None:
                out = text
            else:
                n = len(item.layout.sentences)
                out = item.layout.join(decoded[k : k + n])
                k += n
            translations.append(
                Translation(text=out, detected_source_lang=item.detected[0] if item.detected else None)
            )
        prompt = sum(r.prompt_tokens for r in results)
        completion = sum(len(r.token_ids) for r in results)
        self.metrics.prompt_tokens.inc(prompt)
        self.metrics.completion_tokens.inc(completion)
        first = [r.first_token_time for r in results if r.first_token_time is not None]
        if first and stats is not None:
            stats["ttft"] = max(0.0, min(first) - t0)
            self.metrics.ttft.observe(stats["ttft"])

        detected = None
        if body.auto_source:
            found = [DetectedLanguage(language=i.detected[0], confidence=round(100 * i.detected[1], 2))
                     for i in items if i.detected]  # fmt: skip
            detected = found if body.is_batch else found[0]
        return TranslateResponse(
            translations=translations, model=self.plan.model_id,
            usage=Usage(prompt_tokens=prompt, completion_tokens=completion),
            translatedText=[t.text for t in translations] if body.is_batch else translations[0].text,
            detectedLanguage=detected,
        )  # fmt: skip

    async def _generate_all(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """All requests at once; the first failure cancels the rest (their KV blocks are freed)."""
        assert self.backend is not None
        if not requests:
            return []
        tasks = [asyncio.ensure_future(self.backend.generate(r)) for r in requests]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in tasks:
                if task.done() and task.exception() is not None:
                    raise _api_error(task.exception())
            return [t.result() for t in tasks]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def detect(self, texts: list[str]) -> list[DetectedLanguage]:
        if self.detector is None:
            self.require_ready()
        self._check_texts(texts)
        assert self.detector is not None
        return [
            DetectedLanguage(language=c, confidence=round(100 * p, 2)) for c, p in self.detector.detect(texts)
        ]


def _api_error(err: BaseException | None) -> ApiError:
    if isinstance(err, QueueFull):
        return ApiError(429, "overloaded", f"server overloaded: {err}", _retry_after(err.retry_after))
    if isinstance(err, NotAccepting):
        return ApiError(503, "not_accepting", str(err), _retry_after(err.retry_after))
    if isinstance(err, RequestTooLarge):
        return ApiError(413, "request_too_large", str(err))
    if isinstance(err, EngineError):
        return ApiError(500, "translation_failed", f"translation failed: {err}")
    log.error("backend raised %r", err, exc_info=err)
    return ApiError(500, "internal_error", f"internal error in the backend: {type(err).__name__}")


async def _until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Await `work`, cancelling it when the client goes away (its engine requests are aborted)."""
    job = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not job.done():
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job
    if job.cancelled():
        log.info("client disconnected; its translation was cancelled")
        raise ApiError(499, "client_disconnected", "client closed the request")
    return job.result()


class BodyGate:
    """Pure ASGI middleware: body size limit before parsing, UTF-8 check, form bodies as JSON.

    Content-Length over the limit is refused without reading; otherwise the body is read
    incrementally and refused as soon as it passes the limit. LibreTranslate clients that post
    `application/x-www-form-urlencoded` get their form turned into the JSON our models expect.
    """

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._reject(scope, send, length)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._reject(scope, send, None)
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            decoded = body.decode("utf-8")
        except UnicodeDecodeError as err:
            return await _send_json(
                send, 400, _error_body("invalid_utf8", f"request body is not valid UTF-8 ({err})")
            )
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/x-www-form-urlencoded" or (not ctype and body):
            if ctype:
                form: dict[str, Any] = {}
                for key, value in parse_qsl(decoded, keep_blank_values=True):
                    form[key] = [*form[key], value] if isinstance(form.get(key), list) else (
                        [form[key], value] if key in form else value)  # fmt: skip
                body = json.dumps(form).encode()
            scope = dict(scope)
            scope["headers"] = [
                (k, v) for k, v in scope["headers"] if k.lower() not in (b"content-type", b"content-length")
            ]
            scope["headers"] += [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ]
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: dict, send: Callable, length: str | None) -> None:
        if length is not None and not length.isdigit():
            return await _send_json(send, 400, _error_body("bad_request", "invalid Content-Length header"))
        msg = f"request body is over the limit of {self.max_bytes} bytes"
        await _send_json(send, 413, _error_body("body_too_large", msg), close=True)


async def _send_json(send: Callable, status: int, body: dict, close: bool = False) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class RequestMetrics:
    """Pure ASGI middleware: latency and status of /translate and /detect, by language pair."""

    ENDPOINTS = ("/translate", "/detect")

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] not in self.ENDPOINTS:
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})
        status = 500
        t0 = time.monotonic()

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        endpoint = scope["path"].lstrip("/")
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.latency.labels(endpoint).observe(time.monotonic() - t0)
            src, tgt = scope.get("state", {}).get("pair", ("none", "none"))
            self.metrics.requests.labels(endpoint, src, tgt, str(status)).inc()


def create_app(
    settings: Settings,
    plan: ModelPlan,
    backend: Backend | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    """The ASGI app. `backend` defaults to the one `settings` choose (tests pass a fake)."""
    service = Service(settings, plan, backend, on_fatal)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        service.start_loading()
        yield
        await service.shutdown()

    errors = {s: {"model": ErrorResponse} for s in (400, 401, 413, 422, 429, 500, 503)}
    app = FastAPI(
        title="mt-trtllm translation server",
        version="0.1.0",
        summary="Many-to-many translation (mBART-50) with in-flight batching; LibreTranslate-compatible.",
        lifespan=lifespan,
    )
    app.state.service = service

    async def require_key(request: Request) -> None:
        """Runs before body validation, so a wrong key is a 401 whatever the body holds."""
        if settings.api_key is None:
            return
        body_key = None
        if not request.headers.get("authorization") and not request.headers.get("x-api-key"):
            with contextlib.suppress(ValueError):
                data = json.loads(await request.body() or b"null")
                body_key = data.get("api_key") if isinstance(data, dict) else None
        service.check_auth(request, body_key if isinstance(body_key, str) else None)

    guarded = [Depends(require_key)]

    @app.post(
        "/translate",
        response_model=TranslateResponse,
        responses=errors,
        tags=["translate"],
        dependencies=guarded,
    )
    async def translate(body: TranslateRequest, request: Request, response: Response) -> TranslateResponse:
        """Translate `text` (a string or a list) into `target_lang`.

        Long texts are split into sentences, all sentences of all texts are translated as one batch,
        and each translation keeps its source's paragraph breaks and whitespace. When
        `source_lang` equals `target_lang` (or the detected language does), the text is returned
        unchanged. Errors: 400 bad language/empty text, 401 API key, 413 size limits, 422 wrong
        fields, 429 overloaded (Retry-After), 503 loading or shutting down (Retry-After).
        """
        service.require_ready()
        stats: dict[str, Any] = {}
        request.state.pair = ("auto" if body.auto_source else "invalid", "invalid")
        service.in_flight += 1
        try:
            result = await _until_disconnect(request, service.translate(body, stats))
        finally:
            service.in_flight -= 1
            if "pair" in stats:
                request.state.pair = stats["pair"]
        if "ttft" in stats:
            response.headers[TTFT_HEADER] = f"{stats['ttft']:.6f}"
        return result

    @app.post(
        "/detect",
        response_model=list[DetectedLanguage],
        responses=errors,
        tags=["translate"],
        dependencies=guarded,
    )
    async def detect(body: DetectRequest, request: Request) -> list[DetectedLanguage]:
        """Identify the language of each text (one entry per text), among the languages the model serves."""
        return await asyncio.to_thread(service.detect, body.texts)

    @app.get("/languages", response_model=list[LanguageInfo], tags=["translate"])
    async def languages() -> list[LanguageInfo]:
        """Every language the model translates from and into."""
        if service.tokenizer is None:
            service.require_ready()
        assert service.tokenizer is not None
        codes = service.tokenizer.codes
        return [
            LanguageInfo(code=lang.code, name=lang.name, mbart_code=lang.mbart_code,
                         targets=[c for c in codes if c != lang.code])
            for lang in service.tokenizer.languages
        ]  # fmt: skip

    @app.get("/health/live", response_model=HealthResponse, tags=["health"])
    async def live() -> HealthResponse:
        """The process answers (even while the model loads)."""
        return HealthResponse(status="live")

    @app.get(
        "/health/ready",
        response_model=HealthResponse,
        responses={503: {"model": HealthResponse}},
        tags=["health"],
    )
    async def ready() -> Any:
        """200 once the model is loaded and warmed up; 503 (Retry-After) while loading or draining."""
        if service.state == "ready":
            return HealthResponse(status="ready")
        body = HealthResponse(status=service.state, detail=service.error).model_dump()
        return JSONResponse(body, status_code=503, headers=_retry_after(RETRY_LOADING_S))

    @app.get("/metrics", tags=["health"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics."""
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    _install_error_handlers(app)
    app.add_middleware(BodyGate, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=service.metrics)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(_error_body(err.kind, err.message), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = list(err.errors())
        bad_json = [p for p in problems if p.get("type") == "json_invalid"]
        if bad_json:
            why = (bad_json[0].get("ctx") or {}).get("error", "JSON decode error")
            pos = bad_json[0]["loc"][-1]
            return JSONResponse(
                _error_body("invalid_json", f"request body is not valid JSON: {why} at {pos}"), 400
            )
        detail = [{"loc": [str(x) for x in p["loc"][1:]], "msg": _clean(p["msg"])} for p in problems]
        message = "; ".join(f"{'.'.join(d['loc'])}: {d['msg']}" if d["loc"] else d["msg"] for d in detail)
        return JSONResponse(_error_body("invalid_request", message, detail), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(_error_body("http_error", str(err.detail)), err.status_code, headers=err.headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(_error_body("internal_error", f"internal error: {type(err).__name__}"), 500)


def _clean(msg: str) -> str:
    return msg.removeprefix("Value error, ")
