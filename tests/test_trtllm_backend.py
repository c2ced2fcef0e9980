"""TrtllmBackend against a recording fake of the executor bindings (tests/fake_trtllm_executor.py).

What is checked is the mapping between our request/response types and the Executor API, the
threading (responses resolved from a background thread) and the error contract of `Backend`.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import re
import sys
from pathlib import Path

import fake_trtllm_executor as fake
import pytest

from serve.backends.trtllm import TrtllmBackend, create_backend, trtllm_available
from serve.engine.errors import NotAccepting, QueueFull, RequestFailed, RequestTooLarge
from serve.engine.request import GenerationRequest, SamplingParams

EOS, PAD, START, ZH = 2, 1, 2, 250025


def make_engine_dir(root: Path, *, world_size: int = 1, max_beam_width: int = 4) -> Path:
    """A directory shaped like convert.build's output: engine config.json files + languages.json."""
    pretrained = {"architecture": "DecoderModel", "dtype": "float16", "eos_token_id": 99, "pad_token_id": 98,
                  "mapping": {"world_size": world_size, "tp_size": world_size, "pp_size": 1}}  # fmt: skip
    enc_build = {
        "max_batch_size": 8,
        "max_beam_width": max_beam_width,
        "max_input_len": 32,
        "max_seq_len": 32,
    }
    dec_build = {"max_batch_size": 8, "max_beam_width": max_beam_width, "max_input_len": 2, "max_seq_len": 300,
                 "max_num_tokens": 512, "max_encoder_input_len": 32}  # fmt: skip
    for name, build in (("encoder", enc_build), ("decoder", dec_build)):
        (root / name).mkdir(parents=True)
        config = {"version": "fake", "pretrained_config": pretrained, "build_config": build}
        (root / name / "config.json").write_text(json.dumps(config))
    (root / "languages.json").write_text(
        json.dumps({"eos_token_id": EOS, "pad_token_id": PAD, "languages": []})
    )
    return root


def request(rid: str = "r1", n_src: int = 5, **params) -> GenerationRequest:
    return GenerationRequest(rid, list(range(10, 10 + n_src)) + [EOS], [START, ZH], SamplingParams(**params))


@pytest.fixture
def engine_dir(tmp_path: Path) -> Path:
    return make_engine_dir(tmp_path / "engine")


def started(engine_dir: Path, **kw) -> TrtllmBackend:
    backend = TrtllmBackend(engine_dir, bindings=fake.bindings(), poll_interval_s=0.01, **kw)
    backend.start()
    return backend


async def wait_enqueued(backend: TrtllmBackend, n: int = 1) -> list[int]:
    """Request ids once `n` requests reached the fake executor."""
    for _ in range(500):
        if len(backend._executor.requests) >= n:
            return sorted(backend._executor.requests)
        await asyncio.sleep(0.002)
    raise AssertionError("requests never reached the executor")


def test_executor_opened_on_both_engines(engine_dir: Path):
    backend = started(
        engine_dir, kv_memory_fraction=0.8, cross_kv_cache_fraction=0.4, max_beam_width=2, max_num_tokens=9999
    )
    ex = backend._executor
    assert (ex.encoder_model_path, ex.decoder_model_path) == (engine_dir / "encoder", engine_dir / "decoder")
    assert ex.model_type is fake.ModelType.ENCODER_DECODER
    cfg = ex.executor_config
    assert cfg.batching_type is fake.BatchingType.INFLIGHT
    assert (cfg.max_beam_width, cfg.max_batch_size, cfg.max_num_tokens, cfg.parallel_config) == (
        2,
        8,
        512,
        None,
    )
    kv = cfg.kv_cache_config
    assert (kv.free_gpu_memory_fraction, kv.cross_kv_cache_fraction, kv.enable_block_reuse) == (
        0.8,
        0.4,
        False,
    )
    asyncio.run(backend.shutdown())
    assert ex.shut_down


def test_tensor_parallel_engine_uses_orchestrator_mode(tmp_path: Path):
    backend = started(make_engine_dir(tmp_path / "e", world_size=2), worker_executable="/opt/executorWorker")
    par = backend._executor.executor_config.parallel_config
    assert par.communication_mode is fake.CommunicationMode.ORCHESTRATOR
    assert par.orchestrator_config.worker_executable_path == "/opt/executorWorker"
    asyncio.run(backend.shutdown())


