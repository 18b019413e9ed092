# The two commands a new user types (see README.md). Both create .venv/ at the repo root if needed.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install repro test clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## Install, then run the whole embedded pipeline (dvc repro) and say where the report is.
repro: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	@echo "Report: reports/results.md (notebook: reports/results.ipynb). Compare runs: .venv/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db"

## Install, then run the test suite (the same command CI runs).
test: $(STAMP)
	$(BIN)/python -m pytest -q -ra
