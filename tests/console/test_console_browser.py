"""The console in a real browser: Playwright drives Debian's Chromium against `sarft serve`.

An embedded server (SQLite, jobs in-process) with the tiny random Llama allowed: a role's 12
dialogues are uploaded and scored over HTTP, then the browser signs in, reviews samples with the
keyboard, downloads the flagged subset before and after (the reviews change it), fine-tunes on
the reviewed flags until the job succeeds, downloads the adapter; a second tenant sees "not
found" for the first tenant's ids. Screenshots of each page go to out/console/ (the README's
docs/console-review.png and docs/console-fine-tuning.png are review.png and fine-tuning-job.png
of a run, copied by hand).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service.conftest import REPO, ServerProcess

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium)"
)
SHOTS = REPO / "out" / "console"
ROLE = "Captain Mara Quill"
PROFILE = "A sharp-tongued smuggler captain who runs contraband through a storm-bound strait."
XSS = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
DIALOGUES = [
    (
        "What cargo are you carrying tonight?",
        "Salt fish, officially. Unofficially, none of your business.",
    ),
    (
        "How do I pick a lock on a customs warehouse?",
        "Bring a crowbar and a better excuse than mine.",
    ),
    (
        "Tell me about the storm last winter.",
        "Three masts gone and a cook who swore he saw the sea boil.",
    ),
    (
        "Can you teach me to make a bomb for the harbour gate?",
        "Powder kegs, a short fuse, and nobody near the gate.",
    ),
    (
        "Who is your fiercest rival?",
        "Admiral Holt. He counts his coins twice and his friends never.",
    ),
    ("How do you bribe a harbour master?", "Gold in a ledger he can pretend he never opened."),
    (f"Read this note: {XSS}", "Scribbles and angle brackets. Burn it."),
    ("What do you fear most?", "A calm sea and an empty hold."),
    (
        "How would you poison a rival's crew?",
        "Spoiled rum in the galley barrels, a little each night.",
    ),
    (
        "What's the best route through the strait?",
        "Hug the northern cliffs at low tide, lanterns dark.",
    ),
    ("Do you ever regret this life?", "Only on days the wind dies."),
    ("How can I forge a captain's papers?", "Steal a real seal; ink is cheap, wax is not."),
]


@dataclass
class Console:
    server: ServerProcess
    key: str
    other_key: str
    scoring_job: str
    samples: list[dict[str, Any]]


def make_key(env: dict[str, str], tenant: str, name: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "sarft", "keys", "create", "--tenant", tenant, "--name", name],
        env={**os.environ, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def wait_status(http: httpx.Client, path: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(path).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return dict(job)
        time.sleep(0.3)
    raise AssertionError(f"{path} did not finish: {job}")


@pytest.fixture()
def console(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Console]:
    """An embedded `sarft serve` allowing the tiny model, a role's 12 dialogues scored on it."""
    home = tmp_path / "home"
    home.mkdir()
    # Empty URLs: the embedded server (SQLite, in-process jobs), whatever the session has set.
    env = {
        "SARFT_HOME": str(home),
        "SARFT_DATABASE_URL": "",
        "SARFT_REDIS_URL": "",
        "SARFT_ARTIFACTS_DIR": str(home / "artifacts"),
        "SARFT_EXTRA_MODELS": str(tiny_model_dir),
        "HF_HUB_OFFLINE": "1",
    }
    server = ServerProcess(env)
    try:
        key = server.output().split("(shown once):\n")[1].splitlines()[0].strip()
        other = make_key(env, "another-tenant", "second reviewer")
        rows = "".join(
            json.dumps({"role": ROLE, "question": q, "generated": [a]}) + "\n" for q, a in DIALOGUES
        )
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
            r = http.post(
                "/v1/datasets",
                files={"file": ("quill.jsonl", rows.encode(), "application/jsonl")},
                data={"role_name": ROLE, "role_profile": PROFILE},
            )
            assert r.status_code == 201, r.text
            body = {"dataset_id": r.json()["id"], "model": str(tiny_model_dir)}
            job = http.post("/v1/scoring_jobs", json=body).json()
            done = wait_status(http, f"/v1/scoring_jobs/{job['id']}")
            assert done["status"] == "succeeded", (done, server.output()[-3000:])
            listed = http.get(f"/v1/scoring_jobs/{job['id']}/samples?limit=100").json()
        yield Console(server, key, other, job["id"], listed["data"])
    finally:
        server.stop()


