# The two commands of the README. Each sets everything up on a fresh machine with Python 3.11.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= out/demo

.PHONY: demo test setup lint

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
