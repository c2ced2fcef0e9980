"""Translate real sentences through the TensorRT-LLM engines and the PyTorch runtime; compare tokens.

    PYTHONPATH=. python scripts/trtllm_compare.py --checkpoint <ckpt> --engine <engine dir> [--pairs en-de,zh-en]

Needs a GPU machine with TensorRT-LLM (used by scripts/trtllm_smoke.sh). Both sides get the same
encoder ids and forced prefix, built from the engine dir's own tokenizer/ and languages.json (so
this also checks that the engine dir is self-contained). Exit status 1 when fewer than
`--min-exact` of the sentences match token for token.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from eval.data import read_lines, test_pair_paths
from serve.backends.trtllm import create_backend
from serve.engine.request import GenerationRequest, SamplingParams
from serve.runtime.translator import Translator
from serve.tokenizer import TranslationTokenizer


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


async def trtllm_ids(
    engine_dir: Path, encoder_ids: list[list[int]], prefix: list[int], params: SamplingParams
):
    backend = create_backend(engine_dir, max_queue=len(encoder_ids))
    backend.start()
    try:
        requests = [GenerationRequest(f"cmp-{i}", ids, prefix, params) for i, ids in enumerate(encoder_ids)]
        results = await asyncio.gather(*(backend.generate(r) for r in requests))
    finally:
        await backend.shutdown(drain=True)
    return [r.token_ids for r in results]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, type=Path, help="converted checkpoint (PyTorch runtime)")
    p.add_argument("--engine", required=True, type=Path, help="engine dir from python -m convert.build")
    p.add_argument("--pairs", default="en-de,zh-en,ar-en,en-hi", help="comma-separated src-tgt test pairs")
    p.add_argument("--n", type=int, default=8, help="sentences per pair")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--beam-size", type=int, default=1)
    p.add_argument("--min-exact", type=float, default=0.8, help="required share of token-identical outputs")
    args = p.parse_args(argv)

    tok = TranslationTokenizer(args.engine)
    translator = Translator.load(args.checkpoint)
    params = SamplingParams(beam_size=args.beam_size, max_new_tokens=args.max_new_tokens)
    exact = total = 0
    for pair in args.pairs.split(","):
        src_code, tgt_code = pair.split("-")
        texts = read_lines(test_pair_paths(pair)[0], args.n)
        src, tgt = tok.language(src_code), tok.language(tgt_code)
        encoder_ids = tok.encode(texts, src)
        prefix = tok.decoder_prefix(tgt)
        ours = asyncio.run(trtllm_ids(args.engine, encoder_ids, prefix, params))
        ref = translator.generate_ids(encoder_ids, [prefix] * len(texts), params)
        for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
            same = a == b
            exact += same
            total += 1
            status = (
                "same"
                if same
                else f"differs at token {common_prefix(a, b)} (trtllm {len(a)}, pytorch {len(b)})"
            )
            print(f"{pair} #{i}: {status}")
            if not same:
                print(f"  trtllm:  {tok.decode(a)!r}\n  pytorch: {tok.decode(b)!r}")
    share = exact / max(total, 1)
    print(f"token-identical: {exact}/{total} ({share:.0%}); required {args.min_exact:.0%}")
    return 0 if share >= args.min_exact else 1


if __name__ == "__main__":
    sys.exit(main())
