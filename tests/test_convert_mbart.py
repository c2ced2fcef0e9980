"""mBART -> TRT-LLM enc-dec checkpoint: layout, config contract, TP shards, metadata files."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
from ckpt_util import build_tiny_mbart_cc25
from conftest import real_sentences
from safetensors.torch import load_file

from convert.checkpoint import load_merged, load_rank, read_config
from convert.languages import language_entries

SHARED_KEYS = {
    "architecture", "dtype", "logits_dtype", "num_hidden_layers", "num_attention_heads", "head_size",
    "hidden_size", "intermediate_size", "vocab_size", "max_position_embeddings", "norm_epsilon",
    "position_embedding_type", "hidden_act", "quantization", "mapping", "use_parallel_embedding",
    "embedding_sharding_dim", "has_position_embedding", "has_embedding_layernorm", "has_embedding_scale",
    "has_attention_qkvo_bias", "has_mlp_bias", "has_model_final_layernorm", "layernorm_type",
    "layernorm_position", "mlp_type", "q_scaling", "relative_attention", "max_distance", "num_buckets",
    "gated_act", "model_type",
}  # fmt: skip
DECODER_KEYS = {
    "rescale_before_lm_head", "encoder_hidden_size", "encoder_num_heads", "encoder_head_size",
    "skip_cross_kv", "use_implicit_relative_attention", "decoder_start_token_id", "eos_token_id",
    "bos_token_id", "pad_token_id",
}  # fmt: skip
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@pytest.fixture(scope="module")
def hf(tiny_mbart_dir):
    from transformers import MBartForConditionalGeneration

    model = MBartForConditionalGeneration.from_pretrained(tiny_mbart_dir, dtype=torch.float32)
    return model.config, {k: v.detach() for k, v in model.state_dict().items()}


def expected_full(sd: dict, comp: str, layers: int) -> dict[str, torch.Tensor]:
    """The contract's name mapping (spec section 3), written independently of the converter."""
    p = f"model.{comp}."
    out = {
        "transformer.vocab_embedding.weight": sd[p + "embed_tokens.weight"],
        "embedding.vocab_embedding.weight": sd[p + "embed_tokens.weight"],
        "transformer.position_embedding.weight": sd[p + "embed_positions.weight"][2:],
    }
    for dst, src in [("transformer.ln_embed", "layernorm_embedding"), ("transformer.ln_f", "layer_norm")]:
        for s in ("weight", "bias"):
            out[f"{dst}.{s}"] = sd[f"{p}{src}.{s}"]
    attns = [("attention", "self_attn")] if comp == "encoder" else [("self_attention", "self_attn")]
    attns += [("cross_attention", "encoder_attn")] if comp == "decoder" else []
    for i in range(layers):
        L, H = f"transformer.layers.{i}.", f"{p}layers.{i}."
        for dst, src in attns:
            for s in ("weight", "bias"):
                out[f"{L}{dst}.qkv.{s}"] = torch.cat([sd[f"{H}{src}.{x}_proj.{s}"] for x in "qkv"])
                out[f"{L}{dst}.dense.{s}"] = sd[f"{H}{src}.out_proj.{s}"]
                out[f"{L}{dst}_layernorm.{s}"] = sd[f"{H}{src}_layer_norm.{s}"]
        for s in ("weight", "bias"):
            out[f"{L}mlp.fc.{s}"] = sd[f"{H}fc1.{s}"]
            out[f"{L}mlp.proj.{s}"] = sd[f"{H}fc2.{s}"]
            out[f"{L}mlp_layernorm.{s}"] = sd[f"{H}final_layer_norm.{s}"]
    if comp == "decoder":
        out["lm_head.weight"] = sd["lm_head.weight"]
    return out


