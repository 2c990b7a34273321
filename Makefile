# Two commands from a fresh clone, with nothing but Python 3.11+ and make:
#   make demo   - start the embedded PostgreSQL, migrate, seed, and show isolation live
#   make test   - run the test suite (on its own throw-away embedded server)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test test-citus test-soak bench bench-smoke bench-search clean

$(BIN)/rtv-db: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(BIN)/rtv-db
	$(BIN)/rtv-db demo

test: $(BIN)/rtv-db
	$(BIN)/python -m pytest

# The Citus tests and the isolation suite on a real 3-node Citus cluster: CITUS_URL, or (as root)
# one stood up from ../shared/citus/cluster.sh (CITUS_DIR overrides) with a fresh database.
test-citus: $(BIN)/rtv-db
	PYTHON_BIN=$(BIN)/python bash .ci/test-citus

test-soak: $(BIN)/rtv-db
	$(BIN)/python -m pytest -m soak

# Benchmarks (bench/): its own throw-away embedded server; results in docs/benchmarks/.
# BENCH_ARGS="--database-url postgresql://..." runs against another server (superuser URL).
# The bench extra (the peer libraries of bench/peers.py) on top of dev, once per pyproject.toml change.
$(VENV)/.bench-extra: $(BIN)/rtv-db pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	touch $@

bench: $(VENV)/.bench-extra
	PYTHONPATH=src:. $(BIN)/python -m bench $(BENCH_ARGS)

# Tiny sizes, well under a minute: checks the benchmark runs (results in build/bench-smoke/).
bench-smoke: $(VENV)/.bench-extra
	PYTHONPATH=src:. $(BIN)/python -m bench --smoke $(BENCH_ARGS)
	PYTHONPATH=src:. $(BIN)/python -m bench.search --smoke --no-progress $(BENCH_ARGS)

# Similarity search (issue 14): 1,000 tenants x 200 chunks + one of 100,000, rtv-db against plain
# pgvector's HNSW over all tenants and an exact scan; results in docs/benchmarks/search.md, .json.
bench-search: $(BIN)/rtv-db
	PYTHONPATH=src:. $(BIN)/python -m bench.search $(BENCH_ARGS)

clean:
	-$(BIN)/rtv-db server stop
	rm -rf $(VENV) .pytest_cache .hypothesis
