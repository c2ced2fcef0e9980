# The commands people type. Every target installs what it needs first (idempotent, stamp-guarded).
PYTHON ?= python3
STAMP := .make/installed
export MT_DATA_ROOT ?= $(abspath ../shared/data)

MODEL ?= facebook/mbart-large-50-many-to-many-mmt
TP ?= 1
DTYPE ?= float16
PORT ?= 8000
LANGS ?= zh,ar,ru
QUANT ?= int8_wo
SAMPLES ?= 512
CKPT ?=
URL ?=
EVAL_PAIRS ?= zh-en,en-zh,ar-en,en-ar,ru-en,en-ru,de-en,en-de,hi-en,sw-en
EVAL_OUT ?= out/eval/$(if $(CKPT),$(notdir $(CKPT)),server)
BASELINE ?= mbart50-fp16-ntrex
ENGINE ?= $(CKPT)-engine

.PHONY: help install test lint format serve convert calibrate shortlist eval regress engine loadtest bench
.DEFAULT_GOAL := help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

# Keep an installed torch (CUDA or CPU); otherwise take the CPU build, never an unpinned CUDA one.
$(STAMP): pyproject.toml
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==2.13.0"
	$(PYTHON) -m pip install -q -e '.[dev]'
	@mkdir -p .make && touch $@

install: $(STAMP)  ## install the project and its dependencies into the current Python

test: $(STAMP)  ## run the whole test suite (CPU, hermetic)
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff check + format check
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: $(STAMP)  ## ruff fix + format
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

serve: $(STAMP)  ## MODEL=<hub id | HF dir | converted ckpt | tiny> [PORT=8000]; every setting also as MT_* env
	$(PYTHON) -m serve --model $(MODEL) --port $(PORT)

convert: $(STAMP)  ## MODEL=<HF dir or hub id> OUT=<dir> [TP=1] [DTYPE=float16]
	$(PYTHON) -m convert --model $(MODEL) --output $(OUT) --tp-size $(TP) --dtype $(DTYPE)

calibrate: $(STAMP)  ## LANGS=zh,ar,ru QUANT=int8_wo|int4_awq|w8a8_sq MODEL=<HF dir or hub id> OUT=<dir> [TP=1] [SAMPLES=512] [CALIB_ARGS=...]
	$(PYTHON) -m calib --langs $(LANGS) --quant $(QUANT) --model $(MODEL) --output $(OUT) --tp-size $(TP) --samples $(SAMPLES) $(CALIB_ARGS)

eval: $(STAMP)  ## CKPT=<converted dir> | URL=<server> [EVAL_PAIRS=..] [LIMIT=N] [EVAL_OUT=dir]
	$(PYTHON) -m eval run $(if $(URL),--url $(URL),--model $(CKPT)) --pairs $(EVAL_PAIRS) $(if $(LIMIT),--limit $(LIMIT)) --out $(EVAL_OUT)

regress: $(STAMP)  ## gate EVAL_OUT against eval/baselines/$(BASELINE).json [UPDATE=1 to move it]
	$(PYTHON) -m eval regress --baseline $(BASELINE) --run $(EVAL_OUT) $(if $(UPDATE),--update)

shortlist: $(STAMP)  ## CKPT=<converted ckpt> [SHORTLIST_LANGS=en,zh,ar,ru]: per-language output vocabularies + report
	$(PYTHON) -m calib.shortlist --checkpoint $(CKPT) $(if $(SHORTLIST_LANGS),--langs $(SHORTLIST_LANGS)) $(SHORTLIST_ARGS)

engine: $(STAMP)  ## CKPT=<converted ckpt> ENGINE=<engine dir> [BUILD_ARGS="--dry-run"]: trtllm-build both components
	$(PYTHON) -m convert.build --checkpoint $(CKPT) --output $(ENGINE) $(BUILD_ARGS)

loadtest: $(STAMP)  ## in-flight vs static batching sweep -> out/loadtest/{loadtest.json,loadtest.png}
	$(PYTHON) scripts/loadtest.py --model $(or $(LOADTEST_MODEL),tiny)

bench: $(STAMP)  ## GPU: HF generate vs this runtime at mBART-large shape -> out/bench/{bench.json,bench.png}
	$(PYTHON) scripts/bench.py --out out/bench
