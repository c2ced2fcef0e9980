"""A tiny random mBART (and its sentencepiece tokenizer) built locally, for tests and smoke runs.

The tokenizer is trained on the shared calibration text so that zh/ar/ru/hi text tokenizes
into real pieces; the weights are random, so translations are meaningless.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from eval.data import calib_languages, calib_path, read_lines

# mBART-large-50's shape (random weights), for GPU parity runs and benchmarks.
LARGE_DIMS = dict(
    d_model=1024,
    encoder_layers=12,
    decoder_layers=12,
    encoder_attention_heads=16,
    decoder_attention_heads=16,
    encoder_ffn_dim=4096,
    decoder_ffn_dim=4096,
    max_position_embeddings=1024,
    vocab_size=250054,
    init_std=0.02,
)
TINY_DIMS = dict(
    d_model=64,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
    max_position_embeddings=512,
)


def train_tokenizer(out_dir: Path, vocab_size: int = 2000, lines_per_lang: int = 300) -> Path:
    """Train a sentencepiece model on the calibration corpora and save it as an mBART-50 tokenizer."""
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    text = [line for lang in calib_languages() for line in read_lines(calib_path(lang), lines_per_lang)]
    if not text:
        raise FileNotFoundError("no calibration corpora found under MT_DATA_ROOT to train a tokenizer on")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text),
        model_prefix=str(out_dir / "sentencepiece.bpe"),
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=0.9995,
        num_threads=1,
        minloglevel=2,
    )
    # transformers 5 reads the real mBART-50 vocabulary only through from_pretrained.
    (out_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "MBart50Tokenizer"}))
    return out_dir


def build_tiny_mbart(out_dir: Path, seed: int = 0, **overrides) -> Path:
    """Write a tiny random `MBartForConditionalGeneration` with its tokenizer to `out_dir`.

    `overrides` change the config (e.g. `**LARGE_DIMS`); a vocabulary larger than the tokenizer's
    is fine (the extra rows are never produced by tokenizing, only by generating).
    """
    from transformers import AutoTokenizer, MBartConfig, MBartForConditionalGeneration

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as spm_dir:
        tok = AutoTokenizer.from_pretrained(train_tokenizer(Path(spm_dir)))
    dims = {"vocab_size": len(tok), "init_std": 0.5, **TINY_DIMS, **overrides}
    cfg = MBartConfig(
        **dims,
        scale_embedding=True,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.eos_token_id,
        forced_eos_token_id=tok.eos_token_id,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    torch.manual_seed(seed)
    model = MBartForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        # Random LayerNorm/bias values, so that a dropped or swapped one changes outputs; a large
        # init and a stronger EOS row make greedy and beam outputs diverse and end at varied lengths,
        # so EOS handling and beam bookkeeping are exercised rather than 24 copies of one token.
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name or "layernorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
        model.model.shared.weight[cfg.eos_token_id] *= 1.5
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
