# Two commands set everything up: `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# Offline by design: nothing is fetched from a model or dataset hub at run time.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# DVC sends no usage analytics (each attempt also leaves a file in /tmp on a machine without network).
export DVC_NO_ANALYTICS ?= 1
export GIT_AUTHOR_NAME ?= kdsweep
export GIT_AUTHOR_EMAIL ?= kdsweep@localhost
export GIT_COMMITTER_NAME ?= kdsweep
export GIT_COMMITTER_EMAIL ?= kdsweep@localhost

# torch is pinned to a CPU wheel so pip never pulls a multi-GB CUDA build where none is
# wanted; on a GPU machine install your CUDA build of torch first: TORCH_SPEC= make ...
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-slow lint install clean-outputs

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install -q "$(TORCH_SPEC)")
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

## The main job on the embedded default: the DVC pipeline, then the demo sweep.
demo: $(STAMP)
	dvc repro
	dvc metrics show
	kdsweep run experiments/demo.yaml

## The fast test suite (slow end-to-end tests: make test-slow).
test: $(STAMP)
	$(PY) -m pytest -q

## ruff check + ruff format --check on the whole tree (configured in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check kdsweep tests bench
	$(VENV)/bin/ruff format --check kdsweep tests bench

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow
