# Set-up and everyday commands. `make install` then `make test` on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On a machine without an NVIDIA driver, pin the CPU build of torch so pip never pulls CUDA wheels.
TORCH_CPU := torch==2.13.0

.PHONY: install test lint format demo bench clean

install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "NVIDIA driver found: keeping the torch build pip picks (CUDA)"; \
	else \
		echo "no NVIDIA driver: installing the CPU build $(TORCH_CPU)"; \
		$(BIN)/pip install "$(TORCH_CPU)"; \
	fi
	$(BIN)/pip install -e ".[dev]"

# Test files run in parallel (one worker per core; a file's tests stay on one worker so that its
# module fixtures are built once).
test:
	$(BIN)/python -m pytest -q -n auto --dist loadfile tests

LINT_DIRS := $(wildcard src tests recipes examples benchmarks)

lint:
	$(BIN)/ruff check $(LINT_DIRS)
	$(BIN)/ruff format --check $(LINT_DIRS)

format:
	$(BIN)/ruff format $(LINT_DIRS)
	$(BIN)/ruff check --fix $(LINT_DIRS)

demo:
	$(BIN)/python recipes/demo.py

bench:
	@for f in benchmarks/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
