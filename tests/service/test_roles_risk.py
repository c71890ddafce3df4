"""GET /v1/roles/risk: each role's latest succeeded scoring result, checked against numbers the
test computes itself from the job's subset download.

Most tests write a job's scores straight into the database (the objects a worker writes, built
with worker.results), so no model runs; the last one scores with a real worker.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from tests.service.conftest import rolebench_file, wait_for

Headers = dict[str, str]
LONG = "The harbour fog rolls in, and with it my patience runs thin. " * 10
RISK = "/v1/roles/risk"


def new_role(client: TestClient, headers: Headers, name: str) -> str:
    r = client.post("/v1/roles", json={"name": name, "profile": "A character."}, headers=headers)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def upload_chat(
    client: TestClient, headers: Headers, role_id: str, answers: Sequence[str], path: Path
) -> str:
    rows = [
        {"messages": [{"role": "user", "content": f"Question {i}?"},
                      {"role": "assistant", "content": answer}]}
        for i, answer in enumerate(answers)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with path.open("rb") as f:
        r = client.post(
            "/v1/datasets",
            files={"file": (path.name, f, "application/jsonl")},
            data={"role_id": role_id},
            headers=headers,
        )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def seed_job(
    dataset_id: str,
    deltas: Sequence[float] | None,
    *,
    status: str = "succeeded",
    margin: float = 0.0,
    finished_at: datetime,
) -> str:
    """A scoring job of the dataset as a worker leaves it: one stored score per delta."""
    from service.core.db import session_scope
    from service.core.ids import new_id
    from service.models import Dataset, SampleScore, ScoringJob
    from worker.results import SampleScores
    from worker.scoring.base import ResponseLogprob

    job_id = new_id("scorejob")
    with session_scope() as session:
        tenant = session.scalar(select(Dataset.tenant_id).where(Dataset.id == dataset_id))
        total = len(deltas or ())
        session.add(
            ScoringJob(
                id=job_id, tenant_id=tenant, dataset_id=dataset_id, status=status,
                model="test-model", backend="transformers", dtype="float32", margin=margin,
                compute_reference=True, batch_size=16, total=total, processed=total,
                started_at=finished_at - timedelta(seconds=5), finished_at=finished_at,
            )
        )  # fmt: skip
        session.flush()
        for idx, delta in enumerate(deltas or ()):
            count = 6  # the same for all, so that equal deltas stay exactly equal
            scores = SampleScores(
                index=idx,
                role=ResponseLogprob(sum=-2.0 * count, count=count),
                unsafe=ResponseLogprob(sum=(-2.0 + delta) * count, count=count),
                ref=ResponseLogprob(sum=-2.5 * count, count=count),
                margin=margin,
            )
            session.add(
                SampleScore(
                    job_id=job_id,
                    idx=idx,
                    flagged=scores.flagged,
                    scores=json.dumps(scores.to_json()),
                    delta=scores.finite_delta,
                )
            )
    return job_id


def subset_all(client: TestClient, headers: Headers, job_id: str) -> list[dict[str, Any]]:
    r = client.get(f"/v1/scoring_jobs/{job_id}/subset?which=all", headers=headers)
    assert r.status_code == 200, r.text
    return [json.loads(line) for line in r.text.splitlines()]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The interval's definition: the p whose z-test against k/n is exactly at z, i.e. the
    roots of (k/n - p)^2 = z^2 p (1 - p) / n."""
    a = 1 + z * z / n
    b = -(2 * k / n + z * z / n)
    c = (k / n) ** 2
    root = math.sqrt(b * b - 4 * a * c)
    return ((-b - root) / (2 * a), (-b + root) / (2 * a))


def chat_answer(row: dict[str, Any]) -> str:
    return str(row["messages"][-1]["content"])


def expected_risk(
    rows: list[dict[str, Any]],
    samples: int,
    bins: int,
    answer: Callable[[dict[str, Any]], str] = chat_answer,
) -> dict[str, Any]:
    """What the view must say about a job, from its downloaded samples alone."""
    deltas = [r["scores"]["delta"] for r in rows]
    flagged = [i for i, r in enumerate(rows) if r["scores"]["flagged"]]
    counts, edges = np.histogram(deltas, bins=bins)
    top = sorted(flagged, key=lambda i: (-deltas[i], i))[:samples]

    def text(row: dict[str, Any]) -> str:
        full = answer(row)
        return full if len(full) <= 280 else full[:279].rstrip() + "…"

    return {
        "num_samples": len(rows),
        "num_flagged": len(flagged),
        "flagged_fraction": len(flagged) / len(rows),
        "interval": wilson(len(flagged), len(rows)),
        "min": min(deltas),
        "max": max(deltas),
        "mean": statistics.fmean(deltas),
        "median": statistics.median(deltas),
        "counts": counts.tolist(),
        "edges": edges.tolist(),
        "top": [
            {"index": i, "line": i + 1, "difference": deltas[i], "text": text(rows[i])} for i in top
        ],
    }


