# flowmo: every command a user needs. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV    ?= .venv
# PYTHON=<interpreter> uses one that already has torch (a cluster module, a GPU image) as it is: no .venv, no
# download; what it lacks of flowmo's dependencies comes from WHEELS=<dir> (`make wheels` where PyPI is reachable)
# into .deps/ with pip --no-index, and flowmo itself is found on PYTHONPATH (src/) without a build step.
PYTHON  ?=
WHEELS  ?=
DEPS    := .deps
# torch and torchvision are installed first, as a matched pair, then flowmo with its dependencies. TORCH_SPEC picks
# the releases (the defaults lie on this project's CI disk and run on the CPU); TORCH_INDEX picks PyTorch's index
# for your hardware, e.g. TORCH_INDEX="--index-url https://download.pytorch.org/whl/cpu" on a laptop (a ~1 GB CPU
# build) or ".../whl/cu126" for a cluster's CUDA 12.6 driver; by default pip's own index (PyPI's CUDA build).
ARCH        := $(shell uname -m)
ifeq ($(ARCH),aarch64)
TORCH_SPEC  ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_SPEC  ?= torch==2.14.1 torchvision==0.29.1
endif
TORCH_INDEX ?=

ifeq ($(PYTHON),)
PY        := $(VENV)/bin/python
FLOWMO    := $(VENV)/bin/flowmo
STAMP     := $(VENV)/.installed
DEV_STAMP := $(STAMP)
else
PY        := $(PYTHON)
FLOWMO    := $(PY) -m flowmo
STAMP     := deps
DEV_STAMP := deps-dev
export PYTHONPATH := $(CURDIR)/src:$(CURDIR)/$(DEPS)$(if $(PYTHONPATH),:$(PYTHONPATH))
endif
deps_install = $(PY) scripts/deps.py install --target $(DEPS) $(if $(WHEELS),--wheels $(WHEELS)) $(1)

.PHONY: deps deps-dev wheels

.PHONY: help install lint test test-slow test-all clean

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  %-16s %s\n", $$1, $$2}'

ifeq ($(PYTHON),)
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_INDEX) $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,lint]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)
else
deps: # what PYTHON lacks, from WHEELS into .deps (a second when nothing is missing)
	@$(call deps_install)

deps-dev: deps # and the test tools (pytest, hypothesis)
	@$(call deps_install,--extra dev)
endif

install: $(DEV_STAMP) ## create .venv: torch + torchvision (TORCH_SPEC, TORCH_INDEX), then flowmo[dev] (or PYTHON= WHEELS=)

wheels: $(STAMP) ## pure-Python wheels of every dependency beyond torch -> WHEELS_OUT=wheels (for PYTHON= WHEELS= offline)
	$(PY) scripts/deps.py wheels --out $(or $(WHEELS_OUT),wheels)

lint: $(DEV_STAMP) ## ruff: lint and format check of src/ and tests/ (pyproject.toml's settings)
	$(if $(PYTHON),@$(call deps_install,--extra lint))
	$(PY) -m ruff check src tests
	$(PY) -m ruff format --check src tests

test: $(DEV_STAMP) ## fast CPU test suite (tests marked slow are skipped)
	$(PY) -m pytest -q -m "not slow" --durations=10

test-slow: $(DEV_STAMP) ## only the tests marked slow (CI runs them after `make test`)
	$(PY) -m pytest -q -m slow --durations=5

test-all: $(DEV_STAMP) ## the whole test suite, slow tests included
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
	$(PY) -m flowmo.bench.data

# ---- training (src/flowmo/module.py, recipes in configs/stage/): Stage 1A, Stage 1B, the demo
# Global batch = per-device batch x accumulate_grad_batches x GPUS x NODES, fixed to the paper's
# 128 (1A: 8 per device) and 64 (1B: 4 per device) whatever the GPU count: ACCUM is derived below.
GPUS      ?= 8
NODES     ?= 1
DATA_CFG  ?= configs/data/imagenet.yaml
RESUME    ?=
ARGS      ?=
WORLD     := $(shell echo $$(( $(GPUS) * $(NODES) )))
# More than one process: plain DDP with gradients as bucket views (configs/ddp.yaml). Stage 1A runs in two legs:
# the first stops at the encoder freeze (step 200k), the second resumes it with the decoder alone, so no step
# all-reduces the frozen encoder's zeros. On one device the first leg runs through the freeze and the second is skipped.
DDP_CFG   := $(if $(filter 1,$(WORLD)),,-c configs/ddp.yaml)
INIT_LO   ?= runs/lo-1a/checkpoints/last.ckpt
INIT_HI   ?= runs/hi-1a/checkpoints/last.ckpt

