# ImageShare: `make run` starts the server with embedded defaults, `make test` runs the suite.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
PYTHON ?= python3
# pip's notes about index locations this machine's configuration names but lacks are noise.
QUIET_PIP = { grep -v -e '^WARNING: Location' -e '^$$' || true; }
VENV := .venv
BIN := $(VENV)/bin
# make run's data folder: DATA_DIR=..., else IMAGESHARE_DATA_DIR from the environment, else ./var
DATA_DIR ?= $(or $(IMAGESHARE_DATA_DIR),./var)

.PHONY: install run test peers lint bench bench-viewer bench-deid bench-exchange bench-blobstore bench-scale bench-upload bench-encryption clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "ImageShare needs Python >= 3.11 (set PYTHON=...)"; exit 1; }
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
		rm -rf $(VENV); \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null; \
		else echo "install python3-venv (Debian) and run again"; exit 1; fi; \
		$(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip 2>&1 | $(QUIET_PIP)

# `make install` (and `make run`) install only what running ImageShare needs; the test tools
# (pytest, Playwright, the de-identification peers, ruff...) come with `make test`.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	PYTHONWARNINGS=ignore $(BIN)/pip install -q -e . 2>&1 | $(QUIET_PIP)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	PYTHONWARNINGS=ignore $(BIN)/pip install -q -e '.[test]' 2>&1 | $(QUIET_PIP)
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/imageshare serve --data-dir $(DATA_DIR)

# The layering (import-linter contracts in pyproject.toml) and the types (mypy, cached in
# .mypy_cache) are checked before the tests run; any failure fails `make test`.
test: $(VENV)/.installed-test
	$(BIN)/ruff check imageshare tests bench
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 3 --dist loadfile tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

# The real peers of the interop and browser tests (Debian packages; needs root).
peers:
	.ci/peers

lint: $(VENV)/.installed-test
	$(BIN)/ruff check imageshare tests bench
	$(BIN)/lint-imports
	$(BIN)/mypy

bench: $(VENV)/.installed-test
	$(BIN)/python bench/run.py

bench-viewer: $(VENV)/.installed-test
	$(BIN)/python bench/viewer.py

bench-deid: $(VENV)/.installed-test
	$(BIN)/python bench/deidentify.py

bench-exchange: $(VENV)/.installed-test
	$(BIN)/python bench/exchange.py

bench-blobstore: $(VENV)/.installed-test
	$(BIN)/python bench/blobstore.py

bench-encryption: $(VENV)/.installed-test
	$(BIN)/python bench/encryption.py

bench-scale: $(VENV)/.installed-test
	$(BIN)/python bench/scale.py

bench-upload: $(VENV)/.installed-test
	$(BIN)/python bench/upload.py

clean:
	rm -rf $(VENV) var
