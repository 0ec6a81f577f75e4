# flowmo: every command a user needs. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    ?= .venv
PY      := $(VENV)/bin/python
FLOWMO  := $(VENV)/bin/flowmo
# torch/torchvision pair tested on CPU here (x86_64); override on a cluster, e.g. TORCH_SPEC="torch==2.5.1 torchvision==0.20.1".
ARCH    := $(shell uname -m)
ifeq ($(ARCH),aarch64)
TORCH_SPEC ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
endif
STAMP   := $(VENV)/.installed

.PHONY: help install test test-all clean

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## create .venv and install flowmo with its dev extras

test: $(STAMP) ## fast CPU test suite (tests marked slow are skipped)
	$(PY) -m pytest -q -m "not slow" --durations=10

test-all: $(STAMP) ## the whole test suite, slow tests included
	$(PY) -m pytest -q --durations=15

clean: ## remove caches and run outputs (keeps .venv)
	rm -rf .pytest_cache runs results lightning_logs
	find . -name __pycache__ -prune -exec rm -rf {} +