def rank_shape(name: str, full: torch.Size, tp: int) -> tuple[int, ...]:
    """Per-rank shape from the spec's table."""
    shape = list(full)
    if name == "lm_head.weight":
        shape[0] = math.ceil(shape[0] / tp)
    elif ".qkv." in name or ".mlp.fc." in name:
        shape[0] //= tp
    elif name.endswith((".dense.weight", ".mlp.proj.weight")):
        shape[1] //= tp
    return tuple(shape)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_layout_config_names_shapes(tiny_ckpt_factory, hf, tp):
    cfg, sd = hf
    out = tiny_ckpt_factory(tp, "float16")
    assert sorted(p.name for p in out.iterdir()) == [
        "conversion.json", "decoder", "encoder", "languages.json", "tokenizer",
    ]  # fmt: skip
    for comp in ("encoder", "decoder"):
        files = sorted(p.name for p in (out / comp).iterdir())
        assert files == ["config.json"] + [f"rank{r}.safetensors" for r in range(tp)]
        conf = read_config(out / comp)
        assert conf.keys() >= SHARED_KEYS
        if comp == "decoder":
            assert conf.keys() >= DECODER_KEYS
        layers, heads = getattr(cfg, f"{comp}_layers"), getattr(cfg, f"{comp}_attention_heads")
        expect = {
            "architecture": "EncoderModel" if comp == "encoder" else "DecoderModel",
            "dtype": "float16", "logits_dtype": "float32", "num_hidden_layers": layers,
            "num_attention_heads": heads, "head_size": cfg.d_model // heads, "hidden_size": cfg.d_model,
            "intermediate_size": getattr(cfg, f"{comp}_ffn_dim"), "vocab_size": 2054,
            "max_position_embeddings": cfg.max_position_embeddings, "norm_epsilon": 1e-5,
            "position_embedding_type": "learned_absolute", "hidden_act": "gelu",
            "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
            "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
            "use_parallel_embedding": False, "embedding_sharding_dim": 0, "has_position_embedding": True,
            "has_embedding_layernorm": True, "has_embedding_scale": True, "has_attention_qkvo_bias": True,
            "has_mlp_bias": True, "has_model_final_layernorm": True, "layernorm_type": 0,
            "layernorm_position": 0, "mlp_type": 0, "q_scaling": 1.0, "relative_attention": False,
            "max_distance": 0, "num_buckets": 0, "gated_act": False, "model_type": "bart",
        }  # fmt: skip
        if comp == "encoder":
            expect["num_key_value_heads"] = heads
        else:
            expect |= {
                "rescale_before_lm_head": False, "encoder_hidden_size": cfg.d_model,
                "encoder_num_heads": cfg.encoder_attention_heads,
                "encoder_head_size": cfg.d_model // cfg.encoder_attention_heads, "skip_cross_kv": False,
                "use_implicit_relative_attention": False, "decoder_start_token_id": 2, "eos_token_id": 2,
                "bos_token_id": 0, "pad_token_id": 1,
            }  # fmt: skip
        assert {k: conf[k] for k in expect} == expect
        full = expected_full(sd, comp, layers)
        for r in range(tp):
            ranked = load_rank(out / comp, r)
            assert set(ranked) == set(full)
            for name, t in ranked.items():
                assert t.dtype == torch.float16, name
                assert tuple(t.shape) == rank_shape(name, full[name].shape, tp), name


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_shards_reassemble_bit_exact(tiny_ckpt_factory, hf, tp):
    cfg, sd = hf
    out = tiny_ckpt_factory(tp, "float32")
    for comp in ("encoder", "decoder"):
        full = expected_full(sd, comp, getattr(cfg, f"{comp}_layers"))
        merged = load_merged(out / comp)
        assert set(merged) == set(full)
        for name, t in merged.items():
            assert t.dtype == torch.float32 and torch.equal(t, full[name]), name


