"""The REST API without a model: validation, errors, pagination, tenants, idempotency."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from tests.service.conftest import rolebench_file

Headers = dict[str, str]


def count_samples() -> int:
    from service.core.db import session_scope
    from service.models import DatasetSample

    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(DatasetSample)) or 0)


def new_role(client: TestClient, headers: Headers, name: str = "Jack Sparrow") -> str:
    r = client.post("/v1/roles", json={"name": name, "profile": "A pirate."}, headers=headers)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def upload(client: TestClient, headers: Headers, path: Path, role_id: str, **kw: str) -> Any:
    with path.open("rb") as f:
        return client.post(
            "/v1/datasets",
            files={"file": (path.name, f, kw.pop("content_type", "application/jsonl"))},
            data={"role_id": role_id},
            headers={**headers, **kw},
        )


def test_health_ready_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["database"] == "ok", ready.text
    assert "sarft_http_requests_total" in client.get("/metrics").text


def test_auth_required(client: TestClient) -> None:
    r = client.get("/v1/roles")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = client.get("/v1/roles", headers={"Authorization": "Bearer sk-sarft-nope"})
    assert r.status_code == 401


def test_roles_crud_and_pagination(client: TestClient, make_key: Callable[..., Headers]) -> None:
    h = make_key()
    ids = [new_role(client, h, f"role {i}") for i in range(5)]
    page = client.get("/v1/roles?limit=2", headers=h).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert [r["id"] for r in page["data"]] == ids[::-1][:2]
    rest = client.get(f"/v1/roles?limit=10&after={page['data'][-1]['id']}", headers=h).json()
    assert [r["id"] for r in rest["data"]] == ids[::-1][2:] and rest["has_more"] is False
    role = client.get(f"/v1/roles/{ids[0]}", headers=h).json()
    assert role["object"] == "role" and "role 0" in role["role_prompt"]
    assert role["unsafe_prompt"].startswith(role["role_prompt"])
    assert client.delete(f"/v1/roles/{ids[0]}", headers=h).json()["deleted"] is True
    assert client.get(f"/v1/roles/{ids[0]}", headers=h).status_code == 404


def test_bad_bodies_are_422_unknown_ids_404(
    client: TestClient, make_key: Callable[..., Headers]
) -> None:
    h = make_key()
    r = client.post(
        "/v1/roles", content=b"{not json", headers={**h, "content-type": "application/json"}
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    r = client.post("/v1/roles", json={"name": "x"}, headers=h)
    assert r.status_code == 422 and "profile" in r.json()["error"]["message"]
    r = client.post(
        "/v1/roles", json={"name": "x", "profile": "p", "role_prompt": "only one"}, headers=h
    )
    assert r.status_code == 422
    for path in (
        "/v1/roles/role_x",
        "/v1/datasets/ds_x",
        "/v1/scoring_jobs/scorejob_x",
        "/v1/scoring_jobs/scorejob_x/events",
        "/v1/scoring_jobs/scorejob_x/subset",
    ):
        r = client.get(path, headers=h)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", path
    r = client.post("/v1/scoring_jobs", json={"dataset_id": "ds_x"}, headers=h)
    assert r.status_code == 404 and r.json()["error"]["param"] == "dataset_id"
    r = client.post("/v1/scoring_jobs", json={"dataset_id": 5, "batch_size": 0}, headers=h)
    assert r.status_code == 422


GOOD_ROW = b'{"role": "a", "question": "q", "generated": ["x"]}\n'
ONE_EMPTY_ANSWER = (
    b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}'
)
BAD_FILES = {
    "invalid_json": (
        b'{"role": "a", "question": "q", "generated": ["x"]}\n{oops\n',
        2,
        "invalid JSON",
    ),
    "missing_field": (
        b'{"role": "a", "question": "q", "generated": ["x"]}\n{"role": "a", "question": "q"}\n',
        2,
        "generated",
    ),
    "wrong_type": (
        GOOD_ROW + b'{"role": "a", "question": 3, "generated": ["x"]}\n',
        2,
        "string",
    ),
    "empty_response": (
        ONE_EMPTY_ANSWER + b"\n",
        1,
        "empty",
    ),
    "no_assistant": (b'{"messages": [{"role": "user", "content": "hi"}]}\n', 1, "assistant"),
    "not_utf8": (
        b'{"input": "q", "output": "a"}\n{"input": "\xff\xfe", "output": "a"}\n',
        2,
        "UTF-8",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_malformed_uploads_store_nothing(
    kind: str, client: TestClient, make_key: Callable[..., Headers], tmp_path: Path
) -> None:
    h = make_key()
    role = new_role(client, h)
    content, line, needle = BAD_FILES[kind]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    before = count_samples()
    r = upload(client, h, path, role)
    assert r.status_code == 422, r.text
    errors = r.json()["error"]["errors"]
    assert errors[0]["line"] == line and needle.lower() in errors[0]["message"].lower(), errors
    assert count_samples() == before
    assert client.get("/v1/datasets", headers=h).json()["data"] == []


def test_empty_file_and_media_type(
    client: TestClient, make_key: Callable[..., Headers], tmp_path: Path
) -> None:
    h = make_key()
    role = new_role(client, h)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n\n")
    assert upload(client, h, empty, role).status_code == 422
    good = rolebench_file(tmp_path / "good.jsonl", 3)
    r = upload(client, h, good, role, content_type="image/png")
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_upload_and_idempotency(
    client: TestClient, make_key: Callable[..., Headers], tmp_path: Path
) -> None:
    h = make_key()
    role = new_role(client, h)
    path = rolebench_file(tmp_path / "jack.jsonl", 7)
    first = upload(client, h, path, role, **{"Idempotency-Key": "k1"})
    assert first.status_code == 201, first.text
    body = first.json()
    assert (
        body["object"] == "dataset" and body["num_samples"] == 7 and body["format"] == "rolebench"
    )
    assert body["bytes"] == path.stat().st_size
    again = upload(client, h, path, role, **{"Idempotency-Key": "k1"})
    assert again.status_code == 200 and again.json()["id"] == body["id"]
    other = tmp_path / "other.jsonl"
    other.write_text(path.read_text().splitlines()[0] + "\n")
    assert upload(client, h, other, role, **{"Idempotency-Key": "k1"}).status_code == 409
    assert client.delete(f"/v1/roles/{role}", headers=h).status_code == 409  # in use
    # An empty key is no key at all: refused, not stored as "" (a second "" was a 500).
    for _ in range(2):
        empty = upload(client, h, path, role, **{"Idempotency-Key": ""})
        assert empty.status_code == 422, empty.text


def test_inline_role_upload(
    client: TestClient, make_key: Callable[..., Headers], tmp_path: Path
) -> None:
    h = make_key()
    path = rolebench_file(tmp_path / "jack.jsonl", 2)
    with path.open("rb") as f:
        r = client.post(
            "/v1/datasets",
            files={"file": ("j.jsonl", f)},
            data={"role_name": "Jack Sparrow", "role_profile": "A pirate."},
            headers=h,
        )
    assert r.status_code == 201, r.text
    role = client.get(f"/v1/roles/{r.json()['role_id']}", headers=h).json()
    assert role["name"] == "Jack Sparrow"


def test_oversize_upload_is_413(
    service_env: dict[str, str],
    make_key: Callable[..., Headers],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service.app import create_app
    from service.core.config import get_settings

    monkeypatch.setenv("SARFT_MAX_UPLOAD_BYTES", "1000")
    get_settings.cache_clear()
    try:
        with TestClient(create_app()) as small:
            h = make_key()
            role = new_role(small, h)
            big = tmp_path / "big.jsonl"
            row = json.dumps({"input": "q" * 100, "output": "a" * 100}) + "\n"
            big.write_text(row * 200)
            before = count_samples()
            r = upload(small, h, big, role)
            assert r.status_code == 413, r.text
            assert r.json()["error"]["code"] == "payload_too_large"
            assert count_samples() == before
    finally:
        monkeypatch.delenv("SARFT_MAX_UPLOAD_BYTES")
        get_settings.cache_clear()


def test_tenant_isolation_on_every_route(
    client: TestClient, make_key: Callable[..., Headers], tmp_path: Path
) -> None:
    a, b = make_key(), make_key()
    role = new_role(client, a)
    ds = upload(client, a, rolebench_file(tmp_path / "j.jsonl", 3), role).json()["id"]
    job = client.post("/v1/scoring_jobs", json={"dataset_id": ds}, headers=a).json()["id"]
    routes = [
        ("GET", f"/v1/roles/{role}"),
        ("DELETE", f"/v1/roles/{role}"),
        ("GET", f"/v1/datasets/{ds}"),
        ("DELETE", f"/v1/datasets/{ds}"),
        ("GET", f"/v1/scoring_jobs/{job}"),
        ("GET", f"/v1/scoring_jobs/{job}/events"),
        ("POST", f"/v1/scoring_jobs/{job}/cancel"),
        ("GET", f"/v1/scoring_jobs/{job}/subset"),
        ("GET", f"/v1/scoring_jobs/{job}/subset?which=all"),
    ]
    for method, path in routes:
        r = client.request(method, path, headers=b)
        assert r.status_code == 404, (method, path, r.text)
    assert client.post("/v1/scoring_jobs", json={"dataset_id": ds}, headers=b).status_code == 404
    r = upload(client, b, tmp_path / "j.jsonl", role)
    assert r.status_code == 404 and r.json()["error"]["param"] == "role_id"
    for listing in ("/v1/roles", "/v1/datasets", "/v1/scoring_jobs"):
        assert client.get(listing, headers=b).json()["data"] == []
    # A's objects are untouched, and A can cancel its queued job.
    assert client.get(f"/v1/datasets/{ds}", headers=a).status_code == 200
    assert client.get(f"/v1/scoring_jobs/{job}/subset", headers=a).status_code == 409
    cancelled = client.post(f"/v1/scoring_jobs/{job}/cancel", headers=a).json()
    assert cancelled["status"] == "cancelled"
    events = client.get(f"/v1/scoring_jobs/{job}/events", headers=a).json()["data"]
    assert [e["message"] for e in events] == ["cancelled by the user", "job created"]


def test_not_blank_means_what_strip_means() -> None:
    """The schema's "not blank" pattern, Python's str.strip and pydantic's validation agree on
    every code point (a profile of U+001C passed the old \\S pattern, then failed as blank)."""
    import re

    from pydantic import ValidationError

    from service.roles.schemas import NOT_BLANK, RoleCreate

    for code in range(0x110000):
        char = chr(code)
        assert bool(re.search(NOT_BLANK, char)) == bool(char.strip()), hex(code)
    for blank in ("\x1c", " \t", "\u3000"):
        with pytest.raises(ValidationError):
            RoleCreate(name="n", profile=blank)
    assert RoleCreate(name="n", profile="\ufeff").profile == "\ufeff"


def test_a_query_parameter_given_twice_is_refused(
    client: TestClient, make_key: Callable[..., dict[str, str]]
) -> None:
    h = make_key()
    r = client.get("/v1/roles?limit=5&limit=7", headers=h)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == "limit"
    assert client.get("/v1/roles?limit=5", headers=h).status_code == 200
