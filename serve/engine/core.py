"""The iteration-level engine: in-flight batching over a paged KV pool, one `step()` at a time.

Each step (1) admits waiting requests while their KV blocks can be reserved and the step's
token budget (`max_num_tokens`) and row budget (`max_batch_size`) allow, (2) launches one
decoder step for every beam admitted before (requests new to decoding feed their forced prefix,
the others their last token), (3) while the device runs it, launches one encoder pass over the
sources of the newly admitted requests and their cross-attention K/V writes (`EncodeRunner`: on
CUDA, the CUDA graph of its token bucket; their decoding starts next step), and
(4) advances each request's search with the top-K of the decoder step launched before, freeing the
blocks of requests that finished.

So the host's work of a step (admission, building the next step, the search) overlaps the
device's. When every decoding request is greedy, (2) comes before (4): the step feeds each
request the token the previous step chose on the device, before the host has seen it
(`DecodeRunner.launch` sources). A request that ends by EOS then computes one step that is
thrown away; one that ends by length does not. Beam search needs the host's choice of beams
first, so with any beam request (4) comes before (2). Either way a step leaves one decoder
step in flight, which the next `step()` collects (`has_work` counts it).

With a `VocabShortlist`, each request may emit only its target language's tokens and its
source's (`serve.runtime.shortlist`); requests in languages without a list use the whole vocabulary.

Capacity policy is TRT-LLM's GUARANTEED_NO_EVICT: a request is admitted only when all blocks
it can ever need (source, prefix + max_new_tokens per beam) are reserved, so nothing is ever
preempted. A failure inside one request fails that request alone. Blocks and rows freed while
a step is in flight are safe to hand out again: everything that writes them is queued behind it.
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
from serve.runtime import fused
from serve.runtime.decode_step import HOST_TOKEN, DecodeRunner, LaunchedStep
from serve.runtime.encode_step import EncodeRunner
from serve.runtime.kv_cache import KVPool
from serve.runtime.model import Decoder, Encoder, EncoderBatch, varlen_usable
from serve.runtime.shortlist import VocabShortlist
from serve.runtime.transfer import upload

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
    look_ahead: bool = True  # launch greedy requests' next step before the host sees their last token
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


def _fed(run: _Running) -> int:
    """Positions a request's next decoder step feeds: its forced prefix first, then one token."""
    return len(run.req.decoder_prefix) if run.cached == 0 else 1


