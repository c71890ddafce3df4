"""What a fine-tuning run takes from its host and tells it: inputs, phases, callbacks.

Kept free of torch: the service builds these and reads the phase names without loading the
training stack (:mod:`trainer.pipeline` runs them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from trainer.config import EvalConfig, TrainConfig
from worker.formats import Sample
from worker.prompts import RolePrompts


class Phase(StrEnum):
    """Where a fine-tuning job is; a job row stores it, the API shows it."""

    QUEUED = "queued"
    VALIDATING_FILES = "validating_files"  # a worker checks the job's rows before loading
    LOADING = "loading"
    EVALUATING_BASE = "evaluating_base"
    TRAINING = "training"
    EVALUATING_TUNED = "evaluating_tuned"
    REPORTING = "reporting"
    DONE = "done"


class RunCancelled(Exception):
    """The host's ``should_stop`` said stop; nothing was published."""


def _ignore(*_args: Any, **_kwargs: Any) -> None:
    return None


@dataclass(frozen=True)
class RunHooks:
    """Callbacks of a run; each defaults to doing nothing."""

    on_phase: Callable[[Phase, str, dict[str, Any]], None] = _ignore
    """A phase starts: (phase, a sentence for people, facts about it)."""
    on_step: Callable[[dict[str, float]], None] = _ignore
    """An optimizer step ended, with its metrics (``step``, ``total_steps``, losses...)."""
    on_generated: Callable[[str, str, int, int], None] = _ignore
    """Evaluation progress: (which model, "base" or "tuned"; stage; done; total)."""
    on_checkpoint: Callable[[int, dict[str, float], Path, list[int]], None] = _ignore
    """A checkpoint was written: (its step, its metrics, its weights archive, the steps of the
    older checkpoints deleted to keep the configured number)."""
    should_stop: Callable[[], bool] = lambda: False
    """Asked at every phase, every step and every few seconds of evaluation."""


@dataclass(frozen=True)
class RunInputs:
    """What a run trains on and with, as plain data."""

    run_id: str
    """Names the run in its report (a job id)."""
    model: str | None
    """HF model id or local directory; None for the bundled model."""
    config: TrainConfig
    evaluation: EvalConfig | None
    """None skips both evaluations."""
    prompts: RolePrompts
    samples: Sequence[Sample]
    scores: Sequence[Mapping[str, Any]]
    """The RDS scores of each sample (``SampleScores.to_json()``), in sample order."""
    margin: float
    """The margin the flags were computed with (shown in the report)."""
    curation: Mapping[str, Any] | None = None
    """Reviewers' decisions in the flags (the service's record: counts and the overruled
    sample indices, ``to_flag`` and ``to_keep``); ``scores`` carry the effective flags."""
    validation_samples: Sequence[Sample] | None = None
    """A separate validation set (with ``validation_scores``); None holds out a fraction of
    ``samples`` when the run evaluates, and validates on nothing otherwise."""
    validation_scores: Sequence[Mapping[str, Any]] = ()


@dataclass(frozen=True)
class CheckpointSettings:
    """Plain-data twin of :class:`trainer.checkpoints.CheckpointPolicy` (which needs torch)."""

    every: int | None = None
    keep: int = 3


@dataclass(frozen=True)
class EvalResources:
    """What the host offers evaluations: its prompt sets by name and the judge's key."""

    set_paths: Mapping[str, Path] = field(default_factory=dict)
    judge_api_key: str | None = None
