# Each target does its own set-up, so that a fresh machine needs nothing but `make X`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export RMSG_DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/reliable_msg

.PHONY: install services migrate check test demo serve clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

services:
	bash scripts/services.sh

migrate: install services
	$(BIN)/reliable-msg migrate

check: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy reliable_msg tests upstream_demo downstream_demo demo

test: install services
	$(BIN)/pytest -q

demo: install services
	$(BIN)/python -m demo

serve: migrate
	$(BIN)/reliable-msg serve

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
