"""Where translations come from: the runtime in this process, or a running server over HTTP.

Both expose the same small interface so that the run loop, scoring and reports do not care
which one produced a hypothesis — and so that a server run can be checked against an
in-process run of the same checkpoint.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import httpx

from eval import provenance
from eval.errors import EvalError


class Backend(Protocol):
    """Translates batches of sentences; `tokens` is the output token count when known."""

    model_id: str
    max_concurrency: int
    tokens_source: str  # how `tokens` is counted, recorded beside tokens/s

    def check_languages(self, codes: list[str]) -> None: ...

    def translate(self, texts: list[str], src: str, tgt: str) -> tuple[list[str], int | None]: ...

    def info(self) -> dict: ...


class RuntimeBackend:
    """`serve.runtime.translator.Translator` loaded in this process from a converted checkpoint."""

    max_concurrency = 1  # one model instance, one caller
    tokens_source = "output re-tokenized by the checkpoint's tokenizer"

    def __init__(
        self,
        ckpt_dir: str | Path,
        beam_size: int = 1,
        max_new_tokens: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
    ):
        ckpt_dir = Path(ckpt_dir)
        if not ckpt_dir.is_dir():
            raise EvalError(f"checkpoint directory not found: {ckpt_dir}")
        if not (ckpt_dir / "languages.json").is_file():
            raise EvalError(
                f"{ckpt_dir} is not a converted checkpoint (no languages.json); "
                "convert it first: python -m convert --model <HF dir> --output <dir>"
            )
        from serve.runtime.translator import Translator

        start = time.perf_counter()
        self.translator = Translator.load(ckpt_dir, device=device, dtype=dtype)
        self.load_s = time.perf_counter() - start
        self.ckpt_dir = ckpt_dir
        self.model_id: str = self.translator.model_id
        self.beam_size, self.max_new_tokens = beam_size, max_new_tokens
        self.device, self.dtype = device, dtype

    def check_languages(self, codes: list[str]) -> None:
        for code in codes:
            self.translator.tokenizer.language(code)  # UnknownLanguage lists the supported codes

    def translate(self, texts: list[str], src: str, tgt: str) -> tuple[list[str], int | None]:
        hyps = self.translator.translate(
            texts, src, tgt, beam_size=self.beam_size, max_new_tokens=self.max_new_tokens
        )
        # Output tokens as the model's own tokenizer counts them (without language tag and EOS).
        tokens = sum(len(ids) for ids in self.translator.tokenizer.text_ids(hyps)) if hyps else 0
        return hyps, tokens

    def info(self) -> dict:
        return {
            "source": "checkpoint",
            "id": self.model_id,
            "checkpoint": str(self.ckpt_dir.resolve()),
            **{f"checkpoint_{k}": v for k, v in provenance.checkpoint_hash(self.ckpt_dir).items()},
            **provenance.quantization(self.ckpt_dir),
            "device": str(getattr(self.translator, "device", self.device)),
            "load_s": round(self.load_s, 3),
        }


def retry_after_seconds(value: str | None, default: float = 1.0) -> float:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


class HttpBackend:
    """Client of a running server's `POST /translate`, one request per batch.

    429 and 503 answers are retried after their Retry-After (capped at `max_wait` s, at most
    `max_retries` times), as are connection failures (a server still starting). `client`
    lets tests pass fastapi's TestClient for the real app; `sleep` lets them skip the waits.
    """

    tokens_source = "server usage.completion_tokens"

    def __init__(
        self,
        url: str,
        beam_size: int = 1,
        max_new_tokens: int | None = None,
        timeout: float = 600.0,
        max_retries: int = 8,
        max_wait: float = 60.0,
        concurrency: int = 1,
        client: httpx.Client | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not url.startswith(("http://", "https://")):
            raise EvalError(f"server URL must start with http:// or https://: {url!r}")
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/translate") else base + "/translate"
        self.url = url
        self.beam_size, self.max_new_tokens = beam_size, max_new_tokens
        self.max_retries, self.max_wait, self.sleep = max_retries, max_wait, sleep
        self.max_concurrency = max(1, concurrency)
        self.client = client or httpx.Client(timeout=timeout, transport=transport)
        self.model_id = ""

    def check_languages(self, codes: list[str]) -> None:
        """Nothing to check up front: the server's own error names an unsupported language."""

    def _post(self, payload: dict) -> dict:
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                resp = self.client.post(self.endpoint, json=payload)
            except httpx.TransportError as err:
                if last:
                    raise EvalError(f"cannot reach {self.endpoint}: {err.__class__.__name__}: {err}") from err
                self.sleep(min(self.max_wait, 2.0**attempt))
                continue
            if resp.status_code in (429, 503) and not last:
                self.sleep(min(self.max_wait, retry_after_seconds(resp.headers.get("retry-after"))))
                continue
            if resp.status_code != 200:
                raise EvalError(f"{self.endpoint} answered {resp.status_code}: {_error_detail(resp)}")
            try:
                return resp.json()
            except ValueError as err:
                raise EvalError(f"{self.endpoint} answered with invalid JSON") from err
        raise EvalError(f"{self.endpoint} still busy after {self.max_retries} retries")

    def translate(self, texts: list[str], src: str, tgt: str) -> tuple[list[str], int | None]:
        payload = {"text": texts, "source_lang": src, "target_lang": tgt, "beam_size": self.beam_size}
        if self.max_new_tokens is not None:
            payload["max_new_tokens"] = self.max_new_tokens
        body = self._post(payload)
        try:
            hyps = [t["text"] for t in body["translations"]]
        except (KeyError, TypeError) as err:
            raise EvalError(f"{self.endpoint}: response has no translations[].text") from err
        if len(hyps) != len(texts):
            raise EvalError(f"{self.endpoint}: {len(hyps)} translations for {len(texts)} sentences")
        self.model_id = str(body.get("model") or self.model_id)
        tokens = (body.get("usage") or {}).get("completion_tokens")
        return hyps, tokens if isinstance(tokens, int) else None

    def info(self) -> dict:
        return {"source": "url", "id": self.model_id, "url": self.url}


def _error_detail(resp: httpx.Response) -> str:
    """The server's error message on one line (FastAPI puts it under `detail`)."""
    try:
        body = resp.json()
        detail = body.get("detail", body) if isinstance(body, dict) else body
    except ValueError:
        detail = resp.text
    return " ".join(str(detail).split())[:300]
