"""Client commands: talk to a running sarft API (upload, jobs, download; roles in
:mod:`sarft.roles_cli`)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sarft.checks import fail, readable_file
from sarft.client import SarftAPIError, SarftClient

jobs_app = typer.Typer(
    help="Scoring and fine-tuning jobs on a sarft API (get, wait, events, cancel).",
    no_args_is_help=True,
)
console = Console(stderr=True)

ApiUrl = Annotated[
    str | None,
    typer.Option("--api-url", envvar="SARFT_API_URL", help="API base URL.", show_default=False),
]
ApiKey = Annotated[
    str | None,
    typer.Option("--api-key", envvar="SARFT_API_KEY", help="API key.", show_default=False),
]


def make_client(api_url: str | None, api_key: str | None) -> SarftClient:
    """The client every command uses (tests replace this to inject an in-process app)."""
    return SarftClient(base_url=api_url, api_key=api_key)


def _reason(exc: Exception) -> str:
    """``connection refused`` from ``[Errno 111] Connection refused``: the errno is noise."""
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", str(exc)).strip()
    if not text:  # httpx's timeouts often carry no message
        text = "timed out" if isinstance(exc, httpx.TimeoutException) else type(exc).__name__
    return text[0].lower() + text[1:]


@contextmanager
def api_client(api_url: str | None, api_key: str | None) -> Iterator[SarftClient]:
    """A client whose API, connection and file errors end the command with exit code 2.

    The one place client commands turn failures into one ``error:`` line: a wrong URL or key
    is the usual first mistake, and deserves a sentence rather than httpx's traceback.
    """
    client = make_client(api_url, api_key)
    try:
        yield client
    except SarftAPIError as exc:
        if exc.status == 401:
            hint = "" if client.api_key else " (no key given: --api-key or SARFT_API_KEY)"
            fail(f"the API at {client.base_url} rejected the key (401): {exc.message}{hint}")
        # Validation errors list their lines below the one-line summary.
        typer.echo(f"error ({exc.status} {exc.code}): {exc.message}", err=True)
        for err in exc.errors:
            where = f"line {err['line']}: " if err.get("line") else ""
            typer.echo(f"  {where}{err.get('message', '')}", err=True)
        raise typer.Exit(2) from exc
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        fail(f"cannot reach the API at {client.base_url}: {_reason(exc)}")
    except OSError as exc:  # a local file: the upload's source or a download's destination
        fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
    finally:
        client.close()


def echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, ensure_ascii=False))


def profile_text(profile: str | None, profile_file: Path | None) -> str | None:
    if profile is not None and profile_file is not None:
        raise typer.BadParameter("give --profile or --profile-file, not both")
    if profile_file is not None:
        readable_file(profile_file, "profile file")
        try:
            return profile_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"cannot read profile file {profile_file}: {exc}")
    return profile


Profile = Annotated[str | None, typer.Option("--profile", help="Character profile text.")]
ProfileFile = Annotated[
    Path | None, typer.Option("--profile-file", help="File holding the profile.")
]


def upload(
    # Checked in the body, not with exists=True: click's message is a multi-line panel.
    file: Annotated[Path, typer.Argument(help="JSONL or JSON dataset.")],
    role_id: Annotated[str | None, typer.Option("--role-id", help="An existing role.")] = None,
    role_name: Annotated[
        str | None, typer.Option("--role-name", help="Create the role inline: its name.")
    ] = None,
    profile: Profile = None,
    profile_file: ProfileFile = None,
    idempotency_key: Annotated[
        str | None, typer.Option("--idempotency-key", help="Retry-safe upload key.")
    ] = None,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Upload a dataset for a role; prints the dataset (422: each invalid line, exit 2)."""
    readable_file(file, "dataset file")
    text = profile_text(profile, profile_file)
    if role_id is not None and (role_name is not None or text is not None):
        raise typer.BadParameter("give --role-id, or --role-name with a profile, not both")
    if role_id is None and (role_name is None or text is None):
        raise typer.BadParameter("give --role-id, or --role-name with --profile or --profile-file")
    with api_client(api_url, api_key) as client:
        dataset = client.upload_dataset(
            file,
            role_id=role_id,
            role_name=role_name,
            role_profile=text,
            idempotency_key=idempotency_key,
        )
    echo_json(dataset)


