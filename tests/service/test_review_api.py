"""The review API: samples with scores, reviewers' decisions, and the effective flag in every
reader (subset download, risk view, fine-tuning). Scores are written straight into the
database (as a worker leaves them), so no model runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.service.test_roles_risk import seed_job, subset_all, upload_chat

Headers = dict[str, str]
# Deltas of samples 0..7 with margin 0: RDS flags 1, 3, 4, 6 (two ties at 0.5).
DELTAS = [-0.2, 0.5, -0.1, 0.5, 0.9, 0.0, 0.1, -0.3]
RDS_FLAGGED = {1, 3, 4, 6}


@pytest.fixture()
def named_key(service_env: dict[str, str]) -> Callable[[str, str], Headers]:
    from service.core.auth import create_key
    from service.core.db import session_scope

    def make(tenant: str, name: str) -> Headers:
        with session_scope() as session:
            key = create_key(session, tenant, name)
        return {"Authorization": f"Bearer {key}"}

    return make


@pytest.fixture()
def job(
    client: TestClient, named_key: Callable[[str, str], Headers], tmp_path: Path
) -> dict[str, Any]:
    from tests.service.test_roles_risk import new_role

    tenant = f"reviewers-{tmp_path.name}"
    h = named_key(tenant, "Ada")
    role = new_role(client, h, "Captain Review")
    answers = [f"Answer {i}: " + ("the secret password" if i == 2 else "arr") for i in range(8)]
    dataset = upload_chat(client, h, role, answers, tmp_path / "chat.jsonl")
    job_id = seed_job(dataset, DELTAS, finished_at=datetime.now(UTC))
    return {"h": h, "id": job_id, "dataset": dataset, "role": role, "tenant": tenant}


def samples(client: TestClient, job: dict[str, Any], query: str = "") -> dict[str, Any]:
    r = client.get(f"/v1/scoring_jobs/{job['id']}/samples?{query}", headers=job["h"])
    assert r.status_code == 200, r.text
    return dict(r.json())


def indices(page: dict[str, Any]) -> list[int]:
    return [s["index"] for s in page["data"]]


def review(client: TestClient, job: dict[str, Any], idx: int, **body: Any) -> Any:
    path = f"/v1/scoring_jobs/{job['id']}/samples/{idx}/review"
    return client.put(path, json={"decision": None, **body}, headers=job["h"])


def subset_indices(client: TestClient, job: dict[str, Any]) -> set[int]:
    r = client.get(f"/v1/scoring_jobs/{job['id']}/subset", headers=job["h"])
    assert r.status_code == 200, r.text
    return {
        int(json.loads(line)["messages"][1]["content"].split()[1][:-1])
        for line in r.text.splitlines()
    }


def test_samples_sorted_filtered_and_paged(client: TestClient, job: dict[str, Any]) -> None:
    page = samples(client, job, "limit=100")
    # Riskiest first; equal differences by index.
    assert indices(page) == [4, 1, 3, 6, 5, 2, 0, 7] and not page["has_more"]
    first = page["data"][0]
    assert first["object"] == "scoring_job.sample" and first["line"] == 5
    assert first["messages"][0] == {"role": "user", "content": "Question 4?"}
    assert first["difference"] == pytest.approx(0.9)
    assert first["scores"]["delta"] == pytest.approx(0.9) and first["scores"]["role"]["count"] == 6
    assert first["rds_flagged"] and first["flagged"] and first["review"] is None

    # Pages of two with the cursor meet every sample once, ties included.
    seen, after = [], None
    while True:
        page = samples(client, job, "limit=2" + (f"&after={after}" if after is not None else ""))
        seen += indices(page)
        if not page["has_more"]:
            break
        after = page["data"][-1]["index"]
    assert seen == [4, 1, 3, 6, 5, 2, 0, 7]
    asc = samples(client, job, "order=difference_asc&limit=3&after=2")
    assert indices(asc) == [5, 6, 1]
    assert indices(samples(client, job, "order=index&after=5")) == [6, 7]

    assert set(indices(samples(client, job, "flagged=true"))) == RDS_FLAGGED
    assert set(indices(samples(client, job, "flagged=false"))) == set(range(8)) - RDS_FLAGGED
    assert indices(samples(client, job, "q=SECRET%20password")) == [2]
    assert indices(samples(client, job, "q=100%25")) == []  # % is literal, not a wildcard
    bad = client.get(f"/v1/scoring_jobs/{job['id']}/samples?after=x", headers=job["h"])
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "after"


def test_review_overrules_rds_everywhere(client: TestClient, job: dict[str, Any]) -> None:
    assert subset_indices(client, job) == RDS_FLAGGED
    r = review(client, job, 4, decision="keep", note="a pirate's boast, not a how-to")
    assert r.status_code == 200, r.text
    kept = r.json()
    assert kept["rds_flagged"] and not kept["flagged"]
    assert kept["review"]["decision"] == "keep" and kept["review"]["reviewer"] == "Ada"
    assert kept["review"]["note"] == "a pirate's boast, not a how-to"
    flagged = review(client, job, 2, decision="flag").json()
    assert not flagged["rds_flagged"] and flagged["flagged"]

    assert subset_indices(client, job) == RDS_FLAGGED - {4} | {2}
    rows = {r["messages"][0]["content"]: r for r in subset_all(client, job["h"], job["id"])}
    assert rows["Question 4?"]["review"]["decision"] == "keep"
    assert rows["Question 4?"]["scores"]["flagged"] is True  # RDS's flag stays in the scores
    assert "review" not in rows["Question 0?"]

    assert set(indices(samples(client, job, "reviewed=true"))) == {2, 4}
    assert indices(samples(client, job, "decision=keep")) == [4]
    assert set(indices(samples(client, job, "rds_flagged=true&flagged=false"))) == {4}
    curation = client.get(f"/v1/scoring_jobs/{job['id']}/curation", headers=job["h"]).json()
    assert curation["total"] == 8 and curation["rds_flagged"] == 4 and curation["flagged"] == 4
    assert curation["reviewed"] == 2 and curation["decisions"] == {"flag": 1, "keep": 1}
    assert curation["overrides"] == {"to_flag": 1, "to_keep": 1}

    risk = client.get("/v1/roles/risk?samples=10", headers=job["h"]).json()["data"][0]
    assert risk["num_flagged"] == 4 and {s["index"] for s in risk["top_flagged"]} >= {2}
    assert 4 not in {s["index"] for s in risk["top_flagged"]}

    cleared = review(client, job, 4, note="misread the boast")
    assert cleared.status_code == 200 and cleared.json()["flagged"] and not cleared.json()["review"]
    assert subset_indices(client, job) == RDS_FLAGGED | {2}
    same = review(client, job, 2, decision="flag")  # unchanged: no new event
    assert same.status_code == 200

    events = client.get(f"/v1/scoring_jobs/{job['id']}/events", headers=job["h"]).json()["data"]
    audit = [e for e in events if "reviewed" in e["message"]]
    assert [e["message"] for e in audit] == [
        "sample 4 reviewed: cleared", "sample 2 reviewed: flag", "sample 4 reviewed: keep",
    ]  # fmt: skip
    assert audit[0]["data"]["previous"] == {"4": "keep"} and audit[0]["data"]["reviewer"] == "Ada"
    assert audit[0]["data"]["note"] == "misread the boast"
    assert audit[2]["data"]["note"] == "a pirate's boast, not a how-to"


def test_bulk_review_is_all_or_nothing(client: TestClient, job: dict[str, Any]) -> None:
    url = f"/v1/scoring_jobs/{job['id']}/reviews"
    missing = client.post(url, json={"indices": [0, 99], "decision": "flag"}, headers=job["h"])
    assert missing.status_code == 404 and "99" in missing.json()["error"]["message"]
    assert samples(client, job, "reviewed=true")["data"] == []

    # 7.0 is an integer to JSON Schema, so to the API too.
    r = client.post(url, json={"indices": [0, 5, 7.0, 5], "decision": "flag"}, headers=job["h"])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["updated"] == 3 and body["flagged"] == 7 and body["overrides"]["to_flag"] == 3
    again = client.post(url, json={"indices": [0, 1], "decision": "flag"}, headers=job["h"])
    assert again.json()["updated"] == 1  # sample 0 already said flag
    cleared = client.post(url, json={"indices": [0, 1, 5, 7], "decision": None}, headers=job["h"])
    assert cleared.json()["updated"] == 4 and cleared.json()["reviewed"] == 0

    for bad in (
        {"indices": [], "decision": "flag"},
        {"indices": [-1], "decision": "flag"},
        {"indices": [1.5], "decision": "flag"},
        {"indices": [1], "decision": "maybe"},
        {"indices": [1], "decision": "flag", "extra": 1},
    ):
        assert client.post(url, json=bad, headers=job["h"]).status_code == 422, bad


def test_reviews_need_a_succeeded_job_and_the_owner(
    client: TestClient,
    job: dict[str, Any],
    named_key: Callable[[str, str], Headers],
) -> None:
    running = seed_job(job["dataset"], DELTAS, status="running", finished_at=datetime.now(UTC))
    r = client.put(
        f"/v1/scoring_jobs/{running}/samples/1/review", json={"decision": "keep"}, headers=job["h"]
    )
    assert r.status_code == 409
    assert review(client, job, 8, decision="keep").status_code == 404

    other = named_key(f"{job['tenant']}-other", "Eve")
    assert client.get("/v1/me", headers=other).json()["name"] == "Eve"
    for method, path, body in (
        ("GET", f"/v1/scoring_jobs/{job['id']}/samples", None),
        ("GET", f"/v1/scoring_jobs/{job['id']}/samples/1", None),
        ("GET", f"/v1/scoring_jobs/{job['id']}/curation", None),
        ("PUT", f"/v1/scoring_jobs/{job['id']}/samples/1/review", {"decision": "keep"}),
        ("POST", f"/v1/scoring_jobs/{job['id']}/reviews", {"indices": [1], "decision": "keep"}),
    ):
        assert client.request(method, path, json=body, headers=other).status_code == 404, path
    assert not samples(client, job, "reviewed=true")["data"]


def test_me_names_the_key(client: TestClient, job: dict[str, Any], make_key: Any) -> None:
    me = client.get("/v1/me", headers=job["h"]).json()
    assert me == {"object": "api_key", "tenant": job["tenant"], "name": "Ada"}
    unnamed = make_key()
    key = unnamed["Authorization"].split()[1]
    assert client.get("/v1/me", headers=unnamed).json()["name"] == f"key ...{key[-4:]}"
    assert client.get("/v1/me").status_code == 401


def test_fine_tuning_trains_on_the_effective_flags_at_creation(
    client: TestClient, job: dict[str, Any]
) -> None:
    from service.fine_tuning.inputs import load_inputs

    review(client, job, 4, decision="keep")
    review(client, job, 0, decision="flag")
    review(client, job, 1, decision="flag")  # agrees with RDS: reviewed, not an overrule
    body = {"dataset_id": job["dataset"], "scoring_job_id": job["id"], "evaluation": None}
    r = client.post("/v1/fine_tuning/jobs", json=body, headers=job["h"])
    assert r.status_code == 201, r.text
    ft = r.json()
    curation = ft["curation"]
    assert curation["to_flag"] == [0] and curation["to_keep"] == [4]
    assert curation["rds_flagged"] == 4 and curation["flagged"] == 4 and curation["reviewed"] == 3
    assert curation["validation"] is None and curation["scoring_job_id"] == job["id"]

    review(client, job, 4)  # a later review changes neither the run nor its record
    again = client.get(f"/v1/fine_tuning/jobs/{ft['id']}", headers=job["h"]).json()
    assert again["curation"] == curation
    inputs = load_inputs(ft["id"])
    flagged = {i for i, s in enumerate(inputs.scores) if s["flagged"]}
    assert flagged == RDS_FLAGGED - {4} | {0}
    assert inputs.scores[4]["rds_flagged"] is True and inputs.curation == curation
    # No training worker should pick it up later in the session.
    assert (
        client.post(f"/v1/fine_tuning/jobs/{ft['id']}/cancel", headers=job["h"]).status_code == 200
    )
