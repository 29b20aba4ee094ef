# fincast: every set-up step is here. `make train` and `make test` create .venv and install on first use.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIPELINE ?= pipelines/price_equities.yaml
ARGS ?=
PORT ?= 5000
NPROC ?= 2
RUN ?=
STUDY ?= pipelines/stability_crypto.yaml
BACKTEST ?= pipelines/backtest_crypto.yaml
SWEEP ?= pipelines/sweep_crypto.yaml
STUDY_NAME ?= $(basename $(notdir $(STUDY)))
PYTEST_ARGS ?=

.PHONY: help install train train-price train-crypto train-options train-ddp resume data stability report sweep advise-clip backtest ui test test-slow lint docs bench clean distclean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 16

$(STAMP): pyproject.toml constraints.txt
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || \
		{ echo "fincast needs Python >= 3.11; '$(PY)' is missing or older. Try: make PY=python3.12 ..." >&2; exit 1; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# constraints.txt pins every package (torch 2.13.0: the CPU build here, no CUDA downloads; mlflow 3.17.2)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install fincast with pinned dependencies (idempotent)

train: $(STAMP)  ## train the default pipeline (PIPELINE=..., ARGS="--set key=value ...")
	$(BIN)/fincast train $(PIPELINE) $(ARGS)

train-price: $(STAMP)  ## train on equities (pipelines/price_equities.yaml: SPY)
	$(BIN)/fincast train pipelines/price_equities.yaml $(ARGS)

train-crypto: $(STAMP)  ## train on crypto (pipelines/price_crypto.yaml: BTC-USD, ETH-USD)
	$(BIN)/fincast train pipelines/price_crypto.yaml $(ARGS)

train-options: $(STAMP)  ## option pricing: synthetic Heston market, then real SPX chains when ../shared/data has them (ARGS=...)
	$(BIN)/fincast train pipelines/options_synthetic.yaml $(ARGS)
	$(BIN)/fincast train pipelines/options_spx.yaml --skip-missing-data $(ARGS)

train-ddp: $(STAMP)  ## train PIPELINE with DDP over NPROC processes (torchrun; gloo on CPU, NCCL on GPUs)
	$(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) -m fincast train $(PIPELINE) $(ARGS)

resume: $(STAMP)  ## continue run RUN=<run id> from its checkpoint into the same MLflow run (ARGS="--set train.epochs=60")
	@test -n "$(RUN)" || { echo "usage: make resume RUN=<run id printed by make train> [ARGS=\"--set train.epochs=60\"]" >&2; exit 2; }
	$(BIN)/fincast resume $(RUN) $(ARGS)

data: $(STAMP)  ## fetch or refresh the data cache of PIPELINE only
	$(BIN)/fincast data $(PIPELINE) $(ARGS)

stability: $(STAMP)  ## run the stability study STUDY (default BTC-USD; ARGS="--set data.source=csv --set data.path=DIR")
	$(BIN)/fincast study $(STUDY) $(ARGS)

report: $(STAMP)  ## stability report of study STUDY_NAME from MLflow -> reports/stability/<name>/index.html
	$(BIN)/fincast report stability --study $(STUDY_NAME)

sweep: $(STAMP)  ## threshold search SWEEP (default BTC-USD, TPE; ARGS="--set data.source=synthetic"); rerun resumes
	$(BIN)/fincast sweep $(SWEEP) $(ARGS)

advise-clip: $(STAMP)  ## propose clip thresholds from an unclipped probe of PIPELINE's gradient norms (ARGS=...)
	$(BIN)/fincast advise-clip $(PIPELINE) $(ARGS)

backtest: $(STAMP)  ## walk-forward backtest BACKTEST (default BTC-USD; ARGS="--set data.source=csv --set data.path=DIR") -> reports/backtest/<name>/
	$(BIN)/fincast backtest $(BACKTEST) $(ARGS)

ui: $(STAMP)  ## MLflow UI on http://127.0.0.1:$(PORT) over the project's store
	$(BIN)/mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}" \
		--default-artifact-root ./mlartifacts --host 127.0.0.1 --port $(PORT)

test: $(STAMP)  ## fast offline test suite (no network, no GPU; a few minutes on 2 cores)
	$(BIN)/python -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-slow: $(STAMP)  ## slower end-to-end tests (CLI runs into temporary MLflow stores)
	$(BIN)/python -m pytest -m slow -q $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff, and the import-linter contract for the package layers
	$(BIN)/ruff check fincast tests bench
	$(BIN)/lint-imports

docs: $(STAMP)  ## regenerate docs/config.md, the configuration reference, from the config schema
	$(BIN)/fincast keys --markdown > docs/config.md.tmp && mv docs/config.md.tmp docs/config.md

bench: $(STAMP)  ## benchmarks in bench/ (print ratios measured in one run)
	$(BIN)/python bench/logging_overhead.py
	$(BIN)/python bench/clip_overhead.py
	$(BIN)/python bench/study_efficiency.py
	$(BIN)/python bench/report_speed.py
	$(BIN)/python bench/backtest_overhead.py
	$(BIN)/python bench/backtest_speed.py --quick
	$(BIN)/python bench/batched_study.py
	$(BIN)/python bench/run_axis.py
	$(BIN)/python bench/study_scale.py --quick

clean:  ## remove caches and generated reports (keeps .venv, the data cache and the MLflow store)
	rm -rf .pytest_cache .ruff_cache .hypothesis .import_linter_cache build dist *.egg-info
	find . -name __pycache__ -type d -not -path './.venv/*' -prune -exec rm -rf {} +
	find reports -mindepth 1 -not -name .gitkeep -delete 2>/dev/null || true

distclean: clean  ## also remove .venv, the data cache, checkpoints/, the MLflow store (mlflow.db, mlartifacts/) and optuna.db
	rm -rf $(VENV) mlflow.db mlflow.db-* optuna.db optuna.db-* mlartifacts mlruns checkpoints
	find data -mindepth 1 -not -name .gitkeep -delete 2>/dev/null || true
