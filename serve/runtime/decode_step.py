"""One decoder step and its token choice on the device, optionally replayed as a CUDA graph.

Block tables live on the device in fixed "rows" (one per running beam), written once when a
request is admitted. A step then uploads only six integers per query row (`step_inputs.INPUTS`)
in one copy, padding rows included; slots, context lengths and tables are derived on the device
in one launch (`step_inputs.decoder_batch`). The step returns, for every query row, the
top-K log-probabilities and token ids: all greedy (K=1) and beam search (K=2*beam: the best 2*beam
of each beam contain the best 2*beam overall) need, so only [rows, K] numbers come back instead of
[rows, vocab] logits; a step of greedy requests alone asks for K=1, which spares the lm_head kernel
the other candidates' passes.
They are copied to the host as the step ends, and `launch` returns before that: the engine
prepares the next step meanwhile. A query row may take its input token from the previous launch's
top-1 choice on the device (`sources`), so a greedy request's next step can be launched before
the host has seen its last token.

On CUDA, steps of up to `max_rows` query rows replay CUDA graphs captured per row-count
bucket and K; padding rows point at a scratch row whose blocks no sequence owns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serve.runtime.fused import Shortlist
from serve.runtime.graphs import capture
from serve.runtime.kv_cache import KVPool
from serve.runtime.model import Decoder
from serve.runtime.shortlist import RowTokens, ShortlistUnion
from serve.runtime.step_inputs import HOST_TOKEN, RowTables, decoder_batch
from serve.runtime.transfer import upload

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass
class LaunchedStep:
    """A decode step on its way: its top-K (log-prob, id) [rows, K] on the host once `wait` returns."""

    values: torch.Tensor
    ids: torch.Tensor
    done: torch.cuda.Event | None  # None: already done (CPU)
    rows: int

    def wait(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.done is not None:
            self.done.synchronize()
        return self.values, self.ids


class DecodeRunner:
    def __init__(self, decoder: Decoder, pool: KVPool, eos_id: int, k: int, num_rows: int, table_width: int,
                 max_rows: int, use_graphs: bool, compile: bool = False, shortlist: bool = False):  # fmt: skip
        self.decoder, self.pool, self.eos_id, self.k = decoder, pool, eos_id, k
        dev = pool.layers[0][0].device
        self.device = dev
        self.scratch_row = num_rows
        self.tables = torch.full(
            (num_rows + 1, table_width), pool.scratch_block, dtype=torch.long, device=dev
        )
        self.cross_tables = self.tables.clone()
        self.cross_lens = torch.ones(num_rows + 1, dtype=torch.long, device=dev)
        self.host_cross_lens = [1] * (num_rows + 1)  # to trim eager steps to the longest source
        self.row_tables = RowTables(self.tables, self.cross_tables, self.cross_lens, pool.block_size)
        self.free_rows = list(range(num_rows - 1, -1, -1))
        # with a shortlist: the tokens each row may emit (the scratch row none, so padding adds none),
        # and the ascending ids any open row may emit (`union_ids[:union_count]`), which the lm_head reads
        vocab = decoder.cfg.vocab_size
        self.allowed = torch.zeros(num_rows + 1, vocab, dtype=torch.uint8, device=dev) if shortlist else None
        self.union = ShortlistUnion(vocab) if shortlist else None
        self.union_ids = torch.zeros(vocab, dtype=torch.int32, device=dev)
        self.union_count = torch.zeros(1, dtype=torch.int32, device=dev)
        self.buckets = ([b for b in BUCKETS if b < max_rows] + [max_rows]) if use_graphs else []
        self.graphs: dict[  # by (rows bucket, K)
            tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
        ] = {}
        self._mempool = None
        # the top-1 id of each query row of the latest launch, which the next launch may feed back
        self.chosen = torch.zeros(max(max_rows, 1), dtype=torch.long, device=dev)
        # torch.compile fuses the small per-layer kernels (norms, bias adds, GELU) between GEMMs.
        self._step = torch.compile(self._topk, dynamic=True) if compile else self._topk
        self._padding = [self.scratch_row, 0, 0, 0, HOST_TOKEN, 0]  # a query row that does nothing

    # ---- rows -------------------------------------------------------------------------------
    def open_rows(self, beams: list[tuple[list[int], list[int], int, RowTokens | None]]) -> list[int]:
        """Claim a row for each beam (self-attention blocks, its source's cross blocks and length and,
        under a shortlist, the tokens it may emit; None: all) and write their tables in one upload and
        three device copies, however many beams a step admits. Nothing here waits for the device."""
        rows = [self.free_rows.pop() for _ in beams]
        pad, width, cross_width = self.pool.scratch_block, self.tables.shape[1], self.cross_tables.shape[1]
        packed = upload([[row, n, *blocks, *[pad] * (width - len(blocks)), *cross, *[pad] * (cross_width - len(cross))]
                         for row, (blocks, cross, n, _) in zip(rows, beams, strict=True)], self.device)  # fmt: skip
        index = packed[:, 0]
        self.tables.index_copy_(0, index, packed[:, 2 : 2 + width])
        self.cross_tables.index_copy_(0, index, packed[:, 2 + width :])
        self.cross_lens.index_copy_(0, index, packed[:, 1])
        for row, (_, _, n, tokens) in zip(rows, beams, strict=True):
            self.host_cross_lens[row] = n
            if self.allowed is not None:
                if tokens is None:
                    self.allowed[row].fill_(1)
                else:
                    self.allowed[row] = tokens.bits
                    self.allowed[row].index_fill_(0, upload(tokens.source_ids, self.device), 1)
                self.union.open(row, tokens)
        return rows

    def close_row(self, row: int) -> None:
        self.free_rows.append(row)
        if self.union is not None:
            self.union.close(row)

    # ---- steps ------------------------------------------------------------------------------
    def _widths(self, rows: list[int], positions: list[int]) -> tuple[int, int]:
        blocks = self.pool.blocks_for
        return blocks(max(positions) + 1), blocks(max(self.host_cross_lens[r] for r in rows))

    def _inputs(self, rows: list[int], tokens: list[int], positions: list[int], eos_blocked: list[bool],
                sources: list[int], width: int) -> torch.Tensor:  # fmt: skip
        """The step's [6, width] inputs on the host (`step_inputs.INPUTS`), padded with rows that do nothing."""
        # a sequence fed several positions at once (its forced prefix) writes their K/V in this step
        first: dict[int, int] = {}
        for row, pos in zip(rows, positions, strict=True):
            first[row] = min(first.get(row, pos), pos)
        fresh = [first[r] for r in rows]
        columns = [*zip(rows, tokens, positions, eos_blocked, sources, fresh, strict=True)]
        columns += [self._padding] * (width - len(rows))
        return torch.tensor(columns, dtype=torch.long).t().contiguous()

    def logits(self, rows: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """Float32 logits [rows, vocab] of every query row (teacher forcing), on the CPU."""
        n = len(rows)
        inputs = self._inputs(rows, tokens, positions, [False] * n, [HOST_TOKEN] * n, n)
        widths = self._widths(rows, positions)
        batch = decoder_batch(upload(inputs, self.device), self.chosen, self.row_tables, widths)
        return self.decoder(batch, self.pool.layers).cpu()

    def _topk(self, inputs: torch.Tensor, k: int, widths: tuple[int, int] | None = None):
        batch = decoder_batch(inputs, self.chosen, self.row_tables, widths)
        rows, eos_blocked = inputs[0], inputs[3]
        shortlist = None
        if self.allowed is not None:
            shortlist = Shortlist(self.allowed, rows, self.union_ids, self.union_count)
        return self.decoder.topk(batch, self.pool.layers, k, self.eos_id, eos_blocked, shortlist, self.chosen)

    def can_feed(self, launched: LaunchedStep) -> bool:
        """Whether the next launch may take tokens from every query row of `launched`."""
        return launched.rows <= self.chosen.numel()

    def launch(self, rows: list[int], tokens: list[int], positions: list[int], eos_blocked: list[bool],
               sources: list[int] | None = None, greedy: bool = False) -> LaunchedStep:  # fmt: skip
        """Start the step of these query rows and return without waiting for it.

        `sources[i]`, where not `HOST_TOKEN`, is a query row of the previous launch whose top-1
        id row i takes as its token instead of `tokens[i]`. `greedy`: every row needs only its
        top-1, so K is 1.
        """
        n, k = len(rows), 1 if greedy else self.k
        if sources is None:
            sources = [HOST_TOKEN] * n
        self._refresh_union()
        bucket = next((b for b in self.buckets if b >= n), None)
        inputs = self._inputs(rows, tokens, positions, eos_blocked, sources, bucket or n)
        if bucket is None:
            values, ids = self._step(upload(inputs, self.device), k, self._widths(rows, positions))
        else:
            graph, static, (values, ids) = self._graph(bucket, k)
            static.copy_(inputs.pin_memory(), non_blocking=True)  # queued: no host wait
            graph.replay()
        if self.device.type != "cuda":
            return LaunchedStep(values[:n], ids[:n], None, n)
        done = torch.cuda.Event()
        step = LaunchedStep(
            values[:n].to("cpu", non_blocking=True), ids[:n].to("cpu", non_blocking=True), done, n
        )
        done.record()
        return step

    def _refresh_union(self) -> None:
        """Upload the union of the open rows' tokens if it changed (`ShortlistUnion.take`)."""
        ids = self.union.take() if self.union is not None else None
        if ids is not None:
            self.union_ids[: len(ids)] = upload(ids, self.device, torch.int32)
            self.union_count.fill_(len(ids))

    def capture_graphs(self) -> None:
        """Capture every bucket's graphs now (compiling their kernels), so that no request waits for one."""
        for n in self.buckets:
            for k in sorted({1, self.k}):
                self._graph(n, k)

    def release_graphs(self) -> None:
        """Destroy the captured graphs: with TP, a process group whose collectives a live graph holds
        cannot be destroyed (pytorch/pytorch#115388), so every rank calls this first at shutdown."""
        self.graphs.clear()
        self._mempool = None

    def _graph(self, n: int, k: int):
        if (n, k) not in self.graphs:
            static = upload(self._inputs([], [], [], [], [], n), self.device)
            chosen = self.chosen.clone()  # a capture may come between a launch and the one it feeds
            self._mempool = self._mempool or torch.cuda.graph_pool_handle()
            graph, out = capture(lambda: self._step(static, k), self.device, self._mempool)
            self.chosen.copy_(chosen)  # the warm-up steps wrote their own choices
            self.graphs[n, k] = (graph, static, out)
        return self.graphs[n, k]
