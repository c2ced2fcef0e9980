"""Decode kernels against their references: paged attention and K/V writes (`kernels`), the fused
linear and lm_head top-K (`fused`), and a whole decode with the kernels against one without.

The Triton kernels run on the GPU where there is one, and otherwise on CPU tensors in Triton's
interpreter (float32 there); CUDA-graph decode runs on the GPU only.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from serve.runtime.kernels import (
    paged_attention,
    paged_attention_reference,
    paged_attention_triton,
    write_kv,
    write_kv_reference,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_paged(n=7, heads=4, dim=16, block=16, blocks=40, device="cpu", dtype=torch.float32, seed=0,
                 lens=None):  # fmt: skip
    """q, pools, tables and lengths of n rows (random lengths, or `lens`) over a paged cache."""
    g = torch.Generator().manual_seed(seed)
    k_pool = torch.randn(blocks, block, heads, dim, generator=g).to(device, dtype)
    v_pool = torch.randn(blocks, block, heads, dim, generator=g).to(device, dtype)
    lens = torch.randint(1, 5 * block, (n,), generator=g) if lens is None else torch.tensor(lens)
    n = len(lens)
    width = int((lens.max() + block - 1) // block) + 2
    tables = torch.stack([torch.randperm(blocks, generator=g)[:width] for _ in range(n)])
    q = torch.randn(n, heads, dim, generator=g).to(device, dtype)
    return q, k_pool, v_pool, tables.to(device), lens.to(device)


def naive(q, k_pool, v_pool, tables, lens, scale):
    out = []
    for i in range(q.shape[0]):
        k = k_pool[tables[i]].flatten(0, 1)[: lens[i]]  # [L, h, d]
        v = v_pool[tables[i]].flatten(0, 1)[: lens[i]]
        att = torch.softmax(torch.einsum("hd,lhd->hl", q[i].float() * scale, k.float()), dim=-1)
        out.append(torch.einsum("hl,lhd->hd", att, v.float()))
    return torch.stack(out)


def test_reference_matches_per_row_definition():
    args = (*random_paged(), 0.125)
    assert torch.allclose(paged_attention_reference(*args), naive(*args), atol=1e-5)
    assert torch.equal(paged_attention(*args), paged_attention_reference(*args))  # CPU dispatches to it


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_kernel_matches_reference(dtype, kernel_device):
    """Every chunk tier (contexts up to a quarter, a half and more of `kernels.CHUNK`, several chunks), two
    warps (the default at these ten rows) and four, what the kernel reads before its wait, and contexts in one
    program or split over two (the default) or four, each of several chunks where 32-position chunks split them."""
    if kernel_device == "cpu" and dtype != torch.float32:
        pytest.skip("the interpreter runs float32")
    heads = 16 if kernel_device == "cuda" else 2
    lens = [1, 31, 32, 33, 63, 64, 65, 128, 129, 300]
    paged = random_paged(heads=heads, dim=64, blocks=300, device=kernel_device, dtype=dtype, lens=lens)
    args = (*paged, 0.125)
    ref = paged_attention_reference(*args)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    fresh_from = (args[4] - 2).clamp(min=0)  # each row's last two positions written "this step"
    for got in (paged_attention(*args), paged_attention_triton(*args, chunk=32),
                paged_attention_triton(*args, chunk=32, static=True), paged_attention_triton(*args, num_warps=4),
                paged_attention_triton(*args, static=True),
                paged_attention_triton(*args, fresh_from=fresh_from), paged_attention_triton(*args, splits=1),
                paged_attention_triton(*args, chunk=32, splits=4, static=True),
                paged_attention_triton(*args, chunk=32, splits=2, fresh_from=fresh_from)):  # fmt: skip
        assert (got.float() - ref.float()).abs().max().item() <= tol


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("heads", [16, 6])  # 6: a head count that is not a power of two (masked)
def test_triton_write_kv_matches_reference(dtype, heads, kernel_device):
    if kernel_device == "cpu" and dtype != torch.float32:
        pytest.skip("the interpreter runs float32")
    q, k_pool, v_pool, _, _ = random_paged(
        n=9, heads=heads, dim=64, blocks=50, device=kernel_device, dtype=dtype
    )
    k, v = torch.randn_like(q), torch.randn_like(q)
    slots = torch.randperm(50 * 16, device=kernel_device)[:9]
    ref_k, ref_v = k_pool.clone(), v_pool.clone()
    write_kv_reference(ref_k, ref_v, slots, k, v)
    write_kv(k_pool, v_pool, slots, k, v)
    assert torch.equal(k_pool, ref_k) and torch.equal(v_pool, ref_v)


@cuda
def test_cuda_graph_decode_matches_eager(tiny_ckpt, shortlisted_ckpt):
    from serve.engine.request import SamplingParams
    from serve.runtime.translator import Translator
    from tests.conftest import real_sentences

    eager = Translator.load(tiny_ckpt, device="cuda", cuda_graphs=False)
    graphed = Translator.load(tiny_ckpt, device="cuda", cuda_graphs=True)
    tok = eager.tokenizer
    enc = tok.encode(real_sentences("zh", 12), tok.language("zh"))
    prefix = [tok.decoder_prefix(tok.language("en"))] * len(enc)
    for beam in (1, 4):
        params = SamplingParams(beam_size=beam, max_new_tokens=20)
        assert graphed.generate_ids(enc, prefix, params) == eager.generate_ids(enc, prefix, params)
    short = [Translator.load(shortlisted_ckpt, device="cuda", cuda_graphs=g, shortlist=True) for g in (0, 1)]
    params = SamplingParams(beam_size=2, max_new_tokens=20)
    assert short[0].generate_ids(enc, prefix, params, "en") == short[1].generate_ids(
        enc, prefix, params, "en"
    )
    runner = graphed.engine.runner
    graphed.engine.warm_up()  # what the server does at start-up
    assert set(runner.graphs) == {(n, k) for n in runner.buckets for k in (1, runner.k)}
    params = SamplingParams(beam_size=2, max_new_tokens=20)
    assert graphed.generate_ids(enc, prefix, params) == eager.generate_ids(enc, prefix, params)


def random_weights(fmt: str, n: int, k: int, device: str, dtype: torch.dtype, seed: int = 0):
    from serve.runtime import fused
    from serve.runtime.quant import pack_int4

    g = torch.Generator().manual_seed(seed)
    if fmt == "float":
        return fused.Weights(fused.FLOAT, (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype))
    if fmt.startswith("int8"):  # the runtime's K-contiguous layout, or the checkpoint's row-major [K, N]
        w = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=g)
        w = w.t().contiguous().t() if fmt == "int8" else w
        return fused.Weights(
            fused.INT8, w.to(device), (torch.rand(n, generator=g) / 100 / k**0.5).to(device, dtype)
        )
    q = pack_int4(torch.randint(-8, 8, (n, k), generator=g))
    scales = (torch.rand(n, k // 128, generator=g) / 4 / k**0.5).to(device, dtype)
    return fused.Weights(
        fused.INT4, q.to(device), scales, (0.5 + torch.rand(k, generator=g)).to(device, dtype), 128
    )


def as_float32(x, w, kw):
    """The float32 reference's inputs: (x, weights, kwargs) upcast, with a float32 copy of the norm."""
    from copy import deepcopy

    from serve.runtime import fused

    up = {key: v.float() if torch.is_tensor(v) else v for key, v in kw.items()}
    if kw.get("norm") is not None:
        up["norm"] = deepcopy(kw["norm"]).float()
    w32 = fused.Weights(w.fmt, w.weight, *(t.float() if t is not None else None for t in (w.scale, w.prequant)),
                        w.group)  # fmt: skip
    return x.float(), w32, up


