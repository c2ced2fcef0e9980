"""convert.checkpoint: the TP rule table, shard/unshard, and the quantized-suffix extension point."""

from __future__ import annotations

import pytest
import torch

import convert.checkpoint as ckpt
from convert.checkpoint import (
    Axes,
    Role,
    load_merged,
    load_rank,
    module_role,
    plan,
    register_quant_axes,
    shard,
    write_component,
)
from convert.registry import convert_hf_model


@pytest.mark.parametrize(
    ("module", "role"),
    [
        ("transformer.layers.3.attention.qkv", Role.QKV),
        ("transformer.layers.0.self_attention.qkv", Role.QKV),
        ("transformer.layers.0.cross_attention.qkv", Role.QKV),
        ("bert.layers.1.attention.qkv", Role.QKV),
        ("transformer.layers.0.cross_attention.dense", Role.ROW),
        ("layers.0.attention.dense", Role.ROW),
        ("transformer.layers.0.mlp.fc", Role.COLUMN),
        ("transformer.layers.0.mlp.proj", Role.ROW),
        ("lm_head", Role.VOCAB),
        ("classifier.dense", Role.REPLICATED),
        ("classifier.out_proj", Role.REPLICATED),
        ("transformer.vocab_embedding", Role.REPLICATED),
        ("transformer.layers.0.mlp_layernorm", Role.REPLICATED),
        ("transformer.layers.0.attention", Role.REPLICATED),  # e.g. kv_cache_scaling_factor
    ],
)
def test_module_roles(module, role):
    assert module_role(module) is role


def test_row_bias_replicated_and_unknown_suffix_refused(monkeypatch):
    monkeypatch.setattr(ckpt, "QUANT_AXES", {})  # as before calib/ registers its layouts
    assert plan("transformer.layers.0.mlp.proj.bias") == (Role.ROW, Axes(out=0, inp=None))
    b = torch.arange(8.0)
    assert shard("transformer.layers.0.mlp.proj.bias", b, 1, 2) is b
    with pytest.raises(ValueError, match="per_channel_scale"):
        plan("transformer.layers.0.mlp.fc.per_channel_scale")
    with pytest.raises(ValueError, match="W8A16"):
        plan("transformer.layers.0.mlp.fc.weight", {"quant_algo": "W8A16"})


def test_quantized_suffixes_plug_in(monkeypatch, tmp_path):
    """What calib/ does for W8A16 / AWQ: declare the layouts, then write_component/load_merged just work."""
    monkeypatch.setattr(ckpt, "QUANT_AXES", {})
    register_quant_axes("W8A16", "weight", out=1, inp=0)  # int8 [in, out]
    register_quant_axes("W8A16", "per_channel_scale", out=0, inp=None)
    register_quant_axes("W8A16", "prequant_scaling_factor", out=None, inp=1)  # [1, in], AWQ-style
    H, F, T = 8, 16, 2
    qkv_w = torch.randint(-128, 127, (H, 3 * H), dtype=torch.int8)  # [in, out=3H]
    tensors = {
        "transformer.layers.0.attention.qkv.weight": qkv_w,
        "transformer.layers.0.attention.qkv.per_channel_scale": torch.rand(3 * H),
        "transformer.layers.0.attention.qkv.bias": torch.rand(3 * H),
        "transformer.layers.0.mlp.proj.weight": torch.randint(
            -128, 127, (F, H), dtype=torch.int8
        ),  # [in, out]
        "transformer.layers.0.mlp.proj.per_channel_scale": torch.rand(H),
        "transformer.layers.0.mlp.proj.prequant_scaling_factor": torch.rand(1, F),
        "lm_head.weight": torch.rand(11, H),  # excluded: float [out, in], vocab-padded
    }
    quant = {"quant_algo": "W8A16", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]}
    write_component(tmp_path, {"quantization": quant, "vocab_size": 11}, tensors, T)
    r1 = load_rank(tmp_path, 1)
    q = qkv_w.view(H, 3, H)[:, :, H // T :].reshape(H, -1)  # rank 1's heads of q, k, v along the out axis
    assert torch.equal(r1["transformer.layers.0.attention.qkv.weight"], q)
    assert r1["transformer.layers.0.attention.qkv.per_channel_scale"].shape == (3 * H // T,)
    assert r1["transformer.layers.0.mlp.proj.weight"].shape == (F // T, H)
    assert r1["transformer.layers.0.mlp.proj.per_channel_scale"].shape == (H,)
    assert r1["transformer.layers.0.mlp.proj.prequant_scaling_factor"].shape == (1, F // T)
    assert r1["lm_head.weight"].shape == (6, H) and not r1["lm_head.weight"][-1].any()
    merged = load_merged(tmp_path)
    assert all(torch.equal(merged[k], v) for k, v in tensors.items())


def test_convert_hf_model_for_calib(tiny_mbart_dir, tmp_path):
    """calib/'s path: an in-memory HF model -> full tensors -> write_component -> the same checkpoint."""
    from transformers import MBartForConditionalGeneration

    model = MBartForConditionalGeneration.from_pretrained(tiny_mbart_dir, dtype=torch.float32)
    comps = convert_hf_model(model, "float32")
    assert set(comps) == {"encoder", "decoder"}
    write_component(tmp_path / "decoder", comps["decoder"].config, comps["decoder"].tensors, 4)
    merged = load_merged(tmp_path / "decoder")
    assert merged.keys() == comps["decoder"].tensors.keys()
    assert all(torch.equal(merged[k], v) for k, v in comps["decoder"].tensors.items())
