"""Per-target-language output vocabularies: `shortlist.safetensors` in a checkpoint directory.

At mBART-50's shape the lm_head (250k x 1024) is more than half the bytes a decode step reads,
yet a translation into one language uses a small part of that vocabulary. With a shortlist,
each request may emit only its target language's tokens plus the tokens of its own source
(names, numbers and other words a translation copies), and the lm_head kernel reads only the
rows some running request may emit (`fused.Shortlist`). Log-probabilities are normalized over
each request's own tokens. Outputs can differ from the full vocabulary's, so serving with a
shortlist is opt-in; `python -m calib.shortlist` writes the file with a report of its coverage
of real references and of its agreement with the full vocabulary.

Format: one int32 tensor per target language, named by its ISO code, holding the ascending token
ids that language may emit; metadata `vocab_size` (the tokenizer's) and `format` (`FORMAT`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

FILENAME = "shortlist.safetensors"
FORMAT = "mt-shortlist-v1"


def write(ckpt_dir: Path, lists: dict[str, list[int]], vocab_size: int, meta: dict[str, str]) -> Path:
    path = Path(ckpt_dir) / FILENAME
    tensors = {lang: torch.tensor(sorted(set(ids)), dtype=torch.int32) for lang, ids in lists.items()}
    save_file(tensors, path, metadata={**meta, "format": FORMAT, "vocab_size": str(vocab_size)})
    return path


def read(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], int]:
    """({language: token ids}, vocab_size); FileNotFoundError saying how to build a missing file."""
    path = Path(ckpt_dir) / FILENAME
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: build it with `python -m calib.shortlist --checkpoint {ckpt_dir} --langs ...`"
        )
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
        return {lang: f.get_tensor(lang) for lang in f.keys()}, int(meta["vocab_size"])  # noqa: SIM118


@dataclass(frozen=True)
class RowTokens:
    """What one request may emit: its target language's tokens and its source's."""

    lang: str
    bits: torch.Tensor  # uint8 [vocab] on the device: the language's tokens
    lang_ids: np.ndarray  # the same, as ascending ids on the host
    source_ids: list[int]


class VocabShortlist:
    """Each language's list, on the device as allow bits and on the host as ids."""

    def __init__(self, lists: dict[str, torch.Tensor], vocab_size: int, device: torch.device | str):
        self._ids = {lang: ids.long().numpy() for lang, ids in lists.items()}
        self._bits = {}
        for lang, ids in lists.items():
            bits = torch.zeros(vocab_size, dtype=torch.uint8)
            bits[ids.long()] = 1
            self._bits[lang] = bits.to(device)

    @classmethod
    def load(cls, ckpt_dir: Path, vocab_size: int, device: torch.device | str) -> VocabShortlist:
        lists, file_vocab = read(ckpt_dir)
        if file_vocab != vocab_size:
            raise ValueError(f"{Path(ckpt_dir) / FILENAME} is for a vocabulary of {file_vocab}, "
                             f"the model has {vocab_size}")  # fmt: skip
        return cls(lists, vocab_size, device)

    def allowed(self, lang: str | None, source_ids: list[int]) -> RowTokens | None:
        """`lang`'s tokens and the source's; None (everything) without a list."""
        if lang not in self._ids:
            return None
        return RowTokens(lang, self._bits[lang], self._ids[lang], list(source_ids))


class ShortlistUnion:
    """The tokens some open decoder row may emit, kept on the host.

    The lm_head reads only these rows of its weight, so the device needs the ascending ids of the
    union. Rebuilding them takes passes over the vocabulary, so it happens only when a newly opened
    row may emit a token the union lacks, or the last row into a language closes; other closed
    rows' source tokens stay until then (a superset is correct: each row is still masked to its
    own tokens).
    """

    def __init__(self, vocab_size: int):
        self.rows: dict[int, RowTokens | None] = {}
        self.member = np.zeros(vocab_size, dtype=bool)
        self.langs: Counter[str | None] = Counter()  # open rows per language; None: the whole vocabulary
        self.stale = True

    def open(self, row: int, tokens: RowTokens | None) -> None:
        lang = tokens.lang if tokens is not None else None
        self.stale |= not self.langs[lang] or (lang is not None and not self.member[tokens.source_ids].all())
        self.rows[row] = tokens
        self.langs[lang] += 1

    def close(self, row: int) -> None:
        tokens = self.rows.pop(row)
        lang = tokens.lang if tokens is not None else None
        self.langs[lang] -= 1
        self.stale |= not self.langs[lang]

    def take(self) -> np.ndarray | None:
        """The union's ascending ids if it changed since the last call, else None."""
        if not self.stale:
            return None
        self.member[:] = self.langs[None] > 0
        for t in {t.lang: t for t in self.rows.values() if t is not None}.values():
            self.member[t.lang_ids] = True
        for t in self.rows.values():
            if t is not None:
                self.member[t.source_ids] = True
        self.stale = False
        return np.flatnonzero(self.member)
