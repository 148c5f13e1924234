# HeadCT-Serve. `make serve` and `make test` do everything on a fresh machine; see README.md.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
REPOSITORY ?= model_repository
MODEL_NAME ?= fmhct
DEMO_CARD := $(REPOSITORY)/$(MODEL_NAME)/model_card.json

# `make export` inputs
CHECKPOINT ?=
HEADS ?=
TARGET ?= cpu
WEIGHTS ?= student
MAX_BATCH_SIZE ?= 8

# The torch pin lives in pyproject.toml like every other; torch must be installed first so pip takes the
# CPU wheel from local disk instead of resolving a multi-GB CUDA build.
TORCH_PIN = $(shell $(PYTHON) -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb')); \
	print(next(r for r in d['project']['optional-dependencies']['export'] if r.startswith('torch==')))")

.PHONY: help setup demo serve test lint format export bench bench-quick chart-check clean

help:
	@echo "make serve        set up, build the demo model if missing, run Triton + gateway (Ctrl-C stops)"
	@echo "make test         set up, build the demo model if missing, run lint + unit + integration tests"
	@echo "make export       CHECKPOINT=backbone.pt HEADS='ich=ich_classifier.pt:0.5 ...' TARGET=cpu|onnx|trt"
	@echo "make bench        benchmark suite (benchmarks/)"
	@echo "make chart-check  lint, render and validate the Helm chart"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e '.[export,dev]'
	touch $@

setup: $(STAMP)

# Idempotent: trains the synthetic demo model only when its checkpoints are missing and re-exports only
# when the repository entry is stale.
demo: setup
	$(PY) -m export.demo.atlas
	$(PY) -m export demo --repository $(REPOSITORY) --model-name $(MODEL_NAME)

serve: demo
	$(PY) -m headct.serve --repository $(REPOSITORY) --model-name $(MODEL_NAME)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: demo lint
	$(PY) -m pytest -q

export: setup
	@test -n "$(CHECKPOINT)" || { echo "usage: make export CHECKPOINT=backbone.pt HEADS='name=head.pt[:threshold] ...' [TARGET=cpu|onnx|trt]"; exit 2; }
	@test -n "$(HEADS)" || { echo "HEADS is empty: give at least one NAME=PATH[:THRESHOLD]"; exit 2; }
	$(PY) -m export --backbone "$(CHECKPOINT)" --weights $(WEIGHTS) $(foreach h,$(HEADS),--head "$(h)") \
		--target $(TARGET) --repository $(REPOSITORY) --model-name $(MODEL_NAME) --max-batch-size $(MAX_BATCH_SIZE)

bench bench-quick:
	@echo "make $@: the benchmark suite is not built yet (see the benchmarks issue); nothing was measured." >&2
	@exit 1

chart-check:
	@echo "make chart-check: the Helm chart is not built yet (see the Helm issue); nothing was checked." >&2
	@exit 1

clean:
	rm -rf build $(REPOSITORY)/$(MODEL_NAME) .pytest_cache .ruff_cache
