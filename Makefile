# cxr-triage: the two commands a fresh machine needs are `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEFAULT_MODEL ?= densenet121-nih14
ENGINE := $(wildcard model_repo/$(DEFAULT_MODEL)/*/model.onnx)

.PHONY: serve test lint typecheck services bench engine clean help demo-train

help:
	@echo "make serve   start the service on 127.0.0.1:8000 (embedded defaults, CPU engine)"
	@echo "make test    install everything needed and run lint, types and the whole test suite"
	@echo "make bench   engine / decode / served-vs-engine / priority-wait benchmarks -> benchmarks/results/"
	@echo "make demo-train  synthetic phantoms -> train DenseNet-121 (CPU minutes) -> evaluate -> register -> promote"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip

# Serving install: no torch.
$(VENV)/.serve: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	@touch $@

# Everything: serving + trainer (torch, timm) + dev tools (pytest, ruff, mypy, locust, pydicom-data).
$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[train,dev]'
	@touch $@ $(VENV)/.serve

# The default engine: exported (untrained, no download) when model_repo/ has none.
engine: $(VENV)/.serve
ifeq ($(ENGINE),)
	$(MAKE) $(VENV)/.dev
	$(BIN)/cxr-triage export $(DEFAULT_MODEL)
endif

serve: engine
	$(BIN)/cxr-triage serve

# Real services the tests start themselves (Debian packages; nothing is left running).
services:
	@command -v redis-server >/dev/null && command -v Orthanc >/dev/null \
	  && command -v prometheus >/dev/null && command -v docker-compose >/dev/null \
	  && [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends \
	    redis-server orthanc orthanc-dicomweb orthanc-gdcm prometheus docker-compose; }

lint: $(VENV)/.dev
	$(BIN)/ruff check server tests benchmarks
	$(BIN)/ruff format --check server tests benchmarks

typecheck: $(VENV)/.dev
	$(BIN)/mypy

test: $(VENV)/.dev services lint typecheck
	$(BIN)/pytest -q

bench: engine $(VENV)/.dev
	$(BIN)/python benchmarks/bench_core.py
	$(BIN)/python benchmarks/bench_priority.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The whole training loop on SYNTHETIC phantoms (not clinical data), in a few CPU minutes:
# generate -> train DenseNet-121 -> register (with operating points) -> gate + promote -> evaluate.
# The first time, an untrained version is exported so the gate has something to beat.
DEMO_MODEL ?= densenet121-synthetic-demo
DEMO_DATA  ?= data/synthetic
demo-train: $(VENV)/.dev
	$(BIN)/cxr-triage synth-data $(DEMO_DATA) --patients 500 --size 96
	@ls model_repo/$(DEMO_MODEL)/*/model.onnx >/dev/null 2>&1 || $(BIN)/cxr-triage export $(DEMO_MODEL)
	$(BIN)/cxr-triage train $(DEMO_MODEL) --data $(DEMO_DATA) --epochs 7 --lr 3e-3 --no-augment --register
	$(BIN)/cxr-triage promote $(DEMO_MODEL) latest --data $(DEMO_DATA)
	$(BIN)/cxr-triage evaluate $(DEMO_MODEL) --data $(DEMO_DATA) --out reports/$(DEMO_MODEL)
