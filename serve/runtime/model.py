"""The mBART/BART encoder-decoder, built from a TensorRT-LLM checkpoint's config.json.

Module paths equal TensorRT-LLM tensor names (`transformer.layers.0.attention.qkv.weight`), so
a rank file loads with `load_state_dict`. Layers hold this rank's shard: `heads` and `ffn`
are already divided by the TP size. Layouts follow TRT-LLM's "remove input padding" mode:
tokens of all sequences are packed into one [tokens, hidden] tensor and metadata says where
each sequence starts. Decoder K/V live in a paged pool (`serve.runtime.kv_cache`); every new
decoder token is one query row of `serve.runtime.kernels.paged_attention`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # an older torch: padded attention everywhere
    varlen_attn = None

from serve.runtime import fused, tp
from serve.runtime.fused import ACTIVATIONS
from serve.runtime.kernels import paged_attention
from serve.runtime.layers import Embedding, LayerNorm, Linear
from serve.runtime.transfer import upload

MASKED_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class ModelConfig:
    """The fields of a TRT-LLM enc-dec component config this runtime uses (per rank)."""

    num_layers: int
    hidden_size: int
    num_heads: int  # this rank's heads
    head_size: int
    ffn_size: int  # this rank's share of intermediate_size
    vocab_size: int
    padded_vocab_size: int  # lm_head rows across all ranks
    max_position_embeddings: int
    norm_eps: float
    hidden_act: str
    embedding_scale: float
    has_final_layernorm: bool
    pre_layernorm: bool
    q_scaling: float
    dtype: torch.dtype
    tp_size: int
    is_decoder: bool

    @classmethod
    def from_config(cls, c: dict) -> ModelConfig:
        """From a component's parsed config.json."""
        tp = c["mapping"]["tp_size"]
        for key in ("num_attention_heads", "intermediate_size"):
            if c[key] % tp:
                raise ValueError(f"{key}={c[key]} is not divisible by tp_size={tp}")
        if c["hidden_act"] not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act {c['hidden_act']!r} is not supported; supported: {', '.join(ACTIVATIONS)}"
            )
        if c.get("relative_attention") or c.get("layernorm_type", 0) != 0 or c.get("mlp_type", 0) != 0:
            raise ValueError(
                "only learned-position LayerNorm MLP encoder-decoders (BART/mBART) are supported"
            )
        return cls(
            num_layers=c["num_hidden_layers"],
            hidden_size=c["hidden_size"],
            num_heads=c["num_attention_heads"] // tp,
            head_size=c["head_size"],
            ffn_size=c["intermediate_size"] // tp,
            vocab_size=c["vocab_size"],
            padded_vocab_size=math.ceil(c["vocab_size"] / tp) * tp,
            max_position_embeddings=c["max_position_embeddings"],
            norm_eps=c["norm_epsilon"],
            hidden_act=c["hidden_act"],
            embedding_scale=math.sqrt(c["hidden_size"]) if c.get("has_embedding_scale") else 1.0,
            has_final_layernorm=c.get("has_model_final_layernorm", False),
            pre_layernorm=c.get("layernorm_position", 0) == 0,
            q_scaling=c.get("q_scaling", 1.0),
            dtype=getattr(torch, c["dtype"]),
            tp_size=tp,
            is_decoder=c["architecture"] == "DecoderModel",
        )


@dataclass
class EncoderBatch:
    """Packed encoder input: `tokens`/`positions` [T]; `seq_lens` [B]."""

    tokens: torch.Tensor
    positions: torch.Tensor
    seq_lens: list[int]


@dataclass
class DecoderBatch:
    """Per-token metadata of one decoder step over a paged KV pool.

    Every new token is one query row: it writes its K/V into `slots` and attends to the first
    `ctx_lens` cached positions of its sequence (`ctx_tables` = that sequence's block table),
    and to `cross_lens` encoder positions through `cross_tables`. `logit_rows` picks the
    tokens whose logits are wanted (the last token of each sequence while generating).
    """

    tokens: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    slots: torch.Tensor  # [N]
    ctx_tables: torch.Tensor  # [N, max_blocks]
    ctx_lens: torch.Tensor  # [N]
    cross_tables: torch.Tensor  # [N, max_cross_blocks]
    cross_lens: torch.Tensor  # [N]
    logit_rows: torch.Tensor | None = None  # [B]; None: every row
    # [N] the first position this step writes in each row's sequence: the K/V of those before it are
    # older, so attention may read them before this step's writes land (`kernels.paged_attention`)
    fresh_from: torch.Tensor | None = None

    def to(self, device: torch.device) -> DecoderBatch:
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        return DecoderBatch(*(None if t is None else t.to(device) for t in values))


