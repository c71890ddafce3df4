"""Service tests run against the real Postgres and Redis of this machine.

A fresh database per test session (dropped at the end), a Redis database and a
queue prefix of its own, so runs never see each other's jobs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

PG_ADMIN = os.environ.get("SARFT_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("SARFT_TEST_REDIS_URL", "redis://127.0.0.1:6379/9")
REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
MODEL_HOME = Path(os.environ.get("SARFT_TEST_CACHE", Path.home() / ".cache" / "sarft-test"))


def clear_caches() -> None:
    from service.core import config, db, queue

    config.get_settings.cache_clear()
    db.get_engine.cache_clear()
    db.get_sessionmaker.cache_clear()
    queue.get_queue.cache_clear()


@pytest.fixture(scope="session")
def service_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.fail(f"Postgres is not reachable at {PG_ADMIN}: {exc} (start it: see .ci/run)")
    name = f"sarft_test_{uuid.uuid4().hex[:10]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    env = {
        "SARFT_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}",
        "SARFT_REDIS_URL": REDIS_URL,
        "SARFT_QUEUE_PREFIX": f"{name}-",
        # The bundled model's converted copy lives here; the tests' cache is reused.
        "SARFT_HOME": str(MODEL_HOME),
        "HF_HUB_OFFLINE": "1",
        # Fine-tuning jobs evaluate on AdvBench by name, as a deployment would configure it.
        "SARFT_EVAL_SETS": f"advbench={SHARED_DATA / 'advbench' / 'harmful_behaviors.csv'}",
        "SARFT_ARTIFACTS_DIR": str(tmp_path_factory.mktemp("artifacts")),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    clear_caches()
    from service.core.migrate import upgrade

    upgrade()
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        clear_caches()
        # A fresh connection: the session-long ones may have been closed by then.
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def client(service_env: dict[str, str]) -> Iterator[TestClient]:
    from service.app import create_app

    with TestClient(create_app()) as test_client:
        yield test_client


@pytest.fixture()
def make_key(service_env: dict[str, str]) -> Callable[[str | None], dict[str, str]]:
    """Headers with a new key for a new (or named) tenant."""
    from service.core.auth import create_key
    from service.core.db import session_scope

    def make(tenant: str | None = None) -> dict[str, str]:
        with session_scope() as session:
            key = create_key(session, tenant or f"tenant-{uuid.uuid4().hex[:8]}")
        return {"Authorization": f"Bearer {key}"}

    return make


class WorkerProcess:
    """A real `sarft worker` subprocess."""

    def __init__(self, env: dict[str, str], queue: str = "scoring") -> None:
        self.log = open(  # noqa: SIM115  (closed in stop)
            Path(os.environ.get("TMPDIR", "/tmp")) / f"sarft-worker-{uuid.uuid4().hex[:6]}.log",
            "w+",
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sarft", "worker", "--queue", queue],
            env={**os.environ, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, as a deployment stops a worker: it must exit (after its job, if busy)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
                self.log.close()
                raise AssertionError("the worker ignored SIGTERM for 30 s") from None
        self.log.close()

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()


@pytest.fixture()
def start_worker(service_env: dict[str, str]) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(queue: str = "scoring", **extra_env: str) -> WorkerProcess:
        worker = WorkerProcess({**service_env, **extra_env}, queue=queue)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def wait_for(
    client: TestClient,
    headers: dict[str, str],
    job_id: str,
    until: Callable[[dict[str, Any]], bool],
    timeout: float = 600,
) -> dict[str, Any]:
    from sarft.client import job_path

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(job_path(job_id), headers=headers).json()
        if until(job):
            return job
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting on job {job_id}: {job}")


def rolebench_file(path: Path, n: int, role: str = "Jack Sparrow") -> Path:
    import json

    source = SHARED_DATA / "rolebench" / "role_generalization_role_specific.jsonl"
    if not source.exists():
        pytest.skip(f"shared data missing: {source}")
    rows = [json.loads(line) for line in source.open(encoding="utf-8")]
    with path.open("w", encoding="utf-8") as out:
        for row in [r for r in rows if r["role"] == role][:n]:
            out.write(json.dumps(row) + "\n")
    return path


SHORT_PROFILE = "Captain Jack Sparrow, a witty, unpredictable pirate of the Caribbean."
"""A short profile keeps prompts short, for tests about the plumbing, not the prompts."""


def upload_rows(client: TestClient, headers: dict[str, str], path: Path) -> str:
    """Upload a RoleBench file as a new Jack Sparrow role (short profile); the dataset id."""
    with path.open("rb") as f:
        r = client.post(
            "/v1/datasets",
            files={"file": (path.name, f)},
            data={"role_name": "Jack Sparrow", "role_profile": SHORT_PROFILE},
            headers=headers,
        )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def score_with_worker(
    client: TestClient,
    headers: dict[str, str],
    service_env: dict[str, str],
    dataset: str,
    model: str | None = None,
) -> str:
    """Score the dataset with a real scoring worker, stopped afterwards (so that a training
    worker has the two cores); the succeeded scoring job's id. A fine-tuning job of it trains
    ``model`` (default: the server's, the bundled one)."""
    worker = WorkerProcess(service_env, queue="scoring")
    body = {"dataset_id": dataset, **({"model": model} if model is not None else {})}
    try:
        job = client.post("/v1/scoring_jobs", json=body, headers=headers)
        assert job.status_code == 201, job.text
        job_id = str(job.json()["id"])
        done = wait_for(client, headers, job_id, lambda j: j["status"] in ("succeeded", "failed"))
        assert done["status"] == "succeeded", worker.output()[-3000:]
    finally:
        worker.stop()
    return job_id


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Llama and its tokenizer as a local checkpoint that workers (other
    processes) load, for tests of the plumbing rather than of the bundled model's numbers:
    a forward costs milliseconds instead of a second, a merged export 25 MB instead of 540."""
    from tests.conftest import build_tiny_model, build_tiny_tokenizer

    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@contextmanager
def tiny_model_allowed(tiny_model_dir: Path) -> Iterator[str]:
    """While open, the API of this process accepts scoring jobs that name the tiny model (as
    SARFT_EXTRA_MODELS allows a deployment's further models); its name, for the jobs."""
    from service.core.config import get_settings

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("SARFT_EXTRA_MODELS", str(tiny_model_dir))
            get_settings.cache_clear()
            yield str(tiny_model_dir)
    finally:
        get_settings.cache_clear()  # the settings of the restored environment


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A real `sarft serve` subprocess (uvicorn), reached over TCP like a deployment."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(  # noqa: SIM115  (closed in stop)
            Path(os.environ.get("TMPDIR", "/tmp")) / f"sarft-serve-{uuid.uuid4().hex[:6]}.log",
            "w+",
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sarft", "serve", "--port", str(self.port)],
            env={**os.environ, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        self.wait_up()

    def wait_up(self, timeout: float = 60) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"sarft serve exited:\n{self.output()}")
            try:
                httpx.get(f"{self.url}/healthz", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError(f"sarft serve did not start:\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()


@pytest.fixture()
def api_server(service_env: dict[str, str]) -> Iterator[ServerProcess]:
    server = ServerProcess(service_env)
    yield server
    server.stop()
