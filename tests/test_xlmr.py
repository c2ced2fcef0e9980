"""XLM-R -> TRT-LLM BERT-family checkpoint, and the PyTorch runtime (serve/runtime/bert.py) against HF."""

from __future__ import annotations

import json

import pytest
import torch
from ckpt_util import XLMR_LABELS, build_tiny_xlmr
from conftest import PARITY_LANGS, real_sentences

from convert.__main__ import convert_checkpoint, main
from convert.checkpoint import load_merged, load_rank, read_config
from serve.runtime.bert import load_bert, load_classifier

BERT_KEYS = {
    "architecture", "dtype", "logits_dtype", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_size", "intermediate_size", "vocab_size", "hidden_act", "norm_epsilon",
    "position_embedding_type", "max_position_embeddings", "quantization", "mapping", "is_roberta",
    "type_vocab_size", "pad_token_id", "num_labels",
}  # fmt: skip


@pytest.fixture(scope="module")
def xlmr_dirs(tmp_path_factory):
    """{"base": HF XLMRobertaModel dir, "cls": HF XLMRobertaForSequenceClassification dir}."""
    from convert.tiny import train_tokenizer

    root = tmp_path_factory.mktemp("tiny_xlmr")
    spm = train_tokenizer(root / "spm", lines_per_lang=60)
    return {kind: build_tiny_xlmr(root / kind, kind == "cls", spm) for kind in ("base", "cls")}


@pytest.fixture(scope="module")
def xlmr_ckpt(xlmr_dirs, tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("xlmr_ckpt"), {}

    def make(kind: str, tp: int = 1, dtype: str = "float32"):
        if (kind, tp, dtype) not in cache:
            cache[kind, tp, dtype] = convert_checkpoint(
                str(xlmr_dirs[kind]), root / f"{kind}-tp{tp}-{dtype}", tp, dtype, progress=False
            )
        return cache[kind, tp, dtype]

    return make


def hf_model(path, kind):
    from transformers import XLMRobertaForSequenceClassification, XLMRobertaModel

    cls = XLMRobertaForSequenceClassification if kind == "cls" else XLMRobertaModel
    return cls.from_pretrained(path, dtype=torch.float32).eval()


def expected_full(sd: dict, kind: str, layers: int) -> dict[str, torch.Tensor]:
    """The names of tensorrt_llm/models/bert/convert.py, written independently of the converter."""
    hf, trt = ("roberta.", "bert.") if kind == "cls" else ("", "")
    out = {
        f"{trt}embedding.vocab_embedding.weight": sd[f"{hf}embeddings.word_embeddings.weight"],
        f"{trt}embedding.position_embedding.weight": sd[f"{hf}embeddings.position_embeddings.weight"],
        f"{trt}embedding.token_embedding.weight": sd[f"{hf}embeddings.token_type_embeddings.weight"],
    }
    for s in ("weight", "bias"):
        out[f"{trt}embedding.embedding_ln.{s}"] = sd[f"{hf}embeddings.LayerNorm.{s}"]
        for i in range(layers):
            L, H = f"{trt}layers.{i}.", f"{hf}encoder.layer.{i}."
            qkv = [sd[f"{H}attention.self.{x}.{s}"] for x in ("query", "key", "value")]
            out[f"{L}attention.qkv.{s}"] = torch.cat(qkv)
            out[f"{L}attention.dense.{s}"] = sd[f"{H}attention.output.dense.{s}"]
            out[f"{L}input_layernorm.{s}"] = sd[f"{H}attention.output.LayerNorm.{s}"]
            out[f"{L}mlp.fc.{s}"] = sd[f"{H}intermediate.dense.{s}"]
            out[f"{L}mlp.proj.{s}"] = sd[f"{H}output.dense.{s}"]
            out[f"{L}post_layernorm.{s}"] = sd[f"{H}output.LayerNorm.{s}"]
        if kind == "cls":
            out[f"classifier.dense.{s}"] = sd[f"classifier.dense.{s}"]
            out[f"classifier.out_proj.{s}"] = sd[f"classifier.out_proj.{s}"]
    return out


@pytest.mark.parametrize("kind", ["base", "cls"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_layout_config_and_bit_exact_shards(xlmr_dirs, xlmr_ckpt, kind, tp):
    out = xlmr_ckpt(kind, tp)
    ranks = [f"rank{r}.safetensors" for r in range(tp)]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "conversion.json", *ranks, "tokenizer"]
    conf = read_config(out)
    assert conf.keys() >= BERT_KEYS
    assert conf["architecture"] == ("RobertaForSequenceClassification" if kind == "cls" else "RobertaModel")
    assert conf["is_roberta"] is True and conf["pad_token_id"] == 1 and conf["type_vocab_size"] == 1
    assert conf["max_position_embeddings"] == 130 and conf["position_embedding_type"] == "learned_absolute"
    assert conf["mapping"] == {"world_size": tp, "tp_size": tp, "pp_size": 1}
    assert conf["quantization"] == {"quant_algo": None, "kv_cache_quant_algo": None}
    if kind == "cls":
        assert conf["id2label"] == {str(i): label for i, label in enumerate(XLMR_LABELS)}
        assert conf["num_labels"] == len(XLMR_LABELS)
    model = hf_model(xlmr_dirs[kind], kind)
    full = expected_full(model.state_dict(), kind, 2)
    rank0 = load_rank(out, 0)
    assert set(rank0) == set(full)
    prefix = "bert." if kind == "cls" else ""
    assert rank0[f"{prefix}layers.0.attention.qkv.weight"].shape == (3 * 64 // tp, 64)
    assert rank0[f"{prefix}layers.0.attention.dense.weight"].shape == (64, 64 // tp)
    assert rank0[f"{prefix}layers.0.mlp.fc.weight"].shape == (256 // tp, 64)
    assert rank0[f"{prefix}layers.0.mlp.proj.weight"].shape == (64, 256 // tp)
    assert rank0[f"{prefix}embedding.position_embedding.weight"].shape == (130, 64)
    merged = load_merged(out)
    for name, t in merged.items():
        assert torch.equal(t, full[name]), name


def test_runtime_matches_hf(xlmr_dirs, xlmr_ckpt):
    """Hidden states and classification logits on real sentences, batched with padding, from a TP=2 checkpoint."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(xlmr_ckpt("cls", 2) / "tokenizer")
    texts = [s for lang in PARITY_LANGS for s in real_sentences(lang, 2)]
    enc = tok(texts, padding=True, truncation=True, max_length=120, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any(), "the batch should exercise padding"
    for kind in ("base", "cls"):
        ours = load_bert(xlmr_ckpt(kind, 2))
        ref = hf_model(xlmr_dirs[kind], kind)
        with torch.no_grad():
            hidden, logits = ours(enc["input_ids"], enc["attention_mask"])
            if kind == "base":
                ref_hidden = ref(**enc).last_hidden_state
            else:
                out = ref(**enc, output_hidden_states=True)
                ref_hidden = out.hidden_states[-1]
                assert (logits - out.logits).abs().max() <= 1e-4
        keep = enc["attention_mask"].bool()
        assert (hidden[keep] - ref_hidden[keep]).abs().max() <= 1e-4
        assert (logits is None) == (kind == "base")


def test_load_classifier(xlmr_dirs, xlmr_ckpt):
    from transformers import AutoTokenizer

    clf = load_classifier(xlmr_ckpt("cls", 1))
    assert clf.labels == XLMR_LABELS
    texts = [real_sentences(lang, 1, offset=5)[0] for lang in PARITY_LANGS]
    got = clf.classify(texts)
    ref = hf_model(xlmr_dirs["cls"], "cls")
    tok = AutoTokenizer.from_pretrained(xlmr_dirs["cls"])
    with torch.no_grad():
        probs = ref(**tok(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    assert [label for label, _ in got] == [XLMR_LABELS[i] for i in probs.argmax(-1).tolist()]
    assert all(abs(p - probs[i].max().item()) < 1e-4 for i, (_, p) in enumerate(got))


def test_xlmr_fp16_and_conversion_record(xlmr_ckpt, xlmr_dirs):
    out = xlmr_ckpt("cls", 2, "float16")
    assert all(t.dtype == torch.float16 for t in load_rank(out, 1).values())
    rec = json.loads((out / "conversion.json").read_text())
    assert rec["architecture"] == "XLMRobertaForSequenceClassification"
    assert set(rec["sha256"]) == {"rank0.safetensors", "rank1.safetensors"}
    assert not (out / "languages.json").exists()


def test_xlmr_tp_error(capsys, xlmr_dirs, tmp_path):
    out = tmp_path / "o"
    rc = main(["--model", str(xlmr_dirs["cls"]), "--output", str(out), "--tp-size", "3", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and err.count("\n") == 0 and "attention heads (4)" in err
    assert not out.exists()


def test_masked_lm_checkpoint_converts_to_bare_encoder(xlmr_dirs, tmp_path):
    """Released XLM-R checkpoints are XLMRobertaForMaskedLM: they convert to RobertaModel, LM head dropped."""
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaForMaskedLM

    cfg = XLMRobertaConfig.from_pretrained(xlmr_dirs["base"], architectures=["XLMRobertaForMaskedLM"])
    torch.manual_seed(1)
    XLMRobertaForMaskedLM(cfg).save_pretrained(tmp_path / "mlm")
    AutoTokenizer.from_pretrained(xlmr_dirs["base"]).save_pretrained(tmp_path / "mlm")
    out = convert_checkpoint(str(tmp_path / "mlm"), tmp_path / "out", 2, "float32", progress=False)
    assert read_config(out)["architecture"] == "RobertaModel"
    ref = hf_model(tmp_path / "mlm", "base")
    merged = load_merged(out)
    assert merged.keys() == expected_full(ref.state_dict(), "base", 2).keys()
    assert torch.equal(merged["embedding.vocab_embedding.weight"], ref.embeddings.word_embeddings.weight)
