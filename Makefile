# Set-up and checks. `make demo` and `make test` each create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The torch build pip finds for this platform; pinned here to the release tested with headstart.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test lint typecheck bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[test,lite,retrieval,serve,export,audit]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/headstart demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports

typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy

# Two pytest-xdist workers, each file kept on one (module fixtures are shared within a file), then the int8 file in
# a process of its own: under xdist its ants/bees agreement check fell to 0.967 in two of three runs (cause not found).
test: lint typecheck
	$(VENV)/bin/pytest -q -n 2 --dist loadfile --ignore tests/test_quantize.py
	$(VENV)/bin/pytest -q tests/test_quantize.py

bench: $(VENV)/.installed
	$(PY) benchmarks/embed_throughput.py
	$(PY) benchmarks/extract_vs_tutorial.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .import_linter_cache
