# The commands people type. Every target installs what it needs first (idempotent, stamp-guarded).
PYTHON ?= python3
STAMP := .make/installed
export MT_DATA_ROOT ?= $(abspath ../shared/data)

.PHONY: install test lint format serve convert
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

lint: $(STAMP)  ## ruff
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: $(STAMP)
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

MODEL ?= facebook/mbart-large-50-many-to-many-mmt
TP ?= 1
DTYPE ?= float16
convert: $(STAMP)  ## MODEL=<HF dir or hub id> OUT=<dir> [TP=1] [DTYPE=float16]
	$(PYTHON) -m convert --model $(MODEL) --output $(OUT) --tp-size $(TP) --dtype $(DTYPE)
