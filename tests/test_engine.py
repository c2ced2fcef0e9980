"""In-flight batching engine: joins and leaves mid-batch, frees every block, isolates failures."""

from __future__ import annotations

import asyncio

import pytest
import torch

from serve.engine.async_engine import PytorchBackend
from serve.engine.core import Engine, EngineConfig
from serve.engine.errors import NotAccepting, QueueFull, RequestFailed, RequestTooLarge
from serve.engine.request import GenerationRequest, SamplingParams
from serve.engine.search import Hypotheses
from serve.runtime import decode_step
from serve.runtime.decode_step import LaunchedStep
from serve.runtime.load import load_model
from serve.runtime.step_inputs import decoder_batch
from serve.tokenizer import TranslationTokenizer
from tests.conftest import real_sentences

PAIRS = [
    ("zh", "en"),
    ("en", "ru"),
    ("ar", "en"),
    ("en", "de"),
    ("hi", "en"),
    ("ru", "en"),
    ("en", "sw"),
    ("de", "en"),
]


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return TranslationTokenizer(tiny_ckpt)


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return load_model(tiny_ckpt, "cpu")


def make_engine(model, tok, eos_id: int | None = None, **cfg) -> Engine:
    return Engine(*model, EngineConfig(**cfg), eos_id=tok.eos_token_id if eos_id is None else eos_id)


def requests(tok, n: int, beam: int = 1, max_new: int = 12) -> list[GenerationRequest]:
    out = []
    for i in range(n):
        src, tgt = PAIRS[i % len(PAIRS)]
        text = real_sentences(src, 1, offset=i)[0]
        enc = tok.encode([text], tok.language(src))[0]
        out.append(
            GenerationRequest(
                f"r{i}",
                enc,
                tok.decoder_prefix(tok.language(tgt)),
                SamplingParams(beam_size=beam, max_new_tokens=max_new + i % 5),
            )
        )
    return out


def run_alone(model, tok, req: GenerationRequest, **cfg) -> list[int]:
    engine = make_engine(model, tok, **cfg)
    engine.add(req)
    while True:
        out = engine.step()
        if out.results:
            return out.results[0].token_ids


def drain(
    engine: Engine, steps: int | None = None, into: tuple[dict, dict] | None = None
) -> tuple[dict, dict]:
    """Step until idle (or `steps` times), collecting results and failures by request id."""
    results, failures = into or ({}, {})
    while engine.has_work() and (steps is None or steps > 0):
        out = engine.step()
        results.update({r.request_id: r.token_ids for r in out.results})
        failures.update(dict(out.failures))
        steps = None if steps is None else steps - 1
    return results, failures


@pytest.mark.parametrize("beam", [1, 3])
def test_requests_join_and_leave_mid_batch(model, tok, beam):
    reqs = requests(tok, 6, beam=beam)
    engine = make_engine(model, tok, trace_steps=1000)
    for r in reqs[:3]:
        engine.add(r)
    seen = drain(engine, steps=2)
    for r in reqs[3:]:  # arrive while the first three are decoding
        engine.add(r)
    results, failures = drain(engine, into=seen)
    assert not failures
    late = engine.trace[2]
    assert late.admitted == ["r3", "r4", "r5"] and {"r0", "r1", "r2"} & set(late.decoded)
    finish_steps = {rid: rec.step for rec in engine.trace for rid in rec.finished}
    assert len(set(finish_steps.values())) > 1, "requests should leave at different steps"
    assert engine.pool.allocator.num_free == engine.pool.num_blocks
    for r in reqs:  # batching never changes a request's output
        assert results[r.request_id] == run_alone(model, tok, r)


def test_admission_waits_for_blocks(model, tok):
    reqs = requests(tok, 8)
    need = max(make_engine(model, tok).blocks_needed(r) for r in reqs)
    engine = make_engine(model, tok, num_kv_blocks=2 * need, trace_steps=1000)
    for r in reqs:
        engine.add(r)
    seen = drain(engine, steps=1)
    assert engine.waiting, "a pool for about two requests must leave the rest waiting"
    results, failures = drain(engine, into=seen)
    assert not failures and set(results) == {r.request_id for r in reqs}
    needs = {r.request_id: engine.blocks_needed(r) for r in reqs}
    assert all(sum(needs[rid] for rid in rec.decoded) <= engine.pool.num_blocks for rec in engine.trace)
    assert engine.pool.allocator.num_free == engine.pool.num_blocks


