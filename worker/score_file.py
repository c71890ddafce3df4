"""Score a dataset file into an output directory: the API under ``sarft score``.

Writes, streaming as it goes (memory does not grow with the data set):
- ``scores.jsonl``: ``{"index", "scores"}`` per input sample, in input order;
- ``flagged.jsonl``: the harmful subset, each sample in its input form plus ``scores``;
- ``summary.json``: counts, flagged fraction, quantiles, model, prompt hashes, timings.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from worker.encoding import ChatEncoder, EncodingConfig
from worker.formats import DatasetError, DatasetFormat, iter_samples, validate_file
from worker.model_loader import BUNDLED_MODEL, load_model, resolve_model_path
from worker.prompts import RolePrompts
from worker.results import RunStats
from worker.scoring.base import Scorer
from worker.scoring.engine import score_samples

BACKENDS = ("transformers", "vllm")


@dataclass(frozen=True)
class ScoreConfig:
    """Everything that decides the numbers of a scoring run."""

    model: str | None = None
    """HF model id or local directory; None for the bundled SmolLM2-135M-Instruct."""
    backend: str = "transformers"
    """"transformers" (CPU or GPU, reference) or "vllm" (GPU)."""
    dtype: str = "float32"
    """float32 is exact; bfloat16 is about 2x faster on CPU but moves log-probs by up to ~0.5."""
    batch_size: int = 16
    """Sequences per forward pass (transformers backend)."""
    margin: float = 0.0
    """A sample is flagged when s_unsafe - s_role > margin (0 in the paper)."""
    compute_reference: bool = True
    """Run the empty-system pass; the flag does not need it, the implicit rewards do."""
    reuse_prefix: bool = True
    """Compute each condition's system-prompt KV cache once (transformers backend)."""
    chunk_size: int = 256
    """Samples encoded and scored together; bounds memory, feeds length bucketing."""
    encoding: EncodingConfig = field(default_factory=EncodingConfig)


@dataclass
class ScoringBackend:
    scorer: Scorer
    tokenizer: Any
    model_name: str
    model_path: str
    device: str


def build_backend(config: ScoreConfig) -> ScoringBackend:
    """Load the model once for a backend; reusable across many files or jobs."""
    if config.backend == "transformers":
        from worker.scoring.transformers_backend import TransformersScorer

        loaded = load_model(config.model, dtype=config.dtype)
        scorer = TransformersScorer(
            loaded.model, batch_size=config.batch_size, reuse_prefix=config.reuse_prefix
        )
        return ScoringBackend(
            scorer, loaded.tokenizer, loaded.name, loaded.path, str(loaded.device)
        )
    if config.backend == "vllm":
        from transformers import AutoTokenizer

        from worker.scoring.vllm_backend import VllmScorer

        path = resolve_model_path(config.model)
        vllm_scorer = VllmScorer(path, dtype=config.dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return ScoringBackend(vllm_scorer, tokenizer, config.model or BUNDLED_MODEL, path, "cuda")
    raise ValueError(f"unknown backend {config.backend!r}; choose one of {', '.join(BACKENDS)}")


def _write_line(handle: Any, obj: dict[str, Any]) -> None:
    handle.write(json.dumps(obj, ensure_ascii=False) + "\n")


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
        raise ValueError(f"unknown backend {config.backend!r}; choose one of {', '.join(BACKENDS)}")
    report = validate_file(data)
    if report.errors or report.format is None:
        raise DatasetError(report.errors, report.format, data)
    fmt: DatasetFormat = report.format
    if on_start is not None:
        on_start(report.num_samples)

    t0 = time.perf_counter()
    backend = build_backend(config)
    encoder = ChatEncoder(backend.tokenizer, prompts, config.encoding)
    load_s = time.perf_counter() - t0

    out_dir.mkdir(parents=True, exist_ok=True)
    stats = RunStats()
    t1 = time.perf_counter()
    with (
        (out_dir / "scores.jsonl").open("w", encoding="utf-8") as scores_out,
        (out_dir / "flagged.jsonl").open("w", encoding="utf-8") as flagged_out,
    ):
        for sample, scores in score_samples(
            iter_samples(data, fmt),
            encoder,
            backend.scorer,
            margin=config.margin,
            compute_reference=config.compute_reference,
            chunk_size=config.chunk_size,
            on_progress=on_progress,
        ):
            scores_json = scores.to_json()
            _write_line(scores_out, {"index": sample.index, "scores": scores_json})
            if scores.flagged:
                _write_line(flagged_out, {**sample.raw, "scores": scores_json})
            stats.add(scores)
    score_s = time.perf_counter() - t1

    summary = {
        **stats.to_json(),
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
        "timings": {
            "load_s": round(load_s, 3),
            "score_s": round(score_s, 3),
            "samples_per_s": round(stats.num_samples / score_s, 3) if score_s > 0 else None,
        },
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
