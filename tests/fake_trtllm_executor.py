"""A FAKE of the small part of `tensorrt_llm.bindings.executor` that `serve.backends.trtllm` uses.

Not TensorRT-LLM: it records what the backend constructs and lets a test decide every response.
Names and keyword arguments follow the pybind11 bindings (`cpp/tensorrt_llm/pybind/executor/`);
like the real Executor, results include the decoder input tokens unless
`OutputConfig.exclude_input_from_output` is set, and never include the end id.
"""

from __future__ import annotations

import enum
import itertools
import queue
import threading
import types
from dataclasses import dataclass, field
from typing import Any


class ModelType(enum.Enum):
    DECODER_ONLY = 0
    ENCODER_DECODER = 1


class BatchingType(enum.Enum):
    STATIC = 0
    INFLIGHT = 1


class CommunicationType(enum.Enum):
    MPI = 0


class CommunicationMode(enum.Enum):
    LEADER = 0
    ORCHESTRATOR = 1


class FinishReason(enum.Enum):
    NOT_FINISHED = 0
    END_ID = 1
    STOP_WORDS = 2
    LENGTH = 3
    CANCELLED = 5


class _Record:
    """Stores its constructor keywords as attributes; unknown attributes read as absent."""

    def __init__(self, **kwargs: Any):
        self.__dict__.update(kwargs)


class KvCacheConfig(_Record):
    pass


class ExecutorConfig(_Record):
    parallel_config = None


class OrchestratorConfig:
    def __init__(self, is_orchestrator: bool = True, worker_executable_path: str = ""):
        self.is_orchestrator, self.worker_executable_path = is_orchestrator, worker_executable_path


class ParallelConfig:
    def __init__(
        self, communication_type=None, communication_mode=None, device_ids=None, orchestrator_config=None
    ):
        self.communication_type, self.communication_mode = communication_type, communication_mode
        self.device_ids, self.orchestrator_config = device_ids, orchestrator_config


class SamplingConfig:
    def __init__(self, beam_width: int = 1, **kwargs: Any):
        self.beam_width = beam_width
        self.min_tokens = None
        self.length_penalty = None
        self.early_stopping = None
        self.__dict__.update(kwargs)


class OutputConfig:
    def __init__(self, exclude_input_from_output: bool = False, return_perf_metrics: bool = False):
        self.exclude_input_from_output = exclude_input_from_output
        self.return_perf_metrics = return_perf_metrics


class Request:
    def __init__(self, input_token_ids: list[int], max_tokens: int, **kwargs: Any):
        self.input_token_ids = list(input_token_ids)
        self.max_tokens = max_tokens
        self.streaming = False
        self.sampling_config = SamplingConfig()
        self.output_config = OutputConfig()
        self.end_id = self.pad_id = self.encoder_input_token_ids = None
        self.__dict__.update(kwargs)


@dataclass
class Result:
    is_final: bool
    output_token_ids: list[list[int]]
    finish_reasons: list[FinishReason] = field(default_factory=list)
    request_perf_metrics: Any = None


class Response:
    def __init__(self, request_id: int, result: Result | None = None, error_msg: str | None = None):
        self.request_id, self._result, self._error = request_id, result, error_msg

    def has_error(self) -> bool:
        return self._error is not None

    @property
    def error_msg(self) -> str:
        assert self._error is not None
        return self._error

    @property
    def result(self) -> Result:
        assert self._result is not None
        return self._result


class Executor:
    """Records construction, enqueued requests and cancellations; responses come from the test."""

    def __init__(self, encoder_model_path, decoder_model_path, model_type, executor_config):
        self.encoder_model_path, self.decoder_model_path = encoder_model_path, decoder_model_path
        self.model_type, self.executor_config = model_type, executor_config
        self.requests: dict[int, Request] = {}
        self.cancelled: list[int] = []
        self.iteration_stats: list[Any] = []
        self.shut_down = False
        self.enqueue_error: Exception | None = None
        self._ids = itertools.count(100)
        self._responses: queue.Queue[Response] = queue.Queue()
        self.enqueued = threading.Event()

    def can_enqueue_requests(self) -> bool:
        return True

    def enqueue_request(self, request: Request) -> int:
        if self.enqueue_error is not None:
            raise self.enqueue_error
        req_id = next(self._ids)
        self.requests[req_id] = request
        self.enqueued.set()
        return req_id

    def await_responses(self, timeout=None) -> list[Response]:
        wait = timeout.total_seconds() if timeout is not None else None
        try:
            first = self._responses.get(timeout=wait)
        except queue.Empty:
            return []
        out = [first]
        while not self._responses.empty():
            out.append(self._responses.get_nowait())
        return out

    def cancel_request(self, req_id: int) -> None:
        self.cancelled.append(req_id)

    def get_latest_iteration_stats(self) -> list[Any]:
        stats, self.iteration_stats = self.iteration_stats, []
        return stats

    def shutdown(self) -> None:
        self.shut_down = True

    # --- test controls ---------------------------------------------------------------------

    def finish(
        self, req_id: int, generated: list[list[int]], reasons: list[FinishReason] | None = None, **kw
    ):
        """Send the final response of `req_id` with `generated` tokens per beam (no end id)."""
        req = self.requests[req_id]
        prefix = [] if req.output_config.exclude_input_from_output else req.input_token_ids
        beams = [prefix + list(g) for g in generated]
        self._responses.put(Response(req_id, Result(True, beams, list(reasons or []), **kw)))

    def fail(self, req_id: int, message: str) -> None:
        self._responses.put(Response(req_id, error_msg=message))

    def iteration(self, queued: int, active: int, used_blocks: int, free_blocks: int) -> None:
        kv = types.SimpleNamespace(used_num_blocks=used_blocks, free_num_blocks=free_blocks)
        self.iteration_stats.append(
            types.SimpleNamespace(num_queued_requests=queued, num_active_requests=active, kv_cache_stats=kv)
        )


def bindings() -> types.SimpleNamespace:
    """A module-like object to pass as `TrtllmBackend(..., bindings=...)`."""
    return types.SimpleNamespace(
        Executor=Executor, ExecutorConfig=ExecutorConfig, KvCacheConfig=KvCacheConfig, Request=Request,
        SamplingConfig=SamplingConfig, OutputConfig=OutputConfig, ModelType=ModelType, BatchingType=BatchingType,
        ParallelConfig=ParallelConfig, OrchestratorConfig=OrchestratorConfig, CommunicationType=CommunicationType,
        CommunicationMode=CommunicationMode, FinishReason=FinishReason,
    )  # fmt: skip
