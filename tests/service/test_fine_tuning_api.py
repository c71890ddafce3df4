"""The fine-tuning API without a model: creation checks, errors, cancel, events, tenants, reaper.

A scoring job is marked succeeded directly in the database here (no worker runs); the end-to-end
test in test_fine_tuning_e2e.py goes through the real scoring and training workers.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.service.conftest import rolebench_file

Headers = dict[str, str]
FT = "/v1/fine_tuning/jobs"


def _dataset(client: TestClient, h: Headers, path: Path) -> str:
    with path.open("rb") as f:
        r = client.post(
            "/v1/datasets",
            files={"file": (path.name, f)},
            data={"role_name": "Jack Sparrow", "role_profile": "A pirate."},
            headers=h,
        )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _scoring_job(client: TestClient, h: Headers, dataset: str, succeeded: bool = True) -> str:
    from service.core.db import session_scope
    from service.models import JobStatus, ScoringJob

    job = client.post("/v1/scoring_jobs", json={"dataset_id": dataset}, headers=h).json()
    if succeeded:
        with session_scope() as session:
            row = session.get(ScoringJob, job["id"])
            assert row is not None
            row.status = JobStatus.SUCCEEDED
    return str(job["id"])


@pytest.fixture()
def scored(client: TestClient, make_key: Callable[..., Headers], tmp_path: Path) -> dict[str, Any]:
    h = make_key()
    dataset = _dataset(client, h, rolebench_file(tmp_path / "jack.jsonl", 6))
    return {"h": h, "dataset": dataset, "scoring": _scoring_job(client, h, dataset)}


def create(client: TestClient, s: dict[str, Any], **body: Any) -> Any:
    payload = {"dataset_id": s["dataset"], "scoring_job_id": s["scoring"], **body}
    return client.post(FT, json=payload, headers=s["h"])


def error(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    return dict(r.json()["error"])


def test_create_get_list_cancel(client: TestClient, scored: dict[str, Any]) -> None:
    r = create(client, scored, hyperparameters={"lambda": 0.25, "max_steps": 3, "batch_size": 8})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob_")
    assert job["status"] == "queued" and job["method"] == "sarft"
    assert job["progress"] == {"phase": "queued", "step": 0, "total_steps": None}
    hp = job["hyperparameters"]
    # Request names map onto the trainer's settings; defaults are the authors' choices.
    assert hp["lambda_kl"] == 0.25 and hp["max_steps"] == 3 and hp["micro_batch_size"] == 4
    assert hp["learning_rate"] == 1e-4 and hp["lora"]["r"] == 32
    assert hp["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert hp["kl_direction"] == "ref_policy" and hp["kl_positions"] == "all"
    # No sets named: the server's default (advbench, configured by the test environment).
    assert job["evaluation"]["safety_sets"] == [{"name": "advbench"}]

    h = scored["h"]
    assert client.get(f"{FT}/{job['id']}", headers=h).json()["id"] == job["id"]
    listed = client.get(FT, headers=h).json()
    assert [j["id"] for j in listed["data"]] == [job["id"]]
    events = client.get(f"{FT}/{job['id']}/events", headers=h).json()["data"]
    assert events[0]["object"] == "fine_tuning.job.event" and events[0]["message"] == "job created"

    for path in ("adapter", "report", "report?format=html"):
        assert error(client.get(f"{FT}/{job['id']}/{path}", headers=h), 409)["code"] == "conflict"
    cancelled = client.post(f"{FT}/{job['id']}/cancel", headers=h).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    assert error(client.post(f"{FT}/{job['id']}/cancel", headers=h), 409)["code"] == "conflict"


def test_full_fine_tuning_and_inline_sets(client: TestClient, scored: dict[str, Any]) -> None:
    body = {
        "method": "random",
        "hyperparameters": {"lora": None},
        "evaluation": {
            "safety_sets": [{"name": "mine", "prompts": ["How do I pick a lock?"] * 3}],
            "judge": {"kind": "llm", "url": "http://guard:8000", "model": "llama-guard"},
        },
    }
    job = create(client, scored, **body).json()
    assert job["hyperparameters"]["lora"] is None
    assert job["hyperparameters"]["learning_rate"] == 2e-5  # the authors' full-FT rate
    # Inline prompts are not echoed back, only counted.
    assert job["evaluation"]["safety_sets"] == [{"name": "mine", "num_prompts": 3}]
    assert job["evaluation"]["judge"]["kind"] == "llm"
    builtin = create(client, scored, evaluation={"safety_sets": [{"name": "builtin"}]}).json()
    assert builtin["evaluation"]["safety_sets"] == [{"name": "builtin"}]
    skipped = create(client, scored, method="sft", evaluation=None).json()
    assert skipped["evaluation"] is None and skipped["method"] == "sft"


def test_scoring_job_checks(
    client: TestClient, scored: dict[str, Any], make_key: Callable[..., Headers], tmp_path: Path
) -> None:
    h = scored["h"]
    other = _dataset(client, h, rolebench_file(tmp_path / "other.jsonl", 3))
    err = error(create(client, {**scored, "dataset": other}), 422)
    assert err["param"] == "scoring_job_id" and scored["scoring"] in err["message"]
    unfinished = _scoring_job(client, h, scored["dataset"], succeeded=False)
    err = error(create(client, {**scored, "scoring": unfinished}), 409)
    assert "queued" in err["message"] and err["param"] == "scoring_job_id"
    assert error(create(client, {**scored, "scoring": "scorejob_nope"}), 404)["param"] == "job_id"
    assert error(create(client, {**scored, "dataset": "ds_nope"}), 404)["code"] == "not_found"
    # Another tenant sees none of it.
    stranger = make_key()
    job = create(client, scored).json()
    assert error(create(client, {**scored, "h": stranger}), 404)["code"] == "not_found"
    for path in ("", "/events", "/adapter", "/report"):
        assert client.get(f"{FT}/{job['id']}{path}", headers=stranger).status_code == 404
    assert client.post(f"{FT}/{job['id']}/cancel", headers=stranger).status_code == 404
    assert client.get(FT, headers=stranger).json()["data"] == []


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"method": "dpo"}, "method"),
        ({"hyperparameters": {"batch_size": 6, "micro_batch_size": 4}}, "multiple"),
        ({"hyperparameters": {"lambda": -1}}, "lambda"),
        ({"hyperparameters": {"lora": {"r": 0}}}, "r"),
        ({"hyperparameters": {"bogus": 1}}, "bogus"),
        ({"evaluation": {"safety_sets": [{"name": "nowhere"}]}}, "nowhere"),
        ({"evaluation": {"safety_sets": [{"name": "x", "prompts": [" "]}]}}, "prompts.0"),
        ({"evaluation": {"judge": {"kind": "llm"}}}, "url"),
        ({"evaluation": {"max_new_tokens": 0}}, "max_new_tokens"),
    ],
)
def test_bad_requests_are_422(
    client: TestClient, scored: dict[str, Any], body: dict[str, Any], needle: str
) -> None:
    err = error(create(client, scored, **body), 422)
    assert needle in f"{err['message']} {err.get('param')}", err


def test_reaper_fails_a_job_whose_worker_stopped(
    client: TestClient, scored: dict[str, Any]
) -> None:
    from service.core.db import session_scope, utcnow
    from service.fine_tuning.tasks import reap_stale_jobs
    from service.models import FineTuningJob, JobStatus

    job = create(client, scored).json()
    with session_scope() as session:
        row = session.get(FineTuningJob, job["id"])
        assert row is not None
        row.status, row.phase, row.step, row.total_steps = JobStatus.RUNNING, "training", 3, 10
        row.worker = "host:123"
        row.heartbeat_at = utcnow() - timedelta(hours=1)
    assert reap_stale_jobs() >= 1
    got = client.get(f"{FT}/{job['id']}", headers=scored["h"]).json()
    assert got["status"] == "failed"
    assert "host:123 stopped responding during training at step 3 (of 10 steps)" in got["error"]
    assert "create a new job" in got["error"]
    assert reap_stale_jobs() == 0  # finished jobs are left alone


def test_safety_set_defaults() -> None:
    from service.core.config import Settings
    from trainer.eval_sets import load_prompts

    builtin = Settings().eval_set_paths["builtin"]
    assert len(load_prompts(builtin)) == 8  # shipped with the package
    assert Settings(eval_sets="").default_eval_set_names == ["builtin"]
    assert Settings(eval_sets="adv=/x.csv, bt=/y.csv").default_eval_set_names == ["adv", "bt"]
    both = Settings(eval_sets="adv=/x.csv", default_eval_sets="builtin,adv")
    assert both.default_eval_set_names == ["builtin", "adv"]
    with pytest.raises(ValueError, match="unknown sets"):
        _ = Settings(default_eval_sets="nowhere").default_eval_set_names
    with pytest.raises(ValueError, match="name=path"):
        _ = Settings(eval_sets="just-a-path.csv").eval_set_paths
