"""`Translator`: the synchronous, in-process API over the engine (calibration, eval, scripts).

It drives the same `Engine` the server runs, so what eval measures is what the server serves.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import torch

from serve import segment
from serve.engine.core import Engine, EngineConfig
from serve.engine.request import GenerationRequest, SamplingParams, default_max_new_tokens
from serve.runtime.load import default_device, load_model
from serve.runtime.shortlist import VocabShortlist
from serve.tokenizer import TranslationTokenizer


class Translator:
    def __init__(
        self,
        ckpt_dir: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        engine_config: EngineConfig | None = None,
        shortlist: bool = False,
    ):
        ckpt_dir = Path(ckpt_dir)
        self.device = torch.device(device) if device is not None else default_device()
        self.tokenizer = TranslationTokenizer(ckpt_dir)
        self.encoder, self.decoder = load_model(ckpt_dir, self.device, dtype)
        vocab = self.decoder.cfg.vocab_size
        self.engine = Engine(
            self.encoder,
            self.decoder,
            engine_config or EngineConfig(),
            eos_id=self.tokenizer.eos_token_id,
            device=self.device,
            shortlist=VocabShortlist.load(ckpt_dir, vocab, self.device) if shortlist else None,
        )
        meta = ckpt_dir / "conversion.json"
        self.model_id = (
            json.loads(meta.read_text()).get("source", ckpt_dir.name) if meta.exists() else ckpt_dir.name
        )

    @classmethod
    def load(
        cls,
        ckpt_dir: str | Path,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        shortlist: bool = False,
        **engine_kwargs,
    ) -> Translator:
        """`shortlist`: serve the checkpoint's output-vocabulary shortlists (`serve.runtime.shortlist`)."""
        return cls(
            ckpt_dir, device, dtype, EngineConfig(**engine_kwargs) if engine_kwargs else None, shortlist
        )

    def generate_ids(
        self,
        encoder_ids: list[list[int]],
        decoder_prefixes: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        target_lang: str | None = None,
    ) -> list[list[int]]:
        """Generated ids (after the prefix, without EOS) for each source, batched in flight."""
        plist = params if isinstance(params, list) else [params] * len(encoder_ids)
        ids = [uuid.uuid4().hex for _ in encoder_ids]
        for rid, enc, prefix, p in zip(ids, encoder_ids, decoder_prefixes, plist, strict=True):
            self.engine.add(GenerationRequest(rid, enc, prefix, p, target_lang))
        results: dict[str, list[int]] = {}
        while len(results) < len(ids):
            out = self.engine.step()
            if out.failures:
                for rid in ids:
                    self.engine.abort(rid)
                raise out.failures[0][1]
            results.update({r.request_id: r.token_ids for r in out.results})
        return [results[rid] for rid in ids]

    def translate(
        self,
        texts: list[str],
        src_lang: str,
        tgt_lang: str,
        beam_size: int = 1,
        max_new_tokens: int | None = None,
        length_penalty: float = 1.0,
        max_segment_tokens: int = 200,
    ) -> list[str]:
        """Translate texts as the server does: split into sentences, translate all in one batch,
        and put each text back together in its own layout."""
        src, tgt = self.tokenizer.language(src_lang), self.tokenizer.language(tgt_lang)
        prefix = self.tokenizer.decoder_prefix(tgt)
        layouts = [segment.split(t, src.code, self.tokenizer.text_ids, max_segment_tokens) for t in texts]
        pieces = [ids for layout in layouts for ids in layout.token_ids]
        room = self.engine.max_positions - len(prefix)
        params = [
            SamplingParams(
                beam_size=beam_size,
                length_penalty=length_penalty,
                max_new_tokens=min(max_new_tokens or default_max_new_tokens(len(ids)), room),
            )
            for ids in pieces
        ]
        encoder_ids = [self.tokenizer.encoder_ids(ids, src) for ids in pieces]
        out = iter(self.generate_ids(encoder_ids, [prefix] * len(pieces), params, tgt.code))
        return [
            layout.join([self.tokenizer.decode(next(out)) for _ in layout.token_ids]) for layout in layouts
        ]

    def teacher_forced_logits(
        self, encoder_ids: list[list[int]], decoder_ids: list[list[int]]
    ) -> list[torch.Tensor]:
        """Float32 logits [len(dec), vocab] at every decoder position (for KL / agreement metrics)."""
        return [self.engine.score(enc, dec) for enc, dec in zip(encoder_ids, decoder_ids, strict=True)]
