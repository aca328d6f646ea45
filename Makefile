# cxr-triage: the two commands a fresh machine needs are `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# No pip cache: the trainer's torch brings ~4 GB of CUDA wheels, and a cached copy of each would
# need as much disk again on a fresh machine.
PIP    := $(BIN)/pip install -q --no-cache-dir
DEFAULT_MODEL ?= densenet121-nih14
ENGINE := $(wildcard model_repo/$(DEFAULT_MODEL)/*/model.onnx)

.PHONY: serve test lint typecheck services bench bench-capacity bench-peers bench-backlog engine clean help demo-train demo-gzsl

help:
	@echo "make serve   start the service on 127.0.0.1:8000 (embedded defaults, CPU engine)"
	@echo "make test    install everything needed and run lint, types and the whole test suite"
	@echo "make bench   engine / decode / served-vs-engine / priority-wait benchmarks -> benchmarks/results/"
	@echo "make bench-capacity  studies/s per replica, replicas on one Redis, capacity note -> benchmarks/results/"
	@echo "make bench-backlog  live /v1/predict latency with and without a backlog running -> benchmarks/results/backlog-*"
	@echo "make bench-peers  cxr-triage vs naive FastAPI / LitServe / Ray Serve / BentoML -> benchmarks/results/peers-*"
	@echo "make demo-train  synthetic phantoms -> train DenseNet-121 (CPU minutes) -> evaluate -> register -> promote"
	@echo "make demo-gzsl   CXR-ML-GZSL on synthetic compositional phantoms: train, seen/unseen/harmonic AUROC, register"
	@echo "make demo-scale  the same with 2 DDP processes, MLflow, and an int8 engine through the gate"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) -U pip

# Serving install: no torch.
$(VENV)/.serve: pyproject.toml | $(BIN)/python
	$(PIP) -e .
	@touch $@

# Everything: serving + trainer (torch, timm) + dev tools (pytest, ruff, mypy, locust, pydicom-data).
$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(PIP) -e '.[train,dev]'
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
	  && command -v chromium >/dev/null && command -v ip >/dev/null \
	  && [ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO apt-get install -y -q --no-install-recommends \
	    redis-server orthanc orthanc-dicomweb orthanc-gdcm prometheus docker-compose \
	    chromium fonts-dejavu-core iproute2; }

lint: $(VENV)/.dev
	$(BIN)/ruff check server tests benchmarks loadtests scripts
	$(BIN)/ruff format --check server tests benchmarks loadtests scripts

typecheck: $(VENV)/.dev
	$(BIN)/mypy

test: $(VENV)/.dev services lint typecheck
	$(BIN)/pytest -q

bench: engine $(VENV)/.dev
	$(BIN)/python benchmarks/bench_core.py
	$(BIN)/python benchmarks/bench_priority.py

# Studies/s per replica, 1 and 2 replicas on one Redis, with a capacity note for SREs.
bench-capacity: engine $(VENV)/.dev
	$(BIN)/python benchmarks/bench_capacity.py

# Live /v1/predict p50/p95/p99 with and without `cxr-triage backlog` running (issue 13).
bench-backlog: engine $(VENV)/.dev
	$(BIN)/python benchmarks/bench_backlog.py

# Peers side by side (issue 13): naive FastAPI (ORT 1 and 2 threads), plain LitServe, Ray Serve,
# BentoML and cxr-triage; same model.onnx, same machine, the client in its own process. Ray Serve
# and BentoML go into .venv-peers (built by the script). Refuses to time a busy machine. ~30 min.
bench-peers: engine $(VENV)/.dev
	$(BIN)/python benchmarks/bench_peers.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The whole training loop on SYNTHETIC phantoms (not clinical data), in a few CPU minutes:
# generate -> train DenseNet-121 -> register (with operating points) -> gate + promote -> evaluate.
# The first time, an untrained version is exported so the gate has something to beat.
DEMO_MODEL ?= densenet121-synthetic-demo
DEMO_DATA  ?= datasets/synthetic
demo-train: $(VENV)/.dev
	$(BIN)/cxr-triage synth-data $(DEMO_DATA) --patients 500 --size 96
	@ls model_repo/$(DEMO_MODEL)/*/model.onnx >/dev/null 2>&1 || $(BIN)/cxr-triage export $(DEMO_MODEL)
	$(BIN)/cxr-triage train $(DEMO_MODEL) --data $(DEMO_DATA) --epochs 7 --lr 3e-3 --no-augment --register
	$(BIN)/cxr-triage promote $(DEMO_MODEL) latest --data $(DEMO_DATA)
	$(BIN)/cxr-triage evaluate $(DEMO_MODEL) --data $(DEMO_DATA) --out reports/$(DEMO_MODEL)

# README screenshots of the worklist page (docs/screenshots/), taken in Debian's chromium with the
# browser tests' settings against the real service and model_repo/'s default model.
.PHONY: screenshots
screenshots: engine $(VENV)/.dev services
	$(BIN)/python scripts/screenshots.py

# Load tests against the SLO targets in loadtests/slo.yaml: starts the service on a free port
# (CPU engine, embedded defaults), runs the PNG and the full-resolution J2K DICOM predict suites
# at 4 users, fails on a breach; results in benchmarks/results/loadtest-<suite>-latest.md.
loadtest: engine $(VENV)/.dev
	$(BIN)/python -m loadtests.slo --suite predict-png --suite predict-dicom-j2k --targets loadtests/slo.yaml
.PHONY: loadtest

# Training past one process, in one command (SYNTHETIC data, CPU): DenseNet-121 with 2 DDP
# processes (gloo), logged to MLflow (runs/mlflow.db), registered through the gate (fp32),
# quantized to int8 (kept only if the gate finds it faster and not worse), then the figures.
demo-scale: $(VENV)/.dev
	$(BIN)/cxr-triage synth-data $(DEMO_DATA) --patients 500 --size 96
	@ls model_repo/$(DEMO_MODEL)/*/model.onnx >/dev/null 2>&1 || $(BIN)/cxr-triage export $(DEMO_MODEL)
	$(BIN)/cxr-triage train $(DEMO_MODEL) --data $(DEMO_DATA) --epochs 7 --lr 3e-3 --no-augment \
	  --nproc-per-node 2 --register
	$(BIN)/cxr-triage promote $(DEMO_MODEL) latest --data $(DEMO_DATA) || true
	$(BIN)/cxr-triage export $(DEMO_MODEL) --quantize int8 --calibration $(DEMO_DATA) --holdout $(DEMO_DATA)
	$(BIN)/cxr-triage promote $(DEMO_MODEL) latest --data $(DEMO_DATA) || true
	$(BIN)/cxr-triage check-repo
	$(BIN)/python -c "import json, pathlib; [print(p.parent.name, 'weights', m['weights'], 'precision', m.get('precision', 'fp32'), 'mlflow run', m.get('mlflow', {}).get('run_id'), 'AUROC', m.get('metrics', {}).get('mean_auroc'), 'int8 speed', m.get('speed')) for p in sorted(pathlib.Path('model_repo/$(DEMO_MODEL)').glob('*/metadata.json')) for m in [json.loads(p.read_text())]]"
.PHONY: demo-scale

# CXR-ML-GZSL on SYNTHETIC compositional phantoms (16 '<side> <zone> <type>' findings, 4 unseen):
# train (gamma1 = 0 for 5 epochs: encoders from scratch, see README), evaluate seen / unseen /
# harmonic AUROC and top-k, register a version in model_repo/gzsl-synthetic-demo: `make serve`
# then serves it beside DenseNet-121 (?model=gzsl-synthetic-demo), and findings can be added
# to it at run time (README, "Zero-shot findings").
GZSL_DATA ?= datasets/gzsl-synthetic
GZSL_RUN  ?= runs/gzsl-synthetic-demo
demo-gzsl: $(VENV)/.dev
	$(BIN)/cxr-triage gzsl synth-data $(GZSL_DATA) --patients 2000 --size 64 --seed 0
	$(BIN)/cxr-triage gzsl train --data $(GZSL_DATA) --run-dir $(GZSL_RUN) --epochs 10 --lr 1e-3 \
	  --image-size 64 --align-warmup-epochs 5 --no-progress
	$(BIN)/cxr-triage gzsl evaluate $(GZSL_RUN) --bootstrap 1000 --out reports/gzsl-synthetic-demo/report.json
	$(BIN)/cxr-triage gzsl register $(GZSL_RUN) --model gzsl-synthetic-demo
