"""The iteration-level engine: in-flight batching over a paged KV pool, one `step()` at a time.

Each step (1) admits waiting requests while their KV blocks can be reserved and the step's
token budget (`max_num_tokens`) and row budget (`max_batch_size`) allow, (2) launches one
decoder step for every beam admitted before (requests new to decoding feed their forced prefix,
the others their last token), (3) while the device runs it, launches the encoder once over the
packed, unpadded sources of the newly admitted requests and their cross-attention K/V writes
(their decoding starts next step), and (4) advances each request's search with the step's
top-K, freeing the blocks of requests that finished.

With a `VocabShortlist`, each request may emit only its target language's tokens and its
source's (`serve.runtime.shortlist`); requests in languages without a list use the whole vocabulary.

Capacity policy is TRT-LLM's GUARANTEED_NO_EVICT: a request is admitted only when all blocks
it can ever need (source, prefix + max_new_tokens per beam) are reserved, so nothing is ever
preempted. A failure inside one request fails that request alone.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch

from serve.engine.errors import RequestFailed, RequestTooLarge
from serve.engine.request import GenerationRequest, GenerationResult, SamplingParams
from serve.engine.search import Hypotheses
from serve.runtime.decode_step import DecodeRunner
from serve.runtime.kv_cache import KVPool
from serve.runtime.model import Decoder, Encoder, EncoderBatch
from serve.runtime.shortlist import VocabShortlist

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_batch_size: int = 64  # decoder rows (beams) per step
    max_num_tokens: int = 4096  # encoder tokens admitted per step
    kv_block_size: int = 16
    num_kv_blocks: int | None = None  # None: as many as max_batch_size full-length sequences need
    max_beam_width: int = 4
    static_batching: bool = False  # baseline: admit only into an empty batch, run it to completion
    cuda_graphs: bool = True  # replay decode steps as CUDA graphs (CUDA only)
    compile: bool = False  # torch.compile the decode step (slower start, fewer kernels per step)
    trace_steps: int = 0  # keep a trace of the last N steps (tests, debugging)


@dataclass
class _Running:
    req: GenerationRequest
    search: Hypotheses
    cross_blocks: list[int]
    beam_blocks: list[list[int]]
    rows: list[int] = field(default_factory=list)  # the runner's table row of each beam
    cached: int = 0  # decoder positions whose K/V are in the pool (same for every beam)
    first_token_time: float | None = None


@dataclass
class _Launched:
    """A decoder step running on the device: its top-K per query row, and the rows each beam reads."""

    values: torch.Tensor
    ids: torch.Tensor
    last: list[int]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Wait for the step; (log-probs, ids) [beams, K] on the CPU."""
        return self.values.cpu()[self.last], self.ids.cpu()[self.last]


@dataclass
class StepRecord:
    step: int
    admitted: list[str]
    decoded: list[str]
    finished: list[str]


