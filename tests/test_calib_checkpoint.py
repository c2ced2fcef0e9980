"""Quantized checkpoints of a tiny mBART: the TRT-LLM contract, TP shards, exclusions, the runtime end to end.

The model is tiny but wide enough for INT4 groups of 128 at TP=2 (d_model 256, FFN 512), with
an untied output layer and init std 0.1 so that its greedy translations differ from sentence
to sentence (a tied random mBART just repeats its language token).
"""

from __future__ import annotations

import json

import pytest
import torch

from calib import hf as hfx
from calib.data import calibration_directions
from calib.export import write_checkpoint
from calib.pipeline import Options, calibrated_components, language_batches
from calib.trtllm_quant import DEFAULT_EXCLUDE, QUANT_MODES, mbart_linear_groups
from convert.checkpoint import load_merged, load_rank, read_config
from serve.runtime.layers import Linear
from tests.conftest import real_sentences

CALIB_TINY = dict(
    d_model=256, encoder_ffn_dim=512, decoder_ffn_dim=512, init_std=0.1, tie_word_embeddings=False
)
MODES = list(QUANT_MODES)
EXCLUDE = [*DEFAULT_EXCLUDE, "*cross_attention.qkv", "transformer.layers.1.mlp.fc"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from convert.tiny import build_tiny_mbart

    return build_tiny_mbart(tmp_path_factory.mktemp("calib_tiny"), **CALIB_TINY)


@pytest.fixture(scope="module")
def hf(model_dir):
    from convert.__main__ import load_hf

    return load_hf(str(model_dir), 1)  # (loader, model, tokenizer)


@pytest.fixture(scope="module")
def setup(hf):
    """Float components, linear groups and a few zh calibration batches (both directions)."""
    loader, model, tok = hf
    groups = mbart_linear_groups(model.config.encoder_layers, model.config.decoder_layers)
    with torch.no_grad():
        fp = loader.convert(model.config, model.state_dict(), torch.float32)
    seqs = {
        lang: [hfx.greedy_translate(model, tok, d, 8, limit=8) for d in dirs]
        for lang, dirs in calibration_directions(["zh"], 4).items()
    }
    return groups, fp, language_batches(seqs, model.config.pad_token_id, 4)


@pytest.fixture(scope="module")
def calibrated(hf, setup):
    """mode -> (quantized components with EXCLUDE, ModelOpt fake-quant model), computed once per mode."""
    _, model, _ = hf
    groups, fp, batches = setup
    cache = {}

    def get(mode: str):
        if mode not in cache:
            opts = Options(model="tiny", output=None, langs=["zh"], quant=mode, progress=False)
            cache[mode] = calibrated_components(opts, model, batches, groups, EXCLUDE, fp)
        return cache[mode]

    return get


# name suffix -> (dtype, shape at TP=1) for a module with [out, in] = (768, 256), i.e. encoder qkv
CONTRACT = {
    "int8_wo": {"weight": (torch.int8, (256, 768)), "per_channel_scale": (torch.float32, (768,))},
    "int4_awq": {
        "weight": (torch.int8, (384, 256)),
        "weights_scaling_factor": (torch.float32, (768, 2)),
        "prequant_scaling_factor": (torch.float32, (1, 256)),
    },
    "w8a8_sq": {
        "weight": (torch.int8, (768, 256)),
        "weights_scaling_factor": (torch.float32, (768,)),
        "activation_scaling_factor": (torch.float32, (1,)),
        "prequant_scaling_factor": (torch.float32, (256,)),
    },
}


@pytest.mark.parametrize("mode", MODES)
def test_tensor_names_shapes_dtypes_and_config(calibrated, mode):
    comps, _ = calibrated(mode)
    enc = comps["encoder"].tensors
    prefix = "transformer.layers.0.attention.qkv"
    got = {
        k[len(prefix) + 1 :]: (v.dtype, tuple(v.shape)) for k, v in enc.items() if k.startswith(prefix + ".")
    }
    assert got == {**CONTRACT[mode], "bias": (torch.float32, (768,))}
    quant = comps["decoder"].config["quantization"]
    algo = QUANT_MODES[mode][0]
    assert quant["quant_algo"] == algo and quant["kv_cache_quant_algo"] is None
    assert quant["has_zero_point"] is False and quant["exclude_modules"] == EXCLUDE
    assert quant.get("group_size") == (128 if mode == "int4_awq" else None)
    assert quant["pre_quant_scale"] is (mode == "int4_awq")
    assert quant.get("smoothquant_val") == (0.5 if mode == "w8a8_sq" else None)
    if mode == "int8_wo":
        assert torch.all(enc[f"{prefix}.weight"].abs() <= 127)
    if mode == "int4_awq":
        assert torch.all(enc[f"{prefix}.prequant_scaling_factor"] > 0)


@pytest.mark.parametrize("mode", MODES)
def test_excluded_modules_stay_float(calibrated, mode):
    comps, _ = calibrated(mode)
    dec = comps["decoder"].tensors
    for module in ("transformer.layers.0.cross_attention.qkv", "transformer.layers.1.mlp.fc", "lm_head"):
        assert dec[f"{module}.weight"].dtype == torch.float32
        assert not [
            k for k in dec if k.startswith(module + ".") and k.rsplit(".", 1)[1] not in ("weight", "bias")
        ]
    assert comps["encoder"].tensors["transformer.layers.0.mlp.fc.weight"].dtype == torch.int8
    assert comps["encoder"].tensors["transformer.layers.1.mlp.fc.weight"].dtype == torch.float32
    for name in (
        "transformer.vocab_embedding.weight",
        "transformer.ln_f.weight",
        "transformer.ln_embed.weight",
    ):
        assert dec[name].dtype == torch.float32


@pytest.mark.parametrize("mode", MODES)
def test_tp2_shards_reassemble_to_tp1(calibrated, hf, tmp_path, mode):
    loader, _, tok = hf
    comps, _ = calibrated(mode)
    write_checkpoint(tmp_path / "tp2", comps, 2, loader, tok, {})
    for name, comp in comps.items():
        merged = load_merged(tmp_path / "tp2" / name)
        assert merged.keys() == comp.tensors.keys()
        for key, full in comp.tensors.items():
            assert torch.equal(merged[key], full), key
    r0 = load_rank(tmp_path / "tp2" / "decoder", 0)
    p = "transformer.layers.0"
    if mode == "int8_wo":  # column: out split (weight is [in, out]); row: in split, scales full
        assert r0[f"{p}.mlp.fc.weight"].shape == (256, 256) and r0[f"{p}.mlp.fc.per_channel_scale"].shape == (
            256,
        )
        assert r0[f"{p}.mlp.proj.weight"].shape == (256, 256) and r0[
            f"{p}.mlp.proj.per_channel_scale"
        ].shape == (256,)
    if mode == "int4_awq":  # row-parallel: groups and prequant scales follow the input split
        assert r0[f"{p}.mlp.proj.weight"].shape == (128, 256)
        assert r0[f"{p}.mlp.proj.weights_scaling_factor"].shape == (256, 2)
        assert r0[f"{p}.mlp.proj.prequant_scaling_factor"].shape == (1, 256)
        assert r0[f"{p}.self_attention.qkv.prequant_scaling_factor"].shape == (1, 256)
    if mode == "w8a8_sq":
        assert r0[f"{p}.self_attention.qkv.weights_scaling_factor"].shape == (384,)
        assert r0[f"{p}.self_attention.dense.prequant_scaling_factor"].shape == (128,)
        assert r0[f"{p}.self_attention.dense.weights_scaling_factor"].shape == (256,)
    assert read_config(tmp_path / "tp2" / "decoder")["mapping"]["tp_size"] == 2


def _logits(tr, enc, dec):
    return torch.cat(tr.teacher_forced_logits(enc, dec))


@pytest.mark.parametrize("mode", MODES)
def test_runtime_matches_fake_quant_and_dequantized_reference(calibrated, hf, tmp_path, mode):
    from serve.runtime.translator import Translator

    loader, model, tok = hf
    comps, qmodel = calibrated(mode)
    write_checkpoint(tmp_path / "q", comps, 1, loader, tok, {})
    tr = Translator.load(tmp_path / "q", device="cpu")
    dec = tr.decoder.transformer.layers[1]
    assert type(dec.mlp.fc) is Linear and type(dec.cross_attention.qkv) is Linear
    assert type(dec.self_attention.qkv).quant_algo == QUANT_MODES[mode][0]

    d = calibration_directions(["zh"], 4)["zh"][0]
    ref = hfx.greedy_translate(model, tok, d, limit=8)
    got = _logits(tr, ref.encoder_ids, ref.decoder_ids)
    fake = torch.cat(hfx.HFBackend(qmodel, tok).teacher_forced_logits(ref.encoder_ids, ref.decoder_ids))
    full = torch.cat(hfx.HFBackend(model, tok).teacher_forced_logits(ref.encoder_ids, ref.decoder_ids))
    if mode == "w8a8_sq":
        # int8 activations: a value within float rounding of a quantization boundary may round either way,
        # and later layers amplify such flips to the level of the quantization noise itself. So: layer by
        # layer (nearly) exact, end to end no further from float than the fake-quant model is.
        _assert_layers_match_fake_quant(model, qmodel, setup_batches(model, tok), comps)
        assert _rel(got, full) < 2 * _rel(fake, full)
    else:
        assert (got - fake).abs().max() < 2e-3 * fake.abs().max(), "runtime and ModelOpt fake-quant disagree"

    if mode != "w8a8_sq":  # weight-only: the same model as float weights dequantized from the checkpoint
        deq = _dequantized_hf(model, tr)
        want = torch.cat(hfx.HFBackend(deq, tok).teacher_forced_logits(ref.encoder_ids, ref.decoder_ids))
        assert (got - want).abs().max() < 1e-3 * want.abs().max()
    assert _rel(got, full) > 1e-3  # really quantized


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def setup_batches(model, tok):
    seqs = {lang: [hfx.greedy_translate(model, tok, d, 8, limit=8) for d in dirs]
            for lang, dirs in calibration_directions(["zh"], 3).items()}  # fmt: skip
    return language_batches(seqs, model.config.pad_token_id, 4)["zh"]


def _assert_layers_match_fake_quant(model, qmodel, batches, comps):
    """Each runtime layer equals ModelOpt's fake-quant module on real activations, bar rare rounding flips."""
    from calib.report import runtime_layers
    from calib.stats import observe, run_batches

    groups = mbart_linear_groups(model.config.encoder_layers, model.config.decoder_layers)
    layers, offsets = runtime_layers(comps, groups, "W8A8_SQ_PER_CHANNEL", EXCLUDE, 128)
    counts = {"off": 0, "all": 0}

    def check(g, i, x, y):
        start = offsets[g.key][i]
        ours = layers[g.key](x)[:, start : start + y.shape[1]]
        theirs = qmodel.get_submodule(g.members[i])(x)
        counts["off"] += int(((ours - theirs).abs() > 1e-4 * theirs.abs().max()).sum())
        counts["all"] += theirs.numel()

    with observe(model, [g for g in groups if g.key in layers], check) as set_batch:
        run_batches(model, set_batch, batches)
    # how many flips there are depends on the CPU's matmul kernels: 0.106% of outputs on one machine
    # (torch 2.13 CPU), under 0.1% on others; a wrong scale or layout puts most of them off
    assert counts["all"] > 0 and counts["off"] / counts["all"] < 2e-3, counts


def _dequantized_hf(model, tr):
    """A copy of the HF model whose quantized linears hold the runtime's dequantized weights (x * pqs folded in)."""
    import copy

    deq = copy.deepcopy(model)
    groups = mbart_linear_groups(model.config.encoder_layers, model.config.decoder_layers)
    comps = {"encoder": tr.encoder, "decoder": tr.decoder}
    with torch.no_grad():
        for g in groups:
            layer = comps[g.component].get_submodule(g.module)
            if type(layer) is Linear:
                continue
            w = layer.dequantized_weight(torch.float32)
            if hasattr(layer, "prequant_scaling_factor"):
                w = w * layer.prequant_scaling_factor.reshape(1, -1)
            for i, name in enumerate(g.members):
                rows = w.shape[0] // len(g.members)
                deq.get_submodule(name).weight.copy_(w[i * rows : (i + 1) * rows])
    return deq


def test_int8_greedy_output_agrees_with_full_precision(calibrated, hf, setup, tmp_path):
    from serve.runtime.quant import WeightOnlyInt8Linear
    from serve.runtime.translator import Translator

    loader, _, tok = hf
    comps, _ = calibrated("int8_wo")
    write_checkpoint(tmp_path / "q", comps, 1, loader, tok, {})
    write_checkpoint(tmp_path / "f", setup[1], 1, loader, tok, {})
    texts = real_sentences("zh", 12)
    translators = [Translator.load(tmp_path / d, device="cpu") for d in "qf"]
    outs = [tr.translate(texts, "zh", "en", max_new_tokens=8) for tr in translators]
    linear = next(m for m in translators[0].decoder.modules() if isinstance(m, WeightOnlyInt8Linear))
    # the checkpoint's [in, out] weight, stored in-contiguous for the decode kernels
    assert linear.weight.shape == (linear.in_features, linear.out_features)
    assert linear.weight.stride() == (1, linear.in_features)
    assert len(set(outs[1])) > 6, "the float model should not produce the same output for every sentence"
    agree = sum(a == b for a, b in zip(*outs, strict=True))
    assert agree >= 9, f"int8 weight-only agrees with float on only {agree}/12 sentences"


def test_cli_end_to_end_tp2_with_english_only_comparison(model_dir, tmp_path, capsys):
    from calib.__main__ import main

    out = tmp_path / "awq-tp2"
    argv = ["--langs", "zh,ru", "--quant", "int4_awq", "--model", str(model_dir), "--output", str(out),
            "--tp-size", "2", "--samples", "3", "--eval-samples", "3", "--max-new-tokens", "6",
            "--exclude", "*cross_attention.qkv", "--compare-english-only"]  # fmt: skip
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "better (lower KL)" in stdout and "zh-en" in stdout and "en-ru" in stdout and str(out) in stdout
    for name in ("encoder/rank0.safetensors", "encoder/rank1.safetensors", "decoder/rank1.safetensors",
                 "tokenizer", "languages.json", "conversion.json", "report.json", "report.md", "report.png"):  # fmt: skip
        assert (out / name).exists(), name
    quant = read_config(out / "decoder")["quantization"]
    assert quant["quant_algo"] == "W4A16_AWQ" and "*cross_attention.qkv" in quant["exclude_modules"]
    report = json.loads((out / "report.json").read_text())
    assert report["eval_backend"] == "runtime" and set(report["pairs"]) == {
        "zh-en",
        "en-zh",
        "ru-en",
        "en-ru",
    }
    for pair in report["pairs"].values():
        assert pair["better"] in ("per-language", "english-only", "tie")
        for variant in ("per_language", "english_only"):
            assert 0 <= pair[variant]["top1"] <= 1 and pair[variant]["kl"] >= -1e-6
    layers = report["variants"]["per_language"]["layer_error"]["zh"]
    assert "decoder/transformer.layers.0.cross_attention.qkv" not in layers
    assert 0 < layers["decoder/transformer.layers.0.self_attention.qkv"] < 0.5
    assert report["activations"]["ru"]["encoder/transformer.layers.0.mlp.fc"]["rows"] > 0
    assert report["size_bytes"]["quantized"] < report["size_bytes"]["float"]
    conversion = json.loads((out / "conversion.json").read_text())
    assert set(conversion["sha256"]) >= {"encoder/rank0.safetensors", "decoder/rank1.safetensors"}
    assert conversion["calibration"]["langs"] == ["zh", "ru"]
    assert not list(tmp_path.glob(".awq-tp2.*"))
