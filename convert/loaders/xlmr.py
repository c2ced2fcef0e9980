"""XLM-R (XLM-RoBERTa) -> TRT-LLM BERT-family checkpoint: one folder, config.json + rank{r}.safetensors.

Names and config follow `tensorrt_llm/models/bert/{convert,config,model}.py`: `RobertaModel` /
`RobertaForSequenceClassification` (aliases of TRT-LLM's Bert classes with `is_roberta`), the
encoder under `bert.` for the classifier, the RoBERTa head as `classifier.{dense,out_proj}`.
The position table is copied whole: TRT-LLM (like HF) offsets RoBERTa positions by
`pad_token_id + 1` at run time. HF's pooler is not carried (TRT-LLM's RobertaModel has none).
"""

from __future__ import annotations

from typing import Any

from convert.checkpoint import mapping
from convert.errors import ConvertError
from convert.registry import (
    NO_QUANTIZATION,
    Component,
    Loader,
    dtype_name,
    hidden_act,
    register_loader,
    require_divisible,
)


@register_loader("XLMRobertaModel", "XLMRobertaForMaskedLM")
class XLMRobertaLoader(Loader):
    """The bare encoder (hidden states). A masked-LM checkpoint converts to it too, minus its LM head."""

    hf_class = "XLMRobertaModel"
    hf_kwargs: dict = {"add_pooling_layer": False}
    trtllm_architecture = "RobertaModel"
    hf_prefix = ""  # where the encoder sits in the HF state dict
    trt_prefix = ""  # where it goes in the TRT-LLM checkpoint

    def check_tp(self, cfg: Any, tp_size: int) -> None:
        require_divisible("attention heads", cfg.num_attention_heads, tp_size)
        require_divisible("FFN width", cfg.intermediate_size, tp_size)
        kind = getattr(cfg, "position_embedding_type", "absolute")
        if kind != "absolute":
            raise ConvertError(f"position_embedding_type {kind!r} is not supported (only 'absolute')")
        if cfg.intermediate_size != 4 * cfg.hidden_size:  # TRT-LLM's BertEncoderLayer builds its MLP as 4*H
            raise ConvertError(
                f"intermediate_size {cfg.intermediate_size} != 4 * hidden_size: TensorRT-LLM's BERT cannot load it"
            )

    def build(self, cfg: Any) -> dict[str, Component]:
        out: dict = {}
        self.set_encoder(out, cfg)
        self.set_head(out)
        return {"": Component(self.config(cfg), out)}

    def config(self, cfg: Any) -> dict:
        return {
            "architecture": self.trtllm_architecture,
            "dtype": dtype_name(self.dtype),
            "logits_dtype": "float32",
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_attention_heads,
            "head_size": cfg.hidden_size // cfg.num_attention_heads,
            "intermediate_size": cfg.intermediate_size,
            "vocab_size": cfg.vocab_size,
            "hidden_act": hidden_act(cfg.hidden_act),
            "norm_epsilon": cfg.layer_norm_eps,
            "position_embedding_type": "learned_absolute",
            "max_position_embeddings": cfg.max_position_embeddings,
            "quantization": dict(NO_QUANTIZATION),
            "mapping": mapping(1),
            "use_parallel_embedding": False,
            "embedding_sharding_dim": 0,
            "is_roberta": True,
            "type_vocab_size": cfg.type_vocab_size,
            "pad_token_id": cfg.pad_token_id,
            "num_labels": cfg.num_labels,
        }

    def set_encoder(self, out: dict, cfg: Any) -> None:
        hf, trt = self.hf_prefix, self.trt_prefix
        emb = f"{trt}embedding"
        self.set_tensor(out, f"{emb}.vocab_embedding.weight", f"{hf}embeddings.word_embeddings.weight")
        self.set_tensor(out, f"{emb}.position_embedding.weight", f"{hf}embeddings.position_embeddings.weight")
        self.set_tensor(out, f"{emb}.token_embedding.weight", f"{hf}embeddings.token_type_embeddings.weight")
        self.set_layernorm(out, f"{emb}.embedding_ln", f"{hf}embeddings.LayerNorm")
        for i in range(cfg.num_hidden_layers):
            self.set_layer(out, f"{trt}layers.{i}", f"{hf}encoder.layer.{i}")

    def set_layer(self, out: dict, dst: str, src: str) -> None:
        attn = f"{src}.attention"
        self.set_qkv(out, f"{dst}.attention.qkv", *(f"{attn}.self.{x}" for x in ("query", "key", "value")))
        self.set_linear(out, f"{dst}.attention.dense", f"{attn}.output.dense")
        self.set_layernorm(out, f"{dst}.input_layernorm", f"{attn}.output.LayerNorm")
        self.set_linear(out, f"{dst}.mlp.fc", f"{src}.intermediate.dense")
        self.set_linear(out, f"{dst}.mlp.proj", f"{src}.output.dense")
        self.set_layernorm(out, f"{dst}.post_layernorm", f"{src}.output.LayerNorm")

    def set_head(self, out: dict) -> None:
        """The bare encoder has no head."""


@register_loader("XLMRobertaForSequenceClassification")
class XLMRobertaClassifierLoader(XLMRobertaLoader):
    """Encoder + RoBERTa classification head (`<s>` state -> dense -> tanh -> out_proj), with labels."""

    hf_class = "XLMRobertaForSequenceClassification"
    hf_kwargs: dict = {}
    trtllm_architecture = "RobertaForSequenceClassification"
    hf_prefix = "roberta."
    trt_prefix = "bert."

    def config(self, cfg: Any) -> dict:
        id2label = {str(i): str(label) for i, label in sorted(cfg.id2label.items())}
        return {**super().config(cfg), "num_labels": len(id2label), "id2label": id2label}

    def set_head(self, out: dict) -> None:
        self.set_linear(out, "classifier.dense", "classifier.dense")
        self.set_linear(out, "classifier.out_proj", "classifier.out_proj")