def kernel_cases(device: str):
    """(dtype, shapes, relative tolerance): model-sized in half precision on the GPU, small in the interpreter."""
    if device == "cuda":
        return [(dt, [(1, 3072, 1024), (1, 1024, 4096), (2, 1024, 1024), (3, 1024, 4096), (4, 3072, 1024),
                      (7, 1024, 4096), (12, 1024, 1024), (20, 1024, 4096), (64, 1024, 4096), (100, 3072, 1024)], 1e-2)
                for dt in (torch.float16, torch.bfloat16)]  # fmt: skip
    # rows: one, two and three (register dot products up to `fused.REGISTER_ROWS`, masked at three; also over
    # K > 1024: the FFN output's one slab of the whole K, masked); tl.dot tiles of 16, 32 and 64 rows (masked)
    shapes = [(1, 96, 256), (1, 16, 1536), (2, 64, 384), (3, 16, 1536), (5, 64, 384), (12, 48, 128), (24, 64, 256),
              (70, 32, 128)]  # fmt: skip
    return [(torch.float32, shapes, 1e-5)]


@pytest.mark.parametrize("fmt", ["float", "int8", "int8_kn", "int4"])
def test_fused_linear_matches_reference(fmt, kernel_device):
    """Every epilogue and prologue the decoder uses, every weight format, one and several row blocks
    (against float32 math: the kernel accumulates in float32 and rounds once)."""
    from serve.runtime import fused

    g = torch.Generator().manual_seed(1)
    for dtype, shapes, tol in kernel_cases(kernel_device):
        for m, n, k in shapes:
            w = random_weights(fmt, n, k, kernel_device, dtype)
            norm = torch.nn.LayerNorm(k, device=kernel_device, dtype=dtype)
            with torch.no_grad():
                norm.weight.copy_(1 + torch.randn(k, generator=g) / 4)
                norm.bias.copy_(torch.randn(k, generator=g) / 4)
            x = (3 * torch.randn(m, k, generator=g) + 1).to(kernel_device, dtype)
            bias = torch.randn(n, generator=g).to(kernel_device, dtype)
            res = torch.randn(m, n, generator=g).to(kernel_device, dtype)
            variants = [dict(norm=norm), dict(norm=norm, bias=bias, act="gelu"), dict(bias=bias, residual=res),
                        dict(act="gelu_new"), dict(bias=bias, act="relu")]  # fmt: skip
            for variant in variants:
                for cols in (n, n // 3 // 2 * 2):  # full, and the leading columns only (cross-attention Q)
                    kw = (
                        {**variant, "residual": res[:, :cols].contiguous()}
                        if "residual" in variant
                        else variant
                    )
                    got = fused.linear_triton(x, w, cols, **kw)
                    x32, w32, kw32 = as_float32(x, w, kw)
                    ref = fused.linear_reference(x32, w32, cols, **kw32)
                    assert got.shape == (m, cols) and got.dtype == dtype
                    err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
                    assert err < tol, (m, n, k, dtype, sorted(kw), cols, err)


def test_row_parallel_ranks_sum_to_the_whole_layer(kernel_device, monkeypatch):
    """TP: each rank's partial of a row-parallel linear (its slice of the inputs) sums to the whole layer
    with the bias counted once, and in the fused kernel's case the residual too (rank 0's partial carries
    them into the all-reduce, so nothing runs after it), written where `tp.partial_out` says."""
    from serve.runtime import fused, tp
    from serve.runtime.layers import Linear

    g = torch.Generator().manual_seed(4)
    rows, n, k = 2, 32, 64
    w, b = torch.randn(n, 2 * k, generator=g), torch.randn(n, generator=g)
    x, res = torch.randn(rows, 2 * k, generator=g), torch.randn(rows, n, generator=g)
    peer = torch.full((rows * n + 8,), float("nan"), device=kernel_device)  # stands in for the peer buffer
    monkeypatch.setattr(tp, "world_size", lambda: 2)
    monkeypatch.setattr(tp, "partial_out", lambda m, cols, dtype: peer[: m * cols].view(m, cols))
    summed = []
    monkeypatch.setattr(tp, "all_reduce", lambda y: summed.append(y.data_ptr()) or y.clone())
    kernel, module = 0, 0
    for r in range(2):
        monkeypatch.setattr(tp, "rank", lambda r=r: r)
        layer = Linear(k, n, reduce=True).to(kernel_device)
        layer.weight.copy_(w[:, r * k : (r + 1) * k])
        layer.bias.copy_(b)
        x_r, res_r = x[:, r * k : (r + 1) * k].to(kernel_device), res.to(kernel_device)
        assert fused.usable(x_r, layer.kernel_weights())
        kernel = kernel + fused.linear(x_r, layer, residual=res_r).cpu()
        assert summed[-1] == peer.data_ptr()  # the kernel wrote its partial where the all-reduce reads it
        module = module + layer(x_r).cpu()
    assert torch.allclose(kernel, x @ w.T + b + res, atol=1e-4)
    assert torch.allclose(module, x @ w.T + b, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 5])
