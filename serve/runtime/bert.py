"""XLM-R (RoBERTa-shaped, post-LN) encoder in plain PyTorch, read from a TRT-LLM BERT-family checkpoint.

Used for language identification (/detect): `load_classifier(ckpt_dir).classify(texts)`. Module
names mirror the checkpoint (`embedding.*`, `layers.{i}.attention.qkv`, `bert.` prefix and
`classifier.{dense,out_proj}` for the classifier), so weights load with `load_state_dict`.
All TP ranks are merged on load (`convert.checkpoint.load_merged`): this model is small.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from convert.checkpoint import load_merged, read_config

ACTIVATIONS = {
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


@dataclass
class BertConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    pad_token_id: int
    norm_epsilon: float
    hidden_act: str
    id2label: dict[int, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> BertConfig:
        names = cls.__dataclass_fields__.keys() - {"id2label"}
        labels = {int(i): label for i, label in (d.get("id2label") or {}).items()}
        return cls(**{k: d[k] for k in names}, id2label=labels)

    @property
    def is_classifier(self) -> bool:
        return self.architecture.endswith("ForSequenceClassification")


class Embedding(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.vocab_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_embedding = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.embedding_ln = nn.LayerNorm(c.hidden_size, eps=c.norm_epsilon)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.vocab_embedding(ids) + self.position_embedding(positions)
        return self.embedding_ln(x + self.token_embedding.weight[0])  # token type 0 everywhere


class Attention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.n_head = c.num_attention_heads
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size)
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, H // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dense(y.transpose(1, 2).reshape(B, T, H))


class MLP(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.fc = nn.Linear(c.hidden_size, c.intermediate_size)
        self.proj = nn.Linear(c.intermediate_size, c.hidden_size)
        self.act = ACTIVATIONS[c.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Layer(nn.Module):
    """Post-LN: x = LN(x + Attn(x)); x = LN(x + MLP(x))."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = Attention(c)
        self.input_layernorm = nn.LayerNorm(c.hidden_size, eps=c.norm_epsilon)
        self.mlp = MLP(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.norm_epsilon)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.input_layernorm(x + self.attention(x, mask))
        return self.post_layernorm(x + self.mlp(x))


class Encoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.pad_id = c.pad_token_id
        self.embedding = Embedding(c)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        keep = ids.ne(self.pad_id) if attention_mask is None else attention_mask.bool()
        # RoBERTa positions: pad_id + 1, pad_id + 2, ... over non-pad tokens, pad_id on pads (as HF does).
        not_pad = ids.ne(self.pad_id).long()
        positions = torch.cumsum(not_pad, dim=1) * not_pad + self.pad_id
        x = self.embedding(ids, positions)
        mask = keep[:, None, None, :]  # [B, 1, 1, T]: every query sees the non-pad keys
        for layer in self.layers:
            x = layer(x, mask)
        return x


class ClassificationHead(nn.Module):
    """RoBERTa head: the `<s>` state -> dense -> tanh -> out_proj."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.out_proj = nn.Linear(c.hidden_size, len(c.id2label))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(hidden[:, 0])))


class XLMRoberta(nn.Module):
    """`forward(ids, attention_mask) -> (hidden states [B, T, H], logits [B, labels] or None)`."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.config = c
        self.bert = Encoder(c)
        self.classifier = ClassificationHead(c) if c.is_classifier else None

    def forward(
        self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = self.bert(ids, attention_mask)
        return hidden, (self.classifier(hidden) if self.classifier is not None else None)


def load_bert(
    ckpt_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> XLMRoberta:
    """The model of a converted RobertaModel / RobertaForSequenceClassification checkpoint (any TP size)."""
    cfg = BertConfig.from_dict(read_config(ckpt_dir))
    state = load_merged(ckpt_dir)
    if not cfg.is_classifier:  # RobertaModel stores the encoder without the `bert.` prefix
        state = {f"bert.{k}": v for k, v in state.items()}
    with torch.device("meta"):
        model = XLMRoberta(cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.to(device).eval()


class LanguageClassifier:
    """Sentence -> (label, probability) with a converted XLM-R sequence classifier and its tokenizer."""

    def __init__(self, model: XLMRoberta, tokenizer, batch_size: int = 32):
        if model.classifier is None:
            raise ValueError("this checkpoint is a bare encoder (RobertaModel), not a classifier")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.labels = [model.config.id2label[i] for i in sorted(model.config.id2label)]
        # positions run from pad_id + 1, so that many rows of the table are never used
        self.max_length = model.config.max_position_embeddings - model.config.pad_token_id - 1

    @torch.inference_mode()
    def probabilities(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), len(labels)] softmax probabilities."""
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[i : i + self.batch_size], padding=True, truncation=True,
                max_length=self.max_length, return_tensors="pt",
            )  # fmt: skip
            _, logits = self.model(enc["input_ids"].to(device), enc["attention_mask"].to(device))
            out.append(logits.float().softmax(-1).cpu())
        return torch.cat(out) if out else torch.empty(0, len(self.labels))

    def classify(self, texts: list[str]) -> list[tuple[str, float]]:
        """The most probable label of each text and its probability."""
        probs = self.probabilities(texts)
        best = probs.argmax(-1)
        return [(self.labels[j], probs[i, j].item()) for i, j in enumerate(best.tolist())]


def load_classifier(ckpt_dir: str | Path, device: str | torch.device = "cpu") -> LanguageClassifier:
    """A ready classifier from a converted XLMRobertaForSequenceClassification checkpoint directory."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(ckpt_dir) / "tokenizer")
    return LanguageClassifier(load_bert(ckpt_dir, device), tokenizer)
