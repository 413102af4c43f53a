# mcpx developer commands. `make test` and `make demo` work on a fresh machine with Python >= 3.11.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# An experiment: the daemon's hot path compiled with mypyc next to its sources (mypyc_build.py), again whenever a
# source changes. Nothing depends on it: tests, demo and benchmark run whatever is in place.
COMPILED := build/.compiled
DAEMON_SOURCES := $(shell find daemon/mcpx -name '*.py')

.PHONY: venv compile pure test lint typecheck pytest demo bench format clean

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements/constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

$(COMPILED): $(STAMP) mypyc_build.py $(DAEMON_SOURCES)
	$(BIN)/python mypyc_build.py --inplace
	mkdir -p build && touch $(COMPILED)

compile: $(COMPILED)

# Back to the plain sources (the daemon runs them as they are; `make compile` compiles them again).
pure: venv
	$(BIN)/python mypyc_build.py --clean
	rm -f $(COMPILED)

lint: venv
	$(BIN)/ruff check daemon shim tests demo benchmarks mypyc_build.py
	$(BIN)/ruff format --check daemon shim tests demo benchmarks mypyc_build.py

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
	$(BIN)/ruff format daemon shim tests demo benchmarks mypyc_build.py
	$(BIN)/ruff check --fix daemon shim tests demo benchmarks mypyc_build.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .cache build
	find daemon -name '*.so' -delete
