"""The README's curl walkthrough, run exactly as written against `sarft serve`."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PORT = 8000  # the README's address


def walkthrough() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(
        r"<!-- walkthrough:start -->\s*```bash\n(.*?)```\s*<!-- walkthrough:end -->", text, re.S
    )
    assert block, "README.md lost its walkthrough markers"
    return block.group(1)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture()
def embedded_server(tmp_path: Path, bundled_model_dir: Path) -> Iterator[dict[str, str]]:
    if not port_free(PORT):
        pytest.fail(f"port {PORT} is taken; the walkthrough needs it free")
    home = tmp_path / "home"
    home.mkdir()
    # Reuse the converted bundled model instead of converting it again.
    (home / "models").symlink_to(bundled_model_dir.parent, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SARFT_")}
    env |= {"SARFT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    log = (tmp_path / "serve.log").open("w+")
    server = subprocess.Popen(
        [sys.executable, "-m", "sarft", "serve"],
        env=env,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/healthz", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    log.seek(0)
                    pytest.fail(f"sarft serve did not start:\n{log.read()}")
                time.sleep(0.5)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_readme_walkthrough_runs_as_written(embedded_server: dict[str, str]) -> None:
    if not (REPO / ".venv" / "bin" / "sarft").exists():
        pytest.skip("the walkthrough uses .venv/bin/sarft (make install)")
    out = REPO / "out" / "walkthrough" / "flagged.jsonl"
    report = out.with_name("report.html")
    for old in (out, report, out.with_name("adapter.tar.gz")):
        old.unlink(missing_ok=True)
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", walkthrough()],
        cwd=REPO,
        env=embedded_server,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = out.read_text(encoding="utf-8").splitlines()
    printed = run.stdout.splitlines()
    scoring = json.loads(next(line for line in printed if '"num_samples"' in line))
    assert scoring["num_samples"] == 36 and scoring["num_flagged"] == len(lines) > 0
    assert all(json.loads(line)["scores"]["flagged"] for line in lines)
    assert f"{len(lines)} out/walkthrough/flagged.jsonl" in run.stdout
    training = json.loads(next(line for line in printed if '"num_kl_samples"' in line))
    assert training["steps"] == 2 and training["num_train"] + training["num_validation"] == 36
    assert training["num_kl_samples"] == training["num_flagged"]  # method sarft
    for setting in ("default", "in_character"):
        assert set(training["evaluation"]["tuned"][setting]["refusal_rate"]) == {"builtin"}
    assert (
        "adapter/adapter_config.json" in printed and "adapter/adapter_model.safetensors" in printed
    )
    assert report.read_text(encoding="utf-8").lstrip().lower().startswith("<!doctype html")