def test_fused_qkv_stores_k_and_v_in_the_cache(rows, kernel_device):
    """A QKV projection given the cache writes its K and V thirds to each row's slot, and nothing
    else: in its epilogue where a slot's heads are contiguous, after it (`write_kv`) where not."""
    from serve.runtime import fused

    g = torch.Generator().manual_seed(3)
    heads, dim, k = 2, 16, 64
    w = random_weights("float", 3 * heads * dim, k, kernel_device, torch.float32)
    x = torch.randn(rows, k, generator=g).to(kernel_device)
    slots = torch.randperm(40, generator=g)[:rows].to(kernel_device)
    y = fused.linear_reference(x, w, 3 * heads * dim).view(rows, 3, heads, dim)
    for flat in (True, False):
        pools = [torch.zeros(5, 8, heads, dim, device=kernel_device) for _ in range(2)]
        if not flat:  # dims strided: the kernel leaves the store to write_kv
            pools = [torch.zeros(5, 8, dim, heads, device=kernel_device).transpose(2, 3) for _ in range(2)]
        kv = fused.KVOut(*pools, slots)
        assert kv.flat_heads() == flat
        got = fused.linear_triton(x, w, 3 * heads * dim, kv=kv)
        assert torch.allclose(got, y.flatten(1), atol=1e-5)
        for pool, part in zip(pools, (1, 2), strict=True):
            flat_pool = pool.reshape(40, heads, dim)
            assert torch.allclose(flat_pool[slots], y[:, part], atol=1e-5)
            others = torch.ones(40, dtype=torch.bool)
            others[slots.cpu()] = False
            assert not flat_pool[others.to(kernel_device)].any()


