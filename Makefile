# llama-orch home — `make test` and `make demo` set everything up on a fresh machine.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: test demo lint unit features bench schemas clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip >/dev/null 2>&1 || true
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check reconciler plugins state schemas tests features benchmarks examples
	$(BIN)/ruff format --check reconciler plugins state schemas tests features benchmarks
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q

features: $(STAMP)
	$(BIN)/behave --format progress features

test: lint unit features

demo: $(STAMP)
	$(BIN)/python examples/01-simulated-workstation/demo.py

bench: $(STAMP)
	$(BIN)/python -m benchmarks

schemas: $(STAMP)
	$(BIN)/orchctl schemas

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache demo-run bench-results
