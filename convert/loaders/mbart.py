"""mBART (mBART-50 one-to-many / many-to-many, mBART-cc25) -> TRT-LLM enc-dec `encoder/` + `decoder/`.

Both mBART variants share the weights layout; they differ only in where the language tokens go,
which `language_spec` reads off the tokenizer itself rather than from its class name.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from convert.checkpoint import mapping
from convert.errors import ConvertError
from convert.languages import language_entries
from convert.registry import (
    NO_QUANTIZATION,
    Component,
    Loader,
    dtype_name,
    hidden_act,
    register_loader,
    require_divisible,
)

# HF mBART uses nn.LayerNorm's default eps; its config has no field for it.
LAYERNORM_EPS = 1e-5
# MBartLearnedPositionalEmbedding keeps 2 unused leading rows (fairseq legacy); TRT-LLM starts at 0.
POSITION_OFFSET = 2
# fairseq dictionary ids shared by every mBART checkpoint, used when the HF config leaves one unset.
FAIRSEQ_IDS = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2}
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


@register_loader("MBartForConditionalGeneration")
class MBartLoader(Loader):
    hf_class = "MBartForConditionalGeneration"

    def check_tp(self, cfg: Any, tp_size: int) -> None:
        for comp in ("encoder", "decoder"):
            require_divisible(f"{comp}'s attention heads", getattr(cfg, f"{comp}_attention_heads"), tp_size)
            require_divisible(f"{comp}'s FFN width", getattr(cfg, f"{comp}_ffn_dim"), tp_size)

    def build(self, cfg: Any) -> dict[str, Component]:
        self.check_final_logits_bias()
        return {"encoder": self.component(cfg, "encoder"), "decoder": self.component(cfg, "decoder")}

    def check_final_logits_bias(self) -> None:
        """TRT-LLM's decoder lm_head has no bias: refuse a non-zero one instead of silently dropping it."""
        bias = self.sd.get("final_logits_bias")
        if bias is not None and bool(bias.any()):
            raise ConvertError(
                f"final_logits_bias is non-zero (max |b| = {bias.abs().max().item():.3g}); "
                "TensorRT-LLM's decoder has no lm_head bias to carry it"
            )

    def special_ids(self, cfg: Any) -> dict[str, int]:
        ids = {k: getattr(cfg, k, None) for k in FAIRSEQ_IDS}
        ids = {k: v if v is not None else FAIRSEQ_IDS[k] for k, v in ids.items()}
        start = cfg.decoder_start_token_id
        return {**ids, "decoder_start_token_id": ids["eos_token_id"] if start is None else start}

    def config(self, cfg: Any, comp: str) -> dict:
        heads = getattr(cfg, f"{comp}_attention_heads")
        src = f"model.{comp}"
        conf = {
            "architecture": "EncoderModel" if comp == "encoder" else "DecoderModel",
            "dtype": dtype_name(self.dtype),
            "logits_dtype": "float32",
            "num_hidden_layers": getattr(cfg, f"{comp}_layers"),
            "num_attention_heads": heads,
            "num_key_value_heads": heads,
            "head_size": cfg.d_model // heads,
            "hidden_size": cfg.d_model,
            "intermediate_size": getattr(cfg, f"{comp}_ffn_dim"),
            "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_position_embeddings,
            "norm_epsilon": LAYERNORM_EPS,
            "position_embedding_type": "learned_absolute",
            "hidden_act": hidden_act(cfg.activation_function),
            "quantization": dict(NO_QUANTIZATION),
            "mapping": mapping(1),
            "use_parallel_embedding": False,
            "embedding_sharding_dim": 0,
            "has_position_embedding": True,
            "has_embedding_layernorm": self.has(f"{src}.layernorm_embedding.weight"),
            "has_embedding_scale": bool(cfg.scale_embedding),
            "has_attention_qkvo_bias": self.has(f"{src}.layers.0.self_attn.q_proj.bias"),
            "has_mlp_bias": self.has(f"{src}.layers.0.fc1.bias"),
            "has_model_final_layernorm": self.has(f"{src}.layer_norm.weight"),
            "layernorm_type": 0,  # LayerNorm
            "layernorm_position": 0,  # pre_layernorm
            "mlp_type": 0,  # MLP
            "q_scaling": 1.0,
            "relative_attention": False,
            "max_distance": 0,
            "num_buckets": 0,
            "gated_act": False,
            "model_type": "bart",
        }
        if comp == "decoder":
            enc_heads = cfg.encoder_attention_heads
            conf |= {
                "rescale_before_lm_head": False,
                "encoder_hidden_size": cfg.d_model,
                "encoder_num_heads": enc_heads,
                "encoder_head_size": cfg.d_model // enc_heads,
                "skip_cross_kv": False,
                "use_implicit_relative_attention": False,
                **self.special_ids(cfg),
            }
        return conf

    def component(self, cfg: Any, comp: str) -> Component:
        src, out = f"model.{comp}", {}
        for dst in ("transformer.vocab_embedding", "embedding.vocab_embedding"):
            self.set_tensor(out, f"{dst}.weight", f"{src}.embed_tokens.weight")
        self.set_position_embedding(out, "transformer.position_embedding", f"{src}.embed_positions", cfg)
        if self.has(f"{src}.layernorm_embedding.weight"):
            self.set_layernorm(out, "transformer.ln_embed", f"{src}.layernorm_embedding")
        if self.has(f"{src}.layer_norm.weight"):
            self.set_layernorm(out, "transformer.ln_f", f"{src}.layer_norm")
        for i in range(getattr(cfg, f"{comp}_layers")):
            self.set_layer(out, f"transformer.layers.{i}", f"{src}.layers.{i}", decoder=comp == "decoder")
        if comp == "decoder":
            self.set_tensor(out, "lm_head.weight", "lm_head.weight")
        return Component(self.config(cfg, comp), out)

    def set_position_embedding(self, out: dict, dst: str, src: str, cfg: Any) -> None:
        table = self.get(f"{src}.weight")
        if table.shape[0] != cfg.max_position_embeddings + POSITION_OFFSET:
            raise ConvertError(
                f"{src}.weight has {table.shape[0]} rows, expected max_position_embeddings + 2"
            )
        out[f"{dst}.weight"] = self.cast(table[POSITION_OFFSET:])

    def set_attention(self, out: dict, dst: str, src: str) -> None:
        self.set_qkv(out, f"{dst}.qkv", f"{src}.q_proj", f"{src}.k_proj", f"{src}.v_proj")
        self.set_linear(out, f"{dst}.dense", f"{src}.out_proj")

    def set_layer(self, out: dict, dst: str, src: str, decoder: bool) -> None:
        attn = "self_attention" if decoder else "attention"
        self.set_attention(out, f"{dst}.{attn}", f"{src}.self_attn")
        self.set_layernorm(out, f"{dst}.{attn}_layernorm", f"{src}.self_attn_layer_norm")
        if decoder:
            self.set_attention(out, f"{dst}.cross_attention", f"{src}.encoder_attn")
            self.set_layernorm(out, f"{dst}.cross_attention_layernorm", f"{src}.encoder_attn_layer_norm")
        self.set_linear(out, f"{dst}.mlp.fc", f"{src}.fc1")
        self.set_linear(out, f"{dst}.mlp.proj", f"{src}.fc2")
        self.set_layernorm(out, f"{dst}.mlp_layernorm", f"{src}.final_layer_norm")

    def write_extras(self, out_dir: Path, tokenizer: Any, components: dict[str, Component]) -> None:
        dec = components["decoder"].config
        spec = language_spec(tokenizer)
        spec |= {k: dec[k] for k in SPECIAL_IDS}
        (Path(out_dir) / "languages.json").write_text(json.dumps(spec, indent=2, ensure_ascii=False) + "\n")


