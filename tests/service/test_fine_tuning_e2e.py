"""Fine-tuning end to end over HTTP: real Postgres, Redis, scoring and training workers, model.

Upload RoleBench rows, score them, train a LoRA for a few steps on the bundled model with the
real `sarft worker --queue training`, evaluate on AdvBench prompts (configured on the server by
name), then download the adapter (it loads with peft and changes the logits) and the report in
both formats. A second test kills the training worker (SIGKILL) mid-run: the job resumes from its
checkpoint on the next worker and ends with the adapter of an uninterrupted run.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from tests.service.conftest import (
    rolebench_file,
    score_with_worker,
    tiny_model_allowed,
    upload_rows,
    wait_for,
)

pytestmark = pytest.mark.slow
Headers = dict[str, str]
FT = "/v1/fine_tuning/jobs"


@pytest.fixture(scope="module")
def scored(
    client: TestClient, service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """12 Jack Sparrow rows under a short profile, scored by a real worker (then stopped,
    so that training does not compete with it for the two cores)."""
    from service.core.auth import create_key
    from service.core.db import session_scope

    with session_scope() as session:
        h = {"Authorization": f"Bearer {create_key(session, 'fine-tuning-e2e')}"}
    dataset = upload_rows(
        client, h, rolebench_file(tmp_path_factory.mktemp("ft") / "jack.jsonl", 12)
    )
    scoring = score_with_worker(client, h, service_env, dataset)
    return {"h": h, "dataset": dataset, "scoring": scoring}


@pytest.fixture(scope="module")
def scored_on_tiny(
    client: TestClient,
    service_env: dict[str, str],
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    """The same 12 rows scored on the tiny random Llama: a fine-tuning job of them trains it,
    for tests whose point is how the runs compare, not the bundled model's numbers."""
    from service.core.auth import create_key
    from service.core.db import session_scope

    with session_scope() as session:
        h = {"Authorization": f"Bearer {create_key(session, 'fine-tuning-e2e-tiny')}"}
    dataset = upload_rows(
        client, h, rolebench_file(tmp_path_factory.mktemp("ft-tiny") / "jack.jsonl", 12)
    )
    with tiny_model_allowed(tiny_model_dir) as model:
        scoring = score_with_worker(client, h, service_env, dataset, model=model)
    return {"h": h, "dataset": dataset, "scoring": scoring, "model": model}


