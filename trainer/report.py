"""The report of a fine-tuning job: assembled from the run, written as ``report.json`` and
``report.html`` (rendered by :mod:`trainer.report_html`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NotRequired, TypedDict

from trainer.artifacts import REPORT_HTML, REPORT_JSON
from trainer.comparison import compare_evaluations
from trainer.report_html import render_html


class ScoringSection(TypedDict):
    points: list[list[Any]]
    """Per sample ``[s_role, s_unsafe, flagged]``, optionally ``delta`` (= s_unsafe - s_role)
    as a 4th item. s_role and s_unsafe are null when the reference pass was skipped; delta is
    then required and the page shows a histogram of delta instead of the scatter."""
    margin: float
    flagged_fraction: float
    curation: NotRequired[dict[str, Any] | None]
    """Reviewers' overrules of RDS's flags the run trained with (counts and indices)."""


class HistoryRow(TypedDict):
    step: int
    ce: float
    kl: float | None  # null for steps whose batch held no flagged sample
    loss: float


class TrainingSection(TypedDict):
    history: list[HistoryRow]
    config: dict[str, Any]


class EvaluationSection(TypedDict):
    base: dict[str, dict[str, Any]] | None
    """By setting ("default": no system message, "in_character": the role prompt), the base
    model's ``EvalResult.to_dict()``: {"safety": [{"name", "n", "refusal_rate", "ci95",
    "judge", "examples": [{"prompt", "response", "refused"}], "verdicts": [bool per prompt],
    "categories": [{"category", "n", "refusal_rate", "ci95"}] | null}], "fidelity": {"n",
    "rouge_l", "examples": [{"question", "reference", "response", "rouge_l"}]} | null}.
    Examples may also be positional lists in that field order."""
    tuned: dict[str, dict[str, Any]] | None
    paired: NotRequired[dict[str, dict[str, Any]]]
    """By setting, then safety set: ``PairedDifference.to_dict()`` of tuned - base."""


class Report(TypedDict, total=False):
    job: dict[str, Any]
    scoring: ScoringSection | None
    training: TrainingSection | None
    evaluation: EvaluationSection | None


# --- assembly -------------------------------------------------------------------------------------


def scoring_section(
    scores: Sequence[Mapping[str, Any]], margin: float, curation: Mapping[str, Any] | None = None
) -> ScoringSection:
    """The flags the run trained with (RDS's, with reviewers' overrules where ``curation``
    records any): one point per sample, in sample order."""
    points = [[s["s_role"], s["s_unsafe"], bool(s["flagged"]), s.get("delta")] for s in scores]
    flagged = sum(1 for p in points if p[2])
    section: ScoringSection = {
        "points": points,
        "margin": margin,
        "flagged_fraction": flagged / len(points) if points else 0.0,
    }
    if curation is not None:
        section["curation"] = dict(curation)
    return section


def history_row(record: Mapping[str, float]) -> HistoryRow:
    return {
        "step": int(record["step"]),
        "ce": record["ce"],
        # A step whose batch held no KL sample has no KL value, rather than a zero.
        "kl": record["kl"] if record.get("kl_samples", 0) > 0 else None,
        "loss": record["loss"],
    }


def evaluation_summary(evaluation: EvaluationSection) -> dict[str, Any]:
    """Headline numbers per evaluated model and setting: refusal rate (with its 95% interval)
    per safety set and, for sets with harm categories, per category; ROUGE-L; and ``paired``:
    by setting and set, the tuned model's refusal difference from the base, paired by prompt
    (:mod:`trainer.comparison`)."""
    out: dict[str, Any] = {}
    for which, settings in (("base", evaluation["base"]), ("tuned", evaluation["tuned"])):
        if settings is None:
            continue
        out[which] = {
            setting: {
                "refusal_rate": {s["name"]: s["refusal_rate"] for s in result["safety"]},
                "refusal_ci95": {s["name"]: s["ci95"] for s in result["safety"]},
                "refusal_by_category": {
                    s["name"]: {c["category"]: c["refusal_rate"] for c in s["categories"]}
                    for s in result["safety"]
                    if s.get("categories")
                },
                "rouge_l": None if result["fidelity"] is None else result["fidelity"]["rouge_l"],
            }
            for setting, result in settings.items()
        }
    paired = compare_evaluations(evaluation)
    if paired:
        out["paired"] = paired
    return out


def build_report(
    job: Mapping[str, Any],
    scoring: ScoringSection,
    history: Sequence[Mapping[str, float]],
    config: dict[str, Any],
    evaluation: EvaluationSection | None,
) -> Report:
    return {
        "job": dict(job),
        "scoring": scoring,
        "training": {"history": [history_row(r) for r in history], "config": config},
        "evaluation": None
        if evaluation is None
        else {**evaluation, "paired": compare_evaluations(evaluation)},
    }


# --- writing --------------------------------------------------------------------------------------


def _finite(value: Any) -> Any:
    """A copy that strict JSON can hold: NaN and infinities become null, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _write_atomic(path: Path, text: str) -> None:
    """Readers (the download endpoint) never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_report(out_dir: Path | str, report: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``report.json`` (everything, strict JSON) and ``report.html``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clean = _finite(report)
    json_path, html_path = out / REPORT_JSON, out / REPORT_HTML
    _write_atomic(json_path, json.dumps(clean, indent=2, ensure_ascii=False, allow_nan=False))
    _write_atomic(html_path, render_html(clean))
    return json_path, html_path
