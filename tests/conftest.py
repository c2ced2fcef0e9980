"""Session fixtures: a tiny random mBART with a sentencepiece tokenizer trained on shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its CPU interpreter (must be set before import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from eval.data import data_root, read_lines, test_pair_paths

# Languages whose real sentences the parity tests use.
PARITY_LANGS = ["en", "zh", "ar", "ru", "hi", "de", "sw"]


def pytest_configure(config):
    if not (data_root() / "test").is_dir():
        raise pytest.UsageError(f"shared data not found at {data_root()} (set MT_DATA_ROOT)")


@pytest.fixture(scope="session")
def tiny_mbart_dir(tmp_path_factory) -> Path:
    """HF directory of a tiny random MBartForConditionalGeneration + MBart50Tokenizer."""
    from convert.tiny import build_tiny_mbart

    return build_tiny_mbart(tmp_path_factory.mktemp("tiny_mbart"))


def real_sentences(lang: str, n: int, offset: int = 0) -> list[str]:
    """`n` real sentences in `lang` from the test set (source side of `<lang>-en`, or en-zh for en)."""
    pair = "en-zh" if lang == "en" else f"{lang}-en"
    return read_lines(test_pair_paths(pair)[0])[offset : offset + n]


@pytest.fixture(scope="session")
def tiny_ckpt_factory(tiny_mbart_dir, tmp_path_factory):
    """`make(tp=1, dtype="float32")` -> the tiny mBART converted to a TRT-LLM checkpoint (cached)."""
    from convert.__main__ import convert_checkpoint

    cache: dict[tuple[int, str], Path] = {}

    def make(tp: int = 1, dtype: str = "float32") -> Path:
        if (tp, dtype) not in cache:
            out = tmp_path_factory.mktemp("ckpt") / f"tiny-tp{tp}-{dtype}"
            cache[tp, dtype] = convert_checkpoint(str(tiny_mbart_dir), out, tp, dtype, progress=False)
        return cache[tp, dtype]

    return make


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_ckpt_factory) -> Path:
    """The tiny mBART converted with TP=1 in float32."""
    return tiny_ckpt_factory(1, "float32")


@pytest.fixture
def kernel_device(monkeypatch) -> str:
    """Where the Triton kernels run: the GPU, or CPU tensors in Triton's interpreter."""
    from serve.runtime import kernels

    if kernels.triton is None:
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        return "cuda"
    monkeypatch.setattr(kernels, "CPU_INTERPRETER", True)
    return "cpu"


@pytest.fixture(scope="session")
def shortlisted_ckpt(tiny_ckpt, tmp_path_factory) -> Path:
    """A copy of the tiny checkpoint with output-vocabulary shortlists for en, zh and ar (built by the CLI)."""
    import shutil

    from calib import shortlist

    ckpt = tmp_path_factory.mktemp("shortlist") / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    argv = ["--checkpoint", str(ckpt), "--langs", "en,zh,ar", "--agreement-samples", "3", "--device", "cpu"]
    assert shortlist.main([*argv, "--quiet"]) == 0
    return ckpt
