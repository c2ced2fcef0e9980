"""Weight-streaming matmul for small batches (decode): y = x W^T with float, int8 or int4 weights.

At decode time a step multiplies a handful of rows by every weight matrix, so the cost is
reading the weights. cuBLAS has no int8/int4 weight-only path, so this Triton kernel streams
each quantized weight once, dequantizing in registers (`serve.runtime.quant` uses it on CUDA).
The float format is kept for comparison only: float layers use cuBLAS, which measured as fast
or faster (`scripts/bench_gemv.py`; H100 numbers in `scripts/results/h100/gemv.json`).

| fmt | weight (TRT-LLM checkpoint layout) | scales |
|---|---|---|
| float | [N, K] | - |
| W8A16 | int8 [K, N] | per output channel [N] |
| W4A16_AWQ | int8 [N/2, K], rows 2j / 2j+1 in the low / high nibble | [N, K/group], x scaled by [K] first |

`gemv` falls back to the reference (dequantize + F.linear) off CUDA or for more rows
(`MT_TRITON_GEMV=0` forces the fallback everywhere).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# Rows up to which the kernel is used (the row loop is unrolled); more rows go to the fallback.
MAX_ROWS = {0: 8, 1: 16, 2: 16}
BLOCK_N, BLOCK_K, NUM_WARPS = 32, 128, 4  # one fixed tile: no autotuning at start-up
TARGET_PROGRAMS = 528  # split K until about 4 programs per H100 SM are streaming
ENABLED = os.environ.get("MT_TRITON_GEMV", "1") != "0"
FLOAT, INT8, INT4 = 0, 1, 2

if triton is not None:

    def _kernel(x_ptr, w_ptr, s_ptr, pre_ptr, y_ptr, M, N, K, K_SPLIT, stride_xm, stride_wa, stride_wb,
                stride_sn, stride_ym, FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        # Program (n, s) streams the [BLOCK_N, K_SPLIT] slab s of the weight for each of the M rows,
        # accumulating elementwise and reducing once; split-K partial sums meet in fp32 atomics.
        HALF: tl.constexpr = BLOCK_N // 2
        k_lo = tl.program_id(1) * K_SPLIT
        rk = tl.arange(0, BLOCK_K)
        if FMT == 2:  # packed int4: this program owns output rows 2j and 2j+1 for j in rn
            rn = tl.program_id(0) * HALF + tl.arange(0, HALF)
            n_ok = rn < N // 2
        else:
            rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = rn < N
        for m in tl.static_range(BLOCK_M):
            if m < M:
                if FMT == 2:
                    acc_lo = tl.zeros((HALF, BLOCK_K), tl.float32)
                    acc_hi = tl.zeros((HALF, BLOCK_K), tl.float32)
                else:
                    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
                for k0 in range(k_lo, k_lo + K_SPLIT, BLOCK_K):
                    kk = k0 + rk
                    k_ok = kk < K
                    xm = tl.load(x_ptr + m * stride_xm + kk, mask=k_ok, other=0.0).to(tl.float32)
                    w_off = (
                        rn[:, None] * stride_wa + kk[None, :] * stride_wb
                    )  # tile [n, k], any stored layout
                    w_mask = n_ok[:, None] & k_ok[None, :]
                    if FMT == 2:
                        xm = xm * tl.load(pre_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
                        p = tl.load(w_ptr + w_off, mask=w_mask, other=0).to(tl.int32)
                        lo = p & 0xF
                        hi = (p >> 4) & 0xF
                        lo = tl.where(lo > 7, lo - 16, lo).to(tl.float32)
                        hi = tl.where(hi > 7, hi - 16, hi).to(tl.float32)
                        g = k0 // GROUP
                        s_lo = tl.load(s_ptr + (2 * rn) * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
                        s_hi = tl.load(s_ptr + (2 * rn + 1) * stride_sn + g, mask=n_ok, other=0.0).to(
                            tl.float32
                        )
                        acc_lo += lo * xm[None, :] * s_lo[:, None]
                        acc_hi += hi * xm[None, :] * s_hi[:, None]
                    else:
                        acc += tl.load(w_ptr + w_off, mask=w_mask, other=0).to(tl.float32) * xm[None, :]
                if FMT == 2:
                    base = y_ptr + m * stride_ym + 2 * rn
                    tl.atomic_add(base, tl.sum(acc_lo, axis=1), mask=n_ok)
                    tl.atomic_add(base + 1, tl.sum(acc_hi, axis=1), mask=n_ok)
                else:
                    part = tl.sum(acc, axis=1)
                    if FMT == 1:
                        part = part * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
                    tl.atomic_add(y_ptr + m * stride_ym + rn, part, mask=n_ok)

    _kernel = triton.jit(_kernel)


def gemv_reference(x: torch.Tensor, fmt: int, weight: torch.Tensor, scale: torch.Tensor | None = None,
                   prequant: torch.Tensor | None = None, group: int = 128) -> torch.Tensor:  # fmt: skip
    """The definition: dequantize to x's dtype, then F.linear."""
    if fmt == FLOAT:
        return F.linear(x, weight)
    if fmt == INT8:
        return F.linear(x, weight.t().to(x.dtype) * scale.to(x.dtype)[:, None])
    b = weight.view(torch.uint8).to(torch.int16)
    q = torch.stack([b & 0xF, b >> 4], dim=1).reshape(2 * weight.shape[0], weight.shape[1])
    q = torch.where(q > 7, q - 16, q).to(x.dtype)
    w = q * scale.to(x.dtype).repeat_interleave(group, dim=1)
    return F.linear(x * prequant.reshape(-1).to(x.dtype), w)


