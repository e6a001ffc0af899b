# The two commands of the README:  make serve  (install + start refine on the embedded default model)
#                                  make test   (install + run the whole test suite)
# The suite in two halves:  make test-unit    (tests/unit: fakes only, no engine, seconds)
#                           make test-engine  (tests/engine: the real vLLM server, started once)
# Lint, format and type checks alone:  make lint  (make test runs it first)
# Pass flags through:  make serve ARGS="--port 9000"   make test PYTEST_ARGS="-k metrics"
VENV := .venv
INSTALLED := $(VENV)/.refine-installed

.PHONY: serve test test-unit test-engine lint install

$(INSTALLED): pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $@

install: $(INSTALLED)

serve: $(INSTALLED)
	$(VENV)/bin/refine $(ARGS)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python scripts/typecheck.py

test: lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-unit: $(INSTALLED)
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

test-engine: $(INSTALLED)
	$(VENV)/bin/pytest tests/engine $(PYTEST_ARGS)
