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

.PHONY: install demo test test-slow bench clean

install: $(STAMP)

# plain pip (not uv): pip finds the local torch 2.14.1 / torchvision 0.29.1 wheels
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip check
	touch $(STAMP)

# The main job on the built-in demo data: generate the raw data (deterministic, so it matches
# data.dvc), run every dvc.yaml stage (import, validation, item features, pretraining on the
# source domains, fine-tuning + baselines and evaluation on the target), push the data to the
# local DVC remote, print the catalog statistics and the test metrics.
demo: install
	$(BIN)/mmrec demo_data --config $(CONFIG) -q
	$(BIN)/dvc add -q data
	$(BIN)/dvc repro
	$(BIN)/dvc push -q
	$(BIN)/mmrec stats --config $(CONFIG)
	$(BIN)/mmrec metrics --config $(CONFIG)

test: install
	$(BIN)/pytest -q

# real pretrained weights and the real shared datasets (../shared/datasets)
test-slow: install
	$(BIN)/pytest -q -m slow

bench: install
	$(BIN)/python benchmarks/bench_catalog.py

clean:
	rm -rf artifacts bench_out .dvcstore