def test_row_variants_launch_every_variant_that_any_row_count_does(monkeypatch):
    """The engine's warm-up runs the encoder at `fused.row_variants` lengths, so that no request waits for
    Triton to compile: at mBART-large's encoder shapes, in every format, those lengths must launch every
    variant (compile-time constants, warps, and Triton's specialization of integers equal to 1 or multiples
    of 16) that the row counts up to the kernels' limit launch. The kernel is replaced by a recorder."""
    from serve.runtime import fused

    launched = set()

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                ints = tuple((a == 1, a % 16 == 0) for a in args if type(a) is int)
                launched.add((ints, tuple(sorted(kw.items()))))

            return launch

    monkeypatch.setattr(fused, "_linear_kernel", Recorder())
    norm = torch.nn.LayerNorm(1024, dtype=torch.float16)
    layers = [(3072, 1024, dict(norm=norm)), (1024, 1024, dict(residual=True)),
              (4096, 1024, dict(norm=norm, act="gelu")), (1024, 4096, dict(residual=True))]  # fmt: skip
    weights = [(random_weights(fmt, n, k, "cpu", torch.float16), n, k, kw)
               for fmt in ("float", "int8", "int4") for n, k, kw in layers]  # fmt: skip

    def variants(rows) -> set:
        launched.clear()
        for w, n, k, kw in weights:
            for m in (m for m in rows if m <= fused.row_limit(w.fmt, kw.get("norm"), kw.get("residual"))):
                res = torch.zeros(m, n, dtype=torch.float16) if kw.get("residual") else None
                fused.linear_triton(torch.zeros(m, k, dtype=torch.float16), w, n, torch.zeros(n, dtype=torch.float16),
                                    kw.get("norm"), kw.get("act"), res)  # fmt: skip
        return set(launched)

    limit = max(fused.MAX_ROWS.values())
    every = variants(range(1, limit + 1))
    assert len(every) > 20
    assert variants(fused.row_variants(limit)) == every


