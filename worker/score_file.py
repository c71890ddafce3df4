"""Score a dataset file into an output directory: the API under ``sarft score``.

Writes, streaming as it goes (memory does not grow with the data set):
- ``scores.jsonl``: ``{"index", "scores"}`` per input sample, in input order;
- ``flagged.jsonl``: the harmful subset, each sample in its input form plus ``scores``;
- ``summary.json``: counts, flagged fraction, quantiles, model, prompt hashes, timings.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from worker.encoding import ChatEncoder
from worker.formats import DatasetError, DatasetFormat, Sample, iter_samples, validate_file
from worker.prompts import RolePrompts
from worker.results import RunStats
from worker.scoring.backends import (
    BACKENDS,
    ScoreConfig,
    ScoringBackend,
    build_backend,
    unknown_backend,
)
from worker.scoring.base import Scorer
from worker.scoring.engine import score_samples


def _write_line(handle: Any, obj: dict[str, Any]) -> None:
    handle.write(json.dumps(obj, ensure_ascii=False) + "\n")


def _validated_format(data: Path) -> tuple[DatasetFormat, int]:
    """The format and sample count of ``data``; DatasetError if any line is bad."""
    report = validate_file(data)
    if report.errors or report.format is None:
        raise DatasetError(report.errors, report.format, data)
    return report.format, report.num_samples


def _write_scores(
    samples: Iterable[Sample],
    encoder: ChatEncoder,
    scorer: Scorer,
    out_dir: Path,
    config: ScoreConfig,
    on_progress: Callable[[float], None] | None,
    checker: Scorer | None = None,
) -> RunStats:
    """Stream ``scores.jsonl`` and ``flagged.jsonl`` into ``out_dir``; returns the run's stats."""
    stats = RunStats()
    with (
        (out_dir / "scores.jsonl").open("w", encoding="utf-8") as scores_out,
        (out_dir / "flagged.jsonl").open("w", encoding="utf-8") as flagged_out,
    ):
        for sample, scores in score_samples(
            samples,
            encoder,
            scorer,
            margin=config.margin,
            compute_reference=config.compute_reference,
            chunk_size=config.chunk_size,
            on_progress=on_progress,
            checker=checker,
            check_band=config.band,
        ):
            scores_json = scores.to_json()
            _write_line(scores_out, {"index": sample.index, "scores": scores_json})
            if scores.flagged:
                _write_line(flagged_out, {**sample.raw, "scores": scores_json})
            stats.add(scores)
    return stats


def _run_details(
    data: Path,
    fmt: DatasetFormat,
    prompts: RolePrompts,
    backend: ScoringBackend,
    config: ScoreConfig,
) -> dict[str, Any]:
    """What produced the scores: the input, the prompts, the model and the settings."""
    return {
        "data": str(data),
        "format": fmt.value,
        "role": prompts.name,
        "prompt_hashes": prompts.hashes(),
        "model": backend.model_name,
        "model_path": backend.model_path,
        "backend": config.backend,
        "dtype": config.dtype,
        "device": backend.device,
        "margin": config.margin,
        "reference_computed": config.compute_reference,
        "reuse_prefix": config.reuse_prefix,
        "batch_size": config.batch_size,
        "encoding": asdict(config.encoding),
    }


def _timings(load_s: float, score_s: float, num_samples: int) -> dict[str, Any]:
    return {
        "load_s": round(load_s, 3),
        "score_s": round(score_s, 3),
        "samples_per_s": round(num_samples / score_s, 3) if score_s > 0 else None,
    }


def score_file(
    data: Path,
    prompts: RolePrompts,
    out_dir: Path,
    config: ScoreConfig | None = None,
    *,
    on_start: Callable[[int], None] | None = None,
    on_progress: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Validate ``data`` whole, then score it into ``out_dir``; returns the summary.

    Raises DatasetError (with every bad line, up to 100) before loading a model.
    """
    config = config or ScoreConfig()
    if config.backend not in BACKENDS:
        raise unknown_backend(config.backend)
    fmt, num_samples = _validated_format(data)
    if on_start is not None:
        on_start(num_samples)

    t0 = time.perf_counter()
    backend = build_backend(config)
    # A vLLM engine is stopped here, not at interpreter exit: left to its atexit hooks, its
    # threads were sometimes still running when the interpreter tore down, and the process
    # aborted ("terminate called without an active exception") after writing its scores.
    try:
        encoder = ChatEncoder(backend.tokenizer, prompts, config.encoding)
        load_s = time.perf_counter() - t0

        out_dir.mkdir(parents=True, exist_ok=True)
        t1 = time.perf_counter()
        stats = _write_scores(
            iter_samples(data, fmt),
            encoder,
            backend.scorer,
            out_dir,
            config,
            on_progress,
            checker=backend.checker,
        )
        score_s = time.perf_counter() - t1

        summary = {
            **stats.to_json(),
            **_run_details(data, fmt, prompts, backend, config),
            "timings": _timings(load_s, score_s, stats.num_samples),
        }
    finally:
        backend.close()
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
