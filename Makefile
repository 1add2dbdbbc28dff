# Tessera: the two commands a fresh machine needs are `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= ./var
PORT ?= 7790
HOST ?= 127.0.0.1
export TESSERA_KEY_PASSPHRASE_FILE ?=

.PHONY: run test lint bench fuzz reliability clean venv dev

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

venv: $(VENV)/.installed
dev: $(VENV)/.dev-installed

# Initialises ./var (SQLite, vendor key, TLS CA + server certificate, first admin token)
# on first use and serves HTTPS. Never waits for input. "First use" means the directory
# holds neither tessera.toml nor any key or database: a directory that lost only its
# tessera.toml is reported, never initialized over (that would replace the vendor key).
INIT_MARKERS := tessera.toml tessera.db vendor.key vendor.pub tls/ca.pem tls/ca.key secrets/pepper
run: $(VENV)/.installed
	@found=; for f in $(INIT_MARKERS); do [ -e "$(DATA_DIR)/$$f" ] && found="$$found $$f"; done; \
	if [ -z "$$found" ]; then $(BIN)/tessera server init --data-dir $(DATA_DIR) || exit 1; \
	elif [ ! -f "$(DATA_DIR)/tessera.toml" ]; then \
		echo "error: $(DATA_DIR) holds$$found but no tessera.toml: restore it (not initializing over existing keys)" >&2; exit 2; \
	fi
	$(BIN)/tessera server run --data-dir $(DATA_DIR) --host $(HOST) --port $(PORT)

# compileall: with PYTHONDONTWRITEBYTECODE set (as on the CI machines) Python never writes
# src/'s bytecode, so each of the suite's ~1,000 `tessera` processes compiled every module
# it imported anew (about 40 ms of CPU each); compiled once here, they are only read.
test: $(VENV)/.dev-installed
	$(BIN)/python -m compileall -q src
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy --strict src/tessera/core src/tessera/agent
	$(BIN)/mypy src/tessera/server src/tessera/cli bench
	$(BIN)/python -m pytest -n 2 --durations=15 $(PYTEST_ARGS)

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy --strict src/tessera/core src/tessera/agent
	$(BIN)/mypy src/tessera/server src/tessera/cli bench

bench: $(VENV)/.dev-installed
	$(BIN)/python -m bench $(if $(QUICK),--quick,)

# Every property/fuzz test (the `fuzz` marker: each hypothesis test gets it in
# tests/conftest.py) with many more examples; schemathesis with TESSERA_API_FUZZ_EXAMPLES
# per API operation. Both overridable: `make fuzz TESSERA_FUZZ_EXAMPLES=500`.
TESSERA_FUZZ_EXAMPLES ?= 20000
TESSERA_API_FUZZ_EXAMPLES ?= 1000
fuzz: $(VENV)/.dev-installed
	TESSERA_FUZZ_EXAMPLES=$(TESSERA_FUZZ_EXAMPLES) TESSERA_API_FUZZ_EXAMPLES=$(TESSERA_API_FUZZ_EXAMPLES) \
		$(BIN)/python -m pytest -n 2 -m fuzz --timeout 0 tests $(PYTEST_ARGS)

# The reliability tests (kills, restarts, outages, races; marker `reliability`) scaled up:
# 1000 agent kills, 30 server kills per backend, 20 database outages. Set
# TESSERA_TEST_POSTGRES_URL to include PostgreSQL.
TESSERA_RELIABILITY_SCALE ?= 10
reliability: $(VENV)/.dev-installed
	TESSERA_RELIABILITY_SCALE=$(TESSERA_RELIABILITY_SCALE) \
		$(BIN)/python -m pytest -n 2 -m "reliability or slow" --timeout 1800 tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
