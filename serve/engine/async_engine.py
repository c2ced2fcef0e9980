"""The embedded PyTorch backend: the engine loop on its own thread, asyncio futures for the server.

The HTTP layer calls `await generate(req)`; the request travels through an inbox to the loop
thread, which batches it in flight and resolves the future when it finishes. Cancelling the
awaiting task (client disconnect) sends an abort that frees the request's KV blocks.

With `tp_size > 1` the other ranks run in worker processes that replay rank 0's inbox events
each iteration; engines are deterministic and see identical (all-gathered) logits, so every
rank schedules the same batch and they stay in lockstep. The events travel over host pipes, not
NCCL: a collective would wait for rank 0's GPU to finish the step before, so no rank could launch
a step while the GPUs run the last one.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import os
import queue
import signal
import tempfile
import threading
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from serve.engine.backend import Backend, EngineStats
from serve.engine.core import Engine, EngineConfig
from serve.engine.errors import EngineError, NotAccepting, QueueFull, RequestFailed
from serve.engine.request import GenerationRequest, GenerationResult
from serve.runtime import tp
from serve.runtime.kv_cache import KVPool
from serve.runtime.load import load_model
from serve.runtime.shortlist import VocabShortlist

log = logging.getLogger(__name__)
IDLE_TICK_S = 0.5  # how often an idle loop wakes


@dataclass
class BackendSettings:
    device: str | None = None
    dtype: str | None = None
    tp_size: int = 1
    max_batch_size: int = 64
    max_num_tokens: int = 4096
    kv_block_size: int = 16
    kv_memory_fraction: float = 0.9
    max_queue: int = 256
    static_batching: bool = False
    trace_steps: int = 0
    shortlist: bool = False  # serve the checkpoint's output-vocabulary shortlists
    cpu_threads: int | None = None  # None: all cores but one (OpenMP threads that spin on a busy core stall)


def build_engine(ckpt_dir: Path, s: BackendSettings, eos_id: int, device: torch.device) -> Engine:
    """Load this rank's weights and size the KV pool (a fraction of free GPU memory on CUDA)."""
    encoder, decoder = load_model(ckpt_dir, device, s.dtype)
    if tp.use_peer_all_reduce(decoder.cfg.dtype, device) and tp.rank() == 0:
        log.info(
            "TP sums of up to %d bytes go through peer memory (one-shot), larger ones NCCL", tp.PEER_MAX_BYTES
        )
    cfg = EngineConfig(
        max_batch_size=s.max_batch_size,
        max_num_tokens=s.max_num_tokens,
        kv_block_size=s.kv_block_size,
        static_batching=s.static_batching,
        trace_steps=s.trace_steps,
    )
    if device.type == "cuda":
        d = decoder.cfg
        per_block = KVPool.bytes_per_block(d.num_layers, s.kv_block_size, d.num_heads, d.head_size, d.dtype)
        budget = int(torch.cuda.mem_get_info(device)[0] * s.kv_memory_fraction) // per_block
        useful = Engine.max_useful_blocks(
            cfg, min(encoder.cfg.max_position_embeddings, d.max_position_embeddings)
        )
        # every rank must admit the same requests, so all take the smallest GPU's pool
        cfg.num_kv_blocks = tp.min_over_ranks(max(1, min(budget, useful)), device)
    shortlist = VocabShortlist.load(ckpt_dir, decoder.cfg.vocab_size, device) if s.shortlist else None
    engine = Engine(encoder, decoder, cfg, eos_id=eos_id, device=device, shortlist=shortlist)
    engine.warm_up()  # every rank, in the same order: graphs hold the TP collectives
    return engine


def _device_for_rank(s: BackendSettings, rank: int) -> torch.device:
    if s.device:
        dev = torch.device(s.device)
        return torch.device("cuda", rank) if dev.type == "cuda" and s.tp_size > 1 else dev
    return torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")


def _init_group(rank: int, world: int, init_file: str, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        # a rank that dies (say, out of memory while loading) leaves the others waiting in a collective:
        # past this, PyTorch's NCCL watchdog ends the process, so an orchestrator can restart it
        timeout=timedelta(minutes=10),
    )