def test_fp16_decoder_linears_stay_on_the_kernel_up_to_64_rows(kernel_device, monkeypatch):
    """Between 17 and 64 rows a float-weight linear with a norm before it (QKV, cross-attention Q, FFN input) or
    a residual after it (the attention and FFN output projections) runs the fused kernel, which keeps the
    add, the GELU or the K/V store inside where cuBLAS needs launches for them; from 65 rows cuBLAS runs.
    Both give the layer's result."""
    from serve.runtime import fused
    from serve.runtime.layers import Linear

    g = torch.Generator().manual_seed(8)
    layer = Linear(64, 32).to(kernel_device)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(32, 64, generator=g) / 8)
        layer.bias.copy_(torch.randn(32, generator=g))
    norm = torch.nn.LayerNorm(64, device=kernel_device)
    kernel, real = [], fused.linear_triton
    monkeypatch.setattr(fused, "linear_triton", lambda *a, **kw: kernel.append(True) or real(*a, **kw))
    for rows, kw, fused_expected in [(48, {"residual": True}, True), (48, {"norm": norm}, True),
                                     (65, {"residual": True}, False), (65, {"norm": norm}, False),
                                     (16, {"norm": norm}, True)]:  # fmt: skip
        kernel.clear()
        x = torch.randn(rows, 64, generator=g).to(kernel_device)
        res = torch.randn(rows, 32, generator=g).to(kernel_device) if kw.get("residual") else None
        got = fused.linear(x, layer, norm=kw.get("norm"), residual=res)
        ref = layer(kw["norm"](x) if "norm" in kw else x) + (res if res is not None else 0)
        assert bool(kernel) == fused_expected, (rows, sorted(kw))
        assert torch.allclose(got, ref, atol=1e-4), (rows, sorted(kw))


@pytest.mark.parametrize("fmt", ["float", "int8", "int4"])
def test_split_k_matches_reference_and_resets_its_locks(fmt, kernel_device):
    """K split into slabs (the last one short, or empty) gives the one-slab result, every time it runs:
    the last program of each tile sums the partials and leaves the tile's lock at zero."""
    from serve.runtime import fused, kernels

    g = torch.Generator().manual_seed(2)
    dtype, tol = (torch.float16, 1e-2) if kernel_device == "cuda" else (torch.float32, 1e-5)
    n, k = (1024, 4096) if kernel_device == "cuda" else (64, 384)
    w = random_weights(fmt, n, k, kernel_device, dtype)
    norm = torch.nn.LayerNorm(k, device=kernel_device, dtype=dtype)
    for m in (1, 5):  # register dot products, and tl.dot
        x = (3 * torch.randn(m, k, generator=g) + 1).to(kernel_device, dtype)
        bias = torch.randn(n, generator=g).to(kernel_device, dtype)
        res = torch.randn(m, n, generator=g).to(kernel_device, dtype)
        kw = dict(norm=norm, bias=bias, act="gelu", residual=res)
        x32, w32, kw32 = as_float32(x, w, kw)
        ref = fused.linear_reference(x32, w32, n, **kw32)
        for split in (2, 5, 2):
            got = fused.linear_triton(x, w, n, block_k=32, split_k=split, **kw)
            err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
            assert err < tol, (m, split, err)
            assert not kernels.arrival_counters("split-K", x.device, fused.LOCKS).any()


def test_split_k_refuses_more_tiles_than_locks(kernel_device, monkeypatch):
    from serve.runtime import fused

    monkeypatch.setattr(fused, "LOCKS", 2)
    w = random_weights("float", 64, 256, kernel_device, torch.float32)
    x = torch.randn(1, 256).to(kernel_device)
    with pytest.raises(ValueError, match="lock table"):
        fused.linear_triton(x, w, 64, block_n=16, split_k=2)
    assert fused.linear_triton(x, w, 64, block_n=16, split_k=1).shape == (1, 64)


@pytest.mark.parametrize("fmt", ["float", "int4"])  # the one-pass statistics, and int4's two passes
def test_fused_layernorm_statistics_of_rows_far_from_zero(fmt, kernel_device):
    """The kernel's LayerNorm statistics (`fused._row_stats`) keep their precision where a row's mean is far
    larger than its spread (a one-pass E[x^2] - E[x]^2 without its shift loses it all in float32 here)."""
    from serve.runtime import fused

    g = torch.Generator().manual_seed(5)
    k = 1024 if kernel_device == "cuda" else 128
    w = random_weights(fmt, 64, k, kernel_device, torch.float32)
    norm = torch.nn.LayerNorm(k, device=kernel_device)
    for m in (1, fused.NORM_FIRST_ROWS - 1):  # one row, and the most whose statistics the kernel computes
        x = (300 + torch.randn(m, k, generator=g) / 8).to(kernel_device)
        got = fused.linear_triton(x, w, 64, norm=norm)
        ref = fused.linear_reference(x, w, 64, norm=norm)
        assert ((got - ref).norm() / ref.norm()).item() < 1e-3


