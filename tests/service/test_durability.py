"""A 2xx means committed: what the API acknowledges is there for the next request, and a
commit that fails is answered with an error, never a success."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from tests.service.conftest import ServerProcess

Headers = dict[str, str]


def synthetic_rows(path: Path, n: int) -> Path:
    """``n`` distinct RoleBench-format rows: big enough that committing them takes a while."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            row = {"role": "Tester", "question": f"Question {i}?", "generated": [f"Answer {i}."]}
            f.write(json.dumps(row) + "\n")
    return path


def test_an_acknowledged_upload_is_there_for_the_next_connection(
    api_server: ServerProcess, make_key: Callable[..., Headers], tmp_path: Path
) -> None:
    """Before the fix, 1 round in 10 of a 20,000-row upload got 404 here: the 201 left before
    the commit, and the job creation on another connection did not see the dataset."""
    headers = make_key()
    data = synthetic_rows(tmp_path / "rows.jsonl", 20_000)
    uploader = httpx.Client(base_url=api_server.url, headers=headers, timeout=120)
    other = httpx.Client(base_url=api_server.url, headers=headers, timeout=120)
    with uploader, other:
        role = uploader.post("/v1/roles", json={"name": "Tester", "profile": "Tests."})
        assert role.status_code == 201, role.text
        for round_no in range(6):
            with data.open("rb") as f:
                r = uploader.post(
                    "/v1/datasets",
                    files={"file": (f"rows-{round_no}.jsonl", f, "application/jsonl")},
                    data={"role_id": role.json()["id"]},
                )
            assert r.status_code == 201, r.text
            job = other.post("/v1/scoring_jobs", json={"dataset_id": r.json()["id"]})
            assert job.status_code == 201, f"round {round_no}: {job.text}"
            # No worker serves this test's queue now; cancel so a later one skips it.
            cancel = other.post(f"/v1/scoring_jobs/{job.json()['id']}/cancel")
            assert cancel.status_code == 200, cancel.text


class FailingCommits:
    """While on, every commit fails as a dropped connection would: after the handler has
    returned, inside the request's session."""

    def __init__(self) -> None:
        self.on = False
        self.failed = 0

    def __call__(self, _session: Session) -> None:
        if self.on:
            self.failed += 1
            raise OperationalError("COMMIT", {}, ConnectionError("server closed the connection"))


@pytest.fixture()
def failing_commits() -> Iterator[FailingCommits]:
    switch = FailingCommits()
    event.listen(Session, "before_commit", switch)
    yield switch
    event.remove(Session, "before_commit", switch)


def test_a_failing_commit_is_answered_503_and_stores_nothing(
    client: TestClient, make_key: Callable[..., Headers], failing_commits: FailingCommits
) -> None:
    headers = make_key()
    body: dict[str, Any] = {"name": "Unstored", "profile": "Never committed."}
    failing_commits.on = True
    r = client.post("/v1/roles", json=body, headers=headers)
    failing_commits.on = False
    assert failing_commits.failed == 1
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "database_unavailable"
    roles = client.get("/v1/roles", headers=headers)
    assert roles.status_code == 200 and roles.json()["data"] == []
