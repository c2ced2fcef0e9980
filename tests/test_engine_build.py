"""`python -m convert.build`: trtllm-build command construction, overrides, dry-run text, errors,
and the full build path against a stand-in trtllm-build script (TensorRT-LLM is not installed here).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from convert import build
from convert.build import main, plan_build
from convert.checkpoint import read_config

QUANT = {
    None: {"quant_algo": None, "kv_cache_quant_algo": None},
    "W8A16": {"quant_algo": "W8A16", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]},
    "W4A16_AWQ": {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None, "group_size": 128,
                  "has_zero_point": False, "pre_quant_scale": True, "exclude_modules": ["lm_head"]},
    "W8A8_SQ_PER_CHANNEL": {"quant_algo": "W8A8_SQ_PER_CHANNEL", "kv_cache_quant_algo": None},
}  # fmt: skip


def component_config(name: str, quant: str | None, tp: int, dtype: str) -> dict:
    """config.json with the keys of design doc section 2 (mBART-large-50 values)."""
    cfg = {
        "architecture": "EncoderModel" if name == "encoder" else "DecoderModel",
        "dtype": dtype, "logits_dtype": "float32", "num_hidden_layers": 12, "num_attention_heads": 16,
        "num_key_value_heads": 16, "head_size": 64, "hidden_size": 1024, "intermediate_size": 4096,
        "vocab_size": 250054, "max_position_embeddings": 1024, "norm_epsilon": 1e-5,
        "position_embedding_type": "learned_absolute", "hidden_act": "gelu", "quantization": QUANT[quant],
        "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1}, "use_parallel_embedding": False,
        "embedding_sharding_dim": 0, "has_position_embedding": True, "has_embedding_layernorm": True,
        "has_embedding_scale": True, "has_attention_qkvo_bias": True, "has_mlp_bias": True,
        "has_model_final_layernorm": True, "layernorm_type": 0, "layernorm_position": 0, "mlp_type": 0,
        "q_scaling": 1.0, "relative_attention": False, "max_distance": 0, "num_buckets": 0, "gated_act": False,
        "model_type": "bart",
    }  # fmt: skip
    if name == "decoder":
        cfg.update(
            rescale_before_lm_head=False, encoder_hidden_size=1024, encoder_num_heads=16, encoder_head_size=64,
            skip_cross_kv=False, use_implicit_relative_attention=False, decoder_start_token_id=2,
            eos_token_id=2, bos_token_id=0, pad_token_id=1,
        )  # fmt: skip
    return cfg


def make_checkpoint(root: Path, quant: str | None = None, tp: int = 1, dtype: str = "float16") -> Path:
    for name in ("encoder", "decoder"):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps(component_config(name, quant, tp, dtype)))
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "tokenizer_config.json").write_text("{}")
    (root / "languages.json").write_text(json.dumps({"eos_token_id": 2, "pad_token_id": 1, "languages": []}))
    return root


def flags_of(argv: list[str]) -> dict[str, str]:
    """`--key value` pairs of a command (bare flags map to '')."""
    out, i = {}, 1
    while i < len(argv):
        key = argv[i][2:]
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out[key], i = argv[i + 1], i + 2
        else:
            out[key], i = "", i + 1
    return out


COMMON = {
    "max_batch_size": "64", "max_beam_width": "4", "max_num_tokens": "4096", "gemm_plugin": "float16",
    "bert_attention_plugin": "float16", "gpt_attention_plugin": "float16", "context_fmha": "enable",
    "remove_input_padding": "enable",
}  # fmt: skip


@pytest.mark.parametrize(
    ("quant", "tp"), [(None, 1), (None, 2), ("W8A16", 1), ("W8A16", 2), ("W4A16_AWQ", 1), ("W4A16_AWQ", 2)]
)
def test_every_flag_from_the_checkpoint(tmp_path: Path, quant: str | None, tp: int):
    ckpt = make_checkpoint(tmp_path / "ckpt", quant, tp)
    plan = plan_build(ckpt, tmp_path / "eng")
    eng = (tmp_path / "eng").resolve()
    staged = quant == "W8A16"  # plain int8 weights go through TRT-LLM's preprocessing first
    workers = {"workers": "2"} if tp == 2 else {}
    for name in ("encoder", "decoder"):
        src = eng / ".staging" / name if staged else ckpt.resolve() / name
        expected = {"checkpoint_dir": str(src), "output_dir": str(eng / name), **COMMON, **workers}
        if name == "encoder":
            expected.update(max_input_len="1024", max_seq_len="1024", paged_kv_cache="disable")
        else:
            expected.update(
                max_input_len="2", max_seq_len="1024", max_encoder_input_len="1024", paged_kv_cache="enable"
            )
        argv = plan.argv(name)
        assert argv[0] == "trtllm-build"
        assert flags_of(argv) == expected
    assert plan.staged is staged


def test_bfloat16_and_float32_plugins(tmp_path: Path):
    bf16 = plan_build(make_checkpoint(tmp_path / "bf16", dtype="bfloat16"), tmp_path / "e1")
    f = flags_of(bf16.argv("decoder"))
    assert (f["gemm_plugin"], f["gpt_attention_plugin"], f["bert_attention_plugin"]) == ("bfloat16",) * 3
    fp32 = plan_build(make_checkpoint(tmp_path / "fp32", dtype="float32"), tmp_path / "e2")
    f = flags_of(fp32.argv("encoder"))
    assert (f["gemm_plugin"], f["context_fmha"]) == ("float32", "disable")  # no fp32 FMHA kernels


def test_smoothquant_needs_no_extra_flags(tmp_path: Path):
    plan = plan_build(make_checkpoint(tmp_path / "ckpt", "W8A8_SQ_PER_CHANNEL"), tmp_path / "eng")
    assert not plan.staged
    assert {k: v for k, v in flags_of(plan.argv("decoder")).items() if k in COMMON} == COMMON


def test_explicit_flags_and_set_override(tmp_path: Path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    cli = {"max_batch_size": 16, "max_beam_width": 1, "max_input_len": 512, "max_seq_len": 300,
           "max_num_tokens": 2048, "decoder_max_input_len": 3}  # fmt: skip
    sets = ["decoder.max_num_tokens=8192", "gemm_plugin=disable", "--multiple-profiles=enable",
            "encoder.context_fmha=", "strip_plan=true", "decoder.max_beam_width=2"]  # fmt: skip
    plan = plan_build(ckpt, tmp_path / "eng", cli, sets)
    enc, dec = flags_of(plan.argv("encoder")), flags_of(plan.argv("decoder"))
    assert (enc["max_batch_size"], enc["max_input_len"], enc["max_seq_len"], enc["max_num_tokens"]) == (
        "16", "512", "512", "2048",
    )  # fmt: skip
    assert (dec["max_input_len"], dec["max_seq_len"], dec["max_encoder_input_len"]) == ("3", "300", "512")
    assert (dec["max_num_tokens"], dec["max_beam_width"], enc["max_beam_width"]) == ("8192", "2", "1")
    assert enc["gemm_plugin"] == dec["gemm_plugin"] == "disable"
    assert enc["multiple_profiles"] == dec["multiple_profiles"] == "enable"
    assert "context_fmha" not in enc and dec["context_fmha"] == "enable"
    assert enc["strip_plan"] == "" and plan.argv("encoder")[-1] == "--strip_plan"


def test_encoder_lengths_stay_equal_unless_both_set(tmp_path: Path):
    ckpt = make_checkpoint(tmp_path / "ckpt")
    plan = plan_build(ckpt, tmp_path / "e", sets=["encoder.max_input_len=256"])
    f = flags_of(plan.argv("encoder"))
    assert (f["max_input_len"], f["max_seq_len"]) == ("256", "256")
    plan = plan_build(ckpt, tmp_path / "e", sets=["encoder.max_input_len=256", "encoder.max_seq_len=300"])
    assert flags_of(plan.argv("encoder"))["max_seq_len"] == "300"


def test_dry_run_prints_exact_stable_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    ckpt = make_checkpoint(tmp_path / "my ckpt", "W8A16", tp=2)
    eng = tmp_path / "eng"
    args = ["--checkpoint", str(ckpt), "--output", str(eng), "--dry-run", "--max-batch-size", "8"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    c, e = ckpt.resolve(), eng.resolve()
    common = ("--max_batch_size 8 --max_beam_width 4 {lens} --max_num_tokens 4096 --gemm_plugin float16 "
              "--bert_attention_plugin float16 --gpt_attention_plugin float16 --context_fmha enable "
              "--remove_input_padding enable --paged_kv_cache {paged} --workers 2")  # fmt: skip
    expected = "\n".join([
        "# encoder: EncoderModel, dtype=float16, quant_algo=W8A16, tp_size=2 (trtllm-build builds all 2 rank(s))",
        f"# stage {c}/encoder -> {e}/.staging/encoder: int8 weights through tensorrt_llm "
        "preprocess_weights_for_mixed_gemm (on the target GPU)",
        f"trtllm-build --checkpoint_dir {e}/.staging/encoder --output_dir {e}/encoder "
        + common.format(lens="--max_input_len 1024 --max_seq_len 1024", paged="disable"),
        "# decoder: DecoderModel, dtype=float16, quant_algo=W8A16, tp_size=2 (trtllm-build builds all 2 rank(s))",
        f"# stage {c}/decoder -> {e}/.staging/decoder: int8 weights through tensorrt_llm "
        "preprocess_weights_for_mixed_gemm (on the target GPU)",
        f"trtllm-build --checkpoint_dir {e}/.staging/decoder --output_dir {e}/decoder "
        + common.format(lens="--max_input_len 2 --max_seq_len 1024 --max_encoder_input_len 1024", paged="enable"),
    ]) + "\n"  # fmt: skip
    assert first == expected
    assert not eng.exists()


def test_dry_run_quotes_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    ckpt = make_checkpoint(tmp_path / "a b")
    assert main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "o"), "--dry-run"]) == 0
    commands = [ln for ln in capsys.readouterr().out.splitlines() if not ln.startswith("#")]
    assert shlex.split(commands[0])[2] == str(ckpt.resolve() / "encoder")
    assert "'" in commands[0]


def test_missing_trtllm_build_exits_2_with_one_line(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    ckpt = make_checkpoint(tmp_path / "ckpt")
    assert main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "eng")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "error: trtllm-build not found on PATH (install TensorRT-LLM, or use --dry-run)\n"
    assert not (tmp_path / "eng").exists()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (None, "checkpoint directory .* does not exist"),
        (lambda c: (c / "decoder" / "config.json").unlink(), "not a TensorRT-LLM encoder-decoder checkpoint"),
        (lambda c: (c / "encoder" / "config.json").write_text('{"architecture": "LlamaForCausalLM"}'),
         "architecture is 'LlamaForCausalLM', expected 'EncoderModel'"),
        (lambda c: (c / "encoder" / "config.json").write_text("{not json"), "cannot read"),
    ],
)  # fmt: skip
def test_bad_checkpoint_is_one_line_nonzero(tmp_path: Path, capsys, mutate, message: str):
    ckpt = tmp_path / "ckpt"
    if mutate is not None:
        make_checkpoint(ckpt)
        mutate(ckpt)
    assert main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "eng"), "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err)


def test_other_bad_input(tmp_path: Path, capsys):
    mixed = make_checkpoint(tmp_path / "mixed", tp=2)
    cfg = json.loads((mixed / "encoder" / "config.json").read_text())
    cfg["mapping"] = {"world_size": 1, "tp_size": 1, "pp_size": 1}
    (mixed / "encoder" / "config.json").write_text(json.dumps(cfg))
    ok = make_checkpoint(tmp_path / "ok")
    for ckpt, args, message in [
        (mixed, [], "encoder tp_size 1 != decoder tp_size 2"),
        (ok, ["--set", "max_batch_size"], "bad --set 'max_batch_size'"),
        (ok, ["--set", "other.max_batch_size=1"], "bad --set"),
        (ok, ["--set", "output_dir=/x"], "--set output_dir is not allowed"),
        (ok, ["--max-seq-len", "2"], "leaves no room to generate"),
        (ok, ["--max-batch-size", "0"], "max_batch_size must be positive"),
    ]:
        assert main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "e"), "--dry-run", *args]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_help_explains(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for needle in (
        "trtllm-build",
        "--dry-run",
        "--set",
        "build_info.json",
        "W8A16",
        "[decoder_start, <tgt_lang>]",
    ):
        assert needle in text


# --- the real build path, with a stand-in trtllm-build --------------------------------------


def fake_trtllm_build(bin_dir: Path, exit_code: int = 0) -> Path:
    """An executable that records its argv and the rank0 tensors it was given, like a build would read them."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    script = bin_dir / "trtllm-build"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, shutil, sys\n"
        "from pathlib import Path\n"
        "a = sys.argv[1:]\n"
        "src, out = Path(a[a.index('--checkpoint_dir') + 1]), Path(a[a.index('--output_dir') + 1])\n"
        "out.mkdir(parents=True, exist_ok=True)\n"
        "(out / 'argv.json').write_text(json.dumps(a))\n"
        "shutil.copy(src / 'rank0.safetensors', out / 'seen_rank0.safetensors')\n"
        "(out / 'rank0.engine').write_bytes(b'')\n"
        f"sys.exit({exit_code})\n"
    )
    script.chmod(0o755)
    return bin_dir


