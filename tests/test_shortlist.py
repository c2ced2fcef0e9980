"""Output-vocabulary shortlists: the builder (`python -m calib.shortlist`) and serving with them."""

from __future__ import annotations

import json

import pytest
import torch

from calib import shortlist as builder
from serve.engine.request import GenerationRequest, SamplingParams
from serve.runtime import shortlist as shortlist_file
from serve.runtime.translator import Translator
from tests.conftest import real_sentences


def test_builder_writes_lists_and_report(shortlisted_ckpt):
    lists, vocab = shortlist_file.read(shortlisted_ckpt)
    tr = Translator.load(shortlisted_ckpt, device="cpu")
    assert vocab == tr.decoder.cfg.vocab_size and set(lists) == {"en", "zh", "ar"}
    for ids in lists.values():
        assert tr.tokenizer.eos_token_id in ids.tolist() and 0 < len(ids) < vocab
        assert ids.tolist() == sorted(set(ids.tolist()))
    assert set(lists["zh"].tolist()) != set(lists["ar"].tolist())
    report = json.loads((shortlisted_ckpt / "shortlist_report.json").read_text())
    for lang, e in report["languages"].items():
        assert e["size"] == len(lists[lang])
        assert 0 < e["coverage"]["sentences"] <= e["coverage"]["tokens"] <= 1
        assert 0 <= e["agreement"]["identical"] <= e["agreement"]["prefix_tokens"] <= 1
    assert report["languages"]["en"]["test_pair"].endswith("-en")
    assert (shortlisted_ckpt / "shortlist_report.png").stat().st_size > 0
    assert "| zh |" in (shortlisted_ckpt / "shortlist_report.md").read_text()


def test_coverage_counts_source_tokens_as_allowed(tiny_ckpt):
    from serve.tokenizer import TranslationTokenizer

    tok = TranslationTokenizer(tiny_ckpt)
    ref = real_sentences("zh", 2)
    assert builder.coverage(tok, set(), ref, ref) == {"tokens": 1.0, "sentences": 1.0}
    assert builder.coverage(tok, set(), real_sentences("ar", 2), ref)["tokens"] < 0.5


@pytest.mark.parametrize("argv, message", [
    (["--langs", "xx"], "no language 'xx'"),
    (["--langs", "zh", "--corpus", "zh=/nonexistent.txt"], "no corpus for 'zh'"),
    (["--langs", "zh"], "exists (use --overwrite"),
])  # fmt: skip
def test_builder_errors_are_one_line(shortlisted_ckpt, capsys, argv, message):
    assert builder.main(["--checkpoint", str(shortlisted_ckpt), *argv, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_serving_emits_only_the_target_list_and_source(shortlisted_ckpt):
    """Every token of every hypothesis is in its language's list or its source; the same model
    without the list emits tokens outside it (so the check can fail)."""
    full = Translator.load(shortlisted_ckpt, device="cpu")
    short = Translator.load(shortlisted_ckpt, device="cpu", shortlist=True)
    lists, _ = shortlist_file.read(shortlisted_ckpt)
    tok = full.tokenizer
    src = real_sentences("ru", 4)
    enc = tok.encode(src, tok.language("ru"))
    outside_without = 0
    for tgt in ("zh", "ar"):
        prefix = [tok.decoder_prefix(tok.language(tgt))] * len(enc)
        allowed = set(lists[tgt].tolist())
        for beam in (1, 3):
            params = SamplingParams(beam_size=beam, max_new_tokens=12, min_new_tokens=12)
            for ids, source in zip(short.generate_ids(enc, prefix, params, tgt), enc, strict=True):
                assert set(ids) <= allowed | set(source)
            for ids, source in zip(full.generate_ids(enc, prefix, params, tgt), enc, strict=True):
                outside_without += len(set(ids) - allowed - set(source))
    assert outside_without > 0


def test_languages_without_a_list_use_the_whole_vocabulary(shortlisted_ckpt):
    """Requests into a language without a list, or with no target language, decode exactly as without
    shortlists, also when they share steps with shortlisted requests."""
    full = Translator.load(shortlisted_ckpt, device="cpu")
    short = Translator.load(shortlisted_ckpt, device="cpu", shortlist=True)
    tok = full.tokenizer
    enc = tok.encode(real_sentences("de", 3), tok.language("de"))
    for tgt in ("ru", None):
        prefix = [tok.decoder_prefix(tok.language(tgt or "hi"))] * len(enc)
        params = SamplingParams(beam_size=2, max_new_tokens=10)
        expected = full.generate_ids(enc, prefix, params)
        longer = SamplingParams(max_new_tokens=30, min_new_tokens=30)  # still running when the others end
        short.engine.add(
            GenerationRequest("other", enc[0], tok.decoder_prefix(tok.language("zh")), longer, "zh")
        )
        assert short.generate_ids(enc, prefix, params, tgt) == expected
        while short.engine.has_work():
            short.engine.step()


def test_union_holds_every_open_rows_tokens_and_is_rebuilt_only_when_it_must():
    """The lm_head's gather list covers each open row's language and source; it is rebuilt when a row
    brings a token it lacks or a language's last row closes, and kept (a superset) otherwise."""
    vocab = 40
    lists = shortlist_file.VocabShortlist(
        {"zh": torch.tensor([1, 2, 3]), "ar": torch.tensor([10, 11])}, vocab, "cpu"
    )
    union = shortlist_file.ShortlistUnion(vocab)
    union.open(0, lists.allowed("zh", [5]))
    assert union.take().tolist() == [1, 2, 3, 5]
    union.open(1, lists.allowed("zh", [2, 5]))
    assert union.take() is None
    union.open(2, lists.allowed("ar", [7]))
    assert union.take().tolist() == [1, 2, 3, 5, 7, 10, 11]
    union.close(0)
    assert union.take() is None  # row 1 still translates into zh; row 0's source tokens may stay
    union.open(3, lists.allowed("zh", [30]))
    assert union.take().tolist() == [1, 2, 3, 5, 7, 10, 11, 30]
    union.close(2)
    assert union.take().tolist() == [1, 2, 3, 5, 30]
    union.open(4, lists.allowed("ru", [6]))  # no list: the whole vocabulary
    assert union.take().tolist() == list(range(vocab))
    union.close(4)
    assert union.take().tolist() == [1, 2, 3, 5, 30]


def test_missing_shortlist_says_how_to_build_it(tiny_ckpt):
    with pytest.raises(FileNotFoundError, match="python -m calib.shortlist"):
        Translator.load(tiny_ckpt, device="cpu", shortlist=True)