def lm_head_case(fmt: str, m: int, device: str, seed: int):
    """(vocab, weights with padded rows past it, x [m, hidden], a LayerNorm that is not the identity, so
    that where the norm runs matters) at mBART's size on the GPU, small in the interpreter."""
    vocab, k = (250054, 1024) if device == "cuda" else (300, 128)
    dtype = torch.float16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(seed)
    w = random_weights(fmt, vocab + 2, k, device, dtype)
    x = (4 * torch.randn(m, k, generator=g) + 3).to(device, dtype)
    norm = torch.nn.LayerNorm(k, device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(k, generator=g) + 0.5)
        norm.bias.copy_(torch.rand(k, generator=g) - 0.5)
    return vocab, w, x, norm


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("topk", [1, 8])
@pytest.mark.parametrize("fmt", ["float", "int8", "int4"])
def test_lm_head_topk_matches_log_softmax_topk(fmt, topk, m, kernel_device):
    """Top-1 (what greedy steps ask for) and top-8 (beam search) agree with the reference's first K, for
    one row and several (over the whole vocabulary, both normalized by a LayerNorm launch before the
    kernel); each row's best id also lands in `top1`, as far as it goes."""
    from serve.runtime import fused

    vocab, w, x, norm = lm_head_case(fmt, m, kernel_device, seed=2)
    dtype = x.dtype
    blocked = torch.tensor([1, 0, 1, 1, 0][:m], device=kernel_device)
    x32, w32, kw32 = as_float32(x, w, {"norm": norm})
    ref_v, ref_i = fused.lm_head_topk_reference(x32, w32, vocab, 8, 3, blocked, **kw32)
    top1 = torch.full((max(m - 1, 1),), -1, device=kernel_device)
    got_v, got_i = fused.lm_head_topk_triton(
        x, w, vocab, topk, 3, blocked, norm, block_n=None if dtype != torch.float32 else 32, top1=top1
    )
    assert got_i.shape == (m, topk) and (got_i < vocab).all() and not (got_i[blocked.bool()] == 3).any()
    assert torch.equal(top1[: m - 1], got_i[: m - 1, 0]) and (m > 1 or top1.item() == got_i[0, 0])
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert (got_v - ref_v[:, :topk]).abs().max().item() < tol
    clear = ref_v[:, 0] - ref_v[:, 1] > 10 * tol  # half-precision products may reorder near-ties
    assert (got_i[:, 0] == ref_i[:, 0])[clear].all()
    if dtype == torch.float32:
        assert torch.equal(got_i, ref_i[:, :topk])


def random_shortlist(vocab: int, device: str, eos: int = 3, seed: int = 3) -> torch.Tensor:
    """uint8 [4, vocab] allow bits: two random subsets (with EOS), the whole vocabulary, and nothing."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.zeros(4, vocab, dtype=torch.uint8)
    allowed[0] = torch.rand(vocab, generator=g) < 0.1
    allowed[1] = torch.rand(vocab, generator=g) < 0.05
    allowed[:2, eos] = 1
    allowed[2] = 1
    return allowed.to(device)


def test_shortlist_is_each_rows_subset():
    """`Shortlist.of` lists exactly the union of the rows' tokens, and the reference's log-probs are a
    softmax over each row's own subset."""
    from serve.runtime import fused

    allowed = random_shortlist(300, "cpu")
    rows = torch.tensor([0, 1, 0, 3])
    sl = fused.Shortlist.of(allowed, rows)
    union = torch.nonzero(allowed[[0, 1]].amax(0)).flatten()
    assert sl.count.item() == len(union) and torch.equal(sl.ids[: len(union)].long(), union)
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0))
    values, ids = fused.topk_logprobs(logits, 3, 3, torch.zeros(4), sl)
    for i in range(3):
        own = torch.nonzero(allowed[rows[i]]).flatten()
        v, j = torch.log_softmax(logits[i, own], -1).topk(3)
        assert torch.allclose(values[i], v) and torch.equal(ids[i], own[j])


