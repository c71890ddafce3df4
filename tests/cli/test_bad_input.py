"""Bad input at the command line: one ``error:`` line on stderr, exit 2, no traceback, no model.

A missing or unreadable file, an unknown model, an unreachable API and a bad key. No test
loads a model: the scoring backend is replaced by one that fails the test if it is built.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

import worker.score_file
from sarft import checks
from sarft.cli import app
from service.core import config, db, queue
from worker.packaged_models import PACKAGED_MODELS, PackagedModel

PROFILE = "A cheerful pirate captain who loves the sea."
ROW = {
    "messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
}


def error_line(result: Any) -> str:
    """The command's only stderr line, once it is known to have failed cleanly."""
    # CliRunner swallows tracebacks into result.exception: a clean exit is a SystemExit.
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return str(lines[0])


def invoke(*args: str, env: dict[str, str | None] | None = None) -> Any:
    return CliRunner(env=env).invoke(app, list(args))


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Calls to the one function score_file loads its model through: there must be none."""
    calls: list[Any] = []

    def build_backend(config: Any) -> Any:
        calls.append(config)
        raise AssertionError(f"a model was loaded: {config.model}")

    monkeypatch.setattr(worker.score_file, "build_backend", build_backend)
    return calls


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ROW) + "\n", encoding="utf-8")
    return path


def score(data: Path, out: Path, *extra: str) -> Any:
    return invoke(
        "score", str(data), "--role-name", "Anne", "--profile", PROFILE, "--out", str(out), *extra
    )


# --- files -----------------------------------------------------------------------------------


def test_score_missing_data_file(tmp_path: Path, no_model_load: list[Any]) -> None:
    missing = tmp_path / "nonexistent.jsonl"
    line = error_line(score(missing, tmp_path / "out"))
    assert str(missing) in line and "does not exist" in line
    assert not no_model_load


def test_score_data_file_is_a_directory(tmp_path: Path, no_model_load: list[Any]) -> None:
    line = error_line(score(tmp_path, tmp_path / "out"))
    assert str(tmp_path) in line and "directory" in line
    assert not no_model_load


@pytest.mark.parametrize("option", ["--prompts", "--profile-file"])
def test_score_missing_prompt_source(
    option: str, data_file: Path, tmp_path: Path, no_model_load: list[Any]
) -> None:
    missing = tmp_path / "nope.json"
    out = str(tmp_path / "out")
    result = invoke(
        "score", str(data_file), "--role-name", "Anne", option, str(missing), "--out", out
    )
    assert str(missing) in error_line(result)
    assert not no_model_load


def test_score_output_is_a_file(data_file: Path, no_model_load: list[Any]) -> None:
    assert str(data_file) in error_line(score(data_file, data_file))
    assert not no_model_load


# --- models ----------------------------------------------------------------------------------


def test_score_unknown_model(data_file: Path, tmp_path: Path, no_model_load: list[Any]) -> None:
    line = error_line(score(data_file, tmp_path / "out", "--model", "no-such-model"))
    assert "'no-such-model'" in line
    assert all(name in line for name in PACKAGED_MODELS)
    assert "sarft models list" in line
    assert "huggingface.co" not in line  # not transformers' hub-connection error
    assert not no_model_load
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("model", "fact"),
    [("./no-such-dir", "does not exist"), ("{dir}", "no config.json")],
)
def test_score_bad_model_directory(
    model: str, fact: str, data_file: Path, tmp_path: Path, no_model_load: list[Any]
) -> None:
    model = model.format(dir=tmp_path)
    line = error_line(score(data_file, tmp_path / "out", "--model", model))
    assert model in line and fact in line
    assert not no_model_load


def test_score_packaged_model_not_installed(
    data_file: Path, tmp_path: Path, no_model_load: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PackagedModel, "installed", lambda self: False)
    monkeypatch.setenv("SARFT_HOME", str(tmp_path / "empty-home"))  # nothing converted
    name = "qwen2.5-coder-0.5b-instruct"
    line = error_line(score(data_file, tmp_path / "out", "--model", name))
    assert f"sarft models install {name}" in line
    assert not no_model_load


def test_check_model_accepts_what_loads_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model directory and a hub id in the local cache pass; the same id uncached fails."""
    from huggingface_hub import constants

    model_dir = tmp_path / "ckpt"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}", encoding="utf-8")
    checks.check_model(str(model_dir))
    checks.check_model(None)  # the bundled model

    hub = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    with pytest.raises(typer.Exit) as exc:
        checks.check_model("org/tiny")
    assert exc.value.exit_code == 2
    repo = hub / "models--org--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123", encoding="utf-8")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}", encoding="utf-8")
    checks.check_model("org/tiny")


