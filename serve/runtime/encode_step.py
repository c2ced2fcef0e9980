"""One encoder pass over newly admitted sources, with their cross-attention K/V written to the pool,
replayed as a CUDA graph.

Run eagerly, a pass launches about 200 kernels from Python: on the H200 that took 8-13 ms of host
time for one 24-token sentence whose kernels take 0.65 ms, and 7-9 ms for 64 sources whose kernels
take 4 ms, and the engine step that admits requests waits for it before it launches the next decode
step. So on CUDA a pass replays the graph captured for the smallest token bucket (`TOKENS`) that holds
its sources, packed one after another as they are, and for the longest source: `SHORT` tokens or the
model's limit, which sizes the attention kernel's grid. The bucket's remaining tokens form padding sequences
of at most `PAD_RUN` tokens (attention stays within a sequence: they see nothing real, nothing real
sees them), whose K/V go to the pool's scratch block, which no sequence reads; the layout's entries past
them are empty sequences. Attention is flash attention's varlen kernel (`model.packed_attention`), which
reads the packed tokens where they are, and a pass's inputs arrive in one copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from serve.runtime.graphs import capture
from serve.runtime.kv_cache import KVPool
from serve.runtime.model import Decoder, Encoder, PackedLayout
from serve.runtime.transfer import upload

TOKENS = (16, 32, 64, 128, 256, 512, 1024, 1536, 2048, 3072, 4096, 6144, 8192)
# The varlen kernel launches max_len / 128 programs per sequence and head, most of which exit at once
# when sources are short: passes whose sources all fit SHORT positions take graphs whose max_len is SHORT.
# On the H200, passes of 1 and 16 short sources 0.86 / 1.87 -> 0.73 / 1.69 ms with these graphs and the
# one-program-a-row K/V write (`encoder-write-kv-short-graphs-ab.json`).
SHORT = 128
PAD_RUN = 128  # padding tokens per padding sequence: one program of the kernel each


def buckets(sizes: tuple[int, ...], limit: int) -> list[int]:
    """The sizes below `limit`, then the limit itself (a smaller engine needs no larger graphs)."""
    limit = min(sizes[-1], limit)
    return [x for x in sizes if x < limit] + [limit]


def packed(sources: list[list[int]], slots: Sequence[Sequence[int]]) -> np.ndarray:
    """int64 [3, tokens]: the sources' tokens one after another, each token's position in its source, and
    its slot. In numpy, because the device waits for it when a wave of requests arrives together: from
    Python lists, a pass of 64 sources (3 700 tokens) took 1.4 ms of host time with its slots, now 0.6."""
    lens = np.array([len(s) for s in sources], dtype=np.int64)
    if not len(lens):
        return np.zeros((3, 0), dtype=np.int64)
    starts = np.cumsum(lens) - lens
    n = int(lens.sum())
    return np.stack([np.concatenate(sources), np.arange(n) - np.repeat(starts, lens), np.concatenate(slots)])


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
        self.lengths = sorted({min(SHORT, max_len), max_len}) if bucketed else []
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._mempool = None

    def run(self, sources: list[list[int]], slots: Sequence[Sequence[int]]) -> None:
        """Encode `sources` and write each one's cross-attention K/V at its `slots` (one per token)."""
        bucket = self.bucket(sources)
        if bucket is None:
            tokens, positions, flat = (
                upload(t, self.device) for t in torch.from_numpy(packed(sources, slots))
            )
            self._pass(tokens, positions, PackedLayout.of([len(s) for s in sources], self.device), flat)
        elif self.device.type != "cuda":
            self._bucket_pass(self._inputs(sources, slots, bucket[0]), *bucket)
        else:
            graph, static = self._graph(*bucket)
            inputs = self._inputs(sources, slots, bucket[0]).pin_memory()
            static.copy_(inputs, non_blocking=True)  # no host wait
            graph.replay()

    def bucket(self, sources: list[list[int]]) -> tuple[int, int] | None:
        """The smallest (tokens, longest source) bucket that holds these sources; None: run eagerly, unpadded."""
        size = next((t for t in self.sizes if t >= sum(map(len, sources))), None)
        length = next((n for n in self.lengths if n >= max(map(len, sources), default=0)), None)
        ok = size is not None and length is not None and len(sources) <= self.max_sources
        return (size, length) if ok else None

    def entries(self, size: int) -> int:
        """Sequences in a bucket's layout: room for its sources, then for its padding runs."""
        return min(size, self.max_sources) + -(-size // PAD_RUN)

    def _inputs(self, sources: list[list[int]], slots: Sequence[Sequence[int]], size: int) -> torch.Tensor:
        """[3 * size + entries + 1] on the host: the bucket's tokens, positions and slots, then its
        cu_seqlens. Padding tokens are id 0 at position 0, in runs of up to PAD_RUN, with their slots in
        the scratch block; the entries past them are empty sequences."""
        real, bs = packed(sources, slots), self.pool.block_size
        n = real.shape[1]
        out = np.zeros(3 * size + self.entries(size) + 1, dtype=np.int64)
        inputs, cu = out[: 3 * size].reshape(3, size), out[3 * size :]
        inputs[:, :n] = real
        inputs[2, n:] = self.pool.scratch_block * bs + np.arange(size - n) % bs
        runs = np.arange(n, size, PAD_RUN)[1:]  # where each padding sequence but the last ends
        ends = np.concatenate([np.cumsum([len(s) for s in sources], dtype=np.int64), runs])
        cu[1 : len(ends) + 1] = ends
        cu[len(ends) + 1 :] = size
        return torch.from_numpy(out)

    def _bucket_pass(self, inputs: torch.Tensor, size: int, length: int) -> None:
        tokens, positions, slots = inputs[: 3 * size].view(3, size)
        layout = PackedLayout(inputs[3 * size :].int(), min(size, max(length, PAD_RUN)), size)
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
                for length in self.lengths:
                    self._graph(size, length)

    def release_graphs(self) -> None:
        """Destroy the captured graphs (see `DecodeRunner.release_graphs`)."""
        self.graphs.clear()
        self._mempool = None

    def _graph(self, size: int, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if (size, length) not in self.graphs:
            static = upload(self._inputs([], [], size), self.device)  # all padding: writes nothing read
            self._mempool = self._mempool or torch.cuda.graph_pool_handle()
            graph, _ = capture(lambda: self._bucket_pass(static, size, length), self.device, self._mempool)
            self.graphs[size, length] = (graph, static)
        return self.graphs[size, length]
