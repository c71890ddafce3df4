from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from sqlalchemy import select

from service.core.auth import TenantDep
from service.core.deps import SessionDep
from service.core.errors import ERROR_RESPONSES
from service.core.pagination import ListParams, ListResponse, list_params, paginate
from service.models import Role
from service.roles import service
from service.roles.schemas import Deleted, RoleCreate, RoleOut

router = APIRouter(prefix="/v1/roles", tags=["roles"], responses=ERROR_RESPONSES)


@router.post("", status_code=201, response_model=RoleOut)
def create_role(body: RoleCreate, session: SessionDep, tenant: TenantDep) -> RoleOut:
    """Create a role (character): name, profile, and optionally full custom prompts."""
    return service.to_out(service.create(session, tenant, body))


@router.get("", response_model=ListResponse[RoleOut])
def list_roles(
    session: SessionDep, tenant: TenantDep, params: Annotated[ListParams, Depends(list_params)]
) -> ListResponse[RoleOut]:
    """List the tenant's roles, newest first."""
    rows, more = paginate(
        session, select(Role).where(Role.tenant_id == tenant), Role.id, params, params.after
    )
    return ListResponse(data=[service.to_out(r) for r in rows], has_more=more)


@router.get("/{role_id}", response_model=RoleOut)
def get_role(role_id: str, session: SessionDep, tenant: TenantDep) -> RoleOut:
    """Retrieve a role."""
    return service.to_out(service.get(session, tenant, role_id))


@router.delete("/{role_id}", response_model=Deleted, responses={409: {"description": "In use"}})
def delete_role(role_id: str, session: SessionDep, tenant: TenantDep) -> Deleted:
    """Delete a role that no dataset uses."""
    service.delete(session, tenant, role_id)
    return Deleted(id=role_id, object="role")
