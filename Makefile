# Two entry points, each from a fresh clone:  make demo   and   make test
PYTHON ?= python3
VENV   ?= .venv
# The CPU build of torch; on a GPU host use your CUDA build: make demo TORCH_SPEC="torch"
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test lint bench soak clean

# Two stamps: the package with what it needs to run (the demo), then the tools to test and lint it.
INSTALLED := $(VENV)/.installed
INSTALLED_DEV := $(VENV)/.installed-dev

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e .
	touch $@

$(INSTALLED_DEV): $(INSTALLED)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(INSTALLED)

demo: install  # --overwrite: a second `make demo` replaces out/demo/ instead of refusing it
	$(BIN)/shmbroker run configs/demo.yaml --overwrite

test: $(INSTALLED_DEV)
	$(BIN)/python -m pytest -q

lint: $(INSTALLED_DEV)
	$(BIN)/ruff check broker workers shmbroker tests benchmarks
	$(BIN)/mypy

bench: install  # about 15 minutes; results and plots in benchmarks/results/
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/rate.py
	$(BIN)/python benchmarks/handoff.py
	$(BIN)/python benchmarks/pipeline.py
	$(BIN)/python benchmarks/scaling.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/gpu.py
	$(BIN)/python benchmarks/pipeline.py --device cuda

soak: $(INSTALLED_DEV)
	$(BIN)/python -m pytest -q -m soak -p no:cacheprovider

clean:
	rm -rf $(VENV) build *.egg-info
