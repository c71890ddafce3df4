"""Checkpoints, resume and validation metrics of a training run, on the tiny random Llama."""

from __future__ import annotations

import copy
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.trainer.test_train import FLAGS, PROMPTS, SAMPLES, in_backward, quick_config
from trainer import checkpoints
from trainer.checkpoints import Checkpoint, CheckpointPolicy
from trainer.config import LoraSettings, TrainConfig
from trainer.train import TrainResult, fine_tune

TRAIN, VALIDATION = SAMPLES[:12], SAMPLES[12:]
TRAIN_FLAGS, VALIDATION_FLAGS = FLAGS[:12], FLAGS[12:]


def run(
    tiny_model: Any,
    tokenizer: Any,
    out: Path,
    config: TrainConfig,
    every: int | None = 2,
    keep: int = 10,
    **kwargs: Any,
) -> TrainResult:
    """A run on a fresh copy of the model, as a new worker process would start it."""
    return fine_tune(
        copy.deepcopy(tiny_model), tokenizer, TRAIN, TRAIN_FLAGS, PROMPTS, config, out,
        validation=VALIDATION, validation_flags=VALIDATION_FLAGS,
        checkpoint_policy=CheckpointPolicy(every=every, keep=keep), **kwargs,
    )  # fmt: skip


def trained_state(result: TrainResult) -> dict[str, torch.Tensor]:
    return {
        name: p.detach().clone() for name, p in result.model.named_parameters() if p.requires_grad
    }


def assert_same_steps(
    want: TrainResult, got: TrainResult, rel: float, abs_tol: float, weights_atol: float
) -> None:
    """Two runs that should take the same steps by different code paths: every step's loss,
    CE, KL, gradient norm (and validation metrics, where there are some) to ``rel``/``abs_tol``,
    the trained weights to ``weights_atol``."""
    for before, after in zip(want.history, got.history, strict=True):
        validation = [k for k in ("valid_loss", "valid_kl") if k in before]
        for key in ("loss", "ce", "kl", "grad_norm", *validation):
            assert after[key] == pytest.approx(before[key], rel=rel, abs=abs_tol), key
    weights = dict(got.model.named_parameters())
    for name, param in want.model.named_parameters():
        torch.testing.assert_close(weights[name], param, rtol=0, atol=weights_atol, msg=name)


def assert_same_run(resumed: TrainResult, clean: TrainResult) -> None:
    losses = [(h["step"], h["loss"], h.get("valid_loss")) for h in resumed.history]
    assert losses == [(h["step"], h["loss"], h.get("valid_loss")) for h in clean.history]
    clean_state = trained_state(clean)
    for name, value in trained_state(resumed).items():
        # The same operations in the same order on one CPU: bit for bit.
        torch.testing.assert_close(value, clean_state[name], atol=0, rtol=0, msg=name)


@pytest.mark.parametrize(
    "config",
    [
        # Dropout makes the run depend on the RNG state the checkpoint restores.
        quick_config(batch_size=4, n_epochs=2, lora=LoraSettings(r=8, alpha=16, dropout=0.1)),
        quick_config(batch_size=4, n_epochs=2, lora=None, learning_rate=1e-3),
        # AdamW in the backward: its state goes through AdamW's checkpoint layout.
        in_backward(),
    ],
    ids=["lora", "full", "full-in-backward"],
)
def test_a_run_resumed_from_its_checkpoint_ends_as_the_uninterrupted_run(
    tiny_model: Any, tiny_tokenizer: Any, tmp_path: Path, config: TrainConfig
) -> None:
    clean = run(tiny_model, tiny_tokenizer, tmp_path / "clean", config)
    assert clean.total_steps == 6 and clean.steps == 6

    out = tmp_path / "killed"
    steps: list[dict[str, float]] = []
    first = run(
        tiny_model, tiny_tokenizer, out, config,
        on_step=steps.append, should_stop=lambda: len(steps) == 3,
    )  # fmt: skip
    assert first.stopped and [c.step for c in checkpoints.list_checkpoints(out)] == [2]

    resumed = run(tiny_model, tiny_tokenizer, out, config, resume=True)
    assert resumed.resumed_from == 2 and not resumed.stopped
    assert_same_run(resumed, clean)
    assert [c.step for c in checkpoints.list_checkpoints(out)] == [2, 4, 6]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]


