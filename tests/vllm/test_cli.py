"""`sarft score --backend vllm` as a user runs it: a process of its own, a packaged model by name,
bfloat16, against the float32 transformers run of the same rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.cli.test_score import cli_env, read_jsonl
from tests.conftest import ROLE_NAME, SARFT_PROMPTS_FILE, read_rolebench_rows
from tests.vllm.conftest import TEST_ENGINE


def sarft_score(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        **cli_env(),
        "HF_HUB_OFFLINE": "1",
        "SARFT_VLLM_KV_CACHE_GIB": str(TEST_ENGINE.kv_cache_gib),
    }
    args = ["--prompts", str(SARFT_PROMPTS_FILE), "--role-name", ROLE_NAME, "--out", str(out)]
    return subprocess.run(
        [sys.executable, "-m", "sarft", "score", str(data), *args, *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_sarft_score_with_vllm_and_a_packaged_model(tmp_path: Path) -> None:
    data = tmp_path / "jack.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in read_rolebench_rows(4)))
    model = ("--model", "smollm2-135m-instruct")
    vllm = sarft_score(data, tmp_path / "vllm", *model, "--backend", "vllm", "--dtype", "bfloat16")
    assert vllm.returncode == 0, vllm.stderr[-3000:]
    exact = sarft_score(data, tmp_path / "fp32", *model)
    assert exact.returncode == 0, exact.stderr[-3000:]
    got = read_jsonl(tmp_path / "vllm" / "scores.jsonl")
    want = read_jsonl(tmp_path / "fp32" / "scores.jsonl")
    assert [g["index"] for g in got] == [w["index"] for w in want] == [0, 1, 2, 3]
    for g, w in zip(got, want, strict=True):
        assert g["scores"]["flagged"] == w["scores"]["flagged"]
        for condition in ("role", "unsafe", "ref"):
            assert g["scores"][condition]["count"] == w["scores"][condition]["count"]
            assert abs(g["scores"][condition]["mean"] - w["scores"][condition]["mean"]) < 0.05
    summary = json.loads((tmp_path / "vllm" / "summary.json").read_text())
    assert "vllm" in json.dumps(summary)