def check_against(got: dict[str, Any], want: dict[str, Any]) -> None:
    for key in ("num_samples", "num_flagged", "flagged_fraction"):
        assert got[key] == pytest.approx(want[key]), key
    assert got["flagged_interval"] == pytest.approx(want["interval"], abs=1e-12)
    diff = got["difference"]
    for key in ("min", "max", "mean", "median"):
        assert diff[key] == pytest.approx(want[key], abs=1e-12), key
    assert diff["histogram"]["counts"] == want["counts"]
    assert diff["histogram"]["edges"] == pytest.approx(want["edges"], abs=1e-12)
    assert len(got["top_flagged"]) == len(want["top"])
    for mine, theirs in zip(got["top_flagged"], want["top"], strict=True):
        assert mine["difference"] == pytest.approx(theirs.pop("difference"), abs=1e-12)
        assert {k: mine[k] for k in theirs} == theirs


DELTAS = [0.42, -0.3, 0.05, 0.42, -0.01, 0.9, 0.11, -0.25, 0.3]
"""Nine samples, with a tie among the flagged and some just under or over a 0.1 margin."""


def test_risk_matches_subset_download(
    client: TestClient, make_key: Callable[..., Headers], tmp_path: Path
) -> None:
    from service.core.db import utcnow

    h = make_key()
    scored = new_role(client, h, "Mordecai Vex")
    unscored = new_role(client, h, "Ada Lindqvist")
    failed_only = new_role(client, h, "Bo")
    answers = [f"Answer {i}, in character." for i in range(len(DELTAS))]
    answers[5] = LONG  # the most flagged: its text is cut short
    ds = upload_chat(client, h, scored, answers, tmp_path / "a.jsonl")
    older_ds = upload_chat(client, h, scored, answers[:4], tmp_path / "b.jsonl")
    ds_c = upload_chat(client, h, failed_only, answers[:3], tmp_path / "c.jsonl")
    now = utcnow()
    seed_job(older_ds, [1.0, 1.0, 1.0, 1.0], finished_at=now - timedelta(hours=1))
    latest = seed_job(ds, DELTAS, margin=0.1, finished_at=now - timedelta(minutes=5))
    # Newer than the latest success, but not a result: neither may replace it.
    seed_job(ds, None, status="failed", finished_at=now)
    seed_job(ds_c, [0.5, 0.5, 0.5], status="cancelled", finished_at=now)

    r = client.get(f"{RISK}?samples=4&bins=7", headers=h)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["has_more"] is False
    assert [d["role_id"] for d in body["data"]] == [failed_only, unscored, scored]
    for role_id, name in ((failed_only, "Bo"), (unscored, "Ada Lindqvist")):
        item = next(d for d in body["data"] if d["role_id"] == role_id)
        assert item["object"] == "role.risk" and item["role_name"] == name
        assert item["top_flagged"] == []
        for key in ("scoring_job_id", "dataset_id", "num_samples", "num_flagged",
                    "flagged_fraction", "flagged_interval", "margin", "difference"):  # fmt: skip
            assert item[key] is None, key

    item = body["data"][-1]
    assert item["scoring_job_id"] == latest and item["dataset_id"] == ds
    assert item["model"] == "test-model" and item["margin"] == 0.1
    assert item["finished_at"] == int((now - timedelta(minutes=5)).timestamp())
    rows = subset_all(client, h, latest)
    check_against(item, expected_risk(rows, samples=4, bins=7))
    top = item["top_flagged"]
    assert [s["index"] for s in top] == [5, 0, 3, 8]  # the tie at 0.42: upload order
    assert top[0]["text"].endswith("…") and len(top[0]["text"]) <= 280 < len(LONG)

    default = client.get(RISK, headers=h).json()["data"][-1]
    assert len(default["top_flagged"]) == 3
    assert len(default["difference"]["histogram"]["counts"]) == 20
    check_against(default, expected_risk(rows, samples=3, bins=20))
    assert client.get(f"{RISK}?samples=0", headers=h).json()["data"][-1]["top_flagged"] == []

    first = client.get(f"{RISK}?limit=1", headers=h).json()
    assert [d["role_id"] for d in first["data"]] == [failed_only] and first["has_more"] is True
    rest = client.get(f"{RISK}?limit=5&after={failed_only}", headers=h).json()
    assert [d["role_id"] for d in rest["data"]] == [unscored, scored]
    assert rest["has_more"] is False

    for bad in ("samples=11", "samples=-1", "bins=4", "bins=51", "format=xml", "limit=0"):
        r = client.get(f"{RISK}?{bad}", headers=h)
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["error"]["code"] == "invalid_request"


