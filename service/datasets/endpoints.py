from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Header, Response, UploadFile
from sqlalchemy import select

from service.core.auth import TenantDep
from service.core.config import get_settings
from service.core.deps import SessionDep
from service.core.errors import ERROR_RESPONSES, APIError, UnsupportedMediaType
from service.core.pagination import ListParams, ListResponse, list_params, paginate
from service.datasets import service
from service.datasets.schemas import DatasetOut
from service.models import Dataset
from service.roles import service as roles
from service.roles.schemas import NOT_BLANK, Deleted, RoleCreate

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], responses=ERROR_RESPONSES)

FILE_TYPES = {
    "application/json",
    "application/jsonl",
    "application/x-ndjson",
    "application/x-jsonlines",
    "application/octet-stream",
    "text/plain",
    "",
}


# The file's content is checked by the server, not by the schema: JSON Schema cannot say
# "JSONL records in a supported format", so an upload can be schema-valid and still answer
# 422. That 422 is the contract, documented here; a fuzzer must be told to expect it for this
# operation (tests/service/schemathesis.toml), since its positive-data check does not read
# the documented responses. Only the empty file is also said in the schema (minLength).
UNPROCESSABLE_UPLOAD = (
    "invalid_file: the file is not a dataset; error.errors lists {line, message} (first 100). "
    "An empty file, or one with no samples (blank lines only, an empty JSON array), is "
    'rejected too: one error at line 0, "the file is empty (no samples)". '
    "invalid_request: a form field or the Idempotency-Key does not validate."
)


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    responses={
        200: {"description": "Same file, same Idempotency-Key: the existing dataset"},
        409: {"description": "Idempotency-Key reused for another file"},
        413: {"description": "File over the size limit"},
        415: {"description": "Not a multipart upload of a JSON/JSONL file"},
        422: {"description": UNPROCESSABLE_UPLOAD},
    },
)
def upload_dataset(
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
    file: Annotated[
        UploadFile,
        File(
            description="JSONL or JSON in a supported format, with at least one sample.",
            # A zero-byte file is never a dataset: said in the schema, so that generators
            # (fuzzers) know it is invalid, and its 422 rejects an invalid request.
            json_schema_extra={"minLength": 1},
        ),
    ],
    role_id: Annotated[str | None, Form(min_length=1, description="An existing role.")] = None,
    role_name: Annotated[
        str | None,
        Form(
            min_length=1,
            max_length=200,
            pattern=NOT_BLANK,
            description="Or create the role inline.",
        ),
    ] = None,
    role_profile: Annotated[
        str | None,
        Form(
            min_length=1,
            max_length=50_000,
            pattern=NOT_BLANK,
            description="Profile for the inline role.",
        ),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=200,
            description="Retry-safe uploads: the same key and file answer the same dataset.",
        ),
    ] = None,
) -> DatasetOut:
    """Upload a character's training dialogues; the whole file is validated first.

    A file with no samples is rejected with 422, error code `invalid_file`: an empty file,
    blank lines only, or an empty JSON array (one error, line 0, "the file is empty (no
    samples)"). A dataset with nothing to score is of no use, so none is stored.
    """
    content_type = (file.content_type or "").split(";")[0].strip().lower()
    if content_type not in FILE_TYPES:
        raise UnsupportedMediaType(f"unsupported file type {content_type!r}", param="file")
    inline = role_name is not None or role_profile is not None
    if (role_id is not None) == inline or (inline and not (role_name and role_profile)):
        raise APIError("give either role_id, or both role_name and role_profile", param="role_id")
    if role_id is not None:
        role = roles.get(session, tenant, role_id)
    settings = get_settings()
    path, size, sha256 = service.save_upload(
        file.file, settings.uploads_dir, settings.max_upload_bytes
    )
    try:
        if idempotency_key and (
            existing := service.find_idempotent(session, tenant, idempotency_key, sha256)
        ):
            response.status_code = 200
            return service.to_out(existing)
        if role_id is None:
            assert role_name and role_profile
            role = roles.create(session, tenant, RoleCreate(name=role_name, profile=role_profile))
        try:
            dataset = service.import_file(
                session,
                tenant,
                role.id,
                path,
                filename=file.filename or "upload.jsonl",
                size=size,
                sha256=sha256,
                idempotency_key=idempotency_key,
            )
        except service.AlreadyUploaded as same:
            response.status_code = 200
            return service.to_out(same.dataset)
        return service.to_out(dataset)
    finally:
        service.discard(path)


@router.get("", response_model=ListResponse[DatasetOut])
def list_datasets(
    session: SessionDep, tenant: TenantDep, params: Annotated[ListParams, Depends(list_params)]
) -> ListResponse[DatasetOut]:
    """List the tenant's datasets, newest first."""
    stmt = select(Dataset).where(Dataset.tenant_id == tenant)
    rows, more = paginate(session, stmt, Dataset.id, params, params.after)
    return ListResponse(data=[service.to_out(r) for r in rows], has_more=more)


@router.get("/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> DatasetOut:
    """Retrieve a dataset."""
    return service.to_out(service.get(session, tenant, dataset_id))


@router.delete("/{dataset_id}", response_model=Deleted, responses={409: {"description": "Busy"}})
def delete_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> Deleted:
    """Delete a dataset, its samples, and its finished scoring jobs."""
    service.delete(session, tenant, dataset_id)
    return Deleted(id=dataset_id, object="dataset")