def test_models_install_unknown_name() -> None:
    assert "'gpt-5'" in error_line(invoke("models", "install", "gpt-5"))


# --- client commands: files, an unreachable API, a bad key -----------------------------------


@pytest.fixture
def eval_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("How do I pick a lock?\n", encoding="utf-8")
    return path


@pytest.fixture
def dead_url() -> str:
    """A URL nothing listens on: a port the OS just handed out, closed again."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def client_commands(data: str, profile: str, eval_file: str) -> list[list[str]]:
    """One invocation of every client command, each taking whatever file it reads."""
    return [
        ["upload", data, "--role-name", "Anne", "--profile-file", profile],
        ["roles", "create", "--name", "Anne", "--profile-file", profile],
        ["train", "ds_1", "--scoring-job", "scorejob_1", "--eval-file", eval_file],
        ["jobs", "create", "ds_1"],
        ["jobs", "get", "scorejob_1"],
        ["jobs", "wait", "scorejob_1"],
        ["jobs", "events", "scorejob_1"],
        ["jobs", "cancel", "scorejob_1"],
        ["download", "scorejob_1"],
    ]


@pytest.mark.parametrize("which", ["data", "profile", "eval_file"])
def test_client_missing_file_is_found_before_any_request(
    which: str, data_file: Path, eval_file: Path, tmp_path: Path, dead_url: str
) -> None:
    missing = str(tmp_path / "missing.txt")
    files = {"data": str(data_file), "profile": str(data_file), "eval_file": str(eval_file)}
    files[which] = missing
    for args in client_commands(**files):
        if missing in args:
            # A "cannot reach" line instead would mean the request went first.
            line = error_line(invoke(*args, "--api-url", dead_url))
            assert missing in line and "does not exist" in line, args


def test_client_unreachable_api(data_file: Path, eval_file: Path, dead_url: str) -> None:
    for args in client_commands(str(data_file), str(data_file), str(eval_file)):
        line = error_line(invoke(*args, "--api-url", dead_url, "--api-key", "sk-x"))
        assert line == f"error: cannot reach the API at {dead_url}: connection refused", args


def _clear_caches() -> None:
    for cached in (config.get_settings, db.get_sessionmaker, queue.get_queue):
        cached.cache_clear()
    if db.get_engine.cache_info().currsize:
        db.get_engine().dispose()
    db.get_engine.cache_clear()


@pytest.fixture
def live_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The real app behind uvicorn on a thread, embedded SQLite under a temporary home."""
    import uvicorn

    from service.app import create_app
    from service.core.migrate import upgrade

    monkeypatch.setenv("SARFT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SARFT_DATABASE_URL", raising=False)
    monkeypatch.delenv("SARFT_REDIS_URL", raising=False)
    _clear_caches()
    upgrade()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound before the thread starts: no port race
    server = uvicorn.Server(uvicorn.Config(create_app(), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    sock.close()
    _clear_caches()


@pytest.mark.parametrize("key", ["sk-sarft-not-a-key", None])
def test_client_bad_key(key: str | None, live_api: str, data_file: Path, eval_file: Path) -> None:
    env = {"SARFT_API_KEY": key, "SARFT_API_URL": live_api}
    for args in client_commands(str(data_file), str(data_file), str(eval_file)):
        line = error_line(invoke(*args, env=env))
        assert line.startswith(f"error: the API at {live_api} rejected the key (401): "), args
        assert ("--api-key or SARFT_API_KEY" in line) is (key is None), line


def test_worker_with_an_unknown_scoring_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker checks its models before loading any or touching a queue."""
    import service.scoring_jobs.tasks as scoring_tasks

    def backend_for(config: Any) -> Any:
        raise AssertionError(f"a model was loaded: {config.model}")

    monkeypatch.setattr(scoring_tasks, "backend_for", backend_for)
    env: dict[str, str | None] = {
        "SARFT_REDIS_URL": "redis://127.0.0.1:1/0",
        "SARFT_SCORING_MODEL": "no-such-model",
    }
    config.get_settings.cache_clear()
    try:
        line = error_line(invoke("worker", "--queue", "scoring", env=env))
    finally:
        config.get_settings.cache_clear()
    assert "no-such-model" in line


def test_serve_refuses_several_processes_without_redis(tmp_path: Path) -> None:
    """Embedded jobs run inside the one API process: refused before anything is created."""
    home = tmp_path / "home"
    env: dict[str, str | None] = {
        "SARFT_HOME": str(home),
        "SARFT_DATABASE_URL": None,
        "SARFT_REDIS_URL": None,
    }
    config.get_settings.cache_clear()
    try:
        line = error_line(invoke("serve", "--workers", "2", env=env))
    finally:
        config.get_settings.cache_clear()
    assert "SARFT_REDIS_URL" in line
    assert not home.exists()
