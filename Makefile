# Two commands on a fresh clone (see README): `make demo` and `make test`.
# Both create .venv and install the pinned stack on first use (torch 2.13.0 CPU, Ray 2.60, MLflow, DVC).
SHELL := /bin/bash
VENV := .venv
STAMP := $(VENV)/.installed-stamp
PYTHON ?= python3
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export RAY_USAGE_STATS_ENABLED := 0
export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S := 0.5

.PHONY: install browser demo study tune cluster-demo test test-fast lint mlflow-ui clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	$(VENV)/bin/python -m pip install --quiet --no-deps $$($(VENV)/bin/python -c \
	  'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["reference-nodeps"])')
	@touch $(STAMP)

## Debian packages the tests use: headless Chromium (tests/test_mlflow_ui.py) and rsync (tests/test_cluster_launcher.py); nothing to do when installed.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v rsync >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium rsync; }
	@chromium --version

## The whole pipeline on the embedded synthetic benchmark: CPU, a local Ray cluster, MLflow in ./mlflow.db.
demo: $(STAMP)
	dvc repro report@synthetic
	@echo "[demo] the benchmark's report: reports/synthetic/report.md (the two studies follow)"
	@# Table 2 first: its 6 runs (no-aux, aux-0.4) fill both cores in 3 rounds; Table 1 then reuses aux-0.4 as
	@# its baseline and trains 6 more. The other order trains 9 then 3, each ending on a round with one core idle.
	dvc repro study@synthetic-aux
	dvc repro summary
	@echo
	@dvc metrics show
	@python -m pipeline.demo_summary --benchmarks synthetic --studies synthetic-demo synthetic-aux

## The full synthetic Tables 1 and 2 (7 + 5 cells x 3 seeds at the demo budget; after `make demo` its 5 cells
## are reused and 21 runs remain: about 25 minutes on 2 cores).
study: $(STAMP)
	dvc repro study@synthetic-table1 study@synthetic-table2

## A Ray Tune sweep over alpha, the learning rate and the reduction ratio on the synthetic benchmark.
tune: $(STAMP)
	dvc repro tune@synthetic

## The rehearsal of a cluster run on this machine: moto's S3 server and a Ray cluster of a head + 3 worker nodes
## (own raylets, 127.0.0.1, token auth); train + evaluate + the sweep of the synthetic benchmark against it
## (RAY_ADDRESS, checkpoints and shards on s3://); prints where each rank ran; stops everything at the end.
cluster-demo: $(STAMP)
	python cluster/demo.py

## The test suite (what CI runs through .ci/run).
test: $(STAMP) browser
	python -m pytest -q --durations=15

## Unit tests only (no Ray / DVC / MLflow end-to-end runs).
test-fast: $(STAMP)
	python -m pytest -q -m "not slow"

lint: $(STAMP)
	ruff check . && ruff format --check .

mlflow-ui: $(STAMP)
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --port 5000

clean:
	rm -rf data models .ray_results mlartifacts mlflow.db
