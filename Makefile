# The two commands that lead the README: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
MODEL ?= demo
HOST ?= 0.0.0.0
PORT ?= 8000
ARGS ?=

.PHONY: serve test lint install install-test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "$(TORCH_PIN)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

serve: install
	$(BIN)/ovis2-serve --model $(MODEL) --host $(HOST) --port $(PORT) $(ARGS)

lint: install
	$(BIN)/ruff check ovis2 server bench tests

test: lint
	$(BIN)/python -m pytest -q $(ARGS)

bench: install
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
