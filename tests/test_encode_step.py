"""The encoder pass padded to its token bucket, which the engine's CUDA graphs replay, writes the
cross-attention K/V that the unpadded pass writes, and writes nowhere else but the pool's scratch block."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve.runtime.encode_step import PAD_RUN, SHORT, TOKENS, EncodeRunner, buckets
from serve.runtime.kv_cache import KVPool
from serve.runtime.load import load_model
from serve.runtime.model import PackedLayout, packed_attention, padded_attention
from serve.tokenizer import TranslationTokenizer
from tests.conftest import real_sentences


def pool_of(decoder, device: str, blocks: int = 1024) -> KVPool:
    d = decoder.cfg
    return KVPool(d.num_layers, blocks, 16, d.num_heads, d.head_size, d.dtype, device)


def sources_and_slots(tiny_ckpt, pool: KVPool, n: int) -> tuple[list[list[int]], list[np.ndarray]]:
    tok = TranslationTokenizer(tiny_ckpt)
    langs = ["de", "zh", "ru", "ar", "hi"]
    sources = [
        tok.encode(real_sentences(langs[i % 5], 1, offset=i), tok.language(langs[i % 5]))[0] for i in range(n)
    ]
    blocks = [pool.allocator.allocate(pool.blocks_for(len(s))) for s in sources]
    return sources, [pool.slots(b, 0, len(s)) for b, s in zip(blocks, sources, strict=True)]


def runners(ckpt, device: str, n: int, max_tokens: int = 4096):
    encoder, decoder = load_model(ckpt, device)
    packed_pool, bucketed_pool = pool_of(decoder, device), pool_of(decoder, device)
    sources, slots = sources_and_slots(ckpt, packed_pool, n)
    max_len = encoder.cfg.max_position_embeddings
    packed = EncodeRunner(encoder, decoder, packed_pool, 64, max_tokens, max_len, bucketed=False)
    bucketed = EncodeRunner(encoder, decoder, bucketed_pool, 64, max_tokens, max_len, bucketed=True)
    return packed, bucketed, sources, slots


def assert_same_pools(packed: KVPool, bucketed: KVPool, **tol) -> None:
    """Every block but the scratch one holds the same K/V (zeros where no source wrote)."""
    for (k0, v0), (k1, v1) in zip(packed.layers, bucketed.layers, strict=True):
        torch.testing.assert_close(k1[:-1], k0[:-1], **tol)
        torch.testing.assert_close(v1[:-1], v0[:-1], **tol)


def test_slots_follow_the_block_table():
    pool = KVPool(1, 8, 4, 1, 2, torch.float32, "cpu")
    assert pool.slots([5, 2, 7], 3, 6).tolist() == [23, 8, 9, 10, 11, 28]  # positions 3..8, blocks of 4


@pytest.mark.parametrize("n", [1, 3, 8, 30])
def test_bucketed_pass_writes_what_the_packed_pass_writes(tiny_ckpt, n):
    packed, bucketed, sources, slots = runners(tiny_ckpt, "cpu", n)
    assert packed.bucket(sources) is None
    (size, length), tokens = bucketed.bucket(sources), sum(map(len, sources))
    assert size in TOKENS and size >= tokens > size // 2 and length >= max(map(len, sources))
    packed.run(sources, slots)
    bucketed.run(sources, slots)
    assert any(k.abs().sum() > 0 for k, _ in packed.pool.layers)
    assert_same_pools(packed.pool, bucketed.pool, atol=1e-4, rtol=1e-4)


def test_a_source_past_short_takes_the_long_graphs(tiny_ckpt):
    packed, bucketed, sources, _ = runners(tiny_ckpt, "cpu", 2)
    sources = [(sources[0] * 20)[: SHORT + 72], sources[1]]
    pool = packed.pool
    slots = [pool.slots(pool.allocator.allocate(pool.blocks_for(len(s))), 0, len(s)) for s in sources]
    assert bucketed.lengths == [SHORT, 512]
    assert bucketed.bucket(sources) == (256, 512) and bucketed.bucket(sources[1:])[1] == SHORT
    packed.run(sources, slots)
    bucketed.run(sources, slots)
    assert_same_pools(packed.pool, bucketed.pool, atol=1e-4, rtol=1e-4)


def test_bucket_layout_pads_with_short_sequences_into_the_scratch_block(tiny_ckpt):
    _, bucketed, sources, slots = runners(tiny_ckpt, "cpu", 3)
    size = 256
    inputs = bucketed._inputs(sources, slots, size)
    assert len(inputs) == 3 * size + bucketed.entries(size) + 1
    tokens, positions, flat = inputs[: 3 * size].view(3, size).tolist()
    cu = inputs[3 * size :].tolist()
    real = sum(map(len, sources))
    assert cu[:4] == [0, len(sources[0]), len(sources[0]) + len(sources[1]), real]
    runs = [b - a for a, b in zip(cu[3:], cu[4:], strict=False) if b > a]
    assert sum(runs) == size - real and max(runs) <= PAD_RUN and cu[-1] == size
    pool = bucketed.pool
    assert tokens[:real] == [t for s in sources for t in s] and set(tokens[real:]) == {0}
    assert flat[:real] == [x for s in slots for x in s]
    assert {x // pool.block_size for x in flat[real:]} == {pool.scratch_block}
    assert positions[:real] == [p for s in sources for p in range(len(s))] and set(positions[real:]) == {0}


def test_passes_past_the_largest_bucket_stay_packed(tiny_ckpt):
    _, bucketed, sources, _ = runners(tiny_ckpt, "cpu", 40, max_tokens=256)
    assert bucketed.sizes == [16, 32, 64, 128, 256]
    fits = max(i for i in range(len(sources)) if sum(map(len, sources[:i])) <= 256)
    assert bucketed.bucket(sources[:fits])[0] == 256
    assert bucketed.bucket(sources[: fits + 1]) is None
    assert bucketed.bucket([[5]] * 65) is None  # more sources than max_sources (64)
    assert bucketed.bucket([]) == (16, SHORT)  # no sources: the smallest bucket, not an error
    assert buckets(TOKENS, 20) == [16, 20] and buckets(TOKENS, 10**6) == list(TOKENS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_varlen_attention_matches_padded_attention():
    """Flash attention's varlen kernel against the padded SDPA reference, with empty trailing
    sequences and a max_len above the longest (as the bucket graphs run it)."""
    torch.manual_seed(0)
    lens, entries = [24, 7, 100, 1, 60, 64], 12
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()] + [sum(lens)] * (entries - len(lens)))
    layout = PackedLayout(cu.int().cuda(), 256, sum(lens))
    qkv = torch.randn(sum(lens), 3, 4, 64, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(
        packed_attention(qkv, layout, 0.125), padded_attention(qkv, layout, 0.125), atol=2e-3, rtol=2e-3
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_encoder_graphs_write_what_the_packed_pass_writes(tiny_ckpt_factory):
    """Replayed graphs, several passes through the same bucket with other sources and lengths."""
    packed, bucketed, sources, slots = runners(tiny_ckpt_factory(1, "float16"), "cuda", 40)
    bucketed.capture_graphs()
    assert sorted(bucketed.graphs) == [(s, n) for s in bucketed.sizes for n in bucketed.lengths]
    for part in ([0], [1, 2], [3, 4], range(5, 13), range(13, 40)):
        src, sl = [sources[i] for i in part], [slots[i] for i in part]
        packed.run(src, sl)
        bucketed.run(src, sl)
    torch.cuda.synchronize()
    assert_same_pools(packed.pool, bucketed.pool, atol=2e-3, rtol=2e-3)
