"""Capturing a step as a CUDA graph, as the decode and encoder runners both do."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def capture(fn: Callable[[], T], device: torch.device, pool) -> tuple[torch.cuda.CUDAGraph, T]:
    """Run `fn` twice on a side stream, which compiles and warms its kernels outside the capture, then
    capture one call into a graph that allocates from `pool` (`torch.cuda.graph_pool_handle()`).
    Returns the graph and what the captured call returned: the tensors each replay writes."""
    current = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out
