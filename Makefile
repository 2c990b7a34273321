# Two commands from a fresh clone, with nothing but Python 3.11+ and make:
#   make demo   - start the embedded PostgreSQL, migrate, seed, and show isolation live
#   make test   - run the test suite (on its own throw-away embedded server)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-soak bench bench-smoke clean

$(BIN)/rtv-db: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(BIN)/rtv-db
	$(BIN)/rtv-db demo

test: $(BIN)/rtv-db
	$(BIN)/python -m pytest

test-soak: $(BIN)/rtv-db
	$(BIN)/python -m pytest -m soak

clean:
	-$(BIN)/rtv-db server stop
	rm -rf $(VENV) .pytest_cache .hypothesis