def test_request_mapping_and_result(engine_dir: Path):
    async def main():
        backend = started(engine_dir)
        task = asyncio.create_task(backend.generate(request(max_new_tokens=7, min_new_tokens=2)))
        (rid,) = await wait_enqueued(backend)
        req = backend._executor.requests[rid]
        assert req.encoder_input_token_ids == [10, 11, 12, 13, 14, EOS]
        assert req.input_token_ids == [START, ZH]  # the forced decoder prefix
        assert (req.max_tokens, req.end_id, req.pad_id, req.streaming) == (7, EOS, PAD, False)
        assert req.sampling_config.beam_width == 1 and req.sampling_config.min_tokens == 2
        assert req.output_config.exclude_input_from_output
        backend._executor.finish(rid, [[40, 41, 42]], [fake.FinishReason.END_ID])
        result = await task
        assert result.token_ids == [40, 41, 42]  # after the prefix, no EOS
        assert (result.finish_reason, result.prompt_tokens, result.request_id) == ("eos", 6, "r1")
        assert backend.stats().generated_tokens == 3
        await backend.shutdown()

    asyncio.run(main())


def test_beam_search_settings_and_best_beam(engine_dir: Path):
    async def main():
        backend = started(engine_dir)
        task = asyncio.create_task(
            backend.generate(request(beam_size=4, max_new_tokens=3, length_penalty=0.8, early_stopping=False))
        )
        (rid,) = await wait_enqueued(backend)
        sc = backend._executor.requests[rid].sampling_config
        assert (sc.beam_width, sc.length_penalty, sc.early_stopping) == (4, 0.8, 0)
        # Beam search has no finish_reasons; shorter beams come back padded with the end id.
        backend._executor.finish(rid, [[7, 8, 9], [7, 8, EOS], [5, EOS, EOS], [6, 6, 6]])
        result = await task
        assert (result.token_ids, result.finish_reason) == ([7, 8, 9], "length")
        await backend.shutdown()

    asyncio.run(main())


def test_max_new_tokens_capped_by_the_engine(engine_dir: Path):
    async def main():
        backend = started(engine_dir)
        task = asyncio.create_task(backend.generate(request(max_new_tokens=1000, beam_size=2)))
        (rid,) = await wait_enqueued(backend)
        assert backend._executor.requests[rid].max_tokens == 298  # max_seq_len 300 - the 2-token prefix
        backend._executor.finish(rid, [[5] * 298, [6] * 298])
        assert (await task).finish_reason == "length"
        await backend.shutdown()

    asyncio.run(main())


def test_finish_reason_inferred_without_executor_reasons(engine_dir: Path):
    async def main():
        backend = started(engine_dir)
        t1 = asyncio.create_task(backend.generate(request("short", max_new_tokens=5, beam_size=2)))
        t2 = asyncio.create_task(backend.generate(request("full", max_new_tokens=2, beam_size=2)))
        short, full = await wait_enqueued(backend, 2)
        backend._executor.finish(short, [[3, 4], [3, 5]])
        backend._executor.finish(full, [[3, 4], [3, 5]])
        assert (await t1).finish_reason == "eos" and (await t2).finish_reason == "length"
        await backend.shutdown()

    asyncio.run(main())


def test_cancelling_the_task_cancels_the_executor_request(engine_dir: Path):
    async def main():
        backend = started(engine_dir)
        task = asyncio.create_task(backend.generate(request()))
        (rid,) = await wait_enqueued(backend)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert backend._executor.cancelled == [rid]
        assert backend.stats().running == 0
        backend._executor.finish(
            rid, [[1]], [fake.FinishReason.CANCELLED]
        )  # a late final response is ignored
        await asyncio.sleep(0.05)
        await backend.shutdown()

    asyncio.run(main())


def test_error_fails_only_its_request(engine_dir: Path):
    async def main():
        backend = started(engine_dir)
        bad = asyncio.create_task(backend.generate(request("bad")))
        good = asyncio.create_task(backend.generate(request("good")))
        bad_id, good_id = await wait_enqueued(backend, 2)
        backend._executor.fail(bad_id, "Encoder input length exceeds\nthe limit")
        backend._executor.finish(good_id, [[5, 6]], [fake.FinishReason.END_ID])
        with pytest.raises(
            RequestFailed, match="request bad failed in TensorRT-LLM: Encoder input length exceeds the"
        ):
            await bad
        assert (await good).token_ids == [5, 6]
        await backend.shutdown()

    asyncio.run(main())


def test_enqueue_rejection_is_request_failed(engine_dir: Path):
    async def main():
        backend = started(engine_dir)
        backend._executor.enqueue_error = RuntimeError("queue is full")
        with pytest.raises(RequestFailed, match="rejected request r1: RuntimeError: queue is full"):
            await backend.generate(request())
        assert backend.stats().running == 0
        await backend.shutdown()

    asyncio.run(main())


def test_queue_full(engine_dir: Path):
    async def main():
        backend = started(engine_dir, max_queue=1, retry_after=2.5)
        first = asyncio.create_task(backend.generate(request("a")))
        (rid,) = await wait_enqueued(backend)
        with pytest.raises(QueueFull) as err:
            await backend.generate(request("b"))
        assert err.value.retry_after == 2.5 and err.value.status == 429
        backend._executor.finish(rid, [[4]], [fake.FinishReason.END_ID])
        await first
        await backend.shutdown()

    asyncio.run(main())


