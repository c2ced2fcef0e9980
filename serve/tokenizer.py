"""Text <-> token ids for a converted checkpoint: its tokenizer and its language map.

Reads only `<ckpt>/tokenizer/` and `<ckpt>/languages.json` (written by `convert/`), so
serving, calibration and evaluation need nothing but the checkpoint directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class UnknownLanguage(ValueError):
    """A language code the checkpoint does not support; the message lists the supported ones."""

    def __init__(self, code: str, supported: list[str]):
        self.code, self.supported = code, supported
        super().__init__(f"unsupported language {code!r}; supported: {', '.join(supported)}")


@dataclass(frozen=True)
class Language:
    code: str  # ISO 639-1, e.g. "zh"
    mbart_code: str  # e.g. "zh_CN"
    name: str
    token_id: int


class TranslationTokenizer:
    """Builds encoder inputs and forced decoder prefixes from `languages.json` templates."""

    def __init__(self, ckpt_dir: str | Path):
        from transformers import AutoTokenizer

        ckpt_dir = Path(ckpt_dir)
        meta = json.loads((ckpt_dir / "languages.json").read_text())
        self.tokenizer = AutoTokenizer.from_pretrained(ckpt_dir / "tokenizer")
        self.languages = [Language(**e) for e in meta["languages"]]
        self.source_template: list = meta["source_template"]
        self.decoder_template: list = meta["decoder_template"]
        self.eos_token_id: int = meta["eos_token_id"]
        self.pad_token_id: int = meta["pad_token_id"]
        self._by_code = {}
        for lang in self.languages:
            self._by_code[lang.code.lower()] = lang
            self._by_code[lang.mbart_code.lower()] = lang

    @property
    def codes(self) -> list[str]:
        return [lang.code for lang in self.languages]

    def language(self, code: str) -> Language:
        """Resolve an ISO 639-1 (`zh`) or mBART (`zh_CN`) code, any case, `-` or `_`."""
        lang = self._by_code.get(code.strip().lower().replace("-", "_"))
        if lang is None:
            raise UnknownLanguage(code, self.codes)
        return lang

    def text_ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of the text itself, no special tokens."""
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def encoder_ids(self, text_ids: list[int], src: Language) -> list[int]:
        return self._fill(self.source_template, {"src_lang": [src.token_id], "text": text_ids})

    def decoder_prefix(self, tgt: Language) -> list[int]:
        return self._fill(self.decoder_template, {"tgt_lang": [tgt.token_id]})

    def encode(self, texts: list[str], src: Language) -> list[list[int]]:
        return [self.encoder_ids(ids, src) for ids in self.text_ids(texts)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @staticmethod
    def _fill(template: list, slots: dict[str, list[int]]) -> list[int]:
        out: list[int] = []
        for item in template:
            out.extend(slots[item] if isinstance(item, str) else [item])
        return out
