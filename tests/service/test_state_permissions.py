"""The embedded server's state (home, SQLite database and its journal, uploads, artifacts) is
owner-only: other local users cannot read tenants' datasets or key hashes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import httpx

from tests.service.conftest import ServerProcess


def group_or_other_bits(root: Path) -> dict[str, str]:
    loose = {}
    for path in [root, *root.rglob("*")]:
        mode = path.stat().st_mode
        if mode & 0o077:
            loose[str(path.relative_to(root))] = stat.filemode(mode)
    return loose


def test_embedded_state_is_owner_only(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o755)  # an existing home made before this fix: it gets tightened
    home.chmod(0o755)
    old_umask = os.umask(0o022)  # what most shells have
    try:
        # Empty URLs select the embedded default (SQLite, in-process jobs), whatever is set.
        env = {
            "SARFT_HOME": str(home),
            "SARFT_DATABASE_URL": "",
            "SARFT_REDIS_URL": "",
            "SARFT_ARTIFACTS_DIR": str(home / "artifacts"),  # the default, whatever is set
        }
        server = ServerProcess(env)
    finally:
        os.umask(old_umask)
    try:
        key = server.output().split("(shown once):\n")[1].splitlines()[0].strip()
        headers = {"Authorization": f"Bearer {key}"}
        rows = "".join(
            json.dumps({"role": "A", "question": f"Q{i}?", "generated": [f"A{i}."]}) + "\n"
            for i in range(5)
        )
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
            r = http.post(
                "/v1/datasets",
                files={"file": ("rows.jsonl", rows.encode(), "application/jsonl")},
                data={"role_name": "A", "role_profile": "A tester."},
            )
            assert r.status_code == 201, r.text
    finally:
        server.stop()
    assert (home / "sarft.db").exists() and (home / "uploads").is_dir()
    assert (home / "artifacts").is_dir()
    assert group_or_other_bits(home) == {}
