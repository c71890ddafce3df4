"""Database and queue outages with the real servers: the API answers 503 while a dependency is
down, recovers without a restart, and a job running across the outage ends with the scores of
a clean run, none lost or duplicated."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.service.conftest import (
    SHARED_DATA,
    ServerProcess,
    WorkerProcess,
    free_port,
    rolebench_file,
)

pytestmark = pytest.mark.slow
Headers = dict[str, str]
PROMPTS = SHARED_DATA / "sarft" / "role_prompts_v2.json"
ROWS = 16
# Small chunks and shards, so the job spans the outage with shards queued, running and done.
FAST = {
    "SARFT_CHUNK_SIZE": "2",
    "SARFT_SHARD_SIZE": "4",
    "SARFT_HEARTBEAT_S": "0.5",
    "SARFT_STALE_AFTER_S": "8",
}


class RedisServer:
    """A private redis-server on its own port, so stopping it touches nothing else."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True
            ).stdout.strip()
            != b"PONG"
        ):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # an abrupt loss: its data (the queued tasks) goes with it
            self.proc.wait(timeout=10)


@pytest.fixture()
def private_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


class PostgresServer:
    """A private PostgreSQL cluster (initdb into a temporary directory) on its own port, so
    stopping it touches no other test's database and the test runs beside the others. As
    root, the server binaries run as the postgres user: initdb refuses root."""

    def __init__(self) -> None:
        initdb = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not initdb:
            pytest.skip("PostgreSQL's server binaries are not in /usr/lib/postgresql")
        self.bin = initdb[-1].parent
        self.dir = Path(tempfile.mkdtemp(prefix="sarft-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/sarft"
        self.as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_owner:
            shutil.chown(self.dir, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--no-sync")  # fmt: skip

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run(
            [*self.as_owner, str(self.bin / tool), *args], capture_output=True, text=True
        )
        assert done.returncode == 0, f"{tool} {args}: {done.stdout}{done.stderr}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "log"), "-o", options,
                  "-w", "start")  # fmt: skip

    def stop(self) -> None:
        """A fast shutdown, as `pg_ctlcluster stop` does: sessions are cut, nothing is lost."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def create(self) -> str:
        """The database `sarft`, migrated, and a key to it; the key."""
        from sqlalchemy import create_engine
        from sqlalchemy.orm import Session

        from service.core.auth import create_key
        from service.core.migrate import upgrade

        admin = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(admin, autocommit=True) as db:
            db.execute("CREATE DATABASE sarft")
        upgrade(self.url)
        engine = create_engine(self.url)
        try:
            with Session(engine) as session:
                key = create_key(session, "outage")
                session.commit()
        finally:
            engine.dispose()
        return key

    def remove(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture()
def private_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.remove()


def wait_job(http: httpx.Client, job: str, until: Callable[[dict[str, Any]], bool]) -> Any:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        r = http.get(f"/v1/scoring_jobs/{job}")
        if r.status_code == 200 and until(r.json()):
            return r.json()
        time.sleep(0.3)
    raise AssertionError(f"timed out on {job}: {r.status_code} {r.text}")


def finished(job: dict[str, Any]) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled")


def scores(http: httpx.Client, job: str) -> list[dict[str, Any]]:
    import json

    r = http.get(f"/v1/scoring_jobs/{job}/subset?which=all")
    assert r.status_code == 200, r.text
    return [json.loads(line)["scores"] for line in r.text.splitlines()]


def setup_dataset(http: httpx.Client, tmp_path: Path) -> str:
    import json

    if not PROMPTS.exists():
        pytest.skip(f"shared data missing: {PROMPTS}")  # as rolebench_file does
    entry = json.loads(PROMPTS.read_text())["Jack_Sparrow"]
    role = http.post(
        "/v1/roles",
        json={"name": "Jack Sparrow", "profile": "Captain Jack Sparrow.",
              "role_prompt": entry["role"], "unsafe_prompt": entry["safe"]},
    )  # fmt: skip
    assert role.status_code == 201, role.text
    path = rolebench_file(tmp_path / "jack.jsonl", ROWS)
    with path.open("rb") as f:
        r = http.post(
            "/v1/datasets", files={"file": (path.name, f)}, data={"role_id": role.json()["id"]}
        )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def run_clean(http: httpx.Client, dataset: str) -> list[dict[str, Any]]:
    clean = http.post("/v1/scoring_jobs", json={"dataset_id": dataset}).json()["id"]
    assert wait_job(http, clean, finished)["status"] == "succeeded"
    return scores(http, clean)


def check_survived(
    http: httpx.Client, job: str, clean: list[dict[str, Any]], worker: WorkerProcess
) -> None:
    done = wait_job(http, job, finished)
    assert done["status"] == "succeeded", (done, worker.output()[-3000:])
    assert done["progress"] == {"processed": ROWS, "total": ROWS}
    assert scores(http, job) == clean  # every row once, in order, with a clean run's scores
    assert http.get("/readyz").status_code == 200


def test_redis_lost_mid_job(
    service_env: dict[str, str],
    make_key: Callable[..., Headers],
    private_redis: RedisServer,
    tmp_path: Path,
) -> None:
    env = {**service_env, **FAST, "SARFT_REDIS_URL": private_redis.url}
    server, worker = ServerProcess(env), WorkerProcess(env)
    try:
        with httpx.Client(base_url=server.url, headers=make_key(), timeout=60) as http:
            dataset = setup_dataset(http, tmp_path)
            clean = run_clean(http, dataset)
            job = http.post("/v1/scoring_jobs", json={"dataset_id": dataset}).json()["id"]
            wait_job(http, job, lambda j: j["progress"]["processed"] >= 2)

            private_redis.stop()
            ready = http.get("/readyz")
            assert ready.status_code == 503 and ready.json()["queue"] != "ok", ready.text
            refused = http.post("/v1/scoring_jobs", json={"dataset_id": dataset})
            assert refused.status_code == 503, refused.text
            assert "queue" in refused.json()["error"]["message"]
            assert http.get(f"/v1/scoring_jobs/{job}").status_code == 200  # reads still work
            time.sleep(3)

            private_redis.start()  # empty: the tasks it held are gone
            check_survived(http, job, clean, worker)
            events = http.get(f"/v1/scoring_jobs/{job}/events?limit=100").json()["data"]
            assert any("queued again" in e["message"] for e in events), events
            jobs = http.get("/v1/scoring_jobs?limit=100").json()["data"]
            assert len(jobs) == 2, "the refused creation stored a job"
    finally:
        worker.stop()
        server.stop()


def test_postgres_restart_mid_job(
    service_env: dict[str, str], private_postgres: PostgresServer, tmp_path: Path
) -> None:
    key = private_postgres.create()
    env = {
        **service_env,
        **FAST,
        "SARFT_DATABASE_URL": private_postgres.url,
        # Its own queues: tasks other tests left in Redis name jobs its database lacks.
        "SARFT_QUEUE_PREFIX": service_env["SARFT_QUEUE_PREFIX"] + "pg-",
    }
    server, worker = ServerProcess(env), WorkerProcess(env)
    try:
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
            dataset = setup_dataset(http, tmp_path)
            clean = run_clean(http, dataset)
            job = http.post("/v1/scoring_jobs", json={"dataset_id": dataset}).json()["id"]
            wait_job(http, job, lambda j: j["progress"]["processed"] >= 2)

            private_postgres.stop()
            try:
                ready = http.get("/readyz")
                assert ready.status_code == 503 and ready.json()["database"] != "ok", ready.text
                down = http.get(f"/v1/scoring_jobs/{job}")
                assert down.status_code == 503, down.text
                assert down.json()["error"]["code"] == "database_unavailable"
                time.sleep(3)
            finally:
                private_postgres.start()
            check_survived(http, job, clean, worker)
    finally:
        worker.stop()
        server.stop()
