# The two commands of the README:  make serve  (install + start refine on the embedded default model)
#                                  make test   (install + run the whole test suite)
# Pass flags through:  make serve ARGS="--port 9000"   make test PYTEST_ARGS="-k metrics"
VENV := .venv
INSTALLED := $(VENV)/.refine-installed

.PHONY: serve test install

$(INSTALLED): pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $@

install: $(INSTALLED)

serve: $(INSTALLED)
	$(VENV)/bin/refine $(ARGS)

test: $(INSTALLED)
	$(VENV)/bin/pytest $(PYTEST_ARGS)