@dataclass
class PackedLayout:
    """Sequences packed one after another: sequence i is tokens cu_seqlens[i]:cu_seqlens[i + 1] of [T, ...].

    Trailing sequences may be empty and none is longer than `max_len`. Nothing here reads `cu_seqlens` on
    the host, so a CUDA graph can replay a layout with other lengths (`serve.runtime.encode_step`).
    """

    cu_seqlens: torch.Tensor  # [N + 1] int32, on the device; the last entry is `tokens`
    max_len: int
    tokens: int

    @classmethod
    def of(cls, seq_lens: list[int], device: torch.device) -> PackedLayout:
        cu = [0, *itertools.accumulate(seq_lens)]
        return cls(upload(cu, device, torch.int32), max(seq_lens), cu[-1])

    @functools.cached_property
    def padded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each token's sequence and position in a padded [N, max_len] batch, and its key mask
        [N, 1, 1, max_len]: what attention without varlen kernels needs (computed once per pass)."""
        cu = self.cu_seqlens.long()
        token = torch.arange(self.tokens, device=cu.device)
        seq = torch.searchsorted(cu[1:], token, right=True)
        return seq, token - cu[seq], key_mask(cu[1:] - cu[:-1], self.max_len)


def key_mask(lens: torch.Tensor, length: int) -> torch.Tensor:
    """[B, 1, 1, length]: which of a padded row's `length` keys are real (the first lens[b])."""
    return (torch.arange(length, device=lens.device)[None, :] < lens[:, None])[:, None, None, :]


def varlen_usable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `packed_attention` runs flash attention's varlen kernel here (else a padded SDPA call)."""
    return varlen_attn is not None and device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)


def packed_attention(qkv: torch.Tensor, layout: PackedLayout, scale: float) -> torch.Tensor:
    """Bidirectional attention within each packed sequence: q, k, v [T, 3, h, d] -> [T, h, d].

    On CUDA in fp16/bf16, flash attention's varlen kernel reads the packed tokens where they are.
    Elsewhere (the CPU, fp32), `padded_attention`.
    """
    if not varlen_usable(qkv.device, qkv.dtype):
        return padded_attention(qkv, layout, scale)
    q, k, v = qkv.unbind(1)
    cu, n = layout.cu_seqlens, layout.max_len
    return varlen_attn(q, k, v, cu, cu, n, n, scale=scale)


def padded_attention(qkv: torch.Tensor, layout: PackedLayout, scale: float) -> torch.Tensor:
    """`packed_attention` as one SDPA call over a padded [N, max_len] batch (one scatter for q, k and v).
    cuDNN's backend is left out: it plans each new (batch, length) shape, which cost about 20 ms per
    encoder layer on an H100 (`scripts/profile_step.py`), and every admission brings a new shape."""
    seq, pos, mask = layout.padded
    padded = qkv.new_zeros(mask.shape[0], layout.max_len, *qkv.shape[1:])
    padded[seq, pos] = qkv
    q, k, v = padded.permute(2, 0, 3, 1, 4).unbind(0)  # [N, h, max_len, d] each
    with sdpa_kernel(MASKED_SDPA_BACKENDS):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)[seq, pos]


class Attention(nn.Module):
    """Fused-QKV multi-head attention over this rank's heads; `dense` all-reduces across ranks."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.head_size = cfg.num_heads, cfg.head_size
        inner = cfg.num_heads * cfg.head_size
        self.qkv = Linear(cfg.hidden_size, 3 * inner)
        self.dense = Linear(inner, cfg.hidden_size, reduce=True)
        self.scale = 1.0 / (cfg.q_scaling * math.sqrt(cfg.head_size))

    def heads_of(self, t: torch.Tensor) -> torch.Tensor:
        """[T, n * heads * head_size] -> [T, n, heads, head_size] (n = 3 for q, k, v; 1 for q)."""
        return t.view(t.shape[0], -1, self.heads, self.head_size)

    def cross_kv(self, enc_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention K/V of encoder output (computed once per request)."""
        _, k, v = self.heads_of(self.qkv(enc_out)).unbind(1)
        return k, v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = Linear(cfg.hidden_size, cfg.ffn_size)
        self.proj = Linear(cfg.ffn_size, cfg.hidden_size, reduce=True)


