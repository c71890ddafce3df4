"""The API client and its CLI against the real app, in-process, with an embedded SQLite setup.

No model runs: the job queue is replaced by a fake that records enqueues, and job states
are moved on by writing the database directly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from typer.testing import CliRunner

import sarft.client as client_module
from sarft import client_cli
from sarft.cli import app as cli_app
from sarft.client import SarftAPIError, SarftClient
from service.core import config, db, queue
from service.core.queue import Task
from service.models import JobStatus, SampleScore, ScoringJob

GOOD = [
    {"messages": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": f"A{i}"}]}
    for i in range(3)
]
PROFILE = "A cheerful pirate captain who loves the sea."


class FakeQueue:
    def __init__(self) -> None:
        self.enqueued: list[tuple[str, Task, tuple[Any, ...]]] = []

    def enqueue(self, queue: str, func: Task, *args: Any, job_id: str | None = None) -> None:
        self.enqueued.append((queue, func, args))

    def ping(self) -> bool:
        return True


CACHED = (config.get_settings, db.get_sessionmaker, queue.get_queue)


def _clear_caches() -> None:
    for cached in CACHED:
        cached.cache_clear()
    if db.get_engine.cache_info().currsize:
        db.get_engine().dispose()
    db.get_engine.cache_clear()


@pytest.fixture
def fake_queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeQueue]:
    from service.core.migrate import upgrade
    from service.fine_tuning import tasks as fine_tuning_tasks
    from service.scoring_jobs import tasks as scoring_tasks

    monkeypatch.setenv("SARFT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SARFT_DATABASE_URL", raising=False)
    monkeypatch.delenv("SARFT_REDIS_URL", raising=False)
    _clear_caches()
    fake = FakeQueue()
    # The task modules imported get_queue by name: patch it there too.
    monkeypatch.setattr(queue, "get_queue", lambda: fake)
    monkeypatch.setattr(scoring_tasks, "get_queue", lambda: fake)
    monkeypatch.setattr(fine_tuning_tasks, "get_queue", lambda: fake)
    upgrade()
    yield fake
    _clear_caches()


@pytest.fixture
def api_key(fake_queue: FakeQueue) -> str:
    from service.core.auth import create_key

    with db.session_scope() as session:
        return create_key(session, "t1")


@pytest.fixture
def client(api_key: str) -> Iterator[SarftClient]:
    from service.app import create_app

    with TestClient(create_app()) as http:
        yield SarftClient(base_url="http://testserver", api_key=api_key, http=http)


@pytest.fixture
def cli(client: SarftClient, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A runner whose commands talk to the in-process app (the key comes from the env)."""

    def make(api_url: str | None, api_key: str | None) -> SarftClient:
        return SarftClient(base_url=api_url or client.base_url, api_key=api_key, http=client.http)

    monkeypatch.setattr(client_cli, "make_client", make)
    assert client.api_key
    return CliRunner(env={"SARFT_API_KEY": client.api_key, "SARFT_API_URL": None})


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Rows as JSON lines; a str row is written as it is."""
    lines = (r if isinstance(r, str) else json.dumps(r) for r in rows)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def invoke(cli: CliRunner, *args: str) -> Any:
    return cli.invoke(cli_app, list(args))


def _dataset(client: SarftClient, tmp_path: Path) -> dict[str, Any]:
    role = client.create_role("Captain Anne", PROFILE)
    return client.upload_dataset(write_jsonl(tmp_path / "good.jsonl", GOOD), role_id=role["id"])


def _finish(job_id: str, flagged: set[int], total: int = len(GOOD)) -> None:
    """Pretend a worker scored the job."""
    with db.session_scope() as session:
        for idx in range(total):
            scores = json.dumps({"s_role": -1.0, "flagged": idx in flagged})
            session.add(SampleScore(job_id=job_id, idx=idx, flagged=idx in flagged, scores=scores))
        session.execute(
            update(ScoringJob)
            .where(ScoringJob.id == job_id)
            .values(status=JobStatus.SUCCEEDED, processed=total, finished_at=db.utcnow())
        )


# --- the client ------------------------------------------------------------------------------


def test_client_roles_datasets_and_jobs(
    client: SarftClient, fake_queue: FakeQueue, tmp_path: Path
) -> None:
    role = client.create_role("Captain Anne", PROFILE)
    assert role["id"].startswith("role_") and role["name"] == "Captain Anne"
    data = write_jsonl(tmp_path / "good.jsonl", GOOD)
    ds = client.upload_dataset(data, role_id=role["id"], idempotency_key="k1")
    assert ds["num_samples"] == 3 and ds["role_id"] == role["id"]
    assert client.upload_dataset(data, role_id=role["id"], idempotency_key="k1")["id"] == ds["id"]
    inline = client.upload_dataset(data, role_name="Bo", role_profile=PROFILE)
    assert inline["role_id"] != role["id"]

    job = client.create_scoring_job(ds["id"], margin=0.5, compute_reference=False, batch_size=4)
    assert job["status"] == "queued" and job["margin"] == 0.5
    assert not job["compute_reference"] and job["batch_size"] == 4
    assert [q[2] for q in fake_queue.enqueued] == [(job["id"], 0)]
    assert client.get_scoring_job(job["id"])["progress"] == {"processed": 0, "total": 3}
    cancelled = client.cancel_job(job["id"])
    assert cancelled["status"] == "cancelled"
    events = client.list_events(job["id"])
    assert [e["message"] for e in events] == ["job created", "cancelled by the user"]
    assert [e["message"] for e in client.list_events(job["id"], limit=1)] == [
        "cancelled by the user"
    ]
    assert client.wait_job(job["id"])["status"] == "cancelled"


def test_client_events_paginate(client: SarftClient, tmp_path: Path) -> None:
    from service.core.events import add_event

    job = client.create_scoring_job(_dataset(client, tmp_path)["id"])
    with db.session_scope() as session:
        for i in range(230):
            add_event(session, job["id"], f"e{i}")
    events = client.list_events(job["id"])
    assert [e["message"] for e in events] == ["job created"] + [f"e{i}" for i in range(230)]
    assert [e["message"] for e in client.list_events(job["id"], limit=150)][-1] == "e229"
    assert len(client.list_events(job["id"], limit=150)) == 150


def test_client_wait_and_download(
    client: SarftClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = client.create_scoring_job(_dataset(client, tmp_path)["id"])
    polls: list[str] = []
    monkeypatch.setattr(client_module.time, "sleep", lambda _s: _finish(job["id"], {1}))
    final = client.wait_job(job["id"], poll_s=0, on_progress=lambda j: polls.append(j["status"]))
    assert polls == ["queued", "succeeded"] and final["progress"]["processed"] == 3

    dest = tmp_path / "flagged.jsonl"
    size = client.download_subset(job["id"], dest)
    assert size == dest.stat().st_size
    rows = [json.loads(line) for line in dest.read_text().splitlines()]
    assert [r["messages"] for r in rows] == [GOOD[1]["messages"]]
    assert rows[0]["scores"]["flagged"] is True
    client.download_subset(job["id"], dest, which="all")
    assert len(dest.read_text().splitlines()) == 3
    assert not (tmp_path / "flagged.jsonl.part").exists()


def test_client_errors(client: SarftClient, tmp_path: Path) -> None:
    with pytest.raises(SarftAPIError) as info:
        client.get_scoring_job("scorejob_nope")
    err = info.value
    assert (err.status, err.code, err.param) == (404, "not_found", "job_id")
    assert "scorejob_nope" in err.message

    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD[0], {"nothing": 1}, GOOD[1]])
    with pytest.raises(SarftAPIError) as info:
        client.upload_dataset(bad, role_name="Bo", role_profile=PROFILE)
    assert (info.value.status, info.value.code, info.value.param) == (422, "invalid_file", "file")
    assert [e["line"] for e in info.value.errors] == [2]

    with pytest.raises(SarftAPIError) as info:
        client.create_role("", PROFILE)
    assert (info.value.status, info.value.code) == (422, "invalid_request")

    anonymous = SarftClient(base_url=client.base_url, api_key="sk-sarft-wrong", http=client.http)
    with pytest.raises(SarftAPIError) as info:
        anonymous.create_role("X", PROFILE)
    assert (info.value.status, info.value.code) == (401, "invalid_api_key")

    job = client.create_scoring_job(_dataset(client, tmp_path)["id"])
    dest = tmp_path / "x.jsonl"
    with pytest.raises(SarftAPIError) as info:
        client.download_subset(job["id"], dest)
    assert (info.value.status, info.value.code) == (409, "conflict")
    assert not dest.exists()


class _Plain:
    status_code = 502
    reason_phrase = "Bad Gateway"
    text = "<html>upstream down</html>\n"

    def json(self, **_kw: Any) -> Any:
        raise json.JSONDecodeError("Expecting value", self.text, 0)


def test_error_parsing_falls_back_to_text() -> None:
    err = SarftAPIError.from_response(_Plain())  # type: ignore[arg-type]
    assert (err.status, err.code, err.message, err.errors) == (
        502,
        "http_error",
        "<html>upstream down</html>",
        [],
    )


def test_client_defaults_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SARFT_API_URL", "http://api.example:9000/")
    monkeypatch.setenv("SARFT_API_KEY", "sk-env")
    with SarftClient() as c:
        assert (c.base_url, c.api_key) == ("http://api.example:9000", "sk-env")
    monkeypatch.delenv("SARFT_API_URL")
    with SarftClient(api_key="sk-arg") as c:
        assert (c.base_url, c.api_key) == ("http://127.0.0.1:8000", "sk-arg")


# --- the CLI ---------------------------------------------------------------------------------


def test_cli_upload(cli: CliRunner, client: SarftClient, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "good.jsonl", GOOD)
    (tmp_path / "profile.txt").write_text(PROFILE, encoding="utf-8")
    result = invoke(
        cli,
        "upload",
        str(data),
        "--role-name",
        "Anne",
        "--profile-file",
        str(tmp_path / "profile.txt"),
    )
    assert result.exit_code == 0, result.output
    ds = json.loads(result.stdout)
    assert ds["num_samples"] == 3

    result = invoke(cli, "upload", str(data), "--role-id", ds["role_id"], "--idempotency-key", "k")
    assert result.exit_code == 0, result.output

    role = invoke(cli, "roles", "create", "--name", "Bo", "--profile", PROFILE)
    assert role.exit_code == 0, role.output
    assert json.loads(role.stdout)["name"] == "Bo"

    result = invoke(cli, "upload", str(data), "--role-name", "Anne")
    assert result.exit_code == 2 and "--role-id" in result.output


def test_cli_upload_invalid_file(cli: CliRunner, tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD[0], {"nothing": 1}, "{not json"])
    result = invoke(cli, "upload", str(bad), "--role-name", "Anne", "--profile", PROFILE)
    assert result.exit_code == 2, result.output
    assert "error (422 invalid_file)" in result.stderr
    assert "line 2: " in result.stderr and "line 3: invalid JSON" in result.stderr
    assert "Traceback" not in result.output


def test_cli_jobs(cli: CliRunner, client: SarftClient, tmp_path: Path) -> None:
    ds = _dataset(client, tmp_path)
    result = invoke(cli, "jobs", "create", ds["id"], "--margin", "0.25", "--no-reference")
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout)
    assert job["margin"] == 0.25 and job["compute_reference"] is False

    result = invoke(cli, "jobs", "cancel", job["id"])
    assert result.exit_code == 0 and json.loads(result.stdout)["status"] == "cancelled"
    result = invoke(cli, "jobs", "cancel", job["id"])
    assert result.exit_code == 2
    assert "error (409 conflict): the job is already cancelled" in result.stderr

    result = invoke(cli, "jobs", "events", job["id"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "job created" in lines[0] and '{"total": 3}' in lines[0]
    assert "cancelled by the user" in lines[1]

    result = invoke(cli, "jobs", "wait", job["id"], "--poll", "0.1")
    assert result.exit_code == 1 and "job cancelled" in result.stderr

    result = invoke(cli, "download", job["id"])
    assert result.exit_code == 2
    assert "error (409 conflict): the job is cancelled" in result.stderr


def test_cli_wait_and_download(
    cli: CliRunner, client: SarftClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = client.create_scoring_job(_dataset(client, tmp_path)["id"])
    monkeypatch.setattr(client_module.time, "sleep", lambda _s: _finish(job["id"], {0, 2}))
    result = invoke(cli, "jobs", "wait", job["id"], "--poll", "0.1")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "succeeded"

    monkeypatch.chdir(tmp_path)
    result = invoke(cli, "download", job["id"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{job['id']}-flagged.jsonl (2 lines)"
    out = tmp_path / "all.jsonl"
    result = invoke(cli, "download", job["id"], "--which", "all", "-o", str(out))
    assert result.stdout.strip() == f"{out} (3 lines)"


def test_cli_api_errors(cli: CliRunner) -> None:
    result = invoke(cli, "jobs", "get", "scorejob_missing")
    assert result.exit_code == 2
    assert "error (404 not_found): no scoring job 'scorejob_missing'" in result.stderr
    result = invoke(cli, "jobs", "events", "scorejob_missing", "--api-key", "sk-sarft-bad")
    assert result.exit_code == 2
    assert "rejected the key (401): unknown or revoked API key" in result.stderr


def test_cli_train_and_downloads(
    cli: CliRunner, client: SarftClient, fake_queue: FakeQueue, tmp_path: Path
) -> None:
    from service.fine_tuning.storage import artifact_dir
    from service.fine_tuning.tasks import run_fine_tuning_job
    from service.models import FineTuningJob

    dataset = _dataset(client, tmp_path)["id"]
    scoring = client.create_scoring_job(dataset)["id"]
    _finish(scoring, flagged={1})
    prompts = write_jsonl(tmp_path / "harm.jsonl", [{"prompt": "p1"}, {"prompt": "p2"}])
    result = invoke(
        cli, "train", dataset, "--scoring-job", scoring, "--method", "random", "--full",
        "--lambda", "0.2", "--max-steps", "3", "--eval-file", str(prompts),
        "--eval-backend", "vllm", "--no-wait",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    job = json.loads(result.stdout)
    assert job["method"] == "random" and job["status"] == "queued"
    hp = job["hyperparameters"]
    assert hp["lora"] is None and hp["learning_rate"] == 2e-5 and hp["lambda_kl"] == 0.2
    assert hp["max_steps"] == 3
    assert job["evaluation"]["safety_sets"] == [{"name": "harm", "num_prompts": 2}]
    assert job["evaluation"]["backend"] == "vllm"
    assert fake_queue.enqueued[-1] == ("training", run_fine_tuning_job, (job["id"],))

    bad = invoke(cli, "train", dataset, "--scoring-job", scoring, "--full", "--lora-r", "8")
    assert bad.exit_code == 2 and "LoRA" in bad.output
    assert invoke(cli, "download", job["id"], "--adapter").exit_code == 2  # 409: not succeeded
    assert invoke(cli, "download", scoring, "--adapter").exit_code == 2  # not a fine-tuning job

    # Pretend the trainer finished: its files in the artifact directory, the job succeeded.
    out = artifact_dir(job["id"])
    out.mkdir(parents=True)
    (out / "model.tar.gz").write_bytes(b"\x1f\x8b fake archive")
    (out / "report.html").write_text("<!doctype html><p>report</p>", encoding="utf-8")
    with db.session_scope() as session:
        session.execute(
            update(FineTuningJob)
            .where(FineTuningJob.id == job["id"])
            .values(status=JobStatus.SUCCEEDED, phase="done", step=3, total_steps=3)
        )
    got = invoke(cli, "jobs", "wait", job["id"], "--poll", "0.1")
    assert got.exit_code == 0 and json.loads(got.stdout)["progress"]["step"] == 3
    archive = tmp_path / "a.tar.gz"
    assert invoke(cli, "download", job["id"], "--adapter", "-o", str(archive)).exit_code == 0
    assert archive.read_bytes() == b"\x1f\x8b fake archive"  # full FT: the checkpoint archive
    page = tmp_path / "r.html"
    assert invoke(cli, "download", job["id"], "--report", "html", "-o", str(page)).exit_code == 0
    assert page.read_text(encoding="utf-8").startswith("<!doctype html>")
    missing = invoke(cli, "download", job["id"], "--report", "json", "-o", str(tmp_path / "r.json"))
    assert missing.exit_code == 2 and "404 not_found" in missing.output
