# Set-up and everyday commands. `make install` then `make test` on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
# torch on a machine without an NVIDIA driver: the CPU build, so pip never pulls several GB of
# CUDA wheels. Its `+cpu` version exists only as CPU wheels: in a local wheel folder (find-links)
# or on PyTorch's CPU index, which pip is given only when it cannot find the wheel without one.
TORCH_VERSION := 2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu

.PHONY: install torch-args test lint format demo demo-images bench clean

install:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	@args="$$($(MAKE) -s --no-print-directory torch-args)" || exit 1; \
	if [ -z "$$args" ]; then \
		echo "NVIDIA driver found: pip picks the torch build (CUDA on Linux)"; \
	else \
		echo "pip install $$args"; \
		$(BIN)/pip install $$args; \
	fi
	$(BIN)/pip install -e ".[dev]"

# pip's arguments for torch (`make -s torch-args`, tests/test_install.py): none with an NVIDIA
# driver; on macOS (no CUDA builds there) the release; else the CPU build, from a local wheel
# where pip finds one without an index, otherwise from TORCH_CPU_INDEX.
torch-args:
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		:; \
	elif [ "$$(uname -s)" = Darwin ]; then \
		echo "torch==$(TORCH_VERSION)"; \
	elif $(PIP) install --dry-run --quiet --no-index --no-deps --ignore-installed \
			"torch==$(TORCH_VERSION)+cpu" >/dev/null 2>&1; then \
		echo "torch==$(TORCH_VERSION)+cpu"; \
	else \
		echo "torch==$(TORCH_VERSION)+cpu --extra-index-url $(TORCH_CPU_INDEX)"; \
	fi

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

# The scenes drawn as pictures -> random-ViT features -> XE -> captions of new pictures.
demo-images:
	$(BIN)/python recipes/demo_images.py

bench:
	@for f in benchmarks/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
