"""A small typed client for the sarft HTTP API.

Defaults come from ``SARFT_API_URL`` (else http://127.0.0.1:8000) and ``SARFT_API_KEY``.
API errors raise :class:`SarftAPIError`, parsed from the service's
``{"error": {"code", "message", "param", ...}}`` body.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
FINISHED = frozenset({"succeeded", "failed", "cancelled"})
EVENTS_PAGE = 100
CHUNK = 1 << 16
FINE_TUNING = "/v1/fine_tuning/jobs"


def job_path(job_id: str) -> str:
    """The API path of a job: fine-tuning job ids start with ``ftjob_``."""
    if job_id.startswith("ftjob_"):
        return f"{FINE_TUNING}/{job_id}"
    return f"/v1/scoring_jobs/{job_id}"


class HTTPResponse(Protocol):
    """The part of an httpx response the client uses."""

    @property
    def status_code(self) -> int: ...

    @property
    def text(self) -> str: ...

    @property
    def reason_phrase(self) -> str: ...

    def json(self, **kwargs: Any) -> Any: ...

    def read(self) -> bytes: ...

    def iter_bytes(self, chunk_size: int | None = None) -> Iterator[bytes]: ...


class HTTPClient(Protocol):
    """What the client needs from an HTTP client: ``httpx.Client`` or Starlette's TestClient."""

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any: ...

    def stream(
        self, method: str, url: str, *args: Any, **kwargs: Any
    ) -> AbstractContextManager[Any]: ...

    def close(self) -> None: ...


