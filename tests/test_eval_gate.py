"""The regression gate, run outputs and compare, on real reference sentences with known corruptions.

A stand-in backend "translates" by returning the (corrupted) reference of each source, so the
score differences between runs are known by construction; the real runtime is covered by
test_eval_e2e.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from sacrebleu.metrics import BLEU, CHRF

from eval import data as eval_data
from eval.__main__ import main
from eval.data import read_lines
from eval.regress import gate
from eval.results import load_results, read_hypotheses
from eval.run import evaluate, load_pair

PAIRS = ["zh-en", "en-zh", "de-en"]
N = 40


class StandIn:
    """Backend returning `corrupt(pair, index, reference)` for each source sentence."""

    max_concurrency = 1
    tokens_source = "whitespace words"
    model_id = "stand-in"

    def __init__(self, corrupt: Callable[[str, int, str], str]):
        self.corrupt = corrupt
        self.refs: dict[tuple[str, str], dict[str, tuple[int, str]]] = {}

    def check_languages(self, codes: list[str]) -> None:
        pass

    def translate(self, texts: list[str], src: str, tgt: str) -> tuple[list[str], int]:
        pair = f"{src}-{tgt}"
        if (src, tgt) not in self.refs:
            tp = load_pair(pair)
            self.refs[src, tgt] = {
                s: (i, r) for i, (s, r) in enumerate(zip(tp.sources, tp.references, strict=True))
            }
        hyps = [self.corrupt(pair, *self.refs[src, tgt][t]) for t in texts]
        return hyps, sum(len(h.split()) for h in hyps)

    def info(self) -> dict:
        return {
            "source": "checkpoint",
            "id": self.model_id,
            "checkpoint": "/nowhere/stand-in",
            "dtype": "float32",
        }


def mild(pair: str, i: int, ref: str) -> str:
    """The baseline system: drops the last word (or character, for Chinese) of every third sentence."""
    if i % 3:
        return ref
    return ref[:-1] if pair.endswith("zh") else " ".join(ref.split()[:-1])


def broken(pairs: set[str]) -> Callable[[str, int, str], str]:
    """Baseline, except that in `pairs` every other sentence is reversed word by word (a big drop)."""

    def corrupt(pair: str, i: int, ref: str) -> str:
        out = mild(pair, i, ref)
        if pair in pairs and i % 2 == 0:
            out = out[::-1] if pair.endswith("zh") else " ".join(reversed(out.split()))
        return out

    return corrupt


@pytest.fixture
def data(tmp_path, monkeypatch) -> Path:
    """A data root holding the first N real sentences of a few pairs."""
    root = tmp_path / "data"
    for pair in PAIRS:
        for path in eval_data.test_pair_paths(pair):  # imported via the module: pytest would collect test_*
            dst = root / "test" / "ntrex" / path.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text("\n".join(read_lines(path)[:N]) + "\n", encoding="utf-8")
    monkeypatch.setenv("MT_DATA_ROOT", str(root))
    return root


def make_run(out: Path, corrupt=mild, pairs=PAIRS, limit=None, tokenize=None, name=None) -> Path:
    settings = {"test_set": "ntrex", "limit": limit, "beam_size": 1, "batch_size": 8}
    tps = [load_pair(p, "ntrex", limit) for p in pairs]
    evaluate(StandIn(corrupt), tps, out, settings, name=name, tokenize_overrides=tokenize, progress=False)
    return out


def regress(capsys, baseline: Path, run: Path, *extra: str) -> tuple[int, str]:
    code = main(
        ["regress", "--baseline", str(baseline), "--run", str(run), "--bootstrap-samples", "200", *extra]
    )
    out = capsys.readouterr()
    return code, out.out + out.err


def rows_by(out: str) -> dict[tuple[str, str], list[str]]:
    """(pair, metric) -> cells of the printed gate table."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if (
            line.startswith("|")
            and len(cells) == 9
            and cells[0] not in ("pair",)
            and not cells[0].startswith("-")
        ):
            rows[cells[0], cells[1]] = cells
    return rows


