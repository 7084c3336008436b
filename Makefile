# The two set-up commands of the README: `make run` and `make test`. Each creates .venv and
# installs what it needs first (only again when pyproject.toml changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench-queue bench-generate bench-bot bench-speed

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-run: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -e '.[test]'
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(BIN)/ponybot run

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(VENV)/.installed-test
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench-queue: $(VENV)/.installed-test
	$(BIN)/python benchmarks/queue_bench.py

bench-generate: $(VENV)/.installed-test
	$(BIN)/python benchmarks/generate_bench.py --tiny

# speed (issue #6) on the CPU with the tiny model; on a GPU drop --tiny (see benchmarks/README.md)
bench-speed: $(VENV)/.installed-test
	$(BIN)/python benchmarks/bench_latency.py --tiny --fast-mode
	$(BIN)/python benchmarks/bench_throughput.py --tiny
	$(BIN)/python benchmarks/bench_bot_path.py --tiny
