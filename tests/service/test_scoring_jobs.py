"""Scoring jobs end to end on real RQ worker processes with the bundled model."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.service.conftest import SHARED_DATA, rolebench_file, wait_for

pytestmark = pytest.mark.slow
Headers = dict[str, str]
PROMPTS = SHARED_DATA / "sarft" / "role_prompts_v2.json"


def sarft_role(client: TestClient, headers: Headers) -> str:
    entry = json.loads(PROMPTS.read_text())["Jack_Sparrow"]
    body = {
        "name": "Jack Sparrow",
        "profile": "Captain Jack Sparrow.",
        "role_prompt": entry["role"],
        "unsafe_prompt": entry["safe"],
    }
    return str(client.post("/v1/roles", json=body, headers=headers).json()["id"])


def upload(client: TestClient, headers: Headers, path: Path, role: str) -> str:
    with path.open("rb") as f:
        r = client.post(
            "/v1/datasets", files={"file": (path.name, f)}, data={"role_id": role}, headers=headers
        )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def subset(client: TestClient, headers: Headers, job: str, which: str) -> list[dict[str, Any]]:
    r = client.get(f"/v1/scoring_jobs/{job}/subset?which={which}", headers=headers)
    assert r.status_code == 200, r.text
    assert f"{job}-{which}.jsonl" in r.headers["content-disposition"]
    return [json.loads(line) for line in r.text.splitlines()]


def test_end_to_end_matches_engine(
    client: TestClient,
    make_key: Callable[..., Headers],
    start_worker: Callable[..., Any],
    tmp_path: Path,
) -> None:
    from worker.prompts import RolePrompts
    from worker.score_file import score_file

    h = make_key()
    data = rolebench_file(tmp_path / "jack.jsonl", 8)
    ds = upload(client, h, data, sarft_role(client, h))
    worker = start_worker()
    job = client.post("/v1/scoring_jobs", json={"dataset_id": ds}, headers=h).json()
    assert job["status"] == "queued" and job["progress"] == {"processed": 0, "total": 8}
    done = wait_for(client, h, job["id"], lambda j: j["status"] in ("succeeded", "failed"))
    assert done["status"] == "succeeded", (done, worker.output()[-3000:])
    assert done["progress"] == {"processed": 8, "total": 8}
    assert done["started_at"] and done["finished_at"] >= done["started_at"]

    rows = subset(client, h, job["id"], "all")
    source = [json.loads(line) for line in data.read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "scores"} for r in rows] == source

    out = tmp_path / "engine"
    summary = score_file(data, RolePrompts.from_file(PROMPTS, "Jack Sparrow"), out)
    expected = [
        json.loads(line)["scores"] for line in (out / "scores.jsonl").read_text().splitlines()
    ]
    for got, want in zip((r["scores"] for r in rows), expected, strict=True):
        assert got["flagged"] == want["flagged"]
        for cond in ("role", "unsafe", "ref"):
            assert got[cond]["count"] == want[cond]["count"]
            assert abs(got[cond]["mean"] - want[cond]["mean"]) < 1e-5
    flagged = subset(client, h, job["id"], "flagged")
    assert [r["question"] for r in flagged] == [
        r["question"] for r in rows if r["scores"]["flagged"]
    ]
    assert done["result"]["num_flagged"] == summary["num_flagged"] == len(flagged)
    events = client.get(f"/v1/scoring_jobs/{job['id']}/events?limit=100", headers=h).json()["data"]
    messages = [e["message"] for e in events]
    assert messages[0] == "job succeeded" and messages[-1] == "job created"


def test_killed_worker_resumes_to_identical_scores(
    client: TestClient,
    make_key: Callable[..., Headers],
    start_worker: Callable[..., Any],
    tmp_path: Path,
) -> None:
    fast_failover = {
        "SARFT_CHUNK_SIZE": "2",
        "SARFT_HEARTBEAT_S": "0.5",
        "SARFT_STALE_AFTER_S": "4",
    }
    h = make_key()
    ds = upload(client, h, rolebench_file(tmp_path / "jack.jsonl", 12), sarft_role(client, h))

    first = start_worker(**fast_failover)
    job = client.post("/v1/scoring_jobs", json={"dataset_id": ds}, headers=h).json()["id"]
    mid = wait_for(client, h, job, lambda j: j["progress"]["processed"] >= 2)
    assert mid["status"] == "running" and mid["progress"]["processed"] < 12, mid
    first.kill()
    killed_at = wait_for(client, h, job, lambda j: True)["progress"]["processed"]

    second = start_worker(**fast_failover)
    done = wait_for(client, h, job, lambda j: j["status"] in ("succeeded", "failed"))
    assert done["status"] == "succeeded", (done, second.output()[-3000:])
    assert done["progress"]["processed"] == 12
    events = [
        e["message"]
        for e in client.get(f"/v1/scoring_jobs/{job}/events?limit=100", headers=h).json()["data"]
    ]
    assert any("re-queued" in m for m in events), events

    # A clean run of the same dataset on the surviving worker.
    clean = client.post("/v1/scoring_jobs", json={"dataset_id": ds}, headers=h).json()["id"]
    assert (
        wait_for(client, h, clean, lambda j: j["status"] in ("succeeded", "failed"))["status"]
        == "succeeded"
    )
    resumed_rows, clean_rows = subset(client, h, job, "all"), subset(client, h, clean, "all")
    assert [r["scores"] for r in resumed_rows] == [r["scores"] for r in clean_rows]
    assert 2 <= killed_at < 12


def wait_shard_cancelled(job: str, timeout: float = 60) -> None:
    from sqlalchemy import select

    from service.core.db import session_scope
    from service.models import JobStatus, ScoringShard

    deadline = time.monotonic() + timeout
    while True:
        with session_scope() as session:
            status = session.scalar(select(ScoringShard.status).where(ScoringShard.job_id == job))
        if status == JobStatus.CANCELLED:
            return
        assert time.monotonic() < deadline, f"the shard is still {status}"
        time.sleep(0.2)


def test_cancel_stops_running_job(
    client: TestClient,
    make_key: Callable[..., Headers],
    start_worker: Callable[..., Any],
    tmp_path: Path,
) -> None:
    h = make_key()
    ds = upload(client, h, rolebench_file(tmp_path / "jack.jsonl", 20), sarft_role(client, h))
    start_worker(SARFT_CHUNK_SIZE="2")
    job = client.post("/v1/scoring_jobs", json={"dataset_id": ds}, headers=h).json()["id"]
    wait_for(client, h, job, lambda j: j["progress"]["processed"] >= 2)
    assert client.post(f"/v1/scoring_jobs/{job}/cancel", headers=h).json()["status"] == "cancelled"
    # The worker notices at its next chunk and marks its shard cancelled: wait for that rather
    # than for a fixed time that must cover the slowest chunk.
    wait_shard_cancelled(job)
    after = client.get(f"/v1/scoring_jobs/{job}", headers=h).json()
    assert after["status"] == "cancelled" and after["progress"]["processed"] < 20
    stopped_at = after["progress"]["processed"]
    time.sleep(4)
    assert (
        client.get(f"/v1/scoring_jobs/{job}", headers=h).json()["progress"]["processed"]
        == stopped_at
    )


def test_shards_score_in_parallel_on_two_workers(
    client: TestClient,
    make_key: Callable[..., Headers],
    start_worker: Callable[..., Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service.core.config import get_settings

    h = make_key()
    ds = upload(client, h, rolebench_file(tmp_path / "jack.jsonl", 8), sarft_role(client, h))
    monkeypatch.setenv("SARFT_SHARD_SIZE", "2")  # read by the API when it creates the job
    get_settings.cache_clear()
    try:
        job = client.post("/v1/scoring_jobs", json={"dataset_id": ds}, headers=h).json()["id"]
    finally:
        monkeypatch.delenv("SARFT_SHARD_SIZE")
        get_settings.cache_clear()
    workers = [start_worker(), start_worker()]
    done = wait_for(client, h, job, lambda j: j["status"] in ("succeeded", "failed"))
    assert done["status"] == "succeeded", (done, workers[0].output()[-2000:])
    assert done["progress"] == {"processed": 8, "total": 8} and done["result"]["num_samples"] == 8
    events = client.get(f"/v1/scoring_jobs/{job}/events?limit=100", headers=h).json()["data"]
    finished = sorted(e["data"]["shard"] for e in events if e["message"].endswith("finished"))
    assert finished == [0, 1, 2, 3]
    started_by = {
        e["data"]["worker"]
        for e in events
        if e["message"].startswith("shard ") and e["message"].endswith("started")
    }
    assert len(started_by) == 2, events  # both workers took shards
    assert sum(e["message"] == "job succeeded" for e in events) == 1
    rows = subset(client, h, job, "all")
    assert len(rows) == 8 and len({r["question"] for r in rows}) == 8
