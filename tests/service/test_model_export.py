"""The merged-model export over HTTP on the real Postgres.

Without a model, the queue replaced by a fake: the states a request sees, what it queues, and
a full fine-tuning job's checkpoint served at once. End to end (slow), with the real Redis,
scoring and training workers and the tests' tiny random Llama (the export's steps and its
arithmetic are those of any Llama; the bundled model would merge and archive 540 MB): a LoRA
job trains two steps with no evaluation; its model cannot be downloaded before an export; a
failed export is recorded and leaves no files; the export then runs on the real training
worker (asked twice, queued once) and `sarft jobs export-model` downloads it. The merged
directory loads with plain transformers and computes the logits of base + adapter.
"""

from __future__ import annotations

import json
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tests.service.conftest import (
    WorkerProcess,
    rolebench_file,
    score_with_worker,
    tiny_model_allowed,
    upload_rows,
    wait_for,
)

Headers = dict[str, str]
FT = "/v1/fine_tuning/jobs"
# fp32 layers merged (x @ (W + s B A)) or not (x @ W + s (x @ A) @ B): the same sums rounded
# in another order: 6e-7 here. A bf16 round trip (6e-3) or an adapter merged at 1.1 times its
# scale (9e-3) differs far more, on the tiny model as on the bundled one.
TOLERANCE = 1e-5  # of the largest logit's magnitude


class FakeQueue:
    """Holds what it was given until released; unreachable when ``up`` is False, and refusing
    tasks (Redis lost between the ping and the enqueue) when ``accepting`` is."""

    def __init__(self) -> None:
        self.enqueued: list[tuple[str, Any, tuple[Any, ...], str]] = []
        self.held: set[str] = set()
        self.up = self.accepting = True

    def enqueue(self, queue: str, func: Any, *args: Any, job_id: str) -> None:
        if not (self.up and self.accepting):
            raise ConnectionError("Redis went away")
        self.enqueued.append((queue, func, args, job_id))
        self.held.add(job_id)

    def exports(self) -> list[tuple[str, Any, tuple[Any, ...], str]]:
        from service.fine_tuning.export_tasks import export_merged_model

        return [task for task in self.enqueued if task[1] is export_merged_model]

    def holds(self, queue: str, job_id: str) -> bool:
        return job_id in self.held

    def ping(self) -> bool:
        return self.up