@dataclass
class StepOutput:
    """What one step produced: finished results and failed request ids with their errors."""

    results: list[GenerationResult] = field(default_factory=list)
    failures: list[tuple[str, Exception]] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        encoder: Encoder,
        decoder: Decoder,
        config: EngineConfig,
        eos_id: int,
        device: torch.device | str = "cpu",
        shortlist: VocabShortlist | None = None,
    ):
        self.encoder, self.decoder, self.config = encoder, decoder, config
        self.shortlist = shortlist
        self.eos_id, self.device = eos_id, torch.device(device)
        dcfg = decoder.cfg
        self.max_positions = min(encoder.cfg.max_position_embeddings, dcfg.max_position_embeddings)
        num_blocks = config.num_kv_blocks or self.max_useful_blocks(config, self.max_positions)
        self.pool = KVPool(
            dcfg.num_layers,
            num_blocks,
            config.kv_block_size,
            dcfg.num_heads,
            dcfg.head_size,
            dcfg.dtype,
            self.device,
        )
        self.runner = DecodeRunner(
            decoder, self.pool, eos_id, k=2 * config.max_beam_width,
            num_rows=config.max_batch_size + 1,  # one per running beam, plus one for `score`
            table_width=self.pool.blocks_for(self.max_positions), max_rows=2 * config.max_batch_size,
            use_graphs=config.cuda_graphs and self.device.type == "cuda",
            compile=config.compile, shortlist=shortlist is not None,
        )  # fmt: skip
        self.waiting: OrderedDict[str, GenerationRequest] = OrderedDict()
        self.running: OrderedDict[str, _Running] = OrderedDict()
        self.trace: deque[StepRecord] = deque(maxlen=config.trace_steps or 1)
        self.steps = 0
        self.generated_tokens = 0

    @staticmethod
    def max_useful_blocks(config: EngineConfig, max_positions: int) -> int:
        """Blocks for a full batch of maximum-length sources and targets: more could never be used."""
        return config.max_batch_size * 2 * -(-max_positions // config.kv_block_size)

    # ---- requests -------------------------------------------------------------------------
    def blocks_needed(self, req: GenerationRequest) -> int:
        p = req.params
        self_tokens = len(req.decoder_prefix) + p.max_new_tokens
        return self.pool.blocks_for(len(req.encoder_ids)) + p.beam_size * self.pool.blocks_for(self_tokens)

    def validate(self, req: GenerationRequest) -> None:
        """Raise RequestTooLarge for a request this engine can never run."""
        p, n_src = req.params, len(req.encoder_ids)
        if not req.encoder_ids or not req.decoder_prefix:
            raise RequestTooLarge("empty encoder input or decoder prefix")
        if n_src > self.max_positions or len(req.decoder_prefix) + p.max_new_tokens > self.max_positions:
            raise RequestTooLarge(
                f"source ({n_src} tokens) and prefix + max_new_tokens "
                f"({len(req.decoder_prefix) + p.max_new_tokens}) must each fit {self.max_positions} positions"
            )
        if n_src > self.config.max_num_tokens:
            raise RequestTooLarge(
                f"source has {n_src} tokens; max_num_tokens is {self.config.max_num_tokens}"
            )
        if not 1 <= p.beam_size <= min(self.config.max_beam_width, self.config.max_batch_size):
            raise RequestTooLarge(f"beam_size must be 1..{self.config.max_beam_width}, got {p.beam_size}")
        if self.blocks_needed(req) > self.pool.num_blocks:
            raise RequestTooLarge(f"the request needs {self.blocks_needed(req)} KV blocks; the pool has "
                                  f"{self.pool.num_blocks}")  # fmt: skip

    def add(self, req: GenerationRequest) -> None:
        self.validate(req)
        if req.request_id in self.waiting or req.request_id in self.running:
            raise ValueError(f"duplicate request id {req.request_id}")
        self.waiting[req.request_id] = req

    def abort(self, request_id: str) -> bool:
        """Drop a waiting or running request and free its blocks; False if unknown."""
        if self.waiting.pop(request_id, None) is not None:
            return True
        run = self.running.pop(request_id, None)
        if run is None:
            return False
        self._free(run)
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_rows(self) -> int:
        """Decoder rows reserved by running requests (one per beam)."""
        return sum(len(r.rows) for r in self.running.values())

    def _reserve(self, req: GenerationRequest, beams: int, self_tokens: int) -> _Running:
        """Allocate a request's blocks and table rows (the caller checked that they fit)."""
        alloc, n_src = self.pool.allocator, len(req.encoder_ids)
        run = _Running(
            req=req,
            search=Hypotheses(req.params, self.eos_id, length_offset=len(req.decoder_prefix) - 1),
            cross_blocks=alloc.allocate(self.pool.blocks_for(n_src)),
            beam_blocks=[alloc.allocate(self.pool.blocks_for(self_tokens)) for _ in range(beams)],
        )
        allowed = self.shortlist.allowed(req.target_lang, req.encoder_ids) if self.shortlist else None
        run.rows = [self.runner.open_row(b, run.cross_blocks, n_src, allowed) for b in run.beam_blocks]
        return run

    def _free(self, run: _Running) -> None:
        self.pool.allocator.free(run.cross_blocks)
        for blocks in run.beam_blocks:
            self.pool.allocator.free(blocks)
        for row in run.rows:
            self.runner.close_row(row)

    # ---- one iteration ----------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> StepOutput:
        out = StepOutput()
        admitted = self._admit()
        runs = list(self.running.values())[: len(self.running) - len(admitted)]  # admitted ones come last
        decoded = [run.req.request_id for run in runs]
        launched = self._launch(runs) if runs else None
        if admitted:  # the encoder is launched while the device runs the decode step; it decodes next step
            self._encode(admitted, out)
        if runs:
            self._decode(runs, launched, out)
        self.steps += 1
        if self.config.trace_steps:
            finished = [r.request_id for r in out.results] + [rid for rid, _ in out.failures]
            self.trace.append(StepRecord(self.steps, [r.req.request_id for r in admitted], decoded, finished))
        return out

    def _admit(self) -> list[_Running]:
        if self.config.static_batching and self.running:
            return []
        admitted, tokens, rows = [], 0, self.num_rows
        alloc = self.pool.allocator
        while self.waiting:
            req = next(iter(self.waiting.values()))
            k = req.params.beam_size
            if (
                rows + k > self.config.max_batch_size
                or tokens + len(req.encoder_ids) > self.config.max_num_tokens
            ):
                break
            if self.blocks_needed(req) > alloc.num_free:
                break
            del self.waiting[req.request_id]
            run = self._reserve(req, k, len(req.decoder_prefix) + req.params.max_new_tokens)
            self.running[req.request_id] = run
            admitted.append(run)
            tokens += len(req.encoder_ids)
            rows += k
        return admitted

    def _encode(self, admitted: list[_Running], out: StepOutput) -> None:
        """Packed encoder pass + cross K/V write; on error, retry one by one to isolate it."""
        try:
            self._encode_batch(admitted)
        except Exception:
            if len(admitted) == 1:
                self._fail(admitted[0], out)
                return
            for run in admitted:
                try:
                    self._encode_batch([run])
                except Exception:
                    self._fail(run, out)

    def _encode_batch(self, runs: list[_Running]) -> None:
        lens = [len(r.req.encoder_ids) for r in runs]
        dev = self.device
        batch = EncoderBatch(
            tokens=torch.tensor([t for r in runs for t in r.req.encoder_ids], device=dev),
            positions=torch.tensor([p for n in lens for p in range(n)], device=dev),
            seq_lens=lens,
        )
        enc_out = self.encoder(batch)
        slots = torch.tensor(
            [s for r, n in zip(runs, lens, strict=True) for s in self.pool.slots(r.cross_blocks, 0, n)],
            device=dev,
        )
        for layer, (k, v) in enumerate(self.decoder.cross_kv(enc_out)):
            self.pool.write(layer, slots, k, v)

    def _launch(self, runs: list[_Running]) -> _Launched | Exception:
        """Start one decoder step of `runs` on the device; an error is raised by `_decode`, later."""
        try:
            return self._decode_batch(runs)
        except Exception as err:
            return err

    def _decode(self, runs: list[_Running], launched: _Launched | Exception, out: StepOutput) -> None:
        try:
            if isinstance(launched, Exception):
                raise launched
            values, ids = launched.result()
        except Exception:  # isolate the failing request(s); K/V rewrites are idempotent
            for run in runs:
                try:
                    self._advance(run, *self._decode_batch([run]).result(), out)
                except Exception:
                    self._fail(run, out)
            return
        offset = 0
        for run in runs:
            n = 1 if run.cached == 0 else len(run.search.running)
            try:
                self._advance(run, values[offset : offset + n], ids[offset : offset + n], out)
            except Exception:
                self._fail(run, out)
            offset += n

    def _decode_batch(self, runs: list[_Running]) -> _Launched:
        """Top-K (log-prob, id) [beams, K] of the next token of every running beam, in order (launched)."""
        rows, tokens, positions, blocked, last = [], [], [], [], []
        for run in runs:
            if run.cached == 0:  # new request: feed the forced prefix on beam 0 only
                feeds = [(run.rows[0], run.req.decoder_prefix)]
            else:
                feeds = [(row, seq[-1:]) for row, seq in zip(run.rows, run.search.running, strict=False)]
            eos_blocked = run.search.eos_blocked
            for row, toks in feeds:
                rows.extend([row] * len(toks))
                tokens.extend(toks)
                positions.extend(range(run.cached, run.cached + len(toks)))
                blocked.extend([eos_blocked] * len(toks))
                last.append(len(rows) - 1)
        return _Launched(*self.runner.launch(rows, tokens, positions, blocked), last)

    @torch.inference_mode()
    def score(self, encoder_ids: list[int], decoder_ids: list[int]) -> torch.Tensor:
        """Teacher-forced float32 logits [len(decoder_ids), vocab], outside the running batch."""
        req = GenerationRequest("score", encoder_ids, decoder_ids, SamplingParams(max_new_tokens=1))
        self.validate(req)
        run = self._reserve(req, 1, len(decoder_ids))
        try:
            self._encode_batch([run])
            n = len(decoder_ids)
            return self.runner.logits([run.rows[0]] * n, decoder_ids, list(range(n)))
        finally:
            self._free(run)

    def _advance(self, run: _Running, values: torch.Tensor, ids: torch.Tensor, out: StepOutput) -> None:
        """Feed one step's top-K candidates to the request's search and fork beams' K/V."""
        fed = len(run.req.decoder_prefix) if run.cached == 0 else 1
        parents = run.search.step(values, ids)
        run.cached += fed
        self.generated_tokens += 1
        if run.first_token_time is None:
            run.first_token_time = time.monotonic()
        if run.search.done:
            del self.running[run.req.request_id]
            self._free(run)
            tokens, reason = run.search.best()
            out.results.append(
                GenerationResult(
                    run.req.request_id,
                    tokens,
                    reason,
                    len(run.req.encoder_ids),
                    first_token_time=run.first_token_time,
                )
            )
            return
        forks = [(p, b) for b, p in enumerate(parents) if p != b]
        if forks:  # each beam owns its blocks: a beam that continues another copies its K/V
            used = self.pool.blocks_for(run.cached)
            src = [blk for p, _ in forks for blk in run.beam_blocks[p][:used]]
            dst = [blk for _, b in forks for blk in run.beam_blocks[b][:used]]
            self.pool.copy_blocks(src, dst)

    def _fail(self, run: _Running, out: StepOutput) -> None:
        log.exception("request %s failed", run.req.request_id)
        self.running.pop(run.req.request_id, None)
        self._free(run)
        out.failures.append(
            (run.req.request_id, RequestFailed(f"request {run.req.request_id} failed in the engine"))
        )
