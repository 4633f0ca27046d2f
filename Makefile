# Each target does its own set-up, so that a fresh machine needs nothing but `make X`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: install services browser migrate check test demo soak serve clean bench

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

services:
	bash scripts/services.sh

# Debian's chromium for the dashboard's browser test, installed only when missing.
browser:
	bash scripts/browser.sh

migrate: install services
	$(BIN)/reliable-msg migrate

check: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy reliable_msg tests upstream_demo downstream_demo demo soak

test: install services browser
	$(BIN)/pytest -q

demo: install services
	$(BIN)/python -m demo

# The long fault-injection run: 5,000 messages, 24 environment faults and the crashes
# (SOAK_ARGS="--messages 20000 --seed 3" to change it; --help for every option).
soak: install services
	$(BIN)/python -m soak $(SOAK_ARGS)

serve: migrate
	$(BIN)/reliable-msg serve

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info

bench: install services
	$(BIN)/reliable-msg bench