@pytest.mark.parametrize("beam", [1, 2])
def test_abort_frees_blocks_and_others_finish(model, tok, beam):
    reqs = requests(tok, 5, beam=beam)
    engine = make_engine(model, tok)
    for r in reqs:
        engine.add(r)
    seen = drain(engine, steps=2)
    assert engine.pool.allocator.num_used > 0
    assert engine.abort("r1") and engine.abort("r3") and not engine.abort("nope")
    results, failures = drain(engine, into=seen)
    assert set(results) == {"r0", "r2", "r4"} and not failures
    assert engine.pool.allocator.num_free == engine.pool.num_blocks


@pytest.mark.parametrize("beam", [1, 2])
def test_failure_in_one_request_fails_it_alone(model, tok, monkeypatch, beam):
    reqs = requests(tok, 4, beam=beam)
    expected = {r.request_id: run_alone(model, tok, r) for r in reqs}
    method = "greedy" if beam == 1 else "_beam"
    real_step = getattr(Hypotheses, method)
    failing = {}

    def faulty(self, *args):
        if self.params is failing.get("params") and self.num_generated == 2:
            raise RuntimeError("injected")
        return real_step(self, *args)

    monkeypatch.setattr(Hypotheses, method, faulty)
    failing["params"] = reqs[2].params
    engine = make_engine(model, tok)
    for r in reqs:
        engine.add(r)
    results, failures = drain(engine)
    assert set(failures) == {"r2"} and isinstance(failures["r2"], RequestFailed)
    assert results == {k: v for k, v in expected.items() if k != "r2"}
    assert engine.pool.allocator.num_free == engine.pool.num_blocks


def test_look_ahead_gives_the_tokens_of_host_fed_steps(model, tok):
    """Greedy steps fed the device's own choices give exactly the tokens, and finish reasons, of steps
    the host feeds: for requests that end by EOS (after one thrown-away step), by length, or under
    min_new_tokens. A beam request is collected before each launch while it runs."""
    reqs = requests(tok, 8, max_new=10)
    probe = run_alone(model, tok, reqs[0])
    at = next(i for i in range(5, len(probe)) if probe[i] not in probe[:i])
    eos = probe[at]  # r0 ends by this "EOS" as soon as min_new_tokens allows it; others end by it too
    reqs[0].params = SamplingParams(max_new_tokens=10, min_new_tokens=at)
    reqs[1].params = SamplingParams(max_new_tokens=10, min_new_tokens=8)
    reqs[2].params = SamplingParams(beam_size=2, max_new_tokens=3)
    outcomes, traces = [], []
    for look_ahead in (True, False):
        engine = make_engine(model, tok, eos_id=eos, look_ahead=look_ahead, trace_steps=1000)
        for r in reqs:
            engine.add(r)
        done = {}
        while engine.has_work():
            out = engine.step()
            assert not out.failures
            done.update({r.request_id: (r.token_ids, r.finish_reason) for r in out.results})
        assert engine.pool.allocator.num_free == engine.pool.num_blocks
        assert sorted(engine.runner.free_rows) == list(range(engine.config.max_batch_size + 1))
        outcomes.append(done)
        traces.append(engine.trace)
    assert outcomes[0] == outcomes[1] and len(outcomes[0]) == len(reqs)
    assert outcomes[0]["r0"] == (probe[:at], "eos")
    assert {reason for _, reason in outcomes[0].values()} == {"eos", "length"}
    assert any(rec.looked_ahead for rec in traces[0]) and not any(rec.looked_ahead for rec in traces[1])
    assert not any(rec.looked_ahead for rec in traces[0] if "r2" in rec.decoded)