def usable(x: torch.Tensor, fmt: int = FLOAT, group: int = 128) -> bool:
    rows = x.numel() // x.shape[-1]
    return (
        ENABLED
        and triton is not None
        and x.is_cuda
        and rows <= MAX_ROWS[fmt]
        and (fmt != INT4 or group == 128)
    )


def gemv(x: torch.Tensor, fmt: int, weight: torch.Tensor, scale: torch.Tensor | None = None,
         prequant: torch.Tensor | None = None, group: int = 128) -> torch.Tensor:  # fmt: skip
    """y = x W^T for the given weight format; Triton on CUDA for <= MAX_ROWS rows."""
    if not usable(x, fmt, group):
        return gemv_reference(x, fmt, weight, scale, prequant, group)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    m, k = x2.shape
    n = weight.shape[0] if fmt == FLOAT else weight.shape[1] if fmt == INT8 else 2 * weight.shape[0]
    y = torch.zeros(m, n, dtype=torch.float32, device=x.device)  # split-K partial sums meet here
    # strides of the [n, k] view of the stored weight
    wa, wb = (weight.stride(0), weight.stride(1)) if fmt != INT8 else (weight.stride(1), weight.stride(0))
    s = scale if scale is not None else weight
    pre = prequant.reshape(-1) if prequant is not None else weight
    n_blocks = triton.cdiv(n // 2 if fmt == INT4 else n, BLOCK_N // 2 if fmt == INT4 else BLOCK_N)
    k_blocks = triton.cdiv(k, BLOCK_K)
    splits = max(1, min(k_blocks, triton.cdiv(TARGET_PROGRAMS, n_blocks)))
    k_split = triton.cdiv(k_blocks, splits) * BLOCK_K
    _kernel[(n_blocks, triton.cdiv(k, k_split))](
        x2, weight, s, pre, y, m, n, k, k_split, x2.stride(0), wa, wb, s.stride(0) if s.dim() > 1 else 1,
        y.stride(0), FMT=fmt, GROUP=group, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    y = y.to(x.dtype)
    return y.reshape(*x.shape[:-1], n)
