"""Fused decode kernels: one Triton launch per linear layer of a decode step, and the lm_head's top-K.

A decode step multiplies a few rows by every weight matrix, so each layer costs a launch and
a pass over its weights; the LayerNorm, bias, GELU and residual add around it cost launches of
their own. `linear` folds them into the matmul: the LayerNorm into its prologue up to `REGISTER_ROWS` rows
(every program recomputes its rows' statistics, small next to the weight slab it streams; from
`NORM_FIRST_ROWS` rows the norm runs first, as its own launch), the rest into its epilogue.
Weights stay in the checkpoint's layout and are dequantized in registers:

| fmt | weight (TRT-LLM checkpoint layout) | scales |
|---|---|---|
| FLOAT | [N, K] | - |
| INT8 (W8A16) | int8 [K, N], stored K-contiguous at load (`quant.kernel_layout`) | per output channel [N] |
| INT4 (W4A16_AWQ) | int8 [N/2, K], rows 2j / 2j+1 in the low / high nibble | [N, K/group], and AWQ input scales [K] (on x, or on the weight tile in registers) |

One row (batch 1), and up to `REGISTER_ROWS`, takes register dot products over a narrow slab of the
whole K instead of `tl.dot`, which needs 16 rows, and requests its weights, bias, scales and
LayerNorm weights before it waits for the previous kernel (`kernels.pdl_wait`), so a layer's
weights stream in while the layer before it finishes. More rows take `tl.dot` tiles. A
decode-shaped layer can have fewer output tiles than the GPU has SMs; where it also has a long K
loop (the FFN output, every int4 layer), `_split_k` splits K across programs, and the last program
of each tile sums the partials in a fixed order, so results stay deterministic.
The self-attention QKV projection also stores its K and V thirds in the paged cache (`KVOut`).

`lm_head_topk_triton` runs the lm_head the same way (with the final LayerNorm inside only for one row
over a shortlist), but never writes the [rows, vocab] logits: each program reduces its vocabulary
tile to a softmax partial (max, sum of exponentials) and its local top-K, and a small merge gives
each row's top-K log-probabilities.
`embed` runs the embeddings' lookups, scale, sum and LayerNorm as one launch, and `layer_norm` a norm that
runs first (from `NORM_FIRST_ROWS` rows, and the lm_head's).

All three fall back to the PyTorch composition they are tested against (`*_reference`) off CUDA,
for more rows than `row_limit`, under tensor parallelism where a kernel would need a collective
inside it, and for formats they do not read (SmoothQuant); `MT_FUSED=0` forces the fallback.
CI runs the kernels themselves on CPU tensors in Triton's interpreter (`kernels.CPU_INTERPRETER`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

from serve.runtime import kernels, tp

FLOAT, INT8, INT4 = 0, 1, 2
ACTIVATIONS = {  # TRT-LLM hidden_act names
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}
ACT_CODES = {None: 0, "gelu": 1, "gelu_new": 2, "relu": 3}
# Rows up to which the kernels pay on the H100 (`scripts/bench_kernels.py --rows ...`); more rows take
# the reference. fp16: cuBLAS plus separate norm/activation/add kernels is faster from 17 rows on, except
# for layers with a norm or a residual up to 64 rows (`RESIDUAL_MAX_ROWS`, `NORMED_MAX_ROWS`).
# int8/int4: the reference dequantizes the whole weight for cuBLAS every step, so the kernels pay up to
# 128 rows, where they read each weight tile once per 64 rows (a decoder layer at 128 rows: int8 99 µs
# fused vs 135 dequantized, int4 114 vs 327). The lm_head top-K pays at every batch.
MAX_ROWS = {FLOAT: 16, INT8: 128, INT4: 128}
# fp16 layers with a residual and no norm before them (attention and FFN output projections) keep the kernel up
# to 64 rows, where cuBLAS needs a launch of its own for the add. 64 rows on the H200, dense 4.6 against 6.2 us and
# FFN output 7.1 against 10.2 (`kernels-64-sweep.json`); the H100 at 32 / 64 / 128 rows, dense 4.9 / 5.7 / 4.9
# against 6.2 / 6.3 / 6.6, FFN output 9.2 / 9.5 / 11.4 against 10.9 / 11.1 / 11.1 (`h100/kernels-rows.json`).
RESIDUAL_MAX_ROWS = {FLOAT: 64}
# fp16 layers with a LayerNorm before them (QKV, cross-attention Q, FFN input) keep the kernel up to 64 rows too:
# the norm still runs first, as its own launch, but the GELU and the QKV's K/V store stay inside, where cuBLAS
# needs a launch for each. Whole fp16 decode graphs on the H200, one process, two rounds
# (`fp16-normed-kernel-to-64-ab.json`): 32 rows 0.940 -> 0.850 ms, 64 rows 1.104 -> 1.089-1.095 (the last
# step's inputs of a closed loop), a closed loop at 64 clients 55 000 -> 55 500-56 400 tok/s.
NORMED_MAX_ROWS = {FLOAT: 64}
LM_HEAD_MAX_ROWS = 256
# Up to this many rows (a power of two below 16), a linear takes register dot products of each row with
# a narrow slab of its whole K requested before the previous kernel ends, as one row does; tl.dot needs 16
# rows. Blocks of fewer than 16 rows are what selects that path, in the kernel and in `_tiles`. On the H200
# (fp16 graph replays, `replay-two-row-slab.json`), with the whole K in one slab: 2 rows 0.507 -> 0.436 ms a
# step (two slabs: 0.85 -> 0.63 against tl.dot in an older tree), 4 rows 0.668 -> 0.568 against tl.dot with
# the norm first (four slabs of 256 had been slower, 0.87 -> 0.99). Eight rows on this path: the 8-row graph
# 0.686 -> 0.837 ms (`replay-register-rows-8-whole-k.json`); int8 / int4 kernels spill (`kernel_asm.py --rows 8`).
REGISTER_ROWS = 4
# From this many rows (wherever tl.dot tiles run) a linear's LayerNorm runs as its own launch before it:
# inside, every output tile reads all rows twice more for the statistics. On the H200, norm-first at 16 / 64
# rows (the launch included): fp16 QKV 9.3 -> 8.1 / 15.1 -> 8.9 us, int4 QKV 19.6 -> 11.0 / 30.8 -> 14.6,
# int8 even at 16 rows and faster from 32 (`kernels-norm-first.json` under scripts/results/h200); fp16 graph
# replays at 4 / 8 rows 0.83 / 0.84 -> 0.69 / 0.71 ms (`replay-norm-first.json`).
NORM_FIRST_ROWS = REGISTER_ROWS + 1
# Rows at which a norm that runs first stays PyTorch's launch instead of `layer_norm`'s. Graphs on the H200 replayed
# on a closed loop's last step, two rounds in one process (`ln-rows-ab.json`, `ln-warps-ab.json`), PyTorch's ->
# `layer_norm`: 8 rows 0.789 -> 0.831-0.836 ms (one warp a row or four), 8 clients 9 700 -> 9 500 tok/s; 16 rows
# 0.862 -> 0.864-0.875 ms but 16 clients 18 200 -> 18 800-19 000 tok/s; 64 rows 1.004 -> 0.879 ms. At four rows
# (only the lm_head's norm runs first) 0.600 -> 0.597.
TORCH_NORM_ROWS = (NORM_FIRST_ROWS, 8)
# The most programs a split-K linear launches (the H100 has 132 SMs)
SPLIT_PROGRAMS = {FLOAT: 128, INT8: 128, INT4: 256}
LOCKS = 4096  # output tiles a split-K launch may have: one arrival counter each
ENABLED = os.environ.get("MT_FUSED", "1") != "0"


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int8 [out/2, in] holding signed int4 pairs -> int8 [out, in] in [-8, 7].

    Byte (j, i) holds output row 2j in its low nibble and row 2j+1 in its high nibble (the
    ModelOpt / TensorRT-LLM W4A16_AWQ checkpoint convention).
    """
    b = packed.view(torch.uint8).to(torch.int16)
    low, high = b & 0xF, b >> 4
    both = torch.stack([low, high], dim=1).reshape(2 * packed.shape[0], packed.shape[1])
    return torch.where(both > 7, both - 16, both).to(torch.int8)


