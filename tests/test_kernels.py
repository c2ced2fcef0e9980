"""Paged attention: the reference against a naive per-row definition (CPU); the Triton kernel and
CUDA-graph decode against the reference (GPU only, run on the device machine)."""

from __future__ import annotations

import pytest
import torch

from serve.runtime.kernels import paged_attention, paged_attention_reference, write_kv, write_kv_reference

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_paged(n=7, heads=4, dim=16, block=16, blocks=40, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k_pool = torch.randn(blocks, block, heads, dim, generator=g).to(device, dtype)
    v_pool = torch.randn(blocks, block, heads, dim, generator=g).to(device, dtype)
    lens = torch.randint(1, 5 * block, (n,), generator=g)
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


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_triton_kernel_matches_reference(dtype):
    args = (*random_paged(n=33, heads=16, dim=64, blocks=300, device="cuda", dtype=dtype), 0.125)
    got, ref = paged_attention(*args), paged_attention_reference(*args)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.float() - ref.float()).abs().max().item() <= tol


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_write_kv_matches_reference(dtype):
    q, k_pool, v_pool, _, _ = random_paged(n=9, heads=16, dim=64, blocks=50, device="cuda", dtype=dtype)
    k, v = torch.randn_like(q), torch.randn_like(q)
    slots = torch.randperm(50 * 16, device="cuda")[:9]
    ref_k, ref_v = k_pool.clone(), v_pool.clone()
    write_kv_reference(ref_k, ref_v, slots, k, v)
    write_kv(k_pool, v_pool, slots, k, v)
    assert torch.equal(k_pool, ref_k) and torch.equal(v_pool, ref_v)


@cuda
def test_cuda_graph_decode_matches_eager(tiny_ckpt):
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
    assert graphed.engine.runner.graphs, "graphs were captured"


@cuda
@pytest.mark.parametrize("fmt", ["float", "int8", "int4"])
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("n,k", [(1000, 1024), (1024, 4096)])
def test_gemv_matches_reference(fmt, rows, n, k):
    from serve.runtime import gemv

    g = torch.Generator(device="cuda").manual_seed(rows + n)
    x = torch.randn(rows, k, device="cuda", generator=g).half()
    code = {"float": gemv.FLOAT, "int8": gemv.INT8, "int4": gemv.INT4}[fmt]
    if fmt == "float":
        args = (torch.randn(n, k, device="cuda", generator=g).half() / 32,)
    elif fmt == "int8":
        w = torch.randint(-127, 128, (k, n), device="cuda", dtype=torch.int8, generator=g)
        args = (w, torch.rand(n, device="cuda", generator=g).half() / 500)
    else:
        w = torch.randint(-128, 128, (n // 2, k), device="cuda", dtype=torch.int8, generator=g)
        scales = torch.rand(n, k // 128, device="cuda", generator=g).half() / 50
        args = (w, scales, 0.5 + torch.rand(1, k, device="cuda", generator=g).half())
    ref = gemv.gemv_reference(x.float(), code, *(a.float() if a.is_floating_point() else a for a in args))
    got = gemv.gemv(x, code, *args)
    assert got.shape == ref.shape and got.dtype == x.dtype
    assert ((got.float() - ref).abs().max() / ref.abs().max()).item() < 5e-3
