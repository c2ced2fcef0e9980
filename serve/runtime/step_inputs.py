"""A decode step's `DecoderBatch`, derived on the device from its uploaded integers in one launch.

A step uploads six integers per query row (`INPUTS`); everything else a decoder layer needs (the
token fed, its cache slot, context length, self and cross block tables, source length) follows from
them and the runner's persistent per-row tables. As PyTorch ops that is about a dozen tiny kernels,
each a full launch gap inside the step's CUDA graph; `decoder_batch_triton` is one program per row.
`decoder_batch_reference` is the definition it is tested against, and what runs off CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

from serve.runtime import kernels
from serve.runtime.model import DecoderBatch

# rows of the [6, rows] step input: the row's table row, its token (where the host gives it), its
# position, whether EOS is blocked, the previous launch's query row whose top-1 it takes instead
# (HOST_TOKEN: none), and the first position its sequence feeds in this step
INPUTS = ("row", "token", "position", "eos_blocked", "source", "fresh_from")
HOST_TOKEN = -1


@dataclass(frozen=True)
class RowTables:
    """The runner's per-row state on the device: block tables [rows, width], the source's cross-attention
    blocks [rows, cross width] and lengths [rows], written when a request is admitted."""

    tables: torch.Tensor
    cross_tables: torch.Tensor
    cross_lens: torch.Tensor
    block_size: int


def decoder_batch(inputs: torch.Tensor, chosen: torch.Tensor, t: RowTables,
                  widths: tuple[int, int] | None = None) -> DecoderBatch:  # fmt: skip
    """The DecoderBatch of a step's inputs [6, rows]; `chosen` holds the previous launch's top-1 ids.

    `widths` trims the self/cross tables to the blocks this step can touch (eager steps; a graph
    keeps the full width and the attention kernel never reads past the lengths)."""
    if kernels.triton_ok(inputs):
        return decoder_batch_triton(inputs, chosen, t, widths)
    return decoder_batch_reference(inputs, chosen, t, widths)


def decoder_batch_reference(inputs: torch.Tensor, chosen: torch.Tensor, t: RowTables,
                            widths: tuple[int, int] | None = None) -> DecoderBatch:  # fmt: skip
    rows, tokens, positions, _, sources, fresh_from = inputs
    w, c = widths or (t.tables.shape[1], t.cross_tables.shape[1])
    tokens = torch.where(sources == HOST_TOKEN, tokens, chosen[sources.clamp(min=0)])
    tables = t.tables[rows, :w]
    bs = t.block_size
    slots = tables.gather(1, (positions // bs)[:, None])[:, 0] * bs + positions % bs
    return DecoderBatch(tokens, positions, slots, tables, positions + 1, t.cross_tables[rows, :c],
                        t.cross_lens[rows], fresh_from=fresh_from)  # fmt: skip


def decoder_batch_triton(inputs: torch.Tensor, chosen: torch.Tensor, t: RowTables,
                         widths: tuple[int, int] | None = None) -> DecoderBatch:  # fmt: skip
    n = inputs.shape[1]
    w, c = widths or (t.tables.shape[1], t.cross_tables.shape[1])
    tokens, slots, lens, cross_lens = torch.empty(4, n, dtype=inputs.dtype, device=inputs.device)
    tables = torch.empty(n, w, dtype=t.tables.dtype, device=inputs.device)
    cross = torch.empty(n, c, dtype=t.cross_tables.dtype, device=inputs.device)
    _decoder_batch_kernel[(n,)](
        inputs, chosen, t.tables, t.cross_tables, t.cross_lens, tokens, slots, lens, tables, cross, cross_lens,
        inputs.stride(0), t.tables.stride(0), t.cross_tables.stride(0), w, c, t.block_size, HOST_TOKEN,
        BLOCK_W=triton.next_power_of_2(w), BLOCK_C=triton.next_power_of_2(c), **kernels.pdl_args(inputs),
    )  # fmt: skip
    return DecoderBatch(tokens, inputs[2], slots, tables, lens, cross, cross_lens, fresh_from=inputs[5])


if triton is not None:
    from serve.runtime.kernels import pdl_start, pdl_wait

    @triton.jit
    def _decoder_batch_kernel(in_ptr, chosen_ptr, tables_ptr, cross_tables_ptr, cross_lens_ptr, tokens_ptr,
                              slots_ptr, lens_ptr, out_tables_ptr, out_cross_ptr, out_cross_lens_ptr, stride_in,
                              stride_t, stride_c, W, C, block_size, host, BLOCK_W: tl.constexpr,
                              BLOCK_C: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
        pdl_start(PDL)
        pdl_wait(PDL)  # the inputs were copied, and `chosen` written, before this step
        i = tl.program_id(0)
        row = tl.load(in_ptr + i)
        pos = tl.load(in_ptr + 2 * stride_in + i)
        source = tl.load(in_ptr + 4 * stride_in + i)
        token = tl.load(in_ptr + stride_in + i)
        if source != host:
            token = tl.load(chosen_ptr + source)
        tl.store(tokens_ptr + i, token)
        table = tables_ptr + row * stride_t
        tl.store(slots_ptr + i, tl.load(table + pos // block_size) * block_size + pos % block_size)
        tl.store(lens_ptr + i, pos + 1)
        cols = tl.arange(0, BLOCK_W)
        tl.store(out_tables_ptr + i * W + cols, tl.load(table + cols, mask=cols < W), mask=cols < W)
        cols = tl.arange(0, BLOCK_C)
        cross = tl.load(cross_tables_ptr + row * stride_c + cols, mask=cols < C)
        tl.store(out_cross_ptr + i * C + cols, cross, mask=cols < C)
        tl.store(out_cross_lens_ptr + i, tl.load(cross_lens_ptr + row))