def test_greedy_steps_ask_for_the_top1_only(model, tok, monkeypatch):
    """A step of greedy requests alone takes K=1 from the lm_head; one with a beam request takes the
    beam width's 2*max_beam_width candidates, and batching still changes no request's output."""
    reqs = requests(tok, 3, max_new=8)
    reqs[2].params = SamplingParams(beam_size=2, max_new_tokens=4)
    engine = make_engine(model, tok, trace_steps=1000)
    widths, launch = [], engine.runner.launch

    def spy(*args):
        step = launch(*args)
        widths.append(step.ids.shape[1])
        return step

    monkeypatch.setattr(engine.runner, "launch", spy)
    engine.add(reqs[0])
    engine.add(reqs[1])
    results, failures = drain(engine, steps=3)
    engine.add(reqs[2])  # joins while the greedy ones decode
    results, failures = drain(engine, into=(results, failures))
    assert not failures
    launched = [rec.decoded for rec in engine.trace if rec.decoded]
    for decoded, k in zip(launched, widths, strict=True):
        assert k == (2 * engine.config.max_beam_width if "r2" in decoded else 1), decoded
    assert {1, 2 * engine.config.max_beam_width} == set(widths)
    for r in reqs:
        assert results[r.request_id] == run_alone(model, tok, r)


def test_each_row_says_where_this_steps_cache_writes_of_its_sequence_begin(model, tok, monkeypatch):
    """`fresh_from` is each row's sequence's first position fed in the step: the attention kernel reads the
    cache below it before this step's QKV kernel has written, so all rows of a forced prefix fed in one
    step start at its first position, and beams and single tokens at their own. Too high a value would
    read stale cache on a GPU, which no CPU run shows, hence this check."""
    reqs = requests(tok, 3, max_new=6)
    reqs[1].params = SamplingParams(beam_size=2, max_new_tokens=4)
    engine = make_engine(model, tok)
    seen = []

    def spy(inputs, *args):
        seen.append((inputs[0].tolist(), inputs[2].tolist(), inputs[5].tolist()))
        return decoder_batch(inputs, *args)

    monkeypatch.setattr(decode_step, "decoder_batch", spy)
    for r in reqs:
        engine.add(r)
    results, failures = drain(engine)
    assert not failures and len(results) == 3
    assert any(len(set(rows)) < len(rows) for rows, _, _ in seen)  # some step fed a prefix of several tokens
    for rows, positions, fresh in seen:
        for row, pos, first in zip(rows, positions, fresh, strict=True):
            assert first == min(p for r, p in zip(rows, positions, strict=True) if r == row) <= pos


def test_a_failed_step_is_isolated_under_look_ahead(model, tok, monkeypatch):
    """A whole step that fails on the device (every request in it) is decoded again request by
    request; the step launched ahead of it is dropped, and every request still ends as alone."""
    reqs = requests(tok, 4)
    expected = {r.request_id: run_alone(model, tok, r) for r in reqs}
    real_wait, waits = LaunchedStep.wait, []

    def flaky(self):
        waits.append(self)
        if len(waits) == 4:
            raise RuntimeError("injected device failure")
        return real_wait(self)

    monkeypatch.setattr(LaunchedStep, "wait", flaky)
    engine = make_engine(model, tok, trace_steps=1000)
    for r in reqs:
        engine.add(r)
    results, failures = drain(engine)
    assert not failures and results == expected
    assert len(waits) > 4 and sum(rec.looked_ahead for rec in engine.trace) > 4
    assert engine.pool.allocator.num_free == engine.pool.num_blocks


