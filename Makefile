# The README's two commands are `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help install run test lint bench clean

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the project with its test extras (idempotent)

run: $(STAMP) ## the embedded stack: broker, worker, chDB, synthetic traffic, live segment sizes (Ctrl-C stops)
	$(BIN)/pipeline dev

lint: $(STAMP) ## ruff and mypy
	$(BIN)/ruff check pipeline tests benchmarks
	$(BIN)/mypy

test: $(STAMP) lint ## the whole suite, ruff and mypy included
	$(BIN)/python -m pytest

bench: $(STAMP) ## run the benchmarks (figures printed and written to benchmarks/results/)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	$(BIN)/python benchmarks/bench_decode.py
	$(BIN)/python benchmarks/bench_clickhouse.py
	$(BIN)/python benchmarks/bench_profiles.py --recovery 100000
	$(BIN)/python benchmarks/bench_pipeline.py
	$(BIN)/python benchmarks/bench_latency.py
	$(BIN)/python benchmarks/bench_scaling.py

clean: ## remove the virtualenv and local data
	rm -rf $(VENV) var
