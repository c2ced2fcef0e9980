"""In-flight batching engine: joins and leaves mid-batch, frees every block, isolates failures."""

from __future__ import annotations

import asyncio

import pytest

from serve.engine.async_engine import PytorchBackend
from serve.engine.core import Engine, EngineConfig
from serve.engine.errors import NotAccepting, QueueFull, RequestFailed, RequestTooLarge
from serve.engine.request import GenerationRequest, SamplingParams
from serve.engine.search import Hypotheses
from serve.runtime.load import load_model
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


def make_engine(model, tok, **cfg) -> Engine:
    return Engine(*model, EngineConfig(**cfg), eos_id=tok.eos_token_id)


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


def run_alone(model, tok, req: GenerationRequest) -> list[int]:
    engine = make_engine(model, tok)
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


def test_abort_frees_blocks_and_others_finish(model, tok):
    reqs = requests(tok, 5, beam=2)
    engine = make_engine(model, tok)
    for r in reqs:
        engine.add(r)
    seen = drain(engine, steps=2)
    assert engine.pool.allocator.num_used > 0
    assert engine.abort("r1") and engine.abort("r3") and not engine.abort("nope")
    results, failures = drain(engine, into=seen)
    assert set(results) == {"r0", "r2", "r4"} and not failures
    assert engine.pool.allocator.num_free == engine.pool.num_blocks


def test_failure_in_one_request_fails_it_alone(model, tok, monkeypatch):
    reqs = requests(tok, 4)
    expected = {r.request_id: run_alone(model, tok, r) for r in reqs}
    real_step = Hypotheses.step
    failing = {}

    def faulty(self, values, ids):
        if self.params is failing.get("params") and self.num_generated == 2:
            raise RuntimeError("injected")
        return real_step(self, values, ids)

    monkeypatch.setattr(Hypotheses, "step", faulty)
    failing["params"] = reqs[2].params
    engine = make_engine(model, tok)
    for r in reqs:
        engine.add(r)
    results, failures = drain(engine)
    assert set(failures) == {"r2"} and isinstance(failures["r2"], RequestFailed)
    assert results == {k: v for k, v in expected.items() if k != "r2"}
    assert engine.pool.allocator.num_free == engine.pool.num_blocks


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
