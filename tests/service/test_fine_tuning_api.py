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
    assert builtin["evaluation"]["dtype"] == "auto" and builtin["evaluation"]["batch_size"] == 32
    # A jailbreak set needs no file of its own: the server rewrites its AdvBench goals.
    attacked = create(client, scored, evaluation={"safety_sets": [{"name": "advbench-caesar"}]})
    assert attacked.json()["evaluation"]["safety_sets"] == [{"name": "advbench-caesar"}]
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
        ({"hyperparameters": {"optimizer_in_backward": True}}, "max_grad_norm"),
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


def test_reaper_requeues_a_job_whose_worker_stopped_then_fails_it_after_max_attempts(
    client: TestClient, scored: dict[str, Any]
) -> None:
    from service.core.config import get_settings
    from service.core.db import session_scope, utcnow
    from service.fine_tuning.tasks import reap_stale_jobs
    from service.models import FineTuningJob, JobStatus

    job = create(client, scored).json()
    url, h = f"{FT}/{job['id']}", scored["h"]

    def lose_worker(attempts: int) -> None:
        with session_scope() as session:
            row = session.get(FineTuningJob, job["id"])
            assert row is not None
            row.status, row.phase, row.step, row.total_steps = JobStatus.RUNNING, "training", 3, 10
            row.worker, row.attempts = "host:123", attempts
            row.heartbeat_at = utcnow() - timedelta(hours=1)

    lose_worker(attempts=1)
    assert reap_stale_jobs() >= 1
    got = client.get(url, headers=h).json()
    assert got["status"] == "queued" and got["error"] is None
    events = client.get(f"{url}/events", headers=h).json()["data"]
    assert (
        "host:123 stopped responding during training at step 3 (of 10 steps)"
        in (events[0]["message"])
    )
    assert "resume from its newest checkpoint" in events[0]["message"]

    lose_worker(attempts=get_settings().max_attempts)
    assert reap_stale_jobs() >= 1
    got = client.get(url, headers=h).json()
    assert got["status"] == "failed"
    assert got["error"]["code"] == "worker_lost"
    assert (
        "host:123 stopped responding during training at step 3 (of 10 steps)"
        in (got["error"]["message"])
    )
    assert "create a new job" in got["error"]["message"]
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


def test_openai_job_fields(client: TestClient, scored: dict[str, Any]) -> None:
    from service.core.db import session_scope
    from service.models import FineTuningJob

    meta = {"team": "story", "ticket": "RP-12"}
    job = create(client, scored, seed=7, suffix="nemo-v1", metadata=meta).json()
    assert job["seed"] == 7 and job["hyperparameters"]["seed"] == 7
    assert job["suffix"] == "nemo-v1" and job["metadata"] == meta
    assert job["trained_tokens"] == 0 and job["estimated_finish"] is None
    assert job["fine_tuned_model"] is None and job["error"] is None
    assert create(client, scored).json()["seed"] == 0  # the trainer's default

    # While a worker checks the job's rows, the job reads as OpenAI's validating_files.
    with session_scope() as session:
        row = session.get(FineTuningJob, job["id"])
        assert row is not None
        row.status, row.phase = "running", "validating_files"
    got = client.get(f"{FT}/{job['id']}", headers=scored["h"]).json()
    assert got["status"] == "validating_files"

    err = error(create(client, scored, seed=1, hyperparameters={"seed": 2}), 422)
    assert err["param"] == "seed"
    assert create(client, scored, seed=3, hyperparameters={"seed": 3}).status_code == 201
    assert error(create(client, scored, suffix="no spaces"), 422)
    too_many = {f"k{i}": "v" for i in range(17)}
    assert error(create(client, scored, metadata=too_many), 422)


def test_validation_dataset_must_be_another_scored_dataset_of_the_role(
    client: TestClient, scored: dict[str, Any], tmp_path: Path
) -> None:
    h = scored["h"]
    same = error(create(client, scored, validation_dataset_id=scored["dataset"]), 422)
    assert same["param"] == "validation_dataset_id"

    other_role = _dataset(client, h, rolebench_file(tmp_path / "other.jsonl", 3))
    assert (
        "another role"
        in error(create(client, scored, validation_dataset_id=other_role), 422)["message"]
    )

    role_id = client.get(f"/v1/datasets/{scored['dataset']}", headers=h).json()["role_id"]
    path = rolebench_file(tmp_path / "val.jsonl", 3)
    with path.open("rb") as f:
        r = client.post(
            "/v1/datasets", files={"file": (path.name, f)}, data={"role_id": role_id}, headers=h
        )
    validation = r.json()["id"]
    unscored = error(create(client, scored, validation_dataset_id=validation), 409)
    assert "score it first" in unscored["message"]

    scoring = _scoring_job(client, h, validation)
    job = create(client, scored, validation_dataset_id=validation).json()
    assert job["validation_dataset_id"] == validation
    assert job["validation_scoring_job_id"] == scoring


def test_checkpoints_are_listed_newest_first_and_downloaded(
    client: TestClient, scored: dict[str, Any], make_key: Callable[..., Headers]
) -> None:
    from service.core.db import session_scope
    from service.fine_tuning.storage import artifact_dir
    from service.models import FineTuningCheckpoint

    job = create(client, scored, suffix="nemo").json()
    url, h = f"{FT}/{job['id']}/checkpoints", scored["h"]
    assert client.get(url, headers=h).json() == {"object": "list", "data": [], "has_more": False}
    with session_scope() as session:
        for step in (10, 20):
            archive = artifact_dir(job["id"]) / f"checkpoints/step-{step:06d}/adapter.tar.gz"
            archive.parent.mkdir(parents=True)
            archive.write_bytes(f"weights of step {step}".encode())
            session.add(
                FineTuningCheckpoint(
                    id=f"ftckpt_{step:024d}", job_id=job["id"], step_number=step,
                    metrics={"loss": 1.5, "ce": 1.0, "kl": 1.0, "valid_loss": 2.0, "tokens": 9},
                    archive=str(archive.relative_to(artifact_dir(job["id"]))),
                )
            )  # fmt: skip
    listed = client.get(url, headers=h).json()
    assert [c["step_number"] for c in listed["data"]] == [20, 10]
    newest = listed["data"][0]
    assert newest["object"] == "fine_tuning.job.checkpoint"
    assert newest["fine_tuning_job_id"] == job["id"]
    assert newest["metrics"] == {
        "step": 20.0, "train_loss": 1.5, "train_ce": 1.0, "train_kl": 1.0, "valid_loss": 2.0
    }  # fmt: skip
    assert newest["fine_tuned_model_checkpoint"].endswith(f":nemo:{job['id']}:ckpt-step-20")
    page = client.get(url, params={"limit": 1, "after": newest["id"]}, headers=h).json()
    assert [c["step_number"] for c in page["data"]] == [10] and not page["has_more"]

    content = client.get(f"{url}/{newest['id']}/content", headers=h)
    assert content.status_code == 200 and content.content == b"weights of step 20"
    assert error(client.get(f"{url}/ftckpt_nope/content", headers=h), 404)
    stranger = make_key()
    assert error(client.get(url, headers=stranger), 404)
    assert error(client.get(f"{url}/{newest['id']}/content", headers=stranger), 404)
