# Set-up and entry points. Everything runs from a project-local virtual environment (.venv) so a
# fresh machine needs only Python 3.11 and git. See README.md.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/demo.yaml
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PATH := $(CURDIR)/$(BIN):$(PATH)

PORT ?= 5001

.PHONY: install demo repro ui mlflow-ui serve rollback test test-slow bench bench-serve bench-memory bench-setup compare bench-epoch experiments clean

install: $(STAMP)

# plain pip (not uv): pip finds the local torch 2.14.1 / torchvision 0.29.1 wheels
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip check
	touch $(STAMP)

# The main job on the built-in demo data: generate the raw data (deterministic, so it matches
# data.dvc) and push it to the local DVC remote, then run the whole Dagster asset graph headless
# (import, validation, item features, pretraining on the source domains, fine-tuning + baselines,
# evaluation, quality gate, MLflow registration of the target model), and print the catalog
# statistics, the test metrics and how to open the Dagster and MLflow UIs.
demo: install
	$(BIN)/mmrec demo_data --config $(CONFIG) -q
	$(BIN)/dvc add -q data
	$(BIN)/dvc push -q
	DAGSTER_HOME=$(CURDIR)/.dagster_home $(BIN)/python -m orchestration --config $(CONFIG)
	$(BIN)/mmrec stats --config $(CONFIG)

# The same stages through DVC (dvc.yaml): re-runs only what changed since the last run.
repro: install
	$(BIN)/mmrec demo_data --config $(CONFIG) -q
	$(BIN)/dvc repro

# The Dagster UI (asset graph, runs, checks) and the MLflow UI (runs, registered models)
ui: install
	DAGSTER_HOME=$(CURDIR)/.dagster_home $(BIN)/dagster dev -m orchestration.definitions -h 127.0.0.1 -p 3000

mlflow-ui: install
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow/mlflow.db --host 127.0.0.1 --port 5000

# The recommendation service (deploy/service.py: FastAPI under uvicorn, WORKERS processes sharing
# one live catalog) on the target model the pipeline registered (<prefix>-<domain>@champion);
# ask it with `.venv/bin/python -m deploy.recommend --history <item ids>`; API at /docs
serve: install
	$(BIN)/python -m deploy.serve --config $(CONFIG) --port $(PORT) --workers $(or $(WORKERS),1)

# Point <prefix>-<domain>@champion back at the previous champion (a running `make serve` picks it
# up at its next registry check, --reload-interval, 30 s by default)
rollback: install
	$(BIN)/python -m deploy.rollback --config $(CONFIG)

test: install
	$(BIN)/pytest -q

# real pretrained weights and the real shared datasets (../shared/datasets)
test-slow: install
	$(BIN)/pytest -q -m slow

# Every benchmark table in one run (benchmarks/bench.py), each with the load average: catalog import
# + validation; training throughput and MFU (fp32, bf16) against the matmul peak measured in the same
# run; feature-cache build vs sentence-transformers; full-ranking evaluation; end-to-end top-2
# training (CPU, and the GPU when torch sees one). A few minutes on 2 cores. QUICK=1: toy sizes
# (checks that it all runs); THREADS=N: torch threads (default: every usable core; 1 is steadier
# when other jobs hold the cores). Writes the tables, command, commit and load averages to
# docs/results/bench/bench.json (QUICK=1: no record); `python -m experiments --report-only` puts
# them into docs/RESULTS.md's Benchmarks section. Commit a record only from an otherwise idle machine.
bench: install
	$(BIN)/python benchmarks/bench.py $(if $(THREADS),--threads $(THREADS)) $(if $(QUICK),--quick)

# The serving load test on loopback (benchmarks/bench_serving.py --only http): the real service
# with 2 workers for catalogs of 10K and 100K items, p50 / p99 latency and requests/s at 1, 4 and
# 16 closed-loop clients (BENCH_SECONDS per row, default 10), then the latency of adding an item.
# About 2 minutes with the default; ONLY=recommend,faiss,http adds the in-process sections.
# Writes docs/results/bench/bench_serving-<sections>.json (e.g. bench_serving-http.json; a rerun of
# the same sections replaces it), rendered into docs/RESULTS.md by `python -m experiments --report-only`.
bench-serve: install
	$(BIN)/python benchmarks/bench_serving.py --only $(or $(ONLY),http) --seconds $(or $(BENCH_SECONDS),10)