@pytest.fixture()
def fake_queue(service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> FakeQueue:
    from service.core import queue
    from service.fine_tuning import export_tasks

    fake = FakeQueue()
    monkeypatch.setattr(queue, "get_queue", lambda: fake)  # what dispatch and require_queue use
    monkeypatch.setattr(export_tasks, "get_queue", lambda: fake)
    return fake


def _finished_job(client: TestClient, h: Headers, tmp_path: Path, lora: bool) -> str:
    """A fine-tuning job marked succeeded, with the archive its run would have published."""
    from sqlalchemy import update

    from service.core.db import session_scope
    from service.fine_tuning.storage import artifact_dir
    from service.models import FineTuningJob, JobStatus, ScoringJob

    dataset = upload_rows(client, h, rolebench_file(tmp_path / "jack.jsonl", 2))
    scoring = client.post("/v1/scoring_jobs", json={"dataset_id": dataset}, headers=h).json()["id"]
    with session_scope() as session:
        session.execute(
            update(ScoringJob).where(ScoringJob.id == scoring).values(status=JobStatus.SUCCEEDED)
        )
    body = {"dataset_id": dataset, "scoring_job_id": scoring, "evaluation": None,
            "hyperparameters": {} if lora else {"lora": None}}  # fmt: skip
    job = client.post(FT, json=body, headers=h).json()["id"]
    r = client.post(f"{FT}/{job}/model", headers=h)
    assert r.status_code == 409 and "queued" in r.json()["error"]["message"], r.text
    assert client.get(f"{FT}/{job}/model", headers=h).status_code == 409
    with session_scope() as session:
        session.execute(
            update(FineTuningJob).where(FineTuningJob.id == job).values(status=JobStatus.SUCCEEDED)
        )
    out = artifact_dir(job)
    out.mkdir(parents=True, exist_ok=True)
    (out / ("adapter.tar.gz" if lora else "model.tar.gz")).write_bytes(b"\x1f\x8b weights")
    return str(job)


def test_a_full_fine_tuning_job_serves_its_checkpoint_at_once(
    client: TestClient, fake_queue: FakeQueue, make_key: Callable[..., Headers], tmp_path: Path
) -> None:
    h = make_key()
    job = _finished_job(client, h, tmp_path, lora=False)
    r = client.post(f"{FT}/{job}/model", headers=h)
    assert r.status_code == 202, r.text
    assert r.json() == {"object": "fine_tuning.job.model_export", "job_id": job,
                        "status": "ready", "bytes": 10}  # fmt: skip
    r = client.get(f"{FT}/{job}/model", headers=h)
    assert r.status_code == 200 and r.content == b"\x1f\x8b weights"
    assert r.headers["content-type"] == "application/gzip"
    assert f'filename="{job}-merged_model.tar.gz"' in r.headers["content-disposition"]
    assert fake_queue.exports() == []
    assert client.post(f"{FT}/{job}/model", headers=make_key()).status_code == 404


def test_a_lora_export_is_queued_once_and_reports_its_state(
    client: TestClient, fake_queue: FakeQueue, make_key: Callable[..., Headers], tmp_path: Path
) -> None:
    from service.core.db import session_scope
    from service.core.events import add_event
    from service.fine_tuning.export_tasks import EXPORT_STARTED, export_merged_model
    from service.fine_tuning.storage import artifact_dir

    h = make_key()
    job = _finished_job(client, h, tmp_path, lora=True)
    path = f"{FT}/{job}/model"
    r = client.get(path, headers=h)
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
    assert f"POST /v1/fine_tuning/jobs/{job}/model first" in r.json()["error"]["message"]

    fake_queue.up = False
    assert client.post(path, headers=h).status_code == 503
    fake_queue.up = True
    assert client.post(path, headers=h).json()["status"] == "queued"
    assert client.post(path, headers=h).json()["status"] == "queued"
    assert fake_queue.exports() == [("training", export_merged_model, (job,), f"export-{job}")]
    with session_scope() as session:  # what the worker records as it starts
        add_event(session, job, EXPORT_STARTED)
    assert client.post(path, headers=h).json()["status"] == "running"
    r = client.get(path, headers=h)
    assert r.status_code == 409 and r.json()["error"]["code"] == "export_in_progress", r.text

    (artifact_dir(job) / "merged_model.tar.gz").write_bytes(b"merged")
    fake_queue.held.clear()
    ready = client.post(path, headers=h).json()
    assert ready["status"] == "ready" and ready["bytes"] == 6
    assert client.get(path, headers=h).content == b"merged"
    assert len(fake_queue.exports()) == 1


def test_an_export_that_cannot_be_queued_answers_503_and_records_nothing(
    client: TestClient, fake_queue: FakeQueue, make_key: Callable[..., Headers], tmp_path: Path
) -> None:
    h = make_key()
    job = _finished_job(client, h, tmp_path, lora=True)
    fake_queue.accepting = False
    r = client.post(f"{FT}/{job}/model", headers=h)
    assert r.status_code == 503, r.text
    events = client.get(f"{FT}/{job}/events", headers=h).json()["data"]
    assert not [e for e in events if "merged model export" in e["message"]]


def _succeeded_lora_job(
    client: TestClient,
    h: Headers,
    service_env: dict[str, str],
    start_worker: Callable[..., WorkerProcess],
    tmp_path: Path,
    model: str,
) -> tuple[str, WorkerProcess]:
    """A LoRA job of 2 steps on 4 rows scored on ``model`` (so trained on it), and the
    training worker that ran it."""
    # Started first, so that it starts up while the rows are scored: on the tiny model neither
    # worker needs the cores for long.
    trainer = start_worker("training")
    dataset = upload_rows(client, h, rolebench_file(tmp_path / "jack.jsonl", 4))
    scoring_id = score_with_worker(client, h, service_env, dataset, model=model)
    body = {
        "dataset_id": dataset,
        "scoring_job_id": scoring_id,
        # A large rate so that two steps visibly move a fresh (zero-initialised) adapter.
        "hyperparameters": {"batch_size": 2, "micro_batch_size": 2, "max_steps": 2,
                            "learning_rate": 5e-3, "lora": {"r": 8, "alpha": 16}},
        "evaluation": None,
    }  # fmt: skip
    job = client.post(FT, json=body, headers=h).json()
    early = client.post(f"{FT}/{job['id']}/model", headers=h)
    assert early.status_code == 409 and "succeeded" in early.json()["error"]["message"]
    done = wait_for(client, h, job["id"], lambda j: j["status"] in ("succeeded", "failed"))
    assert done["status"] == "succeeded", (done, trainer.output()[-4000:])
    return job["id"], trainer


def _fail_one_export(job_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the export task here with a merge that writes part of its files, then fails."""
    import trainer.export
    from service.fine_tuning.export_tasks import export_merged_model
    from service.fine_tuning.storage import artifact_dir

    def broken_merge(adapter: Path, out_dir: Path, model: str | None = None) -> Path:
        (out_dir / trainer.export.WORK_DIR).mkdir()
        (out_dir / "merged_model.tar.gz.part").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer.export, "merge_adapter", broken_merge)
    with pytest.raises(OSError, match="No space left"):
        export_merged_model(job_id)
    left = sorted(p.name for p in artifact_dir(job_id).iterdir())
    assert ".merged_model.work" not in left and "merged_model.tar.gz.part" not in left, left


@pytest.mark.slow
def test_export_merges_the_adapter_into_a_plain_checkpoint(
    client: TestClient,
    service_env: dict[str, str],
    start_worker: Callable[..., WorkerProcess],
    make_key: Callable[..., Headers],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    tiny_model_dir: Path,
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sarft import client_cli
    from sarft.cli import app as cli_app
    from sarft.client import SarftClient
    from worker.model_loader import load_model

    h = make_key()
    with tiny_model_allowed(tiny_model_dir) as model:
        job_id, trainer = _succeeded_lora_job(client, h, service_env, start_worker, tmp_path, model)
    model_path = f"{FT}/{job_id}/model"

    r = client.get(model_path, headers=h)
    assert r.status_code == 409 and "POST" in r.json()["error"]["message"], r.text
    _fail_one_export(job_id, monkeypatch)
    r = client.get(model_path, headers=h)
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
    assert "No space left on device" in r.json()["error"]["message"], r.text

    # A failed export runs again when asked; asking again while it runs queues nothing more.
    first = client.post(model_path, headers=h)
    assert first.status_code == 202, first.text
    assert first.json() == {"object": "fine_tuning.job.model_export", "job_id": job_id,
                            "status": "queued"}  # fmt: skip
    again = client.post(model_path, headers=h).json()
    assert again["status"] in ("queued", "running"), again
    r = client.get(model_path, headers=h)
    assert r.status_code == 409 and r.json()["error"]["code"] == "export_in_progress", r.text

    # The CLI asks once more (still one task), waits and downloads.
    key = h["Authorization"].removeprefix("Bearer ")

    def make_client(_url: str | None, api_key: str | None) -> SarftClient:
        return SarftClient(base_url="http://testserver", api_key=api_key, http=client)

    monkeypatch.setattr(client_cli, "make_client", make_client)
    archive = tmp_path / "merged.tar.gz"
    run = CliRunner().invoke(
        cli_app,
        ["jobs", "export-model", job_id, "-o", str(archive), "--poll", "0.5", "--api-key", key],
    )
    assert run.exit_code == 0, (run.output, trainer.output()[-4000:])
    ready = client.post(model_path, headers=h).json()
    assert ready["status"] == "ready" and ready["bytes"] == archive.stat().st_size

    # The worker records the export's end just after it publishes the archive, which the CLI
    # may have downloaded before that (at once, from a small model).
    deadline = time.monotonic() + 60
    while True:
        events = client.get(f"{FT}/{job_id}/events?limit=100", headers=h).json()["data"]
        exports = [e["message"] for e in reversed(events) if "merged model export" in e["message"]]
        if exports[-1:] == ["merged model export finished"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert exports == ["merged model export started", "merged model export failed",
                       "merged model export queued", "merged model export started",
                       "merged model export finished"], exports  # fmt: skip

    with tarfile.open(archive) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "merged", filter="data")
    merged_dir = tmp_path / "merged" / "merged_model"
    files = {Path(n).name for n in names}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not [f for f in files if f.startswith("adapter_")], files
    config = json.loads((merged_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"

    adapter = tmp_path / "adapter.tar.gz"
    adapter.write_bytes(client.get(f"{FT}/{job_id}/adapter", headers=h).content)
    with tarfile.open(adapter) as tar:
        tar.extractall(tmp_path / "adapter", filter="data")
    base = load_model(model, device="cpu")
    ids = base.tokenizer("Ahoy, who goes there?", return_tensors="pt").input_ids
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert (
        AutoTokenizer.from_pretrained(merged_dir)("Ahoy, who goes there?").input_ids
        == ids[0].tolist()
    )
    with torch.no_grad():
        before = base.model(ids).logits
        expected = PeftModel.from_pretrained(base.model, tmp_path / "adapter" / "adapter")(ids)
        got = merged(ids)
    diff = (got.logits - expected.logits).abs().max().item()
    scale = expected.logits.abs().max().item()
    moved = (expected.logits - before).abs().max().item()
    print(f"merged vs base+adapter: max |logit diff| {diff:.2e} (|logits| up to {scale:.1f}); "
          f"the adapter moved them by up to {moved:.2e}")  # fmt: skip
    assert diff <= TOLERANCE * scale
    assert moved > 1e-3