def test_qkv_heads_and_vocab_padding_per_rank(tiny_ckpt_factory, hf):
    """Rank r holds its own heads' q, then k, then v; lm_head rows past V are zeros on the last rank."""
    cfg, sd = hf
    tp, H = 4, cfg.d_model
    out = tiny_ckpt_factory(tp, "float32")
    q, k, v = (sd[f"model.decoder.layers.1.encoder_attn.{x}_proj.weight"] for x in "qkv")
    rows = H // tp
    for r in range(tp):
        got = load_rank(out / "decoder", r)
        sl = slice(r * rows, (r + 1) * rows)
        assert torch.equal(
            got["transformer.layers.1.cross_attention.qkv.weight"], torch.cat([q[sl], k[sl], v[sl]])
        )
        fc2 = sd["model.decoder.layers.0.fc2.weight"]
        assert torch.equal(got["transformer.layers.0.mlp.proj.weight"], fc2.chunk(tp, dim=1)[r])
        assert torch.equal(got["transformer.layers.0.mlp.proj.bias"], sd["model.decoder.layers.0.fc2.bias"])
    vp = math.ceil(2054 / tp) * tp
    last = load_rank(out / "decoder", tp - 1)["lm_head.weight"]
    assert vp == 2056 and last.shape[0] == vp // tp
    assert torch.count_nonzero(last[-(vp - 2054) :]) == 0
    assert torch.equal(last[: -(vp - 2054)], sd["lm_head.weight"][(tp - 1) * (vp // tp) :])


def test_embedding_names_are_independent_copies(tiny_ckpt_factory):
    for comp in ("encoder", "decoder"):
        t = load_rank(tiny_ckpt_factory(2, "float32") / comp, 0)
        a, b = t["transformer.vocab_embedding.weight"], t["embedding.vocab_embedding.weight"]
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()


def test_conversion_json_and_tokenizer(tiny_ckpt_factory, tiny_mbart_dir):
    from transformers import AutoTokenizer

    out = tiny_ckpt_factory(2, "bfloat16")
    rec = json.loads((out / "conversion.json").read_text())
    assert rec["architecture"] == "MBartForConditionalGeneration"
    assert rec["dtype"] == "bfloat16" and rec["tp_size"] == 2 and rec["project_version"]
    assert rec["source"] == str(tiny_mbart_dir)
    expected = {f"{c}/rank{r}.safetensors" for c in ("encoder", "decoder") for r in range(2)}
    assert set(rec["sha256"]) == expected
    for rel, digest in rec["sha256"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest
    assert load_file(out / "decoder/rank1.safetensors")["lm_head.weight"].dtype == torch.bfloat16
    ours, theirs = (
        AutoTokenizer.from_pretrained(out / "tokenizer"),
        AutoTokenizer.from_pretrained(tiny_mbart_dir),
    )
    for text in real_sentences("zh", 3) + real_sentences("ar", 3):
        assert ours(text).input_ids == theirs(text).input_ids


def apply_template(template: list, text_ids: list[int], lang_id: int) -> list[int]:
    slots = {"text": text_ids, "src_lang": [lang_id], "tgt_lang": [lang_id]}
    return [t for item in template for t in (slots[item] if isinstance(item, str) else [item])]


def test_languages_json_mbart50(tiny_ckpt_factory, tiny_mbart_dir):
    from transformers import AutoTokenizer

    out = tiny_ckpt_factory(1, "float32")
    spec = json.loads((out / "languages.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_mbart_dir)
    assert spec["languages"] == language_entries(tok.get_vocab())
    assert {e["code"] for e in spec["languages"]} >= {"en", "zh", "ar", "ru", "sw", "de", "hi", "ja"}
    assert spec["source_template"] == ["src_lang", "text", 2]
    assert spec["decoder_template"] == [2, "tgt_lang"]
    assert {k: spec[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")} == {
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "decoder_start_token_id": 2,
    }  # fmt: skip
    by_code = {e["code"]: e for e in spec["languages"]}
    for lang in ("ru", "hi"):
        tok.src_lang = by_code[lang]["mbart_code"]
        for text in real_sentences(lang, 3):
            text_ids = tok(text, add_special_tokens=False).input_ids
            assert (
                apply_template(spec["source_template"], text_ids, by_code[lang]["token_id"])
                == tok(text).input_ids
            )


def test_languages_json_cc25(tmp_path):
    from transformers import AutoTokenizer

    from convert.__main__ import convert_checkpoint

    hf_dir = build_tiny_mbart_cc25(tmp_path / "cc25")
    out = convert_checkpoint(str(hf_dir), tmp_path / "out", 2, "float32", progress=False)
    spec = json.loads((out / "languages.json").read_text())
    assert spec["source_template"] == ["text", 2, "src_lang"]
    assert spec["decoder_template"] == ["tgt_lang"]
    assert len(spec["languages"]) == 25
    tok = AutoTokenizer.from_pretrained(hf_dir)
    de = next(e for e in spec["languages"] if e["code"] == "de")
    tok.src_lang = "de_DE"
    text = real_sentences("de", 1)[0]
    ids = apply_template(
        spec["source_template"], tok(text, add_special_tokens=False).input_ids, de["token_id"]
    )
    assert ids == tok(text).input_ids
    assert read_config(out / "decoder")["decoder_start_token_id"] == tok.convert_tokens_to_ids("en_XX")


def test_missing_final_layernorm_sets_flag_false(hf):
    """A config/state dict without the final layer norm (BART-style) converts with the flag off."""
    from convert.registry import get_loader

    cfg, sd = hf
    sd = {
        k: v
        for k, v in sd.items()
        if not k.startswith(("model.encoder.layer_norm.", "model.decoder.layer_norm."))
    }
    comps = get_loader("MBartForConditionalGeneration").convert(cfg, sd, torch.float32)
    for comp in comps.values():
        assert comp.config["has_model_final_layernorm"] is False
        assert not any(name.startswith("transformer.ln_f.") for name in comp.tensors)
