# Two entry points: `make run` (main job) and `make test` (the test suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: run test lint clean

$(BIN)/ablate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	PYTHONWARNINGS=ignore $(BIN)/pip install --quiet -e '.[dev]'  # no build-backend notes
	touch $@

run: $(BIN)/ablate
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc repro

test: $(BIN)/ablate
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/ruff check .
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/ruff format --check .
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/pytest

clean:
	rm -rf $(VENV)
