# The two commands: `make demo` and `make test`. Both set everything up first and are idempotent.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.modellego-installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data demo test test-all lint bench gpu-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,graph,timm,export]'
	@touch $(STAMP)

# Debian's dataset-fashion-mnist (real, 70k images); skipped when present or when apt is not usable.
data:
	@if [ -f $(FASHION_MNIST) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } || \
	  echo "warning: could not install dataset-fashion-mnist"; \
	else echo "note: Fashion-MNIST is absent and apt is not usable (run as root: apt-get install dataset-fashion-mnist)"; fi

demo: setup data
	$(BIN)/modellego demo

test: setup data lint
	$(BIN)/python -m pytest -q

# The lint the code is held to (pyproject.toml's [tool.ruff]); part of `make test`.
lint: setup
	$(BIN)/ruff check src tests benchmarks

# Everything, the slow checks too (every torchvision builder through the whole chain: about an hour on 2 cores).
test-all: setup data
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: setup data
	$(BIN)/python benchmarks/contributions.py

# On a machine with a GPU: the chain on cuda against the CPU (same samples, masks, accuracies), then the throughput
# table on the GPU. DEVICE=cuda:1 picks another GPU.
DEVICE ?= cuda
gpu-check: setup data
	$(BIN)/python benchmarks/gpu_check.py --device $(DEVICE)
	$(BIN)/python benchmarks/throughput.py --device $(DEVICE) --precisions fp32,bf16 --no-agreement

clean:
	rm -rf runs .pytest_cache .hypothesis
