"""Bad uploads at scale, against a real server on Postgres: each is answered 4xx naming the
line, nothing is stored, and the server's peak memory stays bounded."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import ServerProcess

Headers = dict[str, str]
ROW = json.dumps({"role": "Tester", "question": "How are you?", "generated": ["Fine, thanks."]})
PEAK_GROWTH_LIMIT = 64 * 1024 * 1024
"""What the whole sequence may add to the server's peak RSS (VmHWM); 17 MiB measured."""


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def long_line(path: Path) -> Path:
    """One 50 MB line: a record whose answer is 50 MB of text."""
    with path.open("w") as f:
        f.write('{"role": "Tester", "question": "Q?", "generated": ["')
        for _ in range(50):
            f.write("x" * (1 << 20))
        f.write('"]}\n')
    return path


def deep_json(path: Path) -> Path:
    """1 MB of JSON nested 10,000 deep (then padding), on one line."""
    deep = '{"a": ' * 10_000 + "1" + "}" * 10_000
    path.write_text(deep + " " * (1_000_000 - len(deep)) + "\n")
    return path


def empty_lines(path: Path) -> Path:
    path.write_bytes(b"\n" * 1_000_000)
    return path


def bad_byte_late(path: Path) -> Path:
    """1,000,000 good rows but one invalid UTF-8 byte at line 900,000."""
    with path.open("wb") as f:
        good = (ROW + "\n").encode()
        for number in range(1, 1_000_001):
            f.write(good[:-2] + b"\xff\n" if number == 900_000 else good)
    return path


CASES: dict[str, tuple[Callable[[Path], Path], int | None, str]] = {
    "50 MB line": (long_line, 1, "longer than"),
    "nested 10,000 deep": (deep_json, 1, "nested too deeply"),
    "1,000,000 empty lines": (empty_lines, None, "empty"),
    "bad UTF-8 at line 900,000": (bad_byte_late, 900_000, "UTF-8"),
}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    folder = tmp_path_factory.mktemp("bad")
    yield {
        name: make(folder / f"{i}.jsonl") for i, (name, (make, _, _)) in enumerate(CASES.items())
    }


def test_bad_uploads_at_scale(
    api_server: ServerProcess, make_key: Callable[..., Headers], bad_files: dict[str, Path]
) -> None:
    headers = make_key()
    with httpx.Client(base_url=api_server.url, headers=headers, timeout=300) as http:
        role = http.post("/v1/roles", json={"name": "Tester", "profile": "Tests."}).json()["id"]
        before = peak_rss(api_server.proc.pid)
        for name, path in bad_files.items():
            _, line, fact = CASES[name]
            with path.open("rb") as f:
                r = http.post(
                    "/v1/datasets",
                    files={"file": (path.name, f, "application/jsonl")},
                    data={"role_id": role},
                )
            assert r.status_code == 422, (name, r.text[:500])
            error = r.json()["error"]
            assert fact in json.dumps(error), (name, error)
            if line is not None:
                assert error["errors"][0]["line"] == line, (name, error["errors"][:3])
        growth = peak_rss(api_server.proc.pid) - before
        assert http.get("/v1/datasets").json()["data"] == []  # nothing stored
    assert growth < PEAK_GROWTH_LIMIT, f"peak RSS grew by {growth / 2**20:.0f} MiB"
    print(f"peak RSS: {before / 2**20:.0f} MiB, then +{growth / 2**20:.1f} MiB over the uploads")
