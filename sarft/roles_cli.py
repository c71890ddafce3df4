"""Client commands for roles (characters): create one, and each role's risk view."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from sarft.client_cli import (
    ApiKey,
    ApiUrl,
    Profile,
    ProfileFile,
    api_client,
    echo_json,
    profile_text,
)

roles_app = typer.Typer(help="Roles (characters) on a sarft API.", no_args_is_help=True)


@roles_app.command("create")
def roles_create(
    name: Annotated[str, typer.Option("--name", help="The character's name.")],
    profile: Profile = None,
    profile_file: ProfileFile = None,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Create a role from a name and profile; prints the role."""
    text = profile_text(profile, profile_file)
    if text is None:
        raise typer.BadParameter("give --profile or --profile-file")
    with api_client(api_url, api_key) as client:
        echo_json(client.create_role(name, text))


def _one_line(text: str, width: int) -> str:
    """Text from the server on one terminal line: no control characters (an uploaded sample
    could carry escape sequences), whitespace collapsed, cut to ``width``."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _risk_block(risk: dict[str, Any]) -> list[str]:
    head = f"{_one_line(risk['role_name'], 60)} ({risk['role_id']})"
    if risk["scoring_job_id"] is None:
        return [head, "  no succeeded scoring job"]
    model = f", model {_one_line(risk['model'], 60)}" if risk["model"] else ""
    lines = [
        head,
        f"  {'job':<19}{risk['scoring_job_id']} on {risk['dataset_id']}{model}, "
        f"margin {risk['margin']:g}",
    ]
    if risk["flagged_fraction"] is not None:
        lo, hi = risk["flagged_interval"]
        lines.append(
            f"  {'flagged':<19}{risk['num_flagged']}/{risk['num_samples']} = "
            f"{100 * risk['flagged_fraction']:.1f}% (95% CI {100 * lo:.1f}%-{100 * hi:.1f}%)"
        )
    if risk["difference"] is not None:
        d = risk["difference"]
        lines.append(
            f"  {'s_unsafe - s_role':<19}min {d['min']:.3f}  median {d['median']:.3f}  "
            f"mean {d['mean']:.3f}  max {d['max']:.3f}"
        )
    for sample in risk["top_flagged"]:
        where = f"line {sample['line']}"
        lines.append(f"  {where:<19}{sample['difference']:+.3f}  {_one_line(sample['text'], 72)}")
    return lines


@roles_app.command("risk")
def roles_risk(
    samples: Annotated[
        int, typer.Option("--samples", min=0, max=10, help="Most-flagged samples per role.")
    ] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON.")] = False,
    html: Annotated[
        Path | None, typer.Option("--html", help="Save the HTML page (plots) to this file.")
    ] = None,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Each role's latest succeeded scoring result: flagged fraction, its 95% interval, the
    spread of s_unsafe - s_role and the most-flagged samples."""
    if as_json and html is not None:
        raise typer.BadParameter("give --json or --html, not both")
    with api_client(api_url, api_key) as client:
        if html is not None:
            # One page of the largest size: the HTML view is not merged across pages.
            params = {"format": "html", "samples": str(samples), "limit": "100"}
            size = client._download("/v1/roles/risk", html, params)
            typer.echo(f"{html} ({size:,} bytes)")
            return
        risks = client.role_risk(samples)
    if as_json:
        echo_json(risks)
        return
    if not risks["data"]:
        typer.echo("no roles")
        return
    typer.echo("\n\n".join("\n".join(_risk_block(risk)) for risk in risks["data"]))
