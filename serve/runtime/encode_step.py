"""One encoder pass over newly admitted sources, with their cross-attention K/V written to the pool,
replayed as a CUDA graph where the sources fit one.

Run eagerly, a pass launches about 200 kernels from Python: on the H200 that took 8-13 ms of host
time for one 24-token sentence whose kernels take 0.65 ms, and the engine step that admits a request
waits for it before it launches the next decode step. So on CUDA, a pass of up to `SOURCES[-1]` sources
of up to `LENGTHS[-1]` tokens replays a graph captured per (sources, length) bucket instead: each source
is padded to the bucket's length in a [sources, length] grid (`PackedLayout.grid`: padding keys are
masked, so real tokens see what a packed pass shows them), its inputs arrive in one copy, and the
padding tokens' K/V go to the pool's scratch block, which no sequence reads. Larger passes run eagerly
over their packed, unpadded tokens: filling grids of up to 64 sources with them instead made fp16 at
128 concurrent requests slower (`scripts/results/PERFORMANCE-LOG.md`, the session after 9576ada).
"""

from __future__ import annotations

import torch

from serve.runtime.graphs import capture
from serve.runtime.kv_cache import KVPool
from serve.runtime.model import Decoder, Encoder, PackedLayout
from serve.runtime.transfer import upload

SOURCES = (1, 2, 4, 8)
LENGTHS = (16, 32, 64, 128, 256)


def buckets(sizes: tuple[int, ...], limit: int) -> list[int]:
    """The sizes below `limit`, then the limit itself (a smaller engine needs no larger graphs)."""
    limit = min(sizes[-1], limit)
    return [x for x in sizes if x < limit] + [limit]


class EncodeRunner:
    def __init__(self, encoder: Encoder, decoder: Decoder, pool: KVPool, max_sources: int, max_len: int,
                 padded: bool) -> None:  # fmt: skip
        """`padded`: passes that fit a bucket run on the padded grid (replayed as graphs on CUDA)."""
        self.encoder, self.decoder, self.pool = encoder, decoder, pool
        self.device = pool.layers[0][0].device
        self.sources = buckets(SOURCES, max_sources) if padded else []
        self.lengths = buckets(LENGTHS, max_len) if padded else []
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._mempool = None

    def run(self, sources: list[list[int]], slots: list[list[int]]) -> None:
        """Encode `sources` and write each one's cross-attention K/V at its `slots` (one per token)."""
        bucket = self.bucket(sources)
        if bucket is None:
            lens = [len(s) for s in sources]
            tokens = upload([t for s in sources for t in s], self.device)
            positions = upload([p for n in lens for p in range(n)], self.device)
            flat = upload([x for s in slots for x in s], self.device)
            self._pass(tokens, positions, PackedLayout.of(lens, self.device), flat)
        elif self.device.type != "cuda":
            self._padded_pass(self._inputs(sources, slots, *bucket), *bucket)
        else:
            graph, static = self._graph(*bucket)
            inputs = self._inputs(sources, slots, *bucket).pin_memory()
            static.copy_(inputs, non_blocking=True)  # queued: no host wait
            graph.replay()

    def bucket(self, sources: list[list[int]]) -> tuple[int, int] | None:
        """The smallest (sources, length) bucket whose grid holds these sources; None: run eagerly."""
        n, longest = len(sources), max(len(s) for s in sources)
        b = next((b for b in self.sources if b >= n), None)
        s = next((s for s in self.lengths if s >= longest), None)
        return None if b is None or s is None else (b, s)

    def _inputs(self, sources: list[list[int]], slots: list[list[int]], b: int, s: int) -> torch.Tensor:
        """[3 * b * s + b] on the host: tokens, positions and slots of the padded grid, then each row's length.
        Padding tokens are id 0 at positions past the source's end; rows past the sources have length 1
        (a row with no key would be NaN) and every slot of theirs in the scratch block."""
        bs = self.pool.block_size
        scratch = [self.pool.scratch_block * bs + i % bs for i in range(s)]
        tokens, positions, flat, lens = [], [], [], []
        for i in range(b):
            src, sl = (sources[i], slots[i]) if i < len(sources) else ([0], scratch[:1])
            tokens += src + [0] * (s - len(src))
            flat += sl + scratch[len(sl) :]
            positions += range(s)
            lens.append(len(src))
        return torch.tensor([*tokens, *positions, *flat, *lens], dtype=torch.long)

    def _padded_pass(self, inputs: torch.Tensor, b: int, s: int) -> None:
        t = b * s
        tokens, positions, slots = inputs[: 3 * t].view(3, t)
        self._pass(tokens, positions, PackedLayout.grid(inputs[3 * t :], s), slots)

    def _pass(
        self, tokens: torch.Tensor, positions: torch.Tensor, layout: PackedLayout, slots: torch.Tensor
    ) -> None:
        out = self.encoder.encode(tokens, positions, layout)
        for layer, (k, v) in enumerate(self.decoder.cross_kv(out)):
            self.pool.write(layer, slots, k, v)

    def capture_graphs(self) -> None:
        """Capture every bucket's graph now (compiling its kernels), so that no request waits for one."""
        if self.device.type == "cuda":
            for b in self.sources:
                for s in self.lengths:
                    self._graph(b, s)

    def release_graphs(self) -> None:
        """Destroy the captured graphs (see `DecodeRunner.release_graphs`)."""
        self.graphs.clear()
        self._mempool = None

    def _graph(self, b: int, s: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if (b, s) not in self.graphs:
            static = upload(self._inputs([], [], b, s), self.device)  # every row scratch: writes nothing read
            self._mempool = self._mempool or torch.cuda.graph_pool_handle()
            graph, _ = capture(lambda: self._padded_pass(static, b, s), self.device, self._mempool)
            self.graphs[b, s] = (graph, static)
        return self.graphs[b, s]