@pytest.mark.parametrize("with_shortlist", [False, True])
def test_topk_over_vocabulary_shards_matches_the_whole_vocabulary(with_shortlist, monkeypatch):
    """TP: top-k log-probs merged from two ranks' lm_head shards (padded past the vocabulary, EOS
    blocked on some rows) equal those over the whole vocabulary."""
    from serve.runtime import fused, model, tp

    vocab, k, eos = 299, 5, 3
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(5))  # 2 shards of 150
    logits[:, eos] += 10  # EOS would win wherever it is not blocked
    blocked = torch.tensor([1, 0, 1, 0])
    sl = (
        fused.Shortlist.of(random_shortlist(vocab, "cpu"), torch.tensor([0, 1, 0, 2]))
        if with_shortlist
        else None
    )
    expected = fused.topk_logprobs(logits[:, :vocab], k, eos, blocked, sl)
    sent: dict[int, torch.Tensor] = {}

    def all_gather(parts, mine):  # each rank's first call records what it sends
        sent.setdefault(tp.rank(), mine.clone())
        for r, part in enumerate(parts):
            part.copy_(sent.get(r, mine))

    monkeypatch.setattr(tp, "world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_gather", all_gather)
    for r in (0, 1, 0):
        monkeypatch.setattr(tp, "rank", lambda r=r: r)
        values, ids = model.topk_over_shards(logits[:, 150 * r : 150 * (r + 1)], vocab, k, eos, blocked, sl)
    assert torch.equal(ids, expected[1]) and torch.allclose(values, expected[0], atol=1e-6)
    assert not (ids[blocked.bool()] == eos).any()


@pytest.mark.parametrize("m", [1, 5], ids=["one-row", "several-rows"])
@pytest.mark.parametrize("topk", [1, 8])
@pytest.mark.parametrize("fmt", ["float", "int8", "int4"])
@pytest.mark.parametrize("rows", [[0, 1, 0, 1, 0], [1, 2, 0, 1, 3]], ids=["subset", "whole-vocab"])
def test_lm_head_topk_over_shortlist(fmt, rows, topk, m, kernel_device):
    """Only the union of the rows' tokens is read (tiles past it do nothing); each row's top-K and its
    normalization cover its own tokens. One row, as a batch-1 step runs it, takes the final LayerNorm
    inside the kernel; several are normalized first."""
    from serve.runtime import fused

    vocab, w, x, norm = lm_head_case(fmt, m, kernel_device, seed=4)
    dtype = x.dtype
    blocked = torch.tensor([0, 1, 0, 1, 1][:m], device=kernel_device)
    rows = torch.tensor(rows[:m], device=kernel_device)
    sl = fused.Shortlist.of(random_shortlist(vocab, kernel_device), rows)
    live = rows != 3  # the empty row has no distribution
    x32, w32, kw32 = as_float32(x, w, {"norm": norm})
    ref_v, ref_i = fused.lm_head_topk_reference(x32, w32, vocab, 8, 3, blocked, shortlist=sl, **kw32)
    got_v, got_i = fused.lm_head_topk_triton(
        x, w, vocab, topk, 3, blocked, norm, sl, block_n=None if dtype != torch.float32 else 32
    )
    assert sl.mask(vocab)[live].gather(1, got_i[live]).all()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert (got_v[live] - ref_v[live, :topk]).abs().max().item() < tol
    if dtype == torch.float32:
        assert torch.equal(got_i[live], ref_i[live, :topk])


def test_topk_merge_reads_only_the_tiles_a_shortlist_reaches(kernel_device):
    """Tiles past a shortlist's end write nothing, so their partials are whatever an earlier step left;
    the merge must take its normalization and its candidates from the tiles the count reaches alone."""
    from serve.runtime import fused, kernels

    dev = kernel_device
    pmax = torch.tensor([[1.0, 2.0, 50.0, 60.0]], device=dev)  # tiles 2 and 3: stale
    psum = torch.ones(1, 4, device=dev)
    cval = torch.tensor([[1.0, 0.5, 2.0, 1.5, 50.0, 49.0, 60.0, 59.0]], device=dev)
    cidx = torch.tensor([[10, 11, 20, 21, 30, 31, 40, 41]], dtype=torch.int32, device=dev)
    count = torch.tensor([5], dtype=torch.int32, device=dev)  # 5 tokens in tiles of 4: two tiles
    values = torch.empty(1, 2, device=dev)
    ids = torch.empty(1, 2, dtype=torch.long, device=dev)
    fused._topk_merge_kernel[(1,)](pmax, psum, cval, cidx, values, ids, ids, count, 4, 0, 4, SHORTLIST=True,
                                   TOPK=2, BLOCK_T=4, BLOCK_C=8, **kernels.pdl_args(pmax))  # fmt: skip
    lse = torch.logsumexp(torch.tensor([1.0, 2.0]), 0)
    assert ids.tolist() == [[20, 21]]
    assert torch.allclose(values.cpu(), torch.tensor([[2.0, 1.5]]) - lse)


