# The README's two commands: `make run` and `make test`. Both set up .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/breast_cancer.yaml

.PHONY: setup run test lint format bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

run: setup
	$(BIN)/dcml run $(CONFIG)

test: setup
	$(BIN)/python -m pytest -q -n 2 --durations=15

bench: setup
	$(BIN)/python benchmarks/preprocess_bench.py --sizes 500000:8,2000000:16,5000000:32,5000000:64

lint: setup
	$(BIN)/ruff check platform jobs serve_apps tests benchmarks
	$(BIN)/ruff format --check platform jobs serve_apps tests benchmarks

format: setup
	$(BIN)/ruff check --fix platform jobs serve_apps tests benchmarks
	$(BIN)/ruff format platform jobs serve_apps tests benchmarks

clean:
	rm -rf $(VENV) dcml-store