def write_weights(ckpt: Path, quant: str | None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    tensors = {"transformer.layers.0.mlp.fc.bias": torch.randn(16).half()}
    if quant == "W8A16":
        tensors["transformer.layers.0.mlp.fc.weight"] = torch.randint(-127, 127, (32, 16), dtype=torch.int8)
        tensors["transformer.layers.0.mlp.fc.per_channel_scale"] = torch.rand(16)  # fp32: cast to the dtype
        tensors["lm_head.weight"] = torch.randn(8, 32).half()  # excluded from quantization
    else:
        tensors["transformer.layers.0.mlp.fc.weight"] = torch.randn(16, 32).half()
    for name in ("encoder", "decoder"):
        save_file(tensors, str(ckpt / name / "rank0.safetensors"))
    return tensors


def test_full_build_makes_a_self_contained_engine_dir(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("PATH", str(fake_trtllm_build(tmp_path / "bin")) + os.pathsep + os.environ["PATH"])
    ckpt = make_checkpoint(tmp_path / "ckpt")
    write_weights(ckpt, None)
    eng = tmp_path / "eng"
    assert main(["--checkpoint", str(ckpt), "--output", str(eng), "--max-beam-width", "2"]) == 0
    plan = plan_build(ckpt, eng, {"max_beam_width": 2})
    for name in ("encoder", "decoder"):
        assert json.loads((eng / name / "argv.json").read_text()) == plan.argv(name)[1:]
    assert (eng / "tokenizer" / "tokenizer_config.json").is_file()
    assert json.loads((eng / "languages.json").read_text())["eos_token_id"] == 2
    info = json.loads((eng / "build_info.json").read_text())
    assert info["checkpoint"] == str(ckpt.resolve())
    assert info["commands"]["decoder"] == plan.argv("decoder")
    assert info["settings"]["max_beam_width"] == 2 and info["weight_preprocessing"] is None
    assert info["special_tokens"] == {"decoder_start_token_id": 2, "eos_token_id": 2, "bos_token_id": 0,
                                      "pad_token_id": 1}  # fmt: skip
    assert set(info["checkpoint_files"]) == {"encoder/rank0.safetensors", "decoder/rank0.safetensors"}
    assert capsys.readouterr().out.rstrip().endswith(f"engines written to {eng.resolve()}")


def test_w8a16_weights_are_staged_through_the_preprocessor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    ckpt = make_checkpoint(tmp_path / "ckpt", "W8A16")
    original = write_weights(ckpt, "W8A16")
    plan = plan_build(ckpt, tmp_path / "eng")
    calls = []

    def factory(dtype: str):
        calls.append(dtype)
        return lambda w: torch.flip(w, dims=[0]).contiguous()  # stands in for TRT-LLM's layout transform

    exe = str(fake_trtllm_build(tmp_path / "bin") / "trtllm-build")
    build.run_build(plan, exe, preprocessor_factory=factory)
    assert calls == ["float16"]
    seen = load_file(str(tmp_path / "eng" / "decoder" / "seen_rank0.safetensors"))
    w = "transformer.layers.0.mlp.fc.weight"
    assert torch.equal(seen[w], torch.flip(original[w], dims=[0]))
    assert seen["transformer.layers.0.mlp.fc.per_channel_scale"].dtype == torch.float16
    assert torch.equal(seen["lm_head.weight"], original["lm_head.weight"])
    assert torch.equal(seen["transformer.layers.0.mlp.fc.bias"], original["transformer.layers.0.mlp.fc.bias"])
    info = json.loads((tmp_path / "eng" / "build_info.json").read_text())
    assert info["weight_preprocessing"]["tensors"] == {"encoder": [w], "decoder": [w]}
    assert not (tmp_path / "eng" / ".staging").exists()


def test_w8a16_without_tensorrt_llm_exits_2(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    monkeypatch.setenv("PATH", str(fake_trtllm_build(tmp_path / "bin")) + os.pathsep + os.environ["PATH"])
    ckpt = make_checkpoint(tmp_path / "ckpt", "W8A16")
    write_weights(ckpt, "W8A16")
    assert main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "eng")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: W8A16 weights need tensorrt_llm to preprocess") and err.count("\n") == 1


def test_failed_trtllm_build_or_missing_weights_exit_1(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv(
        "PATH", str(fake_trtllm_build(tmp_path / "bin", exit_code=3)) + os.pathsep + os.environ["PATH"]
    )
    ckpt = make_checkpoint(tmp_path / "ckpt", tp=2)
    assert main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "eng")]) == 1
    assert "lacks rank0.safetensors (world_size 2)" in capsys.readouterr().err
    ckpt = make_checkpoint(tmp_path / "ckpt1")
    write_weights(ckpt, None)
    assert main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "eng1")]) == 1
    assert capsys.readouterr().err.endswith(
        "error: trtllm-build failed for the encoder (exit 3); its log is above\n"
    )
    assert not (tmp_path / "eng1" / "build_info.json").exists()