@pytest.fixture
def baseline(data, tmp_path, capsys) -> Path:
    """A baseline created from the mild run through `regress --update`."""
    path = tmp_path / "baselines" / "base.json"
    code, out = regress(capsys, path, make_run(tmp_path / "base"), "--update")
    assert code == 0 and "baseline created" in out
    return path


def test_run_writes_json_markdown_chart_and_hypotheses(data, tmp_path):
    out = make_run(tmp_path / "run")
    doc = json.loads((out / "results.json").read_text())
    assert set(doc["pairs"]) == set(PAIRS)
    for pair, e in doc["pairs"].items():
        hyps = read_hypotheses(out / e["hypotheses_file"])
        refs = read_lines(data / "test" / "ntrex" / f"{pair}.{pair.split('-')[1]}")
        assert len(hyps) == e["sentences"] == N
        # any score can be recomputed from the stored hypotheses
        assert BLEU(tokenize=e["tokenize"]).corpus_score(hyps, [refs]).score == pytest.approx(
            e["bleu"], abs=1e-3
        )
        assert CHRF(word_order=2).corpus_score(hyps, [refs]).score == pytest.approx(e["chrf"], abs=1e-3)
        assert "tok:" + e["tokenize"] in e["signatures"]["bleu"] and "nw:2" in e["signatures"]["chrf"]
        assert len(e["data"]["reference"]["sha256"]) == 64
        assert e["throughput"]["output_tokens"] == sum(len(h.split()) for h in hyps)
    assert doc["environment"]["git"]["revision"]
    md = (out / "results.md").read_text()
    assert all(f"| {pair} | {N} |" in md for pair in PAIRS) and "Signatures:" in md
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_identical_run_passes_with_no_significant_difference(baseline, tmp_path, capsys):
    code, out = regress(capsys, baseline, make_run(tmp_path / "same"))
    assert code == 0 and "PASS" in out
    rows = rows_by(out)
    assert len(rows) == 2 * len(PAIRS)
    assert all(r[4] == "+0.00" and r[6] == "no" and r[8] == "ok" for r in rows.values())


def test_drop_past_tolerance_fails_and_is_significant(baseline, tmp_path, capsys):
    code, out = regress(capsys, baseline, make_run(tmp_path / "bad", broken({"de-en"})))
    assert code == 1 and "FAIL" in out
    rows = rows_by(out)
    for metric in ("BLEU", "chrF++"):
        assert rows["de-en", metric][8] == "FAIL" and rows["de-en", metric][6] == "yes"
        assert float(rows["de-en", metric][4]) < -0.5
        assert rows["zh-en", metric][8] == rows["en-zh", metric][8] == "ok"


def test_tolerance_boundary_and_per_pair_tolerance(baseline, tmp_path, capsys):
    run = make_run(tmp_path / "bad", broken({"zh-en"}))
    rows = gate(load_results(baseline), load_results(run), n_samples=100)
    drop = max(r.baseline - r.now for r in rows if r.pair == "zh-en")
    assert drop > 1
    code, out = regress(capsys, baseline, run, "--tolerance", f"{drop + 0.01:.4f}")
    assert code == 0, out
    code, out = regress(
        capsys,
        baseline,
        run,
        "--tolerance",
        f"{drop + 0.01:.4f}",
        "--pair-tolerance",
        f"zh-en={drop - 0.01:.4f}",
    )
    assert code == 1 and rows_by(out)["zh-en", "BLEU"][7] == f"{drop - 0.01:.2f}"
    code, out = regress(capsys, baseline, run, "--pair-tolerance", f"zh-en={drop + 0.01:.4f}")
    assert code == 0, out


def test_missing_pair_fails(baseline, tmp_path, capsys):
    code, out = regress(capsys, baseline, make_run(tmp_path / "partial", pairs=["zh-en", "en-zh"]))
    assert code == 1
    assert rows_by(out)["de-en", "-"][8] == "MISSING"


