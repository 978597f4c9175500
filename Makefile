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

# The quick version of every benchmark (under 10 minutes on 2 cores); docs/benchmarks.md has the
# full commands and their results.
bench: setup
	$(BIN)/python benchmarks/preprocess_bench.py --sizes 2000000:16
	$(BIN)/python benchmarks/batch_bench.py --sizes 2000000:8
	$(BIN)/python benchmarks/predictor_bench.py --repeat 500
	$(BIN)/python benchmarks/serve_bench.py --requests 200 --rounds 1
	$(BIN)/python benchmarks/train_bench.py --rows 50000 --epochs 2 --skip-quality
	$(BIN)/python benchmarks/gbdt_bench.py --rows 50000 --rounds 50 --skip-quality
	$(BIN)/python benchmarks/tune_bench.py --overhead --rows 20000
	$(BIN)/python benchmarks/gpu_check.py --device cpu --rows 20000 --epochs 1

lint: setup
	$(BIN)/ruff check platform jobs serve_apps tests benchmarks
	$(BIN)/ruff format --check platform jobs serve_apps tests benchmarks

format: setup
	$(BIN)/ruff check --fix platform jobs serve_apps tests benchmarks
	$(BIN)/ruff format platform jobs serve_apps tests benchmarks

clean:
	rm -rf $(VENV) dcml-store
