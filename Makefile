# The two commands of the README. Each sets everything up on a fresh machine with Python 3.11.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out/demo

.PHONY: demo test setup lint bench-setup

$(BIN)/midas-data: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned to the CPU build on this machine's disk; the project's range accepts it.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[cpu,dev]'
	touch $@

setup: $(BIN)/midas-data

demo: setup
	$(BIN)/midas-data demo --out $(OUT)

# `-m "not gpu"` replaces the fast default selection in pyproject.toml (which leaves out
# the crash, ddp, slow and gpu markers): CI runs everything but the GPU tests.
test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not gpu"

lint: setup
	$(BIN)/ruff check .

# The peers the benchmarks compare against (MosaicML Streaming, LitData), beside the CPU torch:
# the peers without their dependencies, then what they import (the [bench] extra) with torch
# and numpy held at the installed versions; fails if either changed or a peer does not read
# back what it wrote (bench/peers.py). docs/BENCHMARKS.md says why.
bench-setup: setup
	$(BIN)/python -m pip freeze | grep -iE '^(torch|numpy)==' > $(VENV)/held.txt
	$(BIN)/python -m pip install -q -c $(VENV)/held.txt -e '.[cpu,dev,bench]'
	$(BIN)/python -m pip install -q --no-deps -r bench/requirements-peers.txt
	$(BIN)/python -m pip freeze | grep -iE '^(torch|numpy)==' | diff $(VENV)/held.txt -
	$(BIN)/python bench/peers.py
