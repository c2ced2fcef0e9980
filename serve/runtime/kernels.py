"""Paged attention for decoder query rows: a Triton kernel on CUDA, a gather reference elsewhere.

Each query row (one new decoder token) attends to the first `lens[row]` positions stored in
the blocks of `tables[row]`. The kernel reads only those blocks, with an online softmax, so
its cost follows the real context length rather than the table width; that also makes it
safe to capture in a CUDA graph with fixed-width tables. A context longer than `CHUNK` positions is
split over up to `SPLITS` programs, and the last of them to finish merges their softmax partials. The
reference is the definition the kernel is tested against.

It also holds what every decode kernel shares: whether Triton can run (`triton_ok`), and
programmatic dependent launch (`pdl_args`): on Hopper, each kernel lets the next one start as soon as all
of its programs are running, and the next one reads weights, which no kernel writes, before
`pdl_wait` blocks it until its predecessor has finished; so a layer's weights are already on
their way while the previous layer ends.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

# Tests set this (with TRITON_INTERPRET=1 in the environment before triton is imported) to run
# the Triton kernels on CPU tensors in Triton's interpreter; serving never does.
CPU_INTERPRETER = False
CHUNK = 128  # context positions the attention kernel reads per iteration (a quarter or half where that fits)
TWO_WARP_ROWS = 8  # query rows from which the attention kernel runs two warps a program
# The most programs one (row, head)'s context is split over, taking every SPLITS-th chunk of CHUNK positions each.
# The fp16 64-row graph on the H200 (mid-wave, one process, two rounds; `ln-split-ab.json`), 1 -> 2 splits: ru
# sources (up to 299 tokens) 0.963 -> 0.922 ms a step, its cross-attention 221 -> 166 us; zh (up to 118) 0.803 ->
# 0.816, its self-attention 74 -> 80 (programs with nothing to do); closed loops over every language at 16 / 64 /
# 128 clients 18 500 / 59 000 / 70 900 -> 19 100 / 60 400 / 73 100 tok/s (medians of the second round; the first
# round's loops spread by up to 14%). Four splits: self-attention 110 us, cross-attention no better, 64 clients 54 900.
SPLITS = 2
LOCKS = 8192  # (row, head) pairs a split launch may have: one arrival counter each
_COUNTERS: dict[tuple[str, torch.device], torch.Tensor] = {}
EARLY_ALL, EARLY_OLD = 1, 2  # what the attention kernel reads before its predecessor ends (`paged_attention`)
PDL = os.environ.get("MT_PDL", "1") != "0"


def triton_ok(x: torch.Tensor) -> bool:
    """Whether Triton kernels can run on x's device."""
    return triton is not None and (x.is_cuda or CPU_INTERPRETER)


def pdl_args(x: torch.Tensor) -> dict[str, bool]:
    """Launch arguments of a kernel on x's device: with programmatic dependent launch (Hopper and later;
    `MT_PDL=0` turns it off), both the launch attribute and the kernel's `PDL` flag, which compiles
    in the waits that make the early launch safe; never one without the other."""
    on = PDL and x.is_cuda and _hopper_or_later(x.device.index)
    return {"PDL": on, "launch_pdl": on}