@dataclass
class _Launched:
    """A decoder step on the device, with what collecting it needs."""

    runs: list[_Running]
    step: LaunchedStep | None
    last: list[int]  # the query row of each beam, run after run
    beams: list[int]  # beams per run
    error: Exception | None = None  # the launch failed; collecting raises it

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Wait for the step; (log-probs, ids) [beams, K] on the CPU."""
        if self.error is not None:
            raise self.error
        values, ids = self.step.wait()
        return values[self.last], ids[self.last]


@dataclass
class StepRecord:
    step: int
    admitted: list[str]
    decoded: list[str]  # launched this step
    finished: list[str]
    looked_ahead: bool  # launched before the previous step was collected


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
        self.encode_runner = EncodeRunner(
            encoder, decoder, self.pool, config.max_batch_size, config.max_num_tokens, self.max_positions,
            bucketed=config.cuda_graphs and varlen_usable(self.device, encoder.cfg.dtype),
        )  # fmt: skip
        self.waiting: OrderedDict[str, GenerationRequest] = OrderedDict()
        self.running: OrderedDict[str, _Running] = OrderedDict()
        self.inflight: _Launched | None = None  # launched by the last step, collected by the next
        self.trace: deque[StepRecord] = deque(maxlen=config.trace_steps or 1)
        self.steps = 0
        self.generated_tokens = 0

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile every kernel variant a request can meet before the first one arrives (on CUDA):
        each bucket's decode and encoder graph, or without encoder graphs, the eager encoder at the
        lengths that reach every variant of the fused linears (`fused.row_variants`)."""
        self.runner.capture_graphs()
        self.encode_runner.capture_graphs()
        if self.device.type != "cuda" or self.encode_runner.sizes:
            return
        longest = min(max(fused.MAX_ROWS.values()), self.max_positions, self.config.max_num_tokens)
        for n in fused.row_variants(longest):
            ids = upload([self.eos_id] * n, self.device)
            self.encoder(EncoderBatch(ids, upload(list(range(n)), self.device), [n]))

    def release_graphs(self) -> None:
        """Destroy the decode and encoder graphs (`DecodeRunner.release_graphs` says why TP needs it)."""
        self.runner.release_graphs()
        self.encode_runner.release_graphs()

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
        return bool(self.waiting or self.running or self.inflight)

    @property
    def num_rows(self) -> int:
        """Decoder rows reserved by running requests (one per beam)."""
        return sum(len(r.rows) for r in self.running.values())

    def _reserve(self, req: GenerationRequest, beams: int, self_tokens: int) -> _Running:
        """Allocate a request's blocks (the caller checked that they fit); `_open` gives it its rows."""
        alloc = self.pool.allocator
        return _Running(
            req=req,
            search=Hypotheses(req.params, self.eos_id, length_offset=len(req.decoder_prefix) - 1),
            cross_blocks=alloc.allocate(self.pool.blocks_for(len(req.encoder_ids))),
            beam_blocks=[alloc.allocate(self.pool.blocks_for(self_tokens)) for _ in range(beams)],
        )

    def _open(self, runs: list[_Running]) -> None:
        """Give every beam of these requests its table row, all in one upload."""
        beams = []
        for run in runs:
            req = run.req
            tokens = self.shortlist.allowed(req.target_lang, req.encoder_ids) if self.shortlist else None
            beams += [(b, run.cross_blocks, len(req.encoder_ids), tokens) for b in run.beam_blocks]
        rows = iter(self.runner.open_rows(beams))
        for run in runs:
            run.rows = [next(rows) for _ in run.beam_blocks]

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
        ready = list(self.running.values())[: len(self.running) - len(admitted)]  # admitted ones come last
        prev, self.inflight = self.inflight, None
        looked_ahead = prev is not None and self._can_look_ahead(prev, ready)
        if looked_ahead:
            self.inflight = self._launch_ahead(prev, ready)
        if admitted:  # the encoder runs behind the decode step; it decodes next step
            self._encode(admitted, out)
        if prev is not None and not self._collect(prev, out):
            self.inflight = None  # it was fed from the failed step's choices; next step feeds from the host
        if not looked_ahead:
            ready = [run for run in ready if self._live(run)]
            if ready:
                self.inflight = self._launch(ready, self._feeds(ready))
        self.steps += 1
        if self.config.trace_steps:
            finished = [r.request_id for r in out.results] + [rid for rid, _ in out.failures]
            decoded = [r.req.request_id for r in self.inflight.runs] if self.inflight else []
            admitted_ids = [r.req.request_id for r in admitted]
            self.trace.append(StepRecord(self.steps, admitted_ids, decoded, finished, looked_ahead))
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
        if admitted:
            self._open(admitted)
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
        sources = [r.req.encoder_ids for r in runs]
        slots = [self.pool.slots(r.cross_blocks, 0, len(s)) for r, s in zip(runs, sources, strict=True)]
        self.encode_runner.run(sources, slots)

    def _live(self, run: _Running) -> bool:
        """Still running (not finished, failed or aborted since it was launched)."""
        return self.running.get(run.req.request_id) is run

    def _feeds(self, runs: list[_Running]) -> list[list[tuple[int, list[int], int, bool, int]]]:
        """Per run and beam: (row, tokens, first position, EOS blocked, source), all from the host."""
        feeds = []
        for run in runs:
            blocked, src = run.search.eos_blocked, HOST_TOKEN
            if run.cached == 0:  # new request: feed the forced prefix on beam 0 only
                feeds.append([(run.rows[0], run.req.decoder_prefix, 0, blocked, src)])
            else:
                beams = zip(run.rows, run.search.running, strict=False)
                feeds.append([(row, seq[-1:], run.cached, blocked, src) for row, seq in beams])
        return feeds

    def _can_look_ahead(self, prev: _Launched, ready: list[_Running]) -> bool:
        """Whether every ready request's next input is known without collecting `prev`: greedy
        requests that `prev` decodes (their token is its choice) or that start with their prefix."""
        if not self.config.look_ahead or prev.error is not None or not self.runner.can_feed(prev.step):
            return False
        in_prev = {id(run) for run in prev.runs}
        return all(r.req.params.beam_size == 1 and (id(r) in in_prev or r.cached == 0) for r in ready)

    def _launch_ahead(self, prev: _Launched, ready: list[_Running]) -> _Launched | None:
        """Launch the step after `prev` for greedy requests: those in `prev` take its top-1 choice on
        the device, at the next position; those that `prev` brings to max_new_tokens sit out."""
        query_row = {id(run): prev.last[i] for i, run in enumerate(prev.runs)}
        runs, feeds = [], []
        for run in ready:
            if id(run) not in query_row:  # starts with its prefix
                runs.append(run)
                feeds.extend(self._feeds([run]))
                continue
            generated = run.search.num_generated + 1  # once `prev` is collected
            if generated >= run.req.params.max_new_tokens:
                continue
            blocked = generated < run.req.params.min_new_tokens
            runs.append(run)
            feeds.append([(run.rows[0], [0], run.cached + _fed(run), blocked, query_row[id(run)])])
        return self._launch(runs, feeds) if runs else None

    def _launch(self, runs: list[_Running], feeds: list[list[tuple]]) -> _Launched:
        """Start one decoder step of `runs` on the device; a failure is raised when it is collected."""
        rows, tokens, positions, blocked, sources, last = [], [], [], [], [], []
        for beams in feeds:
            for row, toks, start, eos_blocked, src in beams:
                rows.extend([row] * len(toks))
                tokens.extend(toks)
                positions.extend(range(start, start + len(toks)))
                blocked.extend([eos_blocked] * len(toks))
                sources.extend([src] * len(toks))
                last.append(len(rows) - 1)
        beams = [len(f) for f in feeds]
        greedy = all(run.req.params.beam_size == 1 for run in runs)
        try:
            step = self.runner.launch(rows, tokens, positions, blocked, sources, greedy)
            return _Launched(runs, step, last, beams)
        except Exception as err:
            return _Launched(runs, None, last, beams, error=err)

    def _collect(self, launched: _Launched, out: StepOutput) -> bool:
        """Advance the searches of a launched step's live requests; False if the whole step failed
        (each live request was then decoded alone, from the host, to isolate the failing one)."""
        try:
            values, ids = launched.result()
        except Exception:  # isolate the failing request(s); K/V rewrites are idempotent
            for run in filter(self._live, launched.runs):
                try:
                    values, ids = self._launch([run], self._feeds([run])).result()
                    self._advance(run, run.search.step(values, ids), out)
                except Exception:
                    self._fail(run, out)
            return False
        top, offset = ids[:, 0].tolist(), 0  # a greedy request needs only its top-1 id
        for run, n in zip(launched.runs, launched.beams, strict=True):
            if self._live(run):
                search = run.search
                try:
                    if search.params.beam_size == 1:
                        parents = search.greedy(top[offset])
                    else:
                        parents = search.step(values[offset : offset + n], ids[offset : offset + n])
                    self._advance(run, parents, out)
                except Exception:
                    self._fail(run, out)
            offset += n
        return True

    @torch.inference_mode()
    def score(self, encoder_ids: list[int], decoder_ids: list[int]) -> torch.Tensor:
        """Teacher-forced float32 logits [len(decoder_ids), vocab], outside the running batch."""
        req = GenerationRequest("score", encoder_ids, decoder_ids, SamplingParams(max_new_tokens=1))
        self.validate(req)
        run = self._reserve(req, 1, len(decoder_ids))
        self._open([run])
        try:
            self._encode_batch([run])
            n = len(decoder_ids)
            return self.runner.logits([run.rows[0]] * n, decoder_ids, list(range(n)))
        finally:
            self._free(run)

    def _advance(self, run: _Running, parents: list[int], out: StepOutput) -> None:
        """Account for a step the request's search has taken: finish it, or fork beams' K/V
        (`parents`: the beam each new beam continues)."""
        run.cached += _fed(run)
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