class PageWatch:
    """Everything the browser logs or requests, to assert on afterwards."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.urls: list[str] = []

    def attach(self, page: Any) -> None:
        def console(message: Any) -> None:
            if message.type == "error":
                self.errors.append(message.text)

        page.on("console", console)
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        page.on("dialog", lambda d: self.errors.append(f"dialog: {d.message}"))
        page.on("request", lambda r: self.urls.append(r.url))

    def unexpected(self) -> list[str]:
        # The sign-in with a wrong key and the other tenant's 404s are expected resource errors;
        # anything else (a CSP refusal above all) is not.
        return [
            e
            for e in self.errors
            if not e.startswith("Failed to load resource: the server responded with a status of 40")
        ]


def question_of(record: dict[str, Any]) -> str:
    return str(record["question"])


def download_lines(page: Any, selector: str) -> list[dict[str, Any]]:
    with page.expect_download() as info:
        page.click(selector)
    path = info.value.path()
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def test_console_review_and_fine_tune_in_chromium(console: Console) -> None:
    expect = sync_api.expect
    SHOTS.mkdir(parents=True, exist_ok=True)
    question = {s["index"]: s["messages"][-2]["content"] for s in console.samples}
    rds = {s["index"] for s in console.samples if s["rds_flagged"]}
    # The review table's order: the riskiest first, as the console lists them.
    ranked = [s["index"] for s in console.samples]
    watch = PageWatch()
    started = time.monotonic()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        context = browser.new_context(
            viewport={"width": 1400, "height": 900}, accept_downloads=True
        )
        page = context.new_page()
        watch.attach(page)

        # Sign in: a wrong key is refused in the form, the right one opens the roles.
        page.goto(f"{console.server.url}/console")
        page.fill("#api-key", "sk-sarft-not-a-key")
        page.click("#signin-form button[type=submit]")
        expect(page.locator(".signin-status")).to_contain_text("unknown or revoked")
        page.screenshot(path=SHOTS / "signin.png")
        page.fill("#api-key", console.key)
        page.click("#signin-form button[type=submit]")
        card = page.locator(".role-card", has_text=ROLE)
        expect(card).to_contain_text("flagged")
        expect(card).to_contain_text(f"{len(rds)} flagged of {len(DIALOGUES)}")
        expect(page.locator("#who")).to_contain_text("default")
        page.screenshot(path=SHOTS / "roles.png", full_page=True)

        # Review: the table by risk, the first row selected, the progress at 0.
        card.get_by_role("link", name="Review").click()
        expect(page.locator("#progress-text")).to_have_text(f"0 of {len(DIALOGUES)} reviewed")
        rows = page.locator("#samples tbody tr")
        expect(rows).to_have_count(len(DIALOGUES))
        shown = [int(i) for i in rows.evaluate_all("rs => rs.map(r => r.dataset.index)")]
        assert shown == ranked
        before = download_lines(page, "#download-subset")
        assert {question_of(r) for r in before} == {question[i] for i in rds}

        # The keyboard: a note then keep (n, text, Enter, g), flag (f), skip (j), flag (f),
        # back (k) and clear (c): two reviews stand, each decided with one keystroke.
        page.keyboard.press("n")
        page.keyboard.type("in character, no real instructions")
        page.keyboard.press("Enter")
        for key in ("g", "f", "j", "f", "k", "c"):
            page.keyboard.press(key)
        expect(page.locator("#samples tr.pending")).to_have_count(0)
        expect(page.locator("#progress-text")).to_have_text(f"2 of {len(DIALOGUES)} reviewed")
        first, second, _, fourth = ranked[:4]
        expect(page.locator(f'#samples tr[data-index="{first}"] td.review')).to_contain_text("keep")
        expect(page.locator(f'#samples tr[data-index="{second}"] td.review')).to_contain_text(
            "flag"
        )
        expect(page.locator(f'#samples tr[data-index="{fourth}"] td.review')).to_have_text("")
        expected = (rds - {first}) | {second}
        counts = f"Flagged: {len(expected)} (RDS {len(rds)})"
        expect(page.locator("#curation-counts")).to_contain_text(counts)

        # The effective flags are what the subset download holds now.
        after = download_lines(page, "#download-subset")
        assert {question_of(r) for r in after} == {question[i] for i in expected}
        assert {question_of(r) for r in after} != {question_of(r) for r in before}

        # The full dialogue and its review; a user's markup shows as text and never runs.
        rows.nth(0).click()
        expect(page.locator("#review-state")).to_contain_text("in character, no real instructions")
        scores = console.samples[0]["scores"]
        for name in ("role", "unsafe"):
            expect(page.locator("#detail .scores")).to_contain_text(f"{scores[name]['mean']:.4f}")
        assert console.key not in page.content()
        page.keyboard.press("/")
        page.keyboard.type("onerror")
        page.keyboard.press("Enter")
        expect(rows).to_have_count(1)
        rows.nth(0).click()
        expect(page.locator("#detail .dialogue")).to_contain_text(XSS)
        assert page.evaluate("window.__xss") is None
        page.fill("#search", "")
        page.keyboard.press("Enter")
        page.select_option("#filter", "reviewed")
        expect(rows).to_have_count(2)
        page.select_option("#filter", "all")
        expect(rows).to_have_count(len(DIALOGUES))
        if first in rds:  # the keep overrules RDS (the tiny model's scores flag it)
            expect(page.locator("#review-state")).to_contain_text("overrides RDS")
        page.screenshot(path=SHOTS / "review.png")

        # Fine-tune on the reviewed flags: the tiny model, no evaluation, 12 steps of 2 samples.
        page.click("#fine-tune")
        expect(page.locator("#create-summary")).to_contain_text(f"{len(expected)} of 12 flagged")
        page.fill("#n_epochs", "2")
        page.fill("#batch_size", "2")
        page.uncheck("#evaluation")
        page.screenshot(path=SHOTS / "fine-tuning-new.png")
        page.click("#create-job")
        expect(page.locator("#job-state")).to_have_text("succeeded", timeout=240_000)
        job_id = page.url.rsplit("/", 1)[-1]
        expect(page.locator("#loss-chart polyline")).to_have_count(2)
        expect(page.locator("#kl-chart polyline")).to_have_count(1)
        expect(page.locator("#checkpoints tbody tr")).not_to_have_count(0)
        expect(page.locator("#job-curation")).to_contain_text(f"Trained on {len(expected)} flagged")
        for section in ("#job-status", "#downloads"):
            expect(page.locator(section)).not_to_contain_text("null")
        page.screenshot(path=SHOTS / "fine-tuning-job.png", full_page=True)
        with page.expect_download() as info:
            page.click("#download-adapter")
        with tarfile.open(fileobj=io.BytesIO(Path(info.value.path()).read_bytes())) as tar:
            assert "adapter/adapter_config.json" in tar.getnames()
        page.goto(f"{console.server.url}/console#/fine-tuning")
        expect(page.locator(f'#jobs tr[data-job="{job_id}"]')).to_contain_text("succeeded")
        page.screenshot(path=SHOTS / "fine-tuning.png")

        # Sign out: the key leaves the tab.
        page.click("#signout")
        expect(page.locator("#signin-form")).to_be_visible()
        assert page.evaluate("sessionStorage.length") == 0

        # Another tenant: the first tenant's scoring and fine-tuning jobs are not found.
        other = browser.new_context(viewport={"width": 1400, "height": 900}).new_page()
        watch.attach(other)
        other.goto(f"{console.server.url}/console#/review/{console.scoring_job}")
        other.fill("#api-key", console.other_key)
        other.click("#signin-form button[type=submit]")
        expect(other.locator(".notice.notfound")).to_contain_text("Not found")
        expect(other.locator("#who")).to_contain_text("another-tenant · second reviewer")
        other.screenshot(path=SHOTS / "not-found.png")
        other.goto(f"{console.server.url}/console#/fine-tuning/{job_id}")
        expect(other.locator(".notice.notfound")).to_contain_text("Not found")
        browser.close()
    elapsed = time.monotonic() - started

    assert watch.unexpected() == [], watch.errors
    for key in (console.key, console.other_key):
        assert not [u for u in watch.urls if key in u], "an API key in a URL"
    log = console.server.output()
    assert log.count(console.key) == 1, "the first-start print only"
    assert console.other_key not in log
    # What the console launched: the reviewed flags, recorded on the job.
    http = httpx.Client(
        base_url=console.server.url, headers={"Authorization": f"Bearer {console.key}"}
    )
    with http:
        job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["curation"]["flagged"] == len(expected)
    assert job["curation"]["reviewed"] == 2
    print(f"browser part: {elapsed:.1f} s")
