# ImageShare: `make run` starts the server with embedded defaults, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA_DIR ?= ./var

.PHONY: install run test lint bench bench-viewer bench-deid bench-exchange bench-blobstore clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "ImageShare needs Python >= 3.11 (set PYTHON=...)"; exit 1; }
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
		rm -rf $(VENV); \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null; \
		else echo "install python3-venv (Debian) and run again"; exit 1; fi; \
		$(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/imageshare serve --data-dir $(DATA_DIR)

test: install
	$(BIN)/ruff check imageshare tests bench
	$(BIN)/python -m pytest -q -p no:cacheprovider tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

lint: install
	$(BIN)/ruff check imageshare tests bench

bench: install
	$(BIN)/python bench/run.py

bench-viewer: install
	$(BIN)/python bench/viewer.py

bench-deid: install
	$(BIN)/python bench/deidentify.py

bench-exchange: install
	$(BIN)/python bench/exchange.py

bench-blobstore: install
	$(BIN)/python bench/blobstore.py

clean:
	rm -rf $(VENV) var
