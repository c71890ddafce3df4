"""Training checkpoints: what a run needs to continue after its process died, and what a user
downloads to pick a step before overfitting.

A checkpoint is a directory ``<out_dir>/checkpoints/step-000010/`` holding:

* ``adapter/`` (LoRA) or ``model/`` (full fine-tuning): the weights, as ``save_pretrained``
  writes them, and the same as a ``.tar.gz`` archive (what the API serves);
* ``trainer_state.pt``: optimizer, scheduler and RNG state, the metrics history and the data
  position (the number of steps taken: the batch order is a pure function of the seed, so
  skipping that many batches puts the run where it was);
* ``metrics.json``: the step's train and validation metrics.

It is written under a ``.part`` name and renamed into place, so a process killed while writing
leaves no checkpoint that looks whole.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.artifacts import write_archive

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.json"
ADAPTER_DIR, MODEL_DIR = "adapter", "model"
_PREFIX = "step-"


@dataclass(frozen=True)
class CheckpointPolicy:
    """When to write checkpoints and how many to keep."""

    every: int | None = None
    """Optimizer steps between checkpoints; None writes only the final step's."""
    keep: int = 3
    """The most recent checkpoints kept (older ones are deleted); the final one is always kept."""

    def __post_init__(self) -> None:
        if self.every is not None and self.every < 1:
            raise ValueError("checkpoint interval must be >= 1 step")
        if self.keep < 1:
            raise ValueError("at least one checkpoint must be kept")

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.every is not None and step % self.every == 0)


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    metrics: dict[str, float]

    @property
    def weights_dir(self) -> Path:
        adapter = self.path / ADAPTER_DIR
        return adapter if adapter.is_dir() else self.path / MODEL_DIR

    @property
    def archive(self) -> Path:
        """The weights as served: ``adapter.tar.gz`` or ``model.tar.gz``."""
        return next(self.path.glob("*.tar.gz"))


def checkpoints_root(out_dir: Path) -> Path:
    return Path(out_dir) / CHECKPOINTS_DIR


def step_dir(out_dir: Path, step: int) -> Path:
    return checkpoints_root(out_dir) / f"{_PREFIX}{step:06d}"


def list_checkpoints(out_dir: Path) -> list[Checkpoint]:
    """The whole checkpoints under ``out_dir``, oldest first."""
    root = checkpoints_root(out_dir)
    found = []
    for path in sorted(root.glob(f"{_PREFIX}*")) if root.is_dir() else []:
        metrics_file = path / METRICS_FILE
        if path.suffix == ".part" or not metrics_file.is_file():
            continue
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        found.append(Checkpoint(int(metrics["step"]), path, metrics))
    return found


def latest_resumable(out_dir: Path) -> Checkpoint | None:
    """The newest checkpoint that still has its trainer state (a finished run drops them)."""
    resumable = [c for c in list_checkpoints(out_dir) if (c.path / STATE_FILE).is_file()]
    return resumable[-1] if resumable else None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    out_dir: Path,
    step: int,
    policy: Any,
    tokenizer: Any,
    lora: bool,
    trainer_state: dict[str, Any],
    metrics: dict[str, float],
) -> Checkpoint:
    """Write the checkpoint of ``step`` atomically (see the module's docstring)."""
    final = step_dir(out_dir, step)
    part = final.with_name(final.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    weights = part / (ADAPTER_DIR if lora else MODEL_DIR)
    if lora:
        # As the final save: the vocabulary is never resized, so no embeddings are needed.
        policy.save_pretrained(weights, save_embedding_layers=False)
    else:
        policy.save_pretrained(weights)
        tokenizer.save_pretrained(weights)
    write_archive(weights, part / f"{weights.name}.tar.gz")
    torch.save({**trainer_state, "rng": rng_state()}, part / STATE_FILE)
    (part / METRICS_FILE).write_text(json.dumps({"step": step, **metrics}), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)  # a step redone after a resume
    part.rename(final)
    return Checkpoint(step, final, {"step": step, **metrics})


def load_trainer_state(checkpoint: Checkpoint) -> dict[str, Any]:
    # The state holds only tensors, numbers and lists written by save_checkpoint.
    state: dict[str, Any] = torch.load(checkpoint.path / STATE_FILE, weights_only=False)
    return state


def load_weights(policy: Any, checkpoint: Checkpoint, lora: bool) -> None:
    """Put the checkpoint's trained weights into ``policy`` (built as the run built it)."""
    from safetensors.torch import load_file

    weights = checkpoint.weights_dir
    if lora:
        from peft import set_peft_model_state_dict

        result: Any = set_peft_model_state_dict(
            policy, load_file(weights / "adapter_model.safetensors")
        )
        if result.unexpected_keys:
            raise RuntimeError(f"checkpoint has unknown adapter weights: {result.unexpected_keys}")
        return
    index = weights / "model.safetensors.index.json"
    files = (
        sorted({weights / f for f in json.loads(index.read_text())["weight_map"].values()})
        if index.is_file()
        else [weights / "model.safetensors"]
    )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    missing, unexpected = policy.load_state_dict(state, strict=False)
    # save_pretrained leaves out tied weights (lm_head tied to the embeddings): only those
    # may be missing.
    tied = set(getattr(policy, "_tied_weights_keys", None) or ())
    if unexpected or any(k not in tied for k in missing):
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}")


def prune(out_dir: Path, keep: int, total_steps: int) -> list[Checkpoint]:
    """Delete all but the ``keep`` newest checkpoints (the final one is never deleted);
    returns the deleted ones."""
    found = list_checkpoints(out_dir)
    final = [c for c in found if c.step == total_steps]
    others = [c for c in found if c.step != total_steps]
    room = max(keep - len(final), 0)
    doomed = others[: len(others) - room] if room < len(others) else []
    for checkpoint in doomed:
        shutil.rmtree(checkpoint.path, ignore_errors=True)
    return doomed


def finish(out_dir: Path) -> None:
    """After a run has published: keep each checkpoint's weights archive and metrics, drop the
    resume state and the unpacked weights (the archive holds the same files)."""
    for checkpoint in list_checkpoints(out_dir):
        (checkpoint.path / STATE_FILE).unlink(missing_ok=True)
        shutil.rmtree(checkpoint.weights_dir, ignore_errors=True)
