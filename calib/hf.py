"""The Hugging Face side of calibration: token ids, greedy translations and teacher-forced batches.

Decoder inputs look like serving traffic: `[decoder_start, <tgt_lang>, y1 .. yn]`, where y is the
full-precision model's own greedy translation (its EOS is never fed back, as in generation).
Batches are sorted by length so padding stays small; masks say which rows are real tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from calib.data import Direction, mbart_code


@dataclass
class Batch:
    """One padded teacher-forced batch (HF keyword arguments plus bookkeeping)."""

    lang: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    decoder_input_ids: torch.Tensor
    decoder_attention_mask: torch.Tensor

    def kwargs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "decoder_input_ids": self.decoder_input_ids,
            "decoder_attention_mask": self.decoder_attention_mask,
        }


@dataclass
class Sequences:
    """Token ids of one direction: encoder inputs, decoder prefix and decoder continuations."""

    direction: Direction
    encoder_ids: list[list[int]]
    prefix: list[int]
    continuations: list[list[int]]  # generated ids after the prefix, without EOS

    @property
    def decoder_ids(self) -> list[list[int]]:
        return [self.prefix + c for c in self.continuations]


def lang_token_id(tokenizer: Any, lang: str) -> int:
    """The id of `lang`'s mBART language token; ValueError when the tokenizer lacks it."""
    tid = tokenizer.convert_tokens_to_ids(mbart_code(lang))
    if tid is None or tid == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no language token {mbart_code(lang)}")
    return tid


def encoder_ids(
    tokenizer: Any, texts: list[str] | tuple[str, ...], src: str, max_len: int
) -> list[list[int]]:
    """`<src_lang> text </s>` (the tokenizer's own template) for each text, at most `max_len` ids."""
    tokenizer.src_lang = mbart_code(src)
    enc = tokenizer(list(texts), add_special_tokens=True, truncation=True, max_length=max_len)
    return [list(ids) for ids in enc["input_ids"]]


def max_new_tokens(src_len: int, prefix_len: int, max_positions: int, limit: int | None = None) -> int:
    """The runtime's default budget (2 * source + 16), capped by `limit` and the position table."""
    budget = 2 * src_len + 16 if limit is None else limit
    return max(1, min(budget, max_positions - prefix_len))


def decoder_prefix(model: Any, tokenizer: Any, tgt: str) -> list[int]:
    """`[decoder_start, <tgt_lang>]`, the forced start of every mBART-50 translation."""
    return [model.config.decoder_start_token_id, lang_token_id(tokenizer, tgt)]


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def _length_sorted(n: int, key) -> list[int]:
    return sorted(range(n), key=key)


@torch.no_grad()
def greedy_translate(model: Any, tokenizer: Any, direction: Direction, batch_size: int = 16,
                     progress: Any = None, limit: int | None = None) -> Sequences:  # fmt: skip
    """The model's greedy translation of every source (ids after the prefix, EOS removed)."""
    positions = model.config.max_position_embeddings
    enc = encoder_ids(tokenizer, direction.texts, direction.src, positions)
    prefix = decoder_prefix(model, tokenizer, direction.tgt)
    pad, eos = model.config.pad_token_id, model.config.eos_token_id
    out: list[list[int]] = [[] for _ in enc]
    order = _length_sorted(len(enc), lambda i: len(enc[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = _pad([enc[i] for i in idx], pad)
        gen = model.generate(
            input_ids=ids, attention_mask=mask, decoder_input_ids=torch.tensor([prefix] * len(idx)),
            max_new_tokens=max_new_tokens(ids.shape[1], len(prefix), positions, limit), num_beams=1,
            do_sample=False,
        )  # fmt: skip
        for row, i in zip(gen[:, len(prefix) :].tolist(), idx, strict=True):
            cut = row.index(eos) if eos in row else len(row)
            out[i] = [t for t in row[:cut] if t != pad]
        if progress is not None:
            progress(len(idx))
    return Sequences(direction, enc, prefix, out)


def source_as_target(model: Any, tokenizer: Any, direction: Direction) -> Sequences:
    """Teacher forcing on the source text itself (the English-only baseline's en->en)."""
    positions = model.config.max_position_embeddings
    enc = encoder_ids(tokenizer, direction.texts, direction.src, positions)
    prefix = decoder_prefix(model, tokenizer, direction.tgt)
    text = tokenizer(list(direction.texts), add_special_tokens=False)["input_ids"]
    return Sequences(direction, enc, prefix, [list(t)[: positions - len(prefix)] for t in text])


def batches(seqs: Sequences, pad_id: int, batch_size: int) -> Iterator[Batch]:
    """Padded teacher-forced batches of one direction, sorted by (encoder, decoder) length."""
    enc, dec = seqs.encoder_ids, seqs.decoder_ids
    order = _length_sorted(len(enc), lambda i: (len(enc[i]), len(dec[i])))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = _pad([enc[i] for i in idx], pad_id)
        dids, dmask = _pad([dec[i] for i in idx], pad_id)
        yield Batch(seqs.direction.lang, ids, mask, dids, dmask)


class HFBackend:
    """Translation and teacher-forced logits straight from an HF model (full precision or ModelOpt fake-quant)."""

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 16, limit: int | None = None):
        self.model, self.tokenizer, self.batch_size, self.limit = model, tokenizer, batch_size, limit

    def translate(self, direction: Direction) -> Sequences:
        return greedy_translate(self.model, self.tokenizer, direction, self.batch_size, limit=self.limit)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    @torch.no_grad()
    def teacher_forced_logits(
        self, encoder_ids: list[list[int]], decoder_ids: list[list[int]]
    ) -> list[torch.Tensor]:
        pad = self.model.config.pad_token_id
        out: list[torch.Tensor] = [torch.empty(0)] * len(encoder_ids)
        order = _length_sorted(len(encoder_ids), lambda i: len(encoder_ids[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            ids, mask = _pad([encoder_ids[i] for i in idx], pad)
            dids, dmask = _pad([decoder_ids[i] for i in idx], pad)
            logits = self.model(
                input_ids=ids, attention_mask=mask, decoder_input_ids=dids, decoder_attention_mask=dmask
            ).logits.float()
            for row, i in enumerate(idx):
                out[i] = logits[row, : len(decoder_ids[i])]
        return out