def _worker(
    rank: int, ckpt_dir: str, s: BackendSettings, eos_id: int, init_file: str, events: Connection
) -> None:
    """A TP rank > 0: apply rank 0's events and step in lockstep until told to stop (None) or rank 0 is gone."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1` prints where a rank is stuck
    device = _device_for_rank(s, rank)
    _init_group(rank, s.tp_size, init_file, device)
    engine = build_engine(Path(ckpt_dir), s, eos_id, device)
    with contextlib.suppress(EOFError):
        while (msg := events.recv()) is not None:
            _apply(engine, *msg)
            if engine.has_work():
                try:
                    engine.step()
                except Exception:  # as rank 0 does (its step fails alike): drop what is running
                    log.exception("engine step failed on rank %d", rank)
                    _abort_running(engine)
    _leave_group(engine)


def _abort_running(engine: Engine) -> list[str]:
    """Abort every running request (after a failed step), returning their ids."""
    ids = list(engine.running)
    for rid in ids:
        engine.abort(rid)
    return ids


def _leave_group(engine: Engine | None) -> None:
    if engine is not None:
        engine.release_graphs()
    tp.leave()


def _apply(engine: Engine, adds: list[GenerationRequest], aborts: list[str]) -> list[tuple[str, Exception]]:
    errors = []
    for req in adds:
        try:
            engine.add(req)
        except Exception as e:  # validated before queueing; anything here is this request's failure
            errors.append((req.request_id, e))
    for rid in aborts:
        engine.abort(rid)
    return errors


class PytorchBackend(Backend):
    name = "pytorch"

    def __init__(self, ckpt_dir: str | Path, settings: BackendSettings | None = None, **kwargs):
        from serve.tokenizer import TranslationTokenizer

        self.ckpt_dir = Path(ckpt_dir)
        self.settings = settings or BackendSettings(**kwargs)
        self.eos_id = TranslationTokenizer(self.ckpt_dir).eos_token_id
        self.engine: Engine | None = None
        self._inbox: queue.Queue = queue.Queue()
        self._futures: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._lock = threading.Lock()
        self._accepting = False
        self._stop: str | None = None  # None | "drain" | "now"
        self._thread: threading.Thread | None = None
        self._workers: list = []
        self._pipes: list[Connection] = []  # rank 0's end of each worker's event pipe
        self._broken: str | None = None  # why the backend stopped serving for good (a TP rank died)

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        s = self.settings
        device = _device_for_rank(s, 0)
        if device.type == "cpu":
            torch.set_num_threads(s.cpu_threads or max(1, (os.cpu_count() or 2) - 1))
        if s.tp_size > 1:
            self._spawn_workers(device)
        self.engine = build_engine(self.ckpt_dir, s, self.eos_id, device)
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()
        self._accepting = True
        log.info(
            "pytorch backend ready on %s: %d KV blocks of %d tokens",
            device,
            self.engine.pool.num_blocks,
            s.kv_block_size,
        )

    def _spawn_workers(self, device: torch.device) -> None:
        import torch.multiprocessing as mp

        fd, init_file = tempfile.mkstemp(prefix="mt-tp-")
        os.close(fd)
        os.unlink(init_file)
        ctx = mp.get_context("spawn")
        for rank in range(1, self.settings.tp_size):
            ours, theirs = ctx.Pipe()
            p = ctx.Process(
                target=_worker,
                args=(rank, str(self.ckpt_dir), self.settings, self.eos_id, init_file, theirs),
                daemon=True,
            )
            p.start()
            theirs.close()  # the worker holds it now; once the worker exits, sends fail instead of blocking
            self._workers.append(p)
            self._pipes.append(ours)
        _init_group(0, self.settings.tp_size, init_file, device)

    async def shutdown(self, drain: bool = True) -> None:
        self._accepting = False
        self._stop = "drain" if drain else "now"
        self._inbox.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self._workers and torch.distributed.is_initialized():
            # all ranks at once: a rank's NCCL teardown waits for its peers'
            leaving = threading.Thread(target=_leave_group, args=(self.engine,), daemon=True)
            leaving.start()
            await asyncio.to_thread(leaving.join, 30)
        for p in self._workers:
            await asyncio.to_thread(p.join, 30)
            if p.is_alive():
                log.warning("TP worker %s did not exit in 30 s; killing it", p.pid)
                p.kill()

    # ---- requests ---------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> GenerationResult:
        if self._broken:
            raise NotAccepting(self._broken, retry_after=60.0)
        if not self._accepting or self.engine is None:
            raise NotAccepting("the engine is not accepting requests (starting up or shutting down)")
        self.engine.validate(request)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            waiting = len(self._futures) - len(self.engine.running)
            if waiting >= self.settings.max_queue:
                raise QueueFull(
                    f"{waiting} requests are waiting (limit {self.settings.max_queue})", retry_after=1.0
                )
            self._futures[request.request_id] = (loop, fut)
        self._inbox.put(("add", request))
        try:
            return await fut
        except asyncio.CancelledError:
            self._inbox.put(("abort", request.request_id))
            raise
        finally:
            with self._lock:
                self._futures.pop(request.request_id, None)

    def stats(self) -> EngineStats:
        e = self.engine
        if e is None:
            return EngineStats()
        with self._lock:
            outstanding = len(self._futures)
        running = len(e.running)
        return EngineStats(
            waiting=max(0, outstanding - running),
            running=running,
            kv_blocks_used=e.pool.allocator.num_used,
            kv_blocks_free=e.pool.allocator.num_free,
            generated_tokens=e.generated_tokens,
        )

    # ---- loop thread --------------------------------------------------------------------------
    def _resolve(
        self, rid: str, result: GenerationResult | None = None, error: Exception | None = None
    ) -> None:
        with self._lock:
            entry = self._futures.get(rid)
        if entry is None:
            return
        loop, fut = entry

        def settle() -> None:
            if not fut.done():
                fut.set_exception(error) if error is not None else fut.set_result(result)

        loop.call_soon_threadsafe(settle)

    def _drain_inbox(self, block: bool) -> tuple[list[GenerationRequest], list[str]]:
        adds, aborts = [], []
        try:
            item = self._inbox.get(timeout=IDLE_TICK_S) if block else self._inbox.get_nowait()
            while True:
                if item is not None:
                    (adds if item[0] == "add" else aborts).append(item[1])
                item = self._inbox.get_nowait()
        except queue.Empty:
            pass
        return adds, aborts

    def _to_workers(self, msg: tuple[list[GenerationRequest], list[str]] | None) -> bool:
        """Send this iteration's events to the other TP ranks; False (and the backend broken) if one died."""
        try:
            for conn in self._pipes:
                conn.send(msg)
            return True
        except OSError as e:
            self._broken = f"a tensor-parallel rank exited ({type(e).__name__}); restart the server"
            log.error("%s", self._broken)
            return False

    def _loop(self) -> None:
        engine = self.engine
        failed: list[str] = []  # aborted here by a failed step: the other ranks abort them too
        while True:
            adds, aborts = self._drain_inbox(block=not engine.has_work())
            aborts, failed = aborts + failed, []
            stopping = self._stop == "now" or (self._stop == "drain" and not engine.has_work() and not adds)
            working = adds or aborts or engine.has_work()
            if stopping or (working and not self._to_workers((adds, aborts))):
                self._accepting = False
                why = self._broken or "the server is shutting down"
                for req in adds:
                    self._resolve(req.request_id, error=NotAccepting(why))
                for rid in list(engine.waiting) + list(engine.running):
                    engine.abort(rid)
                    self._resolve(rid, error=NotAccepting(why))
                if not self._broken:
                    self._to_workers(None)
                return
            for rid, err in _apply(engine, adds, aborts):
                self._resolve(rid, error=err if isinstance(err, EngineError) else RequestFailed(str(err)))
            if not engine.has_work():
                continue
            try:
                out = engine.step()
            except Exception:  # a bug outside any single request: fail what is running, keep serving
                log.exception("engine step failed")
                failed = _abort_running(engine)
                for rid in failed:
                    self._resolve(rid, error=RequestFailed("engine step failed"))
                continue
            for res in out.results:
                self._resolve(res.request_id, result=res)
            for rid, err in out.failures:
                self._resolve(rid, error=err)
