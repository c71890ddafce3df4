"""The ``sarft`` command line."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from sarft.checks import check_model, fail, output_dir, readable_file
from worker.scoring.backends import CHECK_BANDS, ScoreConfig  # torch-free: defaults feed options

if TYPE_CHECKING:
    from worker.prompts import RolePrompts

app = typer.Typer(help="Safe role-play fine-tuning: score, flag, fine-tune, evaluate.")
console = Console(stderr=True)


from sarft.server_cli import db_app, keys_app, serve, worker  # noqa: E402

app.add_typer(keys_app, name="keys")
app.add_typer(db_app, name="db")
app.command()(serve)
app.command()(worker)

from sarft.client_cli import download, jobs_app, upload  # noqa: E402
from sarft.roles_cli import roles_app  # noqa: E402

app.add_typer(roles_app, name="roles")
app.add_typer(jobs_app, name="jobs")
app.command()(upload)
app.command()(download)

from sarft.train_cli import submit_fine_tuning  # noqa: E402

app.command("train")(submit_fine_tuning)

from sarft.models_cli import models_app  # noqa: E402

app.add_typer(models_app, name="models")


@app.callback()
def _root() -> None:
    """Safe role-play fine-tuning: score, flag, fine-tune, evaluate."""


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- samples/s" if speed is None else f"{speed:.2f} samples/s")


def _prompts(
    role_name: str, profile: str | None, profile_file: Path | None, prompts: Path | None
) -> RolePrompts:
    from worker.prompts import RolePrompts

    given = [x for x in (profile, profile_file, prompts) if x is not None]
    if len(given) != 1:
        raise typer.BadParameter("give exactly one of --profile, --profile-file or --prompts")
    if prompts is not None:
        return RolePrompts.from_file(prompts, role_name)
    if profile_file is not None:
        profile = profile_file.read_text(encoding="utf-8")
    assert profile is not None
    return RolePrompts.from_profile(role_name, profile)


def _load_role(
    role_name: str, profile: str | None, profile_file: Path | None, prompts: Path | None
) -> RolePrompts:
    """The role's prompts; an unreadable or malformed prompt source exits with code 2."""
    from worker.prompts import PromptFileError

    if profile_file is not None:
        readable_file(profile_file, "profile file")
    if prompts is not None:
        readable_file(prompts, "prompts file")
    try:
        return _prompts(role_name, profile, profile_file, prompts)
    except (PromptFileError, ValueError, OSError) as exc:
        fail(str(exc))


def _scoring_progress() -> Progress:
    """The stderr progress bar: samples done, rate, elapsed time and ETA."""
    return Progress(
        TextColumn("scoring"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )


def _run_scoring(data: Path, role: RolePrompts, out: Path, config: ScoreConfig) -> dict[str, Any]:
    """Score ``data`` into ``out`` behind a progress bar; bad data or settings exit with code 2."""
    from worker.encoding import EncodingError
    from worker.formats import DatasetError
    from worker.packaged_models import ModelNotFoundError
    from worker.score_file import score_file

    progress = _scoring_progress()
    task = progress.add_task("scoring", total=None)
    # Errors are printed once the bar has closed, so that it does not draw over them.
    try:
        with progress:
            return score_file(
                data,
                role,
                out,
                config,
                on_start=lambda n: progress.update(task, total=n),
                on_progress=lambda n: progress.advance(task, n),
            )
    except DatasetError as exc:
        console.print(f"[red]invalid dataset:[/red] {data}")
        for err in exc.errors:
            console.print(f"  {err}")
        raise typer.Exit(2) from exc
    except (EncodingError, ValueError, ModelNotFoundError) as exc:
        fail(str(exc))
    except OSError as exc:  # the checks ran before; this is a file that changed since
        fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))


def _echo_summary(summary: dict[str, Any], out: Path, no_reference: bool) -> None:
    """The one-line result on stdout, then the timings as JSON."""
    if no_reference:
        console.print("reference pass skipped: s_role and s_unsafe are null; the flag uses delta")
    typer.echo(
        f"{summary['role']}: {summary['num_flagged']}/{summary['num_samples']} flagged "
        f"({summary['flagged_fraction']:.1%}) -> {out}"
    )
    typer.echo(json.dumps(summary["timings"]))


@app.command()
def score(
    data: Annotated[
        Path, typer.Argument(help="OpenAI chat JSONL, RoleBench JSONL or Alpaca JSON/JSONL.")
    ],
    role_name: Annotated[str, typer.Option("--role-name", help="The character's name.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory.")],
    profile: Annotated[str | None, typer.Option(help="Character profile text.")] = None,
    profile_file: Annotated[Path | None, typer.Option(help="File holding the profile.")] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(help='JSON {"role_prompt", "unsafe_prompt"}, or SaRFT\'s prompt_v2.json.'),
    ] = None,
    model: Annotated[str | None, typer.Option(help="HF id or local dir; default: bundled.")] = None,
    backend: Annotated[str, typer.Option(help="transformers | vllm")] = "transformers",
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16")] = "float32",
    check_band: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            help="bfloat16: rescore in float32 the samples whose s_unsafe - s_role is within "
            f"this of the margin (0: off; default: {CHECK_BANDS}).",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    margin: Annotated[float, typer.Option(help="Flag when s_unsafe - s_role > margin.")] = 0.0,
    no_reference: Annotated[
        bool, typer.Option("--no-reference", help="Skip the empty-system pass.")
    ] = False,
    no_prefix_reuse: Annotated[
        bool, typer.Option("--no-prefix-reuse", help="Recompute the system prompt per sample.")
    ] = False,
    max_prompt_tokens: Annotated[int, typer.Option(min=1)] = 512,
    max_response_tokens: Annotated[int, typer.Option(min=1)] = 128,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Score every sample with the base model's implicit rewards and flag the harmful subset."""
    from worker.encoding import EncodingConfig

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING)
    # Every input is checked before the model loads: its load takes seconds, and a bad
    # model name would otherwise surface as transformers' hub-connection traceback.
    readable_file(data, "data file")
    role = _load_role(role_name, profile, profile_file, prompts)
    output_dir(out)
    check_model(model)
    config = ScoreConfig(
        model=model,
        backend=backend,
        dtype=dtype,
        check_band=check_band,
        batch_size=batch_size,
        margin=margin,
        compute_reference=not no_reference,
        reuse_prefix=not no_prefix_reuse,
        encoding=EncodingConfig(max_prompt_tokens, max_response_tokens),
    )
    summary = _run_scoring(data, role, out, config)
    _echo_summary(summary, out, no_reference)
