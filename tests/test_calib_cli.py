"""`python -m calib`: --help, and every bad input gives one clear line on stderr with nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest

from calib.__main__ import main
from eval.data import calib_path, data_root


def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def _args(
    out: Path, model: str = "unused-model-dir/x/y", langs: str = "zh", quant: str = "int8_wo", *extra: str
):
    return ["--langs", langs, "--quant", quant, "--model", model, "--output", str(out), "--quiet", *extra]


def _nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "a staging directory was left behind"


def test_help_lists_modes(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for word in (
        "int8_wo",
        "int4_awq",
        "w8a8_sq",
        "--compare-english-only",
        "--exclude",
        "--tp-size",
        "--alpha",
    ):
        assert word in text


def test_unknown_quant_mode_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--langs", "zh", "--quant", "fp8", "--model", "m", "--output", "o"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "invalid choice: 'fp8'" in err and "\n" not in err


@pytest.mark.parametrize(
    ("langs", "extra", "message"),
    [
        ("xx", [], "no calibration corpus for language 'xx'"),
        ("zh,en", [], "'en' is the pivot"),
        ("zh", ["--samples", "5000"], "has 1040 sentences; calibration needs 5000"),
        ("zh", ["--alpha", "1.5"], "--alpha must be in [0, 1]"),
        ("zh", ["--eval-samples", "0"], "--eval-samples must be >= 1"),
        ("zh", ["--tp-size", "0"], "--tp-size must be >= 1"),
    ],
)
def test_bad_options_and_languages(tmp_path, capsys, langs, extra, message):
    out = tmp_path / "out"
    code, err = _run(capsys, *_args(out, langs=langs), *extra)
    assert code == 1 and message in err and err.count("\n") == 0, err
    _nothing_written(out)


def test_unknown_language_lists_available(tmp_path, capsys):
    code, err = _run(capsys, *_args(tmp_path / "out", langs="xx"))
    assert code == 1 and "available: ar, de, es" in err


def test_missing_and_short_corpora_name_the_file(tmp_path, capsys, monkeypatch):
    root = tmp_path / "data"
    (root / "calib").mkdir(parents=True)
    en = calib_path("en").read_text(encoding="utf-8").splitlines()
    (root / "calib" / "en.txt").write_text("\n".join(en[:50]) + "\n", encoding="utf-8")
    (root / "calib" / "zh.txt").write_text("一句话。\n两句话。\n", encoding="utf-8")
    monkeypatch.setenv("MT_DATA_ROOT", str(root))
    out = tmp_path / "out"
    code, err = _run(capsys, *_args(out, langs="ar"))
    assert code == 1 and "no calibration corpus for language 'ar'" in err and "available: zh" in err
    code, err = _run(capsys, *_args(out, langs="zh", quant="int8_wo"), "--samples", "10")
    assert code == 1 and f"{root / 'calib' / 'zh.txt'} has 2 sentences; calibration needs 10" in err
    code, err = _run(capsys, *_args(out, langs="zh"), "--samples", "2")
    assert code == 1 and "held-out evaluation file" in err and "not found" in err
    _nothing_written(out)
    assert data_root() == root


def test_existing_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _run(capsys, *_args(out))
    assert code == 1 and "already exists; pass --overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_missing_model_directory(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run(capsys, *_args(out, model=str(tmp_path / "nope")))
    assert code == 1 and "not found" in err
    _nothing_written(out)


@pytest.mark.parametrize(
    ("quant", "extra", "message"),
    [
        ("int8_wo", ["--exclude", "dense"], "--exclude 'dense' matches no linear layer"),
        ("int4_awq", [], "is not a multiple of the AWQ group size 128"),
        ("int8_wo", ["--tp-size", "3"], "does not divide"),
    ],
)
def test_model_dependent_errors(tiny_mbart_dir, tmp_path, capsys, quant, extra, message):
    out = tmp_path / "out"
    code, err = _run(capsys, *_args(out, model=str(tiny_mbart_dir), quant=quant), "--samples", "2", *extra)
    assert code == 1 and message in err, err
    _nothing_written(out)
