"""Uploads: stream to disk, validate the whole file, then insert rows in bulk."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from sqlalchemy import delete as sql_delete
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.core.errors import Conflict, InvalidFile, PayloadTooLarge
from service.core.ids import new_id
from service.core.scoping import get_owned
from service.datasets.schemas import DatasetOut
from service.models import Dataset, DatasetSample, JobEvent, JobStatus, ScoringJob
from worker.formats import DatasetError, detect_format, scan_file
from worker.json_records import LineError

INSERT_BATCH = 2000
MAX_REPORTED_ERRORS = 100
COPY_SAMPLES = "COPY dataset_samples (dataset_id, idx, line, record) FROM STDIN"
COPY_CHUNK = 1 << 20


class AlreadyUploaded(Exception):
    def __init__(self, dataset: Dataset) -> None:
        super().__init__(dataset.id)
        self.dataset = dataset


def to_out(ds: Dataset) -> DatasetOut:
    return DatasetOut(
        id=ds.id,
        created_at=int(ds.created_at.timestamp()),
        role_id=ds.role_id,
        filename=ds.filename,
        num_samples=ds.num_samples,
        format=ds.format,
        bytes=ds.bytes,
        sha256=ds.sha256,
        status=ds.status,
    )


def save_upload(source: BinaryIO, directory: Path, limit: int) -> tuple[Path, int, str]:
    """Copy the upload to a file under ``directory`` in chunks; returns path, size, sha256."""
    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    size = 0
    fd, name = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=directory)
    path = Path(name)
    try:
        with open(fd, "wb") as out:
            while chunk := source.read(COPY_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"the file is larger than the limit of {limit} bytes")
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path, size, digest.hexdigest()


def find_idempotent(session: Session, tenant_id: str, key: str, sha256: str) -> Dataset | None:
    existing = session.scalar(
        select(Dataset).where(Dataset.tenant_id == tenant_id, Dataset.idempotency_key == key)
    )
    if existing is not None and existing.sha256 != sha256:
        raise Conflict(
            "this Idempotency-Key was used for a different file", param="Idempotency-Key"
        )
    return existing


def import_file(
    session: Session,
    tenant_id: str,
    role_id: str,
    path: Path,
    *,
    filename: str,
    size: int,
    sha256: str,
    idempotency_key: str | None,
) -> Dataset:
    """Validate and store the file in one pass; any bad record raises InvalidFile, and the
    request's transaction then rolls back every row written: nothing is stored."""
    try:
        fmt = detect_format(path)
    except DatasetError as exc:
        raise _invalid(exc.errors, len(exc.errors)) from exc
    dataset = Dataset(
        id=new_id("ds"),
        tenant_id=tenant_id,
        role_id=role_id,
        filename=filename[:300],
        format=fmt.value,
        num_samples=0,
        bytes=size,
        sha256=sha256,
        idempotency_key=idempotency_key,
    )
    session.add(dataset)
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError as exc:
        # A concurrent upload with the same Idempotency-Key won the race.
        if idempotency_key and (
            won := find_idempotent(session, tenant_id, idempotency_key, sha256)
        ):
            raise AlreadyUploaded(won) from exc
        raise
    errors: list[LineError] = []
    total_errors = num_samples = 0
    with sample_writer(session, dataset.id) as write:
        for item in scan_file(path, fmt):
            if isinstance(item, LineError):
                total_errors += 1
                if len(errors) < MAX_REPORTED_ERRORS:
                    errors.append(item)
                continue
            num_samples += 1
            if not total_errors:  # after the first error nothing will be kept: stop writing
                # The line as uploaded: re-encoding it cost as much as parsing it.
                record = item.text or json.dumps(item.raw, ensure_ascii=False)
                write(item.index, item.line, record)
    if total_errors:
        raise _invalid(errors, total_errors)
    dataset.num_samples = num_samples
    return dataset


def _invalid(errors: list[LineError], total: int) -> InvalidFile:
    return InvalidFile(
        f"the file has {total} invalid record(s)",
        param="file",
        errors=[{"line": e.line, "message": e.message} for e in errors[:MAX_REPORTED_ERRORS]],
    )


@contextmanager
def sample_writer(session: Session, dataset_id: str) -> Iterator[Callable[[int, int, str], None]]:
    """Rows into dataset_samples: COPY on Postgres (several times faster than INSERTs), batched
    INSERTs elsewhere; all inside the session's transaction."""
    if session.get_bind().dialect.name == "postgresql":
        raw: Any = session.connection().connection.dbapi_connection  # a psycopg Connection
        with raw.cursor() as cursor, cursor.copy(COPY_SAMPLES) as copy:
            yield lambda idx, line, record: copy.write_row((dataset_id, idx, line, record))
        return
    batch: list[dict[str, object]] = []

    def write(idx: int, line: int, record: str) -> None:
        batch.append({"dataset_id": dataset_id, "idx": idx, "line": line, "record": record})
        if len(batch) >= INSERT_BATCH:
            session.execute(insert(DatasetSample), batch)
            batch.clear()

    yield write
    if batch:
        session.execute(insert(DatasetSample), batch)


def get(session: Session, tenant_id: str, dataset_id: str) -> Dataset:
    return get_owned(session, Dataset, dataset_id, tenant_id, what="dataset", param="dataset_id")


def delete(session: Session, tenant_id: str, dataset_id: str) -> None:
    ds = get(session, tenant_id, dataset_id)
    active = session.scalar(
        select(ScoringJob.id).where(
            ScoringJob.dataset_id == ds.id,
            ScoringJob.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
        )
    )
    if active:
        raise Conflict(f"scoring job {active} is still active; cancel it first")
    # Events are shared by job kinds and carry no foreign key: delete them explicitly.
    jobs = select(ScoringJob.id).where(ScoringJob.dataset_id == ds.id)
    session.execute(sql_delete(JobEvent).where(JobEvent.job_id.in_(jobs)))
    session.delete(ds)
    session.flush()


def discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
