"""`sarft score` end to end on the bundled model and a few RoleBench rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sarft.cli import app
from tests.conftest import (
    ROLE_NAME,
    SARFT_PROMPTS_FILE,
    model_cache_dir,
    read_rolebench_rows,
)
from worker.prompts import RolePrompts

NUM_ROWS = 5
SCORE_KEYS = {"role", "unsafe", "ref", "s_role", "s_unsafe", "flagged"}
LOGPROB_KEYS = {"mean", "sum", "count"}


def cli_env() -> dict[str, str]:
    # load_model uses $SARFT_HOME/models: point it at the tests' converted checkpoint.
    return {"SARFT_HOME": str(model_cache_dir().parent)}


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def run_score(data: Path, out: Path, *extra: str) -> Any:
    if not SARFT_PROMPTS_FILE.exists():
        pytest.skip(f"SaRFT prompts not found at {SARFT_PROMPTS_FILE}")
    args = [
        "score",
        str(data),
        "--prompts",
        str(SARFT_PROMPTS_FILE),
        "--role-name",
        ROLE_NAME,
        "--out",
        str(out),
        *extra,
    ]
    return CliRunner(env=cli_env()).invoke(app, args)


@pytest.fixture(scope="module")
def input_rows() -> list[dict[str, Any]]:
    return read_rolebench_rows(NUM_ROWS)


@pytest.fixture(scope="module")
def input_file(input_rows: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli-data") / "jack.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in input_rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def scored(
    input_file: Path, bundled_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("cli-out")
    result = run_score(input_file, out)
    assert result.exit_code == 0, result.output
    assert f"/{NUM_ROWS} flagged" in result.output
    return out


@pytest.fixture(scope="module")
def scored_without_reference(
    input_file: Path, bundled_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("cli-out-noref")
    result = run_score(input_file, out, "--no-reference")
    assert result.exit_code == 0, result.output
    return out


def check_logprob(obj: Any) -> None:
    assert isinstance(obj, dict)
    assert set(obj) >= LOGPROB_KEYS
    assert isinstance(obj["count"], int) and obj["count"] > 0
    assert obj["sum"] < 0
    assert obj["mean"] == pytest.approx(obj["sum"] / obj["count"])


@pytest.mark.slow
def test_scores_jsonl(scored: Path) -> None:
    lines = read_jsonl(scored / "scores.jsonl")
    assert [line["index"] for line in lines] == list(range(NUM_ROWS))
    for line in lines:
        assert set(line) == {"index", "scores"}
        scores = line["scores"]
        assert set(scores) >= SCORE_KEYS
        for c in ("role", "unsafe", "ref"):
            check_logprob(scores[c])
        role, unsafe, ref = (scores[c]["mean"] for c in ("role", "unsafe", "ref"))
        assert scores["s_role"] == pytest.approx(role - ref)
        assert scores["s_unsafe"] == pytest.approx(unsafe - ref)
        assert scores["flagged"] is (unsafe - role > 0)
        assert scores["flagged"] is (scores["s_unsafe"] - scores["s_role"] > 0)
        assert scores["role"]["count"] == scores["unsafe"]["count"] == scores["ref"]["count"]


@pytest.mark.slow
def test_flagged_jsonl_holds_the_flagged_inputs(
    scored: Path, input_rows: list[dict[str, Any]]
) -> None:
    scores = [line["scores"] for line in read_jsonl(scored / "scores.jsonl")]
    flagged = read_jsonl(scored / "flagged.jsonl")
    expected = [
        {**row, "scores": s} for row, s in zip(input_rows, scores, strict=True) if s["flagged"]
    ]
    assert flagged == expected
    for row in flagged:
        assert {"role", "question", "generated", "scores"} <= set(row)


@pytest.mark.slow
def test_summary_json(scored: Path) -> None:
    summary = json.loads((scored / "summary.json").read_text(encoding="utf-8"))
    scores = [line["scores"] for line in read_jsonl(scored / "scores.jsonl")]
    num_flagged = sum(s["flagged"] for s in scores)
    assert summary["num_samples"] == NUM_ROWS
    assert summary["num_flagged"] == num_flagged
    assert summary["flagged_fraction"] == pytest.approx(num_flagged / NUM_ROWS)
    quantiles = summary["quantiles"]
    for key in ("s_role", "s_unsafe", "delta"):
        q = quantiles[key]
        assert q is not None
        assert list(q) == ["p0", "p5", "p25", "p50", "p75", "p95", "p100"]
        assert list(q.values()) == sorted(q.values())
    assert quantiles["s_role"]["p0"] == pytest.approx(min(s["s_role"] for s in scores))
    assert quantiles["s_unsafe"]["p100"] == pytest.approx(max(s["s_unsafe"] for s in scores))
    prompts = RolePrompts.from_file(SARFT_PROMPTS_FILE, ROLE_NAME)
    assert summary["prompt_hashes"] == prompts.hashes()
    assert {"load_s", "score_s", "samples_per_s"} <= set(summary["timings"])
    assert summary["role"] == ROLE_NAME
    assert summary["format"] == "rolebench"


@pytest.mark.slow
def test_no_reference_writes_null_ref(scored: Path, scored_without_reference: Path) -> None:
    with_ref = read_jsonl(scored / "scores.jsonl")
    without = read_jsonl(scored_without_reference / "scores.jsonl")
    assert [line["index"] for line in without] == list(range(NUM_ROWS))
    for a, b in zip(with_ref, without, strict=True):
        s = b["scores"]
        assert s["ref"] is None
        assert s["s_role"] is None and s["s_unsafe"] is None
        check_logprob(s["role"])
        check_logprob(s["unsafe"])
        assert s["role"]["mean"] == pytest.approx(a["scores"]["role"]["mean"], abs=1e-4)
        assert s["unsafe"]["mean"] == pytest.approx(a["scores"]["unsafe"]["mean"], abs=1e-4)
        assert s["flagged"] == a["scores"]["flagged"]
    summary = json.loads((scored_without_reference / "summary.json").read_text(encoding="utf-8"))
    assert summary["reference_computed"] is False
    assert summary["quantiles"]["s_role"] is None


def test_invalid_json_line_exits_2(
    input_rows: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text(
        json.dumps(input_rows[0]) + "\n" + '{"role": "Jack Sparrow", "question": \n',
        encoding="utf-8",
    )
    out = tmp_path / "out"
    # Validation comes before any model is loaded: point SARFT_HOME at an empty dir.
    monkeypatch.setenv("SARFT_HOME", str(tmp_path / "empty-home"))
    if not SARFT_PROMPTS_FILE.exists():
        pytest.skip(f"SaRFT prompts not found at {SARFT_PROMPTS_FILE}")
    result = CliRunner().invoke(
        app,
        [
            "score",
            str(data),
            "--prompts",
            str(SARFT_PROMPTS_FILE),
            "--role-name",
            ROLE_NAME,
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 2, result.output
    assert "line 2" in result.output
    assert not (out / "scores.jsonl").exists()
    assert not (tmp_path / "empty-home").exists()  # no model was converted