@pytest.mark.parametrize("change", ["sentences", "tokenizer", "reference"])
def test_signature_mismatch_is_an_error_not_a_pass(baseline, data, tmp_path, capsys, change):
    if change == "sentences":
        run = make_run(tmp_path / "run", limit=N - 5)
    elif change == "tokenizer":
        run = make_run(tmp_path / "run", tokenize={"en": "intl"})
    else:  # the test set changed under the baseline's feet
        ref = data / "test" / "ntrex" / "zh-en.en"
        lines = read_lines(ref)
        ref.write_text("\n".join(["An edited reference.", *lines[1:]]) + "\n", encoding="utf-8")
        run = make_run(tmp_path / "run")
    code, out = regress(capsys, baseline, run)
    assert code == 1
    rows = rows_by(out)
    mismatched = {pair for (pair, metric), r in rows.items() if r[8] == "MISMATCH"}
    assert mismatched == (
        {"zh-en"} if change == "reference" else {"zh-en", "de-en"} if change == "tokenizer" else set(PAIRS)
    )
    expected = {
        "sentences": "sentences 40 vs 35",
        "tokenizer": "tok 13a vs intl",
        "reference": "reference sha256",
    }
    assert expected[change] in out


def test_update_is_required_to_move_the_baseline(baseline, tmp_path, capsys):
    before = baseline.read_bytes()
    bad = make_run(tmp_path / "bad", broken({"de-en"}))
    assert regress(capsys, baseline, bad)[0] == 1
    assert baseline.read_bytes() == before
    code, out = regress(capsys, baseline, bad, "--update")
    assert code == 0 and "baseline updated" in out and "de-en: BLEU" in out
    assert baseline.read_bytes() != before
    stored = json.loads(baseline.read_text())
    assert stored["kind"] == "mt-eval-baseline" and "hypotheses" in stored["pairs"]["de-en"]
    assert regress(capsys, baseline, bad)[0] == 0  # the moved baseline now gates against the new level


def test_baseline_is_self_contained(baseline, tmp_path, capsys):
    """The baseline keeps its hypotheses: deleting the run it came from does not matter."""
    import shutil

    shutil.rmtree(tmp_path / "base")
    assert regress(capsys, baseline, make_run(tmp_path / "again"))[0] == 0


def test_missing_baseline_without_update_is_an_error(data, tmp_path, capsys):
    code, out = regress(capsys, tmp_path / "nope.json", make_run(tmp_path / "run"))
    assert code == 2 and "--update" in out and not (tmp_path / "nope.json").exists()
    assert len(out.strip().splitlines()) == 1


def test_tampered_hypotheses_are_rejected(baseline, tmp_path, capsys):
    run = make_run(tmp_path / "run")
    hyp = run / "hypotheses" / "zh-en.en"
    hyp.write_text(hyp.read_text().replace("a", "b", 1))
    code, out = regress(capsys, baseline, run)
    assert code == 2 and "sha256" in out


def test_compare_tables_and_chart(data, tmp_path, capsys):
    a = make_run(tmp_path / "a", name="fp16")
    b = make_run(tmp_path / "b", broken({"de-en"}), name="int4_awq")
    c = make_run(tmp_path / "c", tokenize={"en": "intl"}, name="other-tok")
    assert main(["compare", str(a), str(b / "results.json"), str(c), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "BLEU fp16" in out and "BLEU int4_awq" in out
    de_row = next(line for line in out.splitlines() if line.startswith("| de-en"))
    assert "(-" in de_row  # the broken system shows its drop against the first
    assert "zh-en: other-tok is not comparable to fp16: BLEU tok 13a vs intl" in out
    assert (tmp_path / "cmp" / "compare.md").read_text() in out
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_require_significant_lets_a_noise_sized_drop_pass(baseline, tmp_path, capsys):
    def one_word_off(pair: str, i: int, ref: str) -> str:
        out = mild(pair, i, ref)
        return out.replace(" the ", " a ", 1) if pair == "de-en" and i == 1 else out

    run = make_run(tmp_path / "noise", one_word_off)
    code, out = regress(capsys, baseline, run, "--tolerance", "0", "--metrics", "bleu")
    row = rows_by(out)["de-en", "BLEU"]
    assert code == 1 and row[8] == "FAIL" and row[6] == "no" and float(row[4]) < 0
    code, out = regress(
        capsys, baseline, run, "--tolerance", "0", "--metrics", "bleu", "--require-significant"
    )
    assert code == 0 and rows_by(out)["de-en", "BLEU"][8] == "ok (drop not significant)"
