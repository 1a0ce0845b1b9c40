PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BASE := $(VENV)/.base
DEMO_STAMP := $(VENV)/.demo
DEV_STAMP := $(VENV)/.dev

.PHONY: demo test lint bench clean

# The venv alone; each target below installs only what it needs into it.
$(BASE):
	$(PYTHON) -m venv $(VENV)
	touch $(BASE)

# The demo needs the package and scikit-learn, nothing else.
$(DEMO_STAMP): $(BASE) pyproject.toml
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[demo]'
	touch $(DEMO_STAMP)

# Tests and lint need the dev tools and every optional driver.
$(DEV_STAMP): $(BASE) pyproject.toml
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(DEV_STAMP)

# The dashboard's browser test drives Debian's Chromium (no browser download).
BROWSER := /usr/bin/chromium
$(BROWSER):
	command -v apt-get >/dev/null && { [ "$$(id -u)" = 0 ] && SUDO= || SUDO=sudo; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; }

demo: $(DEMO_STAMP)
	$(BIN)/taskspace demo

test: lint $(BROWSER)
	$(BIN)/python -m pytest -q

lint: $(DEV_STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples
	$(BIN)/mypy

bench: $(DEV_STAMP)
	$(BIN)/python -m bench queue --backend sqlite

clean:
	rm -rf $(VENV) .taskspace .pytest_cache .mypy_cache .ruff_cache