accum = $(shell b=$(1); w=$(WORLD); n=$(2); if [ $$(( n % (b * w) )) -ne 0 ]; then echo "x"; else echo $$(( n / (b * w) )); fi)
check_accum = @test "$(1)" != "x" || { echo "global batch $(2) is not divisible by per-device batch $(3) x $(WORLD) devices; pick GPUS/NODES that divide it"; exit 2; }
check_shards = @if [ "$(DATA_CFG)" = "configs/data/imagenet.yaml" ] && [ ! -f data/imagenet/train.json ]; then echo "No ImageNet shards in data/imagenet: make them once with 'make shards IMAGENET=/path/to/ILSVRC2012' (or point DATA_CFG at your own data config)."; exit 2; fi
# RESUME=1 with no checkpoint of that run is a mistake (a typo'd run, another machine): stop, do not start at step 0
check_resume = @test -z "$(RESUME)" || ls runs/$(1)/checkpoints/*.ckpt runs/$(1)/hpc_ckpt_*.ckpt >/dev/null 2>&1 || { echo "RESUME=1 but runs/$(1) has no checkpoint to resume; drop RESUME=1 to start the run."; exit 2; }
fit_1a = $(FLOWMO) fit -c configs/base.yaml -c configs/model/$(1).yaml -c configs/stage/1a.yaml -c $(DATA_CFG) \
	$(DDP_CFG) --run_name $(1)-1a --trainer.accumulate_grad_batches $(call accum,8,128) --trainer.devices $(GPUS) \
	--trainer.num_nodes $(NODES) $(2) $(ARGS)
# leg 1 (resumed with RESUME=1); under DDP, leg 2 resumes it from the freeze (a finished run returns at once)
leg_1 = $(call fit_1a,$(1),$(if $(RESUME),--ckpt_path last) $(2))
leg_2 = $(if $(DDP_CFG),$(call fit_1a,$(1),--ckpt_path last $(2)))
fit_1b = $(FLOWMO) fit -c configs/base.yaml -c configs/model/$(1).yaml -c configs/stage/1b.yaml -c $(DATA_CFG) \
	$(DDP_CFG) --run_name $(1)-1b --model.init.weights $(2) --trainer.accumulate_grad_batches $(call accum,4,64) \
	--trainer.devices $(GPUS) --trainer.num_nodes $(NODES) $(if $(RESUME),--ckpt_path last) $(ARGS)

.PHONY: train-lo train-hi train-small posttrain-lo posttrain-hi demo tensorboard

train-lo: $(STAMP) ## Stage 1A FlowMo-Lo, 1.3M steps (GPUS=8 NODES=1 RESUME=1 ARGS="--key value")
	$(call check_resume,lo-1a)
	$(check_shards)
	$(call check_accum,$(call accum,8,128),128,8)
	$(call leg_1,lo)
	$(call leg_2,lo)

train-hi: $(STAMP) ## Stage 1A FlowMo-Hi, 800k steps
	$(call check_resume,hi-1a)
	$(check_shards)
	$(call check_accum,$(call accum,8,128),128,8)
	$(call leg_1,hi,--trainer.max_steps 800000)
	$(call leg_2,hi,--trainer.max_steps 800000)

train-small: $(STAMP) ## Stage 1A of the ablation base (517M, patch 8), 40 epochs = 400,365 steps
	$(call check_resume,small-1a)
	$(check_shards)
	$(call check_accum,$(call accum,8,128),128,8)
	$(call leg_1,small,--trainer.max_steps 400365)
	$(call leg_2,small,--trainer.max_steps 400365)

posttrain-lo: $(STAMP) ## Stage 1B FlowMo-Lo from the 1A EMA weights (INIT_LO=runs/lo-1a/checkpoints/last.ckpt)
	$(call check_resume,lo-1b)
	$(check_shards)
	$(call check_accum,$(call accum,4,64),64,4)
	$(call fit_1b,lo,$(INIT_LO))

posttrain-hi: $(STAMP) ## Stage 1B FlowMo-Hi (INIT_HI=runs/hi-1a/checkpoints/last.ckpt)
	$(call check_resume,hi-1b)
	$(check_shards)
	$(call check_accum,$(call accum,4,64),64,4)
	$(call fit_1b,hi,$(INIT_HI))

DEMO_SEED ?= 0

demo: $(STAMP) ## FlowMo end to end on held-out photos (CPU, ~12 min on 2 cores): results/demo/{grid.png,curves.png,metrics.json} [DEMO_SEED=0]
	$(FLOWMO) demo --seed $(DEMO_SEED)

tensorboard: $(STAMP) ## TensorBoard over runs/ (losses, lr, grad norm, EMA distance, codebook, grids)
	$(PY) -m tensorboard.main --logdir runs --bind_all

# ---- evaluation (method §7, configs/eval/paper.yaml): Table 1's protocol on the 50k ImageNet val center crops
# -> results/<name>/{metrics.json, table_row.md, reconstructions.png}. CKPT= a .ckpt of ours (its architecture
# is read from it) or OFFICIAL= the authors' release: lo / hi (downloaded from their Hugging Face repository on first
# use) or a local flowmo_lo.pth / flowmo_hi.pth; SUBSAMPLE=N = every N-th val image
# (a quick look: rFID is biased upward with fewer images). Devices: GPUS x NODES; also DATA_CFG, ARGS, NAME.
CKPT      ?=
OFFICIAL  ?=
SUBSAMPLE ?= 1
NAME      ?=
STRATEGY_EVAL ?= $(if $(filter 1,$(WORLD)),auto,ddp)
eval_name = $(or $(NAME),eval-$(1)$(if $(filter-out 1,$(SUBSAMPLE)),-sub$(SUBSAMPLE)))
check_eval = @if [ -z "$(CKPT)$(OFFICIAL)" ] || { [ -n "$(CKPT)" ] && [ -n "$(OFFICIAL)" ]; }; then echo "usage: make eval-$(1) CKPT=runs/$(1)-1b/checkpoints/last.ckpt (ours) or OFFICIAL=$(1) (the authors' release), exactly one [SUBSAMPLE=10 GPUS=8 NAME=...]"; exit 2; fi
check_val_shards = @if [ "$(DATA_CFG)" = "configs/data/imagenet.yaml" ] && [ ! -f data/imagenet/val.json ]; then echo "No ImageNet val shards in data/imagenet: make them once with 'make shards IMAGENET=/path/to/ILSVRC2012' (or point DATA_CFG at your own data config)."; exit 2; fi
eval_run = $(FLOWMO) test -c configs/base.yaml -c configs/model/$(1).yaml -c $(DATA_CFG) -c configs/eval/paper.yaml \
	--run_name $(call eval_name,$(1)) --data.test_subsample $(SUBSAMPLE) --trainer.devices $(GPUS) \
	--trainer.num_nodes $(NODES) --trainer.strategy $(STRATEGY_EVAL) \
	$(if $(CKPT),--ckpt_path $(CKPT),--model.init.weights $(OFFICIAL)) $(ARGS)

.PHONY: eval-lo eval-hi

eval-lo: $(STAMP) ## evaluate FlowMo-Lo as Table 1: make eval-lo CKPT=run.ckpt | OFFICIAL=lo [SUBSAMPLE=10]
	$(call check_eval,lo)
	$(check_val_shards)
	$(call eval_run,lo)

eval-hi: $(STAMP) ## evaluate FlowMo-Hi as Table 1: make eval-hi CKPT=run.ckpt | OFFICIAL=hi [SUBSAMPLE=10]
	$(call check_eval,hi)
	$(check_val_shards)
	$(call eval_run,hi)


# ---- generation (README, Generation): MaskGIT on FlowMo tokens
GEN_TOKENIZER ?= lo
TOKENS_OUT    ?= data/tokens-lo

.PHONY: pretokenize gen-paper

pretokenize: $(STAMP) ## token shards of SHARDS_OUT's train + val: make pretokenize GEN_TOKENIZER=lo [TOKENS_OUT=data/tokens-lo GPUS=8]
	$(FLOWMO) pretokenize --tokenizer $(GEN_TOKENIZER) --shards $(SHARDS_OUT)/train.json --out $(TOKENS_OUT) --devices $(GPUS)
	$(FLOWMO) pretokenize --tokenizer $(GEN_TOKENIZER) --shards $(SHARDS_OUT)/val.json --out $(TOKENS_OUT) --split val --devices $(GPUS)

gen-paper: $(STAMP) ## MaskGIT on those tokens, configs/generator/paper.yaml (RESUME=1 ARGS="--key value")
	$(FLOWMO) gen fit -c configs/generator/base.yaml -c configs/generator/paper.yaml \
	  --data.train_tokens $(TOKENS_OUT)/train.json --data.val_tokens $(TOKENS_OUT)/val.json \
	  --model.tokenizer $(GEN_TOKENIZER) --trainer.devices $(GPUS) $(if $(RESUME),--ckpt_path last) $(ARGS)
# ---- ablations (src/flowmo/ablate/, configs/ablations/<GRID>.yaml; `flowmo ablate grids` lists them):
# GRID=paper-table4 | paper-posttrain | scaling | tiny (the demo recipe on this CPU). CELLS: comma list of cells
# (`flowmo ablate list GRID`); DRY_RUN=1 prints the commands only; STEPS=N shortens every Stage-1A fit; JOBS=N runs
# N fits / tests at once here (cores split evenly; GRID=tiny on 2 cores: JOBS=2). Devices
# GPUS x NODES and ARGS as for training (the grid keeps its global batch by accumulation). Rerunning resumes
# unfinished fits and skips tests whose metrics are current. -> results/ablations/<GRID>/table.{md,csv}, <metric>.png
GRID    ?= paper-table4
CELLS   ?=
DRY_RUN ?=
STEPS   ?=
JOBS    ?= 1

.PHONY: ablate

ablate: $(STAMP) ## run an ablation grid (GRID=tiny runs on this CPU; CELLS=..., DRY_RUN=1)
	$(if $(DRY_RUN),,$(if $(filter tiny,$(GRID)),,$(check_shards)))
	$(FLOWMO) ablate run $(GRID) $(if $(CELLS),--cells $(CELLS)) $(if $(filter tiny,$(GRID)),,--gpus $(GPUS) --nodes $(NODES)) \
		$(if $(DRY_RUN),--dry-run) $(if $(STEPS),--steps $(STEPS)) --jobs $(JOBS) $(if $(ARGS),--extra='$(ARGS)') \
		$(if $(filter-out configs/data/imagenet.yaml,$(DATA_CFG)),--extra='-c $(DATA_CFG)')

# ---- model benchmark (src/flowmo/bench/model.py): Stage-1A/1B optimizer steps, encode, decode (31 NFE); figures
# only, rows merged into results/bench/bench.json. PRESET=tiny|cpu-mid|small|lo|hi, PRECISION=fp32|bf16 (autocast),
# COMPILE=1 (torch.compile), PROFILE=1 (time by operator group), SCALING=1 (1A and decode against batch 1..32 and
# half/double image size), COUNT_ONLY=1 (FLOPs/params, no timing; of all presets unless PRESET is given),
# BENCH_ARGS for the rest (e.g. --feature-nets random --iters 10). bench-compare BASE=rev: this tree against rev.
PRESET     ?= tiny
BATCH      ?= 8
PRECISION  ?= fp32
COMPILE    ?=
PROFILE    ?=
SCALING    ?=
COUNT_ONLY ?=
BENCH_ARGS ?=
BASE       ?=

.PHONY: bench bench-compare plan gpu-check

bench-compare: $(STAMP) ## time this tree's model code against BASE=rev on PRESET (alternating runs), print speed-ups
	@test -n "$(BASE)" || { echo "usage: make bench-compare BASE=<git revision> [PRESET=cpu-mid]"; exit 2; }
	$(PY) -m flowmo.bench.compare --base $(BASE) --preset $(PRESET) --batch $(BATCH)

OUT ?= results/gpu-check

gpu-check: $(STAMP) ## on one H100/H200 (< 9 min, hard cap): Lo memory vs `flowmo plan`, ms/step + MFU, SDPA backend, host syncs, 1B, decode, compile -> OUT/{report.md,bench.json}
	$(PY) -m flowmo.bench.gpu_check --out $(OUT) $(GPU_CHECK_ARGS)

plan: $(STAMP) ## predicted peak training memory (flowmo plan) of lo, hi and small: micro-batch, stage, checkpointing
	$(FLOWMO) plan --preset lo hi small --stage 1a --batch 8 --checkpointing none every_4 blocks
	$(FLOWMO) plan --preset lo hi small --stage 1b --batch 4 --checkpointing none blocks

bench: $(STAMP) ## model benchmark: ms/step, img/s, peak memory, FLOP utilisation vs a matmul -> results/bench/bench.json
	$(PY) -m flowmo.bench.model $(if $(COUNT_ONLY),--count-only --preset $(if $(filter command line,$(origin PRESET)),$(PRESET),tiny cpu-mid small lo hi),		--preset $(PRESET) --batch $(BATCH) --precision $(PRECISION) $(if $(COMPILE),--compile) $(if $(PROFILE),--profile) \
		$(if $(SCALING),--scaling)) $(BENCH_ARGS)
