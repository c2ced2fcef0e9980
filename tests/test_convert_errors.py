"""Bad input to `python -m convert`: one line on stderr, non-zero exit, nothing left on disk."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert.loaders.mbart as mbart_loader
from convert.__main__ import main
from eval.data import PROJECT_ROOT


def assert_clean_failure(rc: int, stderr: str, out: Path, *needles: str) -> None:
    lines = stderr.strip().splitlines()
    assert rc != 0
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary dir left"


def run_main(capsys, *argv: str) -> tuple[int, str]:
    rc = main([*argv, "--quiet"])
    return rc, capsys.readouterr().err


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "convert", *argv],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def hf_copy(tiny_mbart_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_mbart_dir, tmp_path / "hf"))


def edit_weights(hf_dir: Path, edit) -> None:
    path = hf_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_unsupported_architecture_cli(tmp_path):
    hf = tmp_path / "gpt2"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    out = tmp_path / "out"
    proc = run_cli("--model", str(hf), "--output", str(out))
    assert_clean_failure(
        proc.returncode, proc.stderr, out, "GPT2LMHeadModel", "MBartForConditionalGeneration"
    )


def test_unknown_dtype_cli(tiny_mbart_dir, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("--model", str(tiny_mbart_dir), "--output", str(out), "--dtype", "int3")
    assert_clean_failure(proc.returncode, proc.stderr, out, "int3", "float16")


def test_tp_size_not_dividing_heads(capsys, tiny_mbart_dir, tmp_path):
    out = tmp_path / "out"
    rc, err = run_main(capsys, "--model", str(tiny_mbart_dir), "--output", str(out), "--tp-size", "3")
    assert_clean_failure(rc, err, out, "--tp-size 3", "encoder's attention heads (4)")


def test_output_exists_needs_overwrite(capsys, tiny_mbart_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = run_main(capsys, "--model", str(tiny_mbart_dir), "--output", str(out))
    assert rc != 0 and len(err.strip().splitlines()) == 1 and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"
    assert run_main(capsys, "--model", str(tiny_mbart_dir), "--output", str(out), "--overwrite")[0] == 0
    assert not (out / "keep.txt").exists() and (out / "decoder" / "rank0.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_model_dir_not_found(capsys, tmp_path):
    out = tmp_path / "out"
    rc, err = run_main(capsys, "--model", str(tmp_path / "nope"), "--output", str(out))
    assert_clean_failure(rc, err, out, "not found")


def test_missing_weight_file(capsys, hf_copy, tmp_path):
    (hf_copy / "model.safetensors").unlink()
    out = tmp_path / "out"
    rc, err = run_main(capsys, "--model", str(hf_copy), "--output", str(out))
    assert_clean_failure(rc, err, out, "cannot load weights")


def test_corrupt_weight_file(capsys, hf_copy, tmp_path):
    path = hf_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    out = tmp_path / "out"
    rc, err = run_main(capsys, "--model", str(hf_copy), "--output", str(out))
    assert_clean_failure(rc, err, out, "cannot load weights")


def test_missing_tensor(capsys, hf_copy, tmp_path):
    edit_weights(hf_copy, lambda t: t.pop("model.encoder.layers.1.fc2.weight"))
    out = tmp_path / "out"
    rc, err = run_main(capsys, "--model", str(hf_copy), "--output", str(out))
    assert_clean_failure(rc, err, out, "model.encoder.layers.1.fc2.weight")


def test_nonzero_final_logits_bias_refused(capsys, hf_copy, tmp_path):
    def bump(t):
        t["final_logits_bias"] = torch.full_like(t["final_logits_bias"], 0.5)

    edit_weights(hf_copy, bump)
    out = tmp_path / "out"
    rc, err = run_main(capsys, "--model", str(hf_copy), "--output", str(out))
    assert_clean_failure(rc, err, out, "final_logits_bias")


def test_failure_while_writing_leaves_nothing(capsys, tiny_mbart_dir, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(mbart_loader.MBartLoader, "write_extras", boom)
    out = tmp_path / "out"
    rc, err = run_main(capsys, "--model", str(tiny_mbart_dir), "--output", str(out))
    assert_clean_failure(rc, err, out, "disk full")