@functools.cache
def _hopper_or_later(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def write_kv_reference(k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor) -> None:  # fmt: skip
    """Store k, v [N, h, d] at flat slot indices of pools [blocks, block_size, h, d]."""
    k_pool.view(-1, *k.shape[1:])[slots] = k
    v_pool.view(-1, *v.shape[1:])[slots] = v


def paged_attention_reference(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:  # fmt: skip
    """q [N, h, d], pools [blocks, block_size, h, d] -> [N, h, d]."""
    n, max_blocks = tables.shape
    block_size = k_pool.shape[1]
    k = k_pool[tables].reshape(n, max_blocks * block_size, *k_pool.shape[2:]).transpose(1, 2)
    v = v_pool[tables].reshape(n, max_blocks * block_size, *v_pool.shape[2:]).transpose(1, 2)
    mask = (torch.arange(max_blocks * block_size, device=q.device)[None, :] < lens[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask, scale=scale)[:, :, 0, :]


if triton is not None:

    @triton.jit
    def pdl_start(PDL: tl.constexpr):
        """Let the next kernel launch once every program of this one has started."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """Block until the previous kernel has finished and its writes are visible. Before this, a
        kernel launched with PDL may read only what no kernel writes (weights, norms, biases)."""
        if PDL:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def _write_kv_kernel(k_ptr, v_ptr, slots_ptr, kp_ptr, vp_ptr, stride_kn, stride_kh, stride_vn, stride_vh,
                         stride_ps, stride_ph, HEADS: tl.constexpr, HEADS_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
                         PDL: tl.constexpr):  # fmt: skip
        # One program a row, all its heads: an encoder pass writes thousands of rows, and a program per
        # (row, head) made 49 152 programs of 128 bytes for 3 072 tokens (60 us a layer on the H200).
        pdl_start(PDL)
        pdl_wait(PDL)
        row = tl.program_id(0)
        heads = tl.arange(0, HEADS_P2)[:, None]
        dims = tl.arange(0, HEAD_DIM)[None, :]
        real = heads < HEADS
        slot = tl.load(slots_ptr + row).to(tl.int64)
        dst = slot * stride_ps + heads * stride_ph + dims
        tl.store(
            kp_ptr + dst, tl.load(k_ptr + row * stride_kn + heads * stride_kh + dims, mask=real), mask=real
        )
        tl.store(
            vp_ptr + dst, tl.load(v_ptr + row * stride_vn + heads * stride_vh + dims, mask=real), mask=real
        )

    @triton.jit
    def _kv_chunk(k_ptr, v_ptr, tables_ptr, row, head, c0, length, stride_kb, stride_ks, stride_kh, stride_tn,
                  BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr):  # fmt: skip
        """K and V [CHUNK, HEAD_DIM] of positions c0.. of a row's blocks, which of them are below its length,
        and their offsets in the pools."""
        pos = c0 + tl.arange(0, CHUNK)
        valid = pos < length
        block = tl.load(tables_ptr + row * stride_tn + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        dims = tl.arange(0, HEAD_DIM)
        kv_off = (
            (block * stride_kb + (pos % BLOCK_SIZE) * stride_ks)[:, None] + head * stride_kh + dims[None, :]
        )
        k = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0).to(tl.float32)
        return k, v, valid, kv_off

    @triton.jit
    def _attend(q, k, v, valid, m, denom, acc):
        """Online-softmax update of (max, denominator, weighted sum) with one chunk of K and V."""
        s = tl.where(valid, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        p = tl.exp(s - m_new)
        alpha = tl.exp(m - m_new)
        return m_new, denom * alpha + tl.sum(p, axis=0), acc * alpha + tl.sum(p[:, None] * v, axis=0)

    @triton.jit
    def _paged_attention_kernel(
        q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, fresh_ptr, out_ptr, ws_ptr, lock_ptr, scale,
        stride_qn, stride_qh, stride_kb, stride_ks, stride_kh, stride_tn, stride_on, stride_oh,
        BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, CHUNK: tl.constexpr, EARLY: tl.constexpr,
        SPLITS: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        # A context of up to a quarter or a half of CHUNK positions takes one chunk of that size, a
        # tile sized to it instead of a mostly masked one of CHUNK. On the H200 with fresh_from
        # (`scripts/bench_kernels.py --shapes attention`): one row and 32 positions 2.6 -> 1.7 us, 64 rows
        # and 32 / 64 positions 11.5 / 12.9 -> 5.2 / 7.9 us (with `TWO_WARP_ROWS`); 128 positions unchanged.
        # A longer context is split over up to SPLITS programs (program_id(2)), which take every SPLITS-th
        # chunk each, so that each requests its first chunk before the wait; each stores its softmax partial
        # and counts itself in the (row, head)'s lock, and the last to arrive merges them in split order.
        pdl_start(PDL)
        row = tl.program_id(0)
        head = tl.program_id(1)
        split = tl.program_id(2)
        if EARLY == 0:
            pdl_wait(PDL)
        length = tl.load(lens_ptr + row)
        active = tl.minimum(tl.cdiv(length, CHUNK), SPLITS)
        out = out_ptr + row * stride_on + head * stride_oh + tl.arange(0, HEAD_DIM)
        if length <= CHUNK // 4:
            if split == 0:
                m, denom, acc = _attend_row(q_ptr, k_ptr, v_ptr, tables_ptr, fresh_ptr, scale, row, head, 0, length,
                                            stride_qn, stride_qh, stride_kb, stride_ks, stride_kh, stride_tn,
                                            BLOCK_SIZE, HEAD_DIM, CHUNK // 4, 1, EARLY, PDL)  # fmt: skip
                tl.store(out, (acc / denom).to(out_ptr.dtype.element_ty))
        elif length <= CHUNK // 2:
            if split == 0:
                m, denom, acc = _attend_row(q_ptr, k_ptr, v_ptr, tables_ptr, fresh_ptr, scale, row, head, 0, length,
                                            stride_qn, stride_qh, stride_kb, stride_ks, stride_kh, stride_tn,
                                            BLOCK_SIZE, HEAD_DIM, CHUNK // 2, 1, EARLY, PDL)  # fmt: skip
                tl.store(out, (acc / denom).to(out_ptr.dtype.element_ty))
        elif split < active:
            m, denom, acc = _attend_row(q_ptr, k_ptr, v_ptr, tables_ptr, fresh_ptr, scale, row, head, split, length,
                                        stride_qn, stride_qh, stride_kb, stride_ks, stride_kh, stride_tn, BLOCK_SIZE,
                                        HEAD_DIM, CHUNK, SPLITS, EARLY, PDL)  # fmt: skip
            if active == 1:
                tl.store(out, (acc / denom).to(out_ptr.dtype.element_ty))
            else:
                _merge_splits(m, denom, acc, out, ws_ptr, lock_ptr, row, head, split, active, SPLITS,
                              HEAD_DIM)  # fmt: skip

    @triton.jit
    def _merge_splits(m, denom, acc, out, ws_ptr, lock_ptr, row, head, split, active, SPLITS: tl.constexpr,
                      HEAD_DIM: tl.constexpr):  # fmt: skip
        """Store this split's (max, denominator, weighted sum); the last of the `active` splits to arrive
        merges them in split order (so the result does not depend on arrival order), writes the output and
        resets the lock for the next launch or graph replay."""
        pair = row * tl.num_programs(1) + head
        part = ws_ptr + (pair * SPLITS + split) * (HEAD_DIM + 2)
        dims = tl.arange(0, HEAD_DIM)
        tl.store(part + dims, acc)
        tl.store(part + HEAD_DIM, m)
        tl.store(part + HEAD_DIM + 1, denom)
        # acq_rel: releases this program's stores, and the last to arrive acquires the others'
        if tl.atomic_add(lock_ptr + pair, 1, sem="acq_rel") == active - 1:
            first = ws_ptr + pair * SPLITS * (HEAD_DIM + 2)
            top = tl.load(first + HEAD_DIM, cache_modifier=".cg")
            for i in range(1, active):
                top = tl.maximum(top, tl.load(first + i * (HEAD_DIM + 2) + HEAD_DIM, cache_modifier=".cg"))
            total = tl.zeros((), tl.float32)
            merged = tl.zeros((HEAD_DIM,), tl.float32)
            for i in range(0, active):
                p = first + i * (HEAD_DIM + 2)
                w = tl.exp(tl.load(p + HEAD_DIM, cache_modifier=".cg") - top)
                total += w * tl.load(p + HEAD_DIM + 1, cache_modifier=".cg")
                merged += w * tl.load(p + dims, cache_modifier=".cg")
            tl.atomic_xchg(lock_ptr + pair, 0)
            tl.store(out, (merged / total).to(out.dtype.element_ty))

    @triton.jit
    def _attend_row(
        q_ptr, k_ptr, v_ptr, tables_ptr, fresh_ptr, scale, row, head, split, length, stride_qn, stride_qh,
        stride_kb, stride_ks, stride_kh, stride_tn, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
        CHUNK: tl.constexpr, SPLITS: tl.constexpr, EARLY: tl.constexpr, PDL: tl.constexpr,
    ):  # fmt: skip
        # (max, denominator, weighted sum) of the online softmax over chunks split, split + SPLITS, ... of
        # CHUNK positions, each gathered across as many cache blocks as it spans: a decode step's context
        # usually fits one chunk, so its K and V arrive in one round trip. With EARLY, the first chunk is
        # requested before waiting for the previous kernel (lengths and tables are written before the step's
        # first decode kernel): EARLY_ALL, all of it (cross-attention); EARLY_OLD, all of it, then its
        # positions from fresh_from on, which this step's QKV kernel writes, are read again after the wait.
        # Either way only q and those come after it.
        c_first = split * CHUNK
        k, v, valid, kv_off = _kv_chunk(k_ptr, v_ptr, tables_ptr, row, head, c_first, length, stride_kb,
                                        stride_ks, stride_kh, stride_tn, BLOCK_SIZE, HEAD_DIM, CHUNK)  # fmt: skip
        if EARLY == 2:  # EARLY_OLD
            again = valid & (c_first + tl.arange(0, CHUNK) >= tl.load(fresh_ptr + row))
        if EARLY != 0:
            pdl_wait(PDL)
        if EARLY == 2:  # EARLY_OLD
            k = tl.where(
                again[:, None], tl.load(k_ptr + kv_off, mask=again[:, None], other=0.0).to(tl.float32), k
            )
            v = tl.where(
                again[:, None], tl.load(v_ptr + kv_off, mask=again[:, None], other=0.0).to(tl.float32), v
            )
        dims = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + row * stride_qn + head * stride_qh + dims).to(tl.float32) * scale
        m, denom, acc = _attend(q, k, v, valid, tl.full((), float("-inf"), tl.float32), tl.zeros((), tl.float32),
                                tl.zeros((HEAD_DIM,), tl.float32))  # fmt: skip
        # after the wait: these may include this step's positions
        for c0 in range(c_first + SPLITS * CHUNK, length, SPLITS * CHUNK):
            k, v, valid, _ = _kv_chunk(k_ptr, v_ptr, tables_ptr, row, head, c0, length, stride_kb, stride_ks,
                                       stride_kh, stride_tn, BLOCK_SIZE, HEAD_DIM, CHUNK)  # fmt: skip
            m, denom, acc = _attend(q, k, v, valid, m, denom, acc)
        return m, denom, acc


def paged_attention_triton(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
    scale: float, chunk: int = CHUNK, static: bool = False, fresh_from: torch.Tensor | None = None,
    num_warps: int | None = None, splits: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """`static`, `fresh_from`: see `paged_attention`. From `TWO_WARP_ROWS` rows, two warps a program: on the
    H200 at 64 rows and 32 / 64 positions (fresh_from), 5.2 / 7.9 against 7.9 / 9.7 us with four; fewer rows
    keep four, which a long context at one row favours (128 positions: 2.2 against 2.9 us). `splits`: the
    most programs a (row, head)'s context is split over (`SPLITS`)."""
    n, heads, head_dim = q.shape
    out = torch.empty_like(q)
    early = EARLY_ALL if static else EARLY_OLD if fresh_from is not None else 0
    splits = splits or SPLITS
    if n * heads > LOCKS:
        splits = 1
    ws = torch.empty(n * heads * splits * (head_dim + 2) if splits > 1 else 1, dtype=torch.float32,
                     device=q.device)  # fmt: skip
    _paged_attention_kernel[(n, heads, splits)](
        q, k_pool, v_pool, tables, lens, fresh_from if fresh_from is not None else lens, out, ws,
        arrival_counters("attention", q.device, LOCKS),
        scale, q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), tables.stride(0),
        out.stride(0), out.stride(1), BLOCK_SIZE=k_pool.shape[1], HEAD_DIM=head_dim, CHUNK=chunk,
        EARLY=early, SPLITS=splits, num_warps=num_warps or (2 if n >= TWO_WARP_ROWS else 4),
        **pdl_args(q),
    )  # fmt: skip
    return out


def arrival_counters(kind: str, device: torch.device, size: int) -> torch.Tensor:
    """The arrival counters of one kind of split launch (split contexts here, split-K linears in `fused`), one
    per unit of merged work, created with `size` on first use: the last program of a unit to count itself
    merges the partials and resets its counter, so they are zero between launches. A CUDA graph holds the
    table's address, so it is never replaced."""
    if (kind, device) not in _COUNTERS:
        _COUNTERS[kind, device] = torch.zeros(size, dtype=torch.int32, device=device)
    return _COUNTERS[kind, device]


def paged_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, tables: torch.Tensor, lens: torch.Tensor,
    scale: float, static: bool = False, fresh_from: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Dispatch: Triton on CUDA (power-of-two head and block sizes), the reference otherwise.

    What no kernel of this decode step writes, the kernel reads before its predecessor ends: `tables`
    and `lens` always (the step computes them before its first decode kernel); with `static`, all the
    K/V they point at (cross-attention: the encoder's, stored at admission); with `fresh_from` [N], the
    K/V of each row's positions before it (self-attention: this step's QKV kernel writes from there on).
    """
    if _use_triton(q, k_pool):
        return paged_attention_triton(
            q, k_pool, v_pool, tables, lens, scale, static=static, fresh_from=fresh_from
        )
    return paged_attention_reference(q, k_pool, v_pool, tables, lens, scale)


def write_kv(k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:  # fmt: skip
    """Store this step's K/V rows into their pool slots (one kernel for both on CUDA)."""
    if not _use_triton(k, k_pool):
        return write_kv_reference(k_pool, v_pool, slots, k, v)
    n, heads, head_dim = k.shape
    _write_kv_kernel[(n,)](
        k, v, slots, k_pool, v_pool, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_pool.stride(1), k_pool.stride(2), HEADS=heads, HEADS_P2=triton.next_power_of_2(heads),
        HEAD_DIM=head_dim, **pdl_args(k),
    )  # fmt: skip


def _use_triton(x: torch.Tensor, pool: torch.Tensor) -> bool:
    return triton_ok(x) and _pow2(x.shape[-1]) and _pow2(pool.shape[1])


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0
