# mcpx developer commands. `make test` and `make demo` work on a fresh machine with Python >= 3.11.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint typecheck pytest demo bench format clean

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements/constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(BIN)/ruff check daemon shim tests demo benchmarks
	$(BIN)/ruff format --check daemon shim tests demo benchmarks

typecheck: venv
	$(BIN)/mypy

pytest: venv
	$(BIN)/pytest

test: lint typecheck pytest

demo: venv
	$(BIN)/python demo/run_demo.py

bench: venv
	$(BIN)/python benchmarks/bench.py

format: venv
	$(BIN)/ruff format daemon shim tests demo benchmarks
	$(BIN)/ruff check --fix daemon shim tests demo benchmarks

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .cache
