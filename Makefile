# Two commands: `make run` (the main job) and `make test` (everything CI checks).
# Both bootstrap themselves: a .venv is created and the project installed when missing or stale.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: run test lint typecheck pytest bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	touch $(BENCH_STAMP)

run: $(STAMP)
	$(BIN)/sidechain --version
	printf 'data: hello\n\nid: 1\nevent: message.delta\ndata: {"text": "w\303\266rld"}\n\n' | $(BIN)/sidechain decode

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
