"""GPU parity at mBART-large-50 shape: HF transformers vs this runtime on the same (random) weights.

Builds a random MBartForConditionalGeneration at the real shape (d_model 1024, 12+12 layers,
16 heads, FFN 4096, vocab 250054), converts it with `convert/` (TP=1), runs both in the same
dtype on the GPU and reports the max |logit difference| (teacher forced), greedy token
agreement on real sentences, and the time of one greedy decode of the whole batch.

    python scripts/parity_gpu.py --out out/parity            # on the GPU machine
    python scripts/parity_gpu.py --shape tiny --device cpu    # smoke run anywhere

Random weights: the numbers say the runtime computes what HF computes, not translation quality.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from convert.__main__ import convert_checkpoint  # noqa: E402
from convert.tiny import LARGE_DIMS, build_tiny_mbart  # noqa: E402
from eval.data import read_lines, test_pair_paths  # noqa: E402
from scripts.bench import scratch_dir  # noqa: E402
from serve.engine.request import SamplingParams  # noqa: E402
from serve.runtime.translator import Translator  # noqa: E402

LANGS = ["zh", "ar", "ru", "de", "fr", "es", "hi", "sw"]


def sentences(n: int) -> list[tuple[str, str]]:
    per = -(-n // len(LANGS))
    out = [(lang, s) for lang in LANGS for s in read_lines(test_pair_paths(f"{lang}-en")[0], per)]
    return out[:n]


def identical(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x == y for x, y in zip(a, b, strict=True))


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of token positions that agree (the longer sequence of each pair counts)."""
    same = sum(sum(x == y for x, y in zip(s, t, strict=False)) for s, t in zip(a, b, strict=True))
    return same / max(1, sum(max(len(s), len(t)) for s, t in zip(a, b, strict=True)))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["large", "tiny"], default="large")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sentences", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--init-std", type=float, default=0.02, help="std of the random weights (large shape)")
    ap.add_argument("--out", type=Path, default=Path("out/parity"))
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    from transformers import AutoTokenizer, MBartForConditionalGeneration

    work = scratch_dir("parity-")
    t0 = time.perf_counter()
    dims = {**LARGE_DIMS, "init_std": args.init_std} if args.shape == "large" else {}
    hf_dir = build_tiny_mbart(work / "hf", **dims)
    ckpt = convert_checkpoint(str(hf_dir), work / "ckpt", 1, args.dtype, progress=False)
    setup_s = time.perf_counter() - t0
    hf = MBartForConditionalGeneration.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    rt = Translator.load(ckpt, device=device, dtype=dtype)
    en = rt.tokenizer.language("en")
    prefix = rt.tokenizer.decoder_prefix(en)

    data = sentences(args.sentences)
    enc = [rt.tokenizer.encode([s], rt.tokenizer.language(lang))[0] for lang, s in data]

    # Teacher-forced logits: the runtime's fp32 logits vs HF's, on the first 16 sentences.
    max_diff, ref_scale = 0.0, 0.0
    with torch.inference_mode():
        for ids in enc[:16]:
            dec = prefix + ids[1:-1][:16]
            ref = hf(
                input_ids=torch.tensor([ids], device=device),
                decoder_input_ids=torch.tensor([dec], device=device),
            )
            ref = ref.logits[0].float().cpu()
            got = rt.teacher_forced_logits([ids], [dec])[0]
            max_diff = max(max_diff, (got - ref).abs().max().item())
            ref_scale = max(ref_scale, ref.abs().max().item())

    # Greedy decode of the whole batch: HF generate (padded) vs the runtime engine (in flight).
    width = max(len(e) for e in enc)
    ids = torch.tensor([e + [tok.pad_token_id] * (width - len(e)) for e in enc], device=device)
    gen_kw = dict(num_beams=1, do_sample=False, forced_bos_token_id=en.token_id, forced_eos_token_id=None,
                  max_new_tokens=args.max_new_tokens + 1)  # fmt: skip
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    hf.generate(input_ids=ids[:2], attention_mask=(ids[:2] != tok.pad_token_id).long(), **gen_kw)  # warm-up
    rt.generate_ids(enc[:2], [prefix] * 2, params)
    sync(device)
    t = time.perf_counter()
    out = hf.generate(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), **gen_kw)
    sync(device)
    hf_s = time.perf_counter() - t
    t = time.perf_counter()
    got = rt.generate_ids(enc, [prefix] * len(enc), params)
    sync(device)
    rt_s = time.perf_counter() - t

    def strip(rows: list[list[int]]) -> list[list[int]]:
        """Generated ids after [decoder start, forced language], without padding and EOS."""
        res = []
        for row in rows:
            row = [x for x in row[2:] if x != tok.pad_token_id]
            res.append(row[:-1] if row and row[-1] == tok.eos_token_id else row)
        return res

    # The fp16 noise floor: greedy output of both fp16 implementations against HF in float32.
    del hf
    hf32 = MBartForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()
    ref32 = strip(
        hf32.generate(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long(), **gen_kw).tolist()
    )
    ref = strip(out.tolist())
    report = {
        "shape": args.shape, "init_std": dims.get("init_std"), "dtype": args.dtype, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "sentences": len(enc), "languages": LANGS, "max_new_tokens": args.max_new_tokens,
        "max_abs_logit_diff": max_diff, "max_abs_logit": ref_scale,
        "greedy_identical_sequences": identical(got, ref), "greedy_token_agreement": agreement(got, ref),
        "runtime_vs_hf_fp32_identical": identical(got, ref32), "hf_vs_hf_fp32_identical": identical(ref, ref32),
        "runtime_vs_hf_fp32_agreement": agreement(got, ref32), "hf_vs_hf_fp32_agreement": agreement(ref, ref32),
        "distinct_output_tokens": len({x for r in ref for x in r}),
        "hf_generate_s": hf_s, "runtime_generate_s": rt_s, "setup_s": setup_s,
        "torch": torch.__version__,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "parity.json").write_text(json.dumps(report, indent=2) + "\n")
    print("| metric | value |\n|---|---|")
    for k, v in report.items():
        print(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")


if __name__ == "__main__":
    main()