@dataclass(frozen=True)
class Weights:
    """A linear layer's weight as the kernels read it (`Linear.kernel_weights`)."""

    fmt: int
    weight: torch.Tensor
    scale: torch.Tensor | None = None
    prequant: torch.Tensor | None = None  # [K]
    group: int = 128

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The float [N, K] weight (after input scaling, for INT4)."""
        if self.fmt == FLOAT:
            return self.weight.to(dtype)
        if self.fmt == INT8:
            return self.weight.t().to(dtype) * self.scale.to(dtype)[:, None]
        return unpack_int4(self.weight).to(dtype) * self.scale.to(dtype).repeat_interleave(self.group, dim=1)

    def n_k_strides(self) -> tuple[int, int]:
        """Strides of output row n and input column k (of packed row n/2 for INT4)."""
        w = self.weight
        return (w.stride(1), w.stride(0)) if self.fmt == INT8 else (w.stride(0), w.stride(1))


if triton is not None:
    from serve.runtime.kernels import pdl_start, pdl_wait

    @triton.jit
    def _add_pairs(a, b, c, d):
        return a + c, b + d

    @triton.jit
    def _row_stats(
        x_rows, m_ok, K, eps, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, ONE_PASS: tl.constexpr
    ):
        """Mean and 1/std of each row. Where BLOCK_S covers the row, each pass is one load; a second finds the
        row in L1. ONE_PASS: the sums of (x - c) and its square in one reduction of both, shifted by the row's
        first input c so that a large mean does not cancel the variance's digits: after the wait, one
        reduction in sequence instead of two (in a chain of dependent one-row linears on the H200, with the
        norm only, fp16 2.6 -> 2.4 us and int8 2.8 -> 2.6 a launch). Else two passes, as LayerNorm computes
        them: int4's register path, whose chain the one pass made slower (2.5 -> 2.7 us a launch)."""
        rk = tl.arange(0, BLOCK_S)
        total = tl.zeros((BLOCK_M,), tl.float32)
        sq = tl.zeros((BLOCK_M,), tl.float32)
        if ONE_PASS:
            c = tl.load(x_rows, mask=m_ok[:, None], other=0.0).to(tl.float32)  # [BLOCK_M, 1]
            for k0 in range(0, K, BLOCK_S):
                ok = m_ok[:, None] & (k0 + rk < K)[None, :]
                d = tl.where(
                    ok, tl.load(x_rows + k0 + rk[None, :], mask=ok, other=0.0).to(tl.float32) - c, 0.0
                )
                t, q = tl.reduce((d, d * d), 1, _add_pairs)
                total += t
                sq += q
            shift = total / K
            mean = tl.reshape(c, (BLOCK_M,)) + shift
            var = tl.maximum(sq / K - shift * shift, 0.0)
        else:
            for k0 in range(0, K, BLOCK_S):
                ok = m_ok[:, None] & (k0 + rk < K)[None, :]
                total += tl.sum(tl.load(x_rows + k0 + rk[None, :], mask=ok, other=0.0).to(tl.float32), axis=1)
            mean = total / K
            for k0 in range(0, K, BLOCK_S):
                ok = m_ok[:, None] & (k0 + rk < K)[None, :]
                d = tl.load(x_rows + k0 + rk[None, :], mask=ok, other=0.0).to(tl.float32) - mean[:, None]
                sq += tl.sum(tl.where(ok, d * d, 0.0), axis=1)
            var = sq / K
        return mean, 1.0 / tl.sqrt(var + eps)

    @triton.jit
    def _w_tile(w_ptr, cols, n_ok, k0, k_hi, N, stride_wn, stride_wk, FMT: tl.constexpr, GATHER: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        """The [BLOCK_K, BLOCK_N] weight tile of inputs k0.. (below k_hi), columns cols (integers for int8 / int4)."""
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < k_hi
        if FMT == 2 and not GATHER:  # packed int4: byte (j, k) holds columns 2j (low nibble), 2j+1 (high)
            HALF: tl.constexpr = BLOCK_N // 2
            rj = tl.program_id(0) * HALF + tl.arange(0, HALF)
            p = tl.load(w_ptr + rj[None, :] * stride_wn + kk[:, None] * stride_wk,
                        mask=(rj < N // 2)[None, :] & k_ok[:, None], other=0).to(tl.int32)  # fmt: skip
            w = tl.reshape(tl.join((p << 28) >> 28, (p << 24) >> 28), (BLOCK_K, BLOCK_N))
        elif FMT == 2:  # gathered int4 columns: each takes its own nibble of its byte
            p = tl.load(w_ptr + (cols // 2)[None, :] * stride_wn + kk[:, None] * stride_wk,
                        mask=n_ok[None, :] & k_ok[:, None], other=0).to(tl.int32)  # fmt: skip
            w = (p << (28 - 4 * (cols % 2))[None, :]) >> 28
        elif FMT == 1 and BLOCK_M == 1:
            # the same addresses, written so Triton vectorizes at most 8 inputs per thread: the fp16 activations'
            # layout, so the tile meets them without a trip through shared memory (`scripts/kernel_asm.py`)
            k8 = (kk // 8) * 8 + kk % 8
            w = tl.load(w_ptr + cols[None, :] * stride_wn + k8[:, None] * stride_wk,
                        mask=n_ok[None, :] & k_ok[:, None], other=0)  # fmt: skip
        else:
            w = tl.load(w_ptr + cols[None, :] * stride_wn + kk[:, None] * stride_wk,
                        mask=n_ok[None, :] & k_ok[:, None], other=0)  # fmt: skip
        return w

    @triton.jit
    def _slab_consts(s_ptr, pre_ptr, g_ptr, beta_ptr, cols, n_ok, k0, k_hi, stride_sn, FMT: tl.constexpr,
                     GROUP: tl.constexpr, HAS_LN: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_K: tl.constexpr):  # fmt: skip
        """What the product over inputs k0.. reads besides x and the weight tile, all of which no kernel writes:
        the LayerNorm's gamma and beta, int4's input scales, and its group scales on the register path."""
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < k_hi
        g, b, pre, gs = 0.0, 0.0, 0.0, 0.0
        if HAS_LN:  # masked columns get gamma = beta = 0, so they stay zero
            g = tl.load(g_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            b = tl.load(beta_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
        if FMT == 2:
            pre = tl.load(pre_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
            if BLOCK_M < 16 and BLOCK_K >= GROUP:  # a slab spans whole groups: one load per group
                GROUPS: tl.constexpr = BLOCK_K // GROUP
                gi = k0 // GROUP + tl.arange(0, GROUPS)
                s = tl.load(s_ptr + cols[None, :] * stride_sn + gi[:, None],
                            mask=n_ok[None, :] & (gi * GROUP < k_hi)[:, None], other=0.0).to(tl.float32)  # fmt: skip
                gs = tl.reshape(
                    tl.broadcast_to(s[:, None, :], (GROUPS, GROUP, s.shape[1])), (BLOCK_K, s.shape[1])
                )
            elif BLOCK_M < 16:  # each input's own group scale, so a slab may span groups
                gs = tl.load(s_ptr + cols[None, :] * stride_sn + (kk // GROUP)[:, None],
                             mask=n_ok[None, :] & k_ok[:, None], other=0.0).to(tl.float32)  # fmt: skip
        return g, b, pre, gs

    @triton.jit
    def _dequantized(w, gs, pre, FMT: tl.constexpr):
        """A register-path weight tile in fp32; int4's times its group scales gs and, per input, the AWQ input
        scales pre, which the tl.dot path applies to x instead."""
        w = w.to(tl.float32)
        if FMT == 2:
            w *= gs * pre[:, None]
        return w

    @triton.jit
    def _slab(x_rows, w, g, b, pre, gs, s_ptr, m_ok, cols, n_ok, k0, k_hi, mean, rstd, stride_sn, FMT: tl.constexpr,
              GROUP: tl.constexpr, HAS_LN: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_K: tl.constexpr, READY: tl.constexpr):  # fmt: skip
        """fp32 [BLOCK_M, BLOCK_N] product of LN(x) over inputs k0.. (below k_hi) and their weight tile w, with
        the slab's `_slab_consts` (g, b, pre, gs); READY: w is already `_dequantized` (register path)."""
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < k_hi
        a = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if HAS_LN:
            a = ((a.to(tl.float32) - mean[:, None]) * rstd[:, None] * g[None, :] + b[None, :]).to(
                x_rows.dtype.element_ty
            )
        if FMT == 2 and BLOCK_M >= 16:
            a = (a.to(tl.float32) * pre[None, :]).to(x_rows.dtype.element_ty)
        if BLOCK_M < 16:  # a dot product per row and column in registers (tl.dot takes 16 rows)
            wf = w
            if not READY:
                wf = _dequantized(w, gs, pre, FMT)
            if BLOCK_M == 1:
                return tl.sum(tl.trans(a).to(tl.float32) * wf, axis=0, keep_dims=True)
            return tl.sum(a.to(tl.float32)[:, :, None] * wf[None, :, :], axis=1)
        w = w.to(x_rows.dtype.element_ty)
        part = tl.dot(a, w, input_precision="ieee") if IEEE else tl.dot(a, w)
        if FMT == 2:  # BLOCK_K divides GROUP: one scale per column in this K slab
            s = tl.load(s_ptr + cols * stride_sn + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)
            part = part * s[None, :]
        return part

    @triton.jit
    def _matmul_tile(x_ptr, w_ptr, s_ptr, pre_ptr, g_ptr, beta_ptr, res_ptr, rm, m_ok, cols, n_ok, N, K, k_lo, k_hi,
                     eps, stride_xm, stride_wn, stride_wk, stride_sn, stride_rm, FMT: tl.constexpr,
                     GROUP: tl.constexpr, HAS_LN: tl.constexpr, GATHER: tl.constexpr, IEEE: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
                     EARLY_RES: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
        """(fp32 [BLOCK_M, BLOCK_N] tile of LN(x) W^T over inputs k_lo..k_hi (a multiple of BLOCK_K apart,
        or up to K) for output columns `cols`: program_id(0)'s contiguous block, or any ids with
        GATHER (the lm_head over a shortlist); with EARLY_RES, that tile of the residual, else 0).
        The LayerNorm statistics always cover all K inputs.

        The residual is requested as soon as the wait returns, beside x: requested in the epilogue, its
        round trip came after the product's reduction.

        With register dot products (BLOCK_M < 16), all that the first slab reads besides x, and int8's channel
        scales, are requested first: before the previous kernel has finished (`kernels.pdl_wait`), and before
        the statistics' reads of x. An int4 tile is also unpacked and scaled by then: in a chain of dependent
        one-row linears on the H200, 3.2 -> 2.9 us a launch (fp16 and int8, whose conversion is one
        instruction, measured no faster for it)."""
        x_rows = x_ptr + rm[:, None] * stride_xm
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        k_first = k_lo
        if BLOCK_M < 16:  # register dot products
            if FMT == 1:
                channel = tl.load(s_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)
            w = _w_tile(
                w_ptr, cols, n_ok, k_lo, k_hi, N, stride_wn, stride_wk, FMT, GATHER, BLOCK_M, BLOCK_N, BLOCK_K
            )
            g, b, pre, gs = _slab_consts(s_ptr, pre_ptr, g_ptr, beta_ptr, cols, n_ok, k_lo, k_hi, stride_sn, FMT,
                                         GROUP, HAS_LN, BLOCK_M, BLOCK_K)  # fmt: skip
            w0 = w
            if FMT == 2:
                w0 = _dequantized(w, gs, pre, FMT)
            k_first = k_lo + BLOCK_K
        pdl_wait(PDL)
        res = 0.0
        if EARLY_RES:
            res = tl.load(res_ptr + rm[:, None] * stride_rm + cols[None, :], mask=m_ok[:, None] & n_ok[None, :],
                          other=0.0)  # fmt: skip
        mean = tl.zeros((BLOCK_M,), tl.float32)
        rstd = mean
        if HAS_LN:
            mean, rstd = _row_stats(x_rows, m_ok, K, eps, BLOCK_M, BLOCK_S, FMT != 2)
        if BLOCK_M < 16:
            acc = _slab(x_rows, w0, g, b, pre, gs, s_ptr, m_ok, cols, n_ok, k_lo, k_hi, mean, rstd, stride_sn, FMT,
                        GROUP, HAS_LN, IEEE, BLOCK_M, BLOCK_K, FMT == 2)  # fmt: skip
        for k0 in range(k_first, k_hi, BLOCK_K):
            w = _w_tile(
                w_ptr, cols, n_ok, k0, k_hi, N, stride_wn, stride_wk, FMT, GATHER, BLOCK_M, BLOCK_N, BLOCK_K
            )
            g, b, pre, gs = _slab_consts(s_ptr, pre_ptr, g_ptr, beta_ptr, cols, n_ok, k0, k_hi, stride_sn, FMT,
                                         GROUP, HAS_LN, BLOCK_M, BLOCK_K)  # fmt: skip
            acc += _slab(x_rows, w, g, b, pre, gs, s_ptr, m_ok, cols, n_ok, k0, k_hi, mean, rstd, stride_sn, FMT,
                         GROUP, HAS_LN, IEEE, BLOCK_M, BLOCK_K, False)  # fmt: skip
        if FMT == 1:
            if BLOCK_M >= 16:  # after the loop: the one run that read it first had the int8 lm_head slower
                channel = tl.load(s_ptr + cols, mask=n_ok, other=0.0).to(tl.float32)
            acc = acc * channel[None, :]
        return acc, res

    @triton.jit
    def _linear_kernel(x_ptr, w_ptr, s_ptr, pre_ptr, g_ptr, beta_ptr, bias_ptr, res_ptr, y_ptr, ws_ptr, lock_ptr,
                       kp_ptr, vp_ptr, slots_ptr, M, N, K, eps, stride_xm, stride_wn, stride_wk, stride_sn, stride_rm,
                       stride_ym, stride_ps,
                       FMT: tl.constexpr, GROUP: tl.constexpr, HAS_LN: tl.constexpr, HAS_BIAS: tl.constexpr,
                       ACT: tl.constexpr, HAS_RES: tl.constexpr, IEEE: tl.constexpr, SPLIT_K: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_S: tl.constexpr, KV: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
        # With SPLIT_K > 1, program_id(2) takes one slab of K: it stores its partial tile in the
        # workspace and counts itself in the tile's lock; the last to arrive sums the partials in
        # slab order (so results do not depend on arrival order), resets the lock for the next
        # launch (or graph replay), and runs the epilogue.
        pdl_start(PDL)
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        ok = m_ok[:, None] & (rn < N)[None, :]
        slab = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
        k_lo = tl.program_id(2) * slab
        bias = 0.0
        if HAS_BIAS:  # requested before _matmul_tile waits for the previous kernel: no kernel writes it
            bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        acc, res = _matmul_tile(x_ptr, w_ptr, s_ptr, pre_ptr, g_ptr, beta_ptr, res_ptr, rm, m_ok, rn, rn < N, N, K,
                                k_lo, tl.minimum(K, k_lo + slab), eps, stride_xm, stride_wn, stride_wk, stride_sn,
                                stride_rm, FMT, GROUP, HAS_LN, False, IEEE, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_S,
                                HAS_RES and SPLIT_K == 1, PDL)  # fmt: skip
        slot = rm
        if KV:
            slot = tl.load(slots_ptr + rm, mask=m_ok, other=0).to(tl.int64)
        if SPLIT_K == 1:
            _epilogue(acc, bias, res, y_ptr, rm, rn, ok, N, stride_ym, HAS_BIAS, ACT, HAS_RES, kp_ptr, vp_ptr, slot,
                      stride_ps, KV)  # fmt: skip
        else:
            parts = ws_ptr + rm[:, None] * N + rn[None, :]
            tl.store(parts + tl.program_id(2) * M * N, acc, mask=ok)
            lock = lock_ptr + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
            arrived = tl.atomic_add(lock, 1, sem="acq_rel")  # releases this store, acquires the others'
            if arrived == SPLIT_K - 1:
                acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
                for i in tl.static_range(SPLIT_K):
                    acc += tl.load(parts + i * M * N, mask=ok, other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(lock, 0)
                last_res = 0.0
                if HAS_RES:  # read by the one program that adds it
                    last_res = tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=ok, other=0.0)
                _epilogue(acc, bias, last_res, y_ptr, rm, rn, ok, N, stride_ym, HAS_BIAS, ACT, HAS_RES, kp_ptr,
                          vp_ptr, slot, stride_ps, KV)  # fmt: skip

    @triton.jit
    def _epilogue(acc, bias, res, y_ptr, rm, rn, ok, N, stride_ym, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                  HAS_RES: tl.constexpr, kp_ptr, vp_ptr, slot, stride_ps, KV: tl.constexpr):  # fmt: skip
        if HAS_BIAS:
            acc += bias[None, :]
        if ACT == 1:
            acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
        elif ACT == 2:  # tanh approximation; tanh(z) = 2 sigmoid(2z) - 1
            z = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
            acc = acc * tl.sigmoid(2.0 * z)
        elif ACT == 3:
            acc = tl.maximum(acc, 0.0)
        if HAS_RES:
            acc += res.to(tl.float32)
        y = acc.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y, mask=ok)
        if KV:  # a fused QKV's K and V thirds are also this step's cache rows (pool slots of heads x dims)
            third = N // 3
            dst = slot[:, None] * stride_ps + (rn % third)[None, :]
            tl.store(kp_ptr + dst, y, mask=ok & ((rn >= third) & (rn < 2 * third))[None, :])
            tl.store(vp_ptr + dst, y, mask=ok & (rn >= 2 * third)[None, :])

    @triton.jit
    def _lm_head_kernel(x_ptr, w_ptr, s_ptr, pre_ptr, g_ptr, beta_ptr, blocked_ptr, ids_ptr, count_ptr, rows_ptr,
                        allowed_ptr, pmax_ptr, psum_ptr, cval_ptr, cidx_ptr, M, N, K, eps, eos, stride_xm, stride_wn,
                        stride_wk, stride_sn, stride_allowed, FMT: tl.constexpr, GROUP: tl.constexpr,
                        HAS_LN: tl.constexpr, SHORTLIST: tl.constexpr, IEEE: tl.constexpr, TOPK: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_S: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
        # One tile of candidate tokens per program (the vocabulary, or the shortlist's ids): its
        # softmax partial and its TOPK best, with EOS masked where blocked and, under a shortlist,
        # each row's tokens outside its own list masked too.
        pdl_start(PDL)
        tile = tl.program_id(0)
        tiles = tl.num_programs(0)
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = rm < M
        pos = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        count = N
        if SHORTLIST:
            count = tl.load(count_ptr)  # the host's upload, not a kernel's output: read before the wait
        out = rm * (tiles * TOPK) + tile * TOPK
        if tile * BLOCK_N < count:  # a tile past a shortlist's end does nothing; the merge skips it
            pdl_wait(PDL)
            valid = pos < count
            cols = pos
            if SHORTLIST:
                cols = tl.load(ids_ptr + pos, mask=valid, other=0)
            acc, _ = _matmul_tile(x_ptr, w_ptr, s_ptr, pre_ptr, g_ptr, beta_ptr, x_ptr, rm, m_ok, cols, valid, N, K,
                                  0, K, eps, stride_xm, stride_wn, stride_wk, stride_sn, 0, FMT, GROUP, HAS_LN,
                                  SHORTLIST, IEEE, BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_S, False, False)  # fmt: skip
            keep = valid[None, :]
            if SHORTLIST:
                row = tl.load(rows_ptr + rm, mask=m_ok, other=0)
                keep = tl.load(allowed_ptr + row[:, None] * stride_allowed + cols[None, :],
                               mask=m_ok[:, None] & keep, other=0) != 0  # fmt: skip
            logit = tl.where(keep, acc, float("-inf"))
            mx = tl.max(logit, axis=1)
            shift = tl.where(mx == float("-inf"), 0.0, mx)  # a row may keep nothing in this tile
            tl.store(pmax_ptr + rm * tiles + tile, mx, mask=m_ok)
            tl.store(psum_ptr + rm * tiles + tile, tl.sum(tl.exp(logit - shift[:, None]), axis=1), mask=m_ok)
            blocked = tl.load(blocked_ptr + rm, mask=m_ok, other=0) != 0
            sel = tl.where(blocked[:, None] & (cols == eos)[None, :], float("-inf"), logit)
            lanes = tl.arange(0, BLOCK_N)
            for i in tl.static_range(TOPK):  # one reduction per candidate; the id is read back by position
                val, best = tl.max(sel, axis=1, return_indices=True, return_indices_tie_break_left=True)
                tl.store(cval_ptr + out + i, val, mask=m_ok)
                idx = tile * BLOCK_N + best
                if SHORTLIST:
                    idx = tl.load(ids_ptr + idx, mask=m_ok, other=0)
                tl.store(cidx_ptr + out + i, idx, mask=m_ok)
                if i + 1 < TOPK:
                    sel = tl.where(lanes[None, :] == best[:, None], float("-inf"), sel)

    @triton.jit
    def _topk_merge_kernel(pmax_ptr, psum_ptr, cval_ptr, cidx_ptr, val_ptr, idx_ptr, top1_ptr, count_ptr, TILES,
                           TOP1_ROWS, TILE_N, SHORTLIST: tl.constexpr, TOPK: tl.constexpr, BLOCK_T: tl.constexpr,
                           BLOCK_C: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
        # One row per program: log-sum-exp of the tiles' partials, then the TOPK best candidates; the
        # first TOP1_ROWS rows' best id also goes to top1. Under a shortlist only the tiles its count
        # reaches wrote anything.
        pdl_start(PDL)
        pdl_wait(PDL)
        row = tl.program_id(0)
        active = TILES
        if SHORTLIST:
            active = tl.minimum(tl.cdiv(tl.load(count_ptr), TILE_N), TILES)
        t = tl.arange(0, BLOCK_T)
        pmax = tl.load(pmax_ptr + row * TILES + t, mask=t < active, other=float("-inf"))
        psum = tl.load(psum_ptr + row * TILES + t, mask=t < active, other=0.0)
        top = tl.max(pmax, axis=0)
        top = tl.where(top == float("-inf"), 0.0, top)  # a row that may emit nothing gets -inf values
        lse = top + tl.log(tl.maximum(tl.sum(psum * tl.exp(pmax - top), axis=0), 1.0))  # the sum is >= 1
        c = tl.arange(0, BLOCK_C)
        n = TILES * TOPK
        cand = tl.load(cval_ptr + row * n + c, mask=c < active * TOPK, other=float("-inf"))
        for i in tl.static_range(TOPK):
            best = tl.argmax(cand, axis=0)
            tl.store(val_ptr + row * TOPK + i, tl.max(cand, axis=0) - lse)
            idx = tl.load(cidx_ptr + row * n + best, mask=best < active * TOPK, other=0).to(tl.int64)
            tl.store(idx_ptr + row * TOPK + i, idx)
            if i == 0:
                tl.store(top1_ptr + row, idx, mask=row < TOP1_ROWS)
            cand = tl.where(c == best, float("-inf"), cand)

    @triton.jit
    def _normalized(x, ok, g, b, D, eps):
        """LayerNorm of one fp32 row x (masked by ok) with the norm's fp32 weight g and bias b: the mean, then
        the centred squares, from the row in registers."""
        mean = tl.sum(x, axis=0) / D
        diff = tl.where(ok, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / D + eps)
        return diff * rstd * g + b

    @triton.jit
    def _layer_norm_kernel(x_ptr, g_ptr, beta_ptr, y_ptr, D, eps, stride_x, stride_y, BLOCK_D: tl.constexpr,
                           PDL: tl.constexpr):  # fmt: skip
        # One row per program. Unlike PyTorch's LayerNorm it takes programmatic dependent launch both ways: it is
        # running, its weights read, when its predecessor ends, and it lets its successor start early.
        pdl_start(PDL)
        d = tl.arange(0, BLOCK_D)
        ok = d < D
        g = tl.load(g_ptr + d, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(beta_ptr + d, mask=ok, other=0.0).to(tl.float32)
        pdl_wait(PDL)
        i = tl.program_id(0)
        x = tl.load(x_ptr + i * stride_x + d, mask=ok, other=0.0).to(tl.float32)
        y = _normalized(x, ok, g, b, D, eps)
        tl.store(y_ptr + i * stride_y + d, y.to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _embed_kernel(tokens_ptr, positions_ptr, tok_w_ptr, pos_w_ptr, g_ptr, beta_ptr, y_ptr, D, scale, eps,
                      stride_tok, stride_pos, stride_y, BLOCK_D: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
        # One row per program, rounded where PyTorch's ops round: the scaled token embedding and the sum
        # in the weights' dtype, the LayerNorm in float32.
        pdl_start(PDL)
        d = tl.arange(0, BLOCK_D)
        ok = d < D
        g = tl.load(g_ptr + d, mask=ok, other=0.0).to(tl.float32)
        b = tl.load(beta_ptr + d, mask=ok, other=0.0).to(tl.float32)
        pdl_wait(PDL)  # the tokens may be the previous step's choices
        i = tl.program_id(0)
        token = tl.load(tokens_ptr + i)
        position = tl.load(positions_ptr + i)
        dtype = y_ptr.dtype.element_ty
        e = (tl.load(tok_w_ptr + token * stride_tok + d, mask=ok, other=0.0).to(tl.float32) * scale).to(dtype)
        p = tl.load(pos_w_ptr + position * stride_pos + d, mask=ok, other=0.0)
        x = (e.to(tl.float32) + p.to(tl.float32)).to(dtype).to(tl.float32)
        tl.store(y_ptr + i * stride_y + d, _normalized(x, ok, g, b, D, eps).to(dtype), mask=ok)


def _block_m(m: int) -> int:
    """Rows per program: up to REGISTER_ROWS take register dot products, more take tl.dot (16 rows at least)."""
    if m <= REGISTER_ROWS:
        return triton.next_power_of_2(m)
    return 16 if m <= 16 else 32 if m <= 32 else 64


def row_variants(max_rows: int) -> list[int]:
    """The fewest row counts up to `max_rows` that launch every variant of a layer's `linear_triton` that the
    row count selects: the row block, the number of row tiles (split-K follows it), the norm inside or first,
    and Triton's own specializations of one row and of multiples of 16. Triton compiles each variant at its
    first launch, a stall of about half a second on the H200 for whichever request meets it first."""
    seen, rows = set(), []
    for m in range(1, max_rows + 1):
        bm = _block_m(m)
        key = (bm, -(-m // bm), m < NORM_FIRST_ROWS, m == 1, m % 16 == 0)
        if key not in seen:
            seen.add(key)
            rows.append(m)
    return rows


def _stats_block(bm: int, bk: int, k: int) -> int:
    """Width of the LayerNorm statistics' loads: a single row's whole width (one load per pass, up to
    8192), else BLOCK_K."""
    return max(bk, min(triton.next_power_of_2(k), 8192)) if bm < 16 else bk


def _tiles(w: Weights, n: int, k: int, bm: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, warps): the fastest measured on the H100 (`scripts/bench_kernels.py --sweep`).

    Up to `REGISTER_ROWS` rows read narrow tiles of the whole K (up to 4096), so that all of a program's
    weights are requested before the wait; the 16-row tiles were swept at one row, before one row had its own
    path. (Float tiles of 16 columns time faster alone on the H200, QKV 4.3 -> 3.8 us, but the step's graph
    0.471 -> 0.530 ms.)"""
    if bm < 16:  # register dot products over the whole K: at two rows, slabs of half of it (K <= 1024) or of
        # 2048 / 1024 (the FFN output) requested the rest after the wait. On the H200 at two rows, weights from HBM,
        # us (`replay-two-row-slab.json`): QKV fp16 6.0 -> 5.3, int8 5.0 -> 5.7, int4 5.2 -> 3.9; attention output
        # 3.3 / 3.1 / 3.3 -> 2.4 / 2.0 / 1.8; FFN output 5.4 / 6.4 / 7.2 -> 4.6 / 5.4 / 5.3; fc 6.5 / 8.4 / 5.7 ->
        # 6.4 / 6.7 / 6.3
        if k > 1024:  # FFN output, one row: fp16 4.4-5.1 -> 3.5 us, int8 4.8 -> 3.1 on the H200; int4 too
            return 4, min(triton.next_power_of_2(k), 4096), 8
        return (8 if w.fmt == INT4 else 4), 1024, 4
    # tl.dot tiles of int4 and int8 from a sweep of 32 and 64 rows on the H200, then kept only where whole decode
    # graphs got faster (`kernels-int-dot-tiles-sweep.json`, `replay-int-dot-tiles.json`): int4's 32-row graph
    # 0.986 -> 0.940 ms with 64 columns (8 and 16 rows got 12% slower with them, 64 rows 5%); int8's 64 / 128-row
    # graphs 0.905 / 1.291 -> 0.869 / 1.250 with 32 columns where N <= 2048 (its FFN output alone 11.9 -> 8.5 us;
    # the 32-row graph got 12% slower with them)
    if w.fmt == INT4:
        return (64 if bm == 32 else 32), min(64, w.group), 4
    if w.fmt == INT8:
        return (16, 1024, 4) if n <= 2048 and bm < 64 else (32, 512, 4)
    return (16, 512, 4) if n <= 2048 else (32, 256, 4)


def _split_k(fmt: int, tiles: int, k: int, bk: int) -> int:
    """K slabs per output tile. A decode-shaped layer with few output tiles leaves SMs idle while
    each program runs a long K loop, so its K is split into slabs of at least two BLOCK_K
    iterations while the programs stay within SPLIT_PROGRAMS. Measured at one row on the H100
    (`scripts/bench_kernels.py --split-k`): int4 proj 27 -> 8 us, int8 proj 12 -> 9 us; layers
    with 96 or more float/int8 tiles only lose by it, while int4's slow unpacking pays up to 256."""
    split = 1
    while tiles * split * 2 <= SPLIT_PROGRAMS[fmt] and k >= bk * split * 4:
        split *= 2
    return split


def _cap_k(bm: int, bn: int, bk: int, elem: int) -> int:
    """BLOCK_K (a power of two, so it still divides an int4 group) capped so that one pipeline stage
    of x and weight tiles fits 72 KiB of shared memory (three stages fit an H100's 227 KiB)."""
    cap = max(16, 73728 // ((bm + bn) * elem))
    return min(bk, 1 << (cap.bit_length() - 1))


def row_limit(fmt: int, norm: torch.nn.LayerNorm | None, residual: torch.Tensor | None) -> int:
    """The most rows at which a linear of this weight format, with this norm and residual, runs as a kernel
    (`MAX_ROWS`, `RESIDUAL_MAX_ROWS`, `NORMED_MAX_ROWS`)."""
    if norm is None and residual is not None:
        return max(MAX_ROWS[fmt], RESIDUAL_MAX_ROWS.get(fmt, 0))
    if norm is not None:
        return max(MAX_ROWS[fmt], NORMED_MAX_ROWS.get(fmt, 0))
    return MAX_ROWS[fmt]


def usable(x: torch.Tensor, w: Weights | None, max_rows: int | None = None) -> bool:
    """Whether the Triton kernels can run this input (else the reference runs)."""
    rows = x.numel() // x.shape[-1]
    if not (ENABLED and w is not None and kernels.triton_ok(x)):
        return False
    return 0 < rows <= (max_rows or MAX_ROWS[w.fmt])


def _norm_first(x: torch.Tensor, norm: torch.nn.LayerNorm | None, min_rows: int):
    """(LN(x), None) from `min_rows` rows on, as its own launch (`layer_norm`): a kernel's output tiles would
    each re-read all rows twice for the statistics. Below that, (x, norm) for the kernel's prologue."""
    if norm is not None and x.numel() >= min_rows * x.shape[-1]:
        return layer_norm(x, norm), None
    return x, norm


def layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    """norm(x) as a Triton launch with programmatic dependent launch where Triton runs, except at
    `TORCH_NORM_ROWS` (else the module).

    From `NORM_FIRST_ROWS` rows a decode step runs 37 of them (before 36 linears and the lm_head). PyTorch's
    LayerNorm kernel starts only once its predecessor has ended, and its successor only once it has ended:
    a launch gap on both sides of each. The fp16 64-row graph on the H200 (mid-wave, one process, two rounds;
    `ln-split-ab.json`): zh 0.922 -> 0.803 ms a step, ru 1.088 -> 0.963; what the norms add to the step's
    critical path, 142 -> 45 us. Closed loops over every language at 16 / 64 / 128 clients (second round):
    17 800 / 52 500 / 61 300 -> 18 500 / 59 000 / 70 900 tok/s."""
    d = x.shape[-1]
    rows = x.numel() // d if d else 0
    lo, hi = TORCH_NORM_ROWS
    affine = norm.weight is not None and norm.bias is not None
    if (
        not (ENABLED and kernels.triton_ok(x) and affine)
        or norm.weight.dtype != x.dtype
        or not rows
        or lo <= rows <= hi
    ):
        return norm(x)
    x2 = _rows(x)
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    block = triton.next_power_of_2(d)
    _layer_norm_kernel[(x2.shape[0],)](x2, norm.weight, norm.bias, y, d, norm.eps, x2.stride(0), y.stride(0),
                                       BLOCK_D=block, num_warps=max(1, min(8, block // 256)),
                                       **kernels.pdl_args(x))  # fmt: skip
    return y.reshape(x.shape)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, features] with unit stride along the features, as the kernels index it."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _common(x: torch.Tensor, w: Weights, norm: torch.nn.LayerNorm | None):
    x2 = _rows(x)
    dummy = x2  # for pointers a kernel variant never reads
    s = w.scale if w.scale is not None else dummy
    pre = w.prequant if w.prequant is not None else dummy
    g, beta = (norm.weight, norm.bias) if norm is not None else (dummy, dummy)
    eps = norm.eps if norm is not None else 0.0
    sn = s.stride(0) if s.dim() > 1 else 1
    return x2, s, pre, g, beta, eps, sn


def linear_triton(x: torch.Tensor, w: Weights, n: int, bias: torch.Tensor | None = None,
                  norm: torch.nn.LayerNorm | None = None, act: str | None = None,
                  residual: torch.Tensor | None = None, block_n: int | None = None,
                  block_k: int | None = None, num_warps: int | None = None, split_k: int | None = None,
                  block_m: int | None = None, kv: KVOut | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """act(LN(x) W^T + bias)[:, :n] + residual in one launch (see the module docstring); with `kv`, the
    K and V thirds of a fused QKV also go to the cache in the same launch. `out` ([rows, n], any float
    dtype) receives the result instead of a new tensor of x's dtype."""
    x, norm = _norm_first(x, norm, NORM_FIRST_ROWS)
    x2, s, pre, g, beta, eps, sn = _common(x, w, norm)
    m, k = x2.shape
    y = out if out is not None else torch.empty(m, n, dtype=x.dtype, device=x.device)
    res = residual.reshape(m, n) if residual is not None else y
    bm = block_m or _block_m(m)
    bn, bk, warps = _tiles(w, n, k, bm)
    bn = block_n or bn
    bk = _cap_k(bm, bn, min(block_k or bk, triton.next_power_of_2(k)), x.element_size())
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    split = split_k or _split_k(w.fmt, grid[0] * grid[1], k, bk)
    if split > 1 and grid[0] * grid[1] > LOCKS:
        raise ValueError(f"split-K over {grid[0] * grid[1]} output tiles; the lock table has {LOCKS}")
    ws = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else y
    wn, wk = w.n_k_strides()
    fused_kv = kv is not None and kv.flat_heads()
    kp, vp, slots = (kv.k_pool, kv.v_pool, kv.slots) if fused_kv else (y, y, y)
    _linear_kernel[(*grid, split)](
        x2, w.weight, s, pre, g, beta, bias if bias is not None else y, res, y, ws,
        kernels.arrival_counters("split-K", x.device, LOCKS), kp, vp, slots,
        m, n, k, eps, x2.stride(0), wn, wk, sn, res.stride(0), y.stride(0), kp.stride(1) if fused_kv else 0,
        FMT=w.fmt, GROUP=w.group, HAS_LN=norm is not None, HAS_BIAS=bias is not None, ACT=ACT_CODES[act],
        HAS_RES=residual is not None, IEEE=x.dtype == torch.float32, SPLIT_K=split, BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_K=bk, BLOCK_S=_stats_block(bm, bk, k), KV=fused_kv, num_warps=num_warps or warps,
        **kernels.pdl_args(x),
    )  # fmt: skip
    if kv is not None and not fused_kv:
        kv.store(y)
    return y.reshape(*x.shape[:-1], n)


def linear_reference(x: torch.Tensor, w: Weights, n: int, bias: torch.Tensor | None = None,
                     norm: torch.nn.LayerNorm | None = None, act: str | None = None,
                     residual: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """The definition: LayerNorm, dequantize, F.linear, activation, residual add."""
    if norm is not None:
        x = norm(x)
    if w.fmt == INT4:
        x = x * w.prequant.to(x.dtype)
    y = F.linear(x, w.dequantized(x.dtype)[:n], None if bias is None else bias[:n])
    return _finish(y, act, residual)


def _finish(y: torch.Tensor, act: str | None, residual: torch.Tensor | None) -> torch.Tensor:
    """The reference epilogue: activation, then residual add."""
    if act is not None:
        y = ACTIVATIONS[act](y)
    return y if residual is None else residual + y


def linear(x: torch.Tensor, layer, norm: torch.nn.LayerNorm | None = None, act: str | None = None,
           residual: torch.Tensor | None = None, n: int | None = None, kv: KVOut | None = None) -> torch.Tensor:  # fmt: skip
    """act(norm(x) W^T + b)[..., :n] + residual for a `Linear` (row-parallel ones all-reduce first); with
    `kv`, a fused QKV projection's K and V are also stored as this step's cache rows.

    One kernel where `usable`; otherwise the layer's own modules, so CPU, prefill and
    SmoothQuant run exactly the path they always did.
    """
    n = n or layer.out_features
    w = layer.kernel_weights()
    if not usable(x, w, row_limit(w.fmt, norm, residual) if w else None):
        h = norm(x) if norm is not None else x
        y = _finish(layer(h) if n == layer.out_features else layer.forward_rows(h, n), act, residual)
        if kv is not None:
            kv.store(y)
        return y
    if layer.reduce and tp.world_size() > 1:
        if act is None:  # rank 0's partial carries the bias and residual into the sum: no launches after it
            first = tp.rank() == 0
            out = tp.partial_out(x.numel() // x.shape[-1], n, x.dtype)
            y = linear_triton(x, w, n, layer.bias if first else None, norm, residual=residual if first else None,
                              out=out)  # fmt: skip
            return tp.all_reduce(y).to(x.dtype)
        y = tp.all_reduce(linear_triton(x, w, n, norm=norm))
        return _finish(y if layer.bias is None else y + layer.bias, act, residual)
    return linear_triton(x, w, n, layer.bias, norm, act, residual, kv=kv)


@dataclass(frozen=True)
class KVOut:
    """A decoder layer's paged K/V pools [blocks, block_size, heads, head_size] and the flat slot of each
    query row: where a fused QKV projection's K and V thirds go."""

    k_pool: torch.Tensor
    v_pool: torch.Tensor
    slots: torch.Tensor

    def flat_heads(self) -> bool:
        """Whether a slot's heads x dims are contiguous, so the linear kernel can store K and V itself."""
        return all(p.stride(3) == 1 and p.stride(2) == p.shape[3] for p in (self.k_pool, self.v_pool))

    def store(self, qkv: torch.Tensor) -> None:
        """Store the K and V thirds of a QKV output [rows, 3 * heads * head_size] (`kernels.write_kv`)."""
        parts = qkv.reshape(-1, 3, *self.k_pool.shape[2:])
        kernels.write_kv(self.k_pool, self.v_pool, self.slots, parts[:, 1], parts[:, 2])


@dataclass(frozen=True)
class Shortlist:
    """The tokens each query row may emit, as the lm_head kernel reads them.

    `allowed[rows[i], t]` says whether query row i may emit token t; `ids[:count]` are the tokens
    any of them may (ascending), so the kernel reads only those lm_head rows. Everything stays on
    the device with fixed shapes, so a CUDA graph can replay it while the batch changes; the engine
    fills `ids` and `count` from the host (`shortlist.ShortlistUnion`).
    """

    allowed: torch.Tensor  # uint8 [table rows, vocab]
    rows: torch.Tensor  # [m]
    ids: torch.Tensor  # int32 [vocab]; only the first `count` are read
    count: torch.Tensor  # int32 [1]

    @classmethod
    def of(cls, allowed: torch.Tensor, rows: torch.Tensor) -> Shortlist:
        """The shortlist of these rows with the union computed here (tests, benchmarks)."""
        union = torch.nonzero(allowed[rows].amax(dim=0)).flatten().to(torch.int32)
        ids = torch.zeros(allowed.shape[1], dtype=torch.int32, device=allowed.device)
        ids[: len(union)] = union
        return cls(allowed, rows, ids, torch.full((1,), len(union), dtype=torch.int32, device=allowed.device))

    def mask(self, stop: int, start: int = 0) -> torch.Tensor:
        """bool [m, stop - start]: which of the tokens start..stop each query row may emit."""
        return self.allowed[self.rows, start:stop] != 0


def lm_head_topk_triton(x: torch.Tensor, w: Weights, vocab: int, k: int, eos_id: int, eos_blocked: torch.Tensor,
                        norm: torch.nn.LayerNorm | None = None, shortlist: Shortlist | None = None,
                        block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
                        top1: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Top-k log-probabilities and ids [rows, k] of softmax(LN(x) W^T)[:, :vocab], EOS masked where blocked,
    over each row's shortlist where one is given (log-probabilities normalized over it). Each row's best id
    also goes to `top1`, as far as it goes.

    The LayerNorm runs first, as its own launch: in the kernel, each of the ~1000 vocabulary tiles would
    read all rows twice more for their statistics (at 64 rows on the H200, as much traffic as the weights
    themselves), and each tile waits for them before it requests its weights. Even at one row a launch
    costs less over the whole vocabulary (on the H200: fp16 137.7 -> 129.8 us, int8 123.7 -> 99.3; the
    fp16 batch-1 step 0.381 -> 0.372 ms). Only one row over a shortlist, whose few hundred tiles are
    bound by their latency, keeps it inside (one launch first: fp16 31.1 -> 32.0 us, int8 27.5 -> 33.8)."""
    x, norm = _norm_first(x, norm, 1 if shortlist is None else 2)
    x2, s, pre, g, beta, eps, sn = _common(x, w, norm)
    m, kdim = x2.shape
    # measured best on the H100 at one row: wide float tiles with 8 warps; 128 x 128 (x 64 for int4)
    float_tiles = w.fmt == FLOAT
    block_n = block_n or (256 if float_tiles else 128)
    bm = max(16, _block_m(m))  # one-row register dot products measured 3-5x slower over these wide tiles
    # Over a shortlist on the H200: int8 with 8 warps, 35 -> 28 us at one row (over the whole vocabulary its
    # 4 warps stay faster); int4 up to 16 rows with 8 warps and a whole group per K step, top-1 / top-8 over
    # 32 000 tokens 39.0 / 52.8 -> 30.2 / 44.6 us at one row, 38.0 / 50.4 -> 30.8 / 44.0 at 16 rows (at 64
    # rows 47.7 / 87.3 -> 55.2 / 73.5)
    wide_int4 = w.fmt == INT4 and shortlist is not None and bm == 16
    int4_k = min(128 if wide_int4 else 64, w.group)
    block_k = _cap_k(bm, block_n, block_k or (int4_k if w.fmt == INT4 else 128), x.element_size())
    num_warps = num_warps or (
        8 if float_tiles or wide_int4 or (w.fmt == INT8 and shortlist is not None) else 4
    )
    tiles = triton.cdiv(vocab, block_n)
    pmax = torch.empty(m, tiles, dtype=torch.float32, device=x.device)
    psum = torch.empty_like(pmax)
    cval = torch.empty(m, tiles * k, dtype=torch.float32, device=x.device)
    cidx = torch.empty(m, tiles * k, dtype=torch.int32, device=x.device)
    wn, wk = w.n_k_strides()
    sl = shortlist or Shortlist(x2, x2, x2, x2)  # pointers the SHORTLIST=False variant never reads
    _lm_head_kernel[(tiles, triton.cdiv(m, bm))](
        x2, w.weight, s, pre, g, beta, eos_blocked, sl.ids, sl.count, sl.rows, sl.allowed, pmax, psum, cval, cidx,
        m, vocab, kdim, eps, eos_id, x2.stride(0), wn, wk, sn, sl.allowed.stride(0), FMT=w.fmt, GROUP=w.group,
        HAS_LN=norm is not None, SHORTLIST=shortlist is not None, IEEE=x.dtype == torch.float32, TOPK=k,
        BLOCK_M=bm, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_S=_stats_block(bm, block_k, kdim),
        num_warps=num_warps, **kernels.pdl_args(x),
    )  # fmt: skip
    values = torch.empty(m, k, dtype=torch.float32, device=x.device)
    ids = torch.empty(m, k, dtype=torch.long, device=x.device)
    block_c = triton.next_power_of_2(tiles * k)
    _topk_merge_kernel[(m,)](pmax, psum, cval, cidx, values, ids, ids if top1 is None else top1, sl.count, tiles,
                             0 if top1 is None else min(m, len(top1)), block_n, SHORTLIST=shortlist is not None,
                             TOPK=k, BLOCK_T=triton.next_power_of_2(tiles), BLOCK_C=block_c,
                             num_warps=max(1, min(16, block_c // 1024)), **kernels.pdl_args(x))  # fmt: skip
    return values, ids


def lm_head_topk_reference(x: torch.Tensor, w: Weights, vocab: int, k: int, eos_id: int,
                           eos_blocked: torch.Tensor, norm: torch.nn.LayerNorm | None = None,
                           shortlist: Shortlist | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The definition: `topk_logprobs` of the float32 logits."""
    return topk_logprobs(linear_reference(x, w, vocab, norm=norm).float(), k, eos_id, eos_blocked, shortlist)


def topk_logprobs(logits: torch.Tensor, k: int, eos_id: int, eos_blocked: torch.Tensor,
                  shortlist: Shortlist | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Top-k of log_softmax(logits) [rows, k], EOS excluded from the choice (not the norm) where blocked;
    with a shortlist, the softmax runs over each row's own tokens only."""
    if shortlist is not None:
        logits = logits.masked_fill(~shortlist.mask(logits.shape[-1]), float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    logp[:, eos_id] = logp[:, eos_id].masked_fill(eos_blocked.bool(), float("-inf"))
    return torch.topk(logp, k, dim=-1)


def embed(tokens: torch.Tensor, positions: torch.Tensor, tok_w: torch.Tensor, pos_w: torch.Tensor, scale: float,
          norm: torch.nn.LayerNorm) -> torch.Tensor:  # fmt: skip
    """LN(tok_w[tokens] * scale + pos_w[positions]): one launch where Triton runs (five PyTorch kernels
    otherwise: two lookups, scale, sum, LayerNorm; each a launch gap of its own in a decode step's graph)."""
    if ENABLED and kernels.triton_ok(tok_w) and tokens.numel() > 0:
        return embed_triton(tokens, positions, tok_w, pos_w, scale, norm)
    return embed_reference(tokens, positions, tok_w, pos_w, scale, norm)


def embed_triton(tokens: torch.Tensor, positions: torch.Tensor, tok_w: torch.Tensor, pos_w: torch.Tensor,
                 scale: float, norm: torch.nn.LayerNorm) -> torch.Tensor:  # fmt: skip
    n, d = tokens.numel(), tok_w.shape[1]
    y = torch.empty(n, d, dtype=tok_w.dtype, device=tok_w.device)
    _embed_kernel[(n,)](tokens, positions, tok_w, pos_w, norm.weight, norm.bias, y, d, scale, norm.eps,
                        tok_w.stride(0), pos_w.stride(0), y.stride(0), BLOCK_D=triton.next_power_of_2(d),
                        **kernels.pdl_args(tok_w))  # fmt: skip
    return y


def embed_reference(tokens: torch.Tensor, positions: torch.Tensor, tok_w: torch.Tensor, pos_w: torch.Tensor,
                    scale: float, norm: torch.nn.LayerNorm) -> torch.Tensor:  # fmt: skip
    return norm(F.embedding(tokens, tok_w) * scale + F.embedding(positions, pos_w))