def test_resume_without_a_checkpoint_starts_from_the_beginning(
    tiny_model: Any, tiny_tokenizer: Any, tmp_path: Path
) -> None:
    config = quick_config(batch_size=4, max_steps=3)
    clean = run(tiny_model, tiny_tokenizer, tmp_path / "clean", config)
    fresh = run(tiny_model, tiny_tokenizer, tmp_path / "fresh", config, resume=True)
    assert fresh.resumed_from is None
    assert_same_run(fresh, clean)


def test_resume_refuses_a_checkpoint_of_another_plan(
    tiny_model: Any, tiny_tokenizer: Any, tmp_path: Path
) -> None:
    run(tiny_model, tiny_tokenizer, tmp_path, quick_config(batch_size=4, max_steps=2))
    with pytest.raises(RuntimeError, match="planned 2 steps"):
        run(tiny_model, tiny_tokenizer, tmp_path, quick_config(batch_size=4), resume=True)


def test_checkpoints_hold_weights_state_and_metrics_and_old_ones_are_pruned(
    tiny_model: Any, tiny_tokenizer: Any, tmp_path: Path
) -> None:
    seen: list[tuple[int, list[int]]] = []

    def on_checkpoint(saved: Checkpoint, deleted: list[Checkpoint]) -> None:
        seen.append((saved.step, [d.step for d in deleted]))

    config = quick_config(batch_size=4, n_epochs=2)  # 6 steps
    result = run(
        tiny_model, tiny_tokenizer, tmp_path, config, every=1, keep=2, on_checkpoint=on_checkpoint
    )
    assert seen == [(1, []), (2, []), (3, [1]), (4, [2]), (5, [3]), (6, [4])]
    kept = checkpoints.list_checkpoints(tmp_path)
    assert [c.step for c in kept] == [5, 6]
    last = kept[-1]
    assert last.metrics["loss"] == result.history[-1]["loss"]
    assert (last.path / checkpoints.STATE_FILE).is_file()
    with tarfile.open(last.archive) as tar:
        names = tar.getnames()
    assert "adapter/adapter_model.safetensors" in names and "adapter/adapter_config.json" in names

    checkpoints.finish(tmp_path)  # after publishing: archives and metrics stay
    assert checkpoints.latest_resumable(tmp_path) is None
    assert [c.step for c in checkpoints.list_checkpoints(tmp_path)] == [5, 6]
    assert last.archive.is_file() and not (last.path / "adapter").exists()


def test_the_final_checkpoint_is_kept_whatever_keep_says(
    tiny_model: Any, tiny_tokenizer: Any, tmp_path: Path
) -> None:
    run(tiny_model, tiny_tokenizer, tmp_path, quick_config(batch_size=4, n_epochs=2), keep=1)
    assert [c.step for c in checkpoints.list_checkpoints(tmp_path)] == [6]


def test_a_half_written_checkpoint_is_not_listed(tmp_path: Path) -> None:
    part = checkpoints.step_dir(tmp_path, 4).with_suffix(".part")
    part.mkdir(parents=True)
    (part / checkpoints.METRICS_FILE).write_text('{"step": 4}')
    assert checkpoints.list_checkpoints(tmp_path) == []


def test_validation_metrics_at_checkpoints_follow_the_loss_and_leave_training_alone(
    tiny_model: Any, tiny_tokenizer: Any, tmp_path: Path
) -> None:
    config = quick_config(batch_size=4, n_epochs=2)
    result = run(tiny_model, tiny_tokenizer, tmp_path / "a", config, every=3)
    validated = [h for h in result.history if "valid_loss" in h]
    assert [h["step"] for h in validated] == [3, 6]
    for h in validated:
        assert h["valid_loss"] == pytest.approx(h["valid_ce"] + config.lambda_kl * h["valid_kl"])
        assert h["valid_kl"] > 0  # the validation rows have flags: the anchor is measured
    # The policy moved between the two validations, so the validation loss did too.
    assert validated[0]["valid_loss"] != validated[1]["valid_loss"]

    # Without validation rows the training steps are exactly the same.
    plain = fine_tune(
        copy.deepcopy(tiny_model), tiny_tokenizer, TRAIN, TRAIN_FLAGS, PROMPTS, config,
        tmp_path / "b", checkpoint_policy=CheckpointPolicy(every=3),
    )  # fmt: skip
    assert [h["loss"] for h in plain.history] == [h["loss"] for h in result.history]
    assert not any("valid_loss" in h for h in plain.history)
    sft = run(tiny_model, tiny_tokenizer, tmp_path / "c", quick_config(method="sft", max_steps=1))
    assert sft.history[-1]["valid_kl"] == 0.0
