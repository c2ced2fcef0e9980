"""What a backend is asked to generate, and what it answers. Token ids only: text lives above."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """Decoding settings of one request (the HF `generate` meanings)."""

    beam_size: int = 1
    max_new_tokens: int = 256
    min_new_tokens: int = 0
    length_penalty: float = 1.0
    early_stopping: bool = True


@dataclass
class GenerationRequest:
    """One sequence to translate.

    `encoder_ids` is the source as the encoder sees it (`<src_lang> tokens </s>` for mBART-50);
    `decoder_prefix` is forced before generation starts (`[decoder_start, <tgt_lang>]`).
    """

    request_id: str
    encoder_ids: list[int]
    decoder_prefix: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    target_lang: str | None = None  # ISO code; picks the output-vocabulary shortlist where one is served
    arrival_time: float = field(default_factory=time.monotonic)


@dataclass
class GenerationResult:
    """The best hypothesis: generated ids after the prefix, without the final EOS."""

    request_id: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "length"
    prompt_tokens: int
    first_token_time: float | None = None  # monotonic time the first generated token was ready
    finish_time: float = field(default_factory=time.monotonic)


def default_max_new_tokens(n_source_tokens: int) -> int:
    """The generation limit when a caller gives none: translations rarely run past twice the
    source (text tokens, without language/EOS tokens); the cap only bounds degenerate output."""
    return 2 * n_source_tokens + 16
