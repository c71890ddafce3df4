from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import HTMLResponse
from sqlalchemy import select

from service.core.auth import TenantDep
from service.core.deps import SessionDep
from service.core.errors import ERROR_RESPONSES
from service.core.pagination import ListParams, ListResponse, list_params, paginate
from service.models import Role
from service.roles import risk, service
from service.roles.risk_html import render_html
from service.roles.schemas import Deleted, RoleCreate, RoleOut, RoleRisk

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


# Registered before /{role_id}, which would otherwise take "risk" for a role id.
@router.get(
    "/risk",
    response_model=ListResponse[RoleRisk],
    responses={200: {"content": {"text/html": {}}, "description": "JSON, or HTML with plots"}},
)
def role_risk(
    session: SessionDep,
    tenant: TenantDep,
    params: Annotated[ListParams, Depends(list_params)],
    samples: Annotated[
        int, Query(ge=0, le=10, description="Most-flagged samples shown per role (0-10).")
    ] = 3,
    bins: Annotated[int, Query(ge=5, le=50, description="Histogram bins (5-50).")] = 20,
    format: Annotated[Literal["json", "html"], Query(description="json or html")] = "json",
) -> ListResponse[RoleRisk] | HTMLResponse:
    """Each role's latest succeeded scoring result: the flagged fraction with its Wilson 95%
    interval, the distribution of s_unsafe - s_role, and the most-flagged samples."""
    page = risk.role_risks(session, tenant, params, samples=samples, bins=bins)
    if format == "json":
        return page
    # The page shows uploaded text: escaped, and a policy that would refuse any script anyway.
    return HTMLResponse(
        render_html(page),
        headers={
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
            "X-Content-Type-Options": "nosniff",
        },
    )


@router.get("/{role_id}", response_model=RoleOut)
def get_role(role_id: str, session: SessionDep, tenant: TenantDep) -> RoleOut:
    """Retrieve a role."""
    return service.to_out(service.get(session, tenant, role_id))


@router.delete("/{role_id}", response_model=Deleted, responses={409: {"description": "In use"}})
def delete_role(role_id: str, session: SessionDep, tenant: TenantDep) -> Deleted:
    """Delete a role that no dataset uses."""
    service.delete(session, tenant, role_id)
    return Deleted(id=role_id, object="role")