def test_real_converted_checkpoint(tiny_ckpt_factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The converter's output (tiny mBART, TP 2, fp16) builds, and the engine dir serves its own tokenizer."""
    from serve.tokenizer import TranslationTokenizer

    ckpt = tiny_ckpt_factory(2, "float16")
    plan = plan_build(ckpt, tmp_path / "eng")
    enc, dec = flags_of(plan.argv("encoder")), flags_of(plan.argv("decoder"))
    max_pos = str(read_config(ckpt / "encoder")["max_position_embeddings"])
    assert (enc["max_input_len"], enc["max_seq_len"], enc["workers"]) == (max_pos, max_pos, "2")
    assert (dec["max_input_len"], dec["max_seq_len"], dec["gemm_plugin"]) == ("2", max_pos, "float16")
    monkeypatch.setenv("PATH", str(fake_trtllm_build(tmp_path / "bin")) + os.pathsep + os.environ["PATH"])
    assert main(["--checkpoint", str(ckpt), "--output", str(tmp_path / "eng")]) == 0
    tok = TranslationTokenizer(tmp_path / "eng")
    assert tok.decoder_prefix(tok.language("zh")) == [2, tok.language("zh").token_id]
    info = json.loads((tmp_path / "eng" / "build_info.json").read_text())
    assert set(info["checkpoint_files"]) == {
        f"{c}/rank{r}.safetensors" for c in ("encoder", "decoder") for r in (0, 1)
    }
