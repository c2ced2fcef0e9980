"""Weight-streaming matmul for small batches (decode): y = x W^T with float, int8 or int4 weights.

At decode time a step multiplies a handful of rows by every weight matrix, so the cost is
reading the weights. cuBLAS picks slow kernels for some of these shapes at M=1 (measured on
an H100: 46 us for a 4096->1024 fp16 matrix, ~5x its bandwidth time) and has no int8/int4
weight-only path, so this Triton kernel streams each weight once, dequantizing in registers:

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

# Rows up to which the kernel beats cuBLAS (float) / the dequantize-then-GEMM fallback (int8, int4).
MAX_ROWS = {0: 16, 1: 64, 2: 64}
ENABLED = os.environ.get("MT_TRITON_GEMV", "1") != "0"
FLOAT, INT8, INT4 = 0, 1, 2

if triton is not None:

    def _configs(fmt: int) -> list:
        sizes = [(16, 128), (32, 128), (64, 64), (32, 256), (64, 128)] if fmt != INT4 else [(16, 128), (32, 128),
                                                                                            (64, 128), (128, 128)]  # fmt: skip
        return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n, k in sizes for w in (4, 8)]

    def _kernel(x_ptr, w_ptr, s_ptr, pre_ptr, y_ptr, M, N, K, stride_xm, stride_wa, stride_wb, stride_sn,
                stride_ym, FMT: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):  # fmt: skip
        # Each program streams a [BLOCK_N, K] slab of the weight once and applies it to all M rows.
        HALF: tl.constexpr = BLOCK_N // 2
        rm = tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        if FMT == 2:  # packed int4: this program owns output rows 2j and 2j+1 for j in rn
            rn = tl.program_id(0) * HALF + tl.arange(0, HALF)
            n_ok = rn < N // 2
            acc_lo = tl.zeros((BLOCK_M, HALF), tl.float32)
            acc_hi = tl.zeros((BLOCK_M, HALF), tl.float32)
        else:
            rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = rn < N
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            w_mask = n_ok[:, None] & k_ok[None, :]
            w_off = rn[:, None] * stride_wa + kk[None, :] * stride_wb  # tile [n, k] in any stored layout
            if FMT == 2:
                p = tl.load(w_ptr + w_off, mask=w_mask, other=0).to(tl.int32)
                lo = p & 0xF
                hi = (p >> 4) & 0xF
                lo = tl.where(lo > 7, lo - 16, lo).to(tl.float32)
                hi = tl.where(hi > 7, hi - 16, hi).to(tl.float32)
                g = k0 // GROUP
                s_lo = tl.load(s_ptr + (2 * rn) * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
                s_hi = tl.load(s_ptr + (2 * rn + 1) * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
                pre = tl.load(pre_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
                for m in tl.static_range(BLOCK_M):
                    xm = (
                        tl.load(x_ptr + m * stride_xm + kk, mask=k_ok & (m < M), other=0.0).to(tl.float32)
                        * pre
                    )
                    part_lo = tl.sum(lo * xm[None, :], axis=1) * s_lo
                    part_hi = tl.sum(hi * xm[None, :], axis=1) * s_hi
                    acc_lo = tl.where(rm[:, None] == m, acc_lo + part_lo[None, :], acc_lo)
                    acc_hi = tl.where(rm[:, None] == m, acc_hi + part_hi[None, :], acc_hi)
            else:
                w = tl.load(w_ptr + w_off, mask=w_mask, other=0).to(tl.float32)
                for m in tl.static_range(BLOCK_M):
                    xm = tl.load(x_ptr + m * stride_xm + kk, mask=k_ok & (m < M), other=0.0).to(tl.float32)
                    part = tl.sum(w * xm[None, :], axis=1)
                    acc = tl.where(rm[:, None] == m, acc + part[None, :], acc)
        m_ok = rm < M
        out_mask = m_ok[:, None] & n_ok[None, :]
        if FMT == 2:
            base = y_ptr + rm[:, None] * stride_ym + 2 * rn[None, :]
            tl.store(base, acc_lo.to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.store(base + 1, acc_hi.to(y_ptr.dtype.element_ty), mask=out_mask)
        else:
            if FMT == 1:
                acc = acc * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(
                y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=out_mask
            )

    _tuned = {
        fmt: triton.autotune(_configs(fmt), key=["M", "N", "K"])(triton.jit(_kernel))
        for fmt in (FLOAT, INT8, INT4)
    }


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
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    # strides of the [n, k] view of the stored weight
    wa, wb = (weight.stride(0), weight.stride(1)) if fmt != INT8 else (weight.stride(1), weight.stride(0))
    s = scale if scale is not None else weight
    pre = prequant.reshape(-1) if prequant is not None else weight
    block_m = max(1, triton.next_power_of_2(m))
    rows = n // 2 if fmt == INT4 else n

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(rows, meta["BLOCK_N"] // 2 if fmt == INT4 else meta["BLOCK_N"]),)

    _tuned[fmt][grid](
        x2, weight, s, pre, y, m, n, k, x2.stride(0), wa, wb, s.stride(0) if s.dim() > 1 else 1, y.stride(0),
        FMT=fmt, GROUP=group, BLOCK_M=block_m,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], n)
