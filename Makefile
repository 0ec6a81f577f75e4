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

# ---- data (src/flowmo/data): shards, the embedded sample set, loader throughput
IMAGENET       ?=
SHARDS_OUT     ?= data/imagenet
SHARD_SIZE     ?= 1000
# 50k val images in 200 shards: enough shards that 8 GPUs x 8 workers all get val work.
VAL_SHARD_SIZE ?= 250
SAMPLE_DATA    := data/sample/train.json

.PHONY: sample-data shards bench-data

sample-data: $(STAMP) ## build the embedded sample shards in data/sample (scikit-image photos, offline, seconds)
	$(FLOWMO) sample-data --out data/sample

# File target for recipes that need the sample set but should not rebuild it every time (e.g. the demo).
$(SAMPLE_DATA): | $(STAMP)
	$(FLOWMO) sample-data --out data/sample

shards: $(STAMP) ## ImageNet shards: make shards IMAGENET=/data/ILSVRC2012 [SHARDS_OUT=data/imagenet SHARD_SIZE=1000]
	@test -n "$(IMAGENET)" || { echo "usage: make shards IMAGENET=DIR, where DIR holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (+ ILSVRC2012_devkit_t12.tar.gz for val labels) or train/ and val/ ImageFolder trees"; exit 2; }
	@set -e; \
	train="$(IMAGENET)/ILSVRC2012_img_train.tar"; [ -e "$$train" ] || train="$(IMAGENET)/train"; \
	val="$(IMAGENET)/ILSVRC2012_img_val.tar"; [ -e "$$val" ] || val="$(IMAGENET)/val"; \
	devkit="$(IMAGENET)/ILSVRC2012_devkit_t12.tar.gz"; labels=""; [ -e "$$devkit" ] && labels="--val-labels $$devkit"; \
	echo "train: $$train  val: $$val  $$labels  -> $(SHARDS_OUT)"; \
	$(FLOWMO) shards --source "$$train" --out $(SHARDS_OUT) --split train --shard-size $(SHARD_SIZE); \
	$(FLOWMO) shards --source "$$val" --out $(SHARDS_OUT) --split val --shard-size $(VAL_SHARD_SIZE) $$labels

bench-data: $(STAMP) ## data loader throughput: decode+augment images/s per worker at 256x256, workers per GPU
	$(PY) scripts/bench_data.py
