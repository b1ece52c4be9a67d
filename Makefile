# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
# torch is pinned because a bare `torch` requirement pulls a multi-GB CUDA build.
# Override for a GPU machine, e.g. `make TORCH_SPEC="torch==2.13.0 --index-url ..." install`.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test bench clean

$(BIN)/vlmkit: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(BIN)/vlmkit

install: $(BIN)/vlmkit

demo: install
	$(BIN)/vlmkit demo --out runs/demo

test: install
	$(BIN)/python -m pytest tests

bench: install
	$(BIN)/python bench/demo_budget.py

clean:
	rm -rf runs .pytest_cache
