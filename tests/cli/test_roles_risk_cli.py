"""`sarft roles risk` and SarftClient.role_risk against the in-process app (embedded SQLite)."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import select
from typer.testing import CliRunner

from sarft.client import SarftClient
from service.core import db
from service.models import JobStatus, Role, SampleScore, ScoringJob, Tenant
from tests.cli import test_client_cli as base
from tests.cli.test_client_cli import GOOD, PROFILE, invoke, write_jsonl
from worker.results import SampleScores
from worker.scoring.base import ResponseLogprob

# The fixtures of the client tests: the app in-process on SQLite, no queue, no model.
fake_queue, api_key, client, cli = base.fake_queue, base.api_key, base.client, base.cli


def _scored(api: SarftClient, tmp_path: Path, name: str, deltas: list[float]) -> str:
    """A role whose dataset has a succeeded scoring job, as a worker leaves one."""
    role = api.create_role(name, PROFILE)
    ds = api.upload_dataset(write_jsonl(tmp_path / "good.jsonl", GOOD), role_id=role["id"])
    job = api.create_scoring_job(ds["id"])
    with db.session_scope() as session:
        for idx, delta in enumerate(deltas):
            scores = SampleScores(
                index=idx,
                role=ResponseLogprob(sum=-4.0, count=2),
                unsafe=ResponseLogprob(sum=-4.0 + 2 * delta, count=2),
                ref=None,
                margin=0.0,
            )
            session.add(
                SampleScore(
                    job_id=job["id"],
                    idx=idx,
                    flagged=scores.flagged,
                    scores=json.dumps(scores.to_json()),
                    delta=scores.finite_delta,
                )
            )
        row = session.get(ScoringJob, job["id"])
        assert row is not None
        row.status, row.processed, row.finished_at = JobStatus.SUCCEEDED, 3, db.utcnow()
    return str(job["id"])


def test_roles_risk_table_json_and_html(
    cli: CliRunner, client: SarftClient, tmp_path: Path
) -> None:
    job = _scored(client, tmp_path, "Captain <Anne>", [0.5, -0.25, 0.125])
    client.create_role("Evil\x1b[2J Twin", PROFILE)

    result = invoke(cli, "roles", "risk", "--samples", "1")
    assert result.exit_code == 0, result.output
    out = result.output
    assert "\x1b" not in out and "Evil [2J Twin" in out
    assert "no succeeded scoring job" in out
    assert f"  job                {job} on ds_" in out
    assert "  flagged            2/3 = 66.7% (95% CI 20.8%-93.9%)" in out
    assert "  s_unsafe - s_role  min -0.250  median 0.125  mean 0.125  max 0.500" in out
    assert "  line 1             +0.500  A0" in out and "+0.125" not in out

    result = invoke(cli, "roles", "risk", "--json")
    assert result.exit_code == 0, result.output
    body = json.loads(result.output)
    assert body == client.role_risk()
    assert [s["index"] for s in body["data"][1]["top_flagged"]] == [0, 2]

    page = tmp_path / "risk.html"
    result = invoke(cli, "roles", "risk", "--html", str(page))
    assert result.exit_code == 0, result.output
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!doctype html>") and "Captain &lt;Anne&gt;" in text
    assert "<Anne>" not in text and text.count("<svg") == 2

    assert invoke(cli, "roles", "risk", "--json", "--html", str(page)).exit_code == 2
    assert invoke(cli, "roles", "risk", "--samples", "11").exit_code == 2


def test_client_role_risk_reads_every_page(client: SarftClient) -> None:
    from service.core.ids import new_id

    with db.session_scope() as session:
        tenant = session.scalars(select(Tenant.id)).one()
        for i in range(130):
            session.add(
                Role(id=new_id("role"), tenant_id=tenant, name=f"r{i}", profile="p",
                     role_prompt="a", unsafe_prompt="b")
            )  # fmt: skip
    risks = client.role_risk(samples=0, bins=5)
    assert risks["has_more"] is False and len(risks["data"]) == 130
    assert len({r["role_id"] for r in risks["data"]}) == 130
