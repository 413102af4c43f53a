# mcpx developer commands. `make test` and `make demo` work on a fresh machine with Python >= 3.11.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The daemon's hot path compiled with mypyc (mypyc_build.py), built in build/mypyc whenever a source changes.
# `make compile` puts the compiled modules next to the sources (they are imported first), `make pure` takes them
# away again; `make test` runs the suite both ways, compiled first, and leaves the plain sources in place.
COMPILED := build/mypyc/.built
DAEMON_SOURCES := $(shell find daemon/mcpx -name '*.py')

.PHONY: venv compile pure test lint typecheck pytest pytest-compiled pytest-pure demo bench format clean

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# (an editable install compiles nothing: `make compile` does, in place; so its build needs no mypyc)
	MCPX_COMPILE=never $(BIN)/pip install --quiet -c requirements/constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

$(COMPILED): $(STAMP) mypyc_build.py $(DAEMON_SOURCES)
	$(BIN)/python mypyc_build.py --build
	touch $(COMPILED)

compile: $(COMPILED)
	$(BIN)/python mypyc_build.py --install

pure: venv
	$(BIN)/python mypyc_build.py --clean

lint: venv
	$(BIN)/ruff check daemon shim tests demo benchmarks mypyc_build.py hatch_build.py
	$(BIN)/ruff format --check daemon shim tests demo benchmarks mypyc_build.py hatch_build.py

typecheck: venv
	$(BIN)/mypy

# Whatever is in place: the plain sources, or the compiled modules after `make compile`.
pytest: venv
	$(BIN)/pytest

pytest-compiled: compile
	MCPX_EXPECT_COMPILED=1 $(BIN)/pytest

pytest-pure: pure
	$(BIN)/pytest

test: lint typecheck pytest-compiled pytest-pure

demo: venv
	$(BIN)/python demo/run_demo.py

bench: compile
	$(BIN)/python benchmarks/bench.py

format: venv
	$(BIN)/ruff format daemon shim tests demo benchmarks mypyc_build.py hatch_build.py
	$(BIN)/ruff check --fix daemon shim tests demo benchmarks mypyc_build.py hatch_build.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .cache build
	find daemon -name '*.so' -delete
