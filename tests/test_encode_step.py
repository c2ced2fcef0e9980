"""The encoder pass over a padded grid, which the engine's CUDA graphs replay, writes the cross-attention
K/V that the packed pass writes, and writes nowhere else but the pool's scratch block."""

from __future__ import annotations

import pytest
import torch

from serve.runtime.encode_step import LENGTHS, SOURCES, EncodeRunner, buckets
from serve.runtime.kv_cache import KVPool
from serve.runtime.load import load_model
from serve.tokenizer import TranslationTokenizer
from tests.conftest import real_sentences


def pool_of(decoder, device: str, blocks: int = 1024) -> KVPool:
    d = decoder.cfg
    return KVPool(d.num_layers, blocks, 16, d.num_heads, d.head_size, d.dtype, device)


def sources_and_slots(tiny_ckpt, pool: KVPool, n: int) -> tuple[list[list[int]], list[list[int]]]:
    tok = TranslationTokenizer(tiny_ckpt)
    langs = ["de", "zh", "ru", "ar", "hi"]
    sources = [
        tok.encode(real_sentences(langs[i % 5], 1, offset=i), tok.language(langs[i % 5]))[0] for i in range(n)
    ]
    blocks = [pool.allocator.allocate(pool.blocks_for(len(s))) for s in sources]
    return sources, [pool.slots(b, 0, len(s)) for b, s in zip(blocks, sources, strict=True)]


def runners(tiny_ckpt, device: str, n: int):
    encoder, decoder = load_model(tiny_ckpt, device)
    packed_pool, padded_pool = pool_of(decoder, device), pool_of(decoder, device)
    sources, slots = sources_and_slots(tiny_ckpt, packed_pool, n)
    max_len = encoder.cfg.max_position_embeddings
    packed = EncodeRunner(encoder, decoder, packed_pool, 64, max_len, padded=False)
    padded = EncodeRunner(encoder, decoder, padded_pool, 64, max_len, padded=True)
    return packed, padded, sources, slots


def assert_same_pools(packed: KVPool, padded: KVPool, **tol) -> None:
    """Every block but the scratch one holds the same K/V (zeros where no source wrote)."""
    for (k0, v0), (k1, v1) in zip(packed.layers, padded.layers, strict=True):
        torch.testing.assert_close(k1[:-1], k0[:-1], **tol)
        torch.testing.assert_close(v1[:-1], v0[:-1], **tol)


@pytest.mark.parametrize("n", [1, 3, 8])
def test_padded_pass_writes_what_the_packed_pass_writes(tiny_ckpt, n):
    packed, padded, sources, slots = runners(tiny_ckpt, "cpu", n)
    assert packed.bucket(sources) is None
    b, s = padded.bucket(sources)
    assert b == {1: 1, 3: 4, 8: 8}[n] and s in LENGTHS and s >= max(map(len, sources)) > s // 2
    packed.run(sources, slots)
    padded.run(sources, slots)
    assert any(k.abs().sum() > 0 for k, _ in packed.pool.layers)
    assert_same_pools(packed.pool, padded.pool, atol=1e-4, rtol=1e-4)


def test_passes_past_the_largest_bucket_stay_packed(tiny_ckpt):
    _, padded, sources, _ = runners(tiny_ckpt, "cpu", 9)
    assert padded.bucket(sources) is None  # 9 sources; the largest bucket holds 8
    assert padded.bucket(sources[:8]) is not None
    assert padded.bucket([sources[0], [5] * (LENGTHS[-1] + 1)]) is None
    assert buckets(SOURCES, 3) == [1, 2, 3] and buckets(LENGTHS, 20) == [16, 20]
    assert buckets(LENGTHS, 1024) == list(LENGTHS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_encoder_graphs_write_what_the_packed_pass_writes(tiny_ckpt):
    """Replayed graphs, several passes through the same bucket with other sources and lengths."""
    packed, padded, sources, slots = runners(tiny_ckpt, "cuda", 13)
    padded.capture_graphs()
    assert len(padded.graphs) == len(padded.sources) * len(padded.lengths)
    for part in ([0], [1, 2], [3, 4], range(5, 13)):
        src, sl = [sources[i] for i in part], [slots[i] for i in part]
        packed.run(src, sl)
        padded.run(src, sl)
    torch.cuda.synchronize()
    assert_same_pools(packed.pool, padded.pool, atol=1e-4, rtol=1e-4)
