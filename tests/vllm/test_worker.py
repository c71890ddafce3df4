"""Scoring jobs of the normal API (Postgres, Redis) served by real `sarft worker --queue scoring`
processes on the vLLM backend (bfloat16, with the float32 check), the bundled model."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from fastapi.testclient import TestClient

from tests.service.conftest import (  # noqa: F401  (fixtures)
    SHARED_DATA,
    client,
    make_key,
    rolebench_file,
    service_env,
    start_worker,
    wait_for,
)
from tests.service.test_scoring_jobs import sarft_role, subset, upload

Headers = dict[str, str]
VLLM_WORKER = {
    "SARFT_SCORING_BACKEND": "vllm",
    "SARFT_SCORING_DTYPE": "bfloat16",
    "SARFT_VLLM_KV_CACHE_GIB": "1",
}
FAST_FAILOVER = {"SARFT_CHUNK_SIZE": "2", "SARFT_HEARTBEAT_S": "0.5", "SARFT_STALE_AFTER_S": "4"}


@pytest.fixture()
def vllm_jobs(service_env: dict[str, str]) -> Iterator[None]:  # noqa: F811
    """The API of this process stamps new scoring jobs vllm / bfloat16, as a deployment whose
    workers run vLLM sets it."""
    from service.core.config import get_settings

    with pytest.MonkeyPatch.context() as patch:
        for key, value in VLLM_WORKER.items():
            patch.setenv(key, value)
        get_settings.cache_clear()
        yield
    get_settings.cache_clear()


def finished(client: TestClient, h: Headers, job: str) -> dict[str, Any]:  # noqa: F811
    return wait_for(client, h, job, lambda j: j["status"] in ("succeeded", "failed"))


def engine_processes(worker: Any) -> list[psutil.Process]:
    return psutil.Process(worker.proc.pid).children(recursive=True)


def test_vllm_workers_score_a_job_like_float32_and_a_killed_one_resumes(
    client: TestClient,  # noqa: F811
    make_key: Callable[..., Headers],  # noqa: F811
    start_worker: Callable[..., Any],  # noqa: F811
    vllm_jobs: None,
    tmp_path: Path,
) -> None:
    """A job on a vLLM worker killed mid-way ends on a second one; a clean job of the same data
    on the second worker scores like the float32 transformers engine, and the resumed job like
    the clean one."""
    from worker.prompts import RolePrompts
    from worker.score_file import score_file

    h = make_key()
    data = rolebench_file(tmp_path / "jack.jsonl", 24)
    ds = upload(client, h, data, sarft_role(client, h))
    first = start_worker(**VLLM_WORKER, **FAST_FAILOVER)
    job = client.post("/v1/scoring_jobs", json={"dataset_id": ds}, headers=h).json()
    assert job["backend"] == "vllm"
    job_id = job["id"]
    mid = wait_for(client, h, job_id, lambda j: j["progress"]["processed"] >= 2)
    assert mid["status"] == "running" and mid["progress"]["processed"] < 24, mid
    assert "starting vLLM" in first.output()
    children = engine_processes(first)
    assert children, "vLLM runs its engine in a child process"
    first.kill()
    killed_at = wait_for(client, h, job_id, lambda j: True)["progress"]["processed"]
    # The engine's process must not outlive its worker (it holds the KV cache and a core).
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.pid for p in alive]

    second = start_worker(**VLLM_WORKER, **FAST_FAILOVER)
    done = finished(client, h, job_id)
    assert done["status"] == "succeeded", (done, second.output()[-3000:])
    assert done["progress"]["processed"] == 24
    clean = client.post("/v1/scoring_jobs", json={"dataset_id": ds}, headers=h).json()["id"]
    assert finished(client, h, clean)["status"] == "succeeded"
    resumed_rows, clean_rows = subset(client, h, job_id, "all"), subset(client, h, clean, "all")
    assert 2 <= killed_at < 24

    prompts = RolePrompts.from_file(SHARED_DATA / "sarft" / "role_prompts_v2.json", "Jack Sparrow")
    out = tmp_path / "float32"
    score_file(data, prompts, out)
    exact = [json.loads(x)["scores"] for x in (out / "scores.jsonl").read_text().splitlines()]
    # vLLM is not batch-invariant: in bf16 a row's means move by up to about 0.01 between two
    # runs of the same chunk (worker/scoring/vllm_backend.py), so a resumed job is held to the
    # same rows, token counts and flags as a clean one, and to means within that noise. A row
    # written from the wrong sample, or twice, would be off by far more.
    assert [r["question"] for r in resumed_rows] == [r["question"] for r in clean_rows]
    for resumed, fresh, want in zip(resumed_rows, clean_rows, exact, strict=True):
        assert resumed["scores"]["flagged"] == fresh["scores"]["flagged"] == want["flagged"]
        for condition in ("role", "unsafe", "ref"):
            got, again = resumed["scores"][condition], fresh["scores"][condition]
            assert got["count"] == again["count"] == want[condition]["count"]
            assert abs(got["mean"] - again["mean"]) < 0.03, (resumed, fresh)
            assert abs(again["mean"] - want[condition]["mean"]) < 0.05, (fresh, want)
