from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.errors import Conflict
from service.core.ids import new_id
from service.core.scoping import get_owned
from service.models import Dataset, Role
from service.roles.schemas import RoleCreate, RoleOut
from worker.prompts import RolePrompts


def to_out(role: Role) -> RoleOut:
    return RoleOut(
        id=role.id,
        created_at=int(role.created_at.timestamp()),
        name=role.name,
        profile=role.profile,
        role_prompt=role.role_prompt,
        unsafe_prompt=role.unsafe_prompt,
    )


def create(session: Session, tenant_id: str, body: RoleCreate) -> Role:
    if body.role_prompt is not None and body.unsafe_prompt is not None:
        prompts = RolePrompts(body.name.strip(), body.role_prompt, body.unsafe_prompt)
    else:
        prompts = RolePrompts.from_profile(body.name, body.profile)
    role = Role(
        id=new_id("role"),
        tenant_id=tenant_id,
        name=prompts.name,
        profile=body.profile,
        role_prompt=prompts.role_prompt,
        unsafe_prompt=prompts.unsafe_prompt,
    )
    session.add(role)
    session.flush()
    return role


def get(session: Session, tenant_id: str, role_id: str) -> Role:
    return get_owned(session, Role, role_id, tenant_id, what="role", param="role_id")


def delete(session: Session, tenant_id: str, role_id: str) -> None:
    role = get(session, tenant_id, role_id)
    if session.scalar(select(Dataset.id).where(Dataset.role_id == role.id).limit(1)):
        raise Conflict("the role has datasets; delete them first", param="role_id")
    session.delete(role)
    session.flush()


def prompts_of(role: Role) -> RolePrompts:
    return RolePrompts(
        name=role.name, role_prompt=role.role_prompt, unsafe_prompt=role.unsafe_prompt
    )
