# Entry points for developers and CI. `make run` and `make test` set everything up themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
BUF_VERSION := 1.75.0
PROTOS := $(shell find protos -name '*.proto')

.PHONY: install proto run test check lint typecheck buflint unit bench soak clean

install: $(VENV)/.installed common/gen/.stamp

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# Generated code is not committed: it is rebuilt whenever a proto or the generator changes.
common/gen/.stamp: $(VENV)/.installed $(PROTOS) protos/generate.py
	$(BIN)/python protos/generate.py
	touch $@

proto: $(VENV)/.installed
	$(BIN)/python protos/generate.py
	touch common/gen/.stamp

run: install
	$(BIN)/python -m publisher.demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

buflint:
	cd protos && npx --yes @bufbuild/buf@$(BUF_VERSION) lint

check: lint typecheck buflint

test: install check
	$(BIN)/python -m pytest

# Not part of `make test`: the full kill soak (2,000 events) and the benchmark.
soak: install
	$(BIN)/python -m tests.soak

bench: install
	$(BIN)/python -m tests.bench

clean:
	rm -rf $(VENV) common/gen .pytest_cache .mypy_cache .ruff_cache
