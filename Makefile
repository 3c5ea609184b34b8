# Two entry points for a fresh machine with Python 3.11 and pip:
#   make demo   set up .venv, make sample videos, shard them, train with 2 processes on CPU, evaluate
#   make test   set up .venv and run the whole test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,onnx]'
	touch $@

demo: setup
	$(BIN)/python -m preprocess.synth $(DEMO)/data --classes 4 --clips 24
	$(BIN)/python -m preprocess.shard $(DEMO)/data $(DEMO)/shards --shard-size 16
	$(BIN)/torchrun --standalone --nproc_per_node=2 -m dist_train --shards $(DEMO)/shards --out $(DEMO)/runs/demo \
		--epochs 8 --batch-size 4 --img-size 64 --no-hflip --wandb offline
	$(BIN)/python -m dist_train.evaluate --checkpoint $(DEMO)/runs/demo/best.pt --shards $(DEMO)/shards --out $(DEMO)/runs/demo/eval

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m bench

clean:
	rm -rf $(DEMO) .pytest_cache
