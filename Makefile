# Only Python 3.11+ and make are assumed: no Docker, no system Redis.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/failfirst chaos run demo

test: $(STAMP)
	$(BIN)/ruff check failfirst tests
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check failfirst tests

# Several minutes: every case beside its baseline. bench.json is replaced only by a complete run.
bench: $(STAMP)
	$(BIN)/failfirst bench --json > bench.json.tmp || { rm -f bench.json.tmp; exit 1; }
	mv bench.json.tmp bench.json
	$(BIN)/failfirst bench --from bench.json

clean:
	-$(BIN)/failfirst down
	rm -rf $(VENV) .failfirst .pytest_cache .ruff_cache