def test_train_evaluate_download(
    client: TestClient,
    scored: dict[str, Any],
    start_worker: Callable[..., Any],
    tmp_path: Path,
) -> None:
    from peft import PeftModel

    from worker.model_loader import load_model

    h = scored["h"]
    trainer = start_worker("training")
    body = {
        "dataset_id": scored["dataset"],
        "scoring_job_id": scored["scoring"],
        "method": "sarft",
        # A large rate so that two steps visibly move a fresh (zero-initialised) adapter.
        "hyperparameters": {"batch_size": 4, "micro_batch_size": 2, "max_steps": 2,
                            "learning_rate": 5e-3, "lora": {"r": 8, "alpha": 16}},
        "evaluation": {"max_prompts": 3, "max_new_tokens": 12, "batch_size": 4,
                       "validation_fraction": 0.2},
    }  # fmt: skip
    job = client.post(FT, json=body, headers=h).json()
    done = wait_for(client, h, job["id"], lambda j: j["status"] in ("succeeded", "failed"))
    assert done["status"] == "succeeded", (done, trainer.output()[-4000:])
    assert done["progress"] == {"phase": "done", "step": 2, "total_steps": 2}
    result = done["result"]
    assert result["num_validation"] == 2 and result["num_train"] == 10  # round(0.2 * 12)
    assert result["steps"] == 2 and result["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert done["fine_tuned_model"] == f"ft:{result['base_model']}:{job['id']}"
    assert done["trained_tokens"] == result["trained_tokens"] > 0
    # The final step's checkpoint, with the validation loss on the 2 held-out rows.
    (final,) = client.get(f"{FT}/{job['id']}/checkpoints", headers=h).json()["data"]
    assert final["step_number"] == 2 and final["metrics"]["valid_loss"] > 0
    assert final["metrics"]["valid_loss"] == pytest.approx(result["final_validation"]["valid_loss"])
    weights = client.get(f"{FT}/{job['id']}/checkpoints/{final['id']}/content", headers=h)
    assert weights.status_code == 200 and weights.content[:2] == b"\x1f\x8b"  # gzip
    for which in ("base", "tuned"):
        assert set(result["evaluation"][which]) == {"default", "in_character"}
        for setting in result["evaluation"][which].values():
            rates = setting["refusal_rate"]
            assert set(rates) == {"advbench"} and 0.0 <= rates["advbench"] <= 1.0
            low, high = setting["refusal_ci95"]["advbench"]
            assert low <= rates["advbench"] <= high
            assert 0.0 <= setting["rouge_l"] <= 100.0

    messages = [e["message"] for e in client.get(f"{FT}/{job['id']}/events?limit=100",
                                                 headers=h).json()["data"]]  # fmt: skip
    for expected in (
        "job started",
        "evaluating the base model",
        "training",
        "step 1/2",
        "step 2/2",
        "evaluating the fine-tuned model",
        "job succeeded",
    ):
        assert expected in messages, messages  # fmt: skip
    step = next(e for e in client.get(f"{FT}/{job['id']}/events", headers=h).json()["data"]
                if e["message"] == "step 2/2")  # fmt: skip
    assert {"loss", "ce", "kl", "tokens_per_s", "lr"} <= set(step["data"])

    # The adapter: a .tar.gz of a PEFT directory that loads on the base model and moves logits.
    r = client.get(f"{FT}/{job['id']}/adapter", headers=h)
    assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
    archive = tmp_path / "adapter.tar.gz"
    archive.write_bytes(r.content)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    adapter = tmp_path / "unpacked" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == result["base_model"] and config["r"] == 8
    base = load_model(device="cpu")
    ids = base.tokenizer("Ahoy, who goes there?", return_tensors="pt").input_ids
    with torch.no_grad():
        before = base.model(ids).logits
        tuned = PeftModel.from_pretrained(base.model, adapter)
        after = tuned(ids).logits
    assert (after - before).abs().max().item() > 1e-3

    report = client.get(f"{FT}/{job['id']}/report", headers=h).json()
    assert set(report) >= {"job", "scoring", "training", "evaluation"}
    assert len(report["scoring"]["points"]) == 12
    assert [row["step"] for row in report["training"]["history"]] == [1, 2]
    assert report["evaluation"]["tuned"]["default"]["safety"][0]["n"] == 3
    assert report["evaluation"]["tuned"]["in_character"]["safety"][0]["n"] == 3
    html = client.get(f"{FT}/{job['id']}/report?format=html", headers=h)
    assert html.headers["content-type"].startswith("text/html")
    assert html.text.lstrip().lower().startswith("<!doctype html")
    assert html.text.count("data:image/png;base64,") >= 2  # score scatter, training curves


def _adapter_weights(client: TestClient, h: Headers, job_id: str, into: Path) -> Any:
    from safetensors.torch import load_file

    archive = into / f"{job_id}.tar.gz"
    archive.write_bytes(client.get(f"{FT}/{job_id}/adapter", headers=h).content)
    with tarfile.open(archive) as tar:
        tar.extractall(into / job_id, filter="data")
    return load_file(into / job_id / "adapter" / "adapter_model.safetensors")


def test_killed_training_worker_resumes_from_its_checkpoint(
    client: TestClient, scored: dict[str, Any], start_worker: Callable[..., Any], tmp_path: Path
) -> None:
    from service.core.config import get_settings
    from service.fine_tuning.tasks import reap_stale_jobs

    h = scored["h"]
    env = {"SARFT_HEARTBEAT_S": "0.5", "SARFT_CHECKPOINT_EVERY": "2"}
    body = {
        "dataset_id": scored["dataset"],
        "scoring_job_id": scored["scoring"],
        # Dropout: the resumed run must also restore the RNG to end as the clean run does.
        "hyperparameters": {"batch_size": 2, "micro_batch_size": 1,
                            "learning_rate": 5e-3, "lora": {"r": 8, "alpha": 16, "dropout": 0.1}},
        "evaluation": None,
    }  # fmt: skip
    trainer = start_worker("training", **env)
    clean = client.post(FT, json=body, headers=h).json()
    done = wait_for(client, h, clean["id"], lambda j: j["status"] in ("succeeded", "failed"))
    assert done["status"] == "succeeded", trainer.output()[-3000:]

    job = client.post(FT, json=body, headers=h).json()
    # Killed after the step-2 checkpoint is recorded and before the last (6th) step.
    wait_for(client, h, job["id"], lambda j: j["progress"]["step"] >= 3)
    trainer.kill()
    killed_at = client.get(f"{FT}/{job['id']}", headers=h).json()["progress"]["step"]
    assert killed_at < 6, "the run ended before the kill: nothing was resumed"
    settings = get_settings()
    saved, settings.stale_after_s = settings.stale_after_s, 2.0
    try:
        # This process plays the reaper that every other worker and the API run.
        wait_for(client, h, job["id"], lambda _: reap_stale_jobs() > 0, timeout=60)
    finally:
        settings.stale_after_s = saved
    assert client.get(f"{FT}/{job['id']}", headers=h).json()["status"] == "queued"

    again = start_worker("training", **env)
    done = wait_for(client, h, job["id"], lambda j: j["status"] in ("succeeded", "failed"))
    assert done["status"] == "succeeded", again.output()[-3000:]
    resumed_from = done["result"]["resumed_from_step"]
    assert resumed_from in (2, 4) and resumed_from <= killed_at
    messages = [e["message"] for e in client.get(f"{FT}/{job['id']}/events?limit=100",
                                                  headers=h).json()["data"]]  # fmt: skip
    assert "job resumed" in messages
    assert any("queued again to resume" in m for m in messages)
    checkpoints = client.get(f"{FT}/{job['id']}/checkpoints", headers=h).json()["data"]
    assert [c["step_number"] for c in checkpoints] == [6, 4, 2]  # 12 rows, 2 per step

    resumed_weights = _adapter_weights(client, h, job["id"], tmp_path)
    clean_weights = _adapter_weights(client, h, clean["id"], tmp_path)
    assert resumed_weights.keys() == clean_weights.keys()
    for name, value in resumed_weights.items():
        # The same steps on the same CPU in the same order: equal to float32 rounding.
        torch.testing.assert_close(value, clean_weights[name], atol=1e-6, rtol=0, msg=name)


def test_two_training_processes_end_with_the_one_process_adapter(
    client: TestClient,
    scored_on_tiny: dict[str, Any],
    start_worker: Callable[..., Any],
    tmp_path: Path,
) -> None:
    h = scored_on_tiny["h"]
    body = {
        "dataset_id": scored_on_tiny["dataset"],
        "scoring_job_id": scored_on_tiny["scoring"],
        # 4 micro-batches a step, 2 for each process; dropout 0 (the authors'): the processes
        # would draw other masks than one process.
        "hyperparameters": {"batch_size": 4, "micro_batch_size": 1, "max_steps": 2,
                            "learning_rate": 5e-3, "lora": {"r": 8, "alpha": 16}},
        "evaluation": None,
    }  # fmt: skip
    jobs = {}
    for processes in ("1", "2"):
        worker = start_worker("training", SARFT_TRAINING_PROCESSES=processes)
        job = client.post(FT, json=body, headers=h).json()
        done = wait_for(client, h, job["id"], lambda j: j["status"] in ("succeeded", "failed"))
        assert done["status"] == "succeeded", (done, worker.output()[-4000:])
        worker.stop()
        jobs[processes] = done
    assert [e["progress"]["step"] for e in jobs.values()] == [2, 2]
    one = _adapter_weights(client, h, jobs["1"]["id"], tmp_path)
    two = _adapter_weights(client, h, jobs["2"]["id"], tmp_path)
    assert one.keys() == two.keys()
    for name, value in two.items():
        # Sums in another order move a gradient by float rounding; Adam's first update of a
        # lora_A weight (its gradient is near 0 while lora_B starts at 0) divides by that
        # tiny gradient's own size, which amplified it to 7.7e-5 on 0.07% of those weights
        # on the bundled model (their largest value is 0.045). On the tiny model the runs
        # agree within 5e-7 (weights up to 0.13); processes that skip the all-reduce differ
        # by 0.02.
        torch.testing.assert_close(value, one[name], atol=1e-4, rtol=1e-4, msg=name)
    # The main process alone recorded the steps: one event each, as with one process.
    events = client.get(f"{FT}/{jobs['2']['id']}/events?limit=100", headers=h).json()["data"]
    assert sum(e["message"].startswith("step ") for e in events) == 2
