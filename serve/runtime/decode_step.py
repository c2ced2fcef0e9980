"""One decoder step and its token choice on the device, optionally replayed as a CUDA graph.

The step returns, for every query row, the top-K log-probabilities and token ids (EOS masked
where a request is below `min_new_tokens`). That is all greedy (K=1) and beam search (the
best 2*beam of each beam contain the best 2*beam overall) need, so only [rows, K] numbers
leave the GPU instead of [rows, vocab] logits.

On CUDA, steps of up to `max(buckets)` rows run as CUDA graphs captured per row-count bucket
(padding rows write into the pool's scratch block and are ignored); the tables are padded to
a fixed width, which the paged-attention kernel never reads past `lens`.
"""

from __future__ import annotations

import torch

from serve.runtime.kv_cache import KVPool
from serve.runtime.model import Decoder, DecoderBatch

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def decode_topk(
    decoder: Decoder, pool: KVPool, batch: DecoderBatch, eos_mask: torch.Tensor, eos_id: int, k: int
):
    """Top-k log-probs and ids [rows, k] of the next token for every row of `batch`."""
    logp = torch.log_softmax(decoder(batch, pool.layers), dim=-1)
    logp[:, eos_id] = logp[:, eos_id].masked_fill(eos_mask, float("-inf"))
    return torch.topk(logp, k, dim=-1)


class DecodeRunner:
    """Runs `decode_topk` eagerly (CPU, or rows beyond the largest bucket) or as CUDA graphs."""

    def __init__(self, decoder: Decoder, pool: KVPool, eos_id: int, k: int, table_width: int,
                 cross_width: int, max_rows: int, use_graphs: bool):  # fmt: skip
        self.decoder, self.pool, self.eos_id, self.k = decoder, pool, eos_id, k
        self.widths = (table_width, cross_width)
        self.buckets = [b for b in BUCKETS if b < max_rows] + [max_rows] if use_graphs else []
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, DecoderBatch, torch.Tensor, tuple]] = {}
        self._mempool = None

    def __call__(self, batch: DecoderBatch, eos_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch` and `eos_mask` on the CPU; returns (values, ids) [rows, k] on the CPU."""
        rows = batch.tokens.shape[0]
        bucket = next((b for b in self.buckets if b >= rows), None)
        if bucket is None:
            dev = self.pool.layers[0][0].device
            args = (self.decoder, self.pool, batch.to(dev), eos_mask.to(dev), self.eos_id, self.k)
            values, ids = decode_topk(*args)
        else:
            graph, static, static_mask, (values, ids) = self._graph(bucket)
            self._fill(static, static_mask, batch, eos_mask)
            graph.replay()
        return values[:rows].cpu(), ids[:rows].cpu()

    def _fill(
        self, static: DecoderBatch, static_mask: torch.Tensor, batch: DecoderBatch, eos_mask: torch.Tensor
    ):
        n = batch.tokens.shape[0]
        scratch = self.pool.scratch_block
        static.tokens[:n].copy_(batch.tokens, non_blocking=True)
        static.positions[:n].copy_(batch.positions, non_blocking=True)
        static.slots[:n].copy_(batch.slots, non_blocking=True)
        static.slots[n:] = scratch * self.pool.block_size
        pairs = (
            (static.ctx_tables, static.ctx_lens, batch.ctx_tables, batch.ctx_lens),
            (static.cross_tables, static.cross_lens, batch.cross_tables, batch.cross_lens),
        )
        for table, lens, src, src_lens in pairs:
            table[:n, : src.shape[1]].copy_(src, non_blocking=True)
            table[n:, 0] = scratch
            lens[:n].copy_(src_lens, non_blocking=True)
            lens[n:] = 1
        static_mask[:n].copy_(eos_mask, non_blocking=True)

    def _graph(self, rows: int):
        if rows in self.graphs:
            return self.graphs[rows]
        dev = self.pool.layers[0][0].device
        w, c = self.widths
        z = lambda *shape: torch.zeros(shape, dtype=torch.long, device=dev)  # noqa: E731
        static = DecoderBatch(z(rows), z(rows), z(rows), z(rows, w), z(rows), z(rows, c), z(rows))
        static.slots.fill_(self.pool.scratch_block * self.pool.block_size)
        for t in (static.ctx_tables, static.cross_tables):
            t.fill_(self.pool.scratch_block)
        static.ctx_lens.fill_(1)
        static.cross_lens.fill_(1)
        mask = torch.zeros(rows, dtype=torch.bool, device=dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm up kernels (Triton autotune/compile) outside the capture
                decode_topk(self.decoder, self.pool, static, mask, self.eos_id, self.k)
        torch.cuda.current_stream(dev).wait_stream(side)
        if self._mempool is None:
            self._mempool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            out = decode_topk(self.decoder, self.pool, static, mask, self.eos_id, self.k)
        self.graphs[rows] = (graph, static, mask, out)
        return self.graphs[rows]
