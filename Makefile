# The two quick-start commands: `make demo` and `make test`. Both install what they need.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test lint bench install postgres-server

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/relay demo

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint postgres-server
	$(BIN)/python -m pytest

# The PostgreSQL server binaries the journal tests start a server from: Debian's
# postgresql-15 package, installed with apt-get when missing and run as root.
postgres-server: $(BIN)/.installed
	$(BIN)/python -m tests.support.postgres_install

bench: $(BIN)/.installed
	$(BIN)/python -m benchmarks.run_all
