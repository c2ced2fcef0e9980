"""Tokenizer choice per target language, checked by the scores it produces; the bootstrap wrapper."""

from __future__ import annotations

import math
import re

import pytest
from sacrebleu.metrics import BLEU

from eval import data as eval_data
from eval import metrics
from eval.metrics import bleu_tokenizer, paired_bootstrap, score_corpus, signature_differences


def refs(pair: str, n: int = 6) -> list[str]:
    return eval_data.read_lines(eval_data.test_pair_paths(pair)[1])[:n]


def replace_char(text: str, index: int) -> str:
    """`text` with the CJK character at `index` replaced by a different CJK character."""
    new = "丁" if text[index] != "丁" else "七"
    return text[:index] + new + text[index + 1 :]


def test_chinese_target_one_character_off_scores_as_character_bleu():
    """One wrong character in L CJK characters: with the zh tokenizer each character is a token,
    so the n-gram precisions are (L-n+1-n)/(L-n+1); with 13a the run is a single token (BLEU 0)."""
    run = max(re.findall(r"[\u4e00-\u9fff]+", " ".join(refs("en-zh", 40))), key=len)
    assert len(run) >= 12
    hyp = replace_char(run, len(run) // 2)
    L = len(run)
    expected = 100 * math.exp(sum(math.log((L - n + 1 - n) / (L - n + 1)) for n in range(1, 5)) / 4)
    score = score_corpus([hyp], [run], bleu_tokenizer("zh"))
    assert score.tokenize == "zh" and "tok:zh" in score.signatures["bleu"]
    assert score.bleu == pytest.approx(expected, abs=1e-3)
    assert BLEU(tokenize="13a").corpus_score([hyp], [[run]]).score == 0.0


def test_chinese_corpus_score_differs_from_13a():
    references = refs("en-zh")
    hyps = [replace_char(references[0], 3), *references[1:]]
    ours = score_corpus(hyps, references, bleu_tokenizer("zh")).bleu
    assert ours == pytest.approx(BLEU(tokenize="zh").corpus_score(hyps, [references]).score, abs=1e-3)
    assert abs(ours - BLEU(tokenize="13a").corpus_score(hyps, [references]).score) > 1


def test_english_target_uses_13a():
    references = refs("zh-en")
    hyps = [references[0].replace(" ", "  ").replace(".", " ."), *references[1:]]  # 13a splits the period
    score = score_corpus(hyps, references, bleu_tokenizer("en"))
    assert score.tokenize == "13a" and score.bleu == pytest.approx(100.0)
    assert BLEU(tokenize="none").corpus_score(hyps, [references]).score < 100


@pytest.mark.parametrize(("mecab", "expected"), [(True, "ja-mecab"), (False, "char")])
def test_japanese_uses_mecab_when_installed_else_characters(monkeypatch, mecab, expected):
    monkeypatch.setattr(metrics, "tokenizer_available", lambda name: mecab or name == "char")
    assert bleu_tokenizer("ja") == expected


def test_japanese_fallback_scores_characters():
    references = refs("en-ja")
    hyps = [replace_char(references[0], 2), *references[1:]]
    tok = "char" if not metrics.tokenizer_available("ja-mecab") else "ja-mecab"
    score = score_corpus(hyps, references, bleu_tokenizer("ja"))
    assert score.tokenize == tok
    assert score.bleu == pytest.approx(BLEU(tokenize=tok).corpus_score(hyps, [references]).score, abs=1e-3)
    assert score.bleu > BLEU(tokenize="13a").corpus_score(hyps, [references]).score


def test_override_wins():
    assert bleu_tokenizer("zh", {"zh": "char"}) == "char"
    assert bleu_tokenizer("de", {"zh": "char"}) == "13a"


def test_signature_differences_ignore_version_only():
    a = "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"
    assert signature_differences(a, a.replace("2.6.0", "2.5.1")) == []
    assert signature_differences(a, a.replace("tok:13a", "tok:zh")) == ["tok 13a vs zh"]


def test_paired_bootstrap_flags_a_real_drop_but_not_identical_output():
    references = refs("zh-en", 60)
    worse = [" ".join(reversed(r.split())) if i % 2 else r for i, r in enumerate(references)]
    same = paired_bootstrap(references, list(references), references, "13a", n_samples=200)
    assert all(r.p_value == 1.0 and r.system == r.baseline for r in same.values())
    drop = paired_bootstrap(references, worse, references, "13a", n_samples=200)
    assert drop["bleu"].baseline == pytest.approx(100.0) and drop["bleu"].system < 80
    assert all(r.p_value < 0.05 for r in drop.values())
