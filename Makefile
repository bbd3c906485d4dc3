# moe_lab: `make demo` trains the main job on the built-in data; `make test` runs the tests.
# Both create .venv on first use. On machines without CUDA the CPU build of torch is
# installed first, so pip does not pull a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_CPU_VERSION ?= 2.13.0
PYTEST_ARGS ?=
# two pytest workers: the Ray tests in two groups, each group in turn on one worker, the rest
# balanced over both (tests/conftest.py); PYTEST_WORKERS=0 runs everything in this process
PYTEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadgroup)

.PHONY: install test test-fast demo bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA machine: installing the default torch build"; \
	else \
		echo "no CUDA: installing the CPU build of torch $(TORCH_CPU_VERSION)"; \
		$(PY) -m pip install -q "torch==$(TORCH_CPU_VERSION)" || \
		$(PY) -m pip install -q "torch==$(TORCH_CPU_VERSION)" --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(XDIST) --durations=30 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/moe-lab train --output-dir outputs/demo

bench: $(STAMP)
	$(PY) benchmarks/moe_layer.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
