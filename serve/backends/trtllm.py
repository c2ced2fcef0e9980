"""The TensorRT-LLM backend: the C++ Executor running an encoder-decoder engine pair.

The Executor (`tensorrt_llm.bindings.executor`) does in-flight batching over a paged KV cache
(self-attention and cross-attention pools, split by `cross_kv_cache_fraction`). This class only
translates: a `GenerationRequest` becomes an executor `Request` (encoder input = source ids,
decoder input = the forced `[decoder_start, <tgt_lang>]` prefix), and a background thread blocks in
`await_responses` and hands each final response to the asyncio future of its request through
`loop.call_soon_threadsafe`. Cancelling the awaiting task cancels the executor request.

Behaviour verified against TensorRT-LLM sources (not run here, see README):
- `Executor(encoder_dir, decoder_dir, ModelType.ENCODER_DECODER, ExecutorConfig)` as in
  `tensorrt_llm/runtime/model_runner_cpp.py`; bindings in `cpp/tensorrt_llm/pybind/executor/`.
- `Result.output_token_ids` holds the input tokens too unless `OutputConfig.exclude_input_from_output`
  (`cpp/include/tensorrt_llm/executor/executor.h`), so it is set; the end id itself is not emitted
  (NVIDIA/TensorRT-LLM#2190), trailing end ids (beam padding) are stripped anyway.
- `Result.finish_reasons` is only filled for beam width 1; otherwise the reason is inferred from length.
- Timing: `RequestPerfMetrics` time points are `steady_clock`, which pybind11 returns as a timedelta
  since the clock's epoch; on Linux that is CLOCK_MONOTONIC, the clock of `time.monotonic()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve.engine.backend import Backend, EngineStats
from serve.engine.errors import EngineError, NotAccepting, QueueFull, RequestFailed, RequestTooLarge
from serve.engine.request import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _import_bindings() -> Any:
    """`tensorrt_llm.bindings.executor`; importing tensorrt_llm first loads its plugins and MPI."""
    import tensorrt_llm  # noqa: F401
    from tensorrt_llm.bindings import executor

    return executor


def trtllm_available() -> bool:
    """Whether `import tensorrt_llm` works here (for `--backend auto`, together with an engine dir)."""
    try:
        import tensorrt_llm  # noqa: F401
    except Exception:
        return False
    return True


def create_backend(engine_dir: str | Path, **settings: Any) -> TrtllmBackend:
    """The backend for `--backend trtllm`; fails with one clear line when TensorRT-LLM is missing."""
    try:
        import tensorrt_llm  # noqa: F401
    except Exception as e:
        raise RuntimeError(
            f"--backend trtllm needs TensorRT-LLM (`import tensorrt_llm` failed: {_one_line(e)}); "
            "use --backend pytorch"
        ) from None
    return TrtllmBackend(engine_dir, **settings)


@dataclass(frozen=True)
class EngineLimits:
    """What the built engines accept, from their config.json files (written by trtllm-build)."""

    max_batch_size: int
    max_num_tokens: int
    max_beam_width: int
    max_encoder_input_len: int  # longest source
    max_decoder_input_len: int  # longest forced prefix
    max_seq_len: int  # decoder prefix + generated tokens
    world_size: int
    end_id: int
    pad_id: int

    @classmethod
    def from_engine_dir(cls, engine_dir: Path) -> EngineLimits:
        """Read `encoder/config.json`, `decoder/config.json` and `languages.json` of an engine dir."""
        configs = {}
        for name in ("encoder", "decoder"):
            path = engine_dir / name / "config.json"
            try:
                configs[name] = json.loads(path.read_text())
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"{path} not found: not an engine dir built by convert.build"
                ) from None
        enc, dec = (configs[n].get("build_config", {}) for n in ("encoder", "decoder"))
        pretrained = configs["decoder"].get("pretrained_config", {})
        end_id, pad_id = _special_ids(engine_dir, pretrained)
        return cls(
            max_batch_size=int(dec["max_batch_size"]),
            max_num_tokens=int(dec.get("max_num_tokens") or dec["max_batch_size"] * dec["max_seq_len"]),
            max_beam_width=int(dec["max_beam_width"]),
            max_encoder_input_len=int(dec.get("max_encoder_input_len") or enc["max_input_len"]),
            max_decoder_input_len=int(dec["max_input_len"]),
            max_seq_len=int(dec["max_seq_len"]),
            world_size=int(pretrained.get("mapping", {}).get("world_size", 1)),
            end_id=end_id,
            pad_id=pad_id,
        )


def _special_ids(engine_dir: Path, pretrained: dict) -> tuple[int, int]:
    """(end_id, pad_id): languages.json (copied from the checkpoint) first, else the decoder config."""
    path = engine_dir / "languages.json"
    meta = json.loads(path.read_text()) if path.is_file() else {}
    eos = meta.get("eos_token_id", pretrained.get("eos_token_id"))
    pad = meta.get("pad_token_id", pretrained.get("pad_token_id"))
    if eos is None or pad is None:
        raise ValueError(
            f"{engine_dir}: no eos_token_id/pad_token_id in languages.json or decoder/config.json"
        )
    return int(eos), int(pad)


@dataclass
class _Pending:
    request: GenerationRequest
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    def resolve(self, value: GenerationResult | BaseException) -> None:
        """Complete the future from any thread; a future already cancelled is left alone."""

        def complete() -> None:
            if self.future.done():
                return
            if isinstance(value, BaseException):
                self.future.set_exception(value)
            else:
                self.future.set_result(value)

        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self.loop.call_soon_threadsafe(complete)


class TrtllmBackend(Backend):
    """`Backend` on TensorRT-LLM's Executor for an engine dir written by `python -m convert.build`.

    Settings: `kv_memory_fraction` is the KV pool's share of free GPU memory after the engines
    load (`KvCacheConfig.free_gpu_memory_fraction`), `cross_kv_cache_fraction` the part of that pool
    given to cross-attention K/V; `max_batch_size`, `max_num_tokens` and `max_beam_width` are capped
    at what the engines were built for; `max_queue` bounds requests in flight (queued in the
    executor or running) before `QueueFull`. `bindings` replaces `tensorrt_llm.bindings.executor`
    (tests pass a fake); without it the module is imported in `start()`. With world_size > 1 the
    Executor runs in orchestrator mode and spawns its MPI workers (`tensorrt_llm/bin/executorWorker`),
    so one server process drives all ranks.
    """

    name = "trtllm"

    def __init__(
        self,
        engine_dir: str | Path,
        *,
        max_queue: int = 256,
        kv_memory_fraction: float = 0.9,
        cross_kv_cache_fraction: float = 0.5,
        max_beam_width: int | None = None,
        max_batch_size: int | None = None,
        max_num_tokens: int | None = None,
        device_ids: list[int] | None = None,
        worker_executable: str | Path | None = None,
        retry_after: float = 1.0,
        poll_interval_s: float = 0.05,
        bindings: Any = None,
    ):
        self.engine_dir = Path(engine_dir)
        if not self.engine_dir.is_dir():
            raise FileNotFoundError(f"engine dir {self.engine_dir} does not exist")
        self.limits = EngineLimits.from_engine_dir(self.engine_dir)
        self.max_queue = max_queue
        self.kv_memory_fraction = kv_memory_fraction
        self.cross_kv_cache_fraction = cross_kv_cache_fraction
        self.max_beam_width = min(max_beam_width or self.limits.max_beam_width, self.limits.max_beam_width)
        self.max_batch_size = min(max_batch_size or self.limits.max_batch_size, self.limits.max_batch_size)
        self.max_num_tokens = min(max_num_tokens or self.limits.max_num_tokens, self.limits.max_num_tokens)
        self.device_ids = device_ids
        self.worker_executable = worker_executable
        self.retry_after = retry_after
        self.poll_interval_s = poll_interval_s
        self._bindings = bindings
        self._executor: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._accepting = False
        self._generated_tokens = 0
        self._last_iteration: Any = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Open the Executor on both engines and start the response thread (blocking)."""
        if self._executor is not None:
            return
        b = self._bindings if self._bindings is not None else _import_bindings()
        self._bindings = b
        kv_cache = b.KvCacheConfig(
            enable_block_reuse=False,
            free_gpu_memory_fraction=self.kv_memory_fraction,
            cross_kv_cache_fraction=self.cross_kv_cache_fraction,
        )
        config = b.ExecutorConfig(
            max_beam_width=self.max_beam_width,
            kv_cache_config=kv_cache,
            batching_type=b.BatchingType.INFLIGHT,
            max_batch_size=self.max_batch_size,
            max_num_tokens=self.max_num_tokens,
            enable_chunked_context=False,
        )
        if self.limits.world_size > 1:
            config.parallel_config = b.ParallelConfig(
                b.CommunicationType.MPI,
                b.CommunicationMode.ORCHESTRATOR,
                device_ids=self.device_ids,
                orchestrator_config=b.OrchestratorConfig(True, str(self._worker_executable())),
            )
        elif self.device_ids:
            config.parallel_config = b.ParallelConfig(device_ids=self.device_ids)
        executor = b.Executor(
            self.engine_dir / "encoder", self.engine_dir / "decoder", b.ModelType.ENCODER_DECODER, config
        )
        if not executor.can_enqueue_requests():
            executor.shutdown()
            raise RuntimeError("this process cannot enqueue TensorRT-LLM requests (not the leader rank)")
        self._executor = executor
        self._stop.clear()
        self._thread = threading.Thread(target=self._response_loop, name="trtllm-responses", daemon=True)
        self._thread.start()
        self._accepting = True
        log.info("TensorRT-LLM executor ready: %s (%s)", self.engine_dir, self.limits)

    def _worker_executable(self) -> Path:
        if self.worker_executable is not None:
            return Path(self.worker_executable)
        import tensorrt_llm

        return Path(tensorrt_llm.__file__).parent / "bin" / "executorWorker"

    async def shutdown(self, drain: bool = True) -> None:
        """Stop accepting; with `drain` wait for in-flight requests, then cancel what is left and close.

        Cancelling this coroutine (e.g. a drain timeout) still cancels the rest and closes the executor.
        """
        self._accepting = False
        if self._executor is None:
            return
        try:
            while drain and self._pending:
                await asyncio.sleep(self.poll_interval_s)
        finally:
            with self._lock:
                pending, self._pending = self._pending, {}
            for req_id, entry in pending.items():
                self._cancel_in_executor(req_id)
                entry.resolve(NotAccepting("the TensorRT-LLM backend shut down"))
            self._stop.set()
            if self._thread is not None:
                await asyncio.to_thread(self._thread.join)
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown)

    # --- requests --------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Enqueue one request and wait for its final response (see the module docstring)."""
        if not self._accepting or self._executor is None:
            raise NotAccepting(
                "the TensorRT-LLM backend is not accepting requests (not started or shutting down)"
            )
        self._check_fits(request)
        executor_request = self._executor_request(request)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if len(self._pending) >= self.max_queue:
                raise QueueFull(
                    f"{len(self._pending)} requests in flight (limit {self.max_queue})", self.retry_after
                )
            try:
                req_id = self._executor.enqueue_request(executor_request)
            except Exception as e:
                raise RequestFailed(
                    f"TensorRT-LLM rejected request {request.request_id}: {_one_line(e)}"
                ) from e
            self._pending[req_id] = _Pending(request, future, loop)
        try:
            return await future
        except asyncio.CancelledError:
            with self._lock:
                entry = self._pending.pop(req_id, None)
            if entry is not None:
                self._cancel_in_executor(req_id)
            raise

    def _check_fits(self, request: GenerationRequest) -> None:
        lim, params = self.limits, request.params
        problems = []
        if len(request.encoder_ids) > lim.max_encoder_input_len:
            problems.append(
                f"source has {len(request.encoder_ids)} tokens, engine max {lim.max_encoder_input_len}"
            )
        if len(request.decoder_prefix) > lim.max_decoder_input_len:
            problems.append(
                f"decoder prefix has {len(request.decoder_prefix)} tokens, max {lim.max_decoder_input_len}"
            )
        if len(request.decoder_prefix) >= lim.max_seq_len:
            problems.append(f"decoder prefix leaves no room in engine max_seq_len {lim.max_seq_len}")
        if params.beam_size > self.max_beam_width:
            problems.append(f"beam_size {params.beam_size} > engine max_beam_width {self.max_beam_width}")
        if problems:
            raise RequestTooLarge(f"request {request.request_id}: " + "; ".join(problems))

    def _max_tokens(self, request: GenerationRequest) -> int:
        """`max_new_tokens`, capped by what the decoder engine holds after the prefix (`max_seq_len`)."""
        return min(request.params.max_new_tokens, self.limits.max_seq_len - len(request.decoder_prefix))

    def _executor_request(self, request: GenerationRequest) -> Any:
        """The executor `Request` for one `GenerationRequest` (HF `generate` meanings mapped over)."""
        b, params = self._bindings, request.params
        sampling = b.SamplingConfig(params.beam_size)
        if params.min_new_tokens > 0:
            _set_first(sampling, ("min_tokens", "min_length"), params.min_new_tokens)
        if params.beam_size > 1:
            sampling.length_penalty = float(params.length_penalty)
            # HF early_stopping=True stops once beam_size hypotheses are done (TRT-LLM 1); False is
            # the heuristic (TRT-LLM 0).
            sampling.early_stopping = 1 if params.early_stopping else 0
        output = b.OutputConfig()
        output.exclude_input_from_output = True
        if hasattr(output, "return_perf_metrics"):
            output.return_perf_metrics = True
        return b.Request(
            list(request.decoder_prefix),
            self._max_tokens(request),
            streaming=False,
            sampling_config=sampling,
            output_config=output,
            end_id=self.limits.end_id,
            pad_id=self.limits.pad_id,
            encoder_input_token_ids=list(request.encoder_ids),
        )

    def _cancel_in_executor(self, req_id: int) -> None:
        try:
            self._executor.cancel_request(req_id)
        except Exception as e:  # the request may have finished meanwhile
            log.debug("cancel_request(%s) failed: %s", req_id, _one_line(e))

    # --- responses -------------------------------------------------------------------------

    def _response_loop(self) -> None:
        timeout = datetime.timedelta(seconds=self.poll_interval_s)
        while not self._stop.is_set():
            try:
                responses = self._executor.await_responses(timeout=timeout)
            except Exception as e:
                if self._stop.is_set():
                    break
                log.error("await_responses failed: %s", _one_line(e))
                self._fail_all(RequestFailed(f"TensorRT-LLM executor error: {_one_line(e)}"))
                time.sleep(self.poll_interval_s)
                continue
            for response in responses:
                try:
                    self._dispatch(response)
                except Exception as e:  # one bad response must not stop the loop
                    log.exception("could not handle response %s: %s", getattr(response, "request_id", "?"), e)

    def _dispatch(self, response: Any) -> None:
        req_id = response.request_id
        if response.has_error():
            with self._lock:
                entry = self._pending.pop(req_id, None)
            if entry is not None:
                msg = " ".join(str(response.error_msg).split())
                entry.resolve(
                    RequestFailed(f"request {entry.request.request_id} failed in TensorRT-LLM: {msg}")
                )
            return
        result = response.result
        if not result.is_final:
            return
        with self._lock:
            entry = self._pending.pop(req_id, None)
        if entry is None:  # cancelled, or failed earlier
            return
        generated = self._generation_result(entry.request, result)
        self._generated_tokens += len(generated.token_ids)
        entry.resolve(generated)

    def _generation_result(self, request: GenerationRequest, result: Any) -> GenerationResult:
        beams = result.output_token_ids
        tokens = list(beams[0]) if beams else []  # beam 0 is the best hypothesis
        while tokens and tokens[-1] == self.limits.end_id:
            tokens.pop()
        return GenerationResult(
            request_id=request.request_id,
            token_ids=tokens,
            finish_reason=_finish_reason(result, len(tokens), self._max_tokens(request)),
            prompt_tokens=len(request.encoder_ids),
            first_token_time=_first_token_time(result),
        )

    def _fail_all(self, error: EngineError) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for entry in pending.values():
            entry.resolve(error)

    # --- stats -----------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        """Waiting/running/KV blocks from the executor's latest iteration stats, else own counters."""
        in_flight = len(self._pending)
        stats = EngineStats(running=in_flight, generated_tokens=self._generated_tokens)
        if self._executor is None:
            return stats
        try:
            latest = list(self._executor.get_latest_iteration_stats())
        except Exception as e:
            log.debug("get_latest_iteration_stats failed: %s", _one_line(e))
            latest = []
        if latest:
            self._last_iteration = latest[-1]
        it = self._last_iteration
        if it is None:
            return stats
        kv = getattr(it, "kv_cache_stats", None)
        if kv is not None:
            stats.kv_blocks_used = int(kv.used_num_blocks)
            stats.kv_blocks_free = int(kv.free_num_blocks)
        if in_flight == 0:  # idle: no iterations run, the last snapshot is stale
            stats.waiting = stats.running = 0
        else:
            stats.waiting = int(it.num_queued_requests)
            stats.running = int(it.num_active_requests)
        return stats


def _set_first(obj: Any, names: tuple[str, ...], value: Any) -> None:
    """Set the first attribute of `names` that `obj` has (names differ across TRT-LLM versions)."""
    for name in names:
        if hasattr(obj, name):
            setattr(obj, name, value)
            return
    raise AttributeError(f"{type(obj).__name__} has none of {names}")


def _finish_reason(result: Any, n_tokens: int, max_new_tokens: int) -> str:
    reasons = list(getattr(result, "finish_reasons", None) or [])
    if reasons:
        name = getattr(reasons[0], "name", None) or str(reasons[0]).rsplit(".", 1)[-1]
        if name in ("END_ID", "STOP_WORDS"):
            return "eos"
        if name == "LENGTH":
            return "length"
    # The end id is not part of the output, so a sequence that hit EOS is shorter than the limit.
    return "length" if n_tokens >= max_new_tokens else "eos"


def _first_token_time(result: Any) -> float | None:
    metrics = getattr(result, "request_perf_metrics", None)
    point = getattr(getattr(metrics, "timing_metrics", None), "first_token_time", None)
    if not isinstance(point, datetime.timedelta):
        return None
    seconds = point.total_seconds()
    return seconds if 0 < seconds <= time.monotonic() else None