class Block(nn.Module):
    """What encoder and decoder layers share: the MLP, and sublayers wrapped in LayerNorm and a residual.

    Pre-LN (mBART) is x + f(LN(x)): the norm is fused into f's input projection. Post-LN (BART)
    is LN(x + f(x)): the norm follows f's output projection and its residual add.
    `fused.linear` runs each projection with its norm, bias, activation and residual in one kernel.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_ln, self.act = cfg.pre_layernorm, cfg.hidden_act
        self.mlp = MLP(cfg)
        self.mlp_layernorm = LayerNorm(cfg.hidden_size, cfg.norm_eps)

    def project_in(self, x: torch.Tensor, norm: LayerNorm, layer: Linear, **kw) -> torch.Tensor:
        return fused.linear(x, layer, norm=norm if self.pre_ln else None, **kw)

    def project_out(self, h: torch.Tensor, norm: LayerNorm, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        y = fused.linear(h, layer, residual=x)
        return y if self.pre_ln else norm(y)

    def mlp_block(self, x: torch.Tensor) -> torch.Tensor:
        h = self.project_in(x, self.mlp_layernorm, self.mlp.fc, act=self.act)
        return self.project_out(h, self.mlp_layernorm, self.mlp.proj, x)


class EncoderLayer(Block):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.attention = Attention(cfg)
        self.attention_layernorm = LayerNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        att, norm = self.attention, self.attention_layernorm
        qkv = att.heads_of(self.project_in(x, norm, att.qkv))
        x = self.project_out(packed_attention(qkv, layout, att.scale).flatten(1), norm, att.dense, x)
        return self.mlp_block(x)


class DecoderLayer(Block):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.self_attention = Attention(cfg)
        self.self_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.cross_attention = Attention(cfg)
        self.cross_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(
        self, x: torch.Tensor, b: DecoderBatch, kv: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        k_pool, v_pool = kv  # this layer's [2][num_blocks, block_size, h, d]
        att, norm = self.self_attention, self.self_attention_layernorm
        q = att.heads_of(self.project_in(x, norm, att.qkv, kv=fused.KVOut(k_pool, v_pool, b.slots)))[:, 0]
        a = paged_attention(q, k_pool, v_pool, b.ctx_tables, b.ctx_lens, att.scale, fresh_from=b.fresh_from)
        x = self.project_out(a.flatten(1), norm, att.dense, x)

        att, norm = self.cross_attention, self.cross_attention_layernorm
        q = att.heads_of(self.project_in(x, norm, att.qkv, n=att.heads * att.head_size))[:, 0]  # Q rows only
        a = paged_attention(q, k_pool, v_pool, b.cross_tables, b.cross_lens, att.scale, static=True)
        x = self.project_out(a.flatten(1), norm, att.dense, x)
        return self.mlp_block(x)


class Transformer(nn.Module):
    """Embeddings, layers and final norm of one component (`transformer.*` tensors)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vocab_embedding = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.ln_embed = LayerNorm(cfg.hidden_size, cfg.norm_eps)
        layer = DecoderLayer if cfg.is_decoder else EncoderLayer
        self.layers = nn.ModuleList(layer(cfg) for _ in range(cfg.num_layers))
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.norm_eps) if cfg.has_final_layernorm else nn.Identity()

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """LN(token embedding * scale + position embedding): one kernel where `fused.embed` has one."""
        return fused.embed(tokens, positions, self.vocab_embedding.weight, self.position_embedding.weight,
                           self.cfg.embedding_scale, self.ln_embed)  # fmt: skip


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = Transformer(cfg)

    def forward(self, batch: EncoderBatch) -> torch.Tensor:
        """Packed [T, hidden] encoder output."""
        return self.encode(
            batch.tokens, batch.positions, PackedLayout.of(batch.seq_lens, batch.tokens.device)
        )

    def encode(self, tokens: torch.Tensor, positions: torch.Tensor, layout: PackedLayout) -> torch.Tensor:
        """[T, hidden] output of the packed sequences `layout` describes."""
        x = self.transformer.embed(tokens, positions)
        for layer in self.transformer.layers:
            x = layer(x, layout)
        return self.transformer.ln_f(x)


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = Transformer(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.padded_vocab_size // cfg.tp_size, bias=False)

    def cross_kv(self, enc_out: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (K, V) of the packed encoder output for cross-attention, [T, h, d] each."""
        return [layer.cross_attention.cross_kv(enc_out) for layer in self.transformer.layers]

    def hidden(self, b: DecoderBatch, kv_pools: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Last layer's output [len(logit_rows), hidden] (before the final norm)."""
        x = self.transformer.embed(b.tokens, b.positions)
        for layer, kv in zip(self.transformer.layers, kv_pools, strict=True):
            x = layer(x, b, kv)
        return x if b.logit_rows is None else x[b.logit_rows]

    def forward(self, b: DecoderBatch, kv_pools: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Float32 logits [len(logit_rows), vocab_size] (gathered across TP ranks, padding removed)."""
        x = self.transformer.ln_f(self.hidden(b, kv_pools))
        return gather_vocab(self.lm_head(x).float())[:, : self.cfg.vocab_size]

    def topk(self, b: DecoderBatch, kv_pools: list[tuple[torch.Tensor, torch.Tensor]], k: int, eos_id: int,
             eos_blocked: torch.Tensor, shortlist: fused.Shortlist | None = None,
             top1: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Top-k (log-prob, id) [rows, k] of the next token, EOS masked where `eos_blocked`, over each
        row's shortlist where one is given; each row's best id is also stored in `top1` (as far as it goes).

        On one rank the final norm, lm_head and log-softmax run as `fused.lm_head_topk_triton`,
        which never writes the [rows, vocab] logits and reads only the shortlist's lm_head rows.
        """
        x = self.hidden(b, kv_pools)
        w, vocab = self.lm_head.kernel_weights(), self.cfg.vocab_size
        if tp.world_size() == 1 and fused.usable(x, w, fused.LM_HEAD_MAX_ROWS):
            norm = self.transformer.ln_f if self.cfg.has_final_layernorm else None
            return fused.lm_head_topk_triton(x, w, vocab, k, eos_id, eos_blocked, norm, shortlist, top1=top1)
        logits = self.lm_head(self.transformer.ln_f(x)).float()
        if tp.world_size() > 1:
            values, ids = topk_over_shards(logits, vocab, k, eos_id, eos_blocked, shortlist)
        else:
            values, ids = fused.topk_logprobs(logits[:, :vocab], k, eos_id, eos_blocked, shortlist)
        if top1 is not None:
            n = min(len(ids), len(top1))
            top1[:n] = ids[:n, 0]
        return values, ids


def gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    """Concatenate the column-parallel lm_head shards of all TP ranks."""
    if tp.world_size() == 1:
        return logits
    return torch.cat(tp.all_gather(logits.contiguous()), dim=-1)


def topk_over_shards(logits: torch.Tensor, vocab: int, k: int, eos_id: int, eos_blocked: torch.Tensor,
                     shortlist: fused.Shortlist | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`fused.topk_logprobs` of the lm_head split by vocabulary over the TP ranks, from this rank's
    [rows, vocab shard] logits: the ranks exchange each shard's top-k and log-normalizer per row, 2k + 1
    floats, instead of all-gathering the logits (at 64 rows on two ranks, 32 MB of float32 each way a step)."""
    n = logits.shape[1]
    lo = tp.rank() * n
    hi = min(lo + n, vocab)
    keep = torch.arange(lo, lo + n, device=logits.device) < vocab  # the last shard's padding
    if shortlist is not None:
        keep = keep & F.pad(shortlist.mask(hi, lo), (0, lo + n - hi))
    logits = logits.masked_fill(~keep, float("-inf"))
    norm = torch.logsumexp(logits, dim=-1, keepdim=True)  # EOS stays in the norm, as in topk_logprobs
    if lo <= eos_id < hi:
        logits[:, eos_id - lo] = logits[:, eos_id - lo].masked_fill(eos_blocked.bool(), float("-inf"))
    values, ids = torch.topk(logits, min(k, n), dim=-1)
    mine = torch.cat([values, (ids + lo).float(), norm], dim=-1)  # ids < 2^24 are exact in float32
    every = torch.stack(tp.all_gather(mine), dim=1)  # [rows, ranks, 2k' + 1]
    kk = values.shape[-1]
    best, j = torch.topk(every[..., :kk].flatten(1), k, dim=-1)
    ids = every[..., kk : 2 * kk].flatten(1).gather(1, j).long()
    return best - torch.logsumexp(every[..., -1], dim=-1, keepdim=True), ids
