"""`python -m calib`: calibrate and quantize an HF mBART into a TensorRT-LLM checkpoint, with a report.

User errors are one line on stderr and exit status 1, with nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from calib.data import CalibError
from calib.trtllm_quant import QUANT_MODES
from convert.cli import OneLineParser, run_cli
from convert.errors import ConvertError


def build_parser() -> argparse.ArgumentParser:
    modes = ", ".join(f"{k} ({v[0]})" for k, v in QUANT_MODES.items())
    p = OneLineParser(
        prog="python -m calib",
        description=(
            "Calibrate an HF mBART with NVIDIA ModelOpt on per-language text (X->en and en->X for each "
            "language, decoder fed the model's own full-precision translations) and write a quantized "
            "TensorRT-LLM checkpoint (same layout as `python -m convert`) plus report.json/.md/.png. "
            f"Modes: {modes}."
        ),
        epilog="Example: python -m calib --langs zh,ar,ru --quant int8_wo --model facebook/mbart-large-50-many-to-many-mmt "
        "--output out/mbart50-int8 --tp-size 2 --samples 512",
    )
    p.add_argument(
        "--langs", required=True, help="comma-separated ISO codes with a corpus under $MT_DATA_ROOT/calib"
    )
    p.add_argument("--quant", required=True, choices=list(QUANT_MODES), help="quantization mode")
    p.add_argument("--model", required=True, help="local Hugging Face model directory or hub id")
    p.add_argument("--output", required=True, help="checkpoint directory (must not exist unless --overwrite)")
    p.add_argument("--tp-size", type=int, default=1, help="tensor-parallel size of the written checkpoint")
    p.add_argument(
        "--samples", type=int, default=512, help="calibration sentences per language and direction"
    )
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength (w8a8_sq only)")
    p.add_argument(
        "--exclude", action="append", default=[], metavar="PATTERN",
        help="keep matching TRT-LLM modules in floating point (fnmatch on the full name, e.g. "
        "'*cross_attention.qkv'); repeatable. Embeddings, layer norms and lm_head always are",
    )  # fmt: skip
    p.add_argument("--compare-english-only", action="store_true",
                   help="also calibrate on English only and compare, pair by pair")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--dtype", default="float16", help="dtype of the unquantized tensors (default float16)")
    p.add_argument(
        "--eval-samples", type=int, default=50, help="held-out test sentences per direction for the report"
    )
    p.add_argument("--batch-size", type=int, default=16, help="sentences per forward pass")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on generated tokens per sentence (default: 2 x source length + 16)")  # fmt: skip
    p.add_argument("--eval-backend", default="auto", choices=["auto", "runtime", "hf"],
                   help="runtime: the PyTorch runtime on the written checkpoint; hf: ModelOpt's fake-quant "
                   "model; auto: runtime when it loads")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import transformers

    from calib.pipeline import Options, calibrate

    transformers.utils.logging.set_verbosity_error()  # keep load reports off stderr, where our errors go
    transformers.utils.logging.disable_progress_bar()
    opts = Options(
        model=args.model, output=Path(args.output), langs=args.langs.split(","), quant=args.quant,
        tp_size=args.tp_size, samples=args.samples, alpha=args.alpha, exclude=args.exclude,
        compare_english_only=args.compare_english_only, overwrite=args.overwrite, dtype=args.dtype,
        eval_samples=args.eval_samples, batch_size=args.batch_size, eval_backend=args.eval_backend,
        max_new_tokens=args.max_new_tokens,
        progress=not args.quiet,
    )  # fmt: skip
    return run_cli("calib", lambda: print(calibrate(opts)), (CalibError, ConvertError))


if __name__ == "__main__":
    sys.exit(main())