def test_not_started_and_shut_down_refuse(engine_dir: Path):
    async def main():
        backend = TrtllmBackend(engine_dir, bindings=fake.bindings())
        with pytest.raises(NotAccepting):
            await backend.generate(request())
        backend.start()
        await backend.shutdown()
        with pytest.raises(NotAccepting):
            await backend.generate(request())

    asyncio.run(main())


def test_requests_that_never_fit(engine_dir: Path):
    async def main():
        backend = started(engine_dir)
        with pytest.raises(RequestTooLarge, match="source has 40 tokens, engine max 32"):
            await backend.generate(request(n_src=39))
        with pytest.raises(RequestTooLarge, match="beam_size 5 > engine max_beam_width 4"):
            await backend.generate(request(beam_size=5))
        assert backend._executor.requests == {}
        await backend.shutdown()

    asyncio.run(main())


def test_shutdown_drains_or_cancels(engine_dir: Path):
    async def main():
        backend = started(engine_dir)
        task = asyncio.create_task(backend.generate(request()))
        (rid,) = await wait_enqueued(backend)
        stopping = asyncio.create_task(backend.shutdown(drain=True))
        await asyncio.sleep(0.05)
        assert not stopping.done()  # waits for the in-flight request
        backend._executor.finish(rid, [[8]], [fake.FinishReason.END_ID])
        assert (await task).token_ids == [8]
        await stopping

        backend = started(engine_dir)
        task = asyncio.create_task(backend.generate(request()))
        (rid,) = await wait_enqueued(backend)
        executor = backend._executor
        await backend.shutdown(drain=False)
        assert executor.cancelled == [rid] and executor.shut_down
        with pytest.raises(NotAccepting):
            await task

    asyncio.run(main())


def test_stats_from_iteration_stats_and_counters(engine_dir: Path):
    async def main():
        backend = started(engine_dir)
        assert backend.stats().running == 0
        tasks = [asyncio.create_task(backend.generate(request(f"r{i}"))) for i in range(3)]
        ids = await wait_enqueued(backend, 3)
        assert (backend.stats().running, backend.stats().waiting) == (3, 0)  # own counter, no iteration yet
        backend._executor.iteration(queued=1, active=2, used_blocks=6, free_blocks=94)
        s = backend.stats()
        assert (s.waiting, s.running, s.kv_blocks_used, s.kv_blocks_free) == (1, 2, 6, 94)
        for rid in ids:
            backend._executor.finish(rid, [[5, 6]], [fake.FinishReason.END_ID])
        await asyncio.gather(*tasks)
        s = backend.stats()
        assert (s.waiting, s.running, s.generated_tokens) == (0, 0, 6)
        await backend.shutdown()

    asyncio.run(main())


def test_end_and_pad_ids_fall_back_to_decoder_config(tmp_path: Path):
    engine = make_engine_dir(tmp_path / "e")
    (engine / "languages.json").unlink()
    backend = TrtllmBackend(engine, bindings=fake.bindings())
    assert (backend.limits.end_id, backend.limits.pad_id) == (99, 98)


def test_missing_engine_dir(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        TrtllmBackend(tmp_path / "nope", bindings=fake.bindings())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not an engine dir built by convert.build"):
        TrtllmBackend(tmp_path / "empty", bindings=fake.bindings())


def test_missing_tensorrt_llm_gives_one_clear_line(engine_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # makes `import tensorrt_llm` raise ImportError
    assert trtllm_available() is False
    with pytest.raises(RuntimeError) as err:
        create_backend(engine_dir)
    msg = str(err.value)
    assert re.fullmatch(
        r"--backend trtllm needs TensorRT-LLM \(`import tensorrt_llm` failed: (ModuleNotFound|Import)Error: .+\); "
        r"use --backend pytorch",
        msg,
    )


def test_module_imports_without_tensorrt_llm(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "tensorrt_llm", None)
    for name in ("serve.backends", "serve.backends.trtllm"):
        monkeypatch.delitem(sys.modules, name)
    module = importlib.import_module("serve.backends.trtllm")
    assert module.TrtllmBackend.name == "trtllm"


def test_shutdown_cancelled_during_drain_still_closes(engine_dir: Path):
    async def main():
        backend = started(engine_dir)
        task = asyncio.create_task(backend.generate(request()))
        (rid,) = await wait_enqueued(backend)
        executor = backend._executor
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(backend.shutdown(drain=True), 0.05)
        assert executor.cancelled == [rid] and executor.shut_down
        with pytest.raises(NotAccepting):
            await task

    asyncio.run(main())
