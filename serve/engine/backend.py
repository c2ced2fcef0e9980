"""The interface between the HTTP layer and whatever executes the model.

Two implementations: the embedded PyTorch engine (`serve.engine.async_engine`) and the
TensorRT-LLM Executor (`serve.backends.trtllm`). The server knows nothing else about them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from serve.engine.request import GenerationRequest, GenerationResult


@dataclass
class EngineStats:
    """A snapshot for /metrics and /health."""

    waiting: int = 0
    running: int = 0
    kv_blocks_used: int = 0
    kv_blocks_free: int = 0
    generated_tokens: int = 0  # total since start


class Backend(ABC):
    name: str = "backend"

    @abstractmethod
    def start(self) -> None:
        """Load the model and warm it up (blocking); afterwards `generate` is accepted."""

    @abstractmethod
    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Generate for one request. Cancelling the awaiting task aborts the request and frees
        its KV blocks. Raises `serve.engine.errors.EngineError` subclasses."""

    @abstractmethod
    def stats(self) -> EngineStats: ...

    @abstractmethod
    async def shutdown(self, drain: bool = True) -> None:
        """Stop accepting; with `drain`, finish running and queued requests first."""
