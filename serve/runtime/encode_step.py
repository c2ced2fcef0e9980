"""The encoder passes over newly admitted sources, with their cross-attention K/V written to the pool,
replayed as CUDA graphs where they fit one.

Run eagerly, a pass launches about 200 kernels from Python: on the H200 that took about 8 ms of host
time for one 24-token sentence whose kernels take 0.65 ms, and the engine step that admits a request
waits for it before it launches the next decode step. So on CUDA the sources go into padded grids of
a (sources, length) bucket, shortest first, each grid as full as the largest bucket allows, and each
grid replays that bucket's graph (`PackedLayout.grid`: padding keys are masked, so real tokens see what
a packed pass shows them). A grid's inputs arrive in one copy, and its padding tokens' K/V go to the
pool's scratch block, which no sequence reads. Sources longer than the longest bucket take one eager
pass over their packed, unpadded tokens.
"""

from __future__ import annotations

import torch

from serve.runtime.kv_cache import KVPool
from serve.runtime.model import Decoder, Encoder, PackedLayout
from serve.runtime.transfer import upload

SOURCES = (1, 2, 4, 8, 16, 32, 64)
LENGTHS = (16, 32, 64, 128, 256)
GRID_TOKENS = 2048  # the most (padded) tokens a graph's grid holds


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
        for part, bucket in self.plan(sources):
            src, sl = [sources[i] for i in part], [slots[i] for i in part]
            if bucket is None:
                lens = [len(s) for s in src]
                tokens = upload([t for s in src for t in s], self.device)
                positions = upload([p for n in lens for p in range(n)], self.device)
                flat = upload([x for s in sl for x in s], self.device)
                self._pass(tokens, positions, PackedLayout.of(lens, self.device), flat)
            elif self.device.type != "cuda":
                self._padded_pass(self._inputs(src, sl, *bucket), *bucket)
            else:
                graph, static = self._graph(*bucket)
                static.copy_(self._inputs(src, sl, *bucket).pin_memory(), non_blocking=True)  # no host wait
                graph.replay()

    def plan(self, sources: list[list[int]]) -> list[tuple[list[int], tuple[int, int] | None]]:
        """The passes that encode these sources: (their indices, bucket), None for the packed eager pass.
        Sources fill grids shortest first, so that each grid's length wastes little on padding."""
        grids, rest, part = [], [], []
        for i in sorted(range(len(sources)), key=lambda i: len(sources[i])):
            if self.bucket([sources[i]]) is None:
                rest.append(i)
            elif part and self.bucket([sources[j] for j in (*part, i)]) is None:
                grids.append(part)
                part = [i]
            else:
                part.append(i)
        plan = [(p, self.bucket([sources[j] for j in p])) for p in (*grids, part) if p]
        return plan + ([(sorted(rest), None)] if rest else [])

    def bucket(self, sources: list[list[int]]) -> tuple[int, int] | None:
        """The smallest (sources, length) bucket whose grid holds these sources; None: none does."""
        n, longest = len(sources), max(len(s) for s in sources)
        b = next((b for b in self.sources if b >= n), None)
        s = next((s for s in self.lengths if s >= longest), None)
        return None if b is None or s is None or b * s > GRID_TOKENS else (b, s)

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
            for b, s in self.buckets():
                self._graph(b, s)

    def buckets(self) -> list[tuple[int, int]]:
        return [(b, s) for b in self.sources for s in self.lengths if b * s <= GRID_TOKENS]

    def release_graphs(self) -> None:
        """Destroy the captured graphs (see `DecodeRunner.release_graphs`)."""
        self.graphs.clear()
        self._mempool = None

    def _graph(self, b: int, s: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if (b, s) not in self.graphs:
            static = upload(self._inputs([], [], b, s), self.device)  # every row scratch: writes nothing read
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # compile/warm kernels outside the capture
                    self._padded_pass(static, b, s)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._mempool = self._mempool or torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._mempool):
                self._padded_pass(static, b, s)
            self.graphs[b, s] = (graph, static)
        return self.graphs[b, s]