def download(
    job_id: Annotated[str, typer.Argument(help="A succeeded scoring or fine-tuning job.")],
    which: Annotated[
        str, typer.Option("--which", help="Scoring jobs: flagged | all samples.")
    ] = "flagged",
    adapter: Annotated[
        bool, typer.Option("--adapter", help="Fine-tuning jobs: the adapter as .tar.gz.")
    ] = False,
    report: Annotated[
        str | None, typer.Option("--report", help="Fine-tuning jobs: the report, json | html.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output file; default named after the job."),
    ] = None,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Download a scoring job's flagged (or all) samples, or a fine-tuning job's adapter or
    report."""
    if adapter and report is not None:
        raise typer.BadParameter("give --adapter or --report, not both")
    if report is not None and report not in ("json", "html"):
        raise typer.BadParameter("--report must be json or html")
    if (adapter or report is not None) != job_id.startswith("ftjob_"):
        raise typer.BadParameter(
            "--adapter and --report are for fine-tuning jobs (ftjob_...); "
            "a scoring job's download is its samples (--which)"
        )
    if which not in ("flagged", "all"):
        raise typer.BadParameter("--which must be flagged or all")
    with api_client(api_url, api_key) as client:
        if adapter:
            dest = out or Path(f"{job_id}-adapter.tar.gz")
            size = client.download_adapter(job_id, dest)
        elif report is not None:
            dest = out or Path(f"{job_id}-report.{report}")
            size = client.download_report(job_id, dest, report)
        else:
            dest = out or Path(f"{job_id}-{which}.jsonl")
            client.download_subset(job_id, dest, which=which)
            typer.echo(f"{dest} ({_count_lines(dest)} lines)")
            return
    typer.echo(f"{dest} ({size:,} bytes)")


def _count_lines(path: Path) -> int:
    lines = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            lines += chunk.count(b"\n")
    return lines


@jobs_app.command("create")
def jobs_create(
    dataset_id: Annotated[str, typer.Argument(help="The dataset to score.")],
    margin: Annotated[
        float | None, typer.Option("--margin", help="Flag when s_unsafe - s_role > margin.")
    ] = None,
    no_reference: Annotated[
        bool, typer.Option("--no-reference", help="Skip the empty-system pass.")
    ] = False,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1)] = None,
    model: Annotated[str | None, typer.Option("--model", help="A model the server allows.")] = None,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Start a scoring job; prints the job."""
    options: dict[str, Any] = {"margin": margin, "batch_size": batch_size, "model": model}
    if no_reference:
        options["compute_reference"] = False
    with api_client(api_url, api_key) as client:
        echo_json(client.create_scoring_job(dataset_id, **options))


@jobs_app.command("get")
def jobs_get(
    job_id: Annotated[str, typer.Argument()],
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Print a job's status, progress and result."""
    with api_client(api_url, api_key) as client:
        echo_json(client.get_job(job_id))


@jobs_app.command("wait")
def jobs_wait(
    job_id: Annotated[str, typer.Argument()],
    poll: Annotated[float, typer.Option("--poll", min=0.1, help="Seconds between polls.")] = 2.0,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Show progress until the job finishes; exit 0 if it succeeded, 1 otherwise."""
    with api_client(api_url, api_key) as client:
        follow(client, job_id, poll)


def _progress_of(job: dict[str, Any]) -> tuple[str, int | None, int]:
    """(description, total, completed) of a scoring job (samples) or fine-tuning job (steps)."""
    done = job["progress"]
    if "phase" in done:
        phase = done["phase"] if job["status"] == "running" else job["status"]
        return phase.replace("_", " "), done["total_steps"], done["step"]
    return job["status"], done["total"], done["processed"]


def follow(client: SarftClient, job_id: str, poll: float) -> dict[str, Any]:
    """Poll with a progress bar until the job finishes; print it; exit 1 unless it succeeded."""
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )
    task = progress.add_task("queued", total=None)

    def update(job: dict[str, Any]) -> None:
        description, total, completed = _progress_of(job)
        progress.update(task, description=description, total=total, completed=completed)

    # One poll before the bar is drawn: a wrong URL, key or job id then prints its error line
    # alone, not under an empty bar.
    update(client.get_job(job_id))
    try:
        with progress:
            job = client.wait_job(job_id, poll_s=poll, on_progress=update)
    except KeyboardInterrupt:
        console.print(f"stopped waiting; the job runs on (sarft jobs cancel {job_id})")
        raise typer.Exit(130) from None
    echo_json(job)
    if job["status"] != "succeeded":
        reason = job.get("error") or "no error recorded"
        console.print(f"job {job['status']}: {reason}", markup=False)
        raise typer.Exit(1)
    return job


@jobs_app.command("events")
def jobs_events(
    job_id: Annotated[str, typer.Argument()],
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Only the latest N events.")
    ] = None,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Print the job's events, oldest first."""
    with api_client(api_url, api_key) as client:
        events = client.list_events(job_id, limit=limit)
    for event in events:
        data = f" {json.dumps(event['data'], ensure_ascii=False)}" if event.get("data") else ""
        when = datetime.fromtimestamp(event["created_at"], UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        typer.echo(f"{when} {event['level']:<7} {event['message']}{data}")


@jobs_app.command("cancel")
def jobs_cancel(
    job_id: Annotated[str, typer.Argument()],
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Cancel a queued or running job; prints the job."""
    with api_client(api_url, api_key) as client:
        echo_json(client.cancel_job(job_id))


@jobs_app.command("checkpoints")
def jobs_checkpoints(
    job_id: Annotated[str, typer.Argument(help="A fine-tuning job.")],
    download: Annotated[
        int | None,
        typer.Option("--download", help="Save the checkpoint of this step (see --out)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Default: JOB_ID-step-N.tar.gz.")
    ] = None,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """List a fine-tuning job's checkpoints (step, train and validation loss), newest first,
    or download one's weights with --download STEP."""
    with api_client(api_url, api_key) as client:
        found = client.list_checkpoints(job_id)
        if download is None:
            for c in found:
                m = c["metrics"]
                valid = m.get("valid_loss")
                shown = "-" if valid is None else f"{valid:.4f}"
                typer.echo(
                    f"{c['id']}  step {c['step_number']:>6}  train_loss {m['train_loss']:.4f}  "
                    f"valid_loss {shown}"
                )
            return
        chosen = next((c for c in found if c["step_number"] == download), None)
        if chosen is None:
            steps = ", ".join(str(c["step_number"]) for c in found) or "none"
            fail(f"job {job_id} keeps no checkpoint of step {download} (kept: {steps})")
        dest = out or Path(f"{job_id}-step-{download}.tar.gz")
        size = client.download_checkpoint(job_id, chosen["id"], dest)
    typer.echo(f"{dest} ({size:,} bytes)")


@jobs_app.command("export-model")
def jobs_export_model(
    job_id: Annotated[str, typer.Argument(help="A succeeded fine-tuning job.")],
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Output file; default JOB_ID-merged_model.tar.gz."),
    ] = None,
    poll: Annotated[float, typer.Option("--poll", min=0.1, help="Seconds between polls.")] = 2.0,
    timeout: Annotated[
        float, typer.Option("--timeout", min=1.0, help="Seconds to wait for the export.")
    ] = 3600.0,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Download a fine-tuning job's base model with its LoRA adapter merged (full fine-tuning:
    its checkpoint) as .tar.gz, once a training worker has merged it."""
    dest = out or Path(f"{job_id}-merged_model.tar.gz")
    with api_client(api_url, api_key) as client:
        size = client.export_model(job_id, dest, poll=poll, timeout=timeout)
    typer.echo(f"{dest} ({size:,} bytes)")
