"""One encoder pass over newly admitted sources, with their cross-attention K/V written to the pool,
replayed as a CUDA graph.

Run eagerly, a pass launches about 200 kernels from Python: on the H200 that took 8-13 ms of host
time for one 24-token sentence whose kernels take 0.65 ms, and 7-9 ms for 64 sources whose kernels
take 4 ms, and the engine step that admits requests waits for it before it launches the next decode
step. So on CUDA a pass replays the graph captured for the smallest token bucket (`TOKENS`) that holds
its sources, packed one after another as they are. The bucket's remaining tokens form padding sequences
of at most `PAD_RUN` tokens (attention stays within a sequence: they see nothing real, nothing real
sees them), whose K/V go to the pool's scratch block, which no sequence reads; the layout's entries past
them are empty sequences. Attention is flash attention's varlen kernel (`model.packed_attention`), which
reads the packed tokens where they are, and a pass's inputs arrive in one copy.
"""

from __future__ import annotations

import itertools

import torch

from serve.runtime.graphs import capture
from serve.runtime.kv_cache import KVPool
from serve.runtime.model import Decoder, Encoder, PackedLayout
from serve.runtime.transfer import upload

TOKENS = (16, 32, 64, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
PAD_RUN = 64  # padding tokens per padding sequence: their attention stays small


def buckets(sizes: tuple[int, ...], limit: int) -> list[int]:
    """The sizes below `limit`, then the limit itself (a smaller engine needs no larger graphs)."""
    limit = min(sizes[-1], limit)
    return [x for x in sizes if x < limit] + [limit]


class EncodeRunner:
    def __init__(self, encoder: Encoder, decoder: Decoder, pool: KVPool, max_sources: int, max_tokens: int,
                 max_len: int, bucketed: bool) -> None:  # fmt: skip
        """A pass has at most `max_sources` sources of at most `max_len` tokens. `bucketed`: passes of up
        to `max_tokens` tokens run padded to their bucket, replayed as graphs on CUDA (on the CPU, the
        same padded pass runs eagerly, which tests compare with the unpadded one)."""
        self.encoder, self.decoder, self.pool = encoder, decoder, pool
        self.device = pool.layers[0][0].device
        self.max_sources, self.max_len = max_sources, max_len
        self.sizes = buckets(TOKENS, max_tokens) if bucketed else []
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._mempool = None

    def run(self, sources: list[list[int]], slots: list[list[int]]) -> None:
        """Encode `sources` and write each one's cross-attention K/V at its `slots` (one per token)."""
        size = self.bucket(sources)
        if size is None:
            lens = [len(s) for s in sources]
            tokens = upload([t for s in sources for t in s], self.device)
            positions = upload([p for n in lens for p in range(n)], self.device)
            flat = upload([x for s in slots for x in s], self.device)
            self._pass(tokens, positions, PackedLayout.of(lens, self.device), flat)
        elif self.device.type != "cuda":
            self._bucket_pass(self._inputs(sources, slots, size), size)
        else:
            graph, static = self._graph(size)
            static.copy_(self._inputs(sources, slots, size).pin_memory(), non_blocking=True)  # no host wait
            graph.replay()

    def bucket(self, sources: list[list[int]]) -> int | None:
        """The smallest token bucket that holds these sources; None: run eagerly, unpadded."""
        n = sum(map(len, sources))
        return next((t for t in self.sizes if t >= n), None) if len(sources) <= self.max_sources else None

    def entries(self, size: int) -> int:
        """Sequences in a bucket's layout: room for its sources, then for its padding runs."""
        return min(size, self.max_sources) + -(-size // PAD_RUN)

    def _inputs(self, sources: list[list[int]], slots: list[list[int]], size: int) -> torch.Tensor:
        """[3 * size + entries + 1] on the host: the bucket's tokens, positions and slots, then its
        cu_seqlens. Padding tokens are id 0 at position 0, in runs of up to PAD_RUN, with their slots in
        the scratch block; the entries past them are empty sequences."""
        cu = [0, *itertools.accumulate(map(len, sources))]
        pad = size - cu[-1]
        cu += range(cu[-1] + PAD_RUN, size, PAD_RUN)
        cu += [size] * (self.entries(size) + 1 - len(cu))
        scratch = self.pool.scratch_block * self.pool.block_size
        return torch.tensor([
            *itertools.chain(*sources), *[0] * pad,
            *itertools.chain.from_iterable(range(len(s)) for s in sources), *[0] * pad,
            *itertools.chain(*slots), *(scratch + i % self.pool.block_size for i in range(pad)),
            *cu,
        ], dtype=torch.long)  # fmt: skip

    def _bucket_pass(self, inputs: torch.Tensor, size: int) -> None:
        tokens, positions, slots = inputs[: 3 * size].view(3, size)
        layout = PackedLayout(inputs[3 * size :].int(), min(size, max(self.max_len, PAD_RUN)), size)
        self._pass(tokens, positions, layout, slots)

    def _pass(
        self, tokens: torch.Tensor, positions: torch.Tensor, layout: PackedLayout, slots: torch.Tensor
    ) -> None:
        out = self.encoder.encode(tokens, positions, layout)
        for layer, (k, v) in enumerate(self.decoder.cross_kv(out)):
            self.pool.write(layer, slots, k, v)

    def capture_graphs(self) -> None:
        """Capture every bucket's graph now (compiling its kernels), so that no request waits for one."""
        if self.device.type == "cuda":
            for size in self.sizes:
                self._graph(size)

    def release_graphs(self) -> None:
        """Destroy the captured graphs (see `DecodeRunner.release_graphs`)."""
        self.graphs.clear()
        self._mempool = None

    def _graph(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if size not in self.graphs:
            static = upload(self._inputs([], [], size), self.device)  # all padding: writes nothing read
            self._mempool = self._mempool or torch.cuda.graph_pool_handle()
            graph, _ = capture(lambda: self._bucket_pass(static, size), self.device, self._mempool)
            self.graphs[size] = (graph, static)
        return self.graphs[size]
