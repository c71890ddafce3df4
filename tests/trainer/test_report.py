"""report.json and the self-contained report.html."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest

from trainer.evaluate import (
    EvalResult,
    FidelityExample,
    FidelityResult,
    SafetyExample,
    SafetyResult,
    by_category,
    wilson_interval,
)
from trainer.intervals import paired_difference
from trainer.report import Report, build_report, write_report

PNG = "data:image/png;base64,"
XSS = "<script>alert('pwned')</script>"


def _eval_result(rate: float, response: str) -> dict[str, Any]:
    safety = (
        SafetyResult(
            "advbench",
            4,
            rate,
            "phrase",
            (SafetyExample("Build a bomb", response, False),),
            wilson_interval(round(4 * rate), 4),
        ),
        SafetyResult("beavertails", 2, 1.0, "phrase", (SafetyExample("Hurt a cat", "No.", True),)),
    )
    fidelity = FidelityResult(
        1, 42.5, (FidelityExample("Who are you?", "Jack.", "I am Jack.", 42.5),)
    )
    return EvalResult(safety, fidelity).to_dict()


def _full_report() -> Report:
    rng = random.Random(0)
    points: list[list[Any]] = []
    for _ in range(40):
        s_role, s_unsafe = rng.gauss(0, 1), rng.gauss(0, 1)
        points.append([s_role, s_unsafe, s_unsafe - s_role > 0.0])
    return {
        "job": {"id": "ftjob-123", "role": "Freddy Krueger <villain>", "model": "smollm2"},
        "scoring": {
            "points": points,
            "margin": 0.0,
            "flagged_fraction": sum(p[2] for p in points) / len(points),
        },
        "training": {
            "history": [
                {"step": 1, "ce": 2.5, "kl": 0.1, "loss": 2.55},
                {"step": 2, "ce": 2.1, "kl": None, "loss": 2.1},
                {"step": 3, "ce": 1.9, "kl": float("nan"), "loss": 1.95},
            ],
            "config": {"lambda_kl": 0.5, "lr": 2e-5, "lora": {"r": 32}},
        },
        "evaluation": {
            "base": {
                "default": _eval_result(1.0, "I cannot help with that."),
                "in_character": _eval_result(0.75, "I cannot help."),
            },
            "tuned": {
                "default": _eval_result(1.0, "No."),
                "in_character": _eval_result(0.5, XSS),
            },
        },
    }


def _strict_json(path: Path) -> Any:
    def reject(constant: str) -> None:
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=reject)


def test_full_report(tmp_path: Path) -> None:
    json_path, html_path = write_report(tmp_path / "out", _full_report())
    assert (json_path.name, html_path.name) == ("report.json", "report.html")
    data = _strict_json(json_path)
    assert data["training"]["history"][2]["kl"] is None  # NaN is not valid JSON
    tuned = data["evaluation"]["tuned"]["in_character"]
    assert tuned["safety"][0]["examples"][0]["response"] == XSS
    assert data["job"]["id"] == "ftjob-123"
    html = html_path.read_text(encoding="utf-8")
    # scatter, training curves, and per setting refusal bars and ROUGE-L bars
    assert html.count(PNG) == 6
    assert "Default chat (no system message)" in html and "In character (the role prompt)" in html
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "Freddy Krueger &lt;villain&gt;" in html
    assert "75.0%" in html and "50.0%" in html and "42.5" in html
    low, high = wilson_interval(2, 4)  # 50% of 4 prompts, with its 95% interval
    assert f"50.0% [{100 * low:.1f}, {100 * high:.1f}]" in html
    flagged = sum(p[2] for p in _full_report()["scoring"]["points"])  # type: ignore[index]
    assert f"{100 * flagged / 40:.1f}%" in html and f"40 samples, {flagged} flagged" in html
    assert "not run" not in html
    assert "no per-prompt verdicts to pair" in html  # these results predate the verdicts


def test_missing_evaluation_says_not_run(tmp_path: Path) -> None:
    report = _full_report()
    report["evaluation"] = None
    _, html_path = write_report(tmp_path, report)
    html = html_path.read_text(encoding="utf-8")
    assert "Evaluation: not run" in html
    assert html.count(PNG) == 2  # scoring and training still plotted


def test_missing_tuned_model(tmp_path: Path) -> None:
    report = _full_report()
    report["evaluation"] = {
        "base": {"in_character": _eval_result(0.75, "I cannot.")},
        "tuned": None,
    }
    html = write_report(tmp_path, report)[1].read_text(encoding="utf-8")
    assert "tuned model: not run" in html
    assert html.count(PNG) == 4


def test_without_reference_pass_plots_deltas(tmp_path: Path) -> None:
    report = _full_report()
    report["scoring"] = {
        "points": [[None, None, d > 0.1, d] for d in (-0.5, 0.05, 0.2, 0.9)],
        "margin": 0.1,
        "flagged_fraction": 0.5,
    }
    json_path, html_path = write_report(tmp_path, report)
    assert _strict_json(json_path)["scoring"]["points"][0] == [None, None, False, -0.5]
    html = html_path.read_text(encoding="utf-8")
    assert "Flagged fraction: 50.0%" in html and "4 samples, 2 flagged" in html
    assert html.count(PNG) == 6  # the delta histogram instead of the scatter, the rest as before


def test_empty_report(tmp_path: Path) -> None:
    json_path, html_path = write_report(tmp_path, {})
    assert _strict_json(json_path) == {}
    html = html_path.read_text(encoding="utf-8")
    for section in ("Scoring", "Training", "Evaluation"):
        assert f"{section}: not run" in html
    assert PNG not in html


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_numbers_become_null(tmp_path: Path, value: float) -> None:
    json_path, _ = write_report(tmp_path, {"job": {"x": value, "nested": [value, (1, value)]}})
    assert _strict_json(json_path)["job"] == {"x": None, "nested": [None, [1, None]]}


def test_positional_examples_and_null_settings(tmp_path: Path) -> None:
    side = {
        "safety": [
            {"name": "toy", "n": 1, "refusal_rate": 0.0, "examples": [["p?", "<b>x</b>", 0]]}
        ],
        "fidelity": {"n": 1, "rouge_l": 10.0, "examples": [["q?", "ref", "resp", 10.0]]},
    }
    report: Report = {
        "training": {"history": [], "config": {"lora": None}},
        "evaluation": {"base": {"default": side}, "tuned": None},
    }
    html = write_report(tmp_path, report)[1].read_text(encoding="utf-8")
    assert "[complied] &lt;b&gt;x&lt;/b&gt;" in html
    assert "<td>q?</td><td>ref</td><td>resp</td><td>not run</td>" in html
    assert "<td>lora</td><td>null</td>" in html
    assert "No training steps recorded" in html


def _with_verdicts(base: list[bool], tuned: list[bool]) -> dict[str, Any]:
    """Base and tuned results of one categorised set, with every prompt's verdict."""
    categories = ["theft", "theft", "self_harm", "self_harm"] * (len(base) // 4)

    def side(verdicts: list[bool]) -> dict[str, Any]:
        result = SafetyResult(
            "beavertails", len(verdicts), sum(verdicts) / len(verdicts), "phrase",
            (SafetyExample("Steal a car", "No.", verdicts[0]),),
            wilson_interval(sum(verdicts), len(verdicts)), tuple(verdicts),
            by_category(categories, verdicts),
        )  # fmt: skip
        return {"default": EvalResult((result,), None).to_dict()}

    return {"base": side(base), "tuned": side(tuned)}


def test_the_report_pairs_verdicts_and_breaks_refusal_down_by_category(tmp_path: Path) -> None:
    base = [True] * 16 + [False] * 4
    tuned = [True] * 8 + [False] * 12  # 8 refusals lost, none gained
    report = _full_report()
    report["evaluation"] = _with_verdicts(base, tuned)  # type: ignore[typeddict-item]
    report["job"] = {"id": "ftjob-9", "final": {"loss": 1.5, "ce": 1.25},
                     "evaluation": {"base": {"default": {"rouge_l": 3.0}}}}  # fmt: skip
    json_path, html_path = write_report(tmp_path, build_report(
        report["job"], report["scoring"], [], {}, report["evaluation"],  # type: ignore[arg-type]
    ))  # fmt: skip
    stored = _strict_json(json_path)["evaluation"]["paired"]["default"]["beavertails"]
    expected = paired_difference(base, tuned)
    assert stored["difference"] == pytest.approx(-0.4)
    assert (stored["only_first"], stored["only_second"]) == (8, 0)
    assert stored["mcnemar_p"] == pytest.approx(2 / 2**8)
    assert stored["ci95"] == pytest.approx(list(expected.ci95))
    html = html_path.read_text(encoding="utf-8")
    low, high = expected.ci95
    assert f"-40.0 points [{100 * low:+.1f}, {100 * high:+.1f}], McNemar p=0.00781" in html
    # The category chart and its table: theft 8/10 refused before, 0/10 after.
    assert "beavertails: refusal per harm category" not in html  # the title is in the PNG
    assert html.count(PNG) == 3  # scatter, refusal bars, category bars (no training steps)
    assert "<td>theft</td><td>80.0% [" in html and "<td>self_harm</td>" in html
    # The job table holds no JSON: the summary's numbers are the evaluation section's tables.
    job_table = html[html.index("<table>") : html.index("</table>")]
    assert "{" not in job_table and "final" in job_table and "loss: 1.5" in job_table
    assert "rouge_l" not in job_table


def test_stored_reports_without_verdicts_say_so(tmp_path: Path) -> None:
    _, html_path = write_report(tmp_path, _full_report())
    assert "no per-prompt verdicts to pair" in html_path.read_text(encoding="utf-8")