def _template(ids: list[int], text_ids: list[int], lang_id: int, slot: str) -> tuple[list, list]:
    """(prefix, suffix) of `ids` around the text's own tokens, the language token named `slot`."""
    n = len(text_ids)
    named = [slot if t == lang_id else t for t in ids]
    for i in range(len(ids) - n + 1):
        if ids[i : i + n] == text_ids:
            return named[:i], named[i + n :]
    raise ConvertError("cannot locate the text inside the tokenizer's output to derive the language template")


def language_spec(tokenizer: Any) -> dict:
    """languages.json content (without the special ids): languages and the source/decoder templates.

    Templates are probed from the tokenizer: mBART-50 gives `<src_lang> text </s>` and labels
    `<tgt_lang> text </s>`; mBART-cc25 gives `text </s> <src_lang>` and `text </s> <tgt_lang>`.
    The decoder prefix is the labels shifted right the way HF mBART does it (the last label token,
    `</s>` or the language code, wrapped to the front), minus the text: [2, "tgt_lang"] or ["tgt_lang"].
    """
    entries = language_entries(tokenizer.get_vocab())
    if not entries:
        raise ConvertError("the tokenizer has no mBART language tokens (e.g. en_XX)")
    code, lang_id = entries[0]["mbart_code"], entries[0]["token_id"]
    probe = "Hello world"
    text_ids = tokenizer(probe, add_special_tokens=False)["input_ids"]
    tok = copy.deepcopy(tokenizer)  # setting the languages changes the tokenizer's state
    tok.src_lang, tok.tgt_lang = code, code
    src_pre, src_suf = _template(tok(probe)["input_ids"], text_ids, lang_id, "src_lang")
    tgt_pre, tgt_suf = _template(tok(text_target=probe)["input_ids"], text_ids, lang_id, "tgt_lang")
    if not tgt_suf:
        raise ConvertError("the tokenizer's target template has no end token to start the decoder with")
    return {
        "languages": entries,
        "source_template": [*src_pre, "text", *src_suf],
        "decoder_template": [tgt_suf[-1], *tgt_pre],
    }
