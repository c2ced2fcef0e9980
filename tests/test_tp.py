"""Tensor parallelism: each rank in its own process (gloo) loads only its shard; tokens equal TP=1."""

from __future__ import annotations

import asyncio

import pytest
import torch

from serve.engine.async_engine import PytorchBackend
from serve.engine.errors import NotAccepting
from serve.engine.request import GenerationRequest, SamplingParams
from serve.runtime import tp
from serve.runtime.translator import Translator
from serve.tokenizer import TranslationTokenizer
from tests.conftest import real_sentences


@pytest.mark.parametrize("tp_size", [2, 4])
def test_tp_token_identical_to_tp1(tiny_ckpt_factory, tp_size):
    ref = Translator.load(tiny_ckpt_factory(1, "float32"), device="cpu")
    tok = ref.tokenizer
    reqs = []
    for i, (src, tgt, beam) in enumerate(
        [("zh", "en", 1), ("en", "ar", 4), ("ru", "en", 1), ("en", "hi", 2)] * 2
    ):
        for j, text in enumerate(real_sentences(src, 2, offset=20 + i)):
            enc = tok.encode([text], tok.language(src))[0]
            reqs.append(
                GenerationRequest(
                    f"{i}-{j}",
                    enc,
                    tok.decoder_prefix(tok.language(tgt)),
                    SamplingParams(beam_size=beam, max_new_tokens=20),
                )
            )
    expected = ref.generate_ids(
        [r.encoder_ids for r in reqs], [r.decoder_prefix for r in reqs], [r.params for r in reqs]
    )

    backend = PytorchBackend(tiny_ckpt_factory(tp_size, "float32"), device="cpu", tp_size=tp_size)

    async def run():
        backend.start()
        try:
            assert tp.world_size() == tp_size
            return await asyncio.gather(*(backend.generate(r) for r in reqs))
        finally:
            await backend.shutdown()

    got = asyncio.run(run())
    assert [r.token_ids for r in got] == expected
    assert tp.world_size() == 1


def test_dead_rank_fails_requests_instead_of_hanging(tiny_ckpt_factory):
    """A worker that dies leaves rank 0 unable to step: requests get a 503-class error, not a hang."""
    ckpt = tiny_ckpt_factory(2, "float32")
    backend = PytorchBackend(ckpt, device="cpu", tp_size=2)
    tok = TranslationTokenizer(ckpt)
    enc = tok.encode([real_sentences("de", 1)[0]], tok.language("de"))[0]

    def request(i: int) -> GenerationRequest:
        return GenerationRequest(f"r{i}", enc, tok.decoder_prefix(tok.language("en")), SamplingParams())

    async def run():
        backend.start()
        try:
            backend._workers[0].kill()
            backend._workers[0].join()
            for i in range(2):  # the one that finds the rank gone, then one refused at the door
                with pytest.raises(NotAccepting, match="tensor-parallel rank exited"):
                    await asyncio.wait_for(backend.generate(request(i)), 60)
        finally:
            await asyncio.wait_for(backend.shutdown(), 60)

    asyncio.run(run())
    assert tp.world_size() == 1


def test_partial_out_is_a_view_of_the_peer_buffer_in_its_dtype(monkeypatch):
    """A float16 model's fused row-parallel kernels write float32 partials into the peer buffer (the
    one-shot kernel takes no float16); a dtype the buffer does not serve, or too many rows, gets None."""

    class Peer:
        buffer = torch.zeros(64, dtype=torch.float32)

    assert tp.partial_out(2, 8, torch.float16) is None  # no peer buffer: NCCL
    monkeypatch.setattr(tp, "_peer", Peer())
    view = tp.partial_out(2, 8, torch.float16)
    assert view.shape == (2, 8) and view.dtype == torch.float32 and view.data_ptr() == Peer.buffer.data_ptr()
    assert tp.partial_out(2, 8, torch.bfloat16) is None
    assert tp.partial_out(9, 8, torch.float16) is None
