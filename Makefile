# The two commands that lead the README: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
ARGS ?=
# `make serve` passes --model/--host/--port only for MODEL/HOST/PORT given on make's command line
# (`make serve MODEL=x PORT=9000 HOST=0.0.0.0`); otherwise OVIS2_* variables and ovis2-serve's defaults apply
# (the demo model on 127.0.0.1:8000). Variables from the environment are not used: shells export HOST.
given = $(if $(and $(filter command line,$(origin $(1))),$($(1))),--$(2) $($(1)))
SERVE_FLAGS = $(strip $(call given,MODEL,model) $(call given,HOST,host) $(call given,PORT,port))

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
	$(BIN)/ovis2-serve $(SERVE_FLAGS) $(ARGS)

lint: install
	$(BIN)/ruff check ovis2 server bench tests
	$(BIN)/ruff format --check ovis2 server bench tests

test: lint
	$(BIN)/python -m pytest -q $(ARGS)

bench: install
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
