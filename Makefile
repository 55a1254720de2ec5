# nanoserve — the two commands on a fresh clone are `make serve` and `make test`.
# TORCH is the torch requirement installed into .venv before the project; override it for
# another build, e.g. `make serve TORCH='torch>=2.5'`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: help venv install install-test install-bench pull serve test test-all check format bench clean

help:
	@echo "make serve    set up .venv, prepare the default model, serve it on $(HOST):$(PORT)"
	@echo "make test     set up .venv with the test extra, prepare the default model, run the fast tests"
	@echo "make test-all the whole suite, slow tests included"
	@echo "make check    ruff format --check, ruff check and the fast tests"
	@echo "make bench    the benchmarks in bench/ (ratios against baselines run in the same invocation)"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

$(VENV)/.installed-bench: pyproject.toml $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[bench]"
	touch $@

venv install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
install-bench: $(VENV)/.installed-bench

pull: $(VENV)/.installed
	$(VENV)/bin/nanoserve pull

serve: pull
	$(VENV)/bin/nanoserve serve --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-test pull
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: $(VENV)/.installed-test pull
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

check: $(VENV)/.installed-test
	$(VENV)/bin/ruff format --check server model tests bench
	$(VENV)/bin/ruff check server model tests bench
	$(PY) -m pytest $(PYTEST_ARGS)

format: $(VENV)/.installed-test
	$(VENV)/bin/ruff format server model tests bench
	$(VENV)/bin/ruff check --fix server model tests bench

bench: $(VENV)/.installed-bench $(VENV)/.installed-test pull
	$(PY) bench/http_bench.py
	$(PY) bench/engine_bench.py
	$(PY) bench/serve_bench.py --launch

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