# Resident memory of a real-data fine-tuning run with and without handing freed heap memory back to
# the OS (TrainConfig.release_memory; benchmarks/bench_memory.py): each setting in its own process,
# mean RSS, its peak and RSS at the end, and seconds per step; it first builds the config's catalogs
# and item_features (under a minute when the feature cache has them). CONFIG (default
# configs/amazon.yaml), DOMAIN (default amazon_instrument), STEPS (default 300: about 10 minutes on 2
# cores). Writes docs/results/bench/bench_memory-<domain>.json for docs/RESULTS.md.
BENCH_MEMORY_CONFIG = $(if $(filter command line environment,$(origin CONFIG)),$(CONFIG),configs/amazon.yaml)
bench-memory: install
	$(BIN)/mmrec raw_catalog --config $(BENCH_MEMORY_CONFIG) -q
	$(BIN)/mmrec validated_catalog --config $(BENCH_MEMORY_CONFIG) -q
	$(BIN)/mmrec item_features --config $(BENCH_MEMORY_CONFIG) -q
	$(BIN)/python benchmarks/bench_memory.py --config $(BENCH_MEMORY_CONFIG) --domain $(or $(DOMAIN),amazon_instrument) --steps $(or $(STEPS),300)

# The README's set-up claims from a fresh clone of HEAD (benchmarks/fresh_clone.py): times
# `make install` and `make demo` there, the venv's size and `pip check`; a record for RESULTS.md.
# Needs ~7 GB of scratch disk; run it on an idle machine.
bench-setup: install
	$(BIN)/python benchmarks/fresh_clone.py

# RecBole 1.2.1's SASRec on exactly the target domains' splits, next to mmrec's models with paired
# intervals over users (run the pipeline for the same seeds first). RecBole needs torch 2.13 and
# numpy < 2, so it gets its own environment; ray imports pkg_resources, hence setuptools < 70.
# SEEDS="0 1 2" picks the seeds (default: the config's fine-tuning seed).
RECBOLE_VENV := .venv-recbole
$(RECBOLE_VENV)/.installed:
	test -x $(RECBOLE_VENV)/bin/python || $(PYTHON) -m venv $(RECBOLE_VENV)
	$(RECBOLE_VENV)/bin/python -m pip install -q torch==2.13.0 recbole==1.2.1 "numpy<2" "pandas<2.3" "scipy<1.14"
	$(RECBOLE_VENV)/bin/python -m pip install -q --no-deps "setuptools<70"
	touch $@

compare: install $(RECBOLE_VENV)/.installed
	$(BIN)/mmrec compare --config $(CONFIG) $(foreach s,$(SEEDS),--seed $(s))

# The experiment cells (experiments/cells.py: transfer vs scratch vs SASRec vs RecBole vs zero-shot, source
# and target data size, modality / fusion / MoM and objective ablations, cold vs warm, training cost) of
# CONFIG for SEEDS (default: the config's seed), each through the library stages in its own folder under
# artifacts/experiments/; resumable (a cell whose record exists is skipped); then docs/RESULTS.md and
# docs/results/<config>/*.png from every record. QUICK=1: every cell at toy size on the demo data (a test
# of the script, not of the numbers). E.g. make experiments CONFIG=configs/amazon.yaml SEEDS="0 1"
experiments: install
	$(BIN)/python -m experiments --config $(CONFIG) $(foreach s,$(SEEDS),--seed $(s)) $(if $(QUICK),--quick) --threads $(or $(THREADS),1)

# Seconds per training epoch (optimizer steps only) of the content model and the in-tree SASRec
# against RecBole's SASRec on the same split, machine and threads (benchmarks/epoch_time.py);
# needs validated_catalog + item_features of DOMAIN, e.g.
# make bench-epoch CONFIG=configs/amazon.yaml DOMAIN=amazon_instrument
bench-epoch: install $(RECBOLE_VENV)/.installed
	$(BIN)/python benchmarks/epoch_time.py --config $(CONFIG) --domain $(DOMAIN) --threads $(or $(THREADS),1) --epochs $(or $(EPOCHS),1)

clean:
	rm -rf artifacts bench_out .dvcstore .dagster_home mlflow
