#!/usr/bin/env bash
# TensorRT-LLM end-to-end smoke test, for a GPU machine WITH TensorRT-LLM installed.
# NOT RUN in this project's CI or on its GPU machine (TensorRT-LLM cannot be installed there):
# the steps follow TensorRT-LLM's documented API and sources, unverified on hardware.
#
# Tiny random mBART -> float16 TRT-LLM checkpoint -> encoder + decoder engines -> real NTREX
# sentences through the Executor backend, compared token for token with the PyTorch runtime.
#
#   scripts/trtllm_smoke.sh [work dir]      (default: a fresh temporary directory)
#   env: PYTHON (python3), MIN_EXACT (0.8), PAIRS (en-de,zh-en,ar-en,en-hi), BEAM (1)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the project's packages, installed or not
WORK=${1:-$(mktemp -d -t trtllm-smoke-XXXXXX)}
echo "work dir: $WORK"

"$PYTHON" -c 'import tensorrt_llm; print("tensorrt_llm", tensorrt_llm.__version__)'
command -v trtllm-build >/dev/null || { echo "trtllm-build not on PATH" >&2; exit 2; }

"$PYTHON" -c "from convert.tiny import build_tiny_mbart; build_tiny_mbart('$WORK/hf')"
"$PYTHON" -m convert --model "$WORK/hf" --output "$WORK/ckpt" --dtype float16 --overwrite
"$PYTHON" -m convert.build --checkpoint "$WORK/ckpt" --output "$WORK/engine" --dry-run
"$PYTHON" -m convert.build --checkpoint "$WORK/ckpt" --output "$WORK/engine" \
    --max-batch-size 8 --max-beam-width 4 --max-num-tokens 2048
"$PYTHON" scripts/trtllm_compare.py --checkpoint "$WORK/ckpt" --engine "$WORK/engine" \
    --pairs "${PAIRS:-en-de,zh-en,ar-en,en-hi}" --beam-size "${BEAM:-1}" --min-exact "${MIN_EXACT:-0.8}"
echo "smoke test passed: $WORK"