def no_host_wait(fn):
    """`fn` under CUDA's sync debug mode, where anything that makes the host wait for the device raises."""

    def run(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return fn(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    return run


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("variant", ["float32", "float32+shortlist", "float16"])
def test_the_host_never_waits_for_the_device_before_collecting(tiny_ckpt_factory, shortlisted_ckpt, variant,
                                                               monkeypatch):  # fmt: skip
    """Admission, launches and the encoder only queue work (CUDA's sync debug mode raises on a host
    wait), so the host's work of a step overlaps the device's; the tokens are those of host-fed steps.
    float32 runs the encoder eagerly, float16 replays its graphs (`EncodeRunner`)."""
    from serve.runtime.translator import Translator

    shortlist = variant.endswith("+shortlist")
    ckpt = shortlisted_ckpt if shortlist else tiny_ckpt_factory(1, variant)
    strict, plain = (
        Translator.load(ckpt, device="cuda", shortlist=shortlist, look_ahead=ahead, trace_steps=1000)
        for ahead in (True, False)
    )
    strict.engine.warm_up()
    assert bool(strict.engine.encode_runner.graphs) == (variant == "float16")
    for name in ("_admit", "_launch", "_encode"):
        monkeypatch.setattr(strict.engine, name, no_host_wait(getattr(strict.engine, name)))
    tok = strict.tokenizer
    enc = tok.encode(real_sentences("zh", 12), tok.language("zh"))
    prefix = [tok.decoder_prefix(tok.language("en"))] * len(enc)
    for beam in (1, 2):
        params = SamplingParams(beam_size=beam, max_new_tokens=16)
        assert strict.generate_ids(enc, prefix, params, "en") == plain.generate_ids(enc, prefix, params, "en")
    assert any(rec.looked_ahead for rec in strict.engine.trace)


def test_oversized_requests_are_rejected_up_front(model, tok):
    engine = make_engine(model, tok, max_num_tokens=8)
    req = requests(tok, 1)[0]
    with pytest.raises(RequestTooLarge, match="max_num_tokens"):
        engine.add(req)
    too_long = GenerationRequest(
        "x", req.encoder_ids, req.decoder_prefix, SamplingParams(max_new_tokens=10_000)
    )
    with pytest.raises(RequestTooLarge, match="positions"):
        make_engine(model, tok).add(too_long)


def test_backend_concurrent_equals_sequential_and_cancel_frees(tiny_ckpt, model, tok):
    reqs = requests(tok, 32)
    expected = {r.request_id: run_alone(model, tok, r) for r in reqs}
    backend = PytorchBackend(tiny_ckpt, device="cpu", max_queue=64)

    async def scenario():
        with pytest.raises(NotAccepting):
            await backend.generate(reqs[0])
        backend.start()
        results = await asyncio.gather(*(backend.generate(r) for r in reqs))
        assert {r.request_id: r.token_ids for r in results} == expected
        assert all(r.first_token_time is not None for r in results)
        # a cancelled caller (client disconnect) frees its blocks; the others complete
        slow = [
            GenerationRequest(f"s{i}", r.encoder_ids, r.decoder_prefix, SamplingParams(max_new_tokens=60))
            for i, r in enumerate(reqs[:4])
        ]
        tasks = [asyncio.create_task(backend.generate(r)) for r in slow]
        await asyncio.sleep(0.05)
        tasks[1].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[1], asyncio.CancelledError)
        assert all(not isinstance(d, BaseException) for i, d in enumerate(done) if i != 1)
        for _ in range(100):
            if backend.stats().kv_blocks_used == 0:
                break
            await asyncio.sleep(0.02)
        stats = backend.stats()
        assert stats.kv_blocks_used == 0 and stats.running == 0 and stats.generated_tokens > 0
        await backend.shutdown()
        with pytest.raises(NotAccepting):
            await backend.generate(reqs[0])

    asyncio.run(scenario())


def test_backend_queue_limit_gives_queue_full(tiny_ckpt, tok):
    backend = PytorchBackend(tiny_ckpt, device="cpu", max_queue=2, max_batch_size=1)
    reqs = requests(tok, 8, max_new=30)

    async def scenario():
        backend.start()
        outcomes = await asyncio.gather(*(backend.generate(r) for r in reqs), return_exceptions=True)
        full = [o for o in outcomes if isinstance(o, QueueFull)]
        assert full and all(o.retry_after > 0 for o in full)
        assert any(not isinstance(o, BaseException) for o in outcomes)
        await backend.shutdown()

    asyncio.run(scenario())
