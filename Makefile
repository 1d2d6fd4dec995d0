# Two commands: `make run` (the main job) and `make test` (everything CI checks).
# Both bootstrap themselves: a .venv is created and the project installed when missing or stale.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: run test lint typecheck pytest bench clean

$(STAMP): pyproject.toml hatch_build.py src/sidechain/sse.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -c 'import sidechain.sse as s; assert s._COMPILED, "mypyc build of sidechain.sse not in use"'
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

# On a terminal: a local gateway (embedded echo model) and `sidechain chat` against it, stopped on exit.
# Without a terminal (CI, pipes): the scripted demo, a main turn with a btw asked while it streams.
run: $(STAMP)
	@if [ -t 0 ] && [ -t 1 ]; then $(BIN)/sidechain chat --with-gateway; else $(BIN)/sidechain demo; fi

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy --strict src

pytest: $(STAMP)
	PYTHONASYNCIODEBUG=1 $(BIN)/python -X dev -W error -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

bench: $(BENCH_STAMP)
	$(BIN)/python bench/decode.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
