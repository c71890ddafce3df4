"""Checks of the command line's input, run before anything slow (a model load, a request).

Every failure prints one line, ``error: ...``, on stderr and exits with code 2: a user who
mistyped a path or a model name should read what is wrong, not a traceback from deep inside
transformers after a model has been loading for seconds.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NoReturn

import typer

USAGE_ERROR = 2
"""click's own code for bad usage: the same for every input the command refuses."""


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and exit 2."""
    # typer.echo, not rich: rich wraps at the console width, which splits the line.
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(USAGE_ERROR)


def readable_file(path: Path, what: str = "file") -> Path:
    """``path``, once it is known to be a file this process can open for reading."""
    if not path.exists():
        fail(f"{what} {path} does not exist")
    if path.is_dir():
        fail(f"{what} {path} is a directory, not a file")
    try:
        # Opening is the only honest test: os.access ignores ACLs and lies for root.
        with path.open("rb"):
            pass
    except OSError as exc:
        fail(f"cannot read {what} {path}: {exc.strerror or exc}")
    return path


def output_dir(path: Path) -> Path:
    """``path``, unless it exists and is not a directory (found only after scoring otherwise)."""
    if path.exists() and not path.is_dir():
        fail(f"output directory {path} exists and is not a directory")
    return path


def _in_hf_cache(model: str) -> bool:
    """Whether ``model`` is a hub id whose config is in the local HF cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(model, "config.json")
    except ValueError:  # not even a valid hub id, e.g. a mistyped path
        return False
    # None: never fetched; a non-str sentinel: the hub said the file does not exist.
    return isinstance(found, str)


def check_model(model: str | None) -> None:
    """Exit 2 unless ``model`` loads without the network: a packaged model that is installed,
    a local model directory, or a hub id already in the local HF cache.

    None and ``bundled`` mean the bundled model, as everywhere else.
    """
    from worker.home import is_converted
    from worker.packaged_models import PACKAGED_MODELS, packaged

    found = packaged(model)
    if found is not None:
        if not found.installed() and not is_converted(found.name):
            fail(f"model {found.name} is not installed: run `sarft models install {found.name}`")
        return
    assert model is not None  # packaged() maps None to the bundled model
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            fail(f"model directory {model} has no config.json (save it with save_pretrained)")
        return
    if model.startswith((".", "~", os.sep)):  # meant as a path: no hub id starts so
        fail(f"model directory {model} does not exist")
    if _in_hf_cache(model):
        return
    fail(
        f"unknown model {model!r}: not a packaged model ({', '.join(PACKAGED_MODELS)}), "
        "a model directory, or a hub id in the local Hugging Face cache; "
        "`sarft models list` shows the packaged models and how to install them"
    )