@pytest.mark.parametrize("shortlist", [False, True], ids=["vocab", "shortlist"])
def test_decode_with_kernels_matches_reference_path(shortlisted_ckpt, kernel_device, shortlist):
    """Greedy and beam search token-identical with and without the fused kernels (tiny model), over the
    whole vocabulary and over the target language's shortlist."""
    from serve.engine.request import SamplingParams
    from serve.runtime import fused
    from serve.runtime.translator import Translator
    from tests.conftest import real_sentences

    tr = Translator.load(shortlisted_ckpt, device=kernel_device, shortlist=shortlist, cuda_graphs=False)
    tok = tr.tokenizer
    enc = tok.encode(real_sentences("ar", 2), tok.language("ar"))
    prefix = [tok.decoder_prefix(tok.language("en"))] * len(enc)
    for beam in (1, 2):
        params = SamplingParams(beam_size=beam, max_new_tokens=6)
        with_kernels = tr.generate_ids(enc, prefix, params, "en")
        fused.ENABLED = False
        try:
            without = tr.generate_ids(enc, prefix, params, "en")
        finally:
            fused.ENABLED = True
        assert with_kernels == without


def test_layer_norm_kernel_matches_the_module(kernel_device, monkeypatch):
    """The norm-first launch (`fused.layer_norm`) is the module's LayerNorm: rows far from zero (its two
    passes keep the variance's digits), a width that is not a power of two (masked lanes stay out of the
    statistics), and a [batch, rows, d] input. At `TORCH_NORM_ROWS` the module itself runs."""
    from serve.runtime import fused

    g = torch.Generator().manual_seed(6)
    dtypes = [torch.float16, torch.bfloat16] if kernel_device == "cuda" else [torch.float32]
    for dtype, d, shape in itertools.product(dtypes, (96, 1024), ((1, 1), (2, 7))):
        norm = torch.nn.LayerNorm(d, device=kernel_device, dtype=dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(d, generator=g) + 0.5)
            norm.bias.copy_(torch.rand(d, generator=g) - 0.5)
        x = (torch.randn(*shape, d, generator=g) * 3 + 40).to(kernel_device, dtype).squeeze(1)
        got, ref = fused.layer_norm(x, norm), norm(x)
        tol = 1e-5 if dtype == torch.float32 else 1e-2  # relative: a bf16 step at |y| in [4, 8) is 0.03
        assert got.shape == ref.shape and got.dtype == dtype
        assert ((got.float() - ref.float()).abs() <= tol * (1 + ref.float().abs())).all(), (dtype, d, shape)
    monkeypatch.setattr(fused, "_layer_norm_kernel", None)  # launching it would fail
    x = torch.randn(fused.TORCH_NORM_ROWS[1], 96, generator=g).to(kernel_device, dtypes[0])
    norm = torch.nn.LayerNorm(96, device=kernel_device, dtype=dtypes[0])
    assert torch.equal(fused.layer_norm(x, norm), norm(x))


def test_embedding_kernel_matches_reference(kernel_device):
    """Token embedding times the scale, plus the position's, then LayerNorm, in one launch."""
    from serve.runtime import fused

    g = torch.Generator().manual_seed(5)
    vocab, positions, d = 50, 20, 96  # d not a power of two: masked lanes must not enter the statistics
    dtypes = [torch.float16, torch.bfloat16] if kernel_device == "cuda" else [torch.float32]
    for dtype in dtypes:
        tok_w = torch.randn(vocab, d, generator=g).to(kernel_device, dtype)
        pos_w = torch.randn(positions, d, generator=g).to(kernel_device, dtype)
        norm = torch.nn.LayerNorm(d, device=kernel_device, dtype=dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(d, generator=g) + 0.5)
            norm.bias.copy_(torch.rand(d, generator=g) - 0.5)
        tokens = torch.randint(vocab, (7,), generator=g).to(kernel_device)
        pos = torch.randint(positions, (7,), generator=g).to(kernel_device)
        got = fused.embed_triton(tokens, pos, tok_w, pos_w, 32.0, norm)
        ref = fused.embed_reference(tokens, pos, tok_w, pos_w, 32.0, norm)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert got.dtype == dtype and (got.float() - ref.float()).abs().max().item() < tol
