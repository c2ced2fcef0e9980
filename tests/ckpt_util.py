"""Helpers for tests that need converted checkpoints (kept here so conftest fixtures stay one-liners)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path


def ckpt_factory(hf_dir: Path, root: Path) -> Callable[..., Path]:
    """`make(tp=1, dtype="float32") -> Path`: the converted checkpoint of `hf_dir`, built once per (tp, dtype)."""
    from convert.__main__ import convert_checkpoint

    cache: dict[tuple[int, str], Path] = {}

    def make(tp: int = 1, dtype: str = "float32") -> Path:
        if (tp, dtype) not in cache:
            cache[tp, dtype] = convert_checkpoint(
                str(hf_dir), root / f"tp{tp}-{dtype}", tp, dtype, progress=False
            )
        return cache[tp, dtype]

    return make


def build_tiny_mbart_cc25(out_dir: Path, seed: int = 0) -> Path:
    """A tiny random mBART with an mBART-cc25 tokenizer (`MBartTokenizer`: `text </s> <lang>`)."""
    import torch
    from transformers import AutoTokenizer, MBartConfig, MBartForConditionalGeneration

    from convert.tiny import TINY_DIMS, train_tokenizer

    out_dir = Path(out_dir)
    spm_dir = train_tokenizer(out_dir / "_spm", lines_per_lang=60)
    (spm_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "MBartTokenizer"}))
    tok = AutoTokenizer.from_pretrained(spm_dir)
    en_id = tok.convert_tokens_to_ids("en_XX")
    cfg = MBartConfig(
        vocab_size=len(tok), **TINY_DIMS, scale_embedding=True, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=en_id, dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    MBartForConditionalGeneration(cfg).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    shutil.rmtree(spm_dir)
    return out_dir


XLMR_LABELS = ["ar", "de", "en", "hi", "ru", "sw", "zh"]


def build_tiny_xlmr(out_dir: Path, classifier: bool, spm_dir: Path, seed: int = 0) -> Path:
    """A tiny random XLMRobertaModel / XLMRobertaForSequenceClassification (labels `XLMR_LABELS`)
    with an XLMRobertaTokenizer built from the sentencepiece model in `spm_dir`
    (`convert.tiny.train_tokenizer` output)."""
    import torch
    from transformers import (
        AutoTokenizer,
        XLMRobertaConfig,
        XLMRobertaForSequenceClassification,
        XLMRobertaModel,
    )

    out_dir = Path(out_dir)
    tok_dir = out_dir / "_spm"
    shutil.copytree(spm_dir, tok_dir)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "XLMRobertaTokenizer"}))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = XLMRobertaConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
        max_position_embeddings=130, type_vocab_size=1, pad_token_id=tok.pad_token_id, bos_token_id=0,
        eos_token_id=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        id2label=dict(enumerate(XLMR_LABELS)), label2id={v: i for i, v in enumerate(XLMR_LABELS)},
    )  # fmt: skip
    torch.manual_seed(seed)
    model = (XLMRobertaForSequenceClassification if classifier else XLMRobertaModel)(cfg).eval()
    with torch.no_grad():  # random LayerNorm/bias values so a dropped or swapped one changes outputs
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    shutil.rmtree(tok_dir)
    return out_dir
