"""Request and response models of the HTTP API; they are its documentation (OpenAPI at /docs).

Two dialects are accepted side by side: ours (`text`, `source_lang`, `target_lang`) and
LibreTranslate's (`q`, `source`, `target`, `format`, `api_key`), so existing LibreTranslate clients
work unchanged; every response carries both `translations` and `translatedText`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

TextInput = str | list[str]


def _pick(ours: Any, theirs: Any, name: str, alias: str) -> Any:
    if ours is not None and theirs is not None and ours != theirs:
        raise ValueError(f"{name} and {alias} disagree; give one of them")
    return ours if ours is not None else theirs


class TranslateRequest(BaseModel):
    """Translate one text or a list of texts into `target_lang`."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {"text": "The cat sleeps. The dog barks.", "target_lang": "de"},
                {"text": ["Hello!", "How are you?"], "source_lang": "en", "target_lang": "zh_CN"},
                {"q": "Bonjour le monde", "source": "auto", "target": "en", "format": "text"},
            ]
        },
    )

    text: TextInput | None = Field(
        None, description="a text, or a list of texts (long texts are split into sentences)"
    )
    source_lang: str | None = Field(
        None, description='source language: ISO 639-1 ("zh"), mBART ("zh_CN"), any case, or "auto" (default)'
    )
    target_lang: str | None = Field(
        None, description="target language (required); same code forms as source_lang"
    )
    beam_size: int | None = Field(None, ge=1, description="beam width (default 1: greedy)")
    max_new_tokens: int | None = Field(
        None,
        ge=1,
        description="cap on generated tokens per sentence (default: about twice the source length)",
    )
    q: TextInput | None = Field(None, description="LibreTranslate: same as text")
    source: str | None = Field(None, description="LibreTranslate: same as source_lang")
    target: str | None = Field(None, description="LibreTranslate: same as target_lang")
    format: Literal["text"] = Field("text", description='LibreTranslate: only "text" is supported')
    api_key: str | None = Field(None, description="API key, when the server requires one (or use a header)")

    @model_validator(mode="after")
    def _merge_dialects(self) -> TranslateRequest:
        self.text = _pick(self.text, self.q, "text", "q")
        self.source_lang = _pick(self.source_lang, self.source, "source_lang", "source")
        self.target_lang = _pick(self.target_lang, self.target, "target_lang", "target")
        if self.text is None:
            raise ValueError("text is required (a string or a list of strings; LibreTranslate: q)")
        if self.target_lang is None:
            raise ValueError("target_lang is required (LibreTranslate: target)")
        return self

    @property
    def texts(self) -> list[str]:
        return [self.text] if isinstance(self.text, str) else list(self.text or [])

    @property
    def is_batch(self) -> bool:
        return isinstance(self.text, list)

    @property
    def auto_source(self) -> bool:
        return self.source_lang is None or self.source_lang.strip().lower() == "auto"


class Translation(BaseModel):
    text: str = Field(description="the translation, in the layout (paragraphs, whitespace) of the source")
    detected_source_lang: str | None = Field(
        description='detected ISO code when source_lang was "auto", else null'
    )


class Usage(BaseModel):
    prompt_tokens: int = Field(description="encoder tokens, all sentences of all texts")
    completion_tokens: int = Field(description="generated tokens, all sentences of all texts")


class DetectedLanguage(BaseModel):
    language: str = Field(description="ISO 639-1 code")
    confidence: float = Field(description="percent, 0-100")


class TranslateResponse(BaseModel):
    """`translations` is ours; `translatedText`/`detectedLanguage` follow LibreTranslate's shapes."""

    translations: list[Translation]
    model: str = Field(description="the model that translated")
    usage: Usage
    translatedText: str | list[str] = Field(
        description="LibreTranslate: a string if the input was one, else a list"
    )
    detectedLanguage: DetectedLanguage | list[DetectedLanguage] | None = Field(
        None, description='LibreTranslate: present only when the source was "auto"'
    )

    @model_serializer(mode="wrap")
    def _drop_absent_detection(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if data.get("detectedLanguage") is None:
            data.pop("detectedLanguage", None)
        return data


class DetectRequest(BaseModel):
    """Identify the language of one text or a list of texts."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{"q": "Wie geht es dir?"}]})

    text: TextInput | None = Field(None, description="a text or a list of texts")
    q: TextInput | None = Field(None, description="LibreTranslate: same as text")
    api_key: str | None = Field(None, description="API key, when the server requires one")

    @model_validator(mode="after")
    def _merge_dialects(self) -> DetectRequest:
        self.text = _pick(self.text, self.q, "text", "q")
        if self.text is None:
            raise ValueError("text is required (a string or a list of strings; LibreTranslate: q)")
        return self

    @property
    def texts(self) -> list[str]:
        return [self.text] if isinstance(self.text, str) else list(self.text or [])


class LanguageInfo(BaseModel):
    code: str = Field(description="ISO 639-1 code")
    name: str
    mbart_code: str = Field(description="the model's own code, e.g. zh_CN")
    targets: list[str] = Field(description="LibreTranslate: codes this language translates into")


class ErrorResponse(BaseModel):
    """Every error: a LibreTranslate-style `error` string plus a machine-readable `type`."""

    error: str
    type: str
    detail: list[dict[str, Any]] | None = None


class HealthResponse(BaseModel):
    status: str = Field(description="live | loading | ready | draining | failed")
    detail: str | None = None