class SarftAPIError(Exception):
    """An error response from the API."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        errors: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.errors = errors or []

    @classmethod
    def from_response(cls, response: HTTPResponse) -> SarftAPIError:
        """Parse the error body; a non-JSON body becomes the message as text."""
        status = response.status_code
        try:
            body = response.json()
        except ValueError:
            body = None
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            errors = error.get("errors")
            return cls(
                status,
                str(error.get("code") or "http_error"),
                str(error.get("message") or response.reason_phrase),
                error.get("param"),
                [e for e in errors if isinstance(e, dict)] if isinstance(errors, list) else None,
            )
        text = response.text.strip()
        return cls(status, "http_error", text[:1000] or response.reason_phrase or "HTTP error")


def _content_type(path: Path) -> str:
    return "application/json" if path.suffix.lower() == ".json" else "application/x-ndjson"


class SarftClient:
    """Client for the sarft API.

    ``http`` replaces the client's own ``httpx.Client`` (e.g. a Starlette TestClient); it is
    not closed by :meth:`close`, and its own timeouts apply. Requests always use absolute
    URLs under ``base_url``.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
        *,
        upload_timeout: float = 600.0,
        http: HTTPClient | None = None,
    ) -> None:
        self.base_url = (base_url or os.environ.get("SARFT_API_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("SARFT_API_KEY")
        self.timeout = timeout
        self.upload_timeout = upload_timeout
        self._owns_http = http is None
        self.http: HTTPClient = http if http is not None else httpx.Client(timeout=timeout)

    # --- plumbing ----------------------------------------------------------------------------

    def close(self) -> None:
        if self._owns_http:
            self.http.close()

    def __enter__(self) -> SarftClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        headers.update(extra or {})
        return headers

    def _request(
        self, method: str, path: str, *, headers: Mapping[str, str] | None = None, **kwargs: Any
    ) -> Any:
        response: HTTPResponse = self.http.request(
            method, self.url(path), headers=self._headers(headers), **kwargs
        )
        if response.status_code >= 400:
            raise SarftAPIError.from_response(response)
        return response.json()

    # --- roles and datasets ------------------------------------------------------------------

    def create_role(
        self,
        name: str,
        profile: str,
        role_prompt: str | None = None,
        unsafe_prompt: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "profile": profile}
        if role_prompt is not None or unsafe_prompt is not None:
            body.update(role_prompt=role_prompt, unsafe_prompt=unsafe_prompt)
        result: dict[str, Any] = self._request("POST", "/v1/roles", json=body)
        return result

    def role_risk(self, samples: int = 3, *, bins: int | None = None) -> dict[str, Any]:
        """Every role's latest succeeded scoring result: the flagged fraction with its Wilson
        95% interval, the distribution of ``s_unsafe - s_role`` (``bins`` histogram bins; None:
        the server's) and the ``samples`` most-flagged samples. Reads every page and returns
        them as one list, ``{"object": "list", "data", "has_more": false}``."""
        params: dict[str, Any] = {"samples": samples, "limit": 100}
        if bins is not None:
            params["bins"] = bins
        data: list[dict[str, Any]] = []
        while True:
            page = self._request("GET", "/v1/roles/risk", params=params)
            data.extend(page["data"])
            if not page.get("has_more") or not page["data"]:
                break
            params["after"] = page["data"][-1]["role_id"]
        return {"object": "list", "data": data, "has_more": False}

    def upload_dataset(
        self,
        path: str | Path,
        role_id: str | None = None,
        role_name: str | None = None,
        role_profile: str | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        """Upload a JSONL/JSON file (streamed from disk, never read whole)."""
        path = Path(path)
        form = {
            k: v
            for k, v in (
                ("role_id", role_id),
                ("role_name", role_name),
                ("role_profile", role_profile),
            )
            if v is not None
        }
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        # Validation runs before the server answers: allow a big file more time.
        extra = {"timeout": self.upload_timeout} if self._owns_http else {}
        with path.open("rb") as fh:
            result: dict[str, Any] = self._request(
                "POST",
                "/v1/datasets",
                headers=headers,
                data=form,
                files={"file": (path.name, fh, _content_type(path))},
                **extra,
            )
        return result

    # --- jobs (scoring and fine-tuning, told apart by their id prefix) ----------------------

    def create_scoring_job(self, dataset_id: str, **options: Any) -> dict[str, Any]:
        """Options: margin, compute_reference, batch_size, model, backend (None: server's)."""
        body = {"dataset_id": dataset_id, **{k: v for k, v in options.items() if v is not None}}
        result: dict[str, Any] = self._request("POST", "/v1/scoring_jobs", json=body)
        return result

    def get_scoring_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("GET", f"/v1/scoring_jobs/{job_id}")
        return result

    def create_fine_tuning_job(
        self,
        dataset_id: str,
        scoring_job_id: str,
        method: str = "sarft",
        hyperparameters: Mapping[str, Any] | None = None,
        evaluation: Mapping[str, Any] | None = None,
        *,
        skip_evaluation: bool = False,
    ) -> dict[str, Any]:
        """``hyperparameters`` and ``evaluation``: as the API's body (None: server defaults);
        ``skip_evaluation`` sends ``evaluation: null``."""
        body: dict[str, Any] = {
            "dataset_id": dataset_id,
            "scoring_job_id": scoring_job_id,
            "method": method,
        }
        if hyperparameters is not None:
            body["hyperparameters"] = dict(hyperparameters)
        if skip_evaluation:
            body["evaluation"] = None
        elif evaluation is not None:
            body["evaluation"] = dict(evaluation)
        result: dict[str, Any] = self._request("POST", FINE_TUNING, json=body)
        return result

    def get_job(self, job_id: str) -> dict[str, Any]:
        """A scoring job or a fine-tuning job."""
        result: dict[str, Any] = self._request("GET", job_path(job_id))
        return result

    def list_events(self, job_id: str, limit: int | None = None) -> list[dict[str, Any]]:
        """The job's ``limit`` most recent events (all when None), oldest first."""
        events: list[dict[str, Any]] = []
        after: str | None = None
        while limit is None or len(events) < limit:
            page = EVENTS_PAGE if limit is None else max(1, min(EVENTS_PAGE, limit - len(events)))
            params: dict[str, Any] = {"limit": page}
            if after is not None:
                params["after"] = after
            body = self._request("GET", f"{job_path(job_id)}/events", params=params)
            events.extend(body["data"])
            if not body.get("has_more") or not body["data"]:
                break
            after = body["data"][-1]["id"]
        events.reverse()
        return events

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._request("POST", f"{job_path(job_id)}/cancel")
        return result

    def wait_job(
        self,
        job_id: str,
        poll_s: float = 2.0,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Poll until the job is succeeded, failed or cancelled; return the final job.

        ``on_progress`` gets every polled job (the final one included). Raises TimeoutError
        after ``timeout_s`` seconds, if given.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.get_job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job["status"] in FINISHED:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s}s")
            time.sleep(poll_s)

    # --- downloads -----------------------------------------------------------------------------

    def download_subset(self, job_id: str, dest_path: str | Path, which: str = "flagged") -> int:
        """Stream a scoring job's flagged (or all) samples as JSONL; returns bytes written."""
        return self._download(f"/v1/scoring_jobs/{job_id}/subset", dest_path, {"which": which})

    def download_adapter(self, job_id: str, dest_path: str | Path) -> int:
        """A fine-tuning job's adapter (or full checkpoint) as .tar.gz; returns bytes written."""
        return self._download(f"{FINE_TUNING}/{job_id}/adapter", dest_path)

    def list_checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        """A fine-tuning job's checkpoints, newest first (every page)."""
        found: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 100}
        while True:
            page = self._request("GET", f"{FINE_TUNING}/{job_id}/checkpoints", params=params)
            body = page.json()
            found.extend(body["data"])
            if not body["has_more"] or not body["data"]:
                return found
            params["after"] = body["data"][-1]["id"]

    def download_checkpoint(self, job_id: str, checkpoint_id: str, dest_path: str | Path) -> int:
        """One checkpoint's weights (adapter or model) as .tar.gz; returns bytes written."""
        path = f"{FINE_TUNING}/{job_id}/checkpoints/{checkpoint_id}/content"
        return self._download(path, dest_path)

    def export_model(
        self,
        job_id: str,
        dest_path: str | Path,
        poll: float = 2.0,
        timeout: float | None = 3600.0,
    ) -> int:
        """A fine-tuning job's base model with its LoRA adapter merged (full fine-tuning: its
        checkpoint) as .tar.gz of a directory that ``from_pretrained`` and vLLM load: asks the
        server to export it, waits while a training worker merges it, then downloads it;
        returns bytes written. Raises TimeoutError after ``timeout`` seconds (None: never)."""
        path = f"{FINE_TUNING}/{job_id}/model"
        self._request("POST", path)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                return self._download(path, dest_path)
            except SarftAPIError as exc:
                # Any other 409 (not succeeded, the export failed) will not change by waiting.
                if exc.code != "export_in_progress":
                    raise
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id}'s model is still exporting after {timeout:g} s")
            time.sleep(poll)

    def download_report(self, job_id: str, dest_path: str | Path, fmt: str = "json") -> int:
        """A fine-tuning job's report, ``fmt`` json or html; returns bytes written."""
        return self._download(f"{FINE_TUNING}/{job_id}/report", dest_path, {"format": fmt})

    def _download(
        self, path: str, dest_path: str | Path, params: Mapping[str, str] | None = None
    ) -> int:
        """Stream to ``dest_path`` under a ``.part`` name, renamed once complete."""
        dest = Path(dest_path)
        part = dest.with_name(dest.name + ".part")
        written = 0
        with self.http.stream(
            "GET", self.url(path), params=dict(params or {}), headers=self._headers()
        ) as response:
            if response.status_code >= 400:
                response.read()
                raise SarftAPIError.from_response(response)
            try:
                with part.open("wb") as out:
                    for chunk in response.iter_bytes(CHUNK):
                        out.write(chunk)
                        written += len(chunk)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
        part.replace(dest)
        return written