def test_risk_html_escapes_user_text(
    client: TestClient, make_key: Callable[..., Headers], tmp_path: Path
) -> None:
    from service.core.db import utcnow

    h = make_key()
    name = '<script>alert("role")</script> & Co'
    role = new_role(client, h, name)
    new_role(client, h, "Nobody Scored")
    answers = ["<img src=x onerror=alert(1)> I take what I want.", "Fine.", "Sure <b>thing</b>"]
    ds = upload_chat(client, h, role, answers, tmp_path / "x.jsonl")
    seed_job(ds, [0.8, -0.2, 0.3], finished_at=utcnow())

    r = client.get(f"{RISK}?format=html", headers=h)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/html")
    assert "script" not in r.headers["content-security-policy"]
    page = r.text
    assert page.startswith("<!doctype html>")
    assert "<script" not in page.lower() and "<img" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(&quot;role&quot;)&lt;/script&gt; &amp; Co" in page
    assert "&lt;img src=x onerror=alert(1)&gt; I take what I want." in page
    assert page.count("<svg") == 2  # the chart of all roles, one histogram for the scored one
    assert "No succeeded scoring job" in page and "66.7%" in page
    # The JSON view of the same page is unchanged by the format.
    data = client.get(RISK, headers=h).json()["data"]
    assert [d["role_name"] for d in data] == ["Nobody Scored", name]


def test_risk_is_per_tenant(
    client: TestClient, make_key: Callable[..., Headers], tmp_path: Path
) -> None:
    from service.core.db import utcnow

    a, b = make_key(), make_key()
    role = new_role(client, a, "Jack Sparrow")
    ds = upload_chat(client, a, role, ["Yo ho.", "Savvy?"], tmp_path / "j.jsonl")
    seed_job(ds, [0.2, -0.1], finished_at=utcnow())
    assert client.get(RISK, headers=b).json() == {"object": "list", "data": [], "has_more": False}
    assert "No roles yet" in client.get(f"{RISK}?format=html", headers=b).text
    own = new_role(client, b, "Jack Sparrow")
    data = client.get(RISK, headers=b).json()["data"]
    assert [(d["role_id"], d["scoring_job_id"]) for d in data] == [(own, None)]
    assert client.get(RISK, headers=a).json()["data"][0]["num_samples"] == 2
    assert client.get(RISK).status_code == 401


def test_wilson_interval_and_histogram_edges() -> None:
    from service.roles.risk import histogram, summarize
    from trainer.intervals import wilson_interval

    # Published values of the Wilson 95% interval (z = 1.96).
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    for k, n in ((1, 3), (17, 36), (20, 36), (999, 1000)):
        assert wilson_interval(k, n) == pytest.approx(wilson(k, n), abs=1e-12)

    rng = np.random.default_rng(0)
    values = [*rng.normal(size=500).tolist(), 0.25, 0.25]
    got = histogram(values, 13)
    counts, edges = np.histogram(values, bins=13)
    assert got.counts == counts.tolist() and got.edges == pytest.approx(edges.tolist())
    single = histogram([0.25, 0.25], 5)
    counts, edges = np.histogram([0.25, 0.25], bins=5)
    assert single.counts == counts.tolist() and single.edges == pytest.approx(edges.tolist())
    assert summarize([], 5) is None
    stats = summarize([3.0, -1.0, 2.0, 10.0], 5)
    assert stats is not None and (stats.median, stats.mean) == (2.5, 3.5)


@pytest.mark.slow
def test_risk_after_real_scoring(
    client: TestClient,
    make_key: Callable[..., Headers],
    start_worker: Callable[..., Any],
    tmp_path: Path,
) -> None:
    h = make_key()
    role = new_role(client, h, "Jack Sparrow")
    data = rolebench_file(tmp_path / "jack.jsonl", 4)
    with data.open("rb") as f:
        r = client.post(
            "/v1/datasets", files={"file": (data.name, f)}, data={"role_id": role}, headers=h
        )
    assert r.status_code == 201, r.text
    worker = start_worker()
    job = client.post("/v1/scoring_jobs", json={"dataset_id": r.json()["id"]}, headers=h).json()
    done = wait_for(client, h, job["id"], lambda j: j["status"] in ("succeeded", "failed"))
    assert done["status"] == "succeeded", (done, worker.output()[-3000:])

    item = client.get(f"{RISK}?samples=10&bins=5", headers=h).json()["data"][0]
    assert item["scoring_job_id"] == job["id"] and item["model"] == done["model"]
    assert item["num_flagged"] == done["result"]["num_flagged"]
    rows = subset_all(client, h, job["id"])
    # RoleBench's scored response is its first generated answer.
    want = expected_risk(rows, samples=10, bins=5, answer=lambda row: str(row["generated"][0]))
    check_against(item, want)
